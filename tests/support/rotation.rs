//! Rotation fixtures: Redis with the users a strategy needs, the proxy rotating them with a
//! state directory the test owns (so it can restart the proxy), and a Kubernetes-style secret
//! volume.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::*;

pub const TOKEN: &str = "test-admin-token-0123456789";

/// `POST /v1/rotate?dry_run=true` (with [`TOKEN`]): the status code and the preflight's report.
pub fn dry_run(proxy: &Proxy) -> (u16, Value) {
    let (code, body) = proxy.http_post("/v1/rotate?dry_run=true", Some(TOKEN), "");
    let report: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{code}: {body}"));
    assert_eq!(report["state"], "dry_run", "{report}");
    (code, report)
}

/// The check called `name` in a preflight report.
pub fn preflight_check(report: &Value, name: &str) -> Value {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["check"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name} check: {report}"))
}

/// Redis with the users a strategy needs, and the proxy rotating them.
pub struct RotEnv {
    pub redis: RedisServer,
    pub proxy: Option<Proxy>,
    pub dir: tempfile::TempDir,
    pub config: String,
    pub envs: Vec<(String, String)>,
    /// Every password the test has seen (checked absent from logs and status).
    pub secrets: Vec<String>,
    /// `app-b`'s first password, with alternating users.
    pub idle_password: Option<String>,
}

impl RotEnv {
    /// `acl-multi-password` on user `app`.
    pub fn multi_password(extra: &str) -> RotEnv {
        let password = random_token(32);
        let redis = RedisServer::start_with_user("app", &password);
        Self::start(redis, Some("app"), password, "acl-multi-password", extra)
    }

    /// `alternating-users` on `app-a` (active first) and `app-b` (unknown password).
    pub fn alternating(extra: &str) -> RotEnv {
        Self::alternating_with_rules("~* &* +@all", Some("~* &* +@all"), extra)
    }

    /// `alternating-users` with `app-a` given `rules`, and `app-b` (unknown password)
    /// `idle_rules`, or not created at all.
    pub fn alternating_with_rules(rules: &str, idle_rules: Option<&str>, extra: &str) -> RotEnv {
        let password = random_token(32);
        let idle = random_token(32);
        let mut options = RedisOptions::new().user(&format!("app-a on >{password} {rules}"));
        if let Some(idle_rules) = idle_rules {
            options = options.user(&format!("app-b on >{idle} {idle_rules}"));
        }
        let redis = RedisServer::start(options);
        let extra = format!("users = [\"app-a\", \"app-b\"]\n{extra}");
        let mut env = Self::start(redis, Some("app-a"), password, "alternating-users", &extra);
        env.idle_password = Some(idle);
        env
    }

    pub fn start(
        redis: RedisServer,
        user: Option<&str>,
        password: String,
        strategy: &str,
        extra: &str,
    ) -> RotEnv {
        Self::start_with_envs(redis, user, password, strategy, extra, &[])
    }

    /// [`RotEnv::start`] with more environment variables for the proxy (e.g. more secrets).
    pub fn start_with_envs(
        redis: RedisServer,
        user: Option<&str>,
        password: String,
        strategy: &str,
        extra: &str,
        more_envs: &[(&str, &str)],
    ) -> RotEnv {
        let dir = temp_dir();
        let mut config = ProxyConfig::plain(&redis)
            .credentials(user, "env:TEST_UPSTREAM_PASSWORD")
            .extra(&format!(
                "[rotation]\nstrategy = \"{strategy}\"\nstate_dir = {}\nurgent_drain_deadline = \"1s\"\n{}{extra}",
                toml_path(&dir.path().join("state")),
                if extra.contains("drain_deadline =") {
                    ""
                } else {
                    "drain_deadline = \"3s\"\n"
                }
            ));
        config.admin_extra = "token = \"env:TEST_ADMIN_TOKEN\"".into();
        let mut envs = vec![
            ("TEST_UPSTREAM_PASSWORD".to_string(), password.clone()),
            ("TEST_ADMIN_TOKEN".to_string(), TOKEN.to_string()),
        ];
        envs.extend(
            more_envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let mut env = RotEnv {
            redis,
            proxy: None,
            dir,
            config: config.to_toml(),
            envs,
            secrets: vec![password],
            idle_password: None,
        };
        env.launch(&[]);
        env
    }

    pub fn launch(&mut self, extra_env: &[(&str, &str)]) {
        let mut envs = env_refs(&self.envs);
        envs.extend_from_slice(extra_env);
        self.proxy = Some(Proxy::start(&self.config, &envs));
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("proxy running")
    }

    pub fn status(&self) -> Value {
        let (code, body) = self.proxy().http_get("/v1/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status is JSON")
    }

    /// `POST /v1/rotate?wait=true`; asserts success.
    pub fn rotate(&mut self, urgent: bool) -> Value {
        let path = if urgent {
            "/v1/rotate?wait=true&urgent=true"
        } else {
            "/v1/rotate?wait=true"
        };
        let (code, body) = self.proxy().http_post(path, Some(TOKEN), "");
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["outcome"], "success", "{body}");
        self.remember_current_password();
        v
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.path().join("state").join("rotaproxy-state.json")
    }

    pub fn state(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.state_file()).unwrap()).unwrap()
    }

    /// (username, password) of a slot in the state file.
    pub fn slot(&self, name: &str) -> Option<(String, String)> {
        let state = self.state();
        let slot = &state[name];
        if slot.is_null() {
            return None;
        }
        Some((
            slot["username"].as_str().unwrap_or("default").to_string(),
            slot["password"].as_str().unwrap().to_string(),
        ))
    }

    pub fn remember_current_password(&mut self) {
        if let Some((_, pw)) = self.slot("current")
            && !self.secrets.contains(&pw)
        {
            self.secrets.push(pw);
        }
    }

    pub fn authenticates(&self, user: &str, password: &str) -> bool {
        let mut c = RespConn::connect(self.redis.addr());
        c.cmd(&["AUTH", user, password]) == Frame::simple("OK")
    }

    pub fn assert_nothing_leaked(&self) {
        let secrets: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        assert_no_secret_in_logs(self.proxy(), &secrets);
        let (_, status) = self.proxy().http_get("/v1/status");
        let (_, metrics) = self.proxy().http_get("/metrics");
        assert_no_secret_in_lines(&[status, metrics], &secrets);
    }
}

/// SHA-256 hex of a password, as `ACL GETUSER` lists it.
pub fn acl_passwords(redis: &RedisServer, user: &str) -> Vec<String> {
    let reply = redis.admin_cmd(&["ACL", "GETUSER", user]);
    let items = reply.as_array().expect("ACL GETUSER array").to_vec();
    let idx = items
        .iter()
        .position(|f| f.as_bytes() == Some(b"passwords"))
        .expect("passwords field");
    items[idx + 1]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| String::from_utf8(f.as_bytes().unwrap().to_vec()).unwrap())
        .collect()
}

pub fn sha256_hex(redis: &RedisServer, password: &str) -> String {
    // Redis computes the same hash for ACL DRYRUN-free comparison: let it hash via a temp user.
    let probe = format!("hashprobe-{}", random_token(6));
    redis
        .admin_cmd(&["ACL", "SETUSER", &probe, &format!(">{password}")])
        .assert_ok();
    let hashes = acl_passwords(redis, &probe);
    redis.admin_cmd(&["ACL", "DELUSER", &probe]).assert_int(1);
    hashes[0].clone()
}

/// A Kubernetes-style secret volume: `password` -> `..data/password`, `..data` -> a dated dir,
/// updated by swapping the `..data` symlink, so every file of the volume changes at once.
pub struct SecretVolume {
    dir: PathBuf,
    version: u32,
}

impl SecretVolume {
    pub fn new(dir: &Path, password: &str) -> SecretVolume {
        Self::with_files(dir, &[("password", password.as_bytes())])
    }

    /// A volume holding `files` (name, contents), e.g. a TLS secret's `tls.crt` and `tls.key`.
    pub fn with_files(dir: &Path, files: &[(&str, &[u8])]) -> SecretVolume {
        std::fs::create_dir_all(dir).unwrap();
        let mut v = SecretVolume {
            dir: dir.to_path_buf(),
            version: 0,
        };
        v.publish_files(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        v
    }

    pub fn publish(&mut self, password: &str) {
        self.publish_files(&[("password", password.as_bytes())]);
    }

    /// New contents for the volume's files, all swapped in with one rename.
    pub fn publish_files(&mut self, files: &[(&str, &[u8])]) {
        self.version += 1;
        let dated = self.dir.join(format!("..2026_v{}", self.version));
        std::fs::create_dir_all(&dated).unwrap();
        for (name, contents) in files {
            std::fs::write(dated.join(name), contents).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(dated.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join("password")
    }

    /// The path of one of the volume's files.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Redis with user `app`, a secret volume holding its password, and the proxy following that
/// volume with the `external` strategy. `external` lines go into `[rotation.external]`.
pub struct ExternalEnv {
    pub redis: RedisServer,
    pub volume: SecretVolume,
    pub proxy: Proxy,
    /// The password the volume held at the start.
    pub password: String,
    /// Holds the volume and the state directory: keep it alive as long as the proxy.
    pub dir: tempfile::TempDir,
}

impl ExternalEnv {
    pub fn start(external: &str) -> ExternalEnv {
        let password = random_token(32);
        let redis = RedisServer::start_with_user("app", &password);
        let dir = temp_dir();
        let volume = SecretVolume::new(&dir.path().join("secret"), &password);
        let mut config = ProxyConfig::plain(&redis)
            .credentials(Some("app"), &format!("file:{}", volume.file().display()))
            .extra(&format!(
                "[rotation]\nstrategy = \"external\"\nstate_dir = {}\ndrain_deadline = \"2s\"\n[rotation.external]\npassword = \"file:{}\"\n{external}",
                toml_path(&dir.path().join("state")),
                volume.file().display()
            ));
        config.admin_extra = "token = \"env:TEST_ADMIN_TOKEN\"".into();
        let proxy = Proxy::start(&config.to_toml(), &[("TEST_ADMIN_TOKEN", TOKEN)]);
        ExternalEnv {
            redis,
            volume,
            proxy,
            password,
            dir,
        }
    }

    pub fn status(&self) -> Value {
        let (_, body) = self.proxy.http_get("/v1/status");
        serde_json::from_str(&body).expect("status is JSON")
    }
}
