//! The `rotaproxy` binary as a child process, with its log captured.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::certs::CertFiles;
use super::redis::RedisServer;
use super::resp::RespConn;

/// How long the proxy may take to log its `listening` line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the binary under test. (Cargo defines it for integration tests; the fixture is also
/// compiled into `examples/cloud_emulator.rs`, which never starts a proxy.)
pub fn proxy_bin() -> &'static str {
    option_env!("CARGO_BIN_EXE_rotaproxy").unwrap_or("target/debug/rotaproxy")
}

/// What a `rotaproxy` command that ends by itself (`check-config`, ...) printed.
pub struct CommandOutput {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    /// Both streams, for assertions and their messages.
    pub fn printed(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `rotaproxy ARGS` to its end with `envs` added (and `RUST_LOG` removed, so the
/// config's log filter holds).
pub fn run_rotaproxy<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    envs: &[(&str, &str)],
) -> CommandOutput {
    let out = Command::new(proxy_bin())
        .args(args)
        .envs(envs.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .expect("run rotaproxy");
    CommandOutput {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A running proxy. Dropping it kills the process (by its PID).
pub struct Proxy {
    child: Option<Child>,
    pid: u32,
    logs: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    client_addr: SocketAddr,
    admin_addr: SocketAddr,
    config_path: PathBuf,
    dir: tempfile::TempDir,
}

/// Why [`Proxy::try_start`] failed: the process exited (or never logged `listening`).
#[derive(Debug)]
pub struct StartFailure {
    /// `None` if it was still running at the deadline (it is killed then).
    pub status: Option<ExitStatus>,
    pub logs: Vec<String>,
}

impl Proxy {
    /// Writes `config_toml` to a temp file, runs `rotaproxy run --config <file>` with `envs`
    /// added to the environment, and waits for the `listening` line. Panics with the captured log
    /// if the process exits first or the line does not come within [`START_TIMEOUT`].
    #[track_caller]
    pub fn start(config_toml: &str, envs: &[(&str, &str)]) -> Proxy {
        match Proxy::try_start(config_toml, envs) {
            Ok(p) => p,
            Err(f) => panic!(
                "rotaproxy did not start (status {:?}); its log:\n{}",
                f.status,
                f.logs.join("\n")
            ),
        }
    }

    /// Like [`Proxy::start`], but a failed start is an `Err` (for tests of refused configs).
    pub fn try_start(config_toml: &str, envs: &[(&str, &str)]) -> Result<Proxy, StartFailure> {
        let dir = tempfile::Builder::new()
            .prefix("rotaproxy-proxy-")
            .tempdir()
            .expect("temp dir");
        let config_path = dir.path().join("rotaproxy.toml");
        std::fs::write(&config_path, config_toml).expect("write config");
        Proxy::try_start_with_config_file(dir, config_path, envs)
    }

    /// Starts with a config file the test wrote itself (kept in `dir`, which the proxy owns
    /// from now on, e.g. so the test can edit the file later).
    pub fn try_start_with_config_file(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        envs: &[(&str, &str)],
    ) -> Result<Proxy, StartFailure> {
        let mut cmd = Command::new(proxy_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn rotaproxy");
        let pid = child.id();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            spawn_reader(child.stderr.take().expect("stderr"), logs.clone(), pid, ""),
            spawn_reader(
                child.stdout.take().expect("stdout"),
                logs.clone(),
                pid,
                "stdout: ",
            ),
        ];

        let deadline = Instant::now() + START_TIMEOUT;
        let addrs = loop {
            if let Some(addrs) = find_listening(&logs.lock().unwrap()) {
                break Ok(addrs);
            }
            if let Ok(Some(status)) = child.try_wait() {
                break Err(Some(status));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break Err(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        match addrs {
            Ok((client_addr, admin_addr)) => Ok(Proxy {
                child: Some(child),
                pid,
                logs,
                readers,
                client_addr,
                admin_addr,
                config_path,
                dir,
            }),
            Err(status) => {
                // Let the readers drain what the process wrote before it exited.
                for r in readers {
                    let _ = r.join();
                }
                let logs = logs.lock().unwrap().clone();
                Err(StartFailure { status, logs })
            }
        }
    }

    /// Where applications connect.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The admin HTTP listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The metrics listener (`admin.metrics_bind`), from the `listening` line.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.logs()
            .iter()
            .filter(|l| l.contains("listening"))
            .find_map(|l| field_addr(l, "metrics_addr="))
    }

    /// A new plain RESP connection to the proxy.
    #[track_caller]
    pub fn conn(&self) -> RespConn {
        RespConn::connect(self.client_addr)
    }

    /// The config file the proxy was started with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The proxy's temp dir (its config file lives there; tests may put state files there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Every line the proxy wrote so far (stderr; stdout lines are prefixed `stdout: `).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// True if some log line contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.logs.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Waits until the proxy has read the server's command table, which it reads in the
    /// background at start where clients must authenticate (it judges unauthenticated clients'
    /// commands by it).
    #[track_caller]
    pub fn wait_for_command_table(&self) {
        self.wait_for_log("read the server's command table", Duration::from_secs(30));
    }

    /// Waits for a log line containing `needle` and returns it; panics with the log on timeout.
    #[track_caller]
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "no log line containing {needle:?} within {timeout:?}; log:\n{}",
                    self.logs().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Peak resident set size (VmHWM) in KiB.
    pub fn vm_hwm_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmHWM:")
    }

    /// Current resident set size (VmRSS) in KiB.
    pub fn vm_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmRSS:")
    }

    /// The proxy's established TCP connections over IPv4, with their kernel timers, as
    /// `/proc/net/tcp` shows them (matched to the process by its sockets' inodes).
    pub fn tcp_connections(&self) -> Vec<TcpConnection> {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid)).expect("read the fd dir");
        let inodes: std::collections::HashSet<String> = fds
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter_map(|target| {
                let target = target.to_string_lossy().into_owned();
                Some(
                    target
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .to_string(),
                )
            })
            .collect();
        let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let port =
                    |address: &str| u16::from_str_radix(address.rsplit(':').next()?, 16).ok();
                let (timer, when) = fields.get(5)?.split_once(':')?;
                let connection = TcpConnection {
                    local_port: port(fields.get(1)?)?,
                    remote_port: port(fields.get(2)?)?,
                    timer: u8::from_str_radix(timer, 16).ok()?,
                    timer_ticks: u64::from_str_radix(when, 16).ok()?,
                };
                // State 01 is ESTABLISHED; field 9 is the socket's inode.
                (fields.get(3)? == &"01" && inodes.contains(*fields.get(9)?)).then_some(connection)
            })
            .collect()
    }

    /// `GET path` on the admin listener: (status, body).
    #[track_caller]
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_request(self.admin_addr, "GET", path, &[], b"")
    }

    /// `POST path` on the admin listener, with `Authorization: Bearer <token>` if given.
    #[track_caller]
    pub fn http_post(&self, path: &str, bearer: Option<&str>, body: &str) -> (u16, String) {
        let auth = bearer.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        http_request(self.admin_addr, "POST", path, &headers, body.as_bytes())
    }

    /// Value of one Prometheus sample (`name` with its labels exactly as printed, e.g.
    /// `rotaproxy_clients` or `rotaproxy_x_total{kind="a"}`), summed if it appears more than once.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (status, body) = self.http_get("/metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        metric_value(&body, name)
    }

    /// Sends SIGHUP (by PID): the proxy re-reads its config file's client auth entries.
    pub fn hangup(&self) {
        self.signal("HUP");
    }

    /// Sends SIGTERM (by PID) to ask for a graceful shutdown.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid);
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`. Once it
    /// has exited, everything it wrote is in [`Proxy::logs`].
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                // The readers reach the end of the pipes now that the process is gone; until
                // they do, its last lines may not be in `logs` yet.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process (SIGKILL, by PID) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Panics if any log line of `proxy` contains any of `secrets`. The message names the secret by
/// its index and shows the line with the secret masked, so the failure itself leaks nothing.
#[track_caller]
pub fn assert_no_secret_in_logs(proxy: &Proxy, secrets: &[&str]) {
    assert_no_secret_in_lines(&proxy.logs(), secrets);
}

/// Same check on any text lines (e.g. a status body, metrics, an error reply).
#[track_caller]
pub fn assert_no_secret_in_lines(lines: &[String], secrets: &[&str]) {
    for (i, line) in lines.iter().enumerate() {
        for (j, s) in secrets.iter().enumerate() {
            assert!(!s.is_empty(), "secret #{j} is empty");
            if line.contains(s) {
                panic!(
                    "secret #{j} appears in line {i}: {}",
                    mask_secrets(line, secrets)
                );
            }
        }
    }
}

/// `text` with every occurrence of every secret replaced by `***`.
pub fn mask_secrets(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s, "***");
    }
    out
}

fn spawn_reader(
    stream: impl Read + Send + 'static,
    logs: Arc<Mutex<Vec<String>>>,
    pid: u32,
    prefix: &'static str,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line =
                        strip_ansi(String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']));
                    eprintln!("[rotaproxy {pid}] {prefix}{line}");
                    logs.lock().unwrap().push(format!("{prefix}{line}"));
                }
            }
        }
    })
}

/// Removes ANSI escape sequences (in case colours slip through).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Finds `client_addr=` and `admin_addr=` on the `listening` line.
pub fn find_listening(lines: &[String]) -> Option<(SocketAddr, SocketAddr)> {
    lines.iter().find_map(|l| {
        if !l.contains("listening") {
            return None;
        }
        Some((
            field_addr(l, "client_addr=")?,
            field_addr(l, "admin_addr=")?,
        ))
    })
}

fn field_addr(line: &str, key: &str) -> Option<SocketAddr> {
    let start = line.find(key)? + key.len();
    let value: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != ',' && *c != '}')
        .collect();
    value.trim_matches('"').parse().ok()
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} not found in /proc/{pid}/status"))
}

/// A minimal HTTP/1.1 client: one request, `Connection: close`, body read to EOF (chunked
/// bodies are decoded). Returns (status, body).
#[track_caller]
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect to admin {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write request");
    s.write_all(body).expect("write body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("read HTTP response from {addr}{path}: {e}"));
    parse_http_response(&raw).unwrap_or_else(|| {
        panic!(
            "malformed HTTP response from {addr}{path}: {}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_http_response(raw: &[u8]) -> Option<(u16, String)> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let mut body = &raw[head_end + 4..];
    let body = if chunked {
        let mut out = Vec::new();
        loop {
            let eol = body.windows(2).position(|w| w == b"\r\n")?;
            let size_text = std::str::from_utf8(&body[..eol]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            body = &body[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(body.get(..size)?);
            body = body.get(size + 2..)?;
        }
        out
    } else {
        body.to_vec()
    };
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Value of a Prometheus sample in an exposition text. `name` with labels (`x_total{kind="a"}`)
/// matches that exact series; a bare name matches every series of that metric, summed.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if let Some(v) = rest.strip_prefix(' ') {
            v
        } else if rest.starts_with('{') && !name.contains('{') {
            match rest.rfind('}') {
                Some(end) => &rest[end + 1..],
                None => continue,
            }
        } else {
            continue;
        };
        let Some(v) = value.split_whitespace().next() else {
            continue;
        };
        if let Ok(v) = v.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// A config file for tests: listener and admin on port 0, text logs. Build with the
/// constructors, adjust the fields, then [`ProxyConfig::to_toml`].
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub upstream_url: String,
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub client_cert: Option<CertFiles>,
    pub username: Option<String>,
    /// `env:NAME` or `file:/path`.
    pub password_ref: Option<String>,
    pub log_level: String,
    /// Lines added inside `[listener]` (e.g. `max_clients = 5`).
    pub listener_extra: String,
    /// Lines added inside `[upstream]`.
    pub upstream_extra: String,
    /// Lines added inside `[admin]` (e.g. `token = "env:ADMIN_TOKEN"`).
    pub admin_extra: String,
    /// Whole sections appended at the end (e.g. `[pool]\nwarm = 2\n`, `[listener.auth]...`).
    pub extra: String,
}

impl ProxyConfig {
    /// Plain upstream `redis://` to `redis`'s plain port, no credentials.
    pub fn plain(redis: &RedisServer) -> ProxyConfig {
        ProxyConfig {
            upstream_url: redis.url(),
            ca_file: None,
            server_name: None,
            client_cert: None,
            username: None,
            password_ref: None,
            log_level: "info".to_string(),
            listener_extra: String::new(),
            upstream_extra: String::new(),
            admin_extra: String::new(),
            extra: String::new(),
        }
    }

    /// TLS upstream `rediss://` to `redis`'s TLS port, trusting `ca`.
    pub fn tls(redis: &RedisServer, ca: &Path) -> ProxyConfig {
        ProxyConfig {
            upstream_url: redis.tls_url(),
            ca_file: Some(ca.to_path_buf()),
            ..ProxyConfig::plain(redis)
        }
    }

    /// Upstream credentials: `username` (None: `default`) and a password reference.
    pub fn credentials(mut self, username: Option<&str>, password_ref: &str) -> ProxyConfig {
        self.username = username.map(str::to_string);
        self.password_ref = Some(password_ref.to_string());
        self
    }

    /// Client certificate for mTLS upstream.
    pub fn client_cert(mut self, files: &CertFiles) -> ProxyConfig {
        self.client_cert = Some(files.clone());
        self
    }

    /// Client auth `password`: clients log in as `default` with the password `password_ref`
    /// (`env:NAME` or `file:/path`) names.
    pub fn client_password(self, password_ref: &str) -> ProxyConfig {
        self.extra(&format!(
            "[listener.auth]\nmode = \"password\"\n\
             [[listener.auth.users]]\nusername = \"default\"\npassword = \"{password_ref}\"\n"
        ))
    }

    /// Appends whole sections.
    pub fn extra(mut self, toml: &str) -> ProxyConfig {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    pub fn to_toml(&self) -> String {
        let mut t = String::new();
        t.push_str("[listener]\nbind = \"127.0.0.1:0\"\n");
        push_lines(&mut t, &self.listener_extra);
        t.push_str(&format!(
            "\n[upstream]\nurl = {}\n",
            toml_str(&self.upstream_url)
        ));
        if let Some(ca) = &self.ca_file {
            t.push_str(&format!("ca_file = {}\n", toml_path(ca)));
        }
        if let Some(n) = &self.server_name {
            t.push_str(&format!("server_name = {}\n", toml_str(n)));
        }
        if let Some(c) = &self.client_cert {
            t.push_str(&format!("client_cert = {}\n", toml_path(&c.cert)));
            t.push_str(&format!("client_key = {}\n", toml_path(&c.key)));
        }
        push_lines(&mut t, &self.upstream_extra);
        if self.username.is_some() || self.password_ref.is_some() {
            t.push_str("\n[credentials]\n");
            if let Some(u) = &self.username {
                t.push_str(&format!("username = {}\n", toml_str(u)));
            }
            if let Some(p) = &self.password_ref {
                t.push_str(&format!("password = {}\n", toml_str(p)));
            }
        }
        t.push_str("\n[admin]\nbind = \"127.0.0.1:0\"\n");
        push_lines(&mut t, &self.admin_extra);
        t.push_str(&format!(
            "\n[log]\nformat = \"text\"\nlevel = {}\n",
            toml_str(&self.log_level)
        ));
        if !self.extra.is_empty() {
            t.push('\n');
            t.push_str(&self.extra);
        }
        t
    }
}

fn push_lines(t: &mut String, lines: &str) {
    if !lines.is_empty() {
        t.push_str(lines);
        if !lines.ends_with('\n') {
            t.push('\n');
        }
    }
}

/// A TOML basic string literal.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A path as a TOML string literal.
pub fn toml_path(p: &Path) -> String {
    toml_str(&p.display().to_string())
}

/// One established TCP connection of a process (see [`Proxy::tcp_connections`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpConnection {
    pub local_port: u16,
    pub remote_port: u16,
    /// Which kernel timer runs: 0 none, 1 retransmit, 2 keepalive, 4 zero-window probe.
    pub timer: u8,
    /// When it fires, in clock ticks (1/100 s) from now.
    pub timer_ticks: u64,
}

impl TcpConnection {
    /// The keepalive timer's time left, if that is the timer running.
    pub fn keepalive_left(&self) -> Option<Duration> {
        (self.timer == 2).then(|| Duration::from_millis(self.timer_ticks * 10))
    }
}
