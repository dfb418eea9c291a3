//! Proves the load generator (tests/support/load.rs): clean against the proxy when nothing
//! happens, and not clean when the proxy's upstream connections are killed under it.

mod support;

use std::time::{Duration, Instant};

use support::load::{Load, LoadConfig};
use support::*;

const APP_USER: &str = "app";

/// Redis with the ACL user `app`, and the proxy in front of it authenticating as `app`.
fn start_env() -> (RedisServer, Proxy) {
    let password = random_token(32);
    let redis = RedisServer::start_with_user(APP_USER, &password);
    let config =
        ProxyConfig::plain(&redis).credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD");
    let proxy = Proxy::start(
        &config.to_toml(),
        &[("TEST_UPSTREAM_PASSWORD", password.as_str())],
    );
    (redis, proxy)
}

/// Waits (bounded) until the load has done `ops` more operations than `from`.
#[track_caller]
fn wait_progress(load: &Load, from: u64, ops: u64, within: Duration) {
    assert_eventually(within, &format!("{ops} more load operations"), || {
        load.progress() >= from + ops
    });
}

#[test]
fn load_is_clean_against_an_undisturbed_proxy() {
    let (_redis, proxy) = start_env();
    let started = Instant::now();
    let load = Load::start(LoadConfig::new(proxy.client_addr(), random_token(8)));
    let ready = started.elapsed();
    // About 3 s of load: time-bounded, and at least some real work.
    wait_progress(&load, 0, 1_000, Duration::from_secs(10));
    let run_until = Instant::now() + Duration::from_secs(3);
    wait_until(Duration::from_secs(3), || Instant::now() >= run_until);
    let report = load.stop();
    eprintln!(
        "load self-test: ready after {:.1}s, total {:.1}s\n{}",
        ready.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        report.details
    );
    report.assert_clean();
    assert!(report.operations > 1_000, "{}", report.details);
    assert_eq!(report.reconnects, 0);
    assert!(
        !proxy.logs().iter().any(|l| l.contains("panicked")),
        "the proxy panicked"
    );
}

/// The baseline: the checks hold against Redis itself, so what they find behind the proxy is the
/// proxy's doing. (With a password, which every connection sends first: `LoadConfig::auth`.)
#[test]
fn load_is_clean_directly_against_redis() {
    let password = random_token(24);
    let redis = RedisServer::start(RedisOptions::new().requirepass(&password));
    let mut config = LoadConfig::new(redis.addr(), random_token(8));
    config.auth = Some(("default".to_string(), password));
    let load = Load::start(config);
    wait_progress(&load, 0, 1_000, Duration::from_secs(10));
    let run_until = Instant::now() + Duration::from_secs(2);
    wait_until(Duration::from_secs(2), || Instant::now() >= run_until);
    let report = load.stop();
    eprintln!("load against Redis directly:\n{}", report.details);
    report.assert_clean();
}

#[test]
fn killing_the_upstream_connections_makes_the_load_unclean() {
    let (redis, proxy) = start_env();
    let mut config = LoadConfig::new(proxy.client_addr(), random_token(8));
    // Messages lost with the killed connections never come: do not wait long for them.
    config.drain_timeout = Duration::from_secs(4);
    let load = Load::start(config);
    wait_progress(&load, 0, 1_000, Duration::from_secs(10));
    for _ in 0..3 {
        let killed = redis.admin_cmd(&["CLIENT", "KILL", "USER", APP_USER]);
        assert!(
            killed.as_int().is_some_and(|n| n > 0),
            "CLIENT KILL USER {APP_USER}: {killed:?}"
        );
        // The load goes on after each kill (on the proxy's fresh upstream connections).
        wait_progress(&load, load.progress(), 500, Duration::from_secs(10));
    }
    let report = load.stop();
    eprintln!(
        "negative self-test: {} errors, first ones:\n{}\n{}",
        report.errors.len(),
        report
            .errors
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
        report.details
    );
    assert!(
        !report.is_clean(),
        "killing every upstream connection 3 times went unnoticed:\n{}",
        report.details
    );
    assert!(!report.errors.is_empty());
    assert!(report.operations > 0);
    let panicked = std::panic::catch_unwind(|| report.assert_clean());
    assert!(panicked.is_err(), "assert_clean accepted an unclean report");
}
