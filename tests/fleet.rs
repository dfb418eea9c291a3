//! A fleet of proxies sharing one rotating credential (`[rotation.fleet]`): one real
//! redis-server, several rotaproxy processes, their admin APIs, and clients on every member
//! that must notice nothing. The fleet's shared state lives in that same Redis.

mod support;

use std::path::Path;
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use serde_json::Value;
use support::load::{Load, LoadConfig};
use support::rotation::{TOKEN, dry_run, preflight_check};
use support::*;

const PREFIX: &str = "rotaproxy:fleet:test";

/// What the fleet's own user may do: its keys only, and the commands it runs. README
/// ("A fleet of sidecars") shows the same rule.
/// Waits until every load has made 200 more requests: the members serve throughout.
fn wait_for_load_progress(loads: &[Load]) {
    for load in loads {
        let from = load.progress();
        assert_eventually(Duration::from_secs(30), "load progressing", || {
            load.progress() > from + 200
        });
    }
}

fn store_user_rules(password: &str) -> String {
    format!(
        "rp-fleet on >{password} resetkeys ~{{{PREFIX}}}:* resetchannels -@all \
         +eval +get +set +incr +pexpire +del +hset +hgetall +hdel +rpush +lpop +time +ping \
         +client|id +wait"
    )
}

/// Redis with two alternating users and the fleet's user, and the members started so far.
struct FleetEnv {
    redis: RedisServer,
    dir: tempfile::TempDir,
    key: String,
    first_password: String,
    envs: Vec<(String, String)>,
    /// `[rotation]` lines added to every member's config.
    rotation_extra: String,
    /// `[rotation.fleet]` lines added to every member's config.
    fleet_extra: String,
    members: Vec<(String, Option<Proxy>)>,
    secrets: Vec<String>,
    /// Mutual TLS to Redis, the fleet's store connections included.
    certs: Option<Certs>,
    /// The user the proxies start as, and the strategy's `[rotation]` lines.
    user: String,
    strategy: String,
    /// Members that look at the fleet less often than every 200 ms: (instance, interval).
    poll_intervals: Vec<(String, String)>,
}

impl FleetEnv {
    fn alternating(rotation_extra: &str, fleet_extra: &str) -> FleetEnv {
        Self::alternating_over(false, rotation_extra, fleet_extra)
    }

    /// With `mtls`, Redis serves mutual TLS only, and every member's connections use it.
    fn alternating_over(mtls: bool, rotation_extra: &str, fleet_extra: &str) -> FleetEnv {
        let idle = random_token(32);
        Self::new(
            mtls,
            "app-a",
            &[format!("app-b on >{idle} ~* &* +@all")],
            "strategy = \"alternating-users\"\nusers = [\"app-a\", \"app-b\"]",
            rotation_extra,
            fleet_extra,
            vec![idle],
        )
    }

    /// `acl-multi-password` on user `app`, which changes its own password.
    fn multi_password(rotation_extra: &str) -> FleetEnv {
        let strategy = "strategy = \"acl-multi-password\"";
        Self::new(false, "app", &[], strategy, rotation_extra, "", vec![])
    }

    fn new(
        mtls: bool,
        user: &str,
        more_users: &[String],
        strategy: &str,
        rotation_extra: &str,
        fleet_extra: &str,
        mut secrets: Vec<String>,
    ) -> FleetEnv {
        let dir = temp_dir();
        let certs = mtls.then(|| Certs::generate(&dir.path().join("certs")));
        let first_password = random_token(32);
        let store_password = random_token(32);
        let mut options = RedisOptions::new()
            .user(&format!("{user} on >{first_password} ~* &* +@all"))
            .user(&store_user_rules(&store_password));
        for rule in more_users {
            options = options.user(rule);
        }
        if let Some(certs) = &certs {
            options = options.tls(RedisTls::from_certs(certs, true));
        }
        let redis = RedisServer::start(options);
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).unwrap();
        let key = base64::engine::general_purpose::STANDARD.encode(key);
        FleetEnv {
            redis,
            dir,
            certs,
            envs: vec![
                ("TEST_UPSTREAM_PASSWORD".into(), first_password.clone()),
                ("TEST_ADMIN_TOKEN".into(), TOKEN.into()),
                ("TEST_FLEET_KEY".into(), key.clone()),
                ("TEST_FLEET_PASSWORD".into(), store_password.clone()),
            ],
            secrets: {
                secrets.extend([first_password.clone(), store_password, key.clone()]);
                secrets
            },
            user: user.to_string(),
            strategy: strategy.to_string(),
            key,
            first_password,
            rotation_extra: rotation_extra.into(),
            fleet_extra: fleet_extra.into(),
            members: Vec::new(),
            poll_intervals: Vec::new(),
        }
    }

    fn config(&self, instance: &str) -> String {
        let base = match &self.certs {
            Some(certs) => ProxyConfig::tls(&self.redis, &certs.ca).client_cert(&certs.client),
            None => ProxyConfig::plain(&self.redis),
        };
        let mut config = base
            .credentials(Some(&self.user), "env:TEST_UPSTREAM_PASSWORD")
            .extra(&format!(
                "[rotation]\n{}\n\
                 state_dir = {}\nurgent_drain_deadline = \"2s\"\n{}\n\
                 [rotation.fleet]\nkey_prefix = \"{PREFIX}\"\nkey = \"env:TEST_FLEET_KEY\"\n\
                 username = \"rp-fleet\"\npassword = \"env:TEST_FLEET_PASSWORD\"\n\
                 instance = \"{instance}\"\npoll_interval = \"{}\"\n{}\n",
                self.strategy,
                // Unused by a fleet member; given so a test would see it written.
                toml_path(&self.dir.path().join(instance)),
                self.rotation_extra,
                self.poll_intervals
                    .iter()
                    .find(|(name, _)| name == instance)
                    .map_or("200ms", |(_, interval)| interval.as_str()),
                self.fleet_extra,
            ));
        config.admin_extra = "token = \"env:TEST_ADMIN_TOKEN\"".into();
        config.to_toml()
    }

    /// Starts member `instance` (again, if it ran before) and returns its index.
    fn start(&mut self, instance: &str, extra_env: &[(&str, &str)]) -> usize {
        let mut envs = env_refs(&self.envs);
        envs.extend_from_slice(extra_env);
        let proxy = Proxy::start(&self.config(instance), &envs);
        match self.members.iter().position(|(name, _)| name == instance) {
            Some(i) => {
                self.members[i].1 = Some(proxy);
                i
            }
            None => {
                self.members.push((instance.to_string(), Some(proxy)));
                self.members.len() - 1
            }
        }
    }

    /// Starts member `instance` with environment variable `name` set to `value` instead, expects
    /// the start to fail, and returns its log.
    fn refused_start(&self, instance: &str, name: &str, value: &str) -> String {
        let envs: Vec<(&str, &str)> = env_refs(&self.envs)
            .into_iter()
            .map(|(k, v)| if k == name { (k, value) } else { (k, v) })
            .collect();
        match Proxy::try_start(&self.config(instance), &envs) {
            Ok(_) => panic!("member {instance} started with another {name}"),
            Err(failure) => failure.logs.join("\n"),
        }
    }

    fn member(&self, i: usize) -> &Proxy {
        self.members[i].1.as_ref().expect("member running")
    }

    fn status(&self, i: usize) -> Value {
        let (code, body) = self.member(i).http_get("/v1/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status is JSON")
    }

    /// Starts `p1`, the fleet's rotator, then `p2`, a follower.
    fn leader_and_follower(&mut self) -> (usize, usize) {
        let p1 = self.start("p1", &[]);
        self.wait_for_role(p1, "leader");
        let p2 = self.start("p2", &[]);
        self.wait_for_role(p2, "follower");
        (p1, p2)
    }

    fn wait_for_role(&self, i: usize, role: &str) {
        assert_eventually(
            Duration::from_secs(30),
            &format!("member {} is the fleet's {role}", self.members[i].0),
            || self.status(i)["fleet"]["role"] == role,
        );
    }

    /// Waits until one of `members` is the fleet's rotator, and returns it.
    fn wait_for_leader(&self, members: &[usize]) -> usize {
        let mut leader = None;
        assert_eventually(Duration::from_secs(30), "a member leads the fleet", || {
            leader = members
                .iter()
                .copied()
                .find(|&m| self.status(m)["fleet"]["role"] == "leader");
            leader.is_some()
        });
        leader.expect("found above")
    }

    /// Waits until member `i` uses `user` and has no connection on an older generation.
    fn wait_until_moved(&self, i: usize, user: &str) {
        assert_eventually(
            Duration::from_secs(30),
            &format!("member {} moved to {user}", self.members[i].0),
            || {
                let status = self.status(i);
                status["active_username"] == user && status["connections"]["previous"] == 0
            },
        );
    }

    /// Starts a rotation on member `i` and returns its id.
    fn start_rotation(&self, i: usize) -> String {
        let (code, body) = self.member(i).http_post("/v1/rotate", Some(TOKEN), "");
        assert_eq!(code, 202, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["rotation_id"]
            .as_str()
            .expect("a rotation id")
            .to_string()
    }

    /// Waits until member `i` reports rotation `id` over, and returns its last_rotation.
    fn wait_for_outcome(&self, i: usize, id: &str) -> Value {
        let mut last = Value::Null;
        assert_eventually(
            Duration::from_secs(60),
            &format!("rotation {id} over on member {}", self.members[i].0),
            || {
                last = self.status(i)["last_rotation"].clone();
                last["id"] == id
            },
        );
        last
    }

    /// The shared state as the fleet keeps it in Redis: sealed.
    fn sealed_state(&self) -> Vec<u8> {
        self.redis
            .admin_cmd(&["GET", &format!("{{{PREFIX}}}:state")])
            .as_bytes()
            .expect("the fleet's state is in Redis")
            .to_vec()
    }

    /// The shared state opened with the fleet's key, as a member would open it.
    fn shared_state(&self) -> Value {
        let sealed = self.sealed_state();
        let rest = sealed.strip_prefix(b"rpf1").expect("sealed state format");
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let key = base64::engine::general_purpose::STANDARD
            .decode(&self.key)
            .unwrap();
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap());
        let mut body = body.to_vec();
        let plain = key
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).unwrap(),
                Aad::from(PREFIX.as_bytes()),
                &mut body,
            )
            .expect("the state opens with the fleet key");
        serde_json::from_slice(plain).unwrap()
    }

    /// Every password the shared state holds now, added to the secrets checked for leaks.
    fn remember_shared_passwords(&mut self) {
        let state = self.shared_state();
        for slot in ["current", "pending", "previous"] {
            if let Some(pw) = state[slot]["password"].as_str()
                && !self.secrets.iter().any(|s| s == pw)
            {
                self.secrets.push(pw.to_string());
            }
        }
    }

    fn authenticates(&self, user: &str, password: &str) -> bool {
        let mut c = RespConn::connect(self.redis.addr());
        c.cmd(&["AUTH", user, password]) == Frame::simple("OK")
    }

    /// No secret in any member's log, nor in the status and metrics of those still running.
    fn assert_nothing_leaked(&mut self) {
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        for (_, proxy) in &mut self.members {
            let Some(proxy) = proxy else { continue };
            assert_no_secret_in_logs(proxy, &secrets);
            if !proxy.is_running() {
                continue;
            }
            let (_, status) = proxy.http_get("/v1/status");
            let (_, metrics) = proxy.http_get("/metrics");
            assert_no_secret_in_lines(&[status, metrics], &secrets);
        }
    }
}

#[test]
fn a_fleet_rotates_once_and_revokes_only_after_every_member_moved() {
    let mut env = FleetEnv::alternating("drain_deadline = \"60s\"", "member_timeout = \"20s\"");
    let p1 = env.start("p1", &[]);
    env.wait_for_role(p1, "leader");
    let p2 = env.start("p2", &[]);
    let p3 = env.start("p3", &[]);
    for member in [p2, p3] {
        env.wait_for_role(member, "follower");
        assert_eq!(env.status(member)["fleet"]["leader"], "p1");
    }
    assert_eventually(Duration::from_secs(30), "all three members report", || {
        env.status(p1)["fleet"]["members"]
            .as_array()
            .is_some_and(|m| m.len() == 3)
    });

    // Clients on every member: idle ones with a selected db, a RESP3 subscriber, and on p2 one
    // with a WATCH armed, which keeps its session on the old connection until its EXEC.
    let mut idle: Vec<RespConn> = [p1, p2, p3]
        .iter()
        .map(|&m| {
            let mut c = env.member(m).conn();
            c.cmd(&["SELECT", "2"]).assert_ok();
            c.cmd(&["SET", &format!("k{m}"), "before"]).assert_ok();
            c
        })
        .collect();
    let mut subscriber = env.member(p3).conn();
    subscriber.cmd(&["HELLO", "3"]).assert_not_error();
    subscriber.cmd(&["SUBSCRIBE", "news"]).assert_not_error();
    let mut watcher = env.member(p2).conn();
    watcher.cmd(&["WATCH", "w"]).assert_ok();

    let id = env.start_rotation(p1);
    env.wait_until_moved(p3, "app-b");
    assert_eventually(
        Duration::from_secs(30),
        "p2 uses app-b, its WATCH still on app-a",
        || {
            let s = env.status(p2);
            s["active_username"] == "app-b" && s["connections"]["previous"] == 1
        },
    );
    // p2 has told the fleet it still holds a connection of the old user: the rotator may not
    // revoke it, however long ago its own sessions moved.
    assert_eventually(
        Duration::from_secs(30),
        "the rotator sees p2 holding the old user",
        || {
            env.status(p1)["fleet"]["members"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["instance"] == "p2" && m["previous_connections"] == 1)
        },
    );
    let status = env.status(p1);
    assert_eq!(status["rotation"]["id"], id.as_str(), "{status}");
    assert_eq!(status["rotation"]["step"], "drain", "{status}");
    assert!(
        env.authenticates("app-a", &env.first_password),
        "the old password was revoked while p2 still used it"
    );

    watcher.cmd(&["MULTI"]).assert_ok();
    watcher.cmd(&["SET", "w", "1"]).assert_simple("QUEUED");
    assert_eq!(
        watcher.cmd(&["EXEC"]),
        Frame::Array(vec![Frame::simple("OK")])
    );
    let outcome = env.wait_for_outcome(p1, &id);
    assert_eq!(outcome["outcome"], "success", "{outcome}");
    assert_eq!(
        outcome["fleet_members_left_at_revoke"],
        serde_json::json!([])
    );
    assert!(!env.authenticates("app-a", &env.first_password));
    env.remember_shared_passwords();
    let shared = env.shared_state();
    assert_eq!(shared["current"]["username"], "app-b");
    assert!(shared["previous"].is_null() && shared["rotation"].is_null());
    let current = shared["current"]["password"].as_str().unwrap();
    assert!(env.authenticates("app-b", current));

    // Only sealed bytes are in Redis: no password, not even the JSON's field names.
    let sealed = env.sealed_state();
    for needle in [current.as_bytes(), b"current", b"app-b"] {
        assert!(
            !sealed.windows(needle.len()).any(|w| w == needle),
            "the shared state is readable in Redis"
        );
    }

    // Every client carries on, on every member.
    for (c, m) in idle.iter_mut().zip([p1, p2, p3]) {
        c.cmd(&["GET", &format!("k{m}")]).assert_bulk("before");
        c.cmd(&["ACL", "WHOAMI"]).assert_bulk("app-b");
    }
    watcher.cmd(&["ACL", "WHOAMI"]).assert_bulk("app-b");
    env.redis
        .admin_cmd(&["PUBLISH", "news", "after"])
        .assert_int(1);
    assert_eq!(
        subscriber.read_reply(),
        Frame::Push(vec![
            Frame::bulk("message"),
            Frame::bulk("news"),
            Frame::bulk("after")
        ])
    );
    for member in [p2, p3] {
        assert_eq!(env.status(member)["fleet"]["synced_generation"], 2);
        assert_eventually(
            Duration::from_secs(30),
            "followers show the rotation's outcome",
            || env.status(member)["last_rotation"]["id"] == id.as_str(),
        );
    }
    env.assert_nothing_leaked();
}

#[test]
fn when_the_rotator_dies_mid_rotation_another_member_finishes_it() {
    let mut env = FleetEnv::alternating(
        "drain_deadline = \"30s\"",
        "lease_ttl = \"1500ms\"\nmember_timeout = \"1500ms\"",
    );
    let p1 = env.start("p1", &[("ROTAPROXY_FAULT_HANG_AT_STEP", "drain")]);
    env.wait_for_role(p1, "leader");
    let p2 = env.start("p2", &[]);
    env.wait_for_role(p2, "follower");
    let mut client = env.member(p2).conn();
    client.cmd(&["SELECT", "5"]).assert_ok();
    client.cmd(&["SET", "k", "v"]).assert_ok();
    let mut subscriber = env.member(p2).conn();
    subscriber.cmd(&["SUBSCRIBE", "news"]).assert_not_error();

    let id = env.start_rotation(p1);
    env.member(p1)
        .wait_for_log("hanging at rotation step", Duration::from_secs(30));
    // The switch is shared before the drain: p2 follows while the rotator hangs.
    env.wait_until_moved(p2, "app-b");
    env.members[p1].1.as_mut().unwrap().kill();

    // p2 takes the lease once it expires, and resumes the rotation where p1 left it.
    env.wait_for_role(p2, "leader");
    let outcome = env.wait_for_outcome(p2, &id);
    assert_eq!(outcome["outcome"], "success", "{outcome}");
    assert!(!env.authenticates("app-a", &env.first_password));
    assert!(
        env.member(p2)
            .log_contains("this proxy now rotates for the fleet"),
        "no take-over logged"
    );
    client.cmd(&["GET", "k"]).assert_bulk("v");
    client.cmd(&["ACL", "WHOAMI"]).assert_bulk("app-b");
    env.redis
        .admin_cmd(&["PUBLISH", "news", "after"])
        .assert_int(1);
    assert_eq!(
        subscriber.read_reply(),
        Frame::Array(vec![
            Frame::bulk("message"),
            Frame::bulk("news"),
            Frame::bulk("after")
        ])
    );

    // p1 comes back with the configured (now revoked) password: it learns the credential of
    // now from the shared state and follows the new rotator.
    let p1 = env.start("p1", &[]);
    env.wait_for_role(p1, "follower");
    env.wait_until_moved(p1, "app-b");
    assert_eq!(env.status(p1)["fleet"]["leader"], "p2");
    let mut late = env.member(p1).conn();
    late.cmd(&["ACL", "WHOAMI"]).assert_bulk("app-b");
    env.remember_shared_passwords();
    env.assert_nothing_leaked();
}

#[test]
fn a_fleet_over_mutual_tls_rotates_and_follows() {
    let mut env = FleetEnv::alternating_over(true, "drain_deadline = \"10s\"", "");
    let (p1, p2) = env.leader_and_follower();
    let mut client = env.member(p2).conn();
    client.cmd(&["SET", "k", "v"]).assert_ok();

    // A renewed client certificate is each member's own business: a local generation, which
    // the fleet's shared numbering must not trip over at the next rotation.
    let certs = env.certs.as_ref().unwrap();
    let renewed = certs.issue_client("renewed-client");
    for (from, to) in [
        (&renewed.key, &certs.client.key),
        (&renewed.cert, &certs.client.cert),
    ] {
        let staged = to.with_extension("staged");
        std::fs::copy(from, &staged).unwrap();
        std::fs::rename(&staged, to).unwrap();
    }
    for member in [p1, p2] {
        assert_eventually(
            Duration::from_secs(30),
            "the member follows its renewed certificate",
            || env.status(member)["generation"] == 2,
        );
    }
    assert_eq!(env.shared_state()["generation"], 1);

    let id = env.start_rotation(p1);
    assert_eq!(env.wait_for_outcome(p1, &id)["outcome"], "success");
    env.wait_until_moved(p2, "app-b");
    assert_eq!(env.shared_state()["generation"], 2);
    for member in [p1, p2] {
        assert_eq!(env.status(member)["generation"], 3);
    }
    client.cmd(&["GET", "k"]).assert_bulk("v");
    client.cmd(&["ACL", "WHOAMI"]).assert_bulk("app-b");
    assert!(!env.authenticates("app-a", &env.first_password));
    env.remember_shared_passwords();
    env.assert_nothing_leaked();
}

#[test]
fn a_fleet_rotates_a_user_that_holds_two_passwords_for_a_while() {
    let mut env = FleetEnv::multi_password("drain_deadline = \"10s\"");
    let (p1, p2) = env.leader_and_follower();
    let mut client = env.member(p2).conn();
    client.cmd(&["SELECT", "4"]).assert_ok();
    client.cmd(&["SET", "k", "v"]).assert_ok();
    let mut old = env.first_password.clone();
    for round in 0..2 {
        let id = env.start_rotation(p1);
        assert_eq!(env.wait_for_outcome(p1, &id)["outcome"], "success");
        env.remember_shared_passwords();
        let new = env.shared_state()["current"]["password"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eventually(Duration::from_secs(30), "p2 synced", || {
            env.status(p2)["fleet"]["synced_generation"] == round + 2
        });
        // Only the new password is left on the server, and p2 works with it.
        assert!(!env.authenticates("app", &old), "round {round}");
        assert!(env.authenticates("app", &new), "round {round}");
        let reply = env.redis.admin_cmd(&["ACL", "GETUSER", "app"]);
        let fields = reply.as_array().unwrap();
        let at = fields
            .iter()
            .position(|f| f.as_bytes() == Some(b"passwords"))
            .unwrap();
        assert_eq!(fields[at + 1].as_array().unwrap().len(), 1, "round {round}");
        client.cmd(&["GET", "k"]).assert_bulk("v");
        let mut fresh = env.member(p2).conn();
        fresh.cmd(&["ACL", "WHOAMI"]).assert_bulk("app");
        old = new;
    }
    env.assert_nothing_leaked();
}

#[test]
fn a_follower_passes_rotation_requests_on_to_the_rotator() {
    let mut env = FleetEnv::alternating("drain_deadline = \"10s\"", "");
    let (p1, p2) = env.leader_and_follower();

    let (code, body) = env.member(p2).http_post("/v1/rotate", None, "");
    assert_eq!(code, 401, "{body}");
    // Waiting works there too: the rotator answers with the rotation's id, and the follower
    // sees its outcome in the shared state.
    let (code, body) = env
        .member(p2)
        .http_post("/v1/rotate?wait=true", Some(TOKEN), "");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "finished", "{body}");
    assert_eq!(v["outcome"], "success", "{body}");
    assert_eq!(v["leader"], "p1", "{body}");
    let id = v["rotation_id"].as_str().expect("the rotation's id");
    assert_eq!(env.status(p1)["last_rotation"]["id"], id);
    env.wait_until_moved(p2, "app-b");

    // A dry run is not passed on: every member checks for itself, the fleet's state included.
    let (code, report) = dry_run(env.member(p2));
    assert_eq!(code, 200, "{report}");
    let state = preflight_check(&report, "state");
    assert!(
        state["detail"].as_str().unwrap().contains(PREFIX),
        "{report}"
    );
    // So does `check-config --connect` with a member's config, reading the fleet's state
    // (the credential of now: app-b) without taking the lease.
    let args = [
        Path::new("check-config"),
        Path::new("--connect"),
        env.member(p2).config_path(),
    ];
    let out = run_rotaproxy(&args, &env_refs(&env.envs));
    let printed = out.printed();
    assert!(out.ok, "{printed}");
    assert!(
        printed.contains("authenticated as app-b (current credential)"),
        "{printed}"
    );
    assert_eq!(env.status(p1)["fleet"]["role"], "leader");

    let (code, body) = env
        .member(p2)
        .http_post("/v1/rotate?urgent=true", Some(TOKEN), "");
    assert_eq!(code, 202, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"], "passed_on");
    assert_eq!(v["leader"], "p1");
    assert_eq!(v["urgent"], true);
    assert_eventually(
        Duration::from_secs(30),
        "the rotator ran the passed-on urgent rotation",
        || env.status(p1)["generation"] == 3 && env.status(p1)["rotation"].is_null(),
    );
    env.wait_until_moved(p2, "app-a");
    assert!(
        env.member(p1)
            .log_contains("rotation requested through another fleet member"),
        "the rotator did not log where the request came from"
    );
    assert!(!env.authenticates("app-a", &env.first_password));
    assert!(
        env.member(p1).log_contains("trigger=\"fleet-urgent\""),
        "the urgent request lost its urgency on the way"
    );
    env.remember_shared_passwords();
    env.assert_nothing_leaked();
}

/// A follower that looks at the fleet only now and then still finds how the rotation it passed
/// on ended when another rotation has ended since (the state keeps the last few outcomes).
#[test]
fn a_follower_waiting_for_a_passed_on_rotation_finds_it_over_after_another() {
    let mut env = FleetEnv::multi_password("drain_deadline = \"300ms\"");
    env.poll_intervals.push(("p2".into(), "5s".into()));
    let (p1, p2) = env.leader_and_follower();
    std::thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            env.member(p2)
                .http_post("/v1/rotate?wait=true", Some(TOKEN), "")
        });
        // The passed-on rotation ends on the rotator (the follower lags, so the drain stops
        // at its deadline) ...
        let mut first = String::new();
        assert_eventually(
            Duration::from_secs(30),
            "the passed-on rotation ended",
            || {
                first = env.status(p1)["last_rotation"]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                !first.is_empty()
            },
        );
        // ... and another one at once, most likely before the follower looks again.
        let (code, body) = env
            .member(p1)
            .http_post("/v1/rotate?wait=true", Some(TOKEN), "");
        assert_eq!(code, 200, "{body}");
        let second: Value = serde_json::from_str(&body).unwrap();
        assert_ne!(second["rotation_id"], first.as_str());

        let (code, body) = waiter.join().expect("the waiting request");
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["state"], "finished", "{body}");
        assert_eq!(v["outcome"], "success", "{body}");
        assert_eq!(v["rotation_id"], first.as_str(), "{body}");
    });
    env.remember_shared_passwords();
    env.assert_nothing_leaked();
}

#[test]
fn two_members_given_one_instance_name_are_told_so() {
    let mut env = FleetEnv::alternating("", "");
    let first = env.start("twin", &[]);
    env.wait_for_role(first, "leader");
    // Started under the same name, the second takes the first's place in the list, so its
    // handle on the first is gone: both are checked through the metric and the logs.
    let second = Proxy::start(&env.config("twin"), &env_refs(&env.envs));
    let clashes = |p: &Proxy| {
        p.metric("rotaproxy_fleet_instance_clashes_total")
            .unwrap_or(0.0)
    };
    assert_eventually(Duration::from_secs(30), "the clash is seen", || {
        clashes(env.member(first)) + clashes(&second) >= 1.0
    });
    assert!(
        env.member(first).log_contains("fleet.instance_clash")
            || second.log_contains("fleet.instance_clash")
    );
    // A member restarted under its own name is no clash (its old report is older than its
    // first new one).
    let mut env = FleetEnv::alternating("", "lease_ttl = \"1500ms\"");
    let p1 = env.start("p1", &[]);
    env.wait_for_role(p1, "leader");
    env.members[p1].1.as_mut().unwrap().kill();
    let (p1, p2) = env.leader_and_follower();
    // Once p2 has seen p1 report, neither took the other (or p1's old self) for a clash.
    assert_eventually(Duration::from_secs(30), "p2 sees p1 report", || {
        env.status(p2)["fleet"]["members"]
            .as_array()
            .is_some_and(|m| m.len() == 2)
    });
    for m in [p1, p2] {
        assert_eq!(clashes(env.member(m)), 0.0);
    }
}

#[test]
fn a_fleet_can_wait_for_its_state_to_reach_a_replica() {
    let mut env = FleetEnv::alternating(
        "drain_deadline = \"10s\"",
        "replicas = 1\nreplica_timeout = \"300ms\"\nlease_ttl = \"1500ms\"\n\
         member_timeout = \"1500ms\"",
    );
    let start_replica = |primary: &RedisServer| {
        let replica = RedisServer::start(
            RedisOptions::new().config("replicaof", &format!("127.0.0.1 {}", primary.port())),
        );
        assert_eventually(Duration::from_secs(30), "the replica in sync", || {
            replica
                .admin_cmd(&["INFO", "replication"])
                .as_str()
                .is_some_and(|info| info.contains("master_link_status:up"))
        });
        replica
    };
    // A first member whose first write cannot reach a replica serves all the same, and
    // creates the fleet's state once it can.
    let p1 = env.start("p1", &[]);
    env.member(p1).wait_for_log(
        "cannot create the fleet's shared state yet",
        Duration::from_secs(30),
    );
    env.member(p1).conn().cmd(&["PING"]).assert_simple("PONG");
    let replica = start_replica(&env.redis);
    env.wait_for_role(p1, "leader");
    assert_eventually(Duration::from_secs(30), "the shared state created", || {
        env.redis
            .admin_cmd(&["EXISTS", &format!("{{{PREFIX}}}:state")])
            == Frame::Integer(1)
    });
    let p2 = env.start("p2", &[]);
    env.wait_for_role(p2, "follower");
    let mut client = env.member(p2).conn();
    client.cmd(&["SET", "k", "v"]).assert_ok();
    let first = env.start_rotation(p1);
    assert_eq!(env.wait_for_outcome(p1, &first)["outcome"], "success");
    env.remember_shared_passwords();
    let current = env.shared_state()["current"].clone();

    // Without the replica no write of the state holds: the rotation stops at its first step,
    // and nothing changes for the clients.
    drop(replica);
    assert_eventually(Duration::from_secs(30), "the replica gone", || {
        env.redis
            .admin_cmd(&["INFO", "replication"])
            .as_str()
            .is_some_and(|info| info.contains("connected_slaves:0"))
    });
    // (The rotator may have changed already: on a busy machine the replica can take longer
    // than `replica_timeout` to confirm a write of the first rotation, and a rotator whose
    // write does not hold hands the rotation on, as below.)
    let rotator = env.wait_for_leader(&[p1, p2]);
    let refusals = |m: usize| {
        let logs = env.member(m).logs();
        logs.iter()
            .filter(|l| l.contains("reached 0 of 1 replicas"))
            .count()
    };
    let refused_before = refusals(rotator);
    let second = env.start_rotation(rotator);
    assert_eventually(
        Duration::from_secs(30),
        "the state write refused for want of a replica",
        || refusals(rotator) > refused_before,
    );
    client.cmd(&["GET", "k"]).assert_bulk("v");
    client.cmd(&["ACL", "WHOAMI"]).assert_bulk("app-b");
    assert!(env.authenticates(
        current["username"].as_str().unwrap(),
        current["password"].as_str().unwrap()
    ));

    // The replica back: the fleet's rotator resumes the rotation from the shared state.
    let _replica = start_replica(&env.redis);
    assert_eventually(Duration::from_secs(60), "the second rotation over", || {
        [p1, p2].iter().any(|&m| {
            let last = env.status(m)["last_rotation"].clone();
            last["id"] == second.as_str() && last["outcome"] == "success"
        })
    });
    env.remember_shared_passwords();
    let shared = env.shared_state();
    assert_eq!(shared["current"]["username"], "app-a");
    assert!(shared["rotation"].is_null());
    env.wait_until_moved(p2, "app-a");
    client.cmd(&["GET", "k"]).assert_bulk("v");
    env.assert_nothing_leaked();
}

/// The member list grows with the fleet (a few hundred bytes a member): a large one, here
/// 1000 members that stopped reporting long ago, is read whole, and the rotator forgets them.
#[test]
fn a_large_fleet_member_list_is_read_whole() {
    let mut env = FleetEnv::alternating("drain_deadline = \"10s\"", "");
    let members_key = format!("{{{PREFIX}}}:members");
    let report =
        r#"1 {"generation":1,"previous_connections":0,"leader":false,"incarnation":"gone"}"#;
    for batch in 0..10 {
        let mut args = vec!["HSET".to_string(), members_key.clone()];
        for i in 0..100 {
            args.push(format!("replica-{batch}-{i}-{}", "x".repeat(150)));
            args.push(report.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(env.redis.admin_cmd(&args).as_int(), Some(100));
    }
    let (p1, p2) = env.leader_and_follower();
    let id = env.start_rotation(p1);
    let outcome = env.wait_for_outcome(p1, &id);
    assert_eq!(outcome["outcome"], "success", "{outcome}");
    env.wait_until_moved(p2, "app-b");
    assert_eventually(
        Duration::from_secs(30),
        "the gone members are forgotten",
        || env.redis.admin_cmd(&["HLEN", &members_key]).as_int() == Some(2),
    );
    env.remember_shared_passwords();
    env.assert_nothing_leaked();
}

#[test]
fn a_stopping_rotator_hands_the_lease_over_at_once() {
    // A lease that would take a minute to expire: the next member leads long before.
    let mut env = FleetEnv::alternating("", "lease_ttl = \"60s\"");
    let (p1, p2) = env.leader_and_follower();
    env.member(p1).terminate();
    env.wait_for_role(p2, "leader");
    assert!(
        env.members[p1]
            .1
            .as_mut()
            .unwrap()
            .wait_exit(Duration::from_secs(30))
            .is_some(),
        "p1 did not stop"
    );
    // p1 took itself off the members at exit: the rotation does not wait for it.
    let id = env.start_rotation(p2);
    let outcome = env.wait_for_outcome(p2, &id);
    assert_eq!(outcome["outcome"], "success", "{outcome}");
    let members = env.status(p2)["fleet"]["members"].clone();
    assert_eq!(members.as_array().map(Vec::len), Some(1), "{members}");
    assert!(
        !env.member(p2).log_contains("fleet.member_gone"),
        "p1 was given up for silent instead of leaving"
    );
    env.remember_shared_passwords();
    env.assert_nothing_leaked();
}

#[test]
fn a_fleet_member_refuses_to_start_with_a_bad_key_a_refused_store_user_or_another_key() {
    let env = FleetEnv::alternating("", "");
    let bad_key = "c2hvcnQta2V5"; // base64, but 9 bytes
    let output = env.refused_start("p1", "TEST_FLEET_KEY", bad_key);
    assert!(
        output.contains("must each be 32 bytes in base64"),
        "{output}"
    );
    assert!(!output.contains(bad_key), "{output}");

    let wrong = random_token(32);
    let output = env.refused_start("p1", "TEST_FLEET_PASSWORD", &wrong);
    assert!(output.contains("fleet state"), "{output}");
    assert!(output.contains("rp-fleet"), "{output}");
    assert!(!output.contains(&wrong), "{output}");

    // Once the fleet has a state, a member with another (well-formed) key cannot open it.
    let mut env = env;
    let p1 = env.start("p1", &[]);
    env.wait_for_role(p1, "leader");
    let other_key = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    let output = env.refused_start("p2", "TEST_FLEET_KEY", &other_key);
    assert!(
        output.contains("does not open with rotation.fleet.key"),
        "{output}"
    );
    assert!(!output.contains(&other_key), "{output}");
}

#[test]
fn fleet_settings_that_cannot_work_are_refused() {
    let redis = RedisServer::start_with_user("app", "pw-0123456789");
    let base = ProxyConfig::plain(&redis)
        .credentials(Some("app"), "env:X")
        .to_toml();
    let fleet = "[rotation.fleet]\nkey_prefix = \"p\"\nkey = \"env:K\"\npassword = \"env:P\"\n";
    let dir = temp_dir();
    for (what, rotation, key) in [
        (
            "external",
            "[rotation]\nstrategy = \"external\"\n[rotation.external]\npassword = \"file:/x\"\n",
            "rotation.fleet",
        ),
        (
            "a short lease",
            "[rotation]\nstrategy = \"acl-multi-password\"\n",
            "rotation.fleet.lease_ttl",
        ),
        (
            "a hash tag in the prefix",
            "[rotation]\nstrategy = \"acl-multi-password\"\n",
            "rotation.fleet.key_prefix",
        ),
    ] {
        let mut fleet = fleet.to_string();
        if what == "a short lease" {
            fleet.push_str("poll_interval = \"5s\"\nlease_ttl = \"10s\"\n");
        }
        if what == "a hash tag in the prefix" {
            fleet = fleet.replace("key_prefix = \"p\"", "key_prefix = \"{p}\"");
        }
        let path = dir.path().join("fleet.toml");
        std::fs::write(&path, format!("{base}\n{rotation}\n{fleet}")).unwrap();
        let out = std::process::Command::new(proxy_bin())
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(stderr.contains(key), "{what}: {key} not named: {stderr}");
    }
}

#[test]
fn ten_fleet_rotations_under_load_on_every_member() {
    // The promise of a single proxy, kept by a fleet: clients of every kind on each of three
    // members see no error and no disconnect while the fleet rotates back to back, and each
    // old secret stops working only once nobody uses it.
    const ROTATIONS: usize = 10;
    let mut env = FleetEnv::alternating("drain_deadline = \"5s\"", "member_timeout = \"20s\"");
    let p1 = env.start("p1", &[]);
    env.wait_for_role(p1, "leader");
    let members = [p1, env.start("p2", &[]), env.start("p3", &[])];
    assert_eventually(Duration::from_secs(30), "all three members report", || {
        env.status(p1)["fleet"]["members"]
            .as_array()
            .is_some_and(|m| m.len() == 3)
    });
    let loads: Vec<Load> = members
        .iter()
        .map(|&m| {
            Load::start(LoadConfig::new(
                env.member(m).client_addr(),
                random_token(8),
            ))
        })
        .collect();
    wait_for_load_progress(&loads);
    for i in 0..ROTATIONS {
        let before = env.shared_state()["current"].clone();
        let (code, body) = env
            .member(p1)
            .http_post("/v1/rotate?wait=true", Some(TOKEN), "");
        assert_eq!(code, 200, "rotation {i}: {body}");
        let last = env.status(p1)["last_rotation"].clone();
        assert_eq!(
            last["fleet_members_left_at_revoke"],
            serde_json::json!([]),
            "rotation {i}: {last}"
        );
        assert!(
            !env.authenticates(
                before["username"].as_str().unwrap(),
                before["password"].as_str().unwrap()
            ),
            "rotation {i}: the old secret still authenticates"
        );
        env.remember_shared_passwords();
        for load in &loads {
            assert_eq!(load.errors_so_far(), 0, "rotation {i}: client errors");
        }
        wait_for_load_progress(&loads);
    }
    for (load, m) in loads.into_iter().zip(members) {
        let report = load.stop();
        report.assert_clean();
        assert_eq!(report.reconnects, 0);
        assert_eq!(
            env.member(m)
                .metric("rotaproxy_drain_deadline_connections_total")
                .unwrap_or(0.0),
            0.0,
            "member {m}: a drain ran into its deadline"
        );
        assert_eq!(
            env.status(m)["fleet"]["synced_generation"],
            ROTATIONS as u64 + 1
        );
    }
    env.assert_nothing_leaked();
}

#[test]
fn a_rotator_paused_past_its_lease_cannot_undo_what_its_successor_did() {
    // A rotator that stops running for a while (a frozen VM, a stopped container) and comes
    // back believing it still leads: whatever it does next must not overwrite the shared state
    // or revoke what the fleet now uses.
    let mut env = FleetEnv::alternating(
        "drain_deadline = \"60s\"",
        "lease_ttl = \"1500ms\"\nmember_timeout = \"1500ms\"",
    );
    let (p1, p2) = env.leader_and_follower();
    // Keeps p1's drain waiting: its session stays on app-a until the EXEC.
    let mut watcher = env.member(p1).conn();
    watcher.cmd(&["WATCH", "w"]).assert_ok();
    let first = env.start_rotation(p1);
    env.wait_until_moved(p2, "app-b");
    assert_eventually(Duration::from_secs(30), "p1 draining", || {
        env.status(p1)["rotation"]["step"] == "drain"
    });
    let pid = env.member(p1).pid().to_string();
    let signal = |name: &str| {
        let ok = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {name} {pid}");
    };
    signal("-STOP");
    // p2 takes over, gives the silent p1 up, finishes the first rotation and runs another:
    // app-a, the user p1 would revoke, is the fleet's current user again.
    env.wait_for_role(p2, "leader");
    assert_eq!(env.wait_for_outcome(p2, &first)["outcome"], "success");
    let second = env.start_rotation(p2);
    assert_eq!(env.wait_for_outcome(p2, &second)["outcome"], "success");
    env.remember_shared_passwords();
    let shared = env.shared_state();
    assert_eq!(shared["current"]["username"], "app-a");
    let current = shared["current"]["password"].as_str().unwrap().to_string();

    signal("-CONT");
    env.member(p1)
        .wait_for_log("this proxy stops rotating", Duration::from_secs(30));
    env.wait_for_role(p1, "follower");
    // Its watcher still works, and moves once its transaction is over.
    watcher.cmd(&["MULTI"]).assert_ok();
    watcher.cmd(&["SET", "w", "1"]).assert_simple("QUEUED");
    assert_eq!(
        watcher.cmd(&["EXEC"]),
        Frame::Array(vec![Frame::simple("OK")])
    );
    env.wait_until_moved(p1, "app-a");
    watcher.cmd(&["ACL", "WHOAMI"]).assert_bulk("app-a");
    let shared = env.shared_state();
    assert_eq!(shared["generation"], 3, "p1 overwrote the shared state");
    assert!(env.authenticates("app-a", &current), "p1 revoked app-a");
    assert_eq!(env.status(p2)["fleet"]["role"], "leader");
    env.assert_nothing_leaked();
}

/// The fence itself, below the proxy: a member whose lease was taken over writes nothing,
/// even before it has noticed, and a state sealed with another key is refused unread.
#[tokio::test]
async fn a_deposed_lease_holder_cannot_write_and_another_key_cannot_read() {
    use rotaproxy::config::Config;
    use rotaproxy::credentials::Generation;
    use rotaproxy::rotation::fleet::Fleet;
    use rotaproxy::rotation::state::{RotationState, Slot};
    use rotaproxy::rotation::store::StoreError;

    let store_password = random_token(32);
    let redis = RedisServer::start(RedisOptions::new().user(&store_user_rules(&store_password)));
    let dir = temp_dir();
    let write = |name: &str, value: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, value).unwrap();
        path.display().to_string()
    };
    let key = |byte: u8| base64::engine::general_purpose::STANDARD.encode([byte; 32]);
    let password = write("store-password", &store_password);
    let member = |instance: &str, key_file: &str, extra_key_files: &[&str]| {
        let extra_keys: Vec<String> = extra_key_files
            .iter()
            .map(|f| format!("\"file:{f}\""))
            .collect();
        let config = Config::parse(&format!(
            "[upstream]\nurl = \"{}\"\n[credentials]\npassword = \"file:{password}\"\n\
             [rotation]\nstrategy = \"acl-multi-password\"\n\
             [rotation.fleet]\nkey_prefix = \"{PREFIX}\"\nkey = \"file:{}\"\n\
             username = \"rp-fleet\"\npassword = \"file:{}\"\ninstance = \"{instance}\"\n\
             poll_interval = \"100ms\"\nlease_ttl = \"300ms\"\nmember_timeout = \"300ms\"\n\
             extra_keys = [{}]\n",
            redis.url(),
            key_file,
            password,
            extra_keys.join(", "),
        ))
        .unwrap();
        let rotation = config.rotation.as_ref().unwrap();
        let first = Generation::from_config(&config).unwrap();
        Fleet::new(
            rotation.fleet.as_ref().unwrap(),
            &first,
            &config.timeouts,
            &rotaproxy::metrics::Metrics::new(),
        )
        .unwrap()
    };
    let fleet_key = write("key", &key(7));
    let a = member("a", &fleet_key, &[]);
    let b = member("b", &fleet_key, &[]);
    let secret = random_token(32);
    let state = |generation: u64| {
        let mut state = RotationState::new(Slot::new(
            Some("app".into()),
            secrecy::SecretString::from(secret.clone()),
        ));
        state.generation = generation;
        state
    };

    assert!(a.seek_lease().await.unwrap());
    assert!(!b.seek_lease().await.unwrap());
    a.save(&state(1)).await.unwrap();
    let lease = format!("{{{PREFIX}}}:lease");
    assert_eventually(Duration::from_secs(10), "a's lease expired", || {
        redis.admin_cmd(&["EXISTS", &lease]) == Frame::Integer(0)
    });
    assert!(b.seek_lease().await.unwrap());
    // `a` has not looked since: it still believes it leads, and the store refuses it.
    assert!(a.is_leader());
    assert!(matches!(a.save(&state(9)).await, Err(StoreError::Fenced)));
    assert!(!a.is_leader());
    assert_eq!(b.load().await.unwrap().unwrap().generation, 1);
    b.save(&state(2)).await.unwrap();
    assert_eq!(a.load().await.unwrap().unwrap().generation, 2);

    let new_key = write("new-key", &key(8));
    let other = member("c", &new_key, &[]);
    let err = other.load().await.unwrap_err().to_string();
    assert!(
        err.contains("does not open with rotation.fleet.key"),
        "{err}"
    );
    assert!(!err.contains(&secret), "{err}");

    // A change of the fleet's key, member by member: the new key opens the state first, then
    // seals it while the old one still opens it; a member at either stage reads the other's.
    let adding = member("d", &fleet_key, &[&new_key]);
    let switched = member("e", &new_key, &[&fleet_key]);
    assert_eq!(switched.load().await.unwrap().unwrap().generation, 2);
    b.drop_lease();
    assert_eventually(Duration::from_secs(10), "b's lease expired", || {
        redis.admin_cmd(&["EXISTS", &lease]) == Frame::Integer(0)
    });
    assert!(switched.seek_lease().await.unwrap());
    switched.save(&state(3)).await.unwrap();
    assert_eq!(adding.load().await.unwrap().unwrap().generation, 3);
    assert!(
        a.load().await.is_err(),
        "the old key alone opened the new seal"
    );
}

#[test]
fn followers_use_pending_while_a_default_user_change_lands_on_redis_cloud() {
    // The default user has one password: once the REST task has changed it, the server
    // refuses CURRENT, and until the rotator finishes, a follower's new connections must try
    // PENDING as the rotator's do. Here the rotator stops right there (after the task, before
    // the test step), and every connection of the default user is killed.
    let store_password = random_token(32);
    let (redis, emu) = cloud_redis_with_fleet_user(&store_password);
    let dir = temp_dir();
    let fleet_key = base64::engine::general_purpose::STANDARD.encode([3u8; 32]);
    let first_password = emu.default_password();
    let strategy = format!(
        "strategy = \"default-user\"\npassword_length = 40\n\
         [rotation.database]\nkind = \"pro\"\nsubscription_id = {}\ndatabase_id = {}\n",
        emu.subscription_id(),
        emu.database_id(),
    );
    let config = |instance: &str| cloud_fleet_config(&redis, &emu, &dir, None, &strategy, instance);
    let envs = [
        ("TEST_UPSTREAM_PASSWORD", first_password.as_str()),
        ("TEST_ADMIN_TOKEN", TOKEN),
        ("TEST_FLEET_KEY", fleet_key.as_str()),
        ("TEST_FLEET_PASSWORD", store_password.as_str()),
    ];
    let mut with_hang = envs.to_vec();
    with_hang.push(("ROTAPROXY_FAULT_HANG_AT_STEP", "test"));
    let mut p1 = Proxy::start(&config("p1"), &with_hang);
    let p2 = Proxy::start(&config("p2"), &envs);
    let role = |p: &Proxy| -> Value {
        let (_, body) = p.http_get("/v1/status");
        serde_json::from_str::<Value>(&body).unwrap()["fleet"]["role"].clone()
    };
    assert_eventually(Duration::from_secs(30), "p1 leads, p2 follows", || {
        role(&p1) == "leader" && role(&p2) == "follower"
    });
    let mut client = p2.conn();
    client.cmd(&["SELECT", "3"]).assert_ok();
    client.cmd(&["SET", "k", "v"]).assert_ok();

    let (code, body) = p1.http_post("/v1/rotate", Some(TOKEN), "");
    assert_eq!(code, 202, "{body}");
    p1.wait_for_log("hanging at rotation step", Duration::from_secs(30));
    let authenticates = |password: &str| {
        let mut c = RespConn::connect(redis.addr());
        c.cmd(&["AUTH", "default", password]) == Frame::simple("OK")
    };
    assert!(!authenticates(&first_password), "the task did not land");
    redis
        .admin_cmd(&["CLIENT", "KILL", "USER", "default"])
        .assert_not_error();

    // The session replaces its lost connection with PENDING, its db kept; a new client too.
    client.cmd(&["GET", "k"]).assert_bulk("v");
    let mut late = p2.conn();
    late.cmd(&["PING"]).assert_simple("PONG");

    // The rotator dies there; p2 takes over and finishes the rotation.
    p1.kill();
    assert_eventually(Duration::from_secs(30), "p2 finished the rotation", || {
        let (_, body) = p2.http_get("/v1/status");
        let status: Value = serde_json::from_str(&body).unwrap();
        status["fleet"]["role"] == "leader" && status["last_rotation"]["outcome"] == "success"
    });
    client.cmd(&["GET", "k"]).assert_bulk("v");
    let (_, body) = p2.http_get("/v1/status");
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["connections"]["previous"], 0, "{status}");
    let secrets = [
        first_password.as_str(),
        store_password.as_str(),
        fleet_key.as_str(),
        emu.account_key(),
        emu.secret_key(),
    ];
    assert_no_secret_in_logs(&p2, &secrets);
    assert_no_secret_in_logs(&p1, &secrets);
}

/// A fleet member's config for the Redis Cloud API emulator: `strategy` holds the strategy's
/// `[rotation]` lines, then any tables of its own (`[rotation.database]`).
fn cloud_fleet_config(
    redis: &RedisServer,
    emu: &support::cloud::CloudEmulator,
    dir: &tempfile::TempDir,
    user: Option<&str>,
    strategy: &str,
    instance: &str,
) -> String {
    let keys = emu.write_key_files(dir.path());
    let (plain, tables) = strategy
        .split_once("\n[")
        .map(|(p, t)| (p.to_string(), format!("[{t}")))
        .unwrap_or((strategy.to_string(), String::new()));
    let mut config = ProxyConfig::plain(redis)
        .credentials(user, "env:TEST_UPSTREAM_PASSWORD")
        .extra(&format!(
            "[rotation]\n{plain}\nbackend = \"cloud\"\ndrain_deadline = \"10s\"\n\
             [rotation.cloud]\napi_root = \"{}\"\naccount_key = \"file:{}\"\n\
             secret_key = \"file:{}\"\nretry_base = \"10ms\"\nretry_max = \"200ms\"\n\
             task_poll_interval = \"20ms\"\n{tables}\n\
             [rotation.fleet]\nkey_prefix = \"{PREFIX}\"\nkey = \"env:TEST_FLEET_KEY\"\n\
             username = \"rp-fleet\"\npassword = \"env:TEST_FLEET_PASSWORD\"\n\
             instance = \"{instance}\"\npoll_interval = \"200ms\"\n\
             lease_ttl = \"1500ms\"\nmember_timeout = \"1500ms\"\n",
            emu.base_url(),
            keys.account.display(),
            keys.secret.display(),
        ));
    config.admin_extra = "token = \"env:TEST_ADMIN_TOKEN\"".into();
    config.to_toml()
}

/// Redis behind the Cloud API emulator, with the fleet's user on it.
fn cloud_redis_with_fleet_user(
    store_password: &str,
) -> (RedisServer, support::cloud::CloudEmulator) {
    let redis = RedisServer::start(RedisOptions::new());
    let emu = support::cloud::CloudEmulator::start(&redis);
    redis
        .admin_cmd(
            &["ACL", "SETUSER"]
                .into_iter()
                .chain(store_user_rules(store_password).split_whitespace())
                .collect::<Vec<_>>(),
        )
        .assert_ok();
    (redis, emu)
}

/// Rotations through the (emulated) Redis Cloud API by a fleet of two, with client load on
/// both: no client error, and no refusal counted as a real authentication failure.
fn cloud_fleet_rotations_under_load(default_user: bool, rotations: usize) {
    let store_password = random_token(32);
    let (redis, emu) = cloud_redis_with_fleet_user(&store_password);
    let dir = temp_dir();
    let fleet_key = base64::engine::general_purpose::STANDARD.encode([5u8; 32]);
    let (user, first_password, strategy) = if default_user {
        let strategy = format!(
            "strategy = \"default-user\"\npassword_length = 40\n\
             [rotation.database]\nkind = \"pro\"\nsubscription_id = {}\ndatabase_id = {}\n",
            emu.subscription_id(),
            emu.database_id(),
        );
        (None, emu.default_password(), strategy)
    } else {
        let (a, b) = (random_token(32), random_token(32));
        emu.create_acl_user("app-a", "app-role", &a);
        emu.create_acl_user("app-b", "app-role", &b);
        let strategy = "strategy = \"alternating-users\"\nusers = [\"app-a\", \"app-b\"]\n";
        (Some("app-a"), a, strategy.to_string())
    };
    let envs = [
        ("TEST_UPSTREAM_PASSWORD", first_password.as_str()),
        ("TEST_ADMIN_TOKEN", TOKEN),
        ("TEST_FLEET_KEY", fleet_key.as_str()),
        ("TEST_FLEET_PASSWORD", store_password.as_str()),
    ];
    let p1 = Proxy::start(
        &cloud_fleet_config(&redis, &emu, &dir, user, &strategy, "p1"),
        &envs,
    );
    let role = |p: &Proxy| -> Value {
        let (_, body) = p.http_get("/v1/status");
        serde_json::from_str::<Value>(&body).unwrap()["fleet"]["role"].clone()
    };
    assert_eventually(Duration::from_secs(30), "p1 leads", || {
        role(&p1) == "leader"
    });
    let p2 = Proxy::start(
        &cloud_fleet_config(&redis, &emu, &dir, user, &strategy, "p2"),
        &envs,
    );
    assert_eventually(Duration::from_secs(30), "p2 follows", || {
        role(&p2) == "follower"
    });
    let loads: Vec<Load> = [&p1, &p2]
        .iter()
        .map(|p| Load::start(LoadConfig::new(p.client_addr(), random_token(8))))
        .collect();
    wait_for_load_progress(&loads);
    for i in 0..rotations {
        let (code, body) = p1.http_post("/v1/rotate?wait=true", Some(TOKEN), "");
        assert_eq!(code, 200, "rotation {i}: {body}");
        for load in &loads {
            assert_eq!(load.errors_so_far(), 0, "rotation {i}: client errors");
        }
        wait_for_load_progress(&loads);
    }
    for load in loads {
        let report = load.stop();
        report.assert_clean();
        assert_eq!(report.reconnects, 0);
    }
    for p in [&p1, &p2] {
        assert_eq!(
            p.metric("rotaproxy_upstream_auth_failures_total")
                .unwrap_or(0.0),
            0.0,
            "a refusal during a rotation counted as a real authentication failure"
        );
        let secrets = [
            first_password.as_str(),
            store_password.as_str(),
            fleet_key.as_str(),
            emu.account_key(),
            emu.secret_key(),
        ];
        assert_no_secret_in_logs(p, &secrets);
    }
}

#[test]
fn a_fleet_rotates_alternating_users_through_the_redis_cloud_api_under_load() {
    cloud_fleet_rotations_under_load(false, 5);
}

#[test]
fn a_fleet_rotates_the_default_user_through_the_redis_cloud_api_under_load() {
    cloud_fleet_rotations_under_load(true, 5);
}
