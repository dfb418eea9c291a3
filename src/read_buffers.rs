//! Read buffers, lent to a connection only while it holds bytes.
//!
//! A session reads its client's requests and the server's replies into buffers, and those bytes
//! are usually gone again (forwarded, relayed) before the session next waits. Owning both
//! buffers for the whole life of a connection made every idle client cost their memory: 16.6
//! KiB per client that had sent a PING, and 72.5 KiB once it had moved a 100 KiB value each way,
//! kept until it disconnected (`benches/memory.py`; the pages a buffer has touched stay
//! resident). Instead a session hands back each buffer it has emptied when it waits
//! ([`release_if_empty`]), and a read takes one from a small per-thread stock once there is
//! something to read ([`make_read_room`], called by `net::Stream::poll_read_into`). A thread
//! runs one session at a time, so a few buffers serve all of its sessions, and the kernel
//! copies every read into the same few cache lines: that made the CPU per request 2-3% lower
//! too (`benches/side_by_side.py`, against the build before).

use std::cell::RefCell;

use bytes::BytesMut;

/// Size of a read buffer, and the free space made in it when it runs low.
const READ_RESERVE: usize = 32 * 1024;
/// Free space below which a read buffer holding bytes is compacted or grown before the next
/// read. Making room costs a call and a copy, so it is not done before every read.
const READ_MIN: usize = 8 * 1024;
/// Spare buffers a thread keeps. A thread needs two at a time for the session it runs (its
/// client's input and the server's); more are needed only while sessions wait holding bytes (a
/// slow peer, a partial command), and a buffer freed then is simply allocated again later.
const SPARE_LIMIT: usize = 16;
/// A buffer that grew past this (it held a large request or a reply whole) is freed rather than
/// kept, so a single large transfer does not keep its memory.
const SPARE_MAX_CAPACITY: usize = 2 * READ_RESERVE;

thread_local! {
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Makes room for the next read into `buf`: takes a spare buffer when `buf` has no memory, and
/// otherwise grows or compacts it when it runs low. A buffer whose bytes were all consumed goes
/// back to the start of its allocation (nothing to copy), so reads keep landing in the same
/// few cache lines instead of walking through the buffer's whole capacity.
#[inline(always)]
pub fn make_read_room(buf: &mut BytesMut) {
    if runs_low(buf) {
        take_or_grow(buf);
    }
}

/// Whether `buf` has too little room for the next read: none at all (it holds no memory),
/// little, or less than a whole buffer's worth when it holds no bytes (a compaction is free).
#[inline(always)]
fn runs_low(buf: &BytesMut) -> bool {
    let spare = buf.capacity() - buf.len();
    spare < READ_MIN || (buf.is_empty() && spare < READ_RESERVE)
}

/// The most a read into `buf` may bring once [`make_read_room`] has made room (it may make
/// more): for a reader that must say beforehand how much it takes.
pub fn read_room(buf: &BytesMut) -> usize {
    if runs_low(buf) {
        READ_RESERVE
    } else {
        buf.capacity() - buf.len()
    }
}

#[inline(never)]
fn take_or_grow(buf: &mut BytesMut) {
    if buf.capacity() == 0
        && let Some(spare) = SPARE.with_borrow_mut(Vec::pop)
    {
        *buf = spare;
    }
    if runs_low(buf) {
        buf.reserve(READ_RESERVE);
    }
}

/// Hands `buf`'s memory back when it holds no bytes, leaving it empty with no capacity (the
/// next [`make_read_room`] takes a buffer again).
#[inline(always)]
pub fn release_if_empty(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() != 0 {
        release(buf);
    }
}

#[inline(never)]
fn release(buf: &mut BytesMut) {
    let buf = std::mem::take(buf);
    if (READ_MIN..=SPARE_MAX_CAPACITY).contains(&buf.capacity()) {
        SPARE.with_borrow_mut(|spare| {
            if spare.len() < SPARE_LIMIT {
                spare.push(buf);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spare_count() -> usize {
        SPARE.with_borrow(Vec::len)
    }

    /// Tests share a thread when run one at a time: each starts with an empty stock.
    fn empty_stock() {
        SPARE.with_borrow_mut(Vec::clear);
    }

    #[test]
    fn an_emptied_buffer_is_lent_again_and_one_holding_bytes_is_kept() {
        empty_stock();
        let mut a = BytesMut::new();
        make_read_room(&mut a);
        assert!(
            a.capacity() >= READ_RESERVE,
            "a session with no buffer gets one to read into"
        );
        a.extend_from_slice(b"+PONG\r\n");
        release_if_empty(&mut a);
        assert_eq!(&a[..], b"+PONG\r\n", "bytes held: the buffer stays");
        assert_eq!(spare_count(), 0);

        a.clear();
        let lent = a.as_ptr();
        release_if_empty(&mut a);
        assert_eq!(a.capacity(), 0, "an empty buffer goes back");
        assert_eq!(spare_count(), 1);

        let mut b = BytesMut::new();
        make_read_room(&mut b);
        assert_eq!(
            b.as_ptr(),
            lent,
            "the next reader on the thread gets the same memory"
        );
        assert_eq!(spare_count(), 0);
    }

    #[test]
    fn a_buffer_grown_large_is_freed_and_the_stock_is_bounded() {
        empty_stock();
        let mut big = BytesMut::with_capacity(SPARE_MAX_CAPACITY + 1);
        release_if_empty(&mut big);
        assert_eq!(big.capacity(), 0);
        assert_eq!(spare_count(), 0, "a large buffer is not kept");

        let mut many: Vec<BytesMut> = (0..SPARE_LIMIT + 4)
            .map(|_| BytesMut::with_capacity(READ_RESERVE))
            .collect();
        many.iter_mut().for_each(release_if_empty);
        assert_eq!(spare_count(), SPARE_LIMIT);
    }
}
