//! Real client libraries (redis-py, ioredis, node-redis) against the proxy, in RESP2 and RESP3.
//!
//! Each test starts its own Redis (ACL user `app`) and proxy (plain upstream, client auth
//! `none`), then runs a script from tests/clients/ that connects the way applications do
//! (HELLO/AUTH with a client-side password, CLIENT SETINFO, INFO), and exercises SET/GET, a
//! pipeline of 1000, MULTI/EXEC, pub/sub, BLPOP released from another connection and SELECT 2,
//! with retries and reconnects disabled; and again, with `*_rotation` scripts, while the proxy
//! rotates its credential (see `run_library_under_rotation`). The libraries are pinned and installed by scripts/test
//! into .deps/ (python: tests/clients/python/requirements.txt; node:
//! tests/clients/node/package-lock.json).

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::rotation::RotEnv;
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
    run_library_on(runtime, script, protocol, Listener::Tcp);
}

/// Which of the proxy's listeners a library script connects to.
#[derive(PartialEq)]
enum Listener {
    Tcp,
    /// `listener.unix_socket`.
    Unix,
}

fn run_library_on(runtime: Runtime, script: &str, protocol: u8, listener: Listener) {
    // Fails first, with the fix in the message, if the libraries are not installed.
    let mut cmd = command_for(runtime, script);
    let upstream_pw = format!("up-{}", random_token(20));
    let client_pw = format!("cl-{}", random_token(20));
    let redis = RedisServer::start_with_user("app", &upstream_pw);
    let socket_dir = temp_dir();
    let socket = socket_dir.path().join("rotaproxy.sock");
    let mut config = ProxyConfig::plain(&redis)
        .credentials(Some("app"), "env:ROTAPROXY_TEST_APP_PW")
        .extra("[listener.auth]\nmode = \"none\"\n");
    if listener == Listener::Unix {
        config.listener_extra = format!("unix_socket = {}", toml_path(&socket));
    }
    let proxy = Proxy::start(
        &config.to_toml(),
        &[("ROTAPROXY_TEST_APP_PW", &upstream_pw)],
    );

    let address = match listener {
        Listener::Tcp => proxy.client_addr().to_string(),
        Listener::Unix => format!("unix:{}", socket.display()),
    };
    cmd.arg(address)
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

/// Rotations while a `*_rotation` script runs (each waits for the traffic to flow again).
const ROTATIONS: usize = 10;

/// Runs a `*_rotation` script from tests/clients/ (kv, pipeline, WATCH/MULTI, pub/sub and BLPOP
/// workers, each checking every reply, retries and reconnects off) while the proxy rotates its
/// credential `ROTATIONS` times, and requires that the library saw no error, no disconnect and
/// no lost or reordered message or job. `env`: the proxy and the strategy it rotates with.
fn run_library_under_rotation(runtime: Runtime, script: &str, protocol: u8, mut env: RotEnv) {
    let mut cmd = command_for(runtime, script);
    let client_pw = format!("cl-{}", random_token(20));
    let control = temp_dir();
    cmd.arg(env.proxy().client_addr().to_string())
        .arg(protocol.to_string())
        .arg(control.path())
        .env("CLIENT_PASSWORD", &client_pw);
    let progress = || -> u64 {
        std::fs::read_to_string(control.path().join("progress"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let script_ended = std::sync::atomic::AtomicBool::new(false);
    // Waits until the script has verified `more` operations beyond `from`; false if it ended
    // (its verdict says why) or stalled.
    let flowing = |from: u64, more: u64| -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if script_ended.load(std::sync::atomic::Ordering::SeqCst) {
                return false;
            }
            if progress() >= from + more {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    let (verdict, rotations) = std::thread::scope(|scope| {
        let env = &mut env;
        let rotator = scope.spawn(|| {
            // The stop file is written however this ends, so the script never waits for it.
            struct StopOnDrop<'a>(&'a Path);
            impl Drop for StopOnDrop<'_> {
                fn drop(&mut self) {
                    let _ = std::fs::write(self.0.join("stop"), b"");
                }
            }
            let _stop = StopOnDrop(control.path());
            let mut rotations = 0;
            if flowing(0, 300) {
                while rotations < ROTATIONS {
                    env.rotate(false);
                    rotations += 1;
                    if !flowing(progress(), 300) {
                        break;
                    }
                }
            }
            rotations
        });
        let verdict = run_script(cmd);
        script_ended.store(true, std::sync::atomic::Ordering::SeqCst);
        (verdict, rotator.join())
    });
    let (ok, stdout, stderr) = verdict;
    let secrets: Vec<&str> = env
        .secrets
        .iter()
        .map(String::as_str)
        .chain([client_pw.as_str()])
        .collect();
    let shown = |s: &str| mask_secrets(s, &secrets);
    assert!(
        ok && stdout.lines().any(|l| l.starts_with("PASS ")),
        "{script} (RESP{protocol}) failed under rotation.\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- proxy log ---\n{}",
        shown(&stdout),
        shown(&stderr),
        shown(&env.proxy().logs().join("\n")),
    );
    eprintln!("{}", stdout.trim());
    let rotations = rotations.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    assert_eq!(rotations, ROTATIONS, "the script stopped making progress");
    let status = env.status();
    assert_eq!(status["generation"], ROTATIONS as u64 + 1, "{status}");
    assert_eq!(
        env.proxy()
            .metric("rotaproxy_drain_deadline_connections_total")
            .unwrap_or(0.0),
        0.0,
        "a drain ran into its deadline"
    );
    // Every connection the library opened was moved at every rotation.
    let connections: f64 = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("connections="))
        .and_then(|n| n.parse().ok())
        .expect("the PASS line counts the connections");
    let moved = env
        .proxy()
        .metric("rotaproxy_sessions_moved_total")
        .unwrap_or(0.0);
    assert!(
        moved >= connections * ROTATIONS as f64,
        "{moved} session moves for {connections} connections and {ROTATIONS} rotations"
    );
    env.assert_nothing_leaked();
    assert_no_secret_in_logs(env.proxy(), &[client_pw.as_str()]);
}

#[test]
fn redis_py_resp2() {
    run_library(Runtime::Python, "redis_py_client.py", 2);
}

#[test]
fn redis_py_resp3() {
    run_library(Runtime::Python, "redis_py_client.py", 3);
}

/// The same script over the proxy's Unix socket (`listener.unix_socket`).
#[test]
fn redis_py_resp3_over_the_unix_socket() {
    run_library_on(Runtime::Python, "redis_py_client.py", 3, Listener::Unix);
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

/// `acl-multi-password`: sessions move by re-AUTH in place where Redis allows it.
fn multi_password() -> RotEnv {
    RotEnv::multi_password("drain_deadline = \"2s\"\n")
}

/// `alternating-users`: every rotation moves every session to the other user.
fn alternating() -> RotEnv {
    RotEnv::alternating("drain_deadline = \"2s\"\n")
}

#[test]
fn redis_py_resp2_under_rotation() {
    run_library_under_rotation(Runtime::Python, "redis_py_rotation.py", 2, multi_password());
}

#[test]
fn redis_py_resp3_under_rotation() {
    run_library_under_rotation(Runtime::Python, "redis_py_rotation.py", 3, multi_password());
}

#[test]
fn redis_py_resp2_under_alternating_user_rotation() {
    run_library_under_rotation(Runtime::Python, "redis_py_rotation.py", 2, alternating());
}

#[test]
fn redis_py_resp3_under_alternating_user_rotation() {
    run_library_under_rotation(Runtime::Python, "redis_py_rotation.py", 3, alternating());
}

#[test]
fn ioredis_resp2_under_rotation() {
    run_library_under_rotation(Runtime::Node, "ioredis_rotation.js", 2, multi_password());
}

#[test]
fn ioredis_resp3_under_alternating_user_rotation() {
    run_library_under_rotation(Runtime::Node, "ioredis_rotation.js", 3, alternating());
}

#[test]
fn node_redis_resp2_under_alternating_user_rotation() {
    run_library_under_rotation(Runtime::Node, "node_redis_rotation.js", 2, alternating());
}

#[test]
fn node_redis_resp3_under_rotation() {
    run_library_under_rotation(Runtime::Node, "node_redis_rotation.js", 3, multi_password());
}
