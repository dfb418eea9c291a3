//! Throughput of the RESP boundary scanner, with redis-protocol's range decoder for comparison.
//!
//! Run: `cargo bench --bench scanner -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::io::Write;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rotaproxy::resp::command::{self, Kind};
use rotaproxy::resp::scanner::{Direction, ScanLimits, Scanner};

const READ_SIZE: usize = 16 * 1024;

/// 10 000 pipelined `SET key:<12 digits> value` commands.
fn pipelined_sets() -> Vec<u8> {
    let mut buf = Vec::new();
    for i in 0..10_000u64 {
        write!(
            buf,
            "*3\r\n$3\r\nSET\r\n$16\r\nkey:{i:012}\r\n$5\r\nvalue\r\n"
        )
        .unwrap();
    }
    buf
}

/// A reply of 1 000 000 small bulk strings.
fn big_array_reply() -> Vec<u8> {
    let mut buf = b"*1000000\r\n".to_vec();
    for _ in 0..1_000_000 {
        buf.extend_from_slice(b"$5\r\nvalue\r\n");
    }
    buf
}

fn pipelined_small_commands(c: &mut Criterion) {
    let buf = pipelined_sets();
    let mut group = c.benchmark_group("pipelined small commands");
    group.throughput(Throughput::Bytes(buf.len() as u64));

    group.bench_function("rotaproxy scanner", |b| {
        b.iter(|| {
            let mut scanner = Scanner::new(Direction::Request, ScanLimits::request_defaults());
            let mut pos = 0;
            let mut frames = 0usize;
            while pos < buf.len() {
                let p = scanner.scan(black_box(&buf[pos..])).unwrap();
                pos += p.consumed;
                frames += p.complete as usize;
            }
            assert_eq!(frames, 10_000);
            frames
        })
    });

    // What a session does with such input: the fast lane takes whole commands, classifying
    // each name, and the general scanner takes the command cut by the end of each 16 KiB read.
    group.bench_function(
        "rotaproxy session path (fast lane + classify, 16 KiB reads)",
        |b| {
            let mut read_buf: Vec<u8> = Vec::with_capacity(2 * READ_SIZE);
            b.iter(|| {
                let mut scanner = Scanner::new(Direction::Request, ScanLimits::request_defaults());
                let mut frames = 0u64;
                read_buf.clear();
                for read in buf.chunks(READ_SIZE) {
                    read_buf.extend_from_slice(black_box(read));
                    let mut pos = 0;
                    while pos < read_buf.len() {
                        let (taken, n) = scanner.peek_request_run(&read_buf[pos..], |name| {
                            command::classify(name) == Kind::Other
                        });
                        if n > 0 {
                            scanner.skip_frames(taken);
                            pos += taken;
                            frames += n;
                            continue;
                        }
                        let p = scanner.scan(&read_buf[pos..]).unwrap();
                        pos += p.consumed;
                        frames += u64::from(p.complete);
                        if !p.complete {
                            break;
                        }
                    }
                    read_buf.drain(..pos);
                }
                assert_eq!(frames, 10_000);
                frames
            })
        },
    );

    group.bench_function("redis-protocol resp2 decode_range", |b| {
        b.iter(|| {
            let mut pos = 0;
            let mut frames = 0usize;
            while pos < buf.len() {
                let (frame, n) =
                    redis_protocol::resp2::decode::decode_range(black_box(&buf[pos..]))
                        .unwrap()
                        .unwrap();
                black_box(&frame);
                pos += n;
                frames += 1;
            }
            assert_eq!(frames, 10_000);
            frames
        })
    });
    group.finish();
}

fn big_reply_in_reads(c: &mut Criterion) {
    let reply = big_array_reply();
    let mut group = c.benchmark_group("1M-element reply in 16 KiB reads");
    group.throughput(Throughput::Bytes(reply.len() as u64));

    group.bench_function("rotaproxy scanner", |b| {
        // The proxy's read buffer: a partial line left over from the previous read, then the next read.
        let mut read_buf: Vec<u8> = Vec::with_capacity(2 * READ_SIZE);
        b.iter(|| {
            let mut scanner = Scanner::new(Direction::Reply, ScanLimits::reply_defaults());
            let mut frames = 0usize;
            read_buf.clear();
            for read in reply.chunks(READ_SIZE) {
                read_buf.extend_from_slice(read);
                let mut pos = 0;
                loop {
                    let p = scanner.scan(&read_buf[pos..]).unwrap();
                    pos += p.consumed;
                    if p.complete {
                        frames += 1;
                        if pos < read_buf.len() {
                            continue;
                        }
                    }
                    break;
                }
                // Forwarding `..pos` would happen here; keep the partial line for the next read.
                read_buf.drain(..pos);
            }
            assert_eq!(frames, 1);
            assert!(read_buf.is_empty());
            frames
        })
    });
    group.finish();
}

criterion_group!(benches, pipelined_small_commands, big_reply_in_reads);
criterion_main!(benches);
