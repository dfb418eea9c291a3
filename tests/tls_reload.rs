//! Renewed TLS material followed without a restart: the upstream client certificate (with a CA
//! change on the server, the hard case), files the server refuses, and the listener's own
//! certificate. Real redis-server with mutual TLS, certificates made by the test.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use support::load::{Load, LoadConfig};
use support::rotation::SecretVolume;
use support::*;

const APP_USER: &str = "app";
const WAIT: Duration = Duration::from_secs(30);

/// A Redis requiring client certificates from the test CA, the PKI, and a folder standing in
/// for the proxy's certificate volume.
struct MtlsEnv {
    redis: RedisServer,
    certs: Certs,
    password: String,
    /// The proxy's `client_cert` / `client_key` (copies the test replaces).
    volume: CertFiles,
    _dir: tempfile::TempDir,
}

impl MtlsEnv {
    fn start() -> MtlsEnv {
        let dir = temp_dir();
        let certs = Certs::generate(&dir.path().join("pki"));
        let password = random_token(32);
        let redis = RedisServer::start(
            RedisOptions::new()
                .tls(RedisTls::from_certs(&certs, true))
                .user(&format!("{APP_USER} on >{password} ~* &* +@all")),
        );
        let volume_dir = dir.path().join("volume");
        std::fs::create_dir_all(&volume_dir).expect("volume dir");
        let volume = CertFiles {
            cert: volume_dir.join("tls.crt"),
            key: volume_dir.join("tls.key"),
        };
        replace_file(&volume.cert, &certs.client.cert);
        replace_file(&volume.key, &certs.client.key);
        MtlsEnv {
            redis,
            certs,
            password,
            volume,
            _dir: dir,
        }
    }

    fn proxy_config(&self) -> ProxyConfig {
        let mut config = ProxyConfig::tls(&self.redis, &self.certs.ca)
            .credentials(Some(APP_USER), "env:TEST_UPSTREAM_PASSWORD")
            .client_cert(&self.volume);
        config.upstream_extra = "tls_poll_interval = \"200ms\"".into();
        config
    }

    fn start_proxy(&self, config: &ProxyConfig) -> Proxy {
        Proxy::start(
            &config.to_toml(),
            &[("TEST_UPSTREAM_PASSWORD", self.password.as_str())],
        )
    }

    /// The proxy rotating `app`'s password (`acl-multi-password`, state in `state_dir`), its
    /// admin POSTs taking `token`.
    fn start_rotating_proxy(&self, state_dir: &Path, token: &str) -> Proxy {
        let mut config = self.proxy_config().extra(&format!(
            "[rotation]\nstrategy = \"acl-multi-password\"\nstate_dir = {}\ndrain_deadline = \"3s\"\n",
            toml_path(state_dir)
        ));
        config.admin_extra = "token = \"env:TEST_ADMIN_TOKEN\"".into();
        Proxy::start(
            &config.to_toml(),
            &[
                ("TEST_UPSTREAM_PASSWORD", self.password.as_str()),
                ("TEST_ADMIN_TOKEN", token),
            ],
        )
    }

    /// Which CAs Redis accepts client certificates from, for connections made from now on.
    fn server_trusts(&self, cas: &[&Path]) {
        let bundle = self
            .redis
            .dir()
            .join(format!("trust-{}.pem", random_token(6)));
        let pem: String = cas
            .iter()
            .map(|ca| std::fs::read_to_string(ca).expect("read CA"))
            .collect();
        std::fs::write(&bundle, pem).expect("write CA bundle");
        self.redis
            .admin_cmd(&[
                "CONFIG",
                "SET",
                "tls-ca-cert-file",
                &bundle.display().to_string(),
            ])
            .assert_ok();
    }

    /// Installs a certificate and key the way a secrets agent does: each written aside, then
    /// renamed over the old one.
    fn install(&self, cert: &Path, key: &Path) {
        replace_file(&self.volume.key, key);
        replace_file(&self.volume.cert, cert);
    }

    /// Closes every connection the proxy holds to Redis, so the next commands need new ones.
    fn kill_upstream_connections(&self) {
        let killed = self.redis.kill_connections_of(APP_USER);
        assert!(killed > 0, "the proxy had connections to kill");
    }

    /// Server-side ids of the connections the proxy holds (as user `app`).
    fn proxy_connection_ids(&self) -> std::collections::HashSet<String> {
        self.redis
            .client_list()
            .into_iter()
            .filter(|c| c.get("user").map(String::as_str) == Some(APP_USER))
            .filter_map(|c| c.get("id").cloned())
            .collect()
    }

    /// The private keys' PEM bodies: never to be seen in logs or status.
    fn key_material(&self) -> Vec<String> {
        [&self.certs.client.key, &self.certs.other_client.key]
            .into_iter()
            .map(|k| pem_body_line(k))
            .collect()
    }
}

/// Writes `from`'s contents to `to` atomically (a temporary file renamed over it).
fn replace_file(to: &Path, from: &Path) {
    let tmp: PathBuf = to.with_extension("tmp");
    std::fs::copy(from, &tmp).expect("copy");
    std::fs::rename(&tmp, to).expect("rename");
}

/// A line from the middle of a PEM file (base64 of the key itself).
fn pem_body_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read PEM");
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!lines.is_empty(), "{} has a body", path.display());
    lines[lines.len() / 2].to_string()
}

fn status(proxy: &Proxy) -> Value {
    let (code, body) = proxy.http_get("/v1/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status is JSON")
}

fn reloads(proxy: &Proxy, side: &str, result: &str) -> f64 {
    proxy
        .metric(&format!(
            "rotaproxy_tls_reloads_total{{side=\"{side}\",result=\"{result}\"}}"
        ))
        .unwrap_or(0.0)
}

#[test]
fn a_client_certificate_from_a_new_ca_is_followed_under_load_without_a_client_error() {
    let env = MtlsEnv::start();
    let proxy = env.start_proxy(&env.proxy_config());
    let before = status(&proxy);
    assert_eq!(before["generation"], 1, "{before}");
    let issuer = before["tls"]["upstream"]["certificate"]["issuer"].to_string();
    assert!(issuer.contains("rotaproxy test CA"), "{before}");
    let mut idle = proxy.conn();
    idle.cmd(&["SET", "idle-key", "1"]).assert_ok();
    // The server's certificate, as it presented it.
    let server = status(&proxy)["tls"]["upstream_server"]["certificate"].clone();
    assert_eq!(server["subject"], "CN=server", "{server}");
    assert_eq!(
        proxy
            .metric("rotaproxy_tls_certificate_expiry_timestamp_seconds{side=\"upstream_server\"}")
            .map(|v| v as i64),
        server["not_after"].as_i64(),
    );

    let load = Load::start(LoadConfig::new(proxy.client_addr(), random_token(8)));
    assert_eventually(WAIT, "load ran a bit", || load.progress() > 2_000);

    // The CA rotation as an operator runs it: the server trusts both CAs, the proxy gets a
    // certificate from the new one, and once nothing uses the old one the server drops it.
    env.server_trusts(&[&env.certs.ca, &env.certs.other_ca]);
    let before_ids = env.proxy_connection_ids();
    assert!(before_ids.len() > 10, "{before_ids:?}");
    env.install(&env.certs.other_client.cert, &env.certs.other_client.key);
    assert_eventually(WAIT, "the new certificate is a new generation", || {
        status(&proxy)["generation"] == 2
    });
    let at = load.progress();
    assert_eventually(WAIT, "every session moved off the old certificate", || {
        let s = status(&proxy);
        s["connections"]["previous"] == 0 && load.progress() > at + 2_000
    });
    // Moved to new connections, not re-authenticated in place (AUTH cannot change a TLS
    // connection's certificate): none of the connections from before is left.
    assert_eventually(WAIT, "the old connections are closed", || {
        env.proxy_connection_ids().is_disjoint(&before_ids)
    });
    load.stop().assert_clean();
    assert_eq!(reloads(&proxy, "upstream", "applied"), 1.0);
    assert_eq!(reloads(&proxy, "upstream", "refused"), 0.0);
    let after = status(&proxy);
    let cert = &after["tls"]["upstream"]["certificate"];
    assert!(
        cert["issuer"].to_string().contains("unrelated CA"),
        "{after}"
    );
    assert_eq!(after["tls"]["upstream"]["reload_pending"], false, "{after}");
    assert_eq!(
        proxy
            .metric("rotaproxy_tls_certificate_expiry_timestamp_seconds{side=\"upstream\"}")
            .map(|v| v as i64),
        cert["not_after"].as_i64(),
    );

    // Only the new CA now: connections made from here on work only with the new certificate.
    env.server_trusts(&[&env.certs.other_ca]);
    env.kill_upstream_connections();
    proxy
        .conn()
        .cmd(&["SET", "after", "ca-rotation"])
        .assert_ok();
    idle.cmd(&["GET", "idle-key"]).assert_bulk("1");
    proxy.wait_for_log("tls.reloaded", WAIT);

    let keys = env.key_material();
    let mut secrets: Vec<&str> = keys.iter().map(String::as_str).collect();
    secrets.push(&env.password);
    assert_no_secret_in_logs(&proxy, &secrets);
    assert_no_secret_in_lines(&[after.to_string()], &secrets);
}

/// The proxy, with its CA bundle in a file of its own that the test replaces.
fn start_with_ca_bundle(env: &MtlsEnv) -> (Proxy, PathBuf) {
    let bundle = env.volume.cert.with_file_name("ca.pem");
    replace_file(&bundle, &env.certs.ca);
    let mut config = env.proxy_config();
    config.ca_file = Some(bundle.clone());
    (env.start_proxy(&config), bundle)
}

/// Replaces the bundle with one of both CAs, and waits for the proxy to take it.
fn trust_the_other_ca_too(env: &MtlsEnv, proxy: &Proxy, bundle: &Path) {
    let both = bundle.with_file_name("both.pem");
    let pem = [&env.certs.ca, &env.certs.other_ca]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<String>();
    std::fs::write(&both, pem).unwrap();
    replace_file(bundle, &both);
    assert_eventually(WAIT, "the new bundle is a new generation", || {
        status(proxy)["generation"] == 2
    });
}

#[test]
fn a_new_ca_bundle_lets_the_proxy_follow_the_server_to_a_certificate_from_another_ca() {
    let env = MtlsEnv::start();
    // The proxy's CA bundle as a file of its own, which the test replaces.
    let (proxy, bundle) = start_with_ca_bundle(&env);
    let mut c = proxy.conn();
    c.cmd(&["SET", "k", "v"]).assert_ok();

    // The server's CA changes: first the proxy trusts old and new...
    trust_the_other_ca_too(&env, &proxy, &bundle);
    // ...then the server presents a certificate from the new CA, to new connections.
    // (Both in one CONFIG SET: Redis refuses a key that does not match the certificate.)
    env.redis
        .admin_cmd(&[
            "CONFIG",
            "SET",
            "tls-cert-file",
            &env.certs.other_server.cert.display().to_string(),
            "tls-key-file",
            &env.certs.other_server.key.display().to_string(),
        ])
        .assert_ok();
    env.kill_upstream_connections();
    c.cmd(&["GET", "k"]).assert_bulk("v");
    proxy.conn().cmd(&["PING"]).assert_simple("PONG");
    assert_eventually(WAIT, "the server's new certificate is shown", || {
        status(&proxy)["tls"]["upstream_server"]["certificate"]["issuer"]
            .to_string()
            .contains("unrelated CA")
    });
    assert_eq!(reloads(&proxy, "upstream", "applied"), 1.0);
}

/// Following files must not cost the hot path: a second thread in the process makes every
/// system call and allocation dearer (src/watch.rs). With the default current-thread runtime
/// the proxy settles on one thread while it follows its CA, certificate and key and still sees
/// them change. (Tokio's blocking threads, which start-up may use, end after 10 s idle.)
#[test]
fn following_tls_files_takes_no_thread_of_its_own() {
    let env = MtlsEnv::start();
    let (proxy, bundle) = start_with_ca_bundle(&env);
    proxy.conn().cmd(&["SET", "k", "v"]).assert_ok();
    let threads = || {
        std::fs::read_dir(format!("/proc/{}/task", proxy.pid()))
            .map(|tasks| tasks.count())
            .unwrap_or(0)
    };
    assert_eventually(Duration::from_secs(60), "one thread", || threads() == 1);

    // The files are followed all the same.
    trust_the_other_ca_too(&env, &proxy, &bundle);
    proxy.conn().cmd(&["GET", "k"]).assert_bulk("v");
}

fn tls_handshakes(proxy: &Proxy, kind: &str) -> f64 {
    proxy
        .metric(&format!(
            "rotaproxy_upstream_tls_handshakes_total{{kind=\"{kind}\"}}"
        ))
        .unwrap_or(0.0)
}

/// Replacement connections resume the server's TLS sessions (unless turned off), and new
/// material never rides on a session made with the old: a client certificate the server does
/// not trust is still refused while resumable sessions are at hand. (Two things keep it so: each
/// config's own store, and rustls's check that a session was made under the same verifier and
/// certificate; taking either away alone leaves this test passing.)
#[test]
fn upstream_connections_resume_tls_sessions_but_new_material_starts_afresh() {
    let env = MtlsEnv::start();
    let resuming = env.start_proxy(&env.proxy_config().extra("[pool]\nwarm = 2\n"));
    let mut not_resuming_config = env.proxy_config().extra("[pool]\nwarm = 2\n");
    not_resuming_config.upstream_extra += "\ntls_session_resumption = false";
    let not_resuming = env.start_proxy(&not_resuming_config);
    let mut a = resuming.conn();
    let mut b = not_resuming.conn();
    a.cmd(&["SET", "k", "v"]).assert_ok();
    b.cmd(&["GET", "k"]).assert_bulk("v");
    assert!(tls_handshakes(&resuming, "full") >= 1.0);
    let full_before = tls_handshakes(&not_resuming, "full");
    assert!(full_before >= 1.0);

    env.kill_upstream_connections();
    a.cmd(&["GET", "k"]).assert_bulk("v");
    b.cmd(&["GET", "k"]).assert_bulk("v");
    assert_eventually(WAIT, "the replacements resume sessions", || {
        tls_handshakes(&resuming, "resumed") >= 1.0
    });
    assert_eventually(WAIT, "the other proxy replaced its connections", || {
        tls_handshakes(&not_resuming, "full") >= full_before + 2.0
    });
    assert_eq!(tls_handshakes(&not_resuming, "resumed"), 0.0);

    // A certificate from a CA the server does not trust: proven with a full handshake, so
    // refused, although the store holds sessions the server would take.
    env.install(&env.certs.other_client.cert, &env.certs.other_client.key);
    assert_eventually(WAIT, "the untrusted certificate is refused", || {
        reloads(&resuming, "upstream", "refused") == 1.0
    });
    assert_eq!(status(&resuming)["generation"], 1);
    // What is in use goes on resuming.
    let resumed = tls_handshakes(&resuming, "resumed");
    env.kill_upstream_connections();
    a.cmd(&["GET", "k"]).assert_bulk("v");
    assert_eventually(WAIT, "the old material still resumes", || {
        tls_handshakes(&resuming, "resumed") > resumed
    });
}

#[test]
fn tls_files_that_do_not_work_are_refused_once_and_used_when_they_do() {
    let env = MtlsEnv::start();
    let proxy = env.start_proxy(&env.proxy_config());
    let mut c = proxy.conn();
    c.cmd(&["SET", "k", "v"]).assert_ok();

    // A certificate with another certificate's key: refused before anything connects.
    env.install(&env.certs.other_client.cert, &env.certs.client.key);
    assert_eventually(WAIT, "the mismatched pair is refused", || {
        reloads(&proxy, "upstream", "refused") == 1.0
    });
    let line = proxy.wait_for_log("event=\"tls.refused\"", WAIT);
    assert!(line.contains("do not belong together"), "{line}");
    assert_eq!(status(&proxy)["tls"]["upstream"]["reload_pending"], true);

    // The right pair, but from a CA the server does not trust yet: the proxy proves it with a
    // connection before using it, and keeps trying at every poll without logging it again.
    env.install(&env.certs.other_client.cert, &env.certs.other_client.key);
    assert_eventually(WAIT, "the untrusted certificate is refused", || {
        reloads(&proxy, "upstream", "refused") == 2.0
    });
    let failures = |p: &Proxy| {
        p.metric("rotaproxy_upstream_connect_failures_total")
            .unwrap_or(0.0)
    };
    let tried = failures(&proxy);
    assert_eventually(WAIT, "three more tries at the poll", || {
        failures(&proxy) >= tried + 3.0
    });
    assert_eq!(reloads(&proxy, "upstream", "refused"), 2.0);
    let s = status(&proxy);
    assert_eq!(s["generation"], 1, "{s}");
    assert_eq!(s["tls"]["upstream"]["last_reload"]["result"], "refused");
    // Nothing changed for clients, even on connections made meanwhile.
    env.kill_upstream_connections();
    c.cmd(&["GET", "k"]).assert_bulk("v");
    proxy.conn().cmd(&["PING"]).assert_simple("PONG");

    // Once the server trusts the new CA, the next try succeeds.
    env.server_trusts(&[&env.certs.ca, &env.certs.other_ca]);
    assert_eventually(
        WAIT,
        "the certificate is used once the server trusts it",
        || status(&proxy)["generation"] == 2,
    );
    let s = status(&proxy);
    assert_eq!(s["tls"]["upstream"]["reload_pending"], false, "{s}");
    assert_eq!(s["tls"]["upstream"]["last_reload"]["result"], "applied");
    assert_eq!(reloads(&proxy, "upstream", "applied"), 1.0);
    let refusals = proxy
        .logs()
        .iter()
        .filter(|l| l.contains("event=\"tls.refused\""))
        .count();
    assert_eq!(refusals, 2, "one log line per refused content and reason");
    c.cmd(&["GET", "k"]).assert_bulk("v");

    // A key file that disappears is said once; what is in use goes on serving.
    std::fs::remove_file(&env.volume.key).unwrap();
    let line = proxy.wait_for_log("cannot read the TLS files", WAIT);
    assert!(line.contains("tls.key"), "{line}");
    env.kill_upstream_connections();
    c.cmd(&["GET", "k"]).assert_bulk("v");

    let keys = env.key_material();
    let mut secrets: Vec<&str> = keys.iter().map(String::as_str).collect();
    secrets.push(&env.password);
    assert_no_secret_in_logs(&proxy, &secrets);
}

#[test]
fn with_rotation_a_certificate_change_is_a_generation_the_next_rotation_keeps() {
    let env = MtlsEnv::start();
    let state = temp_dir();
    let token = random_token(24);
    let proxy = env.start_rotating_proxy(state.path(), &token);
    let mut c = proxy.conn();
    c.cmd(&["SET", "k", "v"]).assert_ok();

    env.server_trusts(&[&env.certs.ca, &env.certs.other_ca]);
    env.install(&env.certs.other_client.cert, &env.certs.other_client.key);
    assert_eventually(WAIT, "the certificate change is generation 2", || {
        status(&proxy)["generation"] == 2
    });
    // The generation counter lives in the rotation state, so a restart starts after it.
    let saved =
        std::fs::read_to_string(state.path().join("rotaproxy-state.json")).expect("state file");
    let saved: Value = serde_json::from_str(&saved).expect("state is JSON");
    assert_eq!(saved["generation"], 2, "{saved}");

    let (code, body) = proxy.http_post("/v1/rotate?wait=true", Some(&token), "");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"success\""), "{body}");
    assert_eq!(status(&proxy)["generation"], 3);

    // The rotated credential goes with the new certificate, not the old one.
    env.server_trusts(&[&env.certs.other_ca]);
    env.kill_upstream_connections();
    c.cmd(&["GET", "k"]).assert_bulk("v");
    proxy.conn().cmd(&["SET", "after", "both"]).assert_ok();
}

#[test]
fn a_certificate_change_during_a_rotation_waits_for_its_end() {
    let env = MtlsEnv::start();
    let state = temp_dir();
    let token = random_token(24);
    let proxy = env.start_rotating_proxy(state.path(), &token);
    env.server_trusts(&[&env.certs.ca, &env.certs.other_ca]);
    // A client waiting in BLPOP keeps the rotation draining until it is moved, near the
    // deadline.
    let mut blocked = proxy.conn();
    blocked.send_raw(&encode_cmd(&["BLPOP", "jobs", "0"]));
    assert_eventually(WAIT, "BLPOP is waiting on the server", || {
        env.redis.client_running("blpop").is_some()
    });
    let (code, body) = proxy.http_post("/v1/rotate", Some(&token), "");
    assert_eq!(code, 202, "{body}");
    assert_eventually(WAIT, "the rotation is draining", || {
        status(&proxy)["rotation"]["step"] == "drain"
    });
    env.install(&env.certs.other_client.cert, &env.certs.other_client.key);

    assert_eventually(WAIT, "both changes are in", || {
        let s = status(&proxy);
        s["generation"] == 3 && s["rotation"].is_null()
    });
    // The status can show the change before the test's reader of the proxy's output has
    // taken in the line that announces it.
    proxy.wait_for_log("event=\"tls.reloaded\"", WAIT);
    let logs = proxy.logs();
    let position = |needle: &str| {
        logs.iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no log line with {needle}"))
    };
    assert!(
        position("event=\"rotation.end\"") < position("event=\"tls.reloaded\""),
        "the certificate change waited for the rotation to end"
    );
    let s = status(&proxy);
    assert_eq!(s["tls"]["upstream"]["last_reload"]["generation"], 3, "{s}");
    assert_eq!(s["last_rotation"]["outcome"], "success", "{s}");

    // The blocked client got exactly its one answer, from a connection of now.
    env.redis.admin_cmd(&["RPUSH", "jobs", "j1"]);
    assert_eq!(blocked.read_reply(), Frame::bulks(&["jobs", "j1"]));
    // The new credential with the new certificate.
    env.server_trusts(&[&env.certs.other_ca]);
    env.kill_upstream_connections();
    blocked.cmd(&["PING"]).assert_simple("PONG");
    proxy.conn().cmd(&["SET", "after", "both"]).assert_ok();
}

#[test]
fn a_renewed_listener_certificate_serves_new_clients_and_old_ones_keep_theirs() {
    let dir = temp_dir();
    let certs = Certs::generate(&dir.path().join("pki"));
    let read = |p: &Path| std::fs::read(p).expect("read PEM");
    // Mounted the way Kubernetes mounts a TLS secret cert-manager renews.
    let mut volume = SecretVolume::with_files(
        &dir.path().join("listener-tls"),
        &[
            ("tls.crt", &read(&certs.server.cert)),
            ("tls.key", &read(&certs.server.key)),
        ],
    );
    let redis = RedisServer::start(RedisOptions::new());
    let mut config = ProxyConfig::plain(&redis);
    config.extra = format!(
        "[listener.tls]\ncert = {}\nkey = {}\npoll_interval = \"200ms\"\n",
        toml_path(&volume.path("tls.crt")),
        toml_path(&volume.path("tls.key"))
    );
    let proxy = Proxy::start(&config.to_toml(), &[]);
    let mut old = RespConn::connect_tls(proxy.client_addr(), &certs.ca);
    old.cmd(&["SET", "k", "v"]).assert_ok();

    // A certificate with the wrong key is refused, and the one in use goes on serving.
    volume.publish_files(&[
        ("tls.crt", &read(&certs.other_server.cert)),
        ("tls.key", &read(&certs.server.key)),
    ]);
    assert_eventually(WAIT, "the mismatched pair is refused", || {
        reloads(&proxy, "listener", "refused") == 1.0
    });
    RespConn::connect_tls(proxy.client_addr(), &certs.ca)
        .cmd(&["GET", "k"])
        .assert_bulk("v");
    assert_eq!(status(&proxy)["tls"]["listener"]["reload_pending"], true);

    volume.publish_files(&[
        ("tls.crt", &read(&certs.other_server.cert)),
        ("tls.key", &read(&certs.other_server.key)),
    ]);
    assert_eventually(WAIT, "the listener certificate is reloaded", || {
        reloads(&proxy, "listener", "applied") == 1.0
    });
    let mut new = RespConn::connect_tls(proxy.client_addr(), &certs.other_ca);
    new.cmd(&["GET", "k"]).assert_bulk("v");
    assert!(
        RespConn::try_connect_tls_with(
            proxy.client_addr(),
            TlsClientOptions {
                ca: Some(&certs.ca),
                ..TlsClientOptions::default()
            }
        )
        .is_err(),
        "a client trusting only the old CA no longer gets through"
    );
    old.cmd(&["GET", "k"]).assert_bulk("v");
    let s = status(&proxy);
    assert_eq!(s["tls"]["listener"]["reload_pending"], false, "{s}");
    assert!(
        s["tls"]["listener"]["certificate"]["issuer"]
            .to_string()
            .contains("unrelated CA"),
        "{s}"
    );
    assert!(s["tls"].get("upstream").is_none(), "plain upstream: {s}");
    assert_no_secret_in_logs(
        &proxy,
        &[
            &pem_body_line(&certs.server.key),
            &pem_body_line(&certs.other_server.key),
        ],
    );
}

/// Whether the listener let a client with `client_cert` (or none) in: a PING answered. A refused
/// certificate ends the handshake (TLS 1.2) or the connection right after it (TLS 1.3).
fn client_gets_in(proxy: &Proxy, ca: &Path, client_cert: Option<&CertFiles>) -> bool {
    let Ok(mut conn) = RespConn::try_connect_tls_with(
        proxy.client_addr(),
        TlsClientOptions {
            ca: Some(ca),
            client_cert: client_cert.map(|c| (c.cert.as_path(), c.key.as_path())),
            ..TlsClientOptions::default()
        },
    ) else {
        return false;
    };
    conn.try_send_raw(&encode_cmd(&["PING"])).is_ok()
        && matches!(conn.try_read_reply(), Ok(Frame::Simple(pong)) if pong == "PONG")
}

#[test]
fn a_listener_with_optional_client_certificates_checks_only_those_presented() {
    let dir = temp_dir();
    let certs = Certs::generate(&dir.path().join("pki"));
    let redis = RedisServer::start(RedisOptions::new());
    let mut config = ProxyConfig::plain(&redis);
    config.extra = format!(
        "[listener.tls]\ncert = {}\nkey = {}\nclient_ca = {}\nclient_certificates = \"optional\"\n",
        toml_path(&certs.server.cert),
        toml_path(&certs.server.key),
        toml_path(&certs.ca),
    );
    let proxy = Proxy::start(&config.to_toml(), &[]);
    let listeners = &status(&proxy)["listeners"];
    assert_eq!(
        listeners["client_certificates_required"], false,
        "{listeners}"
    );
    assert_eq!(
        listeners["client_certificates_checked"], true,
        "{listeners}"
    );
    assert!(client_gets_in(&proxy, &certs.ca, None), "no certificate");
    assert!(client_gets_in(&proxy, &certs.ca, Some(&certs.client)));
    assert!(
        !client_gets_in(&proxy, &certs.ca, Some(&certs.other_client)),
        "a certificate from another CA"
    );

    // Without client_ca the setting means nothing, and is refused rather than ignored.
    let mut config = ProxyConfig::plain(&redis);
    config.extra = format!(
        "[listener.tls]\ncert = {}\nkey = {}\nclient_certificates = \"required\"\n",
        toml_path(&certs.server.cert),
        toml_path(&certs.server.key),
    );
    let refused = match Proxy::try_start(&config.to_toml(), &[]) {
        Ok(_) => panic!("client_certificates without client_ca was accepted"),
        Err(failure) => failure.logs.join("\n"),
    };
    assert!(
        refused.contains("listener.tls.client_certificates"),
        "{refused}"
    );
}

#[test]
fn a_listener_with_a_client_ca_lets_in_only_its_clients_and_follows_the_file() {
    let dir = temp_dir();
    let certs = Certs::generate(&dir.path().join("pki"));
    let client_ca = dir.path().join("client-ca.pem");
    std::fs::copy(&certs.ca, &client_ca).expect("copy");
    let redis = RedisServer::start(RedisOptions::new());
    let mut config = ProxyConfig::plain(&redis);
    config.extra = format!(
        "[listener.tls]\ncert = {}\nkey = {}\nclient_ca = {}\npoll_interval = \"200ms\"\n",
        toml_path(&certs.server.cert),
        toml_path(&certs.server.key),
        toml_path(&client_ca),
    );
    let proxy = Proxy::start(&config.to_toml(), &[]);
    let listeners = &status(&proxy)["listeners"];
    assert_eq!(listeners["tls"], true, "{listeners}");
    assert_eq!(
        listeners["client_certificates_required"], true,
        "{listeners}"
    );
    assert_eq!(
        listeners["client_certificates_checked"], true,
        "{listeners}"
    );
    assert!(client_gets_in(&proxy, &certs.ca, Some(&certs.client)));
    assert!(!client_gets_in(&proxy, &certs.ca, None), "no certificate");
    assert!(
        !client_gets_in(&proxy, &certs.ca, Some(&certs.other_client)),
        "a certificate from another CA"
    );
    assert!(
        !client_gets_in(&proxy, &certs.ca, Some(&certs.self_signed_client("me"))),
        "a self-signed certificate"
    );
    assert_eventually(WAIT, "the refusals are counted", || {
        proxy
            .metric("rotaproxy_client_connections_rejected_total")
            .is_some_and(|n| n >= 3.0)
    });
    proxy.wait_for_log("client TLS handshake failed", WAIT);
    let mut open = RespConn::connect_tls_with(
        proxy.client_addr(),
        TlsClientOptions {
            ca: Some(&certs.ca),
            client_cert: Some((&certs.client.cert, &certs.client.key)),
            ..TlsClientOptions::default()
        },
    );
    open.cmd(&["SET", "k", "v"]).assert_ok();

    // The clients' CA changes: the next handshakes follow it; a connection open stays.
    replace_file(&client_ca, &certs.other_ca);
    assert_eventually(WAIT, "the new client CA is applied", || {
        reloads(&proxy, "listener", "applied") == 1.0
    });
    assert!(client_gets_in(&proxy, &certs.ca, Some(&certs.other_client)));
    assert!(!client_gets_in(&proxy, &certs.ca, Some(&certs.client)));
    open.cmd(&["GET", "k"]).assert_bulk("v");

    // A file that holds no CA is refused; the CA in use stays.
    std::fs::write(dir.path().join("garbage.pem"), "not a certificate").expect("write");
    replace_file(&client_ca, &dir.path().join("garbage.pem"));
    assert_eventually(WAIT, "the broken file is refused", || {
        reloads(&proxy, "listener", "refused") == 1.0
    });
    assert!(client_gets_in(&proxy, &certs.ca, Some(&certs.other_client)));
    assert_no_secret_in_logs(
        &proxy,
        &[
            &pem_body_line(&certs.client.key),
            &pem_body_line(&certs.other_client.key),
        ],
    );
}
