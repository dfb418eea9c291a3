//! Real client libraries (redis-py, ioredis, node-redis) against the proxy, in RESP2 and RESP3.
//!
//! Each test starts its own Redis (ACL user `app`) and proxy (plain upstream, client auth
//! `none`), then runs a script from tests/clients/ that connects the way applications do
//! (HELLO/AUTH with a client-side password, CLIENT SETINFO, INFO), and exercises SET/GET, a
//! pipeline of 1000, MULTI/EXEC, pub/sub, BLPOP released from another connection and SELECT 2,
//! with retries and reconnects disabled. The libraries are pinned and installed by scripts/test
//! into .deps/ (python: tests/clients/python/requirements.txt; node:
//! tests/clients/node/package-lock.json).

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

enum Runtime {
    Python,
    Node,
}

fn deps_missing(what: &str, path: &Path) -> ! {
    panic!(
        "{what} is not installed ({} is missing). Run scripts/test once: it installs the pinned \
         client libraries into .deps/ (then `cargo nextest run` alone works too).",
        path.display()
    );
}

fn command_for(runtime: Runtime, script: &str) -> Command {
    let root = repo_root();
    match runtime {
        Runtime::Python => {
            let deps = root.join(".deps/python");
            if !deps.join("redis").is_dir() {
                deps_missing("redis-py", &deps.join("redis"));
            }
            let mut c = Command::new("python3");
            c.arg(root.join("tests/clients/python").join(script))
                .env("PYTHONPATH", &deps)
                .env("PYTHONDONTWRITEBYTECODE", "1");
            c
        }
        Runtime::Node => {
            let modules = root.join(".deps/node/node_modules");
            for lib in ["ioredis", "redis"] {
                if !modules.join(lib).is_dir() {
                    deps_missing(lib, &modules.join(lib));
                }
            }
            let mut c = Command::new("node");
            c.arg(root.join("tests/clients/node").join(script))
                .env("NODE_PATH", &modules);
            c
        }
    }
}

/// Runs the script to completion (bounded) and returns (success, stdout, stderr).
fn run_script(mut cmd: Command) -> (bool, String, String) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = format!("{cmd:?}");
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!("cannot run {program}: {e} (is it installed? see scripts/test)")
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_t.join().unwrap();
    let stderr = err_t.join().unwrap();
    let ok = status.is_some_and(|s| s.success());
    if status.is_none() {
        return (
            false,
            stdout,
            format!("{stderr}\n(killed after {SCRIPT_TIMEOUT:?})"),
        );
    }
    (ok, stdout, stderr)
}

fn run_library(runtime: Runtime, script: &str, protocol: u8) {
    // Fails first, with the fix in the message, if the libraries are not installed.
    let mut cmd = command_for(runtime, script);
    let upstream_pw = format!("up-{}", random_token(20));
    let client_pw = format!("cl-{}", random_token(20));
    let redis = RedisServer::start_with_user("app", &upstream_pw);
    let config = ProxyConfig::plain(&redis)
        .credentials(Some("app"), "env:ROTAPROXY_TEST_APP_PW")
        .extra("[listener.auth]\nmode = \"none\"\n")
        .to_toml();
    let proxy = Proxy::start(&config, &[("ROTAPROXY_TEST_APP_PW", &upstream_pw)]);

    cmd.arg(proxy.client_addr().to_string())
        .arg(protocol.to_string())
        .env("CLIENT_PASSWORD", &client_pw);
    let (ok, stdout, stderr) = run_script(cmd);
    let secrets = [upstream_pw.as_str(), client_pw.as_str()];
    let shown = |s: &str| mask_secrets(s, &secrets);
    assert!(
        ok && stdout.lines().any(|l| l.starts_with("PASS ")),
        "{script} (RESP{protocol}) failed.\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- proxy log ---\n{}",
        shown(&stdout),
        shown(&stderr),
        shown(&proxy.logs().join("\n")),
    );
    eprintln!("{}", stdout.trim());

    // Every upstream connection is the proxy's own (user app): the client's AUTH never went there.
    let clients = redis.client_list();
    assert!(!clients.is_empty());
    for c in &clients {
        assert_eq!(
            c["user"], "app",
            "upstream connection not authenticated by the proxy: {c:?}"
        );
    }
    assert_no_secret_in_logs(&proxy, &secrets);
}

#[test]
fn redis_py_resp2() {
    run_library(Runtime::Python, "redis_py_client.py", 2);
}

#[test]
fn redis_py_resp3() {
    run_library(Runtime::Python, "redis_py_client.py", 3);
}

#[test]
fn ioredis_resp2() {
    run_library(Runtime::Node, "ioredis_client.js", 2);
}

#[test]
fn ioredis_resp3() {
    run_library(Runtime::Node, "ioredis_client.js", 3);
}

#[test]
fn node_redis_resp2() {
    run_library(Runtime::Node, "node_redis_client.js", 2);
}

#[test]
fn node_redis_resp3() {
    run_library(Runtime::Node, "node_redis_client.js", 3);
}
