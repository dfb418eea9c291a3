//! Client certificates the proxy makes and rotates itself through the Redis Cloud API
//! (`[rotation.client_certificate]`): the emulator enforces the database's
//! `clientTlsCertificates` list on a real redis-server with mutual TLS, so a certificate the list
//! does not hold cannot connect.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::cloud::CloudEmulator;
use support::load::{Load, LoadConfig};
use support::rotation::{TOKEN, dry_run, preflight_check};
use support::*;

const WAIT: Duration = Duration::from_secs(30);

struct CertEnv {
    redis: RedisServer,
    emu: CloudEmulator,
    certs: Certs,
    /// The certificate the database trusted when the proxy started.
    initial: CertFiles,
    /// The proxy's `client_cert` / `client_key`.
    volume: CertFiles,
    dir: tempfile::TempDir,
    config: String,
    password: String,
    proxy: Option<Proxy>,
}

impl CertEnv {
    /// `cert_section`: lines for `[rotation.client_certificate]`.
    fn start(cert_section: &str, envs: &[(&str, &str)]) -> CertEnv {
        let dir = temp_dir();
        let certs = Certs::generate(&dir.path().join("pki"));
        let initial = certs.self_signed_client("app-client-1");
        let redis = RedisServer::start(RedisOptions::new().tls(RedisTls {
            cert: certs.server.cert.clone(),
            key: certs.server.key.clone(),
            ca: initial.cert.clone(),
            require_client_cert: true,
        }));
        let emu = CloudEmulator::start(&redis);
        emu.set_client_certificates(&[read(&initial.cert)]);
        let volume_dir = dir.path().join("volume");
        std::fs::create_dir_all(&volume_dir).unwrap();
        let volume = CertFiles {
            cert: volume_dir.join("tls.crt"),
            key: volume_dir.join("tls.key"),
        };
        std::fs::copy(&initial.cert, &volume.cert).unwrap();
        std::fs::copy(&initial.key, &volume.key).unwrap();
        let keys = emu.write_key_files(dir.path());
        let mut config = ProxyConfig::tls(&redis, &certs.ca)
            .credentials(None, "env:TEST_UPSTREAM_PASSWORD")
            .client_cert(&volume)
            .extra(&format!(
                "[rotation]\nstrategy = \"default-user\"\nbackend = \"cloud\"\nstate_dir = {}\n\
                 drain_deadline = \"3s\"\n\
                 [rotation.cloud]\napi_root = \"{}\"\naccount_key = \"file:{}\"\nsecret_key = \"file:{}\"\n\
                 retry_base = \"10ms\"\nretry_max = \"200ms\"\ntask_poll_interval = \"20ms\"\n\
                 [rotation.database]\nkind = \"pro\"\nsubscription_id = {}\ndatabase_id = {}\n\
                 [rotation.client_certificate]\n{cert_section}\n",
                toml_path(&dir.path().join("state")),
                emu.base_url(),
                keys.account.display(),
                keys.secret.display(),
                emu.subscription_id(),
                emu.database_id(),
            ));
        config.upstream_extra = "tls_poll_interval = \"200ms\"".into();
        config.admin_extra = "token = \"env:TEST_ADMIN_TOKEN\"".into();
        let password = emu.default_password();
        let mut env = CertEnv {
            redis,
            emu,
            certs,
            initial,
            volume,
            dir,
            config: config.to_toml(),
            password,
            proxy: None,
        };
        env.launch(envs);
        env
    }

    fn launch(&mut self, extra: &[(&str, &str)]) {
        let mut envs = vec![
            ("TEST_UPSTREAM_PASSWORD", self.password.as_str()),
            ("TEST_ADMIN_TOKEN", TOKEN),
        ];
        envs.extend_from_slice(extra);
        self.proxy = Some(Proxy::start(&self.config, &envs));
    }

    fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("running")
    }

    fn status(&self) -> Value {
        let (code, body) = self.proxy().http_get("/v1/status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("status is JSON")
    }

    fn state_file(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join("state").join(name)
    }

    /// Whether a connection made straight to Redis with `cert` gets an answer.
    fn redis_accepts(&self, cert: &CertFiles) -> bool {
        let opts = TlsClientOptions {
            ca: Some(&self.certs.ca),
            client_cert: Some((&cert.cert, &cert.key)),
            ..TlsClientOptions::default()
        };
        let Ok(mut c) = RespConn::try_connect_tls_with(self.redis.tls_addr(), opts) else {
            return false;
        };
        // Under TLS 1.3 a refused client certificate shows at the first read.
        c.try_send_raw(&encode_cmd(&["PING"])).is_ok()
            && matches!(c.try_read_reply(), Ok(reply) if !reply.is_error())
    }

    /// Closes every connection the proxy holds to Redis, so the next commands need new ones.
    fn kill_upstream_connections(&self) {
        let killed = self.redis.kill_connections_of("default");
        assert!(killed > 0, "the proxy had connections");
    }

    /// Checks the outcome of a finished rotation: the list holds only the new certificate,
    /// which is the one in the proxy's files, and nothing is left in the state directory.
    fn assert_rotated(&self) -> String {
        let list = self.emu.client_tls_certificates();
        assert_eq!(list.len(), 1, "{list:?}");
        let new = list[0].trim().to_string();
        assert_ne!(new, read(&self.initial.cert).trim());
        assert_eq!(read(&self.volume.cert).trim(), new);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&self.volume.key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key file is the owner's only");
        for leftover in [
            "client-certificate-rotation.json",
            "client-certificate-pending-key.pem",
        ] {
            assert!(
                !self.state_file(leftover).exists(),
                "{leftover} left behind"
            );
        }
        let s = self.status();
        let cert = &s["tls"]["upstream"]["certificate"];
        let subject = cert["subject"].as_str().unwrap_or("");
        assert!(subject.contains("CN=rotaproxy"), "{s}");
        assert_eq!(cert["issuer"], cert["subject"], "self-signed: {s}");
        let days_left = (cert["not_after"].as_i64().unwrap() - unix_now()) / 86_400;
        assert!((88..=90).contains(&days_left), "{days_left}: {s}");
        new
    }

    /// Lines of the private keys' PEM bodies, which must never be seen.
    fn key_secrets(&self) -> Vec<String> {
        vec![
            pem_body_line(&self.initial.key),
            pem_body_line(&self.volume.key),
            self.password.clone(),
            self.emu.account_key().to_string(),
            self.emu.secret_key().to_string(),
        ]
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn pem_body_line(path: &Path) -> String {
    let text = read(path);
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("-----")).collect();
    lines[lines.len() / 2].to_string()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn the_proxy_rotates_its_own_client_certificate_under_load_without_a_client_error() {
    // The initial certificate has 30 days left: not due yet with renew_before = 7 days.
    let env = CertEnv::start("renew_before = \"7d\"", &[]);
    let proxy = env.proxy();
    let mut idle = proxy.conn();
    idle.cmd(&["SET", "idle", "1"]).assert_ok();
    let load = Load::start(LoadConfig::new(proxy.client_addr(), random_token(8)));
    assert_eventually(WAIT, "load ran a bit", || load.progress() > 2_000);

    let before: std::collections::BTreeSet<i64> = env
        .redis
        .client_list()
        .iter()
        .filter_map(|c| c.get("id")?.parse().ok())
        .collect();
    assert!(before.len() > 10, "{before:?}");
    let (code, _) = proxy.http_post("/v1/client-certificate/rotate", None, "");
    assert_eq!(code, 401, "the admin token is required");
    let (code, body) = proxy.http_post("/v1/client-certificate/rotate?wait=true", Some(TOKEN), "");
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["state"], "finished", "{body}");
    assert_eq!(answer["status"]["last"]["success"], true, "{body}");
    let at = load.progress();
    assert_eventually(WAIT, "load went on after the rotation", || {
        load.progress() > at + 2_000
    });
    load.stop().assert_clean();

    env.assert_rotated();
    // The old certificate left the list only once every connection made with it was gone.
    let changes = env.emu.client_cert_changes();
    let lengths: Vec<usize> = changes.iter().map(|(n, _)| *n).collect();
    assert_eq!(lengths, [2, 1], "old and new, then new only");
    let at_revoke = &changes[1].1;
    assert!(
        at_revoke.is_disjoint(&before),
        "still connected at the revoke: {:?}",
        at_revoke.intersection(&before).collect::<Vec<_>>()
    );
    let s = env.status();
    assert_eq!(s["generation"], 2, "one new generation: {s}");
    assert!(
        s["client_certificate_rotation"]["in_progress"].is_null(),
        "{s}"
    );
    // The database trusts only the new certificate: the old one is refused, and the proxy's
    // connections made from now on work.
    assert!(
        !env.redis_accepts(&env.initial),
        "the old certificate is revoked"
    );
    env.kill_upstream_connections();
    idle.cmd(&["GET", "idle"]).assert_bulk("1");
    proxy.conn().cmd(&["PING"]).assert_simple("PONG");

    // Again: now the old certificate is one the proxy made too, with the same CN.
    let first = env.emu.client_tls_certificates();
    let (code, body) = proxy.http_post("/v1/client-certificate/rotate?wait=true", Some(TOKEN), "");
    assert_eq!(code, 200, "{body}");
    let second = env.emu.client_tls_certificates();
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second, first);
    assert_eq!(read(&env.volume.cert).trim(), second[0].trim());
    env.kill_upstream_connections();
    idle.cmd(&["GET", "idle"]).assert_bulk("1");

    // The end is logged after every step: once it is read, so are they (the test reads the
    // proxy's output on a thread of its own, a little behind).
    proxy.wait_for_log("event=\"client_certificate.end\"", WAIT);
    for step in ["create", "set", "install", "drain", "revoke"] {
        let needle = "event=\"client_certificate.step\" rotation_id=";
        assert!(
            proxy
                .logs()
                .iter()
                .any(|l| l.contains(needle) && l.contains(&format!("step=\"{step}\""))),
            "no audit event for step {step}"
        );
    }
    let secrets = env.key_secrets();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_no_secret_in_logs(proxy, &secrets);
    assert_no_secret_in_lines(&[s.to_string()], &secrets);
}

#[test]
fn a_certificate_close_to_expiry_is_replaced_without_being_asked() {
    // The initial certificate has 30 days left.
    let env = CertEnv::start("renew_before = \"40d\"\ncheck_interval = \"200ms\"", &[]);
    assert_eventually(WAIT, "a rotation started by the expiry check ended", || {
        env.status()["client_certificate_rotation"]["last"]["success"] == true
    });
    env.assert_rotated();
    assert_eq!(
        env.proxy()
            .metric("rotaproxy_client_certificate_rotations_total{result=\"success\"}"),
        Some(1.0)
    );
    env.kill_upstream_connections();
    env.proxy().conn().cmd(&["PING"]).assert_simple("PONG");

    // The preflight reads the database whose certificate list the rotation sets.
    let (code, report) = dry_run(env.proxy());
    assert_eq!(code, 200, "{report}");
    assert_eq!(preflight_check(&report, "cloud_api")["result"], "ok");
}

#[test]
fn a_rotation_interrupted_by_a_crash_is_resumed_with_the_same_certificate() {
    let mut env = CertEnv::start(
        "renew_before = \"7d\"",
        &[("ROTAPROXY_FAULT_HANG_AT_CERT_STEP", "install")],
    );
    let (code, body) = env
        .proxy()
        .http_post("/v1/client-certificate/rotate", Some(TOKEN), "");
    assert_eq!(code, 202, "{body}");
    env.proxy()
        .wait_for_log("hanging at client certificate rotation step", WAIT);
    // Registered with the database, not installed yet: both certificates are trusted.
    let list = env.emu.client_tls_certificates();
    assert_eq!(list.len(), 2, "{list:?}");
    let job: Value =
        serde_json::from_str(&read(&env.state_file("client-certificate-rotation.json"))).unwrap();
    assert_eq!(job["step"], "install", "{job}");
    env.proxy.as_mut().unwrap().kill();
    // What a crash between the install's two renames leaves: the new key, the old certificate.
    std::fs::copy(
        env.state_file("client-certificate-pending-key.pem"),
        &env.volume.key,
    )
    .unwrap();

    env.launch(&[]);
    env.proxy()
        .wait_for_log("event=\"client_certificate.repaired\"", WAIT);
    assert_eventually(WAIT, "the resumed rotation ended", || {
        env.status()["client_certificate_rotation"]["last"]["success"] == true
    });
    let new = env.assert_rotated();
    assert_eq!(job["new_cert"].as_str().map(str::trim), Some(new.as_str()));
    env.kill_upstream_connections();
    env.proxy().conn().cmd(&["PING"]).assert_simple("PONG");
}
