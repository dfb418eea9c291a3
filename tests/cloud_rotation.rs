//! Rotating a Redis Cloud database through its REST API: the emulator (tests/support/cloud.rs)
//! stands in for the API and applies each change to a real redis-server, and the proxy rotates
//! alternating ACL users or the default user while clients keep working.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::cloud::CloudEmulator;
use support::load::{Load, LoadConfig};
use support::rotation::{TOKEN, dry_run, preflight_check};
use support::*;

struct CloudEnv {
    /// Kept alive for the emulator and the proxy.
    _redis: RedisServer,
    emu: CloudEmulator,
    proxy: Option<Proxy>,
    dir: tempfile::TempDir,
    config: String,
    envs: Vec<(String, String)>,
    secrets: Vec<String>,
}

impl CloudEnv {
    /// `alternating-users` over the ACL users `app-a` (active first) and `app-b`.
    fn alternating() -> CloudEnv {
        Self::alternating_with_roles("app-role", "app-role")
    }

    /// [`CloudEnv::alternating`], the users given these roles.
    fn alternating_with_roles(role_a: &str, role_b: &str) -> CloudEnv {
        let redis = RedisServer::start(RedisOptions::new());
        let emu = CloudEmulator::start(&redis);
        let pw_a = random_token(32);
        let pw_b = random_token(32);
        emu.create_acl_user("app-a", role_a, &pw_a);
        emu.create_acl_user("app-b", role_b, &pw_b);
        let section = "strategy = \"alternating-users\"\nusers = [\"app-a\", \"app-b\"]\n";
        Self::start(redis, emu, Some("app-a"), pw_a, section, vec![pw_b])
    }

    /// `default-user` on the emulated Pro database.
    fn default_user() -> CloudEnv {
        let redis = RedisServer::start(RedisOptions::new());
        let emu = CloudEmulator::start(&redis);
        let section = format!(
            "strategy = \"default-user\"\n[rotation.database]\nkind = \"pro\"\nsubscription_id = {}\ndatabase_id = {}\n",
            emu.subscription_id(),
            emu.database_id()
        );
        let password = emu.default_password();
        Self::start(redis, emu, None, password, &section, vec![])
    }

    fn start(
        redis: RedisServer,
        emu: CloudEmulator,
        user: Option<&str>,
        password: String,
        strategy: &str,
        mut secrets: Vec<String>,
    ) -> CloudEnv {
        let dir = temp_dir();
        let keys = emu.write_key_files(dir.path());
        // The strategy's own sub-tables (e.g. [rotation.database]) must come after the plain keys.
        let (plain, tables) = strategy
            .split_once("\n[")
            .map(|(p, t)| (p.to_string(), format!("[{t}")))
            .unwrap_or((strategy.to_string(), String::new()));
        let mut config = ProxyConfig::plain(&redis)
            .credentials(user, "env:TEST_UPSTREAM_PASSWORD")
            .extra(&format!(
                "[rotation]\n{plain}\nbackend = \"cloud\"\nstate_dir = {}\ndrain_deadline = \"2s\"\n\
                 [rotation.cloud]\napi_root = \"{}\"\naccount_key = \"file:{}\"\nsecret_key = \"file:{}\"\n\
                 retry_base = \"10ms\"\nretry_max = \"200ms\"\ntask_poll_interval = \"20ms\"\n{tables}",
                toml_path(&dir.path().join("state")),
                emu.base_url(),
                keys.account.display(),
                keys.secret.display(),
            ));
        config.admin_extra = "token = \"env:TEST_ADMIN_TOKEN\"".into();
        secrets.push(password.clone());
        secrets.push(emu.account_key().to_string());
        secrets.push(emu.secret_key().to_string());
        let mut env = CloudEnv {
            _redis: redis,
            emu,
            proxy: None,
            dir,
            config: config.to_toml(),
            envs: vec![
                ("TEST_UPSTREAM_PASSWORD".into(), password),
                ("TEST_ADMIN_TOKEN".into(), TOKEN.into()),
            ],
            secrets,
        };
        env.launch();
        env
    }

    fn launch(&mut self) {
        let envs: Vec<(&str, &str)> = self
            .envs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.proxy = Some(Proxy::start(&self.config, &envs));
    }

    fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("running")
    }

    fn status(&self) -> Value {
        let (_, body) = self.proxy().http_get("/v1/status");
        serde_json::from_str(&body).unwrap()
    }

    fn state(&self) -> Value {
        let path = self.dir.path().join("state/rotaproxy-state.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// (username, password) of CURRENT in the state file.
    fn current(&self) -> (String, String) {
        let s = self.state();
        (
            s["current"]["username"]
                .as_str()
                .unwrap_or("default")
                .to_string(),
            s["current"]["password"].as_str().unwrap().to_string(),
        )
    }

    /// `POST /v1/rotate?wait=true`; returns the answer.
    fn rotate(&mut self) -> Value {
        let (_, body) = self
            .proxy()
            .http_post("/v1/rotate?wait=true", Some(TOKEN), "");
        let v: Value = serde_json::from_str(&body).unwrap();
        let (_, pw) = self.current();
        if !self.secrets.contains(&pw) {
            self.secrets.push(pw);
        }
        v
    }

    fn assert_nothing_leaked(&self) {
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        assert_no_secret_in_logs(self.proxy(), &secrets);
        let (_, status) = self.proxy().http_get("/v1/status");
        let (_, metrics) = self.proxy().http_get("/metrics");
        assert_no_secret_in_lines(&[status, metrics], &secrets);
    }
}

fn rotations_under_load(mut env: CloudEnv, rotations: usize) {
    let load = Load::start(LoadConfig::new(env.proxy().client_addr(), random_token(8)));
    let from = load.progress();
    assert_eventually(Duration::from_secs(30), "load running", || {
        load.progress() > from + 500
    });
    for i in 0..rotations {
        let (old_user, old_pw) = env.current();
        let answer = env.rotate();
        assert_eq!(answer["outcome"], "success", "rotation {i}: {answer}");
        assert!(
            !env.emu.redis_accepts(&old_user, &old_pw),
            "rotation {i}: the old password of {old_user} still works"
        );
        assert_eq!(load.errors_so_far(), 0, "rotation {i}: client errors");
        let from = load.progress();
        assert_eventually(Duration::from_secs(30), "load progressing", || {
            load.progress() > from + 200
        });
    }
    let report = load.stop();
    report.assert_clean();
    assert_eq!(env.status()["generation"], rotations as u64 + 1);
    // The refusals of CURRENT while a default-user change lands are expected, not failures.
    assert_eq!(
        env.proxy()
            .metric("rotaproxy_upstream_auth_failures_total")
            .unwrap_or(0.0),
        0.0
    );
    assert!(
        env.proxy()
            .metric("rotaproxy_cloud_api_requests_total")
            .unwrap_or(0.0)
            > 0.0
    );
    env.assert_nothing_leaked();
}

#[test]
fn twenty_alternating_user_rotations_through_the_api_under_load() {
    rotations_under_load(CloudEnv::alternating(), 20);
}

#[test]
fn ten_default_user_rotations_through_the_api_under_load() {
    rotations_under_load(CloudEnv::default_user(), 10);
}

#[test]
fn a_slow_task_and_a_failed_task_leave_current_serving() {
    let mut env = CloudEnv::alternating();
    let mut c = env.proxy().conn();
    c.cmd(&["SET", "k", "0"]).assert_ok();

    // Slow: the rotation waits for the task while clients carry on.
    env.emu.slow_next_task(Duration::from_secs(3));
    let (code, _) = env.proxy().http_post("/v1/rotate", Some(TOKEN), "");
    assert_eq!(code, 202);
    assert_eventually(Duration::from_secs(10), "rotation waits at set", || {
        env.status()["rotation"]["step"] == "set"
    });
    c.cmd(&["INCR", "k"]).assert_int(1);
    assert_eventually(Duration::from_secs(30), "slow rotation done", || {
        let s = env.status();
        s["rotation"].is_null() && s["last_rotation"]["outcome"] == "success"
    });
    assert_eq!(env.status()["active_username"], "app-b");

    // Failed: CURRENT keeps serving, PENDING is dropped, the status says why.
    env.emu.fail_next_task("ACL_USER_PASSWORD_NOT_VALID");
    let answer = env.rotate();
    assert_eq!(answer["outcome"], "failed", "{answer}");
    let status = env.status();
    let error = status["last_rotation"]["error"].as_str().unwrap();
    assert!(error.contains("ACL_USER_PASSWORD_NOT_VALID"), "{status}");
    assert!(status["slots"]["pending"].is_null(), "{status}");
    assert_eq!(status["active_username"], "app-b");
    c.cmd(&["INCR", "k"]).assert_int(2);
    env.proxy().conn().cmd(&["GET", "k"]).assert_bulk("2");
    // The next attempt succeeds.
    assert_eq!(env.rotate()["outcome"], "success");
    env.assert_nothing_leaked();
}

/// Alternating users must share a role: a rotation to a user with another one would move every
/// session to a user that may do other things. Refused before any task is submitted.
#[test]
fn alternating_users_with_different_roles_are_not_rotated() {
    let mut env = CloudEnv::alternating_with_roles("app-role", "reader");
    let v = env.rotate();
    assert_eq!(v["outcome"], "failed", "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("app-b has role \"reader\" and app-a role \"app-role\""),
        "{error}"
    );
    assert_eq!(env.current().0, "app-a");
    assert_eq!(env.status()["generation"], 1);
    env.proxy().conn().cmd(&["PING"]).assert_simple("PONG");
    env.assert_nothing_leaked();
}

/// The preflight reaches the database through the API (its answer carries the default user's
/// password: never shown), and sees a revoked API key before a rotation would.
#[test]
fn a_preflight_reaches_the_database_through_the_api_and_sees_a_revoked_key() {
    let env = CloudEnv::default_user();
    let cloud_api = |env: &CloudEnv| {
        let (code, report) = dry_run(env.proxy());
        (code, preflight_check(&report, "cloud_api"))
    };
    let (code, api) = cloud_api(&env);
    assert_eq!(code, 200, "{api}");
    assert_eq!(api["result"], "ok");
    assert_eq!(api["detail"], "database status active");

    env.emu.revoke_secret_key(env.emu.secret_key());
    let (code, api) = cloud_api(&env);
    assert_eq!(code, 412, "{api}");
    assert_eq!(api["result"], "failed");
    assert!(
        api["detail"].as_str().unwrap().contains("API key rejected"),
        "{api}"
    );
    env.assert_nothing_leaked();
}

#[test]
fn an_api_key_rotated_mid_run_is_picked_up_from_its_file() {
    let mut env = CloudEnv::alternating();
    assert_eq!(env.rotate()["outcome"], "success");
    // The operator creates a new key, drops it into the file, and deletes the old one.
    let old_secret = env.emu.secret_key().to_string();
    let new_secret = random_token(40);
    env.emu.add_api_key(env.emu.account_key(), &new_secret);
    std::fs::write(env.dir.path().join("secret-key"), &new_secret).unwrap();
    env.emu.revoke_secret_key(&old_secret);
    env.secrets.push(new_secret.clone());
    // Only the new key can have made this rotation's requests: the old one answers 401.
    let answer = env.rotate();
    assert_eq!(answer["outcome"], "success", "{answer}");
    env.assert_nothing_leaked();
}

#[test]
fn a_proxy_killed_while_its_task_runs_resumes_the_same_task() {
    let mut env = CloudEnv::alternating();
    env.emu.hold_tasks(true);
    let (code, _) = env.proxy().http_post("/v1/rotate", Some(TOKEN), "");
    assert_eq!(code, 202);
    assert_eventually(Duration::from_secs(10), "task id persisted", || {
        env.state()["rotation"]["task_id"].is_string()
    });
    let task_id = env.state()["rotation"]["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let submitted_before = env.emu.tasks().len();
    env.proxy.as_mut().unwrap().kill();

    env.launch();
    env.emu.hold_tasks(false);
    assert_eventually(Duration::from_secs(30), "resumed rotation finished", || {
        let s = env.status();
        s["rotation"].is_null() && s["last_rotation"]["outcome"] == "success"
    });
    // No second password task was submitted for the rotation: the restart waited for the first.
    let tasks = env.emu.tasks();
    assert!(tasks.iter().any(|t| t.id == task_id), "{task_id} unknown");
    let resubmitted = tasks[submitted_before..]
        .iter()
        .filter(|t| t.submitted > tasks[submitted_before - 1].submitted)
        .count();
    // After the restart only the revoke (scrambling app-a) is a new task.
    assert_eq!(resubmitted, 1, "tasks after the restart: {resubmitted}");
    let (user, pw) = env.current();
    assert_eq!(user, "app-b");
    assert!(env.emu.redis_accepts("app-b", &pw));
    env.proxy().conn().cmd(&["PING"]).assert_simple("PONG");
    env.secrets.push(pw);
    env.assert_nothing_leaked();
}

#[test]
fn setup_alternating_creates_the_second_user_with_the_same_role() {
    let redis = RedisServer::start(RedisOptions::new());
    let emu = CloudEmulator::start(&redis);
    let first_password = random_token(32);
    let first = emu.create_acl_user("svc-a", "svc-role", &first_password);
    let dir = temp_dir();
    let keys = emu.write_key_files(dir.path());
    let config = dir.path().join("rotaproxy.toml");
    std::fs::write(
        &config,
        format!(
            "[upstream]\nurl = \"redis://{}\"\n[credentials]\nusername = \"svc-a\"\npassword = \"env:UNUSED_HERE\"\n\
             [rotation]\nstrategy = \"alternating-users\"\nbackend = \"cloud\"\nusers = [\"svc-a\", \"svc-b\"]\n\
             [rotation.cloud]\napi_root = \"{}\"\naccount_key = \"file:{}\"\nsecret_key = \"file:{}\"\ntask_poll_interval = \"20ms\"\n",
            redis.addr(),
            emu.base_url(),
            keys.account.display(),
            keys.secret.display()
        ),
    )
    .unwrap();
    let run = || {
        std::process::Command::new(proxy_bin())
            .args(["cloud", "setup-alternating", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("created ACL user svc-b"), "{stdout}");
    let role = emu.acl_user(first).unwrap().role;
    let created: Vec<_> = (first + 1..first + 10)
        .filter_map(|id| emu.acl_user(id))
        .filter(|u| u.name == "svc-b")
        .collect();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].role, role);
    // Idempotent: a second run finds it.
    let again = run();
    assert!(String::from_utf8_lossy(&again.stdout).contains("already exists"));
    assert!(!String::from_utf8_lossy(&again.stdout).contains(&first_password));
}
