//! Shared fixture of the integration tests: `mod support;` in each `tests/*.rs`.
//!
//! - [`Certs`]: a test PKI (CA, server and client certificates, an unrelated CA).
//! - [`RedisServer`]: a real `redis-server` child on ephemeral loopback ports.
//! - [`Proxy`]: the `rotaproxy` binary as a child, its log captured, its addresses parsed.
//! - [`RespConn`] / [`Frame`]: a raw blocking RESP2/RESP3 client (plain or TLS).
//! - [`wait_until`] / [`assert_eventually`]: bounded polling (no fixed sleeps in tests).
//!
//! Every fixture owns its ports and temp dir, and kills only the process it started, by PID.
#![allow(dead_code, unused_imports)]

pub mod certs;
pub mod cloud;
pub mod load;
pub mod proxy;
pub mod redis;
pub mod resp;
pub mod rotation;

use std::time::{Duration, Instant};

pub use certs::{CertFiles, Certs};
pub use proxy::{
    CommandOutput, Proxy, ProxyConfig, StartFailure, TcpConnection, assert_no_secret_in_lines,
    assert_no_secret_in_logs, http_request, mask_secrets, metric_value, proxy_bin, run_rotaproxy,
    toml_path, toml_str,
};
pub use redis::{ADMIN_USER, RedisOptions, RedisServer, RedisTls};
pub use resp::{
    Frame, INVALIDATION_CHANNEL, RespConn, TlsClientOptions, encode_cmd, invalidation_message,
};

/// Polls `cond` (every 10 ms, backing off to 100 ms) until it is true or `timeout` passes.
/// Returns whether it became true.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// [`wait_until`] that panics with `what` on timeout.
#[track_caller]
pub fn assert_eventually(timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(
        wait_until(timeout, cond),
        "timed out after {timeout:?} waiting for: {what}"
    );
}

/// A random lowercase hex string of `len` characters (test passwords, tokens). Not for crypto.
pub fn random_token(len: usize) -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    let state = RandomState::new();
    let mut out = String::with_capacity(len + 16);
    let mut i: u64 = 0;
    while out.len() < len {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        out.push_str(&format!(
            "{:016x}",
            state.hash_one((i, nanos, std::process::id()))
        ));
        i += 1;
    }
    out.truncate(len);
    out
}

/// A fresh temp dir (removed on drop).
/// Environment variables kept as owned pairs, borrowed the way `Proxy::start` takes them.
pub fn env_refs(envs: &[(String, String)]) -> Vec<(&str, &str)> {
    envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rotaproxy-test-")
        .tempdir()
        .expect("temp dir")
}

/// A loopback port that was free a moment ago (prefer port 0 in configs where possible).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The repository root (`CARGO_MANIFEST_DIR`).
pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
