//! Proves the shared fixture (tests/support) on Redis alone, without the proxy.

mod support;

use std::time::{Duration, Instant};

use support::resp::decode_frame;
use support::*;

#[test]
fn plain_redis_answers_and_admin_works() {
    let redis = RedisServer::start(RedisOptions::new());
    let mut c = RespConn::connect(redis.addr());
    c.cmd(&["PING"]).assert_simple("PONG");
    c.cmd(&["SET", "k", "v"]).assert_ok();
    c.cmd(&[b"GET".as_slice(), b"k"]).assert_bulk("v");
    c.cmd(&["GET", "missing"]).assert_null();
    c.cmd(&["INCR", "n"]).assert_int(1);
    c.cmd(&["NOSUCHCOMMAND"])
        .assert_error("ERR unknown command");
    // The admin user sees the data and can run admin commands.
    redis.admin_cmd(&["GET", "k"]).assert_bulk("v");
    redis.admin_cmd(&["DEBUG", "SLEEP", "0"]).assert_ok();
    redis
        .admin_cmd(&["CONFIG", "GET", "save"])
        .assert_not_error();
    // CLIENT LIST leaves the harness's admin connection out.
    let clients = redis.client_list();
    assert_eq!(clients.len(), 1, "{clients:?}");
    assert_eq!(clients[0]["user"], "default");
}

#[test]
fn pipelined_commands_and_inline_commands() {
    let redis = RedisServer::start(RedisOptions::new());
    let mut c = RespConn::connect(redis.addr());
    for i in 0..1000 {
        c.send_cmd(&["SET", &format!("k{i}"), &format!("{i}")]);
    }
    for r in c.read_replies(1000) {
        r.assert_ok();
    }
    c.send_raw(b"PING\r\n");
    c.read_reply().assert_simple("PONG");
    let big = vec![b'x'; 3 * 1024 * 1024 + 7];
    c.cmd(&[b"SET".as_slice(), b"big", &big]).assert_ok();
    assert_eq!(c.cmd(&["GET", "big"]), Frame::Bulk(big));
}

#[test]
fn acl_user_auth_works_and_wrong_password_is_refused() {
    let redis = RedisServer::start_with_user("app", "app-pw-1");
    let mut c = RespConn::connect(redis.addr());
    c.cmd(&["AUTH", "app", "wrong"]).assert_error("WRONGPASS");
    c.cmd(&["AUTH", "app", "app-pw-1"]).assert_ok();
    c.cmd(&["ACL", "WHOAMI"]).assert_bulk("app");
    assert!(redis.client_list().iter().any(|m| m["user"] == "app"));
}

#[test]
fn requirepass_and_disabled_default_user() {
    let redis = RedisServer::start(RedisOptions::new().requirepass("default-pw"));
    let mut c = RespConn::connect(redis.addr());
    c.cmd(&["GET", "x"]).assert_error("NOAUTH");
    c.cmd(&["AUTH", "default-pw"]).assert_ok();
    c.cmd(&["GET", "x"]).assert_null();

    let redis = RedisServer::start(
        RedisOptions::new()
            .disable_default_user()
            .user("app on >pw ~* &* +@all"),
    );
    let mut c = RespConn::connect(redis.addr());
    c.cmd(&["AUTH", "default", "anything"])
        .assert_error("WRONGPASS");
    c.cmd(&["AUTH", "app", "pw"]).assert_ok();
    // The harness's admin still works.
    redis.admin_cmd(&["ACL", "WHOAMI"]).assert_bulk(ADMIN_USER);
}

#[test]
fn resp3_replies_decode() {
    let redis = RedisServer::start(RedisOptions::new());
    let mut c = RespConn::connect(redis.addr());
    let hello = c.cmd(&["HELLO", "3"]);
    assert!(matches!(hello, Frame::Map(_)), "{hello:?}");
    assert_eq!(hello.map_get("proto"), Some(&Frame::Integer(3)));
    assert_eq!(hello.map_get("server"), Some(&Frame::bulk("redis")));
    c.cmd(&["GET", "missing"]).assert_null();
    c.cmd(&["HSET", "h", "f", "v"]).assert_int(1);
    assert_eq!(
        c.cmd(&["HGETALL", "h"]),
        Frame::Map(vec![(Frame::bulk("f"), Frame::bulk("v"))])
    );
    c.cmd(&["SADD", "s", "a"]).assert_int(1);
    assert_eq!(
        c.cmd(&["SMEMBERS", "s"]),
        Frame::Set(vec![Frame::bulk("a")])
    );
    assert_eq!(c.cmd(&["DEBUG", "PROTOCOL", "true"]), Frame::Boolean(true));
    let double = c.cmd(&["DEBUG", "PROTOCOL", "double"]);
    assert!(
        matches!(double, Frame::Double(d) if d.to_string() == "3.141"),
        "{double:?}"
    );
    assert!(matches!(
        c.cmd(&["DEBUG", "PROTOCOL", "bignum"]),
        Frame::BigNumber(_)
    ));
    assert!(matches!(
        c.cmd(&["DEBUG", "PROTOCOL", "verbatim"]),
        Frame::Verbatim(..)
    ));
    // An attribute travels with the reply that follows it.
    let r = c.cmd(&["DEBUG", "PROTOCOL", "attrib"]);
    assert!(!r.is_error(), "{r:?}");
    assert!(!c.last_attributes().is_empty());
    c.cmd(&["PING"]).assert_simple("PONG");
    assert!(c.last_attributes().is_empty());

    // Pub/sub under RESP3: confirmations and messages are pushes.
    let r = c.cmd(&["SUBSCRIBE", "ch"]);
    assert_eq!(
        r,
        Frame::Push(vec![
            Frame::bulk("subscribe"),
            Frame::bulk("ch"),
            Frame::Integer(1)
        ])
    );
    redis.admin_cmd(&["PUBLISH", "ch", "hello"]).assert_int(1);
    assert_eq!(
        c.read_reply(),
        Frame::Push(vec![
            Frame::bulk("message"),
            Frame::bulk("ch"),
            Frame::bulk("hello")
        ])
    );
    c.assert_no_reply_within(Duration::from_millis(200));
}

#[test]
fn resp2_nulls_decode_top_level_and_nested() {
    let cases: &[(&[u8], Frame)] = &[
        (b"$-1\r\n", Frame::Null),
        (b"*-1\r\n", Frame::Null),
        (
            b"*3\r\n$-1\r\n$1\r\na\r\n*-1\r\n",
            Frame::Array(vec![Frame::Null, Frame::bulk("a"), Frame::Null]),
        ),
        (b"_\r\n", Frame::Null),
        (b"+OK\r\n", Frame::simple("OK")),
        (b"-ERR x\r\n", Frame::Error("ERR x".into())),
        (b":-5\r\n", Frame::Integer(-5)),
        (b"$0\r\n\r\n", Frame::bulk("")),
        (b"*0\r\n", Frame::Array(vec![])),
        (
            b">2\r\n+a\r\n:1\r\n",
            Frame::Push(vec![Frame::simple("a"), Frame::Integer(1)]),
        ),
    ];
    for (bytes, expected) in cases {
        let (f, n, _) = decode_frame(bytes).unwrap().unwrap();
        assert_eq!(&f, expected, "{}", bytes.escape_ascii());
        assert_eq!(n, bytes.len());
        // Every strict prefix is incomplete, never an error or a wrong frame.
        for cut in 0..bytes.len() {
            assert_eq!(
                decode_frame(&bytes[..cut]).unwrap().map(|x| x.0),
                None,
                "prefix {} of {}",
                cut,
                bytes.escape_ascii()
            );
        }
    }
    // Two replies back to back: one at a time.
    let (f, n, _) = decode_frame(b"$-1\r\n+OK\r\n").unwrap().unwrap();
    assert_eq!((f, n), (Frame::Null, 5));
    assert!(decode_frame(b"?garbage\r\n").is_err());
}

#[test]
fn tls_redis_with_mtls_required() {
    let dir = temp_dir();
    let certs = Certs::generate(dir.path());
    let redis = RedisServer::start(
        RedisOptions::new()
            .tls(RedisTls::from_certs(&certs, true))
            .user("app on >pw ~* &* +@all"),
    );
    assert_ne!(redis.port(), redis.tls_port());

    // With the test CA and the client certificate: works, by name and by IP.
    for name in ["localhost", "127.0.0.1"] {
        let mut c = RespConn::connect_tls_with(
            redis.tls_addr(),
            TlsClientOptions {
                ca: Some(&certs.ca),
                server_name: Some(name),
                client_cert: Some((&certs.client.cert, &certs.client.key)),
            },
        );
        c.cmd(&["AUTH", "app", "pw"]).assert_ok();
        c.cmd(&["PING"]).assert_simple("PONG");
    }

    // Without a client certificate, or with one from the unrelated CA: refused (under TLS 1.3 the
    // refusal may only show on the first read).
    for client_cert in [
        None,
        Some((&certs.other_client.cert, &certs.other_client.key)),
    ] {
        let opts = TlsClientOptions {
            ca: Some(&certs.ca),
            server_name: None,
            client_cert: client_cert.map(|(c, k)| (c.as_path(), k.as_path())),
        };
        if let Ok(mut c) = RespConn::try_connect_tls_with(redis.tls_addr(), opts) {
            let _ = c.try_send_raw(b"PING\r\n");
            assert!(
                c.try_read_reply().is_err(),
                "mTLS should refuse this client"
            );
        }
    }

    // Trusting only the unrelated CA: the server certificate is refused.
    let opts = TlsClientOptions {
        ca: Some(&certs.other_ca),
        server_name: None,
        client_cert: Some((&certs.client.cert, &certs.client.key)),
    };
    assert!(RespConn::try_connect_tls_with(redis.tls_addr(), opts).is_err());
}

#[test]
fn tls_redis_without_client_auth() {
    let dir = temp_dir();
    let certs = Certs::generate(dir.path());
    let redis = RedisServer::start(RedisOptions::new().tls(RedisTls::from_certs(&certs, false)));
    let mut c = RespConn::connect_tls(redis.tls_addr(), &certs.ca);
    c.cmd(&["PING"]).assert_simple("PONG");
    // An extra certificate from the same CA is trusted too.
    let extra = certs.issue_server("extra-server", &["localhost"]);
    assert!(extra.cert.exists() && extra.key.exists());
}

#[test]
fn restart_keeps_ports_and_acl_changes() {
    let mut redis = RedisServer::start_with_user("app", "old-pw");
    let (port, pid) = (redis.port(), redis.pid().unwrap());
    redis
        .admin_cmd(&["ACL", "SETUSER", "app", "resetpass", ">new-pw"])
        .assert_ok();
    let mut before = RespConn::connect(redis.addr());
    redis.restart();
    assert_eq!(redis.port(), port);
    assert_ne!(redis.pid().unwrap(), pid);
    // The old connection is gone, a new one authenticates with the password set at run time.
    before.send_raw(b"PING\r\n");
    assert!(before.try_read_reply().is_err());
    let mut c = RespConn::connect(redis.addr());
    c.cmd(&["AUTH", "app", "old-pw"]).assert_error("WRONGPASS");
    c.cmd(&["AUTH", "app", "new-pw"]).assert_ok();

    // stop / start_again: down in between.
    redis.stop();
    assert!(!redis.is_running());
    assert!(RespConn::try_connect(("127.0.0.1", port)).is_err());
    redis.start_again();
    RespConn::connect(redis.addr())
        .cmd(&["PING"])
        .assert_simple("PONG");
}

#[test]
fn blocking_command_released_by_another_connection() {
    let redis = RedisServer::start(RedisOptions::new());
    let mut waiter = RespConn::connect(redis.addr());
    waiter.send_cmd(&["BLPOP", "q", "10"]);
    waiter.assert_no_reply_within(Duration::from_millis(100));
    assert!(wait_until(Duration::from_secs(10), || {
        redis.client_list().iter().any(|m| m["cmd"] == "blpop")
    }));
    RespConn::connect(redis.addr())
        .cmd(&["RPUSH", "q", "x"])
        .assert_int(1);
    assert_eq!(waiter.read_reply(), Frame::bulks(&["q", "x"]));
}

#[test]
fn servers_started_in_parallel_get_their_own_ports() {
    let handles: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(|| RedisServer::start(RedisOptions::new())))
        .collect();
    let servers: Vec<RedisServer> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut ports: Vec<u16> = servers.iter().map(|s| s.port()).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 4);
    let pids: Vec<u32> = servers.iter().map(|s| s.pid().unwrap()).collect();
    drop(servers);
    // Dropped servers are gone (reaped, so /proc has no entry for them).
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}

#[test]
fn wait_until_is_bounded() {
    let start = Instant::now();
    assert!(!wait_until(Duration::from_millis(150), || false));
    assert!(start.elapsed() >= Duration::from_millis(150));
    assert!(start.elapsed() < Duration::from_secs(5));
    let mut n = 0;
    assert!(wait_until(Duration::from_secs(5), || {
        n += 1;
        n == 3
    }));
}

#[test]
fn log_and_metrics_parsers() {
    use support::proxy::{find_listening, strip_ansi};
    let lines = vec![
        "2026-11-25T18:00:00.000Z  INFO rotaproxy::config: loaded".to_string(),
        "2026-11-25T18:00:00.000Z  INFO rotaproxy::server: listening client_addr=127.0.0.1:40001 admin_addr=[::1]:40002".to_string(),
    ];
    let (c, a) = find_listening(&lines).unwrap();
    assert_eq!(c, "127.0.0.1:40001".parse().unwrap());
    assert_eq!(a, "[::1]:40002".parse().unwrap());
    assert_eq!(strip_ansi("\u{1b}[32mINFO\u{1b}[0m x"), "INFO x");

    let text = "# HELP x\n# TYPE rotaproxy_up gauge\nrotaproxy_up 1\nrotaproxy_cmds_total{kind=\"a\"} 2\nrotaproxy_cmds_total{kind=\"b\"} 3.5\n";
    assert_eq!(metric_value(text, "rotaproxy_up"), Some(1.0));
    assert_eq!(metric_value(text, "rotaproxy_cmds_total"), Some(5.5));
    assert_eq!(
        metric_value(text, "rotaproxy_cmds_total{kind=\"b\"}"),
        Some(3.5)
    );
    assert_eq!(metric_value(text, "rotaproxy_missing"), None);

    let lines = vec!["user app pw s3cr3t ok".to_string()];
    assert_eq!(mask_secrets(&lines[0], &["s3cr3t"]), "user app pw *** ok");
    let caught = std::panic::catch_unwind(|| assert_no_secret_in_lines(&lines, &["s3cr3t"]));
    let msg = caught.unwrap_err();
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("secret #0") && !msg.contains("s3cr3t"),
        "{msg}"
    );
    assert_no_secret_in_lines(&lines, &["other"]);
}

#[test]
fn http_client_against_a_tiny_server() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        for body in ["plain", "chunked"] {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b).unwrap();
                req.extend_from_slice(&b[..n]);
            }
            let resp = if body == "plain" {
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\n\r\nnot ready".to_string()
            } else {
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                    .to_string()
            };
            s.write_all(resp.as_bytes()).unwrap();
        }
    });
    assert_eq!(
        http_request(addr, "GET", "/readyz", &[], b""),
        (503, "not ready".to_string())
    );
    assert_eq!(
        http_request(addr, "GET", "/metrics", &[], b""),
        (200, "abcde".to_string())
    );
    server.join().unwrap();
}

#[test]
fn proxy_start_failure_is_reported_with_the_log() {
    // Not a config at all: whatever the proxy's state of completion, it must not come up.
    let r = Proxy::try_start("this is [not toml", &[]);
    let failure = r
        .err()
        .expect("the proxy must not start on a broken config");
    assert!(
        failure.status.is_some(),
        "it should have exited: {failure:?}"
    );
}
