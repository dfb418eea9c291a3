//! A real `redis-server` child process on ephemeral loopback ports, in its own temp dir.
//!
//! Everything is written to a `redis.conf` and an ACL file in that dir (no password on a
//! command line). A dedicated admin user ([`ADMIN_USER`], random password) is always present so
//! the harness and tests can run `ACL SETUSER`, `CLIENT LIST`, `DEBUG SLEEP`, ... whatever the
//! test does to the `default` user.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::certs::Certs;
use super::random_token;
use super::resp::{Frame, RespConn};

/// The ACL user the harness administers Redis with.
pub const ADMIN_USER: &str = "harness-admin";

/// How long a start may take before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// TLS settings of the Redis server.
#[derive(Debug, Clone)]
pub struct RedisTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA used to verify client certificates (`tls-ca-cert-file`).
    pub ca: PathBuf,
    /// `tls-auth-clients yes`: a client certificate signed by `ca` is required (mTLS).
    pub require_client_cert: bool,
}

impl RedisTls {
    /// The test server certificate; `mtls` requires a client certificate from the test CA.
    pub fn from_certs(certs: &Certs, mtls: bool) -> RedisTls {
        RedisTls {
            cert: certs.server.cert.clone(),
            key: certs.server.key.clone(),
            ca: certs.ca.clone(),
            require_client_cert: mtls,
        }
    }
}

/// What to start. `Default` is a plain server whose `default` user has no password.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Also listen with TLS on a second port.
    pub tls: Option<RedisTls>,
    /// ACL users, each as the rule text after `user`, e.g. `"app on >pw ~* &* +@all"`.
    /// A rule for `default` replaces the harness's own `default` line.
    pub users: Vec<String>,
    /// Password of the `default` user (`None`: `nopass`).
    pub requirepass: Option<String>,
    /// `user default off`.
    pub disable_default_user: bool,
    /// Extra `redis.conf` directives, e.g. `("maxclients", "50")`.
    pub config: Vec<(String, String)>,
}

impl RedisOptions {
    pub fn new() -> RedisOptions {
        RedisOptions::default()
    }

    pub fn tls(mut self, tls: RedisTls) -> RedisOptions {
        self.tls = Some(tls);
        self
    }

    /// Adds an ACL user: `rule` is e.g. `"app on >pw ~* &* +@all"`.
    pub fn user(mut self, rule: &str) -> RedisOptions {
        self.users.push(rule.to_string());
        self
    }

    pub fn requirepass(mut self, pw: &str) -> RedisOptions {
        self.requirepass = Some(pw.to_string());
        self
    }

    pub fn disable_default_user(mut self) -> RedisOptions {
        self.disable_default_user = true;
        self
    }

    pub fn config(mut self, key: &str, value: &str) -> RedisOptions {
        self.config.push((key.to_string(), value.to_string()));
        self
    }
}

/// A running `redis-server`. Dropping it kills the process (by its PID) and removes its dir.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    tls_port: Option<u16>,
    admin_password: String,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server and waits until it answers PING. Panics (with Redis's log) on failure.
    pub fn start(opts: RedisOptions) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("rotaproxy-redis-")
            .tempdir()
            .expect("temp dir");
        let admin_password = random_token(24);
        write_acl_file(dir.path(), &opts, &admin_password);

        let (port, tls_port) = pick_ports(opts.tls.is_some());
        let mut server = RedisServer {
            child: None,
            port,
            tls_port,
            admin_password,
            dir,
        };
        let mut last_log = String::new();
        for _attempt in 0..8 {
            write_conf(server.dir.path(), &opts, server.port, server.tls_port);
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(StartError::AddrInUse(log)) => {
                    // Another process took a port between our probe and Redis's bind: new ports.
                    last_log = log;
                    (server.port, server.tls_port) = pick_ports(opts.tls.is_some());
                }
                Err(StartError::Other(msg)) => panic!("redis-server did not start: {msg}"),
            }
        }
        panic!("redis-server could not get free ports after 8 attempts; last log:\n{last_log}");
    }

    /// A plain server with the ACL user `username`/`password` (`~* &* +@all`).
    pub fn start_with_user(username: &str, password: &str) -> RedisServer {
        RedisServer::start(
            RedisOptions::new().user(&format!("{username} on >{password} ~* &* +@all")),
        )
    }

    /// Plain TCP port (always present).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// TLS port; panics if the server was started without TLS.
    /// Whether the server also listens with TLS.
    pub fn has_tls(&self) -> bool {
        self.tls_port.is_some()
    }

    pub fn tls_port(&self) -> u16 {
        self.tls_port.expect("this RedisServer has no TLS port")
    }

    /// `127.0.0.1:<port>` (plain).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `127.0.0.1:<tls_port>`.
    pub fn tls_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.tls_port()))
    }

    /// `redis://127.0.0.1:<port>`, for `upstream.url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `rediss://127.0.0.1:<tls_port>`, for `upstream.url` (the test server cert covers 127.0.0.1).
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.tls_port())
    }

    /// The server's own temp dir (`--dir`, ACL file, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// PID of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Password of [`ADMIN_USER`] (never print it).
    pub fn admin_password(&self) -> &str {
        &self.admin_password
    }

    /// Redis's own log (stdout) so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// A new plain connection authenticated as [`ADMIN_USER`].
    #[track_caller]
    pub fn admin_conn(&self) -> RespConn {
        let mut c = RespConn::connect(self.addr());
        let r = c.cmd(&["AUTH", ADMIN_USER, &self.admin_password]);
        assert_eq!(r, Frame::simple("OK"), "admin AUTH failed");
        c
    }

    /// Runs one command on a fresh admin connection and returns the reply.
    #[track_caller]
    pub fn admin_cmd(&self, args: &[&str]) -> Frame {
        self.admin_conn().cmd(args)
    }

    /// `CLIENT LIST`, one map of fields per connection, the harness's own admin connection left out.
    pub fn client_list(&self) -> Vec<BTreeMap<String, String>> {
        let reply = self.admin_cmd(&["CLIENT", "LIST"]);
        let text = reply.as_str().expect("CLIENT LIST text").to_string();
        text.lines()
            .map(|line| {
                line.split(' ')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>()
            })
            .filter(|m| m.get("user").map(String::as_str) != Some(ADMIN_USER))
            .collect()
    }

    /// `CLIENT KILL USER <user>`: closes every connection of `user` in one command, then waits
    /// until the server lists none of them (Redis may free a killed client after answering).
    /// Returns how many were killed.
    pub fn kill_connections_of(&self, user: &str) -> i64 {
        let ids_of_user = || -> std::collections::BTreeSet<String> {
            self.client_list()
                .into_iter()
                .filter(|c| c.get("user").map(String::as_str) == Some(user))
                .filter_map(|c| c.get("id").cloned())
                .collect()
        };
        let before = ids_of_user();
        let killed = self.admin_cmd(&["CLIENT", "KILL", "USER", user]);
        let killed = killed
            .as_int()
            .unwrap_or_else(|| panic!("CLIENT KILL answered {killed:?}"));
        super::assert_eventually(Duration::from_secs(20), "killed connections closed", || {
            ids_of_user().is_disjoint(&before)
        });
        killed
    }

    /// The id of a connection whose last command was `cmd` (lower case, as `CLIENT LIST` shows).
    pub fn client_running(&self, cmd: &str) -> Option<String> {
        self.client_list()
            .into_iter()
            .find(|c| c.get("cmd").map(String::as_str) == Some(cmd))
            .and_then(|c| c.get("id").cloned())
    }

    /// Kills the server (SIGKILL, by PID) and waits for it. Ports stay reserved for [`start_again`].
    ///
    /// [`start_again`]: RedisServer::start_again
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the SAME ports with the same ACL file and waits until ready.
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "start_again while running; call stop() first"
        );
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(StartError::AddrInUse(log)) if Instant::now() < deadline => {
                    // Someone else holds the port for now; it is ours by contract, wait.
                    let _ = log;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(StartError::AddrInUse(log)) => {
                    panic!("redis-server could not get its port back:\n{log}")
                }
                Err(StartError::Other(msg)) => panic!("redis-server did not start again: {msg}"),
            }
        }
    }

    /// Adds a `redis.conf` directive for the next [`start_again`] (e.g. `rename-command`,
    /// which only a restart applies).
    ///
    /// [`start_again`]: RedisServer::start_again
    pub fn add_config_line(&self, line: &str) {
        use std::io::Write as _;
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("redis.conf"))
            .expect("open redis.conf");
        writeln!(conf, "{line}").expect("write redis.conf");
    }

    /// Saves the ACL state (`ACL SAVE`, so users changed at run time survive, as on a real
    /// service), kills the server and starts it again on the same ports. Data is not kept.
    pub fn restart(&mut self) {
        if self.is_running() {
            let r = self.admin_cmd(&["ACL", "SAVE"]);
            assert_eq!(r, Frame::simple("OK"), "ACL SAVE before restart");
        }
        self.stop();
        self.start_again();
    }

    fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        let log_path = self.dir.path().join("redis.log");
        let log_start = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open redis.log");
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_string());
        let child = Command::new(&bin)
            .arg(self.dir.path().join("redis.conf"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StartError::Other(format!(
                    "`{bin}` not found on PATH: run scripts/test once (it installs redis-server), \
                     or `apt-get install redis-server redis-tools`"
                )));
            }
            Err(e) => return Err(StartError::Other(format!("cannot spawn {bin}: {e}"))),
        };
        self.child = Some(child);

        let new_log = |me: &RedisServer| {
            let all = me.log();
            all.get(log_start as usize..).unwrap_or(&all).to_string()
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let log = new_log(self);
                if log.contains("Address already in use") {
                    return Err(StartError::AddrInUse(log));
                }
                return Err(StartError::Other(format!(
                    "exited with {status}; log:\n{log}"
                )));
            }
            if self.ping_ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = new_log(self);
                self.stop();
                return Err(StartError::Other(format!(
                    "not answering PING after {READY_TIMEOUT:?}; log:\n{log}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping_ready(&self) -> bool {
        let Ok(mut c) = RespConn::try_connect(self.addr()) else {
            return false;
        };
        c.set_read_timeout(Some(Duration::from_secs(2)));
        let ok = c
            .try_send_raw(&super::resp::encode_cmd(&[
                "AUTH",
                ADMIN_USER,
                &self.admin_password,
            ]))
            .is_ok()
            && c.try_read_reply().ok() == Some(Frame::simple("OK"))
            && c.try_send_raw(&super::resp::encode_cmd(&["PING"])).is_ok()
            && c.try_read_reply().ok() == Some(Frame::simple("PONG"));
        if !ok {
            return false;
        }
        if let Some(tls_port) = self.tls_port {
            // The TLS listener is bound before the server accepts anything, but check anyway.
            return std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok();
        }
        true
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

enum StartError {
    AddrInUse(String),
    Other(String),
}

fn pick_ports(tls: bool) -> (u16, Option<u16>) {
    // Hold both listeners at once so the two ports differ.
    let a = TcpListener::bind("127.0.0.1:0").expect("bind probe");
    let b = tls.then(|| TcpListener::bind("127.0.0.1:0").expect("bind probe"));
    let port = a.local_addr().unwrap().port();
    let tls_port = b.as_ref().map(|l| l.local_addr().unwrap().port());
    (port, tls_port)
}

fn write_conf(dir: &Path, opts: &RedisOptions, port: u16, tls_port: Option<u16>) {
    let mut c = String::new();
    let d = dir.display();
    c.push_str("bind 127.0.0.1 -::1\nprotected-mode no\n");
    c.push_str(&format!("port {port}\n"));
    if let (Some(tls), Some(tls_port)) = (&opts.tls, tls_port) {
        c.push_str(&format!("tls-port {tls_port}\n"));
        c.push_str(&format!("tls-cert-file \"{}\"\n", tls.cert.display()));
        c.push_str(&format!("tls-key-file \"{}\"\n", tls.key.display()));
        c.push_str(&format!("tls-ca-cert-file \"{}\"\n", tls.ca.display()));
        let auth = if tls.require_client_cert { "yes" } else { "no" };
        c.push_str(&format!("tls-auth-clients {auth}\n"));
    }
    c.push_str(&format!("dir \"{d}\"\n"));
    c.push_str("save \"\"\nappendonly no\ndaemonize no\nlogfile \"\"\nloglevel notice\n");
    c.push_str(&format!("aclfile \"{d}/users.acl\"\n"));
    c.push_str("enable-debug-command yes\nenable-protected-configs yes\n");
    for (k, v) in &opts.config {
        c.push_str(&format!("{k} {v}\n"));
    }
    let path = dir.join("redis.conf");
    fs::write(&path, c).expect("write redis.conf");
}

fn write_acl_file(dir: &Path, opts: &RedisOptions, admin_password: &str) {
    let mut lines = vec![format!(
        "user {ADMIN_USER} on >{admin_password} ~* &* +@all"
    )];
    let test_sets_default = opts
        .users
        .iter()
        .any(|u| u.split_whitespace().next() == Some("default"));
    if !test_sets_default {
        let default = if opts.disable_default_user {
            "user default off resetpass ~* &* +@all".to_string()
        } else if let Some(pw) = &opts.requirepass {
            format!("user default on >{pw} ~* &* +@all")
        } else {
            "user default on nopass ~* &* +@all".to_string()
        };
        lines.push(default);
    }
    for u in &opts.users {
        lines.push(format!("user {u}"));
    }
    let path = dir.join("users.acl");
    let mut f = fs::File::create(&path).expect("create users.acl");
    for l in lines {
        writeln!(f, "{l}").expect("write users.acl");
    }
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod users.acl");
}
