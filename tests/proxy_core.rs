//! The proxy as a client sees it: real `redis-server` behind, raw RESP in front. Each test is a
//! scenario a Redis user would run, and asserts what that user would see.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

const APP_USER: &str = "app";

/// A Redis with the ACL user `app`, and the proxy in front of it authenticating as `app`.
struct Env {
    redis: RedisServer,
    proxy: Proxy,
    password: String,
}

impl Env {
    fn start() -> Env {
        Self::start_with_extra("", "")
    }

    /// `listener` lines go inside `[listener]`; `sections` are appended whole.
    fn start_with_extra(listener: &str, sections: &str) -> Env {
        let password = random_token(32);
        let redis = RedisServer::start_with_user(APP_USER, &password);
        let mut config =
            ProxyConfig::plain(&redis).credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD");
        config.listener_extra = listener.to_string();
        config = config.extra(sections);
        let proxy = Proxy::start(
            &config.to_toml(),
            &[("TEST_UPSTREAM_PASSWORD", password.as_str())],
        );
        Env {
            redis,
            proxy,
            password,
        }
    }

    fn conn(&self) -> RespConn {
        self.proxy.conn()
    }

    /// Every test ends here: the upstream password never shows in the proxy's log.
    fn assert_no_secret_leaked(&self) {
        assert_no_secret_in_logs(&self.proxy, &[&self.password]);
        let (_, metrics) = self.proxy.http_get("/metrics");
        assert!(!metrics.contains(&self.password), "password in /metrics");
    }
}

#[test]
fn commands_run_as_the_proxys_user_not_the_clients() {
    let env = Env::start();
    let mut c = env.conn();
    c.cmd(&["PING"]).assert_simple("PONG");
    // The client's own AUTH is answered by the proxy (client auth "none" accepts anything).
    c.cmd(&["AUTH", "someone", "old-direct-password"])
        .assert_ok();
    c.cmd(&["ACL", "WHOAMI"]).assert_bulk(APP_USER);
    c.cmd(&["SET", "k", "v"]).assert_ok();
    c.cmd(&["GET", "k"]).assert_bulk("v");
    // Nothing the client sent as AUTH reached Redis: no failed auth in the ACL log.
    let log = env.redis.admin_cmd(&["ACL", "LOG"]);
    assert_eq!(log.as_array().map(<[Frame]>::len), Some(0), "{log:?}");
    env.assert_no_secret_leaked();
}

#[test]
fn pipeline_of_ten_thousand_commands_keeps_order() {
    let env = Env::start();
    let mut c = env.conn();
    let mut batch = Vec::new();
    for i in 0..10_000 {
        if i % 2 == 0 {
            batch.extend(encode_cmd(&["INCR", "counter"]));
        } else {
            batch.extend(encode_cmd(&["ECHO", &format!("m{i}")]));
        }
    }
    c.send_raw(&batch);
    for i in 0..10_000i64 {
        let reply = c.read_reply();
        if i % 2 == 0 {
            reply.assert_int(i / 2 + 1);
        } else {
            reply.assert_bulk(format!("m{i}"));
        }
    }
    // Every command is counted, while the client is connected and after it has left.
    let commands = || env.proxy.metric("rotaproxy_commands_total").unwrap_or(0.0);
    let counted = commands();
    assert!(
        (10_000.0..10_010.0).contains(&counted),
        "{counted} commands counted"
    );
    drop(c);
    assert_eventually(Duration::from_secs(10), "the client is gone", || {
        env.proxy.metric("rotaproxy_client_connections") == Some(0.0)
    });
    assert_eq!(commands(), counted);
    env.assert_no_secret_leaked();
}

#[test]
fn transactions_and_watch() {
    let env = Env::start();
    let mut c = env.conn();
    c.cmd(&["MULTI"]).assert_ok();
    c.cmd(&["SET", "t", "1"]).assert_simple("QUEUED");
    c.cmd(&["INCR", "t"]).assert_simple("QUEUED");
    let exec = c.cmd(&["EXEC"]);
    assert_eq!(
        exec,
        Frame::Array(vec![Frame::simple("OK"), Frame::Integer(2)])
    );

    // A watched key changed by someone else aborts the transaction.
    c.cmd(&["WATCH", "t"]).assert_ok();
    env.conn().cmd(&["SET", "t", "other"]).assert_ok();
    c.cmd(&["MULTI"]).assert_ok();
    c.cmd(&["SET", "t", "mine"]).assert_simple("QUEUED");
    c.cmd(&["EXEC"]).assert_null();
    c.cmd(&["GET", "t"]).assert_bulk("other");

    // DISCARD, and errors inside MULTI, are the server's as usual.
    c.cmd(&["MULTI"]).assert_ok();
    c.cmd(&["SET", "t", "x"]).assert_simple("QUEUED");
    c.cmd(&["DISCARD"]).assert_ok();
    c.cmd(&["EXEC"]).assert_error("ERR EXEC without MULTI");
    env.assert_no_secret_leaked();
}

#[test]
fn pubsub_resp2_channels_patterns_and_shards() {
    let env = Env::start();
    let mut sub = env.conn();
    let mut publisher = env.conn();
    sub.send_cmd(&["SUBSCRIBE", "a", "b"]);
    assert_eq!(
        sub.read_replies(2),
        vec![
            Frame::Array(vec![
                Frame::bulk("subscribe"),
                Frame::bulk("a"),
                Frame::Integer(1)
            ]),
            Frame::Array(vec![
                Frame::bulk("subscribe"),
                Frame::bulk("b"),
                Frame::Integer(2)
            ]),
        ]
    );
    sub.cmd(&["PSUBSCRIBE", "news.*"]).assert_not_error();
    sub.cmd(&["SSUBSCRIBE", "shard1"]).assert_not_error();
    publisher.cmd(&["PUBLISH", "a", "hello"]).assert_int(1);
    publisher.cmd(&["PUBLISH", "news.x", "extra"]).assert_int(1);
    publisher
        .cmd(&["SPUBLISH", "shard1", "sharded"])
        .assert_int(1);
    assert_eq!(
        sub.read_reply(),
        Frame::Array(vec![
            Frame::bulk("message"),
            Frame::bulk("a"),
            Frame::bulk("hello")
        ])
    );
    assert_eq!(
        sub.read_reply(),
        Frame::Array(vec![
            Frame::bulk("pmessage"),
            Frame::bulk("news.*"),
            Frame::bulk("news.x"),
            Frame::bulk("extra")
        ])
    );
    assert_eq!(
        sub.read_reply(),
        Frame::Array(vec![
            Frame::bulk("smessage"),
            Frame::bulk("shard1"),
            Frame::bulk("sharded")
        ])
    );
    // PING while subscribed answers with a RESP2 array, which must still count as a reply.
    assert_eq!(
        sub.cmd(&["PING"]),
        Frame::Array(vec![Frame::bulk("pong"), Frame::bulk("")])
    );
    // UNSUBSCRIBE without arguments answers once per channel.
    sub.send_cmd(&["UNSUBSCRIBE"]);
    let replies = sub.read_replies(2);
    assert!(
        replies
            .iter()
            .all(|r| r.as_array().unwrap()[0] == Frame::bulk("unsubscribe"))
    );
    sub.cmd(&["PUNSUBSCRIBE"]).assert_not_error();
    sub.cmd(&["SUNSUBSCRIBE"]).assert_not_error();
    // Out of subscribed mode, ordinary commands work again on the same connection.
    sub.cmd(&["SET", "after", "1"]).assert_ok();
    sub.cmd(&["GET", "after"]).assert_bulk("1");
    env.assert_no_secret_leaked();
}

/// Redis closes a subscriber that cannot keep up once its output buffer passes
/// `client-output-buffer-limit pubsub`, and the disconnect tells the client it lost messages.
/// Through the proxy the connection Redis closes is the proxy's: subscribing again on a new one
/// would hide the loss (it did: the client stayed connected, thousands of messages short). The
/// client must see what it sees from Redis: messages in order, none missing between them, then
/// the end of the connection.
#[test]
fn a_subscriber_too_slow_for_redis_is_closed_as_redis_closes_it() {
    let env = Env::start();
    let mut admin = env.redis.admin_conn();
    admin
        .cmd(&[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 256kb 0 0",
        ])
        .assert_ok();
    // The same subscriber straight on Redis (its default user needs no password here).
    let mut subscribers = [RespConn::connect(env.redis.addr()), env.conn()];
    for sub in &mut subscribers {
        sub.cmd(&["SUBSCRIBE", "slow"]).assert_not_error();
    }
    // Neither reads while messages pile up. Publish until Redis has closed both connections
    // it writes them to (PUBLISH counts the receivers): how much that takes depends on the
    // socket buffers between Redis and each reader.
    let payload = "p".repeat(1024);
    let (mut sent, batch) = (0usize, 500);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            sent < 400_000 && Instant::now() < deadline,
            "Redis still delivers after {sent} messages"
        );
        for id in sent..sent + batch {
            admin.send_cmd(&["PUBLISH", "slow", &format!("{id:08}{payload}")]);
        }
        let receivers = admin.read_replies(batch);
        sent += batch;
        if receivers.last() == Some(&Frame::Integer(0)) {
            break;
        }
    }
    for (side, sub) in ["direct", "proxied"].iter().zip(&mut subscribers) {
        // Every message in order from the first, then the end of the connection.
        sub.set_read_timeout(Some(Duration::from_secs(30)));
        let mut expected = 0;
        loop {
            match sub.try_read_reply() {
                Ok(frame) => {
                    let id = frame
                        .as_array()
                        .and_then(|m| m.get(2))
                        .and_then(Frame::as_bytes)
                        .and_then(|p| std::str::from_utf8(p.get(..8)?).ok()?.parse().ok());
                    assert_eq!(id, Some(expected), "{side}: message {expected}");
                    expected += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => panic!("{side}: still open after {expected} messages of {sent}: {e}"),
            }
        }
        assert!(expected > 0, "{side}: no message at all");
    }
    env.proxy
        .wait_for_log("messages were lost", Duration::from_secs(10));
    assert_eq!(
        env.proxy
            .metric("rotaproxy_client_errors_total{reason=\"slow_consumer\"}"),
        Some(1.0)
    );
    env.assert_no_secret_leaked();
}

#[test]
fn pubsub_resp3_with_hello_3() {
    let env = Env::start();
    let mut sub = env.conn();
    let hello = sub.cmd(&["HELLO", "3"]);
    assert_eq!(
        hello.map_get("proto"),
        Some(&Frame::Integer(3)),
        "{hello:?}"
    );
    assert_eq!(hello.map_get("server"), Some(&Frame::bulk("redis")));
    let conf = sub.cmd(&["SUBSCRIBE", "ch"]);
    assert_eq!(
        conf,
        Frame::Push(vec![
            Frame::bulk("subscribe"),
            Frame::bulk("ch"),
            Frame::Integer(1)
        ])
    );
    env.conn().cmd(&["PUBLISH", "ch", "m1"]).assert_int(1);
    // RESP3 allows ordinary commands while subscribed; the message push is not their reply.
    sub.send_cmd(&["GET", "nothing"]);
    let first = sub.read_reply();
    assert_eq!(
        first,
        Frame::Push(vec![
            Frame::bulk("message"),
            Frame::bulk("ch"),
            Frame::bulk("m1")
        ])
    );
    sub.read_reply().assert_null();
    sub.cmd(&["SSUBSCRIBE", "s1"]).assert_not_error();
    env.conn().cmd(&["SPUBLISH", "s1", "m2"]).assert_int(1);
    assert_eq!(
        sub.read_reply(),
        Frame::Push(vec![
            Frame::bulk("smessage"),
            Frame::bulk("s1"),
            Frame::bulk("m2")
        ])
    );
    sub.cmd(&["PSUBSCRIBE", "p*"]).assert_not_error();
    sub.send_cmd(&["UNSUBSCRIBE"]);
    sub.read_reply().assert_not_error();
    sub.cmd(&["PING"]).assert_simple("PONG");
    env.assert_no_secret_leaked();
}

#[test]
fn blpop_is_served_by_a_push_from_another_client() {
    let env = Env::start();
    let mut waiter = env.conn();
    waiter.send_cmd(&["BLPOP", "jobs", "30"]);
    waiter.assert_no_reply_within(Duration::from_millis(200));
    env.conn().cmd(&["LPUSH", "jobs", "job-1"]).assert_int(1);
    assert_eq!(
        waiter.read_reply(),
        Frame::Array(vec![Frame::bulk("jobs"), Frame::bulk("job-1")])
    );
    // A timed-out BLPOP answers nil and the connection goes on.
    waiter.cmd(&["BLPOP", "jobs", "0.05"]).assert_null();
    waiter.cmd(&["PING"]).assert_simple("PONG");
    env.assert_no_secret_leaked();
}

#[test]
fn select_is_the_clients_own() {
    let env = Env::start();
    let mut c = env.conn();
    c.cmd(&["SELECT", "3"]).assert_ok();
    c.cmd(&["SET", "in3", "yes"]).assert_ok();
    c.cmd(&["SELECT", "99999"]).assert_error("ERR");
    c.cmd(&["SET", "still3", "yes"]).assert_ok();
    let mut admin = env.redis.admin_conn();
    admin.cmd(&["SELECT", "3"]).assert_ok();
    admin.cmd(&["GET", "in3"]).assert_bulk("yes");
    admin.cmd(&["GET", "still3"]).assert_bulk("yes");
    // Another client starts in db 0: a pooled connection never carries a db over.
    drop(c);
    env.conn().cmd(&["GET", "in3"]).assert_null();
    env.assert_no_secret_leaked();
}

#[test]
fn sixteen_megabyte_value_round_trips() {
    let env = Env::start();
    let mut c = env.conn();
    let value: Vec<u8> = (0..16 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    c.cmd(&[&b"SET"[..], b"big", &value]).assert_ok();
    c.cmd(&["STRLEN", "big"]).assert_int(value.len() as i64);
    assert!(
        c.cmd(&["GET", "big"]) == Frame::Bulk(value),
        "value differs"
    );
    env.assert_no_secret_leaked();
}

#[test]
fn inline_commands_work_like_on_redis() {
    let env = Env::start();
    let mut c = env.conn();
    c.send_raw(b"PING\r\nSET greeting \"hello world\"\r\n\r\nGET greeting\nAUTH anything\r\n");
    c.read_reply().assert_simple("PONG");
    c.read_reply().assert_ok();
    // The empty line gets no reply.
    c.read_reply().assert_bulk("hello world");
    c.read_reply().assert_ok();
    c.send_raw(b"SET x \"unbalanced\r\n");
    c.read_reply()
        .assert_error("ERR Protocol error: unbalanced");
    c.expect_closed(Duration::from_secs(10));
    env.assert_no_secret_leaked();
}

#[test]
fn malformed_input_closes_only_that_client() {
    let env = Env::start();
    let mut bystander = env.conn();
    bystander.cmd(&["SET", "b", "1"]).assert_ok();
    let cases: [&[u8]; 4] = [
        b"*2\r\n$3\r\nGET\r\n:1\r\n",
        b"*abc\r\n",
        b"*1\r\n$-5\r\n",
        b"*1\r\n$3\r\nGETxx",
    ];
    for bad in cases {
        let mut c = env.conn();
        c.cmd(&["PING"]).assert_simple("PONG");
        c.send_raw(bad);
        if bad.ends_with(b"xx") {
            // Bulk not followed by CRLF: detected once the bytes are there.
            c.send_raw(b"\r\n");
        }
        let replies = c.expect_closed(Duration::from_secs(10));
        assert!(
            replies
                .iter()
                .any(|r| matches!(r, Frame::Error(e) if e.starts_with("ERR Protocol error"))),
            "{} -> {replies:?}",
            String::from_utf8_lossy(bad)
        );
    }
    bystander.cmd(&["GET", "b"]).assert_bulk("1");
    assert!(!env.proxy.logs().iter().any(|l| l.contains("panicked")));
    env.assert_no_secret_leaked();
}

/// A web page can make a browser send an HTTP request to the proxy's port (client auth `none`
/// on loopback is the sidecar default) with Redis commands in its body. Redis closes a
/// connection at its `POST` or `Host:` line; the proxy must too, before forwarding anything
/// of it. (It used to forward them: Redis closed that upstream connection, the session moved
/// to a fresh one, and the commands of a body that came in a later packet ran there.)
#[test]
fn http_requests_are_cut_off_before_any_of_them_reaches_redis() {
    let env = Env::start();
    let mut monitor = env.redis.admin_conn();
    monitor.cmd(&["MONITOR"]).assert_ok();
    let mut bystander = env.conn();
    bystander.cmd(&["SET", "b", "1"]).assert_ok();

    // The headers first, the body later: what a browser's POST may look like on the wire.
    let mut browser = env.conn();
    browser.send_raw(
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1:6380\r\nContent-Type: text/plain\r\n\
          Content-Length: 26\r\n\r\n",
    );
    let replies = browser.expect_closed(Duration::from_secs(10));
    assert!(replies.is_empty(), "Redis answers nothing: {replies:?}");
    // Whether or not the write still gets through, nothing of it may run.
    let _ = browser.try_send_raw(b"SET pwned 1\r\nSET pwned2 1\r\n");

    // `Host:` in any case and as a multibulk command, and a `GET / HTTP/1.1` line before it
    // (a browser's GET: an ordinary command to Redis, which refuses it for its arguments).
    // What was asked before the request is answered, then the connection closes.
    let cases: [&[u8]; 3] = [
        b"PING\r\nGET / HTTP/1.1\r\nhOsT: 127.0.0.1\r\n\r\nSET pwned 1\r\n",
        b"*1\r\n$4\r\nPING\r\n*2\r\n$5\r\nHOST:\r\n$1\r\nx\r\n*3\r\n$3\r\nSET\r\n$5\r\npwned\r\n$1\r\n1\r\n",
        b"PING\r\n*1\r\n$4\r\npost\r\nSET pwned 1\r\n",
    ];
    for (i, request) in cases.iter().enumerate() {
        let mut c = env.conn();
        c.send_raw(request);
        let replies = c.expect_closed(Duration::from_secs(10));
        assert_eq!(
            replies.first(),
            Some(&Frame::Simple("PONG".into())),
            "case {i}: {replies:?}"
        );
        if i == 0 {
            assert!(
                matches!(&replies[1..], [Frame::Error(e)] if e.contains("wrong number of arguments")),
                "case {i}: {replies:?}"
            );
        } else {
            assert_eq!(replies.len(), 1, "case {i}: {replies:?}");
        }
    }

    bystander.cmd(&["SET", "done", "1"]).assert_ok();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.iter().any(|l: &String| l.contains("\"done\"")) {
        assert!(Instant::now() < deadline, "MONITOR showed: {seen:#?}");
        seen.push(
            monitor
                .read_reply()
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    for line in &seen {
        let lower = line.to_ascii_lowercase();
        assert!(
            !lower.contains("\"post\"") && !lower.contains("\"host:\"") && !lower.contains("pwned"),
            "reached Redis: {line}"
        );
    }
    let mut admin = env.redis.admin_conn();
    admin.cmd(&["EXISTS", "pwned", "pwned2"]).assert_int(0);
    // Redis did not see an attack on its own connections: none of them was closed for it.
    assert!(
        !env.redis.log().contains("SECURITY ATTACK"),
        "{}",
        env.redis.log()
    );
    assert_eq!(
        env.proxy
            .metric("rotaproxy_client_errors_total{reason=\"http_request\"}"),
        Some(4.0)
    );
    let line = env
        .proxy
        .wait_for_log("possible cross-protocol attack", Duration::from_secs(10));
    assert!(
        line.contains("client.http_request"),
        "an audit event: {line}"
    );
    bystander.cmd(&["GET", "b"]).assert_bulk("1");
    env.assert_no_secret_leaked();
}

#[test]
fn client_reply_off_and_skip_drop_exactly_the_replies_asked_for() {
    let env = Env::start();
    let mut c = env.conn();
    let mut sub = env.conn();
    sub.cmd(&["SUBSCRIBE", "news"]).assert_not_error();

    // OFF: nothing at all comes back, not even for errors or local answers, until ON.
    c.send_cmd(&["CLIENT", "REPLY", "OFF"]);
    c.send_cmd(&["SET", "a", "1"]);
    c.send_cmd(&["INCR", "a"]);
    c.send_cmd(&["NOSUCHCOMMAND"]);
    c.send_cmd(&["AUTH", "anything"]);
    c.send_cmd(&["CLIENT", "REPLY", "ON"]);
    c.read_reply().assert_ok();
    c.cmd(&["GET", "a"]).assert_bulk("2");

    // SKIP: only the next command's reply is dropped.
    c.send_cmd(&["CLIENT", "REPLY", "SKIP"]);
    c.send_cmd(&["SET", "b", "x"]);
    c.send_cmd(&["APPEND", "b", "y"]);
    c.read_reply().assert_int(2);
    c.cmd(&["GET", "b"]).assert_bulk("xy");

    // A pipeline of ordinary commands under OFF, then a reply again: every reply was counted.
    c.send_cmd(&["CLIENT", "REPLY", "OFF"]);
    for i in 0..1000 {
        c.send_cmd(&["RPUSH", "l", &i.to_string()]);
    }
    c.send_cmd(&["CLIENT", "REPLY", "ON"]);
    c.send_cmd(&["LLEN", "l"]);
    c.read_reply().assert_ok();
    c.read_reply().assert_int(1000);

    // The server's own error for a bad mode; the proxy's for one inside MULTI.
    c.cmd(&["CLIENT", "REPLY", "MAYBE"]).assert_error("ERR");
    c.cmd(&["MULTI"]).assert_ok();
    c.cmd(&["CLIENT", "REPLY", "OFF"])
        .assert_error("ERR rotaproxy does not support CLIENT REPLY inside MULTI");
    c.cmd(&["DISCARD"]).assert_ok();

    // The subscriber in the other session was never affected.
    env.redis
        .admin_cmd(&["PUBLISH", "news", "n1"])
        .assert_int(1);
    assert_eq!(
        sub.read_reply(),
        Frame::Array(vec![
            Frame::bulk("message"),
            Frame::bulk("news"),
            Frame::bulk("n1")
        ])
    );
    c.cmd(&["PING"]).assert_simple("PONG");
    env.assert_no_secret_leaked();
}

#[test]
fn commands_the_proxy_owns() {
    let env = Env::start();
    let mut c = env.conn();
    c.cmd(&[
        "CLIENT",
        "MAINT_NOTIFICATIONS",
        "ON",
        "moving-endpoint-type",
        "internal-ip",
    ])
    .assert_ok();
    c.cmd(&["CLIENT", "REPLY", "ON"]).assert_ok();
    c.cmd(&["CLIENT", "SETNAME", "worker-1"]).assert_ok();
    c.cmd(&["CLIENT", "GETNAME"]).assert_bulk("worker-1");
    // HELLO with AUTH: the AUTH part is the proxy's, the rest is the real server's reply.
    let hello = c.cmd(&["HELLO", "2", "AUTH", "default", "whatever", "SETNAME", "w2"]);
    assert!(hello.as_array().is_some(), "{hello:?}");
    c.cmd(&["CLIENT", "GETNAME"]).assert_bulk("w2");
    // RESET leaves the upstream connection logged out; the proxy logs it back in.
    c.cmd(&["RESET"]).assert_simple("RESET");
    c.cmd(&["ACL", "WHOAMI"]).assert_bulk(APP_USER);
    c.cmd(&["CLIENT", "GETNAME"]).assert_null();
    c.cmd(&["QUIT"]).assert_ok();
    c.expect_closed(Duration::from_secs(10));
    env.assert_no_secret_leaked();
}

#[test]
fn client_passwords_with_overlap() {
    let password = random_token(32);
    let redis = RedisServer::start_with_user(APP_USER, &password);
    let config = ProxyConfig::plain(&redis)
        .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD")
        .extra(
            "[listener.auth]\nmode = \"password\"\n\
             [[listener.auth.users]]\nusername = \"default\"\npassword = \"env:CLIENT_PW_OLD\"\n\
             [[listener.auth.users]]\nusername = \"default\"\npassword = \"env:CLIENT_PW_NEW\"\n\
             [[listener.auth.users]]\nusername = \"svc\"\npassword = \"env:CLIENT_PW_SVC\"\n",
        );
    let proxy = Proxy::start(
        &config.to_toml(),
        &[
            ("TEST_UPSTREAM_PASSWORD", password.as_str()),
            ("CLIENT_PW_OLD", "old-client-pw"),
            ("CLIENT_PW_NEW", "new-client-pw"),
            ("CLIENT_PW_SVC", "svc-client-pw"),
        ],
    );
    let mut c = proxy.conn();
    c.cmd(&["GET", "k"]).assert_error("NOAUTH");
    c.cmd(&["AUTH", "wrong"]).assert_error("WRONGPASS");
    c.cmd(&["HELLO", "3"]).assert_error("NOAUTH");
    c.cmd(&["AUTH", "old-client-pw"]).assert_ok();
    c.cmd(&["GET", "k"]).assert_null();
    let mut c2 = proxy.conn();
    c2.cmd(&["AUTH", "default", "new-client-pw"]).assert_ok();
    c2.cmd(&["PING"]).assert_simple("PONG");
    let mut c3 = proxy.conn();
    c3.cmd(&["HELLO", "3", "AUTH", "svc", "wrong"])
        .assert_error("WRONGPASS");
    let hello = c3.cmd(&["HELLO", "3", "AUTH", "svc", "svc-client-pw"]);
    assert_eq!(
        hello.map_get("proto"),
        Some(&Frame::Integer(3)),
        "{hello:?}"
    );
    c3.cmd(&["ACL", "WHOAMI"]).assert_bulk(APP_USER);
    // Unauthenticated clients may not send long commands (as on Redis).
    let mut c4 = proxy.conn();
    let many: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    let mut args = vec!["MSET".to_string()];
    args.extend(many);
    c4.send_cmd(&args);
    let replies = c4.expect_closed(Duration::from_secs(10));
    assert!(
        matches!(&replies[..], [Frame::Error(e)] if e.contains("unauthenticated multibulk length")),
        "{replies:?}"
    );
    // Nor long arguments (over 16 KiB), nor an AUTH of either kind: Redis refuses them as it
    // reads their headers, before it buffers them.
    let long = "x".repeat(16 * 1024 + 1);
    let auth_of_eleven: Vec<&str> = std::iter::once("AUTH")
        .chain(std::iter::repeat_n("x", 10))
        .collect();
    let refused: [(&[&str], &str); 3] = [
        (&auth_of_eleven, "unauthenticated multibulk length"),
        (&["GET", &long], "unauthenticated bulk length"),
        (&["AUTH", "default", &long], "unauthenticated bulk length"),
    ];
    for (args, error) in refused {
        let mut c = proxy.conn();
        c.send_cmd(args);
        let replies = c.expect_closed(Duration::from_secs(10));
        assert!(
            matches!(&replies[..], [Frame::Error(e)] if *e == format!("ERR Protocol error: {error}")),
            "{} args: {replies:?}",
            args.len()
        );
    }
    // Up to the limit it is only NOAUTH, and once authenticated the limit is gone.
    let mut c5 = proxy.conn();
    c5.cmd(&["GET", &long[1..]]).assert_error("NOAUTH");
    c5.cmd(&["AUTH", "old-client-pw"]).assert_ok();
    c5.cmd(&["SET", "long", &long]).assert_ok();
    c5.cmd(&["STRLEN", "long"]).assert_int(long.len() as i64);
    assert_no_secret_in_logs(
        &proxy,
        &[&password, "old-client-pw", "new-client-pw", "svc-client-pw"],
    );
}

/// Rotating the application's password with an overlap, the way an operator does it with
/// two password files: the proxy follows a file that changes (no restart, nobody dropped), and
/// counts who is logged in with which entry, so the entry about to be retired can be seen to
/// be unused.
#[test]
fn client_passwords_follow_their_files_and_each_entry_counts_its_clients() {
    let password = random_token(32);
    let redis = RedisServer::start_with_user(APP_USER, &password);
    let dir = temp_dir();
    let (slot_a, slot_b) = (dir.path().join("a"), dir.path().join("b"));
    // A secrets agent's way: a new file renamed over the old one.
    let write_slot = |slot: &std::path::Path, value: &str| {
        let tmp = dir.path().join("incoming");
        std::fs::write(&tmp, format!("{value}\n")).expect("write");
        std::fs::rename(&tmp, slot).expect("rename");
    };
    write_slot(&slot_a, "alpha-pw");
    write_slot(&slot_b, "bravo-pw");
    let config = ProxyConfig::plain(&redis)
        .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD")
        .extra(&format!(
            "[listener.auth]\nmode = \"password\"\npoll_interval = \"200ms\"\n\
             [[listener.auth.users]]\nusername = \"app\"\npassword = \"file:{}\"\n\
             [[listener.auth.users]]\nusername = \"app\"\npassword = \"file:{}\"\n",
            slot_a.display(),
            slot_b.display()
        ));
    let proxy = Proxy::start(
        &config.to_toml(),
        &[("TEST_UPSTREAM_PASSWORD", password.as_str())],
    );
    let status = || -> serde_json::Value {
        let (code, body) = proxy.http_get("/v1/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status is JSON")
    };
    // Per entry, in the configured order: (clients logged in now, logins taken).
    let counts = || -> Vec<(i64, i64)> {
        let doc = status();
        let entries = doc["client_auth"]["entries"].as_array().cloned();
        entries
            .unwrap_or_else(|| panic!("no client_auth entries: {doc}"))
            .iter()
            .map(|e| {
                (
                    e["connections"].as_i64().expect("connections"),
                    e["logins"].as_i64().expect("logins"),
                )
            })
            .collect()
    };
    // The same, as Prometheus has it: the gauge of the entry whose password is in `slot`.
    let gauge = |slot: &std::path::Path| -> Option<f64> {
        let (_, body) = proxy.http_get("/metrics");
        let source = format!("source=\"file:{}\"", slot.display());
        body.lines()
            .find(|l| l.starts_with("rotaproxy_client_auth_connections{") && l.contains(&source))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    assert_eq!(counts(), vec![(0, 0), (0, 0)]);

    let mut on_a = proxy.conn();
    on_a.cmd(&["AUTH", "app", "alpha-pw"]).assert_ok();
    let mut on_b = proxy.conn();
    on_b.cmd(&["HELLO", "3", "AUTH", "app", "bravo-pw"])
        .assert_not_error();
    assert_eq!(counts(), vec![(1, 1), (1, 1)]);
    assert_eq!((gauge(&slot_a), gauge(&slot_b)), (Some(1.0), Some(1.0)));

    // A wrong password is refused, and the attempt is on record without it.
    let mut newcomer = proxy.conn();
    newcomer
        .cmd(&["AUTH", "app", "charlie-pw"])
        .assert_error("WRONGPASS");
    proxy.wait_for_log("client.auth_failed", Duration::from_secs(10));

    // Slot b gets the next password: new logins need it, clients logged in stay so.
    write_slot(&slot_b, "charlie-pw");
    proxy.wait_for_log("client_auth.reloaded", Duration::from_secs(10));
    assert!(status()["client_auth"]["entries"][1]["password_changed_at"].is_string());
    newcomer.cmd(&["AUTH", "app", "charlie-pw"]).assert_ok();
    proxy
        .conn()
        .cmd(&["AUTH", "app", "bravo-pw"])
        .assert_error("WRONGPASS");
    on_b.cmd(&["PING"]).assert_simple("PONG");
    assert_eq!(counts(), vec![(1, 1), (2, 2)]);

    // The last client of slot a moves over (RESET logs it out first): slot a is unused.
    on_a.cmd(&["RESET"]).assert_simple("RESET");
    assert_eq!(counts(), vec![(0, 1), (2, 2)]);
    on_a.cmd(&["AUTH", "app", "charlie-pw"]).assert_ok();
    assert_eq!(counts(), vec![(0, 1), (3, 3)]);
    drop(on_b);
    assert_eventually(Duration::from_secs(10), "on_b's login ended", || {
        counts() == vec![(0, 1), (2, 3)]
    });
    assert_eq!((gauge(&slot_a), gauge(&slot_b)), (Some(0.0), Some(2.0)));

    // A slot whose file is gone (being replaced) keeps the password read before, said once.
    std::fs::remove_file(&slot_a).expect("remove");
    proxy.wait_for_log("cannot read a client password", Duration::from_secs(10));
    proxy.conn().cmd(&["AUTH", "app", "alpha-pw"]).assert_ok();

    let (_, metrics) = proxy.http_get("/metrics");
    let shown = format!("{}\n{metrics}", status());
    for secret in ["alpha-pw", "bravo-pw", "charlie-pw", password.as_str()] {
        assert!(!shown.contains(secret), "a password in status or metrics");
    }
    assert_no_secret_in_logs(&proxy, &[&password, "alpha-pw", "bravo-pw", "charlie-pw"]);
}

/// Adding and retiring a client auth entry without a restart: SIGHUP re-reads the config file's
/// `[listener.auth]`. A new entry is accepted at once; a removed one is refused for new logins,
/// while its clients stay logged in and are shown as retired until they leave. A file that does
/// not load, or a change of mode, changes nothing.
#[test]
fn sighup_adds_and_retires_client_auth_entries_without_dropping_anyone() {
    let password = random_token(32);
    let redis = RedisServer::start_with_user(APP_USER, &password);
    let base = ProxyConfig::plain(&redis).credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD");
    let with_entries = |refs: &[&str]| {
        let mut text = "[listener.auth]\nmode = \"password\"\n".to_string();
        for r in refs {
            text.push_str(&format!(
                "[[listener.auth.users]]\nusername = \"app\"\npassword = \"{r}\"\n"
            ));
        }
        base.clone().extra(&text).to_toml()
    };
    let proxy = Proxy::start(
        &with_entries(&["env:PW_OLD"]),
        &[
            ("TEST_UPSTREAM_PASSWORD", password.as_str()),
            ("PW_OLD", "old-pw-1"),
            ("PW_NEW", "new-pw-2"),
        ],
    );
    let status = || -> serde_json::Value {
        let (code, body) = proxy.http_get("/v1/status");
        assert_eq!(code, 200, "{body}");
        let doc: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
        doc["client_auth"].clone()
    };
    let sources = |list: &serde_json::Value| -> Vec<(String, i64)> {
        list.as_array()
            .expect("a list")
            .iter()
            .map(|e| {
                (
                    e["source"].as_str().expect("source").to_string(),
                    e["connections"].as_i64().expect("connections"),
                )
            })
            .collect()
    };
    let reload = |toml: &str, outcome: &str| {
        let seen = proxy.logs().len();
        std::fs::write(proxy.config_path(), toml).expect("rewrite the config");
        proxy.hangup();
        assert_eventually(Duration::from_secs(10), "the SIGHUP was handled", || {
            proxy.logs()[seen..].iter().any(|l| l.contains(outcome))
        });
    };

    let mut old_client = proxy.conn();
    old_client.cmd(&["AUTH", "app", "old-pw-1"]).assert_ok();
    proxy
        .conn()
        .cmd(&["AUTH", "app", "new-pw-2"])
        .assert_error("WRONGPASS");

    // Added: both are accepted.
    reload(
        &with_entries(&["env:PW_OLD", "env:PW_NEW"]),
        "client auth entries re-read",
    );
    let mut new_client = proxy.conn();
    new_client.cmd(&["AUTH", "app", "new-pw-2"]).assert_ok();
    let doc = status();
    assert_eq!(
        sources(&doc["entries"]),
        vec![("env:PW_OLD".to_string(), 1), ("env:PW_NEW".to_string(), 1)],
        "{doc}"
    );

    // The old one retired: refused from now on; its client stays, shown as retired. A file
    // entry comes in with the same reload, and its file is followed from then on.
    let slot = proxy.dir().join("slot-c");
    std::fs::write(&slot, "file-pw-3\n").expect("write the slot");
    let file_ref = format!("file:{}", slot.display());
    reload(
        &with_entries(&["env:PW_NEW", &file_ref]),
        "client auth entries re-read",
    );
    proxy
        .conn()
        .cmd(&["AUTH", "app", "old-pw-1"])
        .assert_error("WRONGPASS");
    old_client.cmd(&["PING"]).assert_simple("PONG");
    proxy.conn().cmd(&["AUTH", "app", "file-pw-3"]).assert_ok();
    let tmp = proxy.dir().join("slot-c.tmp");
    std::fs::write(&tmp, "file-pw-4\n").expect("write");
    std::fs::rename(&tmp, &slot).expect("rename");
    proxy.wait_for_log("client_auth.reloaded", Duration::from_secs(10));
    proxy.conn().cmd(&["AUTH", "app", "file-pw-4"]).assert_ok();
    let doc = status();
    assert_eq!(
        sources(&doc["entries"]),
        vec![("env:PW_NEW".to_string(), 1), (file_ref.clone(), 0)],
        "{doc}"
    );
    assert_eq!(
        sources(&doc["retired"]),
        vec![("env:PW_OLD".to_string(), 1)],
        "{doc}"
    );
    drop(old_client);
    assert_eventually(
        Duration::from_secs(10),
        "the retired entry's last client left",
        || status()["retired"].as_array().is_some_and(Vec::is_empty),
    );

    // A file that does not load, or a new mode, changes nothing.
    reload("[listener\n", "not reloaded");
    reload(&base.clone().to_toml(), "not reloaded");
    new_client.cmd(&["PING"]).assert_simple("PONG");
    proxy.conn().cmd(&["AUTH", "app", "new-pw-2"]).assert_ok();
    proxy.conn().cmd(&["GET", "k"]).assert_error("NOAUTH");
    assert_no_secret_in_logs(
        &proxy,
        &[&password, "old-pw-1", "new-pw-2", "file-pw-3", "file-pw-4"],
    );
}

/// SIGHUP also sets the log filter (`log.level`) from the file, so an operator can turn a
/// target up or down without dropping a client. Here the audit line of a refused AUTH (info,
/// target `rotaproxy::audit`) is filtered out at first and logged after the reload.
#[test]
fn sighup_sets_the_log_filter_from_the_config_file() {
    let password = random_token(32);
    let redis = RedisServer::start_with_user(APP_USER, &password);
    let config = |level: &str| {
        let mut config = ProxyConfig::plain(&redis)
            .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD")
            .extra(
                "[listener.auth]\nmode = \"password\"\n\
                 [[listener.auth.users]]\nusername = \"app\"\npassword = \"env:APP_PW\"\n",
            );
        config.log_level = level.to_string();
        config.to_toml()
    };
    let proxy = Proxy::start(
        &config("info,rotaproxy::audit=warn"),
        &[
            ("TEST_UPSTREAM_PASSWORD", password.as_str()),
            ("APP_PW", "app-pw-1"),
        ],
    );
    let mut client = proxy.conn();
    let refused_auth_logged = |client: &mut RespConn| {
        client
            .cmd(&["AUTH", "app", "not-the-password"])
            .assert_error("WRONGPASS");
        proxy.log_contains("client.auth_failed")
    };

    // Audit lines at warn still come out: a refused AUTH's (info) does not, though it was
    // answered, and logged if at all, before the HTTP request's line.
    refused_auth_logged(&mut client);
    proxy.conn().send_raw(b"POST / HTTP/1.1\r\n");
    proxy.wait_for_log("client.http_request", Duration::from_secs(10));
    assert!(
        !proxy.log_contains("client.auth_failed"),
        "the audit target is filtered at warn"
    );

    std::fs::write(proxy.config_path(), config("info")).expect("rewrite the config");
    proxy.hangup();
    proxy.wait_for_log("SIGHUP: log filter set", Duration::from_secs(10));
    // Refused AUTHs are logged at most once a second, so the first after the reload may fall
    // in the same second as the one before it.
    assert_eventually(
        Duration::from_secs(10),
        "a refused AUTH is logged after the reload",
        || refused_auth_logged(&mut client),
    );
    client.cmd(&["AUTH", "app", "app-pw-1"]).assert_ok();
    client.cmd(&["PING"]).assert_simple("PONG");
}

/// Metrics and status say which build runs and since when, for whoever compares the proxy
/// they reach with the one they deployed.
#[test]
fn metrics_and_status_name_the_version_and_start_time() {
    let redis = RedisServer::start(RedisOptions::new());
    let proxy = Proxy::start(&ProxyConfig::plain(&redis).to_toml(), &[]);
    let (_, metrics) = proxy.http_get("/metrics");
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        metrics.contains(&format!("rotaproxy_build_info{{version=\"{version}\"}} 1")),
        "{metrics}"
    );
    let started_at = proxy
        .metric("rotaproxy_start_time_seconds")
        .expect("start time") as u64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        started_at <= now && started_at + 600 > now,
        "{started_at} against {now}"
    );
    let (_, body) = proxy.http_get("/v1/status");
    let status: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
    assert_eq!(status["version"], version);
    assert_eq!(status["started_at"].as_u64(), Some(started_at));
}

/// `admin.metrics_bind` serves metrics and health (for Prometheus and HTTP probes on the pod's
/// address) and nothing else: no status, no client list, no POST.
#[test]
fn the_metrics_listener_serves_metrics_and_health_only() {
    let redis = RedisServer::start(RedisOptions::new());
    let mut config = ProxyConfig::plain(&redis);
    config.admin_extra = "metrics_bind = \"127.0.0.1:0\"\ntoken = \"env:TEST_ADMIN_TOKEN\"".into();
    let token = random_token(24);
    let proxy = Proxy::start(&config.to_toml(), &[("TEST_ADMIN_TOKEN", token.as_str())]);
    let addr = proxy
        .metrics_addr()
        .expect("metrics_addr on the listening line");
    assert_ne!(addr, proxy.admin_addr());
    proxy.conn().cmd(&["PING"]).assert_simple("PONG");

    let (code, body) = http_request(addr, "GET", "/metrics", &[], b"");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("rotaproxy_commands_total"), "{body}");
    assert_eq!(http_request(addr, "GET", "/healthz", &[], b"").0, 200);
    assert_eventually(Duration::from_secs(10), "ready there too", || {
        http_request(addr, "GET", "/readyz", &[], b"").0 == 200
    });
    for path in ["/v1/status", "/v1/clients"] {
        let (code, body) = http_request(addr, "GET", path, &[], b"");
        assert_eq!(code, 404, "{path}: {body}");
    }
    let auth = format!("Bearer {token}");
    let headers = [("Authorization", auth.as_str())];
    for path in ["/v1/rotate", "/v1/client-certificate/rotate"] {
        let (code, body) = http_request(addr, "POST", path, &headers, b"");
        assert_eq!(code, 404, "{path}: {body}");
    }
    // The admin listener still serves everything.
    assert_eq!(proxy.http_get("/v1/status").0, 200);
    assert_eq!(proxy.http_get("/v1/clients").0, 200);
}

/// Sockets the process has open (`/proc/PID/fd`).
fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// What `s` brings until the far end closes it (or resets it), which must happen by `deadline`.
fn read_until_closed(s: &mut TcpStream, deadline: Instant, what: &str) -> Vec<u8> {
    let left = deadline.saturating_duration_since(Instant::now());
    s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .unwrap();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what} still open at the deadline: {e}"),
    }
    got
}

/// Whoever can reach an admin listener (the metrics listener is meant for the pod's address)
/// can make the proxy hold no more than `admin.max_connections` connections, and none of
/// them for longer than `admin.header_timeout` without a whole request head: neither one
/// left idle nor one that trickles its head a line at a time. The data path serves on
/// throughout, and the listener serves again once the held connections are closed.
#[test]
fn admin_listeners_bound_the_connections_they_hold() {
    let redis = RedisServer::start(RedisOptions::new());
    let mut config = ProxyConfig::plain(&redis).extra("[pool]\nwarm = 0\n");
    config.admin_extra =
        "metrics_bind = \"127.0.0.1:0\"\nmax_connections = 4\nheader_timeout = \"1s\"".into();
    let proxy = Proxy::start(&config.to_toml(), &[]);
    let addr = proxy
        .metrics_addr()
        .expect("metrics_addr on the listening line");
    let mut client = proxy.conn();
    client.cmd(&["PING"]).assert_simple("PONG");
    let sockets_before = open_sockets(proxy.pid());

    // Two that trickle a header line every 100 ms for as long as the proxy takes them.
    let tricklers: Vec<_> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            std::thread::spawn(move || {
                let started = Instant::now();
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
                while started.elapsed() < Duration::from_secs(120) {
                    if s.write_all(b"X-Slow: a\r\n").is_err() {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                false
            })
        })
        .collect();
    // Twenty that send half a request head and then nothing, and twenty that send nothing.
    let mut held: Vec<TcpStream> = (0..40)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            if i % 2 == 0 {
                s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            }
            s
        })
        .collect();

    // However many wait, the proxy holds at most four of them at a time.
    let mut most = 0;
    for _ in 0..40 {
        most = most.max(open_sockets(proxy.pid()).saturating_sub(sockets_before));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        (1..=4).contains(&most),
        "{most} admin connections held at once"
    );
    client.cmd(&["PING"]).assert_simple("PONG");

    // Each is closed once its second is up (a 408 may come first): ten rounds of four.
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, s) in held.iter_mut().enumerate() {
        read_until_closed(s, deadline, &format!("connection {i} of 40"));
    }
    for trickler in tricklers {
        assert!(
            trickler.join().unwrap(),
            "a connection trickling its head was held for two minutes"
        );
    }
    let (code, body) = http_request(addr, "GET", "/metrics", &[], b"");
    assert_eq!(code, 200, "{body}");
    client.cmd(&["PING"]).assert_simple("PONG");

    // A kept-alive connection left idle after its request is closed the same way.
    let mut kept = TcpStream::connect(addr).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = read_until_closed(&mut kept, deadline, "an idle kept-alive connection");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.contains("ok\n"),
        "{answer}"
    );
}

/// `check-config --connect` without rotation: the configured credential must authenticate.
#[test]
fn check_config_connect_says_whether_the_credential_authenticates() {
    let password = random_token(32);
    let redis = RedisServer::start_with_user(APP_USER, &password);
    let dir = temp_dir();
    let path = dir.path().join("rotaproxy.toml");
    let config =
        ProxyConfig::plain(&redis).credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD");
    std::fs::write(&path, config.to_toml()).unwrap();
    let check = |pw: &str| {
        let args = [Path::new("check-config"), Path::new("--connect"), &path];
        let out = run_rotaproxy(&args, &[("TEST_UPSTREAM_PASSWORD", pw)]);
        (out.ok, out.printed())
    };
    let (ok, out) = check(&password);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "authenticated as {APP_USER} (configured credential)"
        )),
        "{out}"
    );
    let wrong = random_token(32);
    let (ok, out) = check(&wrong);
    assert!(!ok, "{out}");
    assert!(
        out.contains("upstream") && out.contains("WRONGPASS"),
        "{out}"
    );
    assert_no_secret_in_lines(&[out], &[&password, &wrong]);
}

#[test]
fn upstream_connect_and_ping_times_are_histograms() {
    let redis = RedisServer::start(RedisOptions::new());
    let config =
        ProxyConfig::plain(&redis).extra("[pool]\nwarm = 2\nidle_check_interval = \"100ms\"\n");
    let proxy = Proxy::start(&config.to_toml(), &[]);
    assert_eventually(
        Duration::from_secs(30),
        "connections opened and idle ones checked",
        || {
            proxy
                .metric("rotaproxy_upstream_connect_seconds_count")
                .is_some_and(|n| n >= 2.0)
                && proxy
                    .metric("rotaproxy_upstream_ping_seconds_count")
                    .is_some_and(|n| n >= 2.0)
        },
    );
    let (_, metrics) = proxy.http_get("/metrics");
    for name in [
        "rotaproxy_upstream_connect_seconds",
        "rotaproxy_upstream_ping_seconds",
    ] {
        // Buckets, not quantiles; every observation under the last bound (10 s) on loopback.
        assert!(
            metrics.contains(&format!("# TYPE {name} histogram")),
            "{metrics}"
        );
        let count = metric_value(&metrics, &format!("{name}_count")).expect("count");
        let within_10s =
            metric_value(&metrics, &format!("{name}_bucket{{le=\"10\"}}")).expect("a 10 s bucket");
        assert_eq!(within_10s, count, "{name}: {metrics}");
        let sum = metric_value(&metrics, &format!("{name}_sum")).expect("sum");
        assert!(
            sum > 0.0 && sum < count * 10.0,
            "{name}: sum {sum} of {count}"
        );
    }
}

/// A Redis whose own unauthenticated clients are asked for a password (its default user has
/// one), and a proxy in front whose clients must log in with `client-pw`, started once the
/// proxy has read the server's command table. `upstream` lines go inside `[upstream]`.
/// Returns the server, the proxy and the proxy's upstream password.
fn redis_and_proxy_both_asking_for_passwords(upstream: &str) -> (RedisServer, Proxy, String) {
    let password = random_token(32);
    let redis = RedisServer::start(
        RedisOptions::new()
            .user(&format!("{APP_USER} on >{password} ~* &* +@all"))
            .requirepass("direct-pw"),
    );
    let mut config = ProxyConfig::plain(&redis)
        .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD")
        .client_password("env:CLIENT_PW");
    config.upstream_extra = upstream.to_string();
    let proxy = Proxy::start(
        &config.to_toml(),
        &[
            ("TEST_UPSTREAM_PASSWORD", password.as_str()),
            ("CLIENT_PW", "client-pw"),
        ],
    );
    proxy.wait_for_command_table();
    (redis, proxy, password)
}

/// The server behind a running proxy can change: here it restarts with a command disabled.
/// Unauthenticated clients are then answered by the new command table, as the server answers
/// its own.
#[test]
fn unauthenticated_clients_follow_a_server_that_changed_behind_the_proxy() {
    let (mut redis, proxy, password) =
        redis_and_proxy_both_asking_for_passwords("command_table_refresh = \"1s\"");
    let answers = |redis: &RedisServer| {
        [RespConn::connect(redis.addr()), proxy.conn()].map(|mut conn| {
            conn.send_raw(&encode_cmd(&["ECHO", "hi"]));
            conn.read_reply()
        })
    };
    let [direct, proxied] = answers(&redis);
    assert_eq!(
        direct,
        Frame::Error("NOAUTH Authentication required.".into())
    );
    assert_eq!(proxied, direct);

    redis.stop();
    redis.add_config_line("rename-command ECHO \"\"");
    redis.start_again();
    proxy.wait_for_log("the server changed", Duration::from_secs(60));
    let [direct, proxied] = answers(&redis);
    assert_eq!(
        direct,
        Frame::Error("ERR unknown command 'ECHO', with args beginning with: 'hi' ".into())
    );
    assert_eq!(proxied, direct);
    // An ACL change that takes COMMAND from the proxy's user says nothing of the server's
    // commands: the table last read stays in use.
    let r = redis.admin_cmd(&["ACL", "SETUSER", APP_USER, "-command"]);
    assert_eq!(r, Frame::simple("OK"));
    proxy.wait_for_log("the server refused COMMAND", Duration::from_secs(60));
    let [direct, proxied] = answers(&redis);
    assert_eq!(proxied, direct);
    // Logged in, the client reaches the server as before.
    let mut c = proxy.conn();
    c.cmd(&["AUTH", "client-pw"]).assert_ok();
    c.cmd(&["PING"]).assert_simple("PONG");
    assert_no_secret_in_logs(&proxy, &[&password, "client-pw"]);
}

/// A SIGHUP applies `listener.auth.users` and `log.level` only. Any other change to the file is
/// named in a warning and raises `rotaproxy_config_restart_pending`, until a SIGHUP finds the
/// file back to what the proxy runs; meanwhile the proxy serves as it started.
#[test]
fn sighup_names_the_changes_only_a_restart_applies() {
    let password = random_token(32);
    let redis = RedisServer::start_with_user(APP_USER, &password);
    let started = ProxyConfig::plain(&redis)
        .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD")
        .extra("[pool]\nwarm = 2\n");
    let proxy = Proxy::start(
        &started.to_toml(),
        &[("TEST_UPSTREAM_PASSWORD", password.as_str())],
    );
    let pending = || proxy.metric("rotaproxy_config_restart_pending");
    assert_eq!(pending(), Some(0.0));
    let last_sighup = || {
        let (code, body) = proxy.http_get("/v1/status");
        assert_eq!(code, 200, "{body}");
        let status: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
        status["config"]["last_sighup"].clone()
    };
    assert!(last_sighup().is_null());
    // Waits for the `n`th SIGHUP to have been handled (its last line is the client auth one).
    let reloads_logged = |n: usize| {
        assert_eventually(Duration::from_secs(10), "the SIGHUP is handled", || {
            proxy
                .logs()
                .iter()
                .filter(|line| line.contains("SIGHUP: client auth entries re-read"))
                .count()
                >= n
        })
    };
    let warning = "SIGHUP: these changes are not applied until a restart";

    // Only the log filter: applied, nothing pending.
    let mut quieter = started.clone();
    quieter.log_level = "info,rotaproxy::audit=warn".to_string();
    std::fs::write(proxy.config_path(), quieter.to_toml()).expect("rewrite the config");
    proxy.hangup();
    reloads_logged(1);
    assert!(!proxy.log_contains(warning));
    assert_eq!(pending(), Some(0.0));

    // The pool, the timeouts and the upstream's address too: named, not applied.
    let mut changed = quieter.clone().extra("[timeouts]\nconnect = \"3s\"\n");
    changed.extra = changed.extra.replace("warm = 2", "warm = 1");
    changed.upstream_url = "redis://127.0.0.1:1".to_string();
    std::fs::write(proxy.config_path(), changed.to_toml()).expect("rewrite the config");
    proxy.hangup();
    let line = proxy.wait_for_log(warning, Duration::from_secs(10));
    assert!(line.contains("changed=upstream,pool,timeouts"), "{line}");
    assert_eq!(pending(), Some(1.0));
    let outcome = last_sighup();
    assert_eq!(outcome["result"], "applied", "{outcome}");
    assert_eq!(
        outcome["restart_needed_for"],
        serde_json::json!(["upstream", "pool", "timeouts"])
    );
    // A file that does not load changes nothing, and says so.
    std::fs::write(proxy.config_path(), "[upstream]\nurl = 1\n").expect("rewrite the config");
    proxy.hangup();
    proxy.wait_for_log("SIGHUP: config not reloaded", Duration::from_secs(10));
    let outcome = last_sighup();
    assert_eq!(outcome["result"], "refused", "{outcome}");
    assert!(
        outcome["error"].as_str().unwrap().contains("key `url`"),
        "{outcome}"
    );
    assert_eq!(pending(), Some(1.0));
    // Still the pool it started with, and serving.
    assert_eventually(Duration::from_secs(10), "the pool holds 2", || {
        proxy.metric("rotaproxy_pool_idle_connections") == Some(2.0)
    });
    let mut client = proxy.conn();
    client.cmd(&["SET", "k", "v"]).assert_ok();

    // Back to what runs (the log filter may stay changed): nothing pending.
    std::fs::write(proxy.config_path(), quieter.to_toml()).expect("rewrite the config");
    proxy.hangup();
    reloads_logged(3);
    assert_eq!(pending(), Some(0.0));
    assert_eq!(last_sighup()["restart_needed_for"], serde_json::json!([]));
    client.cmd(&["GET", "k"]).assert_bulk(b"v");
}

/// Everything a connection receives until the peer closes it.
fn bytes_until_closed(conn: &mut RespConn) -> Vec<u8> {
    let mut all = Vec::new();
    loop {
        match conn.read_raw() {
            Ok(bytes) if bytes.is_empty() => return all,
            Ok(bytes) => all.extend(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return all,
            Err(e) => panic!("read: {e}; so far {:?}", String::from_utf8_lossy(&all)),
        }
    }
}

/// Redis judges a command's name and argument count before it asks for authentication, and
/// runs RESET for anyone. The proxy answers unauthenticated clients itself, from the server's
/// command table: byte for byte what the same server tells its own unauthenticated clients.
#[test]
fn unauthenticated_clients_are_answered_as_by_redis() {
    // The server's own unauthenticated clients: its default user needs a password.
    let (redis, proxy, password) = redis_and_proxy_both_asking_for_passwords("");

    let many = "abcdefghijklmnopqrstuvwxyz0123456789";
    let long = "x".repeat(200);
    let requests: Vec<Vec<u8>> = vec![
        b"GET\r\n".to_vec(),
        encode_cmd(&["GET", "a", "b"]),
        encode_cmd(&["GET", "k"]),
        encode_cmd(&["PING"]),
        encode_cmd(&["SET", "k", "v"]),
        encode_cmd(&["nosuch", "a"]),
        encode_cmd(&["nosuch"]),
        encode_cmd(&["NoSuch", many, many, many, many, many]),
        encode_cmd(&[&long, &long]),
        b"*3\r\n$7\r\nFOO\0bar\r\n$3\r\na\0b\r\n$1\r\nc\r\n".to_vec(),
        b"*2\r\n$5\r\nfo\r\no\r\n$3\r\na\nb\r\n".to_vec(),
        b"nosuch a 'b c'\r\n".to_vec(),
        encode_cmd(&["CLIENT"]),
        encode_cmd(&["client", "KILL"]),
        encode_cmd(&["client", "nosuch"]),
        encode_cmd(&["CLIENT", "ID"]),
        encode_cmd(&["CONFIG", "get"]),
        encode_cmd(&["OBJECT", "freq"]),
        encode_cmd(&["MODULE", "LIST"]),
        encode_cmd(&["RESET"]),
        encode_cmd(&["reset", "x"]),
        encode_cmd(&["AUTH"]),
        encode_cmd(&["AUTH", "default", "wrong"]),
        encode_cmd(&["SUBSCRIBE"]),
        encode_cmd(&["SUBSCRIBE", "c"]),
        encode_cmd(&["MULTI"]),
        encode_cmd(&["EXEC"]),
    ];
    let mut all = Vec::new();
    for request in &requests {
        all.extend_from_slice(request);
    }
    let mut cases: Vec<Vec<u8>> = requests;
    // All of them pipelined on one connection, then one that Redis closes the connection for.
    cases.push(all.clone());
    all.extend(encode_cmd(&["GET", &"k".repeat(16 * 1024 + 1)]));
    cases.push(all);
    for (i, request) in cases.iter().enumerate() {
        let mut sides = [RespConn::connect(redis.addr()), proxy.conn()];
        let [direct, proxied] = sides.each_mut().map(|conn| {
            // The server may have closed the connection already (a protocol error).
            let _ = conn.try_send_raw(request);
            let _ = conn.try_send_raw(b"QUIT\r\n");
            bytes_until_closed(conn)
        });
        assert_eq!(
            String::from_utf8_lossy(&proxied),
            String::from_utf8_lossy(&direct),
            "case {i}: {:?}",
            String::from_utf8_lossy(&request[..request.len().min(80)])
        );
    }
    assert_no_secret_in_logs(&proxy, &[&password, "client-pw"]);
}

/// A RESET holds back the commands behind it until its reply (the proxy logs the upstream
/// connection back in, and the client out if clients must authenticate). The reply to an
/// earlier HELLO that names no protocol, or to an EXEC whose transaction settles nothing, used
/// to let them go early: they then ran on the upstream connection between the RESET and the
/// proxy's AUTH (as the server's default user, or refused NOAUTH), and before the client was
/// logged out. Found by the random sessions of clients that must authenticate (seed 51051).
#[test]
fn commands_behind_a_reset_wait_for_it_whatever_was_answered_before() {
    let password = random_token(32);
    // The server's default user needs a password: only the proxy's AUTH lets commands run.
    let redis = RedisServer::start(
        RedisOptions::new()
            .user(&format!("{APP_USER} on >{password} ~* &* +@all"))
            .requirepass("default-pw"),
    );
    let config =
        ProxyConfig::plain(&redis).credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD");
    let upstream_password = ("TEST_UPSTREAM_PASSWORD", password.as_str());
    // Behind a HELLO naming no protocol, or a transaction that settles nothing, then a
    // command whose reply comes well after theirs: the RESET, then GET. Returns GET's reply.
    let get_after_reset = |c: &mut RespConn, first: &[&str]| {
        let mut pipeline = encode_cmd(first);
        if first[0] == "MULTI" {
            pipeline.extend(encode_cmd(&["EXEC"]));
        }
        pipeline.extend(encode_cmd(&["BLPOP", "no-such-list", "0.1"]));
        pipeline.extend(encode_cmd(&["RESET"]));
        pipeline.extend(encode_cmd(&["GET", "k"]));
        c.send_raw(&pipeline);
        let mut replies = c.read_replies(if first[0] == "MULTI" { 5 } else { 4 });
        let get = replies.pop().expect("GET's reply");
        assert_eq!(
            replies.last(),
            Some(&Frame::Simple("RESET".into())),
            "{replies:?}"
        );
        get
    };
    let before_reset: [&[&str]; 2] = [&["HELLO", "4"], &["MULTI"]];
    // Clients need not authenticate: the command after RESET runs as the proxy's user.
    let open = Proxy::start(&config.to_toml(), &[upstream_password]);
    let mut c = open.conn();
    c.cmd(&["SET", "k", "v"]).assert_ok();
    for first in before_reset {
        get_after_reset(&mut c, first).assert_bulk("v");
    }
    // Clients must authenticate: the command after RESET finds the client logged out.
    let guarded = Proxy::start(
        &config.client_password("env:CLIENT_PW").to_toml(),
        &[upstream_password, ("CLIENT_PW", "client-pw")],
    );
    let mut c = guarded.conn();
    for first in before_reset {
        c.cmd(&["AUTH", "client-pw"]).assert_ok();
        get_after_reset(&mut c, first).assert_error("NOAUTH");
    }
    assert_no_secret_in_logs(&open, &[&password]);
    assert_no_secret_in_logs(&guarded, &[&password, "client-pw"]);
}

/// A proxy whose user may not run COMMAND has no table to judge by: it says so once, and its
/// unauthenticated clients get NOAUTH for every command (RESET aside), as before.
#[test]
fn without_the_command_table_unauthenticated_clients_get_noauth() {
    let password = random_token(32);
    let redis = RedisServer::start_with_user(APP_USER, &password);
    redis
        .admin_conn()
        .cmd(&["ACL", "SETUSER", APP_USER, "-command"])
        .assert_ok();
    let config = ProxyConfig::plain(&redis)
        .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD")
        .client_password("env:CLIENT_PW");
    let proxy = Proxy::start(
        &config.to_toml(),
        &[
            ("TEST_UPSTREAM_PASSWORD", password.as_str()),
            ("CLIENT_PW", "client-pw"),
        ],
    );
    let line = proxy.wait_for_log("the server refused COMMAND", Duration::from_secs(30));
    assert!(line.contains("NOPERM"), "{line}");
    let mut c = proxy.conn();
    c.cmd(&["GET"]).assert_error("NOAUTH");
    c.cmd(&["NOSUCH", "a"]).assert_error("NOAUTH");
    c.cmd(&["EXEC"])
        .assert_error("EXECABORT Transaction discarded because of: NOAUTH");
    c.cmd(&["RESET"]).assert_simple("RESET");
    c.cmd(&["AUTH", "client-pw"]).assert_ok();
    c.cmd(&["GET", "k"]).assert_null();
    assert_no_secret_in_logs(&proxy, &[&password, "client-pw"]);
}

#[test]
fn hello_and_auth_are_judged_in_redis_order_and_client_passwords_stay_in_the_proxy() {
    let password = random_token(32);
    let redis = RedisServer::start_with_user(APP_USER, &password);
    let config = ProxyConfig::plain(&redis)
        .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD")
        .client_password("env:CLIENT_PW");
    let client_pw = "client-pw-5e2b";
    let wrong_pw = "wrong-pw-91c7";
    let proxy = Proxy::start(
        &config.to_toml(),
        &[
            ("TEST_UPSTREAM_PASSWORD", password.as_str()),
            ("CLIENT_PW", client_pw),
        ],
    );
    // Everything the upstream is sent, from here on.
    let mut monitor = redis.admin_conn();
    monitor.cmd(&["MONITOR"]).assert_ok();

    let mut c = proxy.conn();
    // Redis 7.0 reads the version first, then each option in order, trying an AUTH when it
    // gets to it, and says NOAUTH only after all that.
    c.cmd(&["HELLO", "03", "AUTH", "default", client_pw])
        .assert_error("ERR Protocol version is not an integer");
    c.cmd(&["HELLO", "4", "AUTH", "default", wrong_pw])
        .assert_error("NOPROTO");
    c.cmd(&["HELLO", "3", "BAD", "AUTH", "default", client_pw])
        .assert_error("ERR Syntax error in HELLO option 'BAD'");
    c.cmd(&["GET", "k"]).assert_error("NOAUTH");
    // A password where the user name goes.
    c.cmd(&["HELLO", "3", "AUTH", client_pw])
        .assert_error("ERR Syntax error in HELLO option 'AUTH'");
    c.cmd(&["HELLO", "3", "AUTH", "default", wrong_pw, "BAD"])
        .assert_error("WRONGPASS");
    c.cmd(&["AUTH", "a", "b", "c"])
        .assert_error("ERR syntax error");
    c.cmd(&["AUTH"])
        .assert_error("ERR wrong number of arguments");
    c.cmd(&["GET", "k"]).assert_error("NOAUTH");
    // The AUTH before the bad option counts.
    c.cmd(&["HELLO", "3", "AUTH", "default", client_pw, "BAD"])
        .assert_error("ERR Syntax error in HELLO option 'BAD'");
    c.cmd(&["GET", "k"]).assert_null();
    // Now Redis words the refusals (they go upstream without the AUTH's arguments).
    c.cmd(&["HELLO", "3", "AUTH", client_pw])
        .assert_error("ERR Syntax error in HELLO option 'AUTH'");

    // Inside MULTI a right AUTH is queued and answers +OK in EXEC, as on Redis...
    c.cmd(&["MULTI"]).assert_ok();
    c.cmd(&["AUTH", "default", client_pw])
        .assert_simple("QUEUED");
    c.cmd(&["HELLO", "2", "AUTH", "default", client_pw])
        .assert_simple("QUEUED");
    c.cmd(&["SET", "k", "1"]).assert_simple("QUEUED");
    let exec = c.cmd(&["EXEC"]);
    let elements = exec.as_array().unwrap_or_else(|| panic!("{exec:?}"));
    assert_eq!(elements.len(), 3, "{exec:?}");
    elements[0].assert_ok();
    assert_eq!(
        elements[1].map_get("proto"),
        Some(&Frame::Integer(2)),
        "{exec:?}"
    );
    elements[2].assert_ok();
    // ... and a wrong one is refused at once and aborts the transaction (Redis would report it
    // in EXEC's array: the proxy cannot queue the password).
    c.cmd(&["MULTI"]).assert_ok();
    c.cmd(&["AUTH", wrong_pw]).assert_error("WRONGPASS");
    c.cmd(&["SET", "k", "2"]).assert_simple("QUEUED");
    c.cmd(&["EXEC"]).assert_error("EXECABORT");
    c.cmd(&["GET", "k"]).assert_bulk("1");
    c.cmd(&["SET", "done", "1"]).assert_ok();

    // The upstream never saw a client password, right or wrong, in any form.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.iter().any(|l: &String| l.contains("\"done\"")) {
        assert!(Instant::now() < deadline, "MONITOR showed: {seen:#?}");
        seen.push(
            monitor
                .read_reply()
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert!(
        seen.iter().any(|l| l.contains("\"HELLO\" \"3\" \"AUTH\"")),
        "the incomplete HELLO went upstream without its arguments: {seen:#?}"
    );
    for line in &seen {
        assert!(
            !line.contains(client_pw) && !line.contains(wrong_pw),
            "{line}"
        );
    }
    assert_no_secret_in_logs(&proxy, &[&password, client_pw]);
}

/// A Redis serving TLS (requiring client certificates when `mtls`) with the ACL user `app`.
fn tls_redis(mtls: bool) -> (tempfile::TempDir, Certs, String, RedisServer) {
    let dir = temp_dir();
    let certs = Certs::generate(dir.path());
    let password = random_token(32);
    let redis = RedisServer::start(
        RedisOptions::new()
            .tls(RedisTls::from_certs(&certs, mtls))
            .user(&format!("{APP_USER} on >{password} ~* &* +@all")),
    );
    (dir, certs, password, redis)
}

#[test]
fn upstream_tls_with_the_wrong_ca_is_a_clear_error() {
    let (_dir, certs, password, redis) = tls_redis(false);
    let config = ProxyConfig::tls(&redis, &certs.other_ca)
        .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD");
    let proxy = Proxy::start(&config.to_toml(), &[("TEST_UPSTREAM_PASSWORD", &password)]);
    let mut c = proxy.conn();
    let reply = c.cmd(&["PING"]);
    let text = reply.assert_error("ERR rotaproxy: upstream unavailable");
    assert!(text.contains("unknown issuer"), "{text}");
    // The reply can arrive before the harness has read the log line written just before it.
    proxy.wait_for_log("unknown issuer", Duration::from_secs(10));
    let (status, body) = proxy.http_get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert_no_secret_in_logs(&proxy, &[&password]);
}

#[test]
fn upstream_tls_wrong_server_name_is_named() {
    let (_dir, certs, password, redis) = tls_redis(false);
    let mut config = ProxyConfig::tls(&redis, &certs.ca)
        .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD");
    config.server_name = Some("not-the-server.example".into());
    let proxy = Proxy::start(&config.to_toml(), &[("TEST_UPSTREAM_PASSWORD", &password)]);
    let text = proxy.conn().cmd(&["PING"]).assert_error("ERR").to_string();
    assert!(text.contains("server name"), "{text}");
}

/// The URL's scheme says one thing and the port speaks the other: what happens when a
/// database's TLS setting and the proxy's URL part ways. Either way the client's error and
/// the log say which scheme to try, and the password appears in neither.
#[test]
fn a_url_scheme_the_port_does_not_speak_is_named() {
    let (_dir, certs, password, redis) = tls_redis(false);
    let env = [("TEST_UPSTREAM_PASSWORD", password.as_str())];

    // Starts the proxy with `config` pointed at `url` and returns the error a client gets.
    let refusal = |mut config: ProxyConfig, url: String, advice: &str| {
        config.upstream_url = url;
        let proxy = Proxy::start(&config.to_toml(), &env);
        let text = proxy
            .conn()
            .cmd(&["PING"])
            .assert_error("ERR rotaproxy: upstream unavailable")
            .to_string();
        assert!(text.contains(advice), "{text}");
        proxy.wait_for_log(advice, Duration::from_secs(10));
        assert_no_secret_in_logs(&proxy, &[&password]);
    };

    // redis:// to the TLS port: Redis drops the connection at the first plain-text bytes.
    refusal(
        ProxyConfig::plain(&redis).credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD"),
        redis.tls_url().replacen("rediss://", "redis://", 1),
        "use a rediss:// URL",
    );
    // rediss:// to the plain port: Redis 7.0 answers nothing to the TLS hello's bytes, so the
    // handshake times out. (A server that answers with an error line, which is not a TLS
    // record, gets the same advice: `tls::tests`.)
    refusal(
        ProxyConfig::tls(&redis, &certs.ca)
            .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD")
            .extra("[timeouts]\ntls_handshake = \"1s\"\n"),
        redis.url().replacen("redis://", "rediss://", 1),
        "use a redis:// URL",
    );
}

/// A server at its `maxclients` answers a new connection `-ERR max number of clients reached`
/// and closes it: the server turning connections away, not a refused credential. The client
/// hears the server's reason, no authentication failure is counted (the alert on those would
/// send someone after the credential), and once a place is free the proxy connects.
#[test]
fn a_server_at_its_client_limit_is_not_an_authentication_failure() {
    let password = random_token(32);
    let redis = RedisServer::start(
        RedisOptions::new()
            .config("maxclients", "3")
            .user(&format!("{APP_USER} on >{password} ~* &* +@all")),
    );
    // The test's own connections take every place.
    let mut held = Vec::new();
    let mut full = false;
    for _ in 0..10 {
        let mut c = RespConn::connect(redis.addr());
        match c.cmd(&["AUTH", APP_USER, &password]) {
            Frame::Error(e) if e.contains("max number of clients reached") => {
                full = true;
                break;
            }
            reply => {
                reply.assert_ok();
                held.push(c);
            }
        }
    }
    assert!(full, "the server never reached its client limit");

    let config = ProxyConfig::plain(&redis)
        .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD")
        .extra("[pool]\nwarm = 1\n");
    let proxy = Proxy::start(&config.to_toml(), &[("TEST_UPSTREAM_PASSWORD", &password)]);
    // What a client of `proxy` is told: the server's own reason.
    let told_the_server_is_full = |c: &mut RespConn| {
        let text = c
            .cmd(&["PING"])
            .assert_error("ERR rotaproxy: upstream unavailable")
            .to_string();
        assert!(
            text.contains("refused the connection: ERR max number of clients reached"),
            "{text}"
        );
        assert!(!text.contains("credential"), "{text}");
    };
    let mut c = proxy.conn();
    told_the_server_is_full(&mut c);
    assert!(
        proxy
            .metric("rotaproxy_upstream_connect_failures_total{stage=\"connect\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(
        proxy
            .metric("rotaproxy_upstream_auth_failures_total")
            .unwrap_or(0.0),
        0.0
    );

    // Without a credential the server's reason answers CLIENT ID, the handshake's first
    // command then: the same.
    let anonymous = Proxy::start(&ProxyConfig::plain(&redis).to_toml(), &[]);
    told_the_server_is_full(&mut anonymous.conn());
    drop(anonymous);

    // A place frees up: the same client's next command gets through.
    held.pop();
    assert_eventually(Duration::from_secs(30), "a PING through the proxy", || {
        c.cmd(&["PING"]) == Frame::simple("PONG")
    });
    assert_eq!(
        proxy
            .metric("rotaproxy_upstream_auth_failures_total")
            .unwrap_or(0.0),
        0.0
    );
    assert_no_secret_in_logs(&proxy, &[&password]);
}

#[test]
fn upstream_mutual_tls() {
    let (_dir, certs, password, redis) = tls_redis(true);
    let config = ProxyConfig::tls(&redis, &certs.ca)
        .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD")
        .client_cert(&certs.client);
    let proxy = Proxy::start(&config.to_toml(), &[("TEST_UPSTREAM_PASSWORD", &password)]);
    let mut c = proxy.conn();
    c.cmd(&["SET", "over", "mtls"]).assert_ok();
    c.cmd(&["GET", "over"]).assert_bulk("mtls");
    let (status, _) = proxy.http_get("/readyz");
    assert_eq!(status, 200);

    // Without the client certificate the server refuses the handshake, and the client is told.
    let config = ProxyConfig::tls(&redis, &certs.ca)
        .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD");
    let without = Proxy::start(&config.to_toml(), &[("TEST_UPSTREAM_PASSWORD", &password)]);
    without
        .conn()
        .cmd(&["PING"])
        .assert_error("ERR rotaproxy: upstream unavailable");
    assert_no_secret_in_logs(&proxy, &[&password]);
    assert_no_secret_in_logs(&without, &[&password]);
}

/// The proxy reads TLS itself (`net::poll_read_tls`), on both sides: everything the plain tests
/// push through must come through TLS unchanged, whatever way records split across reads, and
/// every way a TLS session ends must end the session as it should.
#[test]
fn tls_on_both_sides_carries_what_plain_tcp_does() {
    let (_dir, certs, password, redis) = tls_redis(false);
    let mut config = ProxyConfig::tls(&redis, &certs.ca)
        .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD");
    config.listener_extra = format!(
        "tls = {{ cert = {}, key = {} }}",
        toml_path(&certs.server.cert),
        toml_path(&certs.server.key)
    );
    let proxy = Proxy::start(&config.to_toml(), &[("TEST_UPSTREAM_PASSWORD", &password)]);
    let env = Env {
        redis,
        proxy,
        password,
    };
    let conn = || RespConn::connect_tls(env.proxy.client_addr(), &certs.ca);
    let mut c = conn();

    // 16 MB each way: a thousand records, cut anywhere by the reads.
    let value: Vec<u8> = (0..16 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    c.cmd(&[&b"SET"[..], b"big", &value]).assert_ok();
    assert!(
        c.cmd(&["GET", "big"]) == Frame::Bulk(value),
        "value differs"
    );

    // Ten thousand pipelined commands: many replies to a record, many records to a read.
    let mut batch = Vec::new();
    for i in 0..10_000 {
        batch.extend(encode_cmd(&["ECHO", &format!("m{i}")]));
    }
    c.send_raw(&batch);
    for i in 0..10_000 {
        c.read_reply().assert_bulk(format!("m{i}"));
    }

    // Pushes of every size, in order. Five at a time: a subscriber further behind is held
    // back, and losing its connection below would then close it, as Redis would.
    let mut sub = conn();
    sub.cmd(&["SUBSCRIBE", "events"]).assert_not_error();
    let mut publisher = env.redis.admin_conn();
    let message = |i: usize| "x".repeat(i * 97 % 40_000);
    for group in (0..300).collect::<Vec<_>>().chunks(5) {
        for &i in group {
            publisher
                .cmd(&["PUBLISH", "events", &message(i)])
                .assert_int(1);
        }
        for &i in group {
            assert_eq!(
                sub.read_reply(),
                Frame::Array(vec![
                    Frame::bulk("message"),
                    Frame::bulk("events"),
                    Frame::bulk(message(i))
                ]),
                "message {i}"
            );
        }
    }

    // Redis ending the upstream TLS sessions: noticed, and replaced unseen.
    c.cmd(&["SELECT", "2"]).assert_ok();
    c.cmd(&["SET", "before", "1"]).assert_ok();
    assert!(env.redis.kill_connections_of(APP_USER) >= 2);
    c.cmd(&["GET", "before"]).assert_bulk("1");
    assert_resubscribed(&env, &mut sub, "events");

    // Clients ending their TLS sessions, cleanly (close_notify) or not (TCP alone): each is
    // closed, and the proxy keeps serving the others.
    let connections = || env.proxy.metric("rotaproxy_client_connections");
    assert_eq!(connections(), Some(2.0));
    let mut clean = conn();
    clean.cmd(&["PING"]).assert_simple("PONG");
    clean.send_close_notify();
    let mut abrupt = conn();
    abrupt.cmd(&["PING"]).assert_simple("PONG");
    drop(abrupt);
    assert_eventually(Duration::from_secs(10), "both sessions ended", || {
        connections() == Some(2.0)
    });
    clean.expect_closed(Duration::from_secs(10));

    // A record that does not decrypt (forged, or cut by a middlebox): that client alone is
    // closed (after rustls's alert), as after any other protocol fault.
    let mut forger = conn();
    forger.cmd(&["PING"]).assert_simple("PONG");
    let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    record.extend((0..0x40u8).map(|i| i.wrapping_mul(37)));
    let mut tcp = forger.tcp().try_clone().expect("clone");
    tcp.write_all(&record).expect("write the forged record");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut tcp, &mut rest).expect("the proxy closes the connection");
    assert_eventually(
        Duration::from_secs(10),
        "the forger's session ended",
        || connections() == Some(2.0),
    );
    let line = env
        .proxy
        .wait_for_log("closing client after a TLS error", Duration::from_secs(10));
    assert!(line.contains("decrypt"), "the cause is named: {line}");
    c.cmd(&["GET", "before"]).assert_bulk("1");
    env.assert_no_secret_leaked();
}

#[test]
fn wrong_upstream_password_is_reported_without_the_password() {
    let password = random_token(32);
    let redis = RedisServer::start_with_user(APP_USER, &password);
    let config =
        ProxyConfig::plain(&redis).credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD");
    let proxy = Proxy::start(
        &config.to_toml(),
        &[("TEST_UPSTREAM_PASSWORD", "not-the-password-xyz")],
    );
    let text = proxy.conn().cmd(&["PING"]).assert_error("ERR").to_string();
    assert!(text.contains("WRONGPASS"), "{text}");
    assert_eventually(Duration::from_secs(10), "auth failures counted", || {
        proxy
            .metric("rotaproxy_upstream_auth_failures_total")
            .unwrap_or(0.0)
            >= 1.0
    });
    assert_no_secret_in_logs(&proxy, &["not-the-password-xyz", &password]);
}

#[test]
fn upstream_restart_is_invisible_to_idle_clients() {
    let mut env = Env::start();
    let mut c = env.conn();
    c.cmd(&["SELECT", "2"]).assert_ok();
    c.cmd(&["CLIENT", "SETNAME", "keeper"]).assert_ok();
    c.cmd(&["SET", "before", "1"]).assert_ok();
    let mut sub = env.conn();
    sub.cmd(&["SUBSCRIBE", "events"]).assert_not_error();

    env.redis.restart();

    // The next command succeeds, in the same db, with the same name.
    c.cmd(&["SET", "after", "2"]).assert_ok();
    c.cmd(&["CLIENT", "GETNAME"]).assert_bulk("keeper");
    let mut admin = env.redis.admin_conn();
    admin.cmd(&["SELECT", "2"]).assert_ok();
    admin.cmd(&["GET", "after"]).assert_bulk("2");
    // The subscriber was re-subscribed behind its back and still gets messages.
    assert_resubscribed(&env, &mut sub, "events");
    env.assert_no_secret_leaked();
}

#[test]
fn a_command_sent_right_after_the_server_killed_an_idle_connection_is_answered() {
    let env = Env::start();
    let mut c = env.conn();
    c.cmd(&["SELECT", "3"]).assert_ok();
    // Each round the server closes the session's idle connection, and the client's next
    // command follows at once: it must go to a new connection, not into the closed one.
    for round in 0..20 {
        let id = c.cmd(&["CLIENT", "ID"]).as_int().expect("an id");
        // Answered by the server, so the session last read from the upstream.
        c.cmd(&["INCR", "pings"]).assert_int(round + 1);
        let killed = env.redis.admin_cmd(&["CLIENT", "KILL", "USER", APP_USER]);
        assert!(
            killed.as_int().unwrap_or(0) >= 1,
            "round {round}: {killed:?}"
        );
        c.cmd(&["SET", "round", &round.to_string()]).assert_ok();
        c.cmd(&["GET", "round"]).assert_bulk(round.to_string());
        assert_eq!(
            c.cmd(&["CLIENT", "ID"]).as_int(),
            Some(id),
            "the client keeps its id"
        );
    }
    let mut admin = env.redis.admin_conn();
    admin.cmd(&["SELECT", "3"]).assert_ok();
    admin.cmd(&["GET", "round"]).assert_bulk("19");
}

/// Publishes on `channel` until the proxy's (RESP2) subscriber `sub` is subscribed again after
/// losing its connection, and checks the message reaches it.
fn assert_resubscribed(env: &Env, sub: &mut RespConn, channel: &str) {
    assert_eventually(Duration::from_secs(20), "subscriber restored", || {
        env.redis.admin_cmd(&["PUBLISH", channel, "e1"]) == Frame::Integer(1)
    });
    assert_eq!(
        sub.read_reply(),
        Frame::Array(vec![
            Frame::bulk("message"),
            Frame::bulk(channel),
            Frame::bulk("e1")
        ])
    );
}

/// `MULTI`, `SUBSCRIBE a b` and `SET` (in the order given), `EXEC`, two messages, then `PING`:
/// the frames `conn` gets. Redis counts the SUBSCRIBE once in the EXEC array's length but writes
/// a confirmation per channel, so the array's last element is followed by one more frame: the
/// SET's `+OK`, or the second confirmation when the SUBSCRIBE comes last.
fn subscribe_inside_multi_frames(
    env: &Env,
    conn: &mut RespConn,
    protocol: &str,
    subscribe_first: bool,
) -> Vec<Frame> {
    if protocol == "3" {
        conn.cmd(&["HELLO", "3"]).assert_not_error();
    }
    let subscribe = &["SUBSCRIBE", "tx-a", "tx-b"][..];
    let set = &["SET", "tx-key", "1"][..];
    let (first, second) = if subscribe_first {
        (subscribe, set)
    } else {
        (set, subscribe)
    };
    for cmd in [&["MULTI"][..], first, second, &["EXEC"]] {
        conn.send_cmd(cmd);
    }
    let mut frames = conn.read_replies(5);
    env.redis
        .admin_cmd(&["PUBLISH", "tx-a", "hi"])
        .assert_int(1);
    env.redis
        .admin_cmd(&["PUBLISH", "tx-b", "yo"])
        .assert_int(1);
    conn.send_cmd(&["PING"]);
    frames.extend(conn.read_replies(3));
    frames
}

#[test]
fn subscribe_inside_multi_reads_exactly_as_from_redis() {
    let env = Env::start();
    for (protocol, subscribe_first) in [("2", true), ("2", false), ("3", true), ("3", false)] {
        let case = format!("RESP{protocol}, SUBSCRIBE first: {subscribe_first}");
        let direct = {
            let mut conn = env.redis.admin_conn();
            subscribe_inside_multi_frames(&env, &mut conn, protocol, subscribe_first)
        };
        // The direct subscriber is gone before the proxied one subscribes.
        assert_eventually(Duration::from_secs(10), "direct subscriber gone", || {
            env.redis
                .admin_cmd(&["PUBSUB", "NUMSUB", "tx-a"])
                .as_array()
                .unwrap()[1]
                == Frame::Integer(0)
        });
        let mut conn = env.conn();
        let proxied = subscribe_inside_multi_frames(&env, &mut conn, protocol, subscribe_first);
        assert_eq!(proxied, direct, "{case}");
        let after_array = if subscribe_first {
            Frame::simple("OK")
        } else {
            let confirmation = vec![
                Frame::bulk("subscribe"),
                Frame::bulk("tx-b"),
                Frame::Integer(2),
            ];
            if protocol == "3" {
                Frame::Push(confirmation)
            } else {
                Frame::Array(confirmation)
            }
        };
        assert_eq!(proxied[4], after_array, "{case}: {proxied:?}");
        // Nothing more: no frame was invented or held back.
        conn.cmd(&["UNSUBSCRIBE"]);
        conn.read_reply();
        conn.cmd(&["ECHO", "end"]).assert_bulk("end");
        // A reply the proxy makes itself waits for every reply owed before it: it arrives only
        // if the proxy counted the EXEC's frames right.
        conn.cmd(&["AUTH", "any-password"]).assert_ok();
    }
    assert!(
        !env.proxy.log_contains("nobody asked for"),
        "the proxy lost count of replies"
    );
    env.assert_no_secret_leaked();
}

/// Runs `transactions` on `conn`, each followed by `ECHO <marker>`, and returns every frame read
/// up to each marker's answer (a bulk, or an error while RESP2 subscribed mode refuses ECHO).
fn frames_of_transactions(conn: &mut RespConn, transactions: &[Vec<Vec<String>>]) -> Vec<Frame> {
    let mut frames = Vec::new();
    for (i, transaction) in transactions.iter().enumerate() {
        let marker = format!("end-of-{i}");
        conn.send_cmd(&["MULTI"]);
        for cmd in transaction {
            conn.send_cmd(cmd);
        }
        conn.send_cmd(&["EXEC"]);
        conn.send_cmd(&["ECHO", &marker]);
        loop {
            let frame = conn.try_read_reply().unwrap_or_else(|e| {
                panic!(
                    "transaction {i} {transaction:?}: {e}; read so far: {:?}",
                    &frames[frames.len().saturating_sub(8)..]
                )
            });
            let end = frame == Frame::bulk(&marker)
                || (frame.is_error() && frame.as_str().is_some_and(|e| e.contains("'echo'")));
            frames.push(frame);
            if end {
                break;
            }
            assert!(frames.len() < 10_000, "no end to transaction {i}");
        }
    }
    frames
}

/// A small fixed-seed generator: the same "random" transactions on every run.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    /// Up to `most` names from `prefix0` .. `prefix3`, repeats allowed.
    fn names(&mut self, prefix: &str, most: u64) -> Vec<String> {
        (0..self.below(most + 1))
            .map(|_| format!("{prefix}{}", self.below(4)))
            .collect()
    }
}

#[test]
fn random_transactions_that_subscribe_read_as_from_redis() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut transactions = Vec::new();
    for _ in 0..40 {
        let mut transaction = Vec::new();
        for _ in 0..1 + rng.below(4) {
            let (name, args) = match rng.below(7) {
                0 | 1 => ("SUBSCRIBE", {
                    let mut channels = rng.names("ch", 3);
                    if channels.is_empty() {
                        channels.push("ch0".into());
                    }
                    channels
                }),
                2 => ("UNSUBSCRIBE", rng.names("ch", 2)),
                3 => ("PSUBSCRIBE", vec![format!("p{}*", rng.below(3))]),
                4 => (
                    "PUNSUBSCRIBE",
                    rng.names("p", 1).iter().map(|p| format!("{p}*")).collect(),
                ),
                5 => ("SET", vec![format!("k{}", rng.below(3)), "v".into()]),
                _ => ("PING", Vec::new()),
            };
            let mut cmd = vec![name.to_string()];
            cmd.extend(args);
            transaction.push(cmd);
        }
        transactions.push(transaction);
    }
    let env = Env::start();
    for protocol in ["2", "3"] {
        let direct = {
            let mut conn = env.redis.admin_conn();
            conn.cmd(&["HELLO", protocol]).assert_not_error();
            frames_of_transactions(&mut conn, &transactions)
        };
        let mut conn = env.conn();
        conn.cmd(&["HELLO", protocol]).assert_not_error();
        let proxied = frames_of_transactions(&mut conn, &transactions);
        assert_eq!(proxied.len(), direct.len(), "RESP{protocol}");
        for (i, (p, d)) in proxied.iter().zip(&direct).enumerate() {
            assert_eq!(p, d, "RESP{protocol}, frame {i}");
        }
        // The proxy still knows which replies are owed: one it makes itself comes next (QUIT:
        // a subscribed RESP2 connection would refuse AUTH).
        conn.cmd(&["QUIT"]).assert_ok();
    }
    assert!(
        !env.proxy.log_contains("nobody asked for"),
        "the proxy lost count of replies"
    );
    env.assert_no_secret_leaked();
}

#[test]
fn a_multi_pipelined_behind_a_subscribing_exec_reads_as_from_redis() {
    // Under RESP2 the EXEC subscribes, so Redis refuses the MULTI that follows and runs the
    // next SUBSCRIBE at once: one confirmation per channel, not a QUEUED. All of it is sent
    // before the EXEC's reply could arrive.
    let commands: [&[&str]; 8] = [
        &["MULTI"],
        &["SUBSCRIBE", "tx-p"],
        &["EXEC"],
        &["MULTI"],
        &["SUBSCRIBE", "tx-q", "tx-r"],
        &["PING"],
        &["UNSUBSCRIBE"],
        &["PING"],
    ];
    let pipeline: Vec<u8> = commands.iter().flat_map(|c| encode_cmd(c)).collect();
    let env = Env::start();
    let mut direct = env.redis.admin_conn();
    direct.send_raw(&pipeline);
    let expected = direct.read_replies(11);
    assert!(
        expected[3].is_error(),
        "Redis refused the MULTI: {:?}",
        expected[3]
    );
    let mut conn = env.conn();
    conn.set_read_timeout(Some(Duration::from_secs(10)));
    conn.send_raw(&pipeline);
    for (i, want) in expected.iter().enumerate() {
        let got = conn
            .try_read_reply()
            .unwrap_or_else(|e| panic!("frame {i}: {e}"));
        assert_eq!(&got, want, "frame {i}");
    }
    // The proxy still knows which replies are owed: one it makes itself comes next.
    conn.cmd(&["AUTH", "any-password"]).assert_ok();
    assert!(
        !env.proxy.log_contains("nobody asked for"),
        "the proxy lost count of replies"
    );
    env.assert_no_secret_leaked();
}

#[test]
fn a_subscription_made_inside_multi_survives_a_lost_connection() {
    let env = Env::start();
    let mut sub = env.conn();
    sub.cmd(&["MULTI"]).assert_ok();
    sub.cmd(&["SUBSCRIBE", "tx-events"]).assert_simple("QUEUED");
    sub.cmd(&["EXEC"]).assert_not_error();
    kill_upstream_connection_of(&env, "exec");
    // The proxy re-subscribed on a fresh connection at once: the subscriber misses nothing
    // published from then on.
    assert_resubscribed(&env, &mut sub, "tx-events");
    env.assert_no_secret_leaked();
}

// ---- client-side caching (CLIENT TRACKING) across lost connections ---------------------------

/// A RESP2 client-side cache as clients build it: `target` subscribes to the invalidation
/// channel, `tracker` redirects its invalidations there and reads `key`. Returns
/// (target's id, tracker's id), as `CLIENT ID` gave them.
fn redirected_tracking(env: &Env, key: &str) -> (RespConn, RespConn, i64, i64) {
    let mut target = env.conn();
    target.set_read_timeout(Some(Duration::from_secs(30)));
    let target_id = target.client_id();
    target.cmd(&["SUBSCRIBE", INVALIDATION_CHANNEL]);
    let mut tracker = env.conn();
    let tracker_id = tracker.client_id();
    tracker.redirect_tracking_to(target_id);
    tracker.cmd(&["GET", key]).assert_null();
    // The redirect works before anything moves.
    env.redis.admin_cmd(&["SET", key, "0"]).assert_ok();
    assert_eq!(target.read_reply(), invalidation_message(Some(&[key])));
    (target, tracker, target_id, tracker_id)
}

/// After a move, the target's client is told to flush, and invalidations reach it again: the
/// tracker reads `key` (a client does after a flush), a write elsewhere invalidates it.
fn assert_invalidations_flow_after_a_flush(
    env: &Env,
    target: &mut RespConn,
    tracker: &mut RespConn,
    key: &str,
) {
    assert_eq!(
        target.read_reply(),
        invalidation_message(None),
        "the target's client is told to flush its cache"
    );
    tracker.cmd(&["GET", key]).assert_not_error();
    env.redis.admin_cmd(&["INCR", key]).assert_not_error();
    assert_eq!(target.read_reply(), invalidation_message(Some(&[key])));
}

#[test]
fn a_tracking_redirect_follows_its_target_to_a_new_connection() {
    let env = Env::start();
    let (mut target, mut tracker, target_id, _) = redirected_tracking(&env, "trk-a");
    // The target's connection goes: the session restores its subscription on a fresh one with
    // another server-side id, and the tracker's redirect must follow it.
    kill_upstream_connection(&env, &target_id.to_string());
    assert_invalidations_flow_after_a_flush(&env, &mut target, &mut tracker, "trk-a");
    tracker.cmd(&["CLIENT", "GETREDIR"]).assert_int(target_id);
    // The target keeps the id it was given; a redirect to it reaches its new connection.
    let mut other = env.conn();
    other.cmd(&["CLIENT", "GETREDIR"]).assert_int(-1);
    other.redirect_tracking_to(target_id);
    other.cmd(&["GET", "trk-b"]).assert_null();
    env.redis.admin_cmd(&["SET", "trk-b", "1"]).assert_ok();
    assert_eq!(target.read_reply(), invalidation_message(Some(&["trk-b"])));
    env.assert_no_secret_leaked();
}

#[test]
fn a_tracking_client_that_moved_redirects_to_its_target_again() {
    let env = Env::start();
    let (mut target, mut tracker, target_id, tracker_id) = redirected_tracking(&env, "trk-c");
    // The tracker's new connection starts with an empty tracking table, so the target's client
    // must flush what it cached through the old one.
    kill_upstream_connection(&env, &tracker_id.to_string());
    assert_invalidations_flow_after_a_flush(&env, &mut target, &mut tracker, "trk-c");
    tracker.cmd(&["CLIENT", "ID"]).assert_int(tracker_id);
    // Both move, the target first: the tracker's replay must point at the target's connection
    // of now, not at the id the client gave.
    kill_upstream_connection(&env, &target_id.to_string());
    assert_invalidations_flow_after_a_flush(&env, &mut target, &mut tracker, "trk-c");
    let tracker_upstream = env
        .redis
        .client_running("get")
        .expect("the tracker's connection");
    kill_upstream_connection(&env, &tracker_upstream);
    assert_invalidations_flow_after_a_flush(&env, &mut target, &mut tracker, "trk-c");
    env.assert_no_secret_leaked();
}

#[test]
fn a_resp3_redirect_target_is_restored_at_once_and_told_to_flush() {
    let env = Env::start();
    // A RESP3 target gets invalidations as pushes without subscribing to anything.
    let mut target = env.conn();
    target.set_read_timeout(Some(Duration::from_secs(30)));
    target.cmd(&["HELLO", "3"]).assert_not_error();
    let target_id = target.client_id();
    let mut tracker = env.conn();
    tracker.redirect_tracking_to(target_id);
    tracker.cmd(&["GET", "trk-r3"]).assert_null();
    // The target sends nothing after losing its connection: it must not wait for a command
    // to get a new one, or the tracker's invalidations go nowhere meanwhile.
    kill_upstream_connection(&env, &target_id.to_string());
    let push = |keys: Frame| Frame::Push(vec![Frame::bulk("invalidate"), keys]);
    assert_eq!(target.read_reply(), push(Frame::Null), "told to flush");
    tracker.cmd(&["GET", "trk-r3"]).assert_null();
    env.redis.admin_cmd(&["SET", "trk-r3", "1"]).assert_ok();
    assert_eq!(target.read_reply(), push(Frame::bulks(&["trk-r3"])));
    env.assert_no_secret_leaked();
}

#[test]
fn a_broadcast_redirect_keeps_its_prefixes_when_it_follows_its_target() {
    let env = Env::start();
    let mut target = env.conn();
    target.set_read_timeout(Some(Duration::from_secs(30)));
    let target_id = target.client_id();
    target.cmd(&["SUBSCRIBE", INVALIDATION_CHANNEL]);
    let mut tracker = env.conn();
    let on = [
        "CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", "bc:", "REDIRECT",
    ];
    let mut on = on.map(String::from).to_vec();
    on.push(target_id.to_string());
    tracker.cmd(&on).assert_ok();
    kill_upstream_connection(&env, &target_id.to_string());
    assert_eq!(target.read_reply(), invalidation_message(None));
    // Still broadcast for the prefix only: a key outside it says nothing.
    env.redis.admin_cmd(&["SET", "other", "1"]).assert_ok();
    env.redis.admin_cmd(&["SET", "bc:1", "1"]).assert_ok();
    assert_eq!(target.read_reply(), invalidation_message(Some(&["bc:1"])));
    env.assert_no_secret_leaked();
}

#[test]
fn a_redirect_targets_connection_serves_nobody_else() {
    let env = Env::start();
    let mut target = env.conn();
    let target_id = target.client_id();
    let mut tracker = env.conn();
    tracker.redirect_tracking_to(target_id);
    // The target leaves with its connection in a clean state, which would otherwise go back to
    // the pool, and the tracker's invalidations with it, to whoever took it next.
    drop(target);
    let id = target_id.to_string();
    assert_eventually(Duration::from_secs(20), "the connection closed", || {
        !env.redis
            .client_list()
            .iter()
            .any(|c| c.get("id") == Some(&id))
    });
    env.assert_no_secret_leaked();
}

#[test]
fn client_kill_id_disconnects_a_client_of_the_proxy() {
    let env = Env::start();
    let mut victim = env.conn();
    victim.set_read_timeout(Some(Duration::from_secs(30)));
    let victim_id = victim.client_id();
    // It moved once (its id stays), and waits in a blocking command when it is killed.
    kill_upstream_connection(&env, &victim_id.to_string());
    victim.send_cmd(&["BLPOP", "kill-list", "0"]);
    let mut killer = env.conn();
    let killer_id = killer.client_id();
    assert_eventually(Duration::from_secs(20), "the BLPOP waits", || {
        env.redis.client_running("blpop").is_some()
    });
    killer
        .cmd(&["CLIENT", "KILL", "ID", &victim_id.to_string()])
        .assert_int(1);
    let err = victim
        .try_read_reply()
        .expect_err("the killed client is disconnected");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        ),
        "{err}"
    );
    // As on Redis, SKIPME is yes by default: a client does not kill itself.
    killer
        .cmd(&["CLIENT", "KILL", "ID", &killer_id.to_string()])
        .assert_int(0);
    killer.cmd(&["PING"]).assert_simple("PONG");
    assert_eventually(Duration::from_secs(20), "the BLPOP is gone", || {
        env.redis.client_running("blpop").is_none()
    });
    env.assert_no_secret_leaked();
}

#[test]
fn resp3_tracking_flushes_the_client_cache_after_a_lost_connection() {
    let env = Env::start();
    let mut c = env.conn();
    c.set_read_timeout(Some(Duration::from_secs(30)));
    c.cmd(&["HELLO", "3"]).assert_not_error();
    let id = c.client_id();
    c.cmd(&["CLIENT", "TRACKING", "ON"]).assert_ok();
    c.cmd(&["GET", "trk-d"]).assert_null();
    kill_upstream_connection(&env, &id.to_string());
    let flush = Frame::Push(vec![Frame::bulk("invalidate"), Frame::Null]);
    assert_eq!(c.read_reply(), flush, "the cache is flushed");
    // Tracking is on again on the new connection.
    c.cmd(&["GET", "trk-d"]).assert_null();
    env.redis.admin_cmd(&["SET", "trk-d", "1"]).assert_ok();
    assert_eq!(
        c.read_reply(),
        Frame::Push(vec![Frame::bulk("invalidate"), Frame::bulks(&["trk-d"])])
    );
    c.cmd(&["CLIENT", "ID"]).assert_int(id);
    env.assert_no_secret_leaked();
}

#[test]
fn client_unblock_reaches_a_session_that_moved() {
    let env = Env::start();
    let mut blocked = env.conn();
    blocked.set_read_timeout(Some(Duration::from_secs(30)));
    let id = blocked.client_id();
    kill_upstream_connection(&env, &id.to_string());
    blocked.send_cmd(&["BLPOP", "unblock-list", "0"]);
    let mut other = env.conn();
    // The session now blocks on a connection with another server-side id; the id it was given
    // still reaches it.
    assert_eventually(Duration::from_secs(20), "CLIENT UNBLOCK found it", || {
        other.cmd(&["CLIENT", "UNBLOCK", &id.to_string()]) == Frame::Integer(1)
    });
    blocked.read_reply().assert_null();
    blocked.cmd(&["CLIENT", "ID"]).assert_int(id);
    env.assert_no_secret_leaked();
}

/// A connection pool keeps many connections open and mostly idle, so what an idle client costs
/// the proxy is most of what the proxy costs. A session holds read buffers only while it holds
/// bytes: clients that each moved a large value and went idle again leave the proxy's memory
/// where it was (with buffers kept per session, 56 KiB more per client: benches/memory.py).
#[test]
fn clients_idle_after_large_transfers_hold_no_buffers() {
    let env = Env::start();
    let clients = 200;
    let mut conns: Vec<RespConn> = (0..clients).map(|_| env.conn()).collect();
    for c in &mut conns {
        c.cmd(&["PING"]).assert_simple("PONG");
    }
    let idle_kib = env.proxy.vm_rss_kib();
    // One client at a time, so the transfers never need more than a buffer or two at once.
    let value = "v".repeat(100 * 1024);
    for (i, c) in conns.iter_mut().enumerate() {
        let key = format!("big:{i}");
        c.cmd(&["SET", &key, &value]).assert_ok();
        assert_eq!(c.cmd(&["GET", &key]), Frame::bulk(&value), "client {i}");
    }
    let growth_kib = env.proxy.vm_rss_kib().saturating_sub(idle_kib);
    assert!(
        growth_kib < 16 * clients as u64,
        "{growth_kib} KiB more after {clients} idle clients each moved 200 KiB"
    );
    for c in &mut conns {
        c.cmd(&["PING"]).assert_simple("PONG");
    }
    env.assert_no_secret_leaked();
}

#[test]
fn a_client_that_does_not_read_is_held_back_not_buffered() {
    let env = Env::start();
    let value = "v".repeat(64 * 1024);
    env.redis.admin_cmd(&["SET", "v", &value]).assert_ok();
    let mut c = env.conn();
    c.set_read_timeout(Some(Duration::from_secs(60)));
    // 128 MiB of replies asked for, none read yet.
    let n = 2000;
    let mut pipeline = Vec::new();
    for _ in 0..n {
        pipeline.extend_from_slice(&encode_cmd(&["GET", "v"]));
    }
    c.send_raw(&pipeline);
    // The proxy stops reading once its bounded buffer is full: the rest waits in Redis, whose
    // output buffer for the proxy's connection settles (no longer drains) well above zero.
    let omem = || {
        env.redis
            .client_list()
            .iter()
            .filter_map(|cl| cl.get("omem").and_then(|m| m.parse::<u64>().ok()))
            .max()
            .unwrap_or(0)
    };
    let mut last = omem();
    assert_eventually(
        Duration::from_secs(30),
        "Redis's output buffer settles",
        || {
            std::thread::sleep(Duration::from_millis(200));
            let now = omem();
            std::mem::replace(&mut last, now) == now && now > 0
        },
    );
    assert!(
        last > 64 * 1024 * 1024,
        "only {last} bytes held back in Redis"
    );
    let rss_mib = env.proxy.vm_rss_kib() / 1024;
    assert!(
        rss_mib < 64,
        "proxy memory {rss_mib} MiB while holding back"
    );
    // Every reply then arrives, whole and in order.
    for i in 0..n {
        assert_eq!(c.read_reply(), Frame::bulk(&value), "reply {i}");
    }
    c.cmd(&["PING"]).assert_simple("PONG");
    let hwm_mib = env.proxy.vm_hwm_kib() / 1024;
    assert!(hwm_mib < 64, "proxy peak memory {hwm_mib} MiB");
    env.assert_no_secret_leaked();
}

#[test]
fn an_upstream_lost_in_the_middle_of_a_reply_closes_only_that_client() {
    let mut env = Env::start();
    // Far more than the socket buffers between Redis and the proxy hold: most of it is still
    // in Redis's output buffer when Redis dies.
    let size = 64 * 1024 * 1024;
    env.redis
        .admin_cmd(&["SET", "big", &"x".repeat(size)])
        .assert_ok();
    let mut other = env.conn();
    other.cmd(&["SET", "k", "v"]).assert_ok();

    // The reader takes a little of the reply, then stops reading: the proxy is mid-reply.
    let mut reader = env.conn();
    reader.set_read_timeout(Some(Duration::from_secs(30)));
    reader.send_cmd(&["GET", "big"]);
    let mut got = Vec::new();
    while got.len() < 64 * 1024 {
        let chunk = reader.read_raw().expect("reply bytes");
        assert!(!chunk.is_empty(), "closed after {} bytes", got.len());
        got.extend_from_slice(&chunk);
    }
    env.redis.stop();

    // It gets the rest of what the proxy had, then the connection closes: a truncated reply
    // and a disconnect, never an error text spliced into the middle of the value.
    let mut total = got.len();
    let header = format!("${size}\r\n");
    assert!(got.starts_with(header.as_bytes()));
    let mut tail_ok = got[header.len()..].iter().all(|&b| b == b'x');
    loop {
        let chunk = reader
            .read_raw()
            .expect("the proxy closes, it does not stall");
        if chunk.is_empty() {
            break;
        }
        tail_ok &= chunk.iter().all(|&b| b == b'x');
        total += chunk.len();
    }
    assert!(tail_ok, "something other than the value's bytes was sent");
    assert!(
        total < header.len() + size + 2,
        "the whole value arrived: {total} bytes"
    );
    env.proxy
        .wait_for_log("in the middle of a reply", Duration::from_secs(10));

    // Another client, idle meanwhile, carries on once Redis is back.
    env.redis.start_again();
    other.cmd(&["PING"]).assert_simple("PONG");
    env.assert_no_secret_leaked();
}

#[test]
fn huge_replies_and_values_stream_through() {
    let env = Env::start();
    // A 1M-element list, loaded straight into Redis.
    let mut admin = env.redis.admin_conn();
    let mut loaded = 0;
    while loaded < 1_000_000 {
        let mut args = vec!["RPUSH".to_string(), "biglist".to_string()];
        args.extend((loaded..loaded + 10_000).map(|i| format!("{i:07}")));
        admin.send_cmd(&args);
        loaded += 10_000;
    }
    for _ in 0..100 {
        admin.read_reply().assert_not_error();
    }
    let scanned_before = env
        .proxy
        .metric("rotaproxy_scanned_bytes_total")
        .unwrap_or(0.0);

    // Through the proxy: read the LRANGE reply as raw bytes and check its exact size.
    let expected_reply_len = "*1000000\r\n".len() + 1_000_000 * "$7\r\n0000000\r\n".len();
    let mut c = env.conn();
    c.send_cmd(&["LRANGE", "biglist", "0", "-1"]);
    let mut got = 0usize;
    let mut head = Vec::new();
    while got < expected_reply_len {
        let chunk = c.read_raw().expect("reply bytes");
        assert!(!chunk.is_empty(), "closed after {got} bytes");
        if head.len() < 32 {
            head.extend_from_slice(&chunk[..chunk.len().min(32)]);
        }
        got += chunk.len();
    }
    assert_eq!(got, expected_reply_len);
    assert!(head.starts_with(b"*1000000\r\n$7\r\n0000000\r\n"));
    c.cmd(&["PING"]).assert_simple("PONG");

    // A 200 MB value, sent and read back through the proxy.
    let size = 200 * 1024 * 1024;
    let mut raw = TcpStream::connect(env.proxy.client_addr()).unwrap();
    raw.write_all(format!("*3\r\n$3\r\nSET\r\n$4\r\nhuge\r\n${size}\r\n").as_bytes())
        .unwrap();
    let chunk = vec![b'x'; 1024 * 1024];
    for _ in 0..200 {
        raw.write_all(&chunk).unwrap();
    }
    raw.write_all(b"\r\n").unwrap();
    let mut c = RespConn::connect(env.proxy.client_addr());
    drop(raw_reply(&mut raw));
    c.cmd(&["STRLEN", "huge"]).assert_int(size as i64);
    c.send_cmd(&["GET", "huge"]);
    let expected = format!("${size}\r\n").len() + size + 2;
    let mut got = 0usize;
    while got < expected {
        let chunk = c.read_raw().expect("value bytes");
        assert!(!chunk.is_empty(), "closed after {got} bytes");
        got += chunk.len();
    }
    assert_eq!(got, expected);

    // Memory stays far below the value's size: nothing was buffered whole.
    let hwm_mib = env.proxy.vm_hwm_kib() / 1024;
    assert!(hwm_mib < 64, "proxy peak memory {hwm_mib} MiB");
    // Every byte was scanned about once: the cost is linear in the traffic.
    let traffic = (expected_reply_len + expected + size) as f64;
    let scanned = env
        .proxy
        .metric("rotaproxy_scanned_bytes_total")
        .unwrap_or(0.0)
        - scanned_before;
    assert!(scanned >= traffic, "scanned {scanned} < traffic {traffic}");
    assert!(
        scanned < traffic * 1.01 + 1e6,
        "scanned {scanned} for {traffic} bytes"
    );
    env.assert_no_secret_leaked();
}

/// Reads the `+OK` of the streamed SET on a plain socket.
fn raw_reply(stream: &mut TcpStream) -> Vec<u8> {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; 5];
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"+OK\r\n");
    buf.to_vec()
}

/// Kills the upstream connection the proxy uses for the client whose last command was `cmd`,
/// and waits until the proxy has noticed.
fn kill_upstream_connection_of(env: &Env, cmd: &str) {
    let id = env
        .redis
        .client_running(cmd)
        .unwrap_or_else(|| panic!("no upstream connection ran {cmd}"));
    kill_upstream_connection(env, &id);
}

/// Kills the upstream connection with server-side id `id`; returns once the proxy noticed.
fn kill_upstream_connection(env: &Env, id: &str) {
    let before = env
        .proxy
        .metric("rotaproxy_upstream_reconnects_total")
        .unwrap_or(0.0);
    env.redis
        .admin_cmd(&["CLIENT", "KILL", "ID", id])
        .assert_int(1);
    assert_eventually(
        Duration::from_secs(10),
        "proxy noticed the lost connection",
        || {
            env.proxy
                .metric("rotaproxy_upstream_reconnects_total")
                .unwrap_or(0.0)
                > before
        },
    );
}

#[test]
fn a_lost_upstream_fails_only_the_commands_in_flight() {
    let env = Env::start();
    let mut c = env.conn();
    c.cmd(&["SELECT", "4"]).assert_ok();
    c.send_cmd(&["BLPOP", "never", "30"]);
    assert_eventually(Duration::from_secs(10), "BLPOP reached Redis", || {
        env.redis
            .client_list()
            .iter()
            .any(|cl| cl.get("cmd").map(String::as_str) == Some("blpop"))
    });
    kill_upstream_connection_of(&env, "blpop");
    c.read_reply()
        .assert_error("ERR rotaproxy: upstream connection lost");
    // The session goes on, in its db, on a fresh connection.
    c.cmd(&["SET", "k", "v"]).assert_ok();
    let mut admin = env.redis.admin_conn();
    admin.cmd(&["SELECT", "4"]).assert_ok();
    admin.cmd(&["GET", "k"]).assert_bulk("v");
    env.assert_no_secret_leaked();
}

#[test]
fn a_watch_on_a_lost_connection_makes_exec_answer_nil() {
    let env = Env::start();
    let mut c = env.conn();
    c.cmd(&["WATCH", "w"]).assert_ok();
    kill_upstream_connection_of(&env, "watch");
    c.cmd(&["MULTI"]).assert_ok();
    c.cmd(&["SET", "w", "mine"]).assert_simple("QUEUED");
    c.cmd(&["EXEC"]).assert_null();
    c.cmd(&["GET", "w"]).assert_null();
    // The next transaction is an ordinary one again.
    c.cmd(&["MULTI"]).assert_ok();
    c.cmd(&["SET", "w", "second"]).assert_simple("QUEUED");
    assert_eq!(c.cmd(&["EXEC"]), Frame::Array(vec![Frame::simple("OK")]));
    env.assert_no_secret_leaked();
}

/// Redis ends a transaction at an EXEC it refuses for its argument count (`-EXECABORT`), and
/// drops the WATCHes with it, inside MULTI or not. Found by the random test (seed 81201): the
/// proxy kept the MULTI open, took the HELLO 3 after it for a queued one, and after a move
/// replayed the session in RESP2.
#[test]
fn an_exec_refused_for_its_arguments_ends_the_transaction_as_on_redis() {
    let env = Env::start();
    let mut c = env.conn();
    c.cmd(&["MULTI"]).assert_ok();
    c.cmd(&["SET", "k", "queued"]).assert_simple("QUEUED");
    c.cmd(&["EXEC", "x"]).assert_error(
        "EXECABORT Transaction discarded because of: wrong number of arguments for 'exec' command",
    );
    let hello = c.cmd(&["HELLO", "3"]);
    assert_eq!(
        hello.map_get("proto"),
        Some(&Frame::Integer(3)),
        "{hello:?}"
    );
    c.cmd(&["GET", "k"]).assert_null();
    // The connection is replaced as it was: in RESP3.
    env.redis.kill_connections_of(APP_USER);
    let info = c.cmd(&["CLIENT", "TRACKINGINFO"]);
    assert!(matches!(info, Frame::Map(_)), "{info:?}");

    // Outside MULTI it still drops the WATCHes: a watched key that changes while the
    // connection is replaced does not abort the next transaction.
    c.cmd(&["WATCH", "k"]).assert_ok();
    c.cmd(&["EXEC", "x"]).assert_error("EXECABORT");
    env.redis.admin_cmd(&["SET", "k", "changed"]).assert_ok();
    env.redis.kill_connections_of(APP_USER);
    c.cmd(&["MULTI"]).assert_ok();
    c.cmd(&["GET", "k"]).assert_simple("QUEUED");
    assert_eq!(c.cmd(&["EXEC"]), Frame::Array(vec![Frame::bulk("changed")]));
    env.assert_no_secret_leaked();
}

#[test]
fn an_open_multi_on_a_lost_connection_never_half_runs() {
    let env = Env::start();
    let mut c = env.conn();
    c.cmd(&["MULTI"]).assert_ok();
    c.cmd(&["SET", "m1", "1"]).assert_simple("QUEUED");
    // While a transaction is open, CLIENT LIST shows the last queued command.
    kill_upstream_connection_of(&env, "set");
    c.cmd(&["SET", "m2", "2"]).assert_simple("QUEUED");
    // Nothing of what follows may run on the new connection, where no MULTI is open.
    c.cmd(&["SELECT", "5"]).assert_simple("QUEUED");
    c.cmd(&["CLIENT", "SETNAME", "lost"])
        .assert_simple("QUEUED");
    c.cmd(&["HELLO", "3"]).assert_simple("QUEUED");
    c.cmd(&["SUBSCRIBE", "c"]).assert_simple("QUEUED");
    c.cmd(&["MULTI"])
        .assert_error("ERR MULTI calls can not be nested");
    c.cmd(&["WATCH", "m1"])
        .assert_error("ERR WATCH inside MULTI is not allowed");
    c.cmd(&["EXEC"]).assert_null();
    assert_eq!(
        c.cmd(&["MGET", "m1", "m2"]),
        Frame::Array(vec![Frame::Null, Frame::Null])
    );
    // Still db 0, RESP2, unnamed, unsubscribed and outside any transaction.
    c.cmd(&["SET", "m3", "3"]).assert_ok();
    env.redis.admin_conn().cmd(&["GET", "m3"]).assert_bulk("3");
    c.cmd(&["CLIENT", "GETNAME"]).assert_null();
    assert_eq!(c.cmd(&["HELLO"]).map_get("proto"), Some(&Frame::Integer(2)));
    c.cmd(&["WATCH", "m1"]).assert_ok();
    c.cmd(&["MULTI"]).assert_ok();
    c.cmd(&["SET", "m1", "1"]).assert_simple("QUEUED");
    assert_eq!(c.cmd(&["EXEC"]), Frame::Array(vec![Frame::simple("OK")]));
    env.assert_no_secret_leaked();
}

#[test]
fn tls_listener_serves_clients() {
    let dir = temp_dir();
    let certs = Certs::generate(dir.path());
    let password = random_token(32);
    let redis = RedisServer::start_with_user(APP_USER, &password);
    let mut config =
        ProxyConfig::plain(&redis).credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD");
    config.listener_extra = format!(
        "tls = {{ cert = {}, key = {} }}",
        toml_path(&certs.server.cert),
        toml_path(&certs.server.key)
    );
    let proxy = Proxy::start(&config.to_toml(), &[("TEST_UPSTREAM_PASSWORD", &password)]);
    let mut c = RespConn::connect_tls(proxy.client_addr(), &certs.ca);
    c.cmd(&["SET", "over", "tls"]).assert_ok();
    c.cmd(&["GET", "over"]).assert_bulk("tls");
    // A plain-text client cannot talk to a TLS listener, and the proxy survives it.
    let mut plain = proxy.conn();
    plain.send_raw(b"PING\r\n");
    let _ = plain.try_read_reply();
    c.cmd(&["PING"]).assert_simple("PONG");
    assert_no_secret_in_logs(&proxy, &[&password]);
}

#[test]
fn limits_on_clients_and_upstream_connections() {
    let env = Env::start_with_extra(
        "max_clients = 2",
        "[pool]\nwarm = 1\nmax = 1\ncheckout_timeout = \"200ms\"\n",
    );
    let mut a = env.conn();
    a.cmd(&["PING"]).assert_simple("PONG");
    // The only upstream connection is a's: b waits briefly, then gets a clear error.
    let mut b = env.conn();
    b.cmd(&["PING"])
        .assert_error("ERR rotaproxy: upstream unavailable: all 1 upstream connections are in use");
    // Over max_clients: refused the way Redis refuses.
    let mut c = env.conn();
    c.read_reply()
        .assert_error("ERR max number of clients reached");
    drop(a);
    assert_eventually(
        Duration::from_secs(10),
        "b gets the freed connection",
        || !b.cmd(&["PING"]).is_error(),
    );
    env.assert_no_secret_leaked();
}

#[test]
fn shutdown_delivers_the_replies_in_flight_before_closing() {
    let mut env = Env::start();
    let mut idle = env.conn();
    idle.cmd(&["PING"]).assert_simple("PONG");
    let mut busy = env.conn();
    busy.send_cmd(&["BLPOP", "nothing", "1"]);
    assert_eventually(Duration::from_secs(10), "BLPOP reached Redis", || {
        env.redis.client_running("blpop").is_some()
    });
    env.proxy.terminate();
    // The command in flight still gets its answer, then the connection closes.
    let replies = busy.expect_closed(Duration::from_secs(10));
    assert_eq!(replies, vec![Frame::Null]);
    idle.expect_closed(Duration::from_secs(10));
    let status = env
        .proxy
        .wait_exit(Duration::from_secs(15))
        .expect("exited");
    assert!(status.success(), "{status:?}");
    env.proxy
        .wait_for_log("every client session finished", Duration::from_secs(10));
}

/// `/v1/status`'s `shutdown` object (null while the proxy runs).
fn shutdown_status(proxy: &Proxy) -> serde_json::Value {
    let (code, body) = proxy.http_get("/v1/status");
    assert_eq!(code, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
    doc["shutdown"].clone()
}

#[test]
fn shutdown_serves_on_until_the_clients_disconnect() {
    // The application's pod is stopping too: it still has work to finish through the proxy.
    let mut env = Env::start_with_extra("", "[shutdown]\nwait_for_clients = \"10m\"\n");
    assert_eq!(shutdown_status(&env.proxy), serde_json::Value::Null);
    let mut a = env.conn();
    a.cmd(&["SET", "k", "before"]).assert_ok();
    env.proxy.terminate();
    env.proxy
        .wait_for_log("until the clients disconnect", Duration::from_secs(10));
    let (code, body) = env.proxy.http_get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("shutting down (SIGTERM, waiting_for_clients)"),
        "{body}"
    );
    let status = shutdown_status(&env.proxy);
    assert_eq!(status["signal"], "SIGTERM", "{status}");
    assert_eq!(status["phase"], "waiting_for_clients", "{status}");
    // Everything still works, for the clients connected and for new ones.
    a.cmd(&["SET", "k", "after"]).assert_ok();
    let mut b = env.conn();
    b.cmd(&["GET", "k"]).assert_bulk("after");
    b.send_cmd(&["BLPOP", "jobs", "0"]);
    assert_eventually(Duration::from_secs(10), "BLPOP reached Redis", || {
        env.redis.client_running("blpop").is_some()
    });
    a.cmd(&["RPUSH", "jobs", "last"]).assert_int(1);
    assert_eq!(
        b.read_reply(),
        Frame::Array(vec![
            Frame::Bulk(b"jobs".to_vec()),
            Frame::Bulk(b"last".to_vec())
        ])
    );
    assert!(
        env.proxy.is_running(),
        "the proxy stays while clients are connected"
    );
    // The application exits: so does the proxy, long before the wait would end.
    drop(a);
    drop(b);
    let status = env
        .proxy
        .wait_exit(Duration::from_secs(60))
        .expect("exited once the clients were gone");
    assert!(status.success(), "{status:?}");
    assert!(env.proxy.log_contains("every client disconnected"));
    // The start and the stop are audit events.
    for event in ["proxy.started", "proxy.stopping"] {
        let line = env.proxy.wait_for_log(event, Duration::from_secs(10));
        assert!(line.contains("rotaproxy::audit"), "{line}");
    }
    assert!(env.proxy.log_contains("every client session finished"));
    assert_no_secret_in_logs(&env.proxy, &[&env.password]);
}

#[test]
fn a_second_stop_signal_cuts_each_phase_short() {
    let mut env = Env::start_with_extra(
        "",
        "[shutdown]\nwait_for_clients = \"10m\"\ngrace = \"10m\"\n",
    );
    let mut idle = env.conn();
    idle.cmd(&["PING"]).assert_simple("PONG");
    let mut blocked = env.conn();
    blocked.cmd(&["PING"]).assert_simple("PONG");
    env.proxy.terminate();
    env.proxy
        .wait_for_log("until the clients disconnect", Duration::from_secs(10));
    // A command that never ends, sent while the proxy still serves on.
    blocked.send_cmd(&["BLPOP", "nothing", "0"]);
    assert_eventually(Duration::from_secs(10), "BLPOP reached Redis", || {
        env.redis.client_running("blpop").is_some()
    });
    // The second signal ends the wait: the idle client is closed, the blocked one is owed
    // a reply and stays.
    env.proxy.terminate();
    env.proxy.wait_for_log(
        "not waiting for the clients any longer",
        Duration::from_secs(10),
    );
    assert!(idle.expect_closed(Duration::from_secs(10)).is_empty());
    let status = shutdown_status(&env.proxy);
    assert_eq!(status["phase"], "draining", "{status}");
    let (code, body) = env.proxy.http_get("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("shutting down (SIGTERM, draining)"), "{body}");
    assert!(
        env.proxy.is_running(),
        "the drain waits for the blocked command"
    );
    // The third ends the drain.
    env.proxy.terminate();
    let status = env
        .proxy
        .wait_exit(Duration::from_secs(60))
        .expect("exited on the third signal");
    assert!(status.success(), "{status:?}");
    assert!(
        env.proxy
            .log_contains("a second stop signal while draining")
    );
    assert!(blocked.expect_closed(Duration::from_secs(10)).is_empty());
    assert_no_secret_in_logs(&env.proxy, &[&env.password]);
}

#[test]
fn shutdown_grace_bounds_the_drain() {
    let mut env = Env::start_with_extra("", "[shutdown]\ngrace = \"1s\"\n");
    let mut blocked = env.conn();
    blocked.send_cmd(&["BLPOP", "nothing", "0"]);
    assert_eventually(Duration::from_secs(10), "BLPOP reached Redis", || {
        env.redis.client_running("blpop").is_some()
    });
    env.proxy.terminate();
    let status = env
        .proxy
        .wait_exit(Duration::from_secs(60))
        .expect("exited when the grace was over");
    assert!(status.success(), "{status:?}");
    let drain = env
        .proxy
        .logs()
        .into_iter()
        .find(|l| l.contains("finishing replies in flight"))
        .expect("the drain is logged");
    assert!(drain.contains("grace=1s"), "{drain}");
    assert!(env.proxy.log_contains("shutdown grace period over"));
    // With no wait configured, the wait is skipped and never reported.
    assert!(!env.proxy.log_contains("until the clients disconnect"));
    assert!(blocked.expect_closed(Duration::from_secs(10)).is_empty());
    assert_no_secret_in_logs(&env.proxy, &[&env.password]);
}

#[test]
fn client_and_upstream_connections_carry_tcp_keepalive() {
    // Values unlike the defaults (300s, 60s), so that the timers show these were applied.
    let env = Env::start_with_extra(
        "tcp_keepalive = \"20s\"",
        "[timeouts]\ntcp_keepalive = \"40s\"\n[pool]\nwarm = 2\n",
    );
    let mut c = env.conn();
    c.cmd(&["PING"]).assert_simple("PONG");
    let client_port = env.proxy.client_addr().port();
    let redis_port = env.redis.port();
    // The kernel's keepalive timer runs on each connection, within its configured time.
    assert_eventually(
        Duration::from_secs(10),
        "the warm connections and the client's are up",
        || {
            let connections = env.proxy.tcp_connections();
            connections
                .iter()
                .filter(|t| t.remote_port == redis_port)
                .count()
                >= 2
                && connections.iter().any(|t| t.local_port == client_port)
        },
    );
    for connection in env.proxy.tcp_connections() {
        let limit = if connection.remote_port == redis_port {
            Duration::from_secs(40)
        } else if connection.local_port == client_port {
            Duration::from_secs(20)
        } else {
            continue; // the admin listener's
        };
        let left = connection.keepalive_left();
        assert!(
            left.is_some_and(|left| !left.is_zero() && left <= limit),
            "{connection:?}: keepalive within {limit:?}"
        );
    }
    drop(c);

    // 0 turns it off on both sides.
    let off = Env::start_with_extra(
        "tcp_keepalive = \"0s\"",
        "[timeouts]\ntcp_keepalive = \"0s\"\n",
    );
    let mut c = off.conn();
    c.cmd(&["PING"]).assert_simple("PONG");
    let client_port = off.proxy.client_addr().port();
    let redis_port = off.redis.port();
    let connections = off.proxy.tcp_connections();
    let ours: Vec<_> = connections
        .iter()
        .filter(|t| t.remote_port == redis_port || t.local_port == client_port)
        .collect();
    assert!(ours.len() >= 2, "{connections:?}");
    for connection in ours {
        assert_eq!(connection.keepalive_left(), None, "{connection:?}");
    }
    env.assert_no_secret_leaked();
}

#[test]
fn clients_can_connect_over_a_unix_socket() {
    let dir = temp_dir();
    let socket = dir.path().join("rotaproxy.sock");
    let client_pw = dir.path().join("client-pw");
    std::fs::write(&client_pw, "client-pw").expect("write");
    let mut env = Env::start_with_extra(
        &format!(
            "unix_socket = {}\nunix_socket_mode = \"600\"",
            toml_path(&socket)
        ),
        &format!(
            "[listener.auth]\nmode = \"password\"\nusers = [{{ password = \"file:{}\" }}]\n",
            client_pw.display()
        ),
    );
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
    let meta = std::fs::symlink_metadata(&socket).expect("the socket file");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let (_, body) = env.proxy.http_get("/v1/status");
    let status: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
    assert_eq!(
        status["listeners"],
        serde_json::json!({
            "tcp": env.proxy.client_addr().to_string(),
            "tls": false,
            "client_certificates_required": false,
            "client_certificates_checked": false,
            "unix_socket": socket.to_str().expect("utf-8"),
        })
    );
    let mut c = RespConn::connect_unix(&socket);
    c.cmd(&["AUTH", "wrong"]).assert_error("WRONGPASS");
    // The refusal names the client by its process and user, as the kernel gave them.
    let line = env
        .proxy
        .wait_for_log("client.auth_failed", Duration::from_secs(10));
    let me = format!("peer=unix:pid={}:uid={}", std::process::id(), meta.uid());
    assert!(line.contains(&me), "{me} in {line}");
    c.cmd(&["AUTH", "client-pw"]).assert_ok();
    c.cmd(&["SET", "over", "unix"]).assert_ok();
    // `GET /v1/clients` names it by process and user, logged in with the `default` entry.
    let (_, body) = env.proxy.http_get("/v1/clients");
    let clients: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(clients["count"], 1, "{clients}");
    let client = &clients["clients"][0];
    assert!(client["peer"] == me.trim_start_matches("peer="), "{client}");
    assert_eq!(client["authenticated"], true, "{client}");
    assert_eq!(client["user"], "default", "{client}");
    let mut pipeline = encode_cmd(&["INCR", "n"]).repeat(1000);
    pipeline.extend(encode_cmd(&["GET", "over"]));
    c.send_raw(&pipeline);
    for i in 1..=1000 {
        c.read_reply().assert_int(i);
    }
    c.read_reply().assert_bulk("unix");
    // TCP clients are served as before.
    let mut tcp = env.conn();
    tcp.cmd(&["AUTH", "client-pw"]).assert_ok();
    tcp.cmd(&["GET", "n"]).assert_bulk("1000");

    // The socket file goes with the proxy.
    drop(c);
    drop(tcp);
    env.proxy.terminate();
    let status = env
        .proxy
        .wait_exit(Duration::from_secs(60))
        .expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the socket file is removed at exit");
    assert_no_secret_in_logs(&env.proxy, &[&env.password, "client-pw"]);
}

#[test]
fn a_stale_unix_socket_is_replaced_and_one_in_use_is_not() {
    let redis = RedisServer::start(RedisOptions::new());
    let dir = temp_dir();
    let socket = dir.path().join("rotaproxy.sock");
    let config = |path: &std::path::Path| {
        let mut config = ProxyConfig::plain(&redis);
        config.listener_extra = format!("unix_socket = {}", toml_path(path));
        config.to_toml()
    };
    // Another process listens there: the proxy does not take the socket from it.
    let other = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let Err(failure) = Proxy::try_start(&config(&socket), &[]) else {
        panic!("the proxy took a socket another process listens on");
    };
    let logs = failure.logs.join("\n");
    assert!(
        logs.contains("listener.unix_socket") && logs.contains("another process listens on it"),
        "{logs}"
    );
    assert!(
        std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        "the other listener keeps its socket"
    );
    // Left behind by a process that died: replaced.
    drop(other);
    assert!(socket.exists(), "a closed listener leaves its file");
    let proxy = Proxy::start(&config(&socket), &[]);
    RespConn::connect_unix(&socket)
        .cmd(&["PING"])
        .assert_simple("PONG");
    drop(proxy);
    // A file that is not a socket is never removed.
    let file = dir.path().join("notes");
    std::fs::write(&file, "keep me").expect("write");
    let Err(failure) = Proxy::try_start(&config(&file), &[]) else {
        panic!("the proxy started on a path that is no socket");
    };
    let logs = failure.logs.join("\n");
    assert!(
        logs.contains("the path exists and is not a socket"),
        "{logs}"
    );
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");
}

/// `rotaproxy probe live|ready`, as an exec probe runs it: (passed, what it printed).
fn run_probe(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(proxy_bin())
        .arg("probe")
        .args(args)
        .output()
        .expect("run rotaproxy probe");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

#[test]
fn the_probe_command_asks_the_admin_listener() {
    let mut env = Env::start_with_extra("", "[shutdown]\nwait_for_clients = \"10m\"\n");
    let admin = env.proxy.admin_addr().to_string();
    // The proxy's own file says port 0 (picked at start): the probe asks for --admin.
    let started_with = env.proxy.config_path().to_path_buf();
    let (passed, _) = run_probe(&["ready", "--config", started_with.to_str().expect("utf-8")]);
    assert!(!passed, "port 0 cannot be asked");
    // A file with the port in it, as a deployment has.
    let text = std::fs::read_to_string(&started_with).expect("read config");
    let with_port = text.replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        &format!("[admin]\nbind = \"{admin}\""),
    );
    assert_ne!(with_port, text, "the admin bind was found");
    let fixed = env.proxy.dir().join("fixed-port.toml");
    std::fs::write(&fixed, with_port).expect("write config");
    let fixed = fixed.to_str().expect("utf-8").to_string();
    assert_eventually(Duration::from_secs(30), "the proxy is ready", || {
        run_probe(&["ready", "--config", &fixed]) == (true, "ready".to_string())
    });
    assert_eq!(
        run_probe(&["live", "--admin", &admin]),
        (true, "ok".to_string())
    );
    // Stopping, with a client still connected: alive, and no longer ready.
    let mut c = env.conn();
    c.cmd(&["PING"]).assert_simple("PONG");
    env.proxy.terminate();
    env.proxy
        .wait_for_log("until the clients disconnect", Duration::from_secs(10));
    let (ready, said) = run_probe(&["ready", "--admin", &admin]);
    assert!(!ready, "{said}");
    assert!(said.contains("shutting down (SIGTERM"), "{said}");
    assert!(run_probe(&["live", "--admin", &admin]).0);
    drop(c);
    env.proxy
        .wait_exit(Duration::from_secs(60))
        .expect("exited");
    let (alive, said) = run_probe(&["live", "--admin", &admin]);
    assert!(!alive, "{said}");
    assert!(said.contains("cannot reach the admin listener"), "{said}");
}

#[test]
fn an_admin_token_in_a_file_is_rotated_without_a_restart() {
    let redis = RedisServer::start(RedisOptions::new());
    let dir = temp_dir();
    let token_file = dir.path().join("admin-token");
    let (old, new) = (random_token(24), random_token(24));
    std::fs::write(&token_file, format!("{old}\n")).expect("write");
    let mut config = ProxyConfig::plain(&redis);
    config.admin_extra = format!("token = \"file:{}\"", token_file.display());
    let proxy = Proxy::start(&config.to_toml(), &[]);
    // An authorized POST that changes nothing: this proxy has no client certificate rotation.
    let post = |token: &str| {
        proxy
            .http_post("/v1/client-certificate/rotate", Some(token), "")
            .0
    };
    const AUTHORIZED: u16 = 409;
    assert_eq!(post(&old), AUTHORIZED);
    assert_eq!(post(&new), 401);

    // The secrets manager writes the next token (a rename, as a secret volume swaps).
    let next = dir.path().join("admin-token.next");
    std::fs::write(&next, &new).expect("write");
    std::fs::rename(&next, &token_file).expect("rename");
    assert_eq!(post(&new), AUTHORIZED);
    assert_eq!(post(&old), 401);
    let line = proxy.wait_for_log("admin token changed", Duration::from_secs(10));
    assert!(line.contains("secret.reloaded"), "an audit event: {line}");
    // Mid-swap, the file briefly gone: the token read before still holds.
    std::fs::remove_file(&token_file).expect("remove");
    assert_eq!(post(&new), AUTHORIZED);
    assert_no_secret_in_logs(&proxy, &[&old, &new]);
}

/// A socket timeout (reported as either kind, depending on the platform): try again.
fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

#[test]
fn a_client_that_never_pauses_does_not_hold_up_the_others() {
    use std::io::Read;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;

    // One worker thread (the default): every session shares it.
    let env = Env::start();
    let flood_for = Duration::from_secs(60);
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let mut writer = TcpStream::connect(env.proxy.client_addr()).expect("connect");
    let mut reader = writer.try_clone().expect("clone");
    // The flood: commands the proxy answers itself (client auth is "none", so AUTH is +OK),
    // written without pause so its socket never runs dry, and the replies read as fast as they
    // come. That session always has input and never waits for Redis: only the proxy's own
    // turn-taking lets the other sessions run.
    let batch = encode_cmd(&["AUTH", "flood", "pw"]).repeat(512);
    let writing = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // A timeout only so that the loop sees `stop` even when the proxy holds it back.
            writer
                .set_write_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            let started = Instant::now();
            let mut at = 0;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < flood_for {
                match writer.write(&batch[at..]) {
                    Ok(n) => at = (at + n) % batch.len(),
                    Err(e) if timed_out(&e) => {}
                    Err(_) => break,
                }
            }
        })
    };
    let reading = {
        let stop = stop.clone();
        let received = received.clone();
        std::thread::spawn(move || {
            reader
                .set_read_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
            let started = Instant::now();
            let mut buf = vec![0u8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) && started.elapsed() < flood_for {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if timed_out(&e) => {}
                    Err(_) => break,
                }
            }
        })
    };
    assert_eventually(Duration::from_secs(30), "the flood is under way", || {
        received.load(Ordering::Relaxed) > 1024 * 1024
    });
    // Another client's round trips are still served, each long before the flood would end
    // by itself (a starved session would wait for that).
    let mut other = env.conn();
    other.set_read_timeout(Some(Duration::from_secs(20)));
    for i in 0..20 {
        other
            .cmd(&["ECHO", &format!("turn {i}")])
            .assert_bulk(format!("turn {i}"));
    }
    let flood_still_on = !writing.is_finished() && !reading.is_finished();
    stop.store(true, Ordering::Relaxed);
    writing.join().expect("writer");
    reading.join().expect("reader");
    assert!(
        flood_still_on,
        "the flood ended before the other client was served"
    );
    env.assert_no_secret_leaked();
}

#[test]
fn a_multi_thread_runtime_serves_many_clients_without_a_stall() {
    // Two workers: sessions wake on one thread while the I/O driver runs on the other. Every
    // round trip below goes idle and wakes again, and bursts of pipelined commands mix in;
    // a lost wake-up would show as a read timing out. (It caught one: a plain read skipped
    // re-registering for readability while its previous registration seemed to stand, judged
    // only by having seen no readiness since; a wake for data already read could take that
    // registration. That version failed 2 runs of 36 with six copies in parallel. A corrected
    // skip, with a waker of our own that marks itself fired, passed 108 of 108 but cost more
    // CPU than it saved (benches/side_by_side.py). So on a multi-thread runtime reads always
    // register again; the skip is made only on a current-thread runtime, where the driver runs
    // between task polls and so cannot take a registration made after the bytes were read:
    // see `net::ReadWaiter`.)
    let env = Env::start_with_extra("", "[runtime]\nworker_threads = 2\n");
    let clients: Vec<RespConn> = (0..8).map(|_| env.conn()).collect();
    let workers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(t, mut c)| {
            std::thread::spawn(move || {
                c.set_read_timeout(Some(Duration::from_secs(20)));
                let key = format!("mt:{t}");
                for i in 0..300 {
                    c.cmd(&["SET", &key, &i.to_string()]).assert_ok();
                    c.cmd(&["GET", &key]).assert_bulk(i.to_string());
                    if i % 50 == 0 {
                        let burst: Vec<u8> = (0..200)
                            .flat_map(|j| encode_cmd(&["ECHO", &format!("{t}:{j}")]))
                            .collect();
                        c.send_raw(&burst);
                        for j in 0..200 {
                            c.read_reply().assert_bulk(format!("{t}:{j}"));
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("client thread");
    }
    env.assert_no_secret_leaked();
}

/// Command streams with bytes changed, inserted, dropped or cut off, sent in random pieces:
/// whatever the proxy makes of one, its client reads only whole RESP frames (replies, or a
/// protocol error before the proxy closes the connection), the proxy does not panic, and a
/// client beside them is served throughout.
#[test]
fn mangled_command_streams_get_whole_replies_and_hurt_no_one_else() {
    const STREAMS: usize = 300;
    let env = Env::start();
    let mut bystander = env.conn();
    bystander.cmd(&["SET", "bystander", "1"]).assert_ok();
    let templates: [&[&str]; 12] = [
        &["SET", "k", "v"],
        &["GET", "k"],
        &["MULTI"],
        &["EXEC"],
        &["HELLO", "3", "AUTH", "default", "pw", "SETNAME", "n"],
        &["HELLO", "2"],
        &["AUTH", "pw"],
        &["SUBSCRIBE", "c1", "c2"],
        &["UNSUBSCRIBE"],
        &["CLIENT", "TRACKING", "ON", "REDIRECT", "1"],
        &["CLIENT", "REPLY", "SKIP"],
        &["SELECT", "1"],
    ];
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let started = Instant::now();
    let (mut replies, mut protocol_errors) = (0, 0);
    for stream in 0..STREAMS {
        // Bounded by time too, on a slow machine.
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
        let mut bytes = Vec::new();
        for _ in 0..1 + rng.below(6) {
            let cmd = templates[rng.below(templates.len() as u64) as usize];
            if rng.below(4) == 0 {
                bytes.extend(cmd.join(" ").bytes());
                bytes.extend(b"\r\n");
            } else {
                bytes.extend(encode_cmd(cmd));
            }
        }
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(bytes.len() as u64) as usize;
            match rng.below(4) {
                0 => bytes[at] = rng.below(256) as u8,
                1 => bytes.insert(at, b"*$:\r\n-0123456789"[rng.below(16) as usize]),
                2 => {
                    bytes.remove(at);
                }
                _ => bytes.truncate(at.max(1)),
            }
        }
        let mut conn = TcpStream::connect(env.proxy.client_addr()).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = (1 + rng.below(rest.len() as u64)) as usize;
            if conn.write_all(&rest[..n]).is_err() {
                // The proxy closed the connection already (a protocol error).
                break;
            }
            rest = &rest[n..];
        }
        // Nothing more comes: the proxy answers what it has and closes.
        let _ = conn.shutdown(std::net::Shutdown::Write);
        let mut received = Vec::new();
        // It ends: closed, or reset when the proxy closed with input still unread.
        let read = std::io::Read::read_to_end(&mut conn, &mut received);
        assert!(
            read.is_ok()
                || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "stream {stream}: {read:?} after sending {}",
            support::resp::show(&bytes, 200)
        );
        let mut at = 0;
        while at < received.len() {
            match support::resp::decode_frame(&received[at..]) {
                Ok(Some((frame, n, _))) => {
                    at += n;
                    replies += 1;
                    if matches!(&frame, Frame::Error(e) if e.starts_with("ERR Protocol error")) {
                        protocol_errors += 1;
                    }
                }
                other => panic!(
                    "stream {stream}: not a whole reply at byte {at} ({other:?}) of {}\nsent {}",
                    support::resp::show(&received, 400),
                    support::resp::show(&bytes, 200)
                ),
            }
        }
        if stream % 50 == 0 {
            bystander.cmd(&["GET", "bystander"]).assert_bulk("1");
        }
    }
    bystander.cmd(&["GET", "bystander"]).assert_bulk("1");
    // The mangling made both: streams the proxy refused and replies to what it could read.
    eprintln!("{replies} replies, {protocol_errors} protocol errors");
    assert!(
        protocol_errors >= 20 && replies >= 200,
        "{replies} replies, {protocol_errors} protocol errors"
    );
    assert!(!env.proxy.log_contains("panicked"));
    env.assert_no_secret_leaked();
}

/// The argument counts the proxy judges itself (`Kind::argument_count_fits`) are the server's:
/// each command's arity from `COMMAND INFO` (n: exactly n arguments, name included; -n: at
/// least n).
#[test]
fn argument_counts_the_proxy_judges_are_the_servers() {
    use rotaproxy::resp::command::{Kind, classify};
    let redis = RedisServer::start(RedisOptions::new());
    let mut conn = redis.admin_conn();
    let names = [
        "MULTI",
        "EXEC",
        "DISCARD",
        "WATCH",
        "UNWATCH",
        "RESET",
        "MONITOR",
        "READONLY",
        "READWRITE",
        "SELECT",
        "SUBSCRIBE",
        "PSUBSCRIBE",
        "SSUBSCRIBE",
    ];
    for name in names {
        let kind = classify(name.as_bytes());
        assert_ne!(kind, Kind::Other, "{name}");
        let info = conn.cmd(&["COMMAND", "INFO", name]);
        let arity = info.as_array().and_then(|a| a[0].as_array()).map(|i| &i[1]);
        let Some(Frame::Integer(arity)) = arity else {
            panic!("COMMAND INFO {name}: {info:?}");
        };
        for argc in 1..=4 {
            let server_takes = if *arity >= 0 {
                argc == *arity as usize
            } else {
                argc >= arity.unsigned_abs() as usize
            };
            assert_eq!(
                kind.argument_count_fits(argc),
                server_takes,
                "{name} with {argc} arguments (arity {arity})"
            );
        }
    }
}
