//! Credential rotation as operators and applications see it: real redis-server, the proxy as a
//! child process, its admin API, and clients that must notice nothing.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::rotation::*;
use support::*;

#[test]
fn multi_password_rotation_moves_every_kind_of_session() {
    let mut env = RotEnv::multi_password("");
    let old = env.secrets[0].clone();
    let proxy_addr = env.proxy().client_addr();

    let mut idle = RespConn::connect(proxy_addr);
    idle.cmd(&["SELECT", "3"]).assert_ok();
    idle.cmd(&["SET", "k", "before"]).assert_ok();
    let mut sub2 = RespConn::connect(proxy_addr);
    sub2.cmd(&["SUBSCRIBE", "news"]).assert_not_error();
    let mut sub3 = RespConn::connect(proxy_addr);
    sub3.cmd(&["HELLO", "3"]).assert_not_error();
    sub3.cmd(&["SUBSCRIBE", "news"]).assert_not_error();
    let mut parked = RespConn::connect(proxy_addr);
    parked.send_cmd(&["BLPOP", "jobs", "0"]);
    let mut watcher = RespConn::connect(proxy_addr);
    watcher.cmd(&["WATCH", "w"]).assert_ok();
    assert_eventually(Duration::from_secs(10), "BLPOP parked", || {
        env.redis
            .client_list()
            .iter()
            .any(|c| c.get("cmd").map(String::as_str) == Some("blpop"))
    });

    let result = env.rotate(false);
    let (user, new) = env.slot("current").unwrap();
    assert_eq!(user, "app");
    assert_ne!(new, old);

    // The old password is gone from the server; only the new one is left.
    assert!(!env.authenticates("app", &old), "old password still works");
    assert!(env.authenticates("app", &new));
    assert_eq!(
        acl_passwords(&env.redis, "app"),
        vec![sha256_hex(&env.redis, &new)]
    );

    // Every session carries on as if nothing happened.
    idle.cmd(&["GET", "k"]).assert_bulk("before");
    env.redis
        .admin_cmd(&["PUBLISH", "news", "after"])
        .assert_int(2);
    assert_eq!(
        sub2.read_reply(),
        Frame::Array(vec![
            Frame::bulk("message"),
            Frame::bulk("news"),
            Frame::bulk("after")
        ])
    );
    assert_eq!(
        sub3.read_reply(),
        Frame::Push(vec![
            Frame::bulk("message"),
            Frame::bulk("news"),
            Frame::bulk("after")
        ])
    );
    env.redis.admin_cmd(&["LPUSH", "jobs", "j1"]).assert_int(1);
    assert_eq!(
        parked.read_reply(),
        Frame::Array(vec![Frame::bulk("jobs"), Frame::bulk("j1")])
    );
    parked.cmd(&["PING"]).assert_simple("PONG");
    watcher.cmd(&["MULTI"]).assert_ok();
    watcher.cmd(&["SET", "w", "1"]).assert_simple("QUEUED");
    assert_eq!(
        watcher.cmd(&["EXEC"]),
        Frame::Array(vec![Frame::simple("OK")])
    );

    // The armed WATCH kept its session on the old connection (it waits for the transaction,
    // and still works: authenticated connections survive a password change), so it was the one
    // connection left at the drain deadline; it moved as soon as its EXEC was answered.
    let status = env.status();
    assert_eq!(status["generation"], 2, "{status}");
    assert_eq!(status["last_rotation"]["outcome"], "success");
    assert_eq!(
        status["last_rotation"]["connections_left_at_revoke"], 1,
        "{status}"
    );
    assert_eventually(
        Duration::from_secs(10),
        "every session on the new generation",
        || env.status()["connections"]["previous"] == 0,
    );
    assert!(result["rotation_id"].as_str().unwrap().starts_with("rot-"));
    let moved = env
        .proxy()
        .metric("rotaproxy_sessions_moved_total")
        .unwrap_or(0.0);
    assert!(moved >= 5.0, "sessions moved: {moved}");
    env.assert_nothing_leaked();
}

#[test]
fn client_side_caching_with_a_redirect_keeps_working_across_rotations() {
    // The RESP2 way of client-side caching: one connection subscribes to the invalidation
    // channel, the others redirect their invalidations to it. A rotation swaps the subscribed
    // connection (it cannot re-authenticate in place) and re-authenticates the tracker in place.
    let mut env = RotEnv::alternating("");
    let addr = env.proxy().client_addr();
    let mut target = RespConn::connect(addr);
    target.set_read_timeout(Some(Duration::from_secs(30)));
    let target_id = target.client_id();
    target
        .cmd(&["SUBSCRIBE", INVALIDATION_CHANNEL])
        .assert_not_error();
    let mut tracker = RespConn::connect(addr);
    tracker.redirect_tracking_to(target_id);
    for round in 0..2 {
        tracker.cmd(&["GET", "cached"]).assert_not_error();
        env.rotate(false);
        // Invalidations sent while the redirect pointed at the old connection are lost, so the
        // target's client is told to drop everything; after that, they arrive again.
        assert_eq!(
            target.read_reply(),
            invalidation_message(None),
            "round {round}"
        );
        tracker.cmd(&["GET", "cached"]).assert_not_error();
        env.redis.admin_cmd(&["INCR", "cached"]).assert_not_error();
        assert_eq!(
            target.read_reply(),
            invalidation_message(Some(&["cached"])),
            "round {round}"
        );
    }
    tracker.cmd(&["ACL", "WHOAMI"]).assert_bulk("app-a");
    for metric in [
        "rotaproxy_tracking_redirects_followed_total",
        "rotaproxy_client_cache_flushes_total",
    ] {
        assert_eq!(env.proxy().metric(metric), Some(2.0), "{metric}");
    }
    env.assert_nothing_leaked();
}

#[test]
fn alternating_users_take_turns_and_the_previous_is_scrambled() {
    let mut env = RotEnv::alternating("");
    let first = env.secrets[0].clone();
    let mut c = env.proxy().conn();
    c.cmd(&["ACL", "WHOAMI"]).assert_bulk("app-a");

    env.rotate(false);
    assert_eq!(env.status()["active_username"], "app-b");
    c.cmd(&["ACL", "WHOAMI"]).assert_bulk("app-b");
    assert!(
        !env.authenticates("app-a", &first),
        "previous user's password not scrambled"
    );
    let (user, pw_b) = env.slot("current").unwrap();
    assert_eq!(user, "app-b");
    assert!(env.authenticates("app-b", &pw_b));

    env.rotate(false);
    c.cmd(&["ACL", "WHOAMI"]).assert_bulk("app-a");
    assert!(!env.authenticates("app-b", &pw_b));
    let status = env.status();
    assert_eq!(status["generation"], 3);
    assert_eq!(status["strategy"], "alternating-users");
    env.assert_nothing_leaked();
}

/// `POST /v1/rotate?wait=true` for a rotation expected to fail: its error.
fn failed_rotation(env: &RotEnv) -> String {
    let (code, body) = env
        .proxy()
        .http_post("/v1/rotate?wait=true", Some(TOKEN), "");
    assert_eq!(code, 500, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["outcome"], "failed", "{body}");
    v["error"].as_str().expect("an error").to_string()
}

/// A rotation to a user that may do less would move every session to a user whose commands
/// are refused: it is refused before anything changes, and runs once the rules match.
#[test]
fn alternating_users_refuse_to_hand_over_to_a_user_that_may_do_less() {
    let mut env = RotEnv::alternating_with_rules("~* &* +@all", Some("~* &* +@read"), "");
    let idle = env.idle_password.clone().unwrap();
    let mut c = env.proxy().conn();
    c.cmd(&["SET", "k", "v"]).assert_ok();

    let error = failed_rotation(&env);
    assert!(
        error.contains("app-b may not do what app-a may (commands differ)"),
        "{error}"
    );
    let status = env.status();
    assert_eq!(status["active_username"], "app-a");
    assert_eq!(status["generation"], 1);
    assert!(env.authenticates("app-b", &idle), "app-b was changed");
    c.cmd(&["SET", "k", "w"]).assert_ok();
    c.cmd(&["ACL", "WHOAMI"]).assert_bulk("app-a");

    // Switching users on and off is the rotation's own doing, not a difference.
    env.redis
        .admin_cmd(&["ACL", "SETUSER", "app-b", "off", "+@all"])
        .assert_ok();
    env.rotate(false);
    c.cmd(&["ACL", "WHOAMI"]).assert_bulk("app-b");
    c.cmd(&["SET", "k", "x"]).assert_ok();
    env.assert_nothing_leaked();
}

/// Users of a multi-tenant database can carry thousands of key patterns: `ACL GETUSER` then
/// answers with far more than a handshake reply (here about 230 KB). The users are compared
/// all the same, down to the one pattern in which they differ.
#[test]
fn alternating_users_with_thousands_of_key_patterns_are_compared_whole() {
    let patterns: Vec<String> = (0..10_000)
        .map(|i| format!("~tenant:{i:05}:cache:*"))
        .collect();
    let rules = format!("{} &* +@all", patterns.join(" "));
    let one_short = format!("{} &* +@all", patterns[1..].join(" "));
    assert!(
        rules.len() > 200 * 1024,
        "the rules should pass 64 KiB by far"
    );

    let env = RotEnv::alternating_with_rules(&rules, Some(&one_short), "");
    let error = failed_rotation(&env);
    assert!(
        error.contains("app-b may not do what app-a may (keys differ)"),
        "{error}"
    );
    assert_eq!(env.status()["generation"], 1);

    let mut env = RotEnv::alternating_with_rules(&rules, Some(&rules), "");
    let mut c = env.proxy().conn();
    c.cmd(&["SET", "tenant:00042:cache:k", "v"]).assert_ok();
    env.rotate(false);
    assert_eq!(env.status()["active_username"], "app-b");
    c.cmd(&["ACL", "WHOAMI"]).assert_bulk("app-b");
    c.cmd(&["GET", "tenant:00042:cache:k"]).assert_bulk("v");
    env.assert_nothing_leaked();
}

#[test]
fn alternating_users_refuse_to_hand_over_to_a_user_that_does_not_exist() {
    let env = RotEnv::alternating_with_rules("~* &* +@all", None, "");
    let error = failed_rotation(&env);
    assert!(error.contains("user app-b does not exist"), "{error}");
    let users = env.redis.admin_cmd(&["ACL", "USERS"]);
    assert!(
        !format!("{users:?}").contains("app-b"),
        "the rotation created the user: {users:?}"
    );
    env.proxy()
        .conn()
        .cmd(&["ACL", "WHOAMI"])
        .assert_bulk("app-a");
    assert_eq!(env.status()["generation"], 1);
}

/// Without `acl|getuser` the users cannot be compared: the rotation runs, and says so.
#[test]
fn alternating_users_rotate_when_the_rules_cannot_be_read_and_say_so() {
    let rules = "~* &* +@all -acl|getuser";
    let mut env = RotEnv::alternating_with_rules(rules, Some(rules), "");
    env.rotate(false);
    assert_eq!(env.status()["active_username"], "app-b");
    let line = env
        .proxy()
        .wait_for_log("cannot compare the permissions", Duration::from_secs(10));
    assert!(line.contains("NOPERM"), "{line}");
    env.assert_nothing_leaked();
}

/// [`dry_run`], and which checks failed.
fn dry_run_failures(env: &RotEnv) -> (u16, Value, Vec<String>) {
    let (code, v) = dry_run(env.proxy());
    let failed = v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["result"] == "failed")
        .map(|c| c["check"].as_str().unwrap().to_string())
        .collect();
    (code, v, failed)
}

/// The preflight finds what would make the next rotation fail, without changing anything, and
/// says when it holds again.
#[test]
fn a_preflight_finds_what_would_stop_a_rotation_and_changes_nothing() {
    let env = RotEnv::alternating("");
    let idle = env.idle_password.clone().unwrap();
    assert_eventually(Duration::from_secs(30), "the start-up preflight", || {
        env.status()["preflight"]["ok"] == true
    });
    assert_eq!(
        env.proxy().metric("rotaproxy_rotation_preflight_ok"),
        Some(1.0)
    );
    let acl_before = env.redis.admin_cmd(&["ACL", "LIST"]);
    let (code, report, failed) = dry_run_failures(&env);
    assert_eq!(code, 200, "{report}");
    assert!(failed.is_empty(), "{report}");
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "state",
            "users_match",
            "control_connection",
            "acl_setuser",
            "client_kill",
            "idle_user_unused"
        ]
    );
    assert!(
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["result"] == "ok"),
        "{report}"
    );
    assert_eq!(env.redis.admin_cmd(&["ACL", "LIST"]), acl_before);
    assert!(env.authenticates("app-b", &idle), "app-b was changed");

    // Both users lose the commands a rotation needs, and the state cannot be written.
    for user in ["app-a", "app-b"] {
        env.redis
            .admin_cmd(&["ACL", "SETUSER", user, "-acl|setuser", "-client|kill"])
            .assert_ok();
    }
    let blocker = env.dir.path().join("state").join(".rotaproxy-preflight");
    std::fs::create_dir(&blocker).unwrap();
    let (code, report, failed) = dry_run_failures(&env);
    assert_eq!(code, 412, "{report}");
    assert_eq!(failed, ["state", "acl_setuser", "client_kill"], "{report}");
    let text = report.to_string();
    assert!(
        text.contains("app-a may not run ACL SETUSER on app-a, app-b (NOPERM)"),
        "{text}"
    );
    assert!(text.contains("may not run CLIENT KILL (NOPERM)"), "{text}");
    assert_eq!(
        env.proxy().metric("rotaproxy_rotation_preflight_ok"),
        Some(0.0)
    );
    let line = env
        .proxy()
        .wait_for_log("a rotation could not run now", Duration::from_secs(10));
    assert!(line.contains("acl_setuser"), "{line}");
    assert_eq!(env.status()["preflight"]["ok"], false);

    for user in ["app-a", "app-b"] {
        env.redis
            .admin_cmd(&["ACL", "SETUSER", user, "+acl|setuser", "+client|kill"])
            .assert_ok();
    }
    std::fs::remove_dir(&blocker).unwrap();
    let (code, report, _) = dry_run_failures(&env);
    assert_eq!(code, 200, "{report}");
    // The proxy logs the line before it answers, but the test reads its output through a
    // pipe: wait for the line to arrive, then check it came once.
    let said = || {
        env.proxy()
            .logs()
            .iter()
            .filter(|l| l.contains("a rotation could run now"))
            .count()
    };
    assert_eventually(
        Duration::from_secs(10),
        "the verdict's change logged",
        || said() >= 2,
    );
    assert_eq!(said(), 2, "said at start and once it holds again");
    assert_eq!(env.status()["generation"], 1);
    env.assert_nothing_leaked();
}

/// A schedule set, changed and taken away by SIGHUP: restarting a sidecar would cut its
/// application's connections. Other `[rotation]` changes still wait for a restart.
#[test]
fn a_sighup_sets_the_rotation_schedule_without_a_restart() {
    let mut env = RotEnv::multi_password("");
    let started = env.config.clone();
    let mut c = env.proxy().conn();
    c.cmd(&["SET", "k", "v"]).assert_ok();
    assert!(env.status()["next_scheduled_rotation"].is_null());
    let sighup = |env: &RotEnv, config: &str, n: usize| {
        std::fs::write(env.proxy().config_path(), config).expect("rewrite the config");
        env.proxy().hangup();
        assert_eventually(Duration::from_secs(10), "the SIGHUP is handled", || {
            env.proxy()
                .logs()
                .iter()
                .filter(|l| l.contains("SIGHUP: client auth entries re-read"))
                .count()
                >= n
        });
    };

    let scheduled = started.replace(
        "[rotation]\n",
        "[rotation]\nrotate_every = \"1s\"\ndrain_deadline = \"2s\"\n",
    );
    let scheduled = scheduled.replace("drain_deadline = \"3s\"\n", "");
    sighup(&env, &scheduled, 1);
    assert_eventually(Duration::from_secs(30), "two scheduled rotations", || {
        env.status()["generation"].as_u64() >= Some(3)
    });
    let status = env.status();
    assert_eq!(
        status["config"]["last_sighup"]["rotation_changed"],
        serde_json::json!(["rotate_every", "drain_deadline"]),
        "{status}"
    );
    assert_eq!(
        env.proxy().metric("rotaproxy_config_restart_pending"),
        Some(0.0)
    );
    c.cmd(&["GET", "k"]).assert_bulk("v");

    // Back to no schedule (and a password length only a restart applies).
    let unscheduled = started.replace("[rotation]\n", "[rotation]\npassword_length = 40\n");
    sighup(&env, &unscheduled, 2);
    assert_eventually(Duration::from_secs(10), "no rotation is scheduled", || {
        let s = env.status();
        s["next_scheduled_rotation"].is_null() && s["rotation"].is_null()
    });
    let generation = env.status()["generation"].clone();
    let line = env.proxy().wait_for_log(
        "SIGHUP: these changes are not applied until a restart",
        Duration::from_secs(10),
    );
    assert!(line.contains("changed=rotation"), "{line}");
    assert_eq!(env.status()["generation"], generation);
    c.cmd(&["GET", "k"]).assert_bulk("v");
    env.remember_current_password();
    env.assert_nothing_leaked();
}

/// The idle user must be the proxy's alone: another client using it could not reconnect once
/// the next rotation sets its password.
#[test]
fn a_preflight_sees_another_client_on_the_idle_user() {
    let env = RotEnv::alternating("");
    let idle = env.idle_password.clone().unwrap();
    let (code, report) = dry_run(env.proxy());
    assert_eq!(code, 200, "{report}");
    assert_eq!(preflight_check(&report, "idle_user_unused")["result"], "ok");

    let mut other = RespConn::connect(env.redis.addr());
    other.cmd(&["AUTH", "app-b", &idle]).assert_ok();
    let (code, report) = dry_run(env.proxy());
    assert_eq!(code, 412, "{report}");
    let check = preflight_check(&report, "idle_user_unused");
    assert_eq!(check["result"], "failed");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .starts_with("1 connection(s) authenticated as app-b are not this proxy's"),
        "{check}"
    );
    drop(other);
    assert_eventually(Duration::from_secs(10), "the other client is gone", || {
        dry_run(env.proxy()).0 == 200
    });
}

/// A failed preflight is looked at again soon (here every second, the interval being a minute),
/// so a failure that was passing does not hold the gauge, and an alert on it, for an interval.
#[test]
fn a_failed_preflight_is_looked_at_again_before_its_interval() {
    let rules = "~* &* +@all -acl|setuser";
    let env = RotEnv::alternating_with_rules(rules, Some(rules), "preflight_interval = \"1m\"\n");
    assert_eventually(
        Duration::from_secs(30),
        "the start-up preflight failed",
        || env.proxy().metric("rotaproxy_rotation_preflight_ok") == Some(0.0),
    );
    for user in ["app-a", "app-b"] {
        env.redis
            .admin_cmd(&["ACL", "SETUSER", user, "+acl|setuser"])
            .assert_ok();
    }
    assert_eventually(
        Duration::from_secs(30),
        "a passing preflight, unasked",
        || env.proxy().metric("rotaproxy_rotation_preflight_ok") == Some(1.0),
    );
    assert_eq!(env.status()["preflight"]["ok"], true);
}

/// `rotaproxy check-config --connect FILE` with the environment the proxy has.
fn check_config_connect(env: &RotEnv) -> CommandOutput {
    let args = [
        Path::new("check-config"),
        Path::new("--connect"),
        env.proxy().config_path(),
    ];
    run_rotaproxy(&args, &env_refs(&env.envs))
}

/// Before a deploy: the config against the real server. It reads the state a start would
/// read (so it knows the credential of now, not the file's first one), writes nothing, and
/// fails on what would stop a rotation.
#[test]
fn check_config_connect_tries_a_config_against_the_server_without_changing_anything() {
    let mut env = RotEnv::alternating("");
    env.rotate(false);
    // The proxy's own preflight (which writes a file and removes it) is over.
    assert_eventually(Duration::from_secs(30), "the start-up preflight", || {
        env.status()["preflight"]["ok"] == true
    });
    let state_before = std::fs::read(env.state_file()).unwrap();
    let CommandOutput {
        ok,
        stdout: out,
        stderr: err,
    } = check_config_connect(&env);
    assert!(ok, "{out}{err}");
    let names: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "state",
            "upstream",
            "users_match",
            "control_connection",
            "acl_setuser",
            "client_kill",
            "idle_user_unused"
        ],
        "{out}"
    );
    assert!(
        out.contains("authenticated as app-b (current credential)"),
        "{out}"
    );
    assert_eq!(std::fs::read(env.state_file()).unwrap(), state_before);
    let left: Vec<_> = std::fs::read_dir(env.state_file().parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, ["rotaproxy-state.json"], "nothing else written");

    for user in ["app-a", "app-b"] {
        env.redis
            .admin_cmd(&["ACL", "SETUSER", user, "-acl|setuser"])
            .assert_ok();
    }
    let CommandOutput {
        ok,
        stdout: out,
        stderr: err,
    } = check_config_connect(&env);
    assert!(!ok, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("acl_setuser") && l.contains("failed")),
        "{out}"
    );
    assert!(
        err.contains("acl_setuser: app-b may not run ACL SETUSER"),
        "{err}"
    );
    let mut secrets: Vec<&str> = env.secrets.iter().map(String::as_str).collect();
    secrets.push(TOKEN);
    assert_no_secret_in_lines(&[out, err], &secrets);
    env.assert_nothing_leaked();
}

#[test]
fn urgent_rotation_closes_the_old_identitys_other_connections() {
    let mut env = RotEnv::alternating("");
    let leaked = env.secrets[0].clone();
    // Someone holding the leaked password keeps a connection open.
    let mut intruder = RespConn::connect(env.redis.addr());
    intruder.cmd(&["AUTH", "app-a", &leaked]).assert_ok();
    let mut app = env.proxy().conn();
    app.cmd(&["SET", "x", "1"]).assert_ok();

    env.rotate(true);

    // The intruder's session is gone; the application's is not.
    intruder.set_read_timeout(Some(Duration::from_secs(5)));
    intruder.send_raw(b"PING\r\n");
    assert!(
        intruder.try_read_reply().is_err(),
        "intruder still connected"
    );
    app.cmd(&["GET", "x"]).assert_bulk("1");
    assert!(!env.authenticates("app-a", &leaked));
    env.assert_nothing_leaked();
}

/// On a busy database `CLIENT LIST` runs to megabytes (a few hundred bytes per connection): an
/// urgent rotation still reads all of it and closes every other connection of the old identity.
#[test]
fn urgent_rotation_closes_the_old_identitys_connections_on_a_busy_database() {
    let mut env = RotEnv::alternating("");
    let leaked = env.secrets[0].clone();
    // Other clients, with long names, take CLIENT LIST well past 64 KiB.
    let long_name = "x".repeat(1000);
    let mut bystanders: Vec<RespConn> = (0..300)
        .map(|_| {
            let mut c = RespConn::connect(env.redis.addr());
            c.cmd(&["CLIENT", "SETNAME", &long_name]).assert_ok();
            c
        })
        .collect();
    let mut intruders: Vec<RespConn> = (0..3)
        .map(|_| {
            let mut c = RespConn::connect(env.redis.addr());
            c.cmd(&["AUTH", "app-a", &leaked]).assert_ok();
            c
        })
        .collect();
    let list = env.redis.admin_cmd(&["CLIENT", "LIST"]);
    let size = list.as_bytes().map_or(0, <[u8]>::len);
    assert!(size > 256 * 1024, "CLIENT LIST is {size} bytes");
    let mut app = env.proxy().conn();
    app.cmd(&["SET", "x", "1"]).assert_ok();

    env.rotate(true);

    for intruder in &mut intruders {
        intruder.set_read_timeout(Some(Duration::from_secs(5)));
        intruder.send_raw(b"PING\r\n");
        assert!(
            intruder.try_read_reply().is_err(),
            "intruder still connected"
        );
    }
    bystanders[0].cmd(&["PING"]).assert_simple("PONG");
    app.cmd(&["GET", "x"]).assert_bulk("1");
    env.assert_nothing_leaked();
}

#[test]
fn the_rotate_endpoint_needs_the_token_and_never_runs_twice() {
    let mut env = RotEnv::multi_password("");
    let proxy = env.proxy();
    assert_eq!(proxy.http_post("/v1/rotate", None, "").0, 401);
    assert_eq!(proxy.http_post("/v1/rotate", Some("wrong"), "").0, 401);
    drop(env.proxy.take());
    // A rotation stuck after its drain (fault injection) is reported, never started again.
    env.launch(&[("ROTAPROXY_FAULT_HANG_AT_STEP", "revoke")]);
    let (code, body) = env.proxy().http_post("/v1/rotate", Some(TOKEN), "");
    assert_eq!(code, 202, "{body}");
    let first: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(first["state"], "started");
    env.proxy()
        .wait_for_log("fault injection: hanging", Duration::from_secs(20));
    let (_, body) = env.proxy().http_post("/v1/rotate", Some(TOKEN), "");
    let second: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(second["state"], "in_progress");
    assert_eq!(second["rotation_id"], first["rotation_id"]);
    assert_eq!(second["escalated"], false);
    let (_, body) = env
        .proxy()
        .http_post("/v1/rotate?urgent=true", Some(TOKEN), "");
    let third: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(third["escalated"], true, "{third}");
    let status = env.status();
    assert_eq!(status["rotation"]["step"], "revoke");
    assert_eq!(status["rotation"]["urgent"], true);
    env.remember_current_password();
    env.assert_nothing_leaked();
}

#[test]
fn a_crash_at_any_step_resumes_the_rotation_without_lockout() {
    for step in ["create", "set", "test", "finish", "drain", "revoke"] {
        let mut env = RotEnv::multi_password("");
        let old = env.secrets[0].clone();
        let mut app = RespConn::connect(env.proxy().client_addr());
        app.cmd(&["SET", "k", "v"]).assert_ok();
        drop(env.proxy.take());
        env.launch(&[("ROTAPROXY_FAULT_HANG_AT_STEP", step)]);
        let (code, body) = env.proxy().http_post("/v1/rotate", Some(TOKEN), "");
        assert_eq!(code, 202, "{step}: {body}");
        env.proxy()
            .wait_for_log("fault injection: hanging", Duration::from_secs(20));
        if let Some((_, pending)) = env.slot("pending") {
            env.secrets.push(pending);
        }
        env.proxy.as_mut().unwrap().kill();

        // Restarted without the fault: it authenticates and finishes the same rotation.
        env.launch(&[]);
        let resumed = env.proxy();
        assert_eventually(
            Duration::from_secs(30),
            "rotation resumed and finished",
            || {
                let s = env.status();
                s["rotation"].is_null() && s["last_rotation"]["outcome"] == "success"
            },
        );
        resumed.conn().cmd(&["GET", "k"]).assert_bulk("v");
        env.remember_current_password();
        let (_, current) = env.slot("current").unwrap();
        assert!(env.slot("pending").is_none(), "{step}: PENDING left behind");
        assert_ne!(current, old, "{step}: the rotation did not finish");
        // Exactly one password is valid on the server: the one the proxy holds.
        assert_eq!(
            acl_passwords(&env.redis, "app"),
            vec![sha256_hex(&env.redis, &current)],
            "{step}: inconsistent passwords"
        );
        assert!(
            !env.authenticates("app", &old),
            "{step}: old password still works"
        );
        env.assert_nothing_leaked();
    }
}

#[test]
fn scheduled_rotations_happen_on_their_own() {
    let env = RotEnv::multi_password("rotate_every = \"1s\"\n");
    assert_eventually(Duration::from_secs(30), "three scheduled rotations", || {
        env.status()["generation"].as_u64().unwrap_or(0) >= 3
    });
    let status = env.status();
    assert!(status["next_scheduled_rotation"].is_string(), "{status}");
    env.proxy().conn().cmd(&["PING"]).assert_simple("PONG");
}

#[test]
fn external_rotation_follows_a_secret_volume() {
    let ExternalEnv {
        redis,
        mut volume,
        proxy,
        password,
        dir: _dir,
    } = ExternalEnv::start("poll_interval = \"200ms\"\n");
    let mut c = proxy.conn();
    c.cmd(&["SET", "k", "1"]).assert_ok();

    // Another system adds a new password, publishes it, and removes the old one later.
    let new = random_token(32);
    redis
        .admin_cmd(&["ACL", "SETUSER", "app", &format!(">{new}")])
        .assert_ok();
    volume.publish(&new);
    assert_eventually(Duration::from_secs(20), "proxy followed the source", || {
        let (_, body) = proxy.http_get("/v1/status");
        let s: Value = serde_json::from_str(&body).unwrap();
        s["generation"] == 2 && s["rotation"].is_null()
    });
    redis
        .admin_cmd(&["ACL", "SETUSER", "app", &format!("<{password}")])
        .assert_ok();
    c.cmd(&["INCR", "k"]).assert_int(2);
    // New connections authenticate with the new password.
    let mut fresh = proxy.conn();
    fresh.cmd(&["CLIENT", "SETNAME", "fresh"]).assert_ok();
    fresh.cmd(&["GET", "k"]).assert_bulk("2");

    // The preflight of a follower: the state, and the source it follows.
    let (code, report) = dry_run(&proxy);
    assert_eq!(code, 200, "{report}");
    assert_eq!(preflight_check(&report, "source")["result"], "ok");
    volume.publish_files(&[]);
    let (code, report) = dry_run(&proxy);
    assert_eq!(code, 412, "{report}");
    assert_eq!(preflight_check(&report, "source")["result"], "failed");
    assert_no_secret_in_logs(&proxy, &[&password, &new]);
}

#[test]
fn a_password_changed_behind_the_proxys_back_is_followed_once_the_source_has_it() {
    // The poll is an hour away: the new password is found by the directory's change events or
    // by the re-reads of the refresh window (either alone is enough: the test passes with
    // change events switched off).
    let ExternalEnv {
        redis,
        mut volume,
        proxy,
        password,
        dir: _dir,
    } = ExternalEnv::start("poll_interval = \"1h\"\nrefresh_window = \"30s\"\n");
    let mut c = proxy.conn();
    c.cmd(&["SELECT", "1"]).assert_ok();
    c.cmd(&["SET", "k", "1"]).assert_ok();

    // The password changes on the server, and every connection the proxy had is dropped.
    let new = change_the_password_behind_the_proxys_back(&redis);
    assert_eventually(
        Duration::from_secs(10),
        "proxy saw its connections go",
        || {
            proxy
                .metric("rotaproxy_upstream_reconnects_total")
                .unwrap_or(0.0)
                >= 1.0
        },
    );

    // The client's next command has to wait for a connection the server accepts...
    let waiter = std::thread::spawn(move || {
        let r = c.cmd(&["INCR", "k"]);
        (r, c)
    });
    assert_eventually(Duration::from_secs(10), "the proxy was refused", || {
        proxy
            .metric("rotaproxy_upstream_auth_probe_failures_total")
            .unwrap_or(0.0)
            >= 1.0
    });
    // ...which it gets once the secret volume catches up.
    volume.publish(&new);
    let (reply, mut c) = waiter.join().unwrap();
    reply.assert_int(2);
    c.cmd(&["GET", "k"]).assert_bulk("2");
    // A change the proxy followed is no authentication failure to alert on.
    assert_eq!(
        proxy
            .metric("rotaproxy_upstream_auth_failures_total")
            .unwrap_or(0.0),
        0.0
    );
    let (_, body) = proxy.http_get("/v1/status");
    let s: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(s["generation"], 2, "{s}");
    assert_no_secret_in_logs(&proxy, &[&password, &new]);
}

/// Gives user `app` a new password on the server, and drops every connection it had.
fn change_the_password_behind_the_proxys_back(redis: &RedisServer) -> String {
    let new = random_token(32);
    redis
        .admin_cmd(&["ACL", "SETUSER", "app", "resetpass", &format!(">{new}")])
        .assert_ok();
    redis
        .admin_cmd(&["CLIENT", "KILL", "USER", "app"])
        .assert_not_error();
    new
}

#[test]
fn a_refusal_the_source_never_explains_is_a_real_authentication_failure() {
    let ExternalEnv {
        redis,
        volume: _volume,
        proxy,
        password,
        dir: _dir,
    } = ExternalEnv::start("poll_interval = \"1h\"\nrefresh_window = \"1s\"\n");
    let new = change_the_password_behind_the_proxys_back(&redis);
    // The source never gets the new password: after the refresh window the client hears why,
    // and the refusal counts as a real one, for the alert.
    let mut c = proxy.conn();
    let mut reply = c.cmd(&["PING"]);
    let started = std::time::Instant::now();
    while reply == Frame::simple("PONG") && started.elapsed() < Duration::from_secs(30) {
        // A pooled connection opened before the change may still serve a command or two.
        c = proxy.conn();
        reply = c.cmd(&["PING"]);
    }
    reply.assert_error("ERR rotaproxy: upstream unavailable");
    assert_eventually(Duration::from_secs(10), "the refusal counted", || {
        proxy
            .metric("rotaproxy_upstream_auth_failures_total")
            .unwrap_or(0.0)
            >= 1.0
    });
    assert_no_secret_in_logs(&proxy, &[&password, &new]);
}

#[test]
fn the_admin_users_password_is_followed_from_its_file() {
    let password = random_token(32);
    let (rotator_old, rotator_new) = (random_token(32), random_token(32));
    let redis = RedisServer::start(
        RedisOptions::new()
            .user(&format!("app on >{password} ~* &* +@all -@admin"))
            .user(&format!(
                "rotator on >{rotator_old} +acl|setuser +client|list +client|kill"
            )),
    );
    let secrets = temp_dir();
    let rotator_file = secrets.path().join("rotator-password");
    std::fs::write(&rotator_file, &rotator_old).expect("write");
    let extra = format!(
        "[rotation.admin]\nusername = \"rotator\"\npassword = \"file:{}\"\n",
        rotator_file.display()
    );
    let mut env = RotEnv::start_with_envs(
        redis,
        Some("app"),
        password.clone(),
        "acl-multi-password",
        &extra,
        &[],
    );
    env.secrets.push(rotator_old.clone());
    env.secrets.push(rotator_new.clone());
    env.rotate(false);
    // The rotator's own password is rotated elsewhere: the server first, then its file.
    env.redis
        .admin_cmd(&[
            "ACL",
            "SETUSER",
            "rotator",
            &format!(">{rotator_new}"),
            &format!("<{rotator_old}"),
        ])
        .assert_ok();
    let next = secrets.path().join("rotator-password.next");
    std::fs::write(&next, &rotator_new).expect("write");
    std::fs::rename(&next, &rotator_file).expect("rename");
    // The next rotation authenticates its ACL SETUSER with the new one, no restart.
    env.rotate(false);
    let (_, current) = env.slot("current").unwrap();
    assert!(env.authenticates("app", &current));
    env.proxy()
        .wait_for_log("rotation.admin password changed", Duration::from_secs(10));
    env.assert_nothing_leaked();
}

#[test]
fn a_separate_admin_user_rotates_an_app_user_that_may_not_run_acl() {
    let password = random_token(32);
    let rotator_password = random_token(32);
    let redis = RedisServer::start(
        RedisOptions::new()
            .user(&format!("app on >{password} ~* &* +@all -@admin"))
            .user(&format!(
                "rotator on >{rotator_password} +acl|setuser +client|list +client|kill"
            )),
    );
    // The application's user cannot change its own password...
    let mut direct = RespConn::connect(redis.addr());
    direct.cmd(&["AUTH", "app", &password]).assert_ok();
    direct
        .cmd(&["ACL", "SETUSER", "app", ">x1234567"])
        .assert_error("NOPERM");
    // ...so the proxy uses the rotator's credential for that.
    let extra =
        "[rotation.admin]\nusername = \"rotator\"\npassword = \"env:TEST_ROTATOR_PASSWORD\"\n";
    let mut env = RotEnv::start_with_envs(
        redis,
        Some("app"),
        password.clone(),
        "acl-multi-password",
        extra,
        &[("TEST_ROTATOR_PASSWORD", &rotator_password)],
    );
    env.secrets.push(rotator_password);
    env.rotate(true);
    let (_, new) = env.slot("current").unwrap();
    assert!(env.authenticates("app", &new));
    assert!(!env.authenticates("app", &password));
    env.proxy()
        .conn()
        .cmd(&["ACL", "WHOAMI"])
        .assert_bulk("app");
    env.assert_nothing_leaked();
}

/// During a drain, `GET /v1/clients` says what keeps each session still on the old generation
/// from moving: an open transaction, an armed WATCH, a blocking command.
#[test]
fn the_clients_endpoint_says_what_keeps_a_session_from_moving() {
    let env = RotEnv::multi_password("drain_deadline = \"60s\"\n");
    let named_conn = |name: &str| {
        let mut c = env.proxy().conn();
        c.cmd(&["CLIENT", "SETNAME", name]).assert_ok();
        c
    };
    let mut watcher = named_conn("watcher");
    watcher.cmd(&["WATCH", "w"]).assert_ok();
    let mut tx = named_conn("tx");
    tx.cmd(&["MULTI"]).assert_ok();
    let mut blocked = named_conn("blocked");
    blocked.send_cmd(&["BLPOP", "q", "0"]);
    let _idle = named_conn("idle");
    assert_eventually(Duration::from_secs(10), "BLPOP parked", || {
        env.redis
            .client_list()
            .iter()
            .any(|c| c.get("cmd").map(String::as_str) == Some("blpop"))
    });
    let clients = || -> Vec<Value> {
        let (code, body) = env.proxy().http_get("/v1/clients");
        assert_eq!(code, 200, "{body}");
        let doc: Value = serde_json::from_str(&body).expect("JSON");
        doc["clients"].as_array().expect("a list").clone()
    };
    let shows = |expected: &[(&str, u64, Value)]| {
        let list = clients();
        expected.iter().all(|(name, generation, waiting)| {
            list.iter().any(|c| {
                c["name"] == *name
                    && c["generation"] == *generation
                    && c["waiting_to_move"] == *waiting
            })
        })
    };
    assert!(shows(&[
        ("idle", 1, Value::Null),
        ("watcher", 1, Value::Null)
    ]));

    let (code, body) = env.proxy().http_post("/v1/rotate", Some(TOKEN), "");
    assert_eq!(code, 202, "{body}");
    assert_eventually(Duration::from_secs(30), "the reasons shown", || {
        shows(&[
            ("idle", 2, Value::Null),
            ("watcher", 1, "watch".into()),
            ("tx", 1, "transaction".into()),
            ("blocked", 1, "blocking_command".into()),
        ])
    });

    watcher.cmd(&["UNWATCH"]).assert_ok();
    assert_eq!(tx.cmd(&["EXEC"]), Frame::Array(vec![]));
    env.redis.admin_cmd(&["LPUSH", "q", "job"]).assert_int(1);
    assert_eq!(
        blocked.read_reply(),
        Frame::Array(vec![Frame::bulk("q"), Frame::bulk("job")])
    );
    for c in [&mut watcher, &mut tx, &mut blocked] {
        c.cmd(&["PING"]).assert_simple("PONG");
    }
    assert_eventually(Duration::from_secs(30), "every session moved", || {
        shows(&[
            ("idle", 2, Value::Null),
            ("watcher", 2, Value::Null),
            ("tx", 2, Value::Null),
            ("blocked", 2, Value::Null),
        ])
    });
    assert_eventually(Duration::from_secs(30), "the rotation over", || {
        env.status()["last_rotation"]["outcome"] == "success"
    });
    env.assert_nothing_leaked();
}

/// `GET /v1/clients`: the sessions, what their connections hold, and the credential generation
/// each is on, which a rotation moves.
#[test]
fn the_clients_endpoint_shows_each_session_and_its_generation() {
    let mut env = RotEnv::multi_password("drain_deadline = \"5s\"\n");
    let mut worker = env.proxy().conn();
    worker.cmd(&["SELECT", "2"]).assert_ok();
    worker.cmd(&["CLIENT", "SETNAME", "worker-1"]).assert_ok();
    let worker_id = worker.client_id();
    let mut listener = env.proxy().conn();
    listener
        .cmd(&["CLIENT", "SETNAME", "listener-1"])
        .assert_ok();
    listener.send_cmd(&["SUBSCRIBE", "news", "alerts"]);
    listener.read_reply();
    listener.read_reply();
    let clients = |env: &RotEnv| -> Vec<Value> {
        let (code, body) = env.proxy().http_get("/v1/clients");
        assert_eq!(code, 200, "{body}");
        let doc: Value = serde_json::from_str(&body).expect("JSON");
        let list = doc["clients"].as_array().expect("a list").clone();
        assert_eq!(doc["count"], list.len(), "{doc}");
        list
    };
    let named = |list: &[Value], name: &str| -> Option<Value> {
        list.iter().find(|c| c["name"] == name).cloned()
    };
    let list = clients(&env);
    let w = named(&list, "worker-1").expect("the worker is listed");
    assert_eq!(w["db"], 2, "{w}");
    assert_eq!(w["id"], worker_id, "{w}");
    assert_eq!(w["protocol"], 2, "{w}");
    assert_eq!(w["generation"], 1, "{w}");
    assert_eq!(w["authenticated"], true, "{w}");
    assert!(
        w["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{w}"
    );
    let l = named(&list, "listener-1").expect("the subscriber is listed");
    assert_eq!(l["subscriptions"], 2, "{l}");

    // A rotation moves both to the new generation.
    env.rotate(false);
    assert_eventually(
        Duration::from_secs(30),
        "both sessions on generation 2",
        || {
            let list = clients(&env);
            ["worker-1", "listener-1"]
                .iter()
                .all(|name| named(&list, name).is_some_and(|c| c["generation"] == 2))
        },
    );
    worker.cmd(&["GET", "k"]);
    // A session that ends leaves the list.
    drop(worker);
    assert_eventually(
        Duration::from_secs(10),
        "the worker is gone from the list",
        || named(&clients(&env), "worker-1").is_none(),
    );
    assert!(named(&clients(&env), "listener-1").is_some());

    // A session with nothing to replay that loses its connection shows the new one once it
    // has it.
    let mut plain = env.proxy().conn();
    let plain_id = plain.client_id();
    let by_id = |env: &RotEnv| clients(env).into_iter().find(|c| c["id"] == plain_id);
    env.redis
        .admin_cmd(&["CLIENT", "KILL", "ID", &plain_id.to_string()])
        .assert_int(1);
    plain.cmd(&["PING"]).assert_simple("PONG");
    assert_eventually(
        Duration::from_secs(10),
        "the new connection is shown",
        || by_id(&env).is_some_and(|c| c["generation"] == 2),
    );
    env.assert_nothing_leaked();
}
