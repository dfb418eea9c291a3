//! The promise under load: at least 50 client connections of every kind (pipelines, WATCH/MULTI
//! transactions, RESP2 and RESP3 subscribers, BLPOP consumers parked with timeout 0, connect-
//! one-command-disconnect clients, auto-pipelining clients that never pause, a RESP2 client-side
//! cache whose invalidations are redirected) see zero errors and zero disconnects while the proxy
//! rotates 20 times back to back, with each strategy; every reply is checked, no cached value is
//! left stale, and after each rotation the old secret no longer authenticates.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::load::{Load, LoadConfig};
use support::rotation::*;
use support::*;

const ROTATIONS: usize = 20;

fn start_load(env: &RotEnv) -> Load {
    let load = Load::start(LoadConfig::new(env.proxy().client_addr(), random_token(8)));
    let from = load.progress();
    assert_eventually(Duration::from_secs(30), "load running", || {
        load.progress() > from + 500
    });
    load
}

/// Lets the load run a little between rotations, so each one hits traffic in full flow.
fn let_load_run(load: &Load) {
    let from = load.progress();
    assert_eventually(Duration::from_secs(30), "load progressing", || {
        load.progress() > from + 200
    });
}

fn rotate_under_load(mut env: RotEnv) {
    let load = start_load(&env);
    for i in 0..ROTATIONS {
        let (old_user, old_password) = env.slot("current").unwrap();
        env.rotate(false);
        assert!(
            !env.authenticates(&old_user, &old_password),
            "rotation {i}: the old secret still authenticates"
        );
        assert!(load.errors_so_far() == 0, "rotation {i}: client errors");
        let_load_run(&load);
    }
    let report = load.stop();
    report.assert_clean();
    assert_eq!(report.reconnects, 0);
    let status = env.status();
    assert_eq!(status["generation"], ROTATIONS as u64 + 1, "{status}");
    // Every drain finished before its deadline, auto-pipeliners and BLPOP 0 consumers included.
    assert_eq!(
        env.proxy()
            .metric("rotaproxy_drain_deadline_connections_total")
            .unwrap_or(0.0),
        0.0,
        "a drain ran into its deadline"
    );
    eprintln!("{}", report.details);
    env.assert_nothing_leaked();
}

#[test]
fn twenty_multi_password_rotations_under_load() {
    rotate_under_load(RotEnv::multi_password("drain_deadline = \"2s\"\n"));
}

#[test]
fn twenty_alternating_user_rotations_under_load() {
    rotate_under_load(RotEnv::alternating("drain_deadline = \"2s\"\n"));
}

#[test]
fn twenty_external_rotations_by_symlink_swap_under_load() {
    let ExternalEnv {
        redis,
        mut volume,
        proxy,
        mut password,
        dir: _dir,
    } = ExternalEnv::start("poll_interval = \"500ms\"\n");
    let status = || -> Value {
        let (_, body) = proxy.http_get("/v1/status");
        serde_json::from_str(&body).unwrap()
    };
    let load = Load::start(LoadConfig::new(proxy.client_addr(), random_token(8)));
    let_load_run(&load);
    let mut secrets = vec![password.clone()];
    for i in 0..ROTATIONS {
        // The external system: add the new password, publish it, and once the proxy has moved
        // every connection, remove the old one.
        let new = random_token(32);
        redis
            .admin_cmd(&["ACL", "SETUSER", "app", &format!(">{new}")])
            .assert_ok();
        volume.publish(&new);
        let generation = i as u64 + 2;
        assert_eventually(Duration::from_secs(30), "proxy followed the source", || {
            let s = status();
            s["generation"] == generation && s["rotation"].is_null()
        });
        redis
            .admin_cmd(&["ACL", "SETUSER", "app", &format!("<{password}")])
            .assert_ok();
        password = new;
        secrets.push(password.clone());
        assert!(load.errors_so_far() == 0, "rotation {i}: client errors");
        let_load_run(&load);
    }
    let report = load.stop();
    report.assert_clean();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_secret_in_logs(&proxy, &secrets);
}
