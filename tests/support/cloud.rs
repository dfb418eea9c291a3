//! A local emulator of the parts of the Redis Cloud REST API that rotaproxy uses, in front of a
//! real `redis-server` (the fixture's [`RedisServer`]) on which every change is applied.
//!
//! It follows the official OpenAPI description (paths under `/v1`, JSON shapes) and, where they
//! differ, the facts in `../shared/redis-cloud-api.md`; `tests/cloud_emulator.rs` holds one test
//! per modelled fact (the realism profile) and the spec-conformance test.
//!
//! What it models:
//! - `x-api-key` + `x-api-secret-key` on every request; a wrong or revoked key gets a 401 with an
//!   HTML body (as the API's front server sometimes answers); an account may hold several secret
//!   keys; [`CloudEmulator::deny_source_ip`] makes valid keys get the 403 of an IP allow-list.
//! - 400 requests per minute per account key, `X-Rate-Limit-Remaining` on every answer, 429 with
//!   "You have exhausted your API Request Quota" beyond; [`CloudEmulator::force_429`] answers the
//!   next requests with the "account busy" 429.
//! - `GET/POST /v1/acl/users`, `GET/PUT/DELETE /v1/acl/users/{aclUserId}`: one password per user,
//!   8–128 characters, applied with `ACL SETUSER <name> resetpass ><pw> on ~* &* +@all`; a user is
//!   `pending` while a task for it is queued or running and for a short lag after it completed
//!   ([`CloudEmulator::set_user_active_lag`]), then `active` (or `error`).
//! - `GET/PUT /v1/subscriptions/{sid}/databases/{dbid}` (Pro) and
//!   `GET/PUT /v1/fixed/subscriptions/{sid}/databases/{dbid}` (Essentials): both name the one
//!   database behind the emulator; `password` REPLACES the default user's password (`ACL SETUSER
//!   default resetpass >pw on`), must be shorter than 50 characters; `enableDefaultUser` and
//!   `enableTls` are kept too. `clientTlsCertificates` replaces the whole list and, when the
//!   Redis serves TLS, is enforced there: the list becomes its `tls-ca-cert-file` (each
//!   self-signed certificate its own trust anchor) with `tls-auth-clients yes`, an empty list
//!   `tls-auth-clients no` (new connections only, as on Redis Cloud).
//! - Every POST/PUT/DELETE answers at once (202 for `POST /v1/acl/users`, 200 otherwise) with a
//!   task in `received`; one task at a time runs (FIFO): at least [`set_task_delay`] in
//!   `received`, then [`set_task_delay`] (or [`slow_next_task`]) in `processing-in-progress`,
//!   then `processing-completed` | `processing-error`. `response.error` is an object
//!   `{"type","status","description"}` (real API) or, with [`error_as_string`], a string (spec).
//!   [`task_404_polls`] makes the first polls of each new task answer 404.
//!
//! The emulator runs on its own tokio runtime in a background thread (HTTP on `127.0.0.1:0`) and
//! one worker thread for the tasks; dropping it stops both. When it starts it gives the
//! database's `default` user a password ([`CloudEmulator::default_password`]), as on Redis Cloud.
//!
//! [`set_task_delay`]: CloudEmulator::set_task_delay
//! [`slow_next_task`]: CloudEmulator::slow_next_task
//! [`error_as_string`]: CloudEmulator::error_as_string
//! [`task_404_polls`]: CloudEmulator::task_404_polls

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use super::random_token;
use super::redis::{ADMIN_USER, RedisServer};
use super::resp::{Frame, RespConn, encode_cmd};

/// Requests per minute and account key, as on Redis Cloud.
pub const RATE_LIMIT_PER_MINUTE: usize = 400;
/// Body of the quota 429 seen in the wild.
pub const QUOTA_MESSAGE: &str = "You have exhausted your API Request Quota";
/// The account id the emulator reports.
pub const ACCOUNT_ID: i64 = 1_001_234;

const PRO_SUBSCRIPTION: i64 = 2_100_101;
const PRO_DATABASE: i64 = 13_000_201;
const ESSENTIALS_SUBSCRIPTION: i64 = 2_200_301;
const ESSENTIALS_DATABASE: i64 = 13_000_401;

const UNAUTHORIZED_HTML: &str = "<html>\r\n<head><title>401 Authorization Required</title></head>\r\n<body>\r\n<center><h1>401 Authorization Required</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

/// One request the emulator received, and what it answered. Key header values are replaced by
/// `[redacted]` (their names stay, so tests can see they were sent).
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, as sent (e.g. `/v1/acl/users/3`).
    pub path: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub status: u16,
    pub response_content_type: String,
    pub response_body: String,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An ACL user as the emulator holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmulatedUser {
    pub id: i64,
    pub name: String,
    pub role: String,
    pub status: String,
}

/// The life of one task, for assertions about ordering.
#[derive(Debug, Clone)]
pub struct TaskRecord {
    pub id: String,
    pub command_type: String,
    pub status: String,
    pub submitted: Instant,
    pub started: Option<Instant>,
    pub finished: Option<Instant>,
    pub error_code: Option<String>,
}

/// An answer read by [`CloudEmulator::raw`].
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics if it is not).
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!("HTTP {} body is not JSON ({e}): {}", self.status, self.body)
        })
    }
}

/// Key files written by [`CloudEmulator::write_key_files`].
#[derive(Debug, Clone)]
pub struct KeyFiles {
    pub account: PathBuf,
    pub secret: PathBuf,
}

/// The running emulator. Dropping it stops the HTTP server and the task worker.
pub struct CloudEmulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    account_key: String,
    secret_key: String,
    stop_http: Option<tokio::sync::oneshot::Sender<()>>,
    http_thread: Option<JoinHandle<()>>,
    worker_thread: Option<JoinHandle<()>>,
}

impl CloudEmulator {
    /// Starts the emulator in front of `redis` (gives its `default` user a random password).
    pub fn start(redis: &RedisServer) -> CloudEmulator {
        let account_key = random_token(20);
        let secret_key = random_token(40);
        let default_password = format!("dflt-{}", random_token(24));
        let redis_admin = RedisAdmin {
            addr: redis.addr(),
            password: redis.admin_password().to_string(),
        };
        redis_admin
            .run(&[vec![
                "ACL".into(),
                "SETUSER".into(),
                "default".into(),
                "resetpass".into(),
                format!(">{default_password}"),
                "on".into(),
            ]])
            .expect("set the default user's password");

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind emulator");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("emulator addr");
        let state = EmState {
            base_url: format!("http://{addr}"),
            shutdown: false,
            keys: vec![ApiKey {
                account: account_key.clone(),
                secret: secret_key.clone(),
                revoked: false,
            }],
            rate_limit: RATE_LIMIT_PER_MINUTE,
            rate: HashMap::new(),
            forced: VecDeque::new(),
            deny_ip: false,
            redis_tls_dir: redis.has_tls().then(|| redis.dir().to_path_buf()),
            client_cert_changes: Vec::new(),
            users: BTreeMap::new(),
            next_user_id: 101,
            db: DbState {
                name: "rotaproxy-emulated-db".into(),
                password: default_password,
                enable_default_user: true,
                enable_tls: false,
                client_certs: Vec::new(),
                endpoint: redis.addr().to_string(),
            },
            tasks: HashMap::new(),
            task_order: Vec::new(),
            queue: VecDeque::new(),
            hold: false,
            task_delay: Duration::from_millis(20),
            user_active_lag: Duration::from_millis(20),
            fail_next: None,
            slow_next: None,
            error_as_string: false,
            task_404_polls: 0,
            requests: Vec::new(),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            wake: Condvar::new(),
            redis: redis_admin,
        });

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let http_thread = std::thread::Builder::new()
            .name("cloud-emulator-http".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("emulator runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        r = axum::serve(listener, app).into_future() => {
                            if let Err(e) = r {
                                eprintln!("cloud emulator: server error: {e}");
                            }
                        }
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime cancels the connections still open.
            })
            .expect("spawn emulator http thread");
        let worker_shared = shared.clone();
        let worker_thread = std::thread::Builder::new()
            .name("cloud-emulator-tasks".into())
            .spawn(move || worker(&worker_shared))
            .expect("spawn emulator worker");

        CloudEmulator {
            addr,
            shared,
            account_key,
            secret_key,
            stop_http: Some(stop_tx),
            http_thread: Some(http_thread),
            worker_thread: Some(worker_thread),
        }
    }

    /// `http://127.0.0.1:<port>`: the API root (paths start with `/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The account key created at start (`x-api-key`).
    pub fn account_key(&self) -> &str {
        &self.account_key
    }

    /// The secret (user) key created at start (`x-api-secret-key`).
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// Writes the start keys to `dir/account-key` and `dir/secret-key` (mode 0600).
    pub fn write_key_files(&self, dir: &Path) -> KeyFiles {
        let files = KeyFiles {
            account: dir.join("account-key"),
            secret: dir.join("secret-key"),
        };
        write_secret_file(&files.account, &self.account_key);
        write_secret_file(&files.secret, &self.secret_key);
        files
    }

    /// Adds a secret key to `account` (a new account key makes a new rate-limit bucket).
    pub fn add_api_key(&self, account: &str, secret: &str) {
        self.lock().keys.push(ApiKey {
            account: account.to_string(),
            secret: secret.to_string(),
            revoked: false,
        });
    }

    /// Revokes a secret key (as deleting it in the console): requests with it get 401.
    pub fn revoke_secret_key(&self, secret: &str) {
        for k in self.lock().keys.iter_mut().filter(|k| k.secret == secret) {
            k.revoked = true;
        }
    }

    /// Every client certificate list applied through a task: its length, and the ids of the
    /// connections open on Redis just before it was applied.
    pub fn client_cert_changes(&self) -> Vec<(usize, std::collections::BTreeSet<i64>)> {
        self.lock().client_cert_changes.clone()
    }

    /// Sets the database's client certificate list at once (set-up, no task), enforced on the
    /// Redis behind when it serves TLS.
    pub fn set_client_certificates(&self, pems: &[String]) {
        let dir = self.lock().redis_tls_dir.clone();
        if let Some(dir) = dir {
            self.shared
                .redis
                .run(&client_cert_commands(&dir, pems))
                .expect("apply the client certificate list");
        }
        self.lock().db.client_certs = pems.to_vec();
    }

    /// Creates an ACL user at once (set-up, no task): `ACL SETUSER` on Redis and an `active`
    /// record. Returns its id.
    pub fn create_acl_user(&self, name: &str, role: &str, password: &str) -> i64 {
        self.shared
            .redis
            .run(&[acl_setuser_cmd(name, password)])
            .unwrap_or_else(|e| panic!("ACL SETUSER {name}: {e}"));
        let mut st = self.lock();
        let id = st.next_user_id;
        st.next_user_id += 1;
        st.users.insert(
            id,
            UserRec {
                id,
                name: name.to_string(),
                role: role.to_string(),
                base_status: "active".into(),
                running: 0,
                deleting: false,
                active_after: None,
            },
        );
        id
    }

    /// The user with this id, as `GET /v1/acl/users/{id}` would show it.
    pub fn acl_user(&self, id: i64) -> Option<EmulatedUser> {
        let st = self.lock();
        st.users.get(&id).map(|u| u.view(Instant::now()))
    }

    /// Minimum time each task spends in `received` and in `processing-in-progress` (default 20 ms).
    pub fn set_task_delay(&self, d: Duration) {
        self.lock().task_delay = d;
    }

    /// How long an ACL user stays `pending` after its task completed (default 20 ms).
    pub fn set_user_active_lag(&self, d: Duration) {
        self.lock().user_active_lag = d;
    }

    /// The next submitted task fails with this error code (nothing is applied).
    pub fn fail_next_task(&self, code: &str) {
        self.lock().fail_next = Some(code.to_string());
    }

    /// The next submitted task stays `processing-in-progress` for `d`.
    pub fn slow_next_task(&self, d: Duration) {
        self.lock().slow_next = Some(d);
    }

    /// The next `n` authenticated requests get the "account busy" 429.
    pub fn force_429(&self, n: usize) {
        self.force_status(429, n);
    }

    /// The next `n` authenticated requests get HTTP `status` (e.g. 503) instead of an answer.
    pub fn force_status(&self, status: u16, n: usize) {
        let mut st = self.lock();
        st.forced.extend(std::iter::repeat_n(status, n));
    }

    /// `response.error` as a string (the spec's shape) instead of an object (the real API's).
    pub fn error_as_string(&self, on: bool) {
        self.lock().error_as_string = on;
    }

    /// The first `n` polls of each task submitted from now on answer 404.
    pub fn task_404_polls(&self, n: u32) {
        self.lock().task_404_polls = n;
    }

    /// Requests per minute per account key (default 400).
    pub fn set_rate_limit(&self, n: usize) {
        self.lock().rate_limit = n;
    }

    /// Valid keys get 403, as from an address outside the key's IP allow-list.
    pub fn deny_source_ip(&self, on: bool) {
        self.lock().deny_ip = on;
    }

    /// While on, the worker picks no new task (they stay `received`).
    pub fn hold_tasks(&self, on: bool) {
        self.lock().hold = on;
        self.shared.wake.notify_all();
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// Every task so far, in submission order.
    pub fn tasks(&self) -> Vec<TaskRecord> {
        let st = self.lock();
        st.task_order
            .iter()
            .filter_map(|id| st.tasks.get(id))
            .map(|t| TaskRecord {
                id: t.id.clone(),
                command_type: t.command_type.to_string(),
                status: t.phase.as_str().to_string(),
                submitted: t.submitted,
                started: t.started,
                finished: t.finished,
                error_code: t.error.as_ref().map(|e| e.0.clone()),
            })
            .collect()
    }

    /// The Pro subscription id of the emulated database.
    pub fn subscription_id(&self) -> i64 {
        PRO_SUBSCRIPTION
    }

    /// The Pro database id of the emulated database.
    pub fn database_id(&self) -> i64 {
        PRO_DATABASE
    }

    /// The Essentials subscription id under which the same database is also reachable.
    pub fn fixed_subscription_id(&self) -> i64 {
        ESSENTIALS_SUBSCRIPTION
    }

    /// The Essentials database id under which the same database is also reachable.
    pub fn fixed_database_id(&self) -> i64 {
        ESSENTIALS_DATABASE
    }

    /// The default user's password as the emulator last applied it.
    pub fn default_password(&self) -> String {
        self.lock().db.password.clone()
    }

    /// `clientTlsCertificates` as last applied (PEM strings).
    pub fn client_tls_certificates(&self) -> Vec<String> {
        self.lock().db.client_certs.clone()
    }

    /// Whether a fresh connection to the real Redis accepts `AUTH user password`.
    pub fn redis_accepts(&self, user: &str, password: &str) -> bool {
        let Ok(mut c) = RespConn::try_connect(self.shared.redis.addr) else {
            return false;
        };
        if c.try_send_raw(&encode_cmd(&["AUTH", user, password]))
            .is_err()
        {
            return false;
        }
        c.try_read_reply().ok() == Some(Frame::simple("OK"))
    }

    /// One HTTP request with the start keys; `body` is sent as JSON.
    pub fn raw(&self, method: &str, path: &str, body: Option<&str>) -> RawResponse {
        let headers = [
            ("x-api-key", self.account_key.as_str()),
            ("x-api-secret-key", self.secret_key.as_str()),
        ];
        raw_http(self.addr, method, path, &headers, body)
    }

    /// One HTTP request with exactly these headers.
    pub fn raw_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> RawResponse {
        raw_http(self.addr, method, path, headers, body)
    }

    /// Polls `GET /v1/tasks/{id}` (start keys) until the task ends or `timeout` passes; returns
    /// every distinct status seen, in order, and the last answer.
    pub fn wait_task(&self, task_id: &str, timeout: Duration) -> (Vec<String>, Value) {
        let deadline = Instant::now() + timeout;
        let mut seen: Vec<String> = Vec::new();
        loop {
            let r = self.raw("GET", &format!("/v1/tasks/{task_id}"), None);
            if r.status == 200 {
                let v = r.json();
                let status = v["status"].as_str().unwrap_or_default().to_string();
                if seen.last() != Some(&status) {
                    seen.push(status.clone());
                }
                if status == "processing-completed" || status == "processing-error" {
                    return (seen, v);
                }
            }
            assert!(
                Instant::now() < deadline,
                "task {task_id} did not end within {timeout:?}; statuses seen: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn lock(&self) -> MutexGuard<'_, EmState> {
        self.shared.lock()
    }
}

impl Drop for CloudEmulator {
    fn drop(&mut self) {
        self.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(tx) = self.stop_http.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.http_thread.take() {
            let _ = t.join();
        }
        if let Some(t) = self.worker_thread.take() {
            let _ = t.join();
        }
    }
}

fn write_secret_file(path: &Path, value: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("{value}\n")).expect("write key file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

// ------------------------------------------------------------------------------------------------
// State

struct Shared {
    state: Mutex<EmState>,
    /// Wakes the task worker (new task, knob changed, shutdown).
    wake: Condvar,
    redis: RedisAdmin,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, EmState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct ApiKey {
    account: String,
    secret: String,
    revoked: bool,
}

struct UserRec {
    id: i64,
    name: String,
    role: String,
    /// `active` or `error`: what the user shows once nothing is pending.
    base_status: String,
    /// Tasks queued or running on this user.
    running: u32,
    deleting: bool,
    /// Still `pending` until then (the lag after a completed task).
    active_after: Option<Instant>,
}

impl UserRec {
    fn status(&self, now: Instant) -> &str {
        if self.deleting {
            "deleting"
        } else if self.running > 0 || self.active_after.is_some_and(|t| t > now) {
            "pending"
        } else {
            &self.base_status
        }
    }

    fn view(&self, now: Instant) -> EmulatedUser {
        EmulatedUser {
            id: self.id,
            name: self.name.clone(),
            role: self.role.clone(),
            status: self.status(now).to_string(),
        }
    }

    fn json(&self, now: Instant) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "status": self.status(now),
            "links": [],
        })
    }
}

/// The one database behind the emulator (reachable by its Pro and its Essentials ids).
struct DbState {
    name: String,
    password: String,
    enable_default_user: bool,
    enable_tls: bool,
    client_certs: Vec<String>,
    endpoint: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DbKind {
    Pro,
    Essentials,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Received,
    InProgress,
    Completed,
    Failed,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Received => "received",
            Phase::InProgress => "processing-in-progress",
            Phase::Completed => "processing-completed",
            Phase::Failed => "processing-error",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Phase::Received => "Task request received and is being queued for processing.",
            Phase::InProgress => "Request processing is in progress.",
            Phase::Completed => "Request processing completed successfully.",
            Phase::Failed => {
                "Task request failed during processing. See error information for failure details."
            }
        }
    }
}

#[derive(Clone)]
enum Op {
    CreateUser {
        name: Option<String>,
        role: Option<String>,
        password: Option<String>,
    },
    UpdateUser {
        id: i64,
        role: Option<String>,
        password: Option<String>,
    },
    DeleteUser {
        id: i64,
    },
    UpdateDb {
        kind: DbKind,
        password: Option<String>,
        enable_default_user: Option<bool>,
        enable_tls: Option<bool>,
        client_certs: Option<Vec<String>>,
    },
}

impl Op {
    fn user_id(&self) -> Option<i64> {
        match self {
            Op::UpdateUser { id, .. } | Op::DeleteUser { id } => Some(*id),
            _ => None,
        }
    }
}

struct TaskRec {
    id: String,
    command_type: &'static str,
    op: Op,
    phase: Phase,
    timestamp: String,
    submitted: Instant,
    started: Option<Instant>,
    finished: Option<Instant>,
    /// How long the task stays in progress.
    work: Duration,
    /// Injected failure code, decided at submission.
    forced_failure: Option<String>,
    /// `(code, description)` on failure.
    error: Option<(String, String)>,
    resource_id: Option<i64>,
    additional_resource_id: Option<i64>,
    /// Polls still to be answered 404.
    not_found_left: u32,
}

struct EmState {
    base_url: String,
    shutdown: bool,
    keys: Vec<ApiKey>,
    rate_limit: usize,
    /// Per account key: times of the requests of the last minute.
    rate: HashMap<String, VecDeque<Instant>>,
    forced: VecDeque<u16>,
    deny_ip: bool,
    /// Where the client certificate list is written for Redis; None when it has no TLS.
    redis_tls_dir: Option<PathBuf>,
    /// Every client certificate list applied: its length, and the ids of the connections open
    /// on Redis just before (to check what was still connected when a certificate went).
    client_cert_changes: Vec<(usize, std::collections::BTreeSet<i64>)>,
    users: BTreeMap<i64, UserRec>,
    next_user_id: i64,
    db: DbState,
    tasks: HashMap<String, TaskRec>,
    task_order: Vec<String>,
    queue: VecDeque<String>,
    hold: bool,
    task_delay: Duration,
    user_active_lag: Duration,
    fail_next: Option<String>,
    slow_next: Option<Duration>,
    error_as_string: bool,
    task_404_polls: u32,
    requests: Vec<RecordedRequest>,
}

// ------------------------------------------------------------------------------------------------
// HTTP

struct Answer {
    status: u16,
    content_type: &'static str,
    body: String,
    remaining: Option<usize>,
}

impl Answer {
    fn json(status: u16, v: Value) -> Answer {
        Answer {
            status,
            content_type: "application/json",
            body: v.to_string(),
            remaining: None,
        }
    }

    fn error(status: u16, description: &str) -> Answer {
        let reason = match status {
            400 => "400 BAD_REQUEST",
            403 => "403 FORBIDDEN",
            404 => "404 NOT_FOUND",
            405 => "405 METHOD_NOT_ALLOWED",
            429 => "429 TOO_MANY_REQUESTS",
            503 => "503 SERVICE_UNAVAILABLE",
            _ => "500 INTERNAL_SERVER_ERROR",
        };
        Answer::json(
            status,
            json!({"status": reason, "description": description}),
        )
    }
}

async fn handle(
    AxumState(shared): AxumState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| uri.path().to_string());
    let body_text = String::from_utf8_lossy(&body).into_owned();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let account = header("x-api-key");
    let secret = header("x-api-secret-key");

    let mut st = shared.lock();
    let answer = answer(
        &mut st,
        &shared,
        &method,
        uri.path(),
        account.as_deref(),
        secret.as_deref(),
        &body_text,
    );
    let recorded_headers = headers
        .iter()
        .map(|(k, v)| {
            let name = k.as_str().to_ascii_lowercase();
            let value = if name == "x-api-key" || name == "x-api-secret-key" {
                "[redacted]".to_string()
            } else {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            };
            (name, value)
        })
        .collect();
    st.requests.push(RecordedRequest {
        method: method.as_str().to_string(),
        path: path_and_query,
        headers: recorded_headers,
        body: body_text,
        status: answer.status,
        response_content_type: answer.content_type.to_string(),
        response_body: answer.body.clone(),
    });
    drop(st);

    let mut builder = Response::builder()
        .status(answer.status)
        .header("content-type", answer.content_type);
    if let Some(r) = answer.remaining {
        builder = builder.header("X-Rate-Limit-Remaining", r.to_string());
    }
    builder
        .body(Body::from(answer.body))
        .expect("valid response")
}

fn answer(
    st: &mut EmState,
    shared: &Shared,
    method: &Method,
    path: &str,
    account: Option<&str>,
    secret: Option<&str>,
    body: &str,
) -> Answer {
    let (Some(account), Some(secret)) = (account, secret) else {
        return unauthorized();
    };
    if !st
        .keys
        .iter()
        .any(|k| k.account == account && k.secret == secret && !k.revoked)
    {
        return unauthorized();
    }
    if st.deny_ip {
        return Answer::error(
            403,
            "Not allowed to access requested resource (client source IP not in the API key's allow-list)",
        );
    }
    // Rate limit per account key, over the last minute.
    let now = Instant::now();
    let limit = st.rate_limit;
    let bucket = st.rate.entry(account.to_string()).or_default();
    while bucket
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
    {
        bucket.pop_front();
    }
    if bucket.len() >= limit {
        return Answer {
            status: 429,
            content_type: "text/plain",
            body: QUOTA_MESSAGE.to_string(),
            remaining: Some(0),
        };
    }
    bucket.push_back(now);
    let remaining = limit - bucket.len();

    let mut a = if let Some(status) = st.forced.pop_front() {
        if status == 429 {
            Answer::error(
                429,
                "Too many resources are concurrently created / updated / deleted in the account. Please re-submit API requests after resource changes are completed",
            )
        } else {
            Answer::error(status, "Injected failure")
        }
    } else {
        route(st, shared, method, path, body)
    };
    a.remaining = Some(remaining);
    a
}

fn unauthorized() -> Answer {
    Answer {
        status: 401,
        content_type: "text/html",
        body: UNAUTHORIZED_HTML.to_string(),
        remaining: None,
    }
}

fn route(st: &mut EmState, shared: &Shared, method: &Method, path: &str, body: &str) -> Answer {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let now = Instant::now();
    match segments.as_slice() {
        ["v1", "acl", "users"] => match *method {
            Method::GET => {
                let users: Vec<Value> = st.users.values().map(|u| u.json(now)).collect();
                Answer::json(
                    200,
                    json!({"accountId": ACCOUNT_ID, "users": users, "links": []}),
                )
            }
            Method::POST => {
                let Ok(req) = serde_json::from_str::<CreateUserBody>(body) else {
                    return Answer::error(400, "Bad Request: malformed ACL user create request");
                };
                let op = Op::CreateUser {
                    name: req.name,
                    role: req.role,
                    password: req.password,
                };
                let t = submit(st, shared, "aclUserCreateRequest", op);
                Answer::json(202, t)
            }
            _ => Answer::error(405, "Method not allowed"),
        },
        ["v1", "acl", "users", id] => {
            let Ok(id) = id.parse::<i64>() else {
                return Answer::error(400, "Bad Request: aclUserId must be an integer");
            };
            match *method {
                Method::GET => match st.users.get(&id) {
                    Some(u) => Answer::json(200, u.json(now)),
                    None => Answer::error(404, "ACL user not found"),
                },
                Method::PUT => {
                    let Ok(req) = serde_json::from_str::<UpdateUserBody>(body) else {
                        return Answer::error(
                            400,
                            "Bad Request: malformed ACL user update request",
                        );
                    };
                    let op = Op::UpdateUser {
                        id,
                        role: req.role,
                        password: req.password,
                    };
                    Answer::json(200, submit(st, shared, "aclUserUpdateRequest", op))
                }
                Method::DELETE => Answer::json(
                    200,
                    submit(st, shared, "aclUserDeleteRequest", Op::DeleteUser { id }),
                ),
                _ => Answer::error(405, "Method not allowed"),
            }
        }
        ["v1", "tasks", id] => match *method {
            Method::GET => {
                let as_string = st.error_as_string;
                let base = st.base_url.clone();
                match st.tasks.get_mut(*id) {
                    Some(t) if t.not_found_left > 0 => {
                        t.not_found_left -= 1;
                        Answer::error(404, "Task not found")
                    }
                    Some(t) => Answer::json(200, task_json(t, &base, as_string, true)),
                    None => Answer::error(404, "Task not found"),
                }
            }
            _ => Answer::error(405, "Method not allowed"),
        },
        ["v1", "subscriptions", sid, "databases", dbid] => {
            database(st, shared, method, DbKind::Pro, sid, dbid, body)
        }
        ["v1", "fixed", "subscriptions", sid, "databases", dbid] => {
            database(st, shared, method, DbKind::Essentials, sid, dbid, body)
        }
        _ => Answer::error(404, "Not Found"),
    }
}

#[derive(Deserialize)]
struct CreateUserBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

#[derive(Deserialize)]
struct UpdateUserBody {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The fields of a database update the emulator applies; the other documented fields are
/// accepted (types are not checked) and ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateDbBody {
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    enable_default_user: Option<bool>,
    #[serde(default)]
    enable_tls: Option<bool>,
    #[serde(default)]
    client_tls_certificates: Option<Vec<CertSpec>>,
}

#[derive(Deserialize)]
struct CertSpec {
    #[serde(rename = "publicCertificatePEMString", default)]
    pem: Option<String>,
}

fn database(
    st: &mut EmState,
    shared: &Shared,
    method: &Method,
    kind: DbKind,
    sid: &str,
    dbid: &str,
    body: &str,
) -> Answer {
    let (Ok(sid), Ok(dbid)) = (sid.parse::<i64>(), dbid.parse::<i64>()) else {
        return Answer::error(400, "Bad Request: ids must be integers");
    };
    let known = match kind {
        DbKind::Pro => (sid, dbid) == (PRO_SUBSCRIPTION, PRO_DATABASE),
        DbKind::Essentials => (sid, dbid) == (ESSENTIALS_SUBSCRIPTION, ESSENTIALS_DATABASE),
    };
    if !known {
        return Answer::error(404, "Subscription or database not found");
    }
    match *method {
        Method::GET => {
            let db = &st.db;
            let href = format!("{}/v1{}", st.base_url, db_path(kind));
            Answer::json(
                200,
                json!({
                    "databaseId": dbid,
                    "name": db.name,
                    "protocol": "redis",
                    "status": "active",
                    "publicEndpoint": db.endpoint,
                    "security": {
                        "enableDefaultUser": db.enable_default_user,
                        "password": db.password,
                        "enableTls": db.enable_tls,
                        "tlsClientAuthentication": !db.client_certs.is_empty(),
                    },
                    "links": [{"rel": "self", "type": "GET", "href": href}],
                }),
            )
        }
        Method::PUT => {
            let req = match serde_json::from_str::<UpdateDbBody>(body) {
                Ok(r) => r,
                Err(_) => return Answer::error(400, "Bad Request: malformed database update"),
            };
            let certs = req
                .client_tls_certificates
                .map(|list| list.into_iter().filter_map(|c| c.pem).collect());
            let op = Op::UpdateDb {
                kind,
                password: req.password,
                enable_default_user: req.enable_default_user,
                enable_tls: req.enable_tls,
                client_certs: certs,
            };
            let command = match kind {
                DbKind::Pro => "databaseUpdateRequest",
                DbKind::Essentials => "fixedDatabaseUpdateRequest",
            };
            Answer::json(200, submit(st, shared, command, op))
        }
        _ => Answer::error(405, "Method not allowed"),
    }
}

fn db_path(kind: DbKind) -> String {
    match kind {
        DbKind::Pro => format!("/subscriptions/{PRO_SUBSCRIPTION}/databases/{PRO_DATABASE}"),
        DbKind::Essentials => {
            format!(
                "/fixed/subscriptions/{ESSENTIALS_SUBSCRIPTION}/databases/{ESSENTIALS_DATABASE}"
            )
        }
    }
}

fn new_task_id() -> String {
    let t = random_token(32);
    format!(
        "{}-{}-4{}-a{}-{}",
        &t[0..8],
        &t[8..12],
        &t[13..16],
        &t[17..20],
        &t[20..32]
    )
}

fn timestamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Queues a task and returns the immediate answer (status `received`).
fn submit(st: &mut EmState, shared: &Shared, command_type: &'static str, op: Op) -> Value {
    let id = new_task_id();
    if let Some(uid) = op.user_id()
        && let Some(u) = st.users.get_mut(&uid)
    {
        u.running += 1;
        if matches!(op, Op::DeleteUser { .. }) {
            u.deleting = true;
        }
    }
    let work = st.slow_next.take().unwrap_or(st.task_delay);
    let task = TaskRec {
        id: id.clone(),
        command_type,
        op,
        phase: Phase::Received,
        timestamp: timestamp(),
        submitted: Instant::now(),
        started: None,
        finished: None,
        work,
        forced_failure: st.fail_next.take(),
        error: None,
        resource_id: None,
        additional_resource_id: None,
        not_found_left: st.task_404_polls,
    };
    let answer = task_json(&task, &st.base_url, st.error_as_string, false);
    st.tasks.insert(id.clone(), task);
    st.task_order.push(id.clone());
    st.queue.push_back(id);
    shared.wake.notify_all();
    answer
}

fn task_json(t: &TaskRec, base: &str, error_as_string: bool, with_response: bool) -> Value {
    let mut v = json!({
        "taskId": t.id,
        "commandType": t.command_type,
        "status": t.phase.as_str(),
        "description": t.phase.description(),
        "timestamp": t.timestamp,
        "links": [{"rel": "task", "type": "GET", "href": format!("{base}/v1/tasks/{}", t.id)}],
    });
    if !with_response {
        return v;
    }
    let response = match t.phase {
        Phase::Completed => {
            let mut r = json!({});
            if let Some(id) = t.resource_id {
                r["resourceId"] = json!(id);
            }
            if let Some(id) = t.additional_resource_id {
                r["additionalResourceId"] = json!(id);
            }
            r
        }
        Phase::Failed => {
            let (code, description) = t.error.clone().unwrap_or_default();
            if error_as_string {
                json!({"error": code, "additionalInfo": description})
            } else {
                json!({"error": {
                    "type": code,
                    "status": error_status(&code),
                    "description": description,
                }})
            }
        }
        _ => json!({}),
    };
    v["response"] = response;
    v
}

fn error_status(code: &str) -> &'static str {
    match code {
        "ACL_USER_NOT_FOUND" => "404 NOT_FOUND",
        "GENERAL_ERROR" => "500 INTERNAL_SERVER_ERROR",
        _ => "400 BAD_REQUEST",
    }
}

// ------------------------------------------------------------------------------------------------
// Tasks

/// What a task does to Redis, decided under the lock; run without it.
struct Plan {
    commands: Vec<Vec<String>>,
}

type TaskFailure = (String, String);

fn fail(code: &str, description: &str) -> TaskFailure {
    (code.to_string(), description.to_string())
}

fn acl_setuser_cmd(name: &str, password: &str) -> Vec<String> {
    vec![
        "ACL".into(),
        "SETUSER".into(),
        name.into(),
        "resetpass".into(),
        format!(">{password}"),
        "on".into(),
        "~*".into(),
        "&*".into(),
        "+@all".into(),
    ]
}

fn valid_acl_password(pw: &str) -> bool {
    (8..=128).contains(&pw.chars().count())
}

fn plan(st: &EmState, op: &Op) -> Result<Plan, TaskFailure> {
    let mut commands = Vec::new();
    match op {
        Op::CreateUser {
            name,
            role,
            password,
        } => {
            let name = name.as_deref().unwrap_or("");
            if name.is_empty() {
                return Err(fail("ACL_USER_NAME_IS_MISSING", "The user name is missing"));
            }
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(fail(
                    "ACL_USER_NAME_NOT_VALID",
                    "The user name is not valid",
                ));
            }
            if role.as_deref().unwrap_or("").is_empty() {
                return Err(fail("ACL_ROLE_NAME_IS_MISSING", "The role name is missing"));
            }
            let Some(password) = password else {
                return Err(fail(
                    "ACL_USER_PASSWORD_IS_MISSING",
                    "The password is missing",
                ));
            };
            if !valid_acl_password(password) {
                return Err(fail(
                    "ACL_USER_PASSWORD_NOT_VALID",
                    "The password must be 8 to 128 characters long",
                ));
            }
            if st.users.values().any(|u| u.name == name) || name == "default" {
                return Err(fail(
                    "ACL_USER_NAME_ALREADY_EXISTS",
                    "A user with this name already exists",
                ));
            }
            commands.push(acl_setuser_cmd(name, password));
        }
        Op::UpdateUser { id, password, .. } => {
            let Some(user) = st.users.get(id) else {
                return Err(fail("ACL_USER_NOT_FOUND", "ACL user not found"));
            };
            if let Some(password) = password {
                if !valid_acl_password(password) {
                    return Err(fail(
                        "ACL_USER_PASSWORD_NOT_VALID",
                        "The password must be 8 to 128 characters long",
                    ));
                }
                commands.push(acl_setuser_cmd(&user.name, password));
            }
        }
        Op::DeleteUser { id } => {
            let Some(user) = st.users.get(id) else {
                return Err(fail("ACL_USER_NOT_FOUND", "ACL user not found"));
            };
            commands.push(vec!["ACL".into(), "DELUSER".into(), user.name.clone()]);
        }
        Op::UpdateDb {
            password,
            enable_default_user,
            client_certs,
            ..
        } => {
            if let (Some(list), Some(dir)) = (client_certs, &st.redis_tls_dir) {
                commands.extend(client_cert_commands(dir, list));
            }
            if let Some(password) = password {
                if password.is_empty() {
                    return Err(fail("DATABASE_PASSWORD_IS_BLANK", "The password is blank"));
                }
                if password.chars().count() >= 50 {
                    return Err(fail(
                        "DATABASE_PASSWORD_IS_TOO_LONG",
                        "The database password must be shorter than 50 characters",
                    ));
                }
                if *enable_default_user == Some(false) {
                    return Err(fail(
                        "DISABLING_THE_DEFAULT_USER_AND_UPDATING_A_NEW_PASSWORD_IS_NOT_ALLOWED",
                        "Disabling the default user and setting a new password at once is not allowed",
                    ));
                }
                if !st.db.enable_default_user && *enable_default_user != Some(true) {
                    return Err(fail(
                        "NOT_ALLOWED_TO_UPDATE_A_DATABASE_PASSWORD_WHEN_DEFAULT_USER_IS_DISABLED",
                        "The default user is disabled",
                    ));
                }
                commands.push(vec![
                    "ACL".into(),
                    "SETUSER".into(),
                    "default".into(),
                    "resetpass".into(),
                    format!(">{password}"),
                    "on".into(),
                ]);
            }
            match enable_default_user {
                Some(false) => commands.push(vec![
                    "ACL".into(),
                    "SETUSER".into(),
                    "default".into(),
                    "off".into(),
                ]),
                Some(true) if password.is_none() => commands.push(vec![
                    "ACL".into(),
                    "SETUSER".into(),
                    "default".into(),
                    "on".into(),
                ]),
                _ => {}
            }
        }
    }
    Ok(Plan { commands })
}

/// The Redis commands that make `list` the client certificates Redis accepts (written to a new
/// file in `dir`, which the commands point Redis at).
fn client_cert_commands(dir: &Path, list: &[String]) -> Vec<Vec<String>> {
    let set = |k: &str, v: &str| vec!["CONFIG".into(), "SET".into(), k.into(), v.into()];
    if list.is_empty() {
        return vec![set("tls-auth-clients", "no")];
    }
    let file = dir.join(format!("cloud-client-certs-{}.pem", random_token(8)));
    let pem: String = list.iter().map(|c| format!("{}\n", c.trim())).collect();
    std::fs::write(&file, pem).expect("write the client certificate list");
    vec![
        set("tls-ca-cert-file", &file.display().to_string()),
        set("tls-auth-clients", "yes"),
    ]
}

/// Records a task's outcome in the state (users, database, task).
fn commit(st: &mut EmState, id: &str, result: Result<(), TaskFailure>, forced: bool) {
    let now = Instant::now();
    let lag = st.user_active_lag;
    let Some(task) = st.tasks.get(id) else {
        return;
    };
    let op = task.op.clone();
    let mut resource_id = None;
    let mut additional = None;
    if let Some(uid) = op.user_id()
        && let Some(u) = st.users.get_mut(&uid)
    {
        u.running = u.running.saturating_sub(1);
    }
    match (&op, &result) {
        (
            Op::CreateUser {
                name,
                role,
                password: _,
            },
            Ok(()),
        ) => {
            let uid = st.next_user_id;
            st.next_user_id += 1;
            st.users.insert(
                uid,
                UserRec {
                    id: uid,
                    name: name.clone().unwrap_or_default(),
                    role: role.clone().unwrap_or_default(),
                    base_status: "active".into(),
                    running: 0,
                    deleting: false,
                    active_after: Some(now + lag),
                },
            );
            resource_id = Some(uid);
        }
        (Op::UpdateUser { id, role, .. }, Ok(())) => {
            if let Some(u) = st.users.get_mut(id) {
                if let Some(role) = role {
                    u.role = role.clone();
                }
                u.base_status = "active".into();
                u.active_after = Some(now + lag);
            }
            resource_id = Some(*id);
        }
        (Op::DeleteUser { id }, Ok(())) => {
            st.users.remove(id);
            resource_id = Some(*id);
        }
        (Op::DeleteUser { id }, Err(_)) => {
            if let Some(u) = st.users.get_mut(id) {
                u.deleting = false;
            }
        }
        (Op::UpdateUser { id, .. }, Err(_)) if forced => {
            if let Some(u) = st.users.get_mut(id) {
                u.base_status = "error".into();
            }
        }
        (
            Op::UpdateDb {
                kind,
                password,
                enable_default_user,
                enable_tls,
                client_certs,
            },
            Ok(()),
        ) => {
            let db = &mut st.db;
            if let Some(p) = password {
                db.password = p.clone();
            }
            if let Some(e) = enable_default_user {
                db.enable_default_user = *e;
            }
            if let Some(certs) = client_certs {
                // The list replaces the whole list.
                db.client_certs = certs.clone();
            }
            if let Some(tls) = enable_tls {
                db.enable_tls = *tls;
                if !tls {
                    // Disabling TLS erases the client certificates.
                    db.client_certs.clear();
                }
            }
            let (sub, dbid) = match kind {
                DbKind::Pro => (PRO_SUBSCRIPTION, PRO_DATABASE),
                DbKind::Essentials => (ESSENTIALS_SUBSCRIPTION, ESSENTIALS_DATABASE),
            };
            resource_id = Some(dbid);
            additional = Some(sub);
        }
        _ => {}
    }
    let task = st.tasks.get_mut(id).expect("task exists");
    task.finished = Some(now);
    task.timestamp = timestamp();
    match result {
        Ok(()) => {
            task.phase = Phase::Completed;
            task.resource_id = resource_id;
            task.additional_resource_id = additional;
        }
        Err(e) => {
            task.phase = Phase::Failed;
            task.error = Some(e);
        }
    }
}

/// The task worker: one task at a time, in submission order.
fn worker(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        // Wait for a task that has spent its time in `received`.
        let id = loop {
            if st.shutdown {
                return;
            }
            let front = st.queue.front().and_then(|id| st.tasks.get(id));
            match front {
                Some(t) if !st.hold => {
                    let ready = t.submitted + st.task_delay;
                    let now = Instant::now();
                    if now >= ready {
                        break st.queue.pop_front().expect("front exists");
                    }
                    st = shared
                        .wake
                        .wait_timeout(st, ready - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                _ => {
                    st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            }
        };
        let (work, op, forced) = {
            let t = st.tasks.get_mut(&id).expect("queued task exists");
            t.phase = Phase::InProgress;
            t.started = Some(Instant::now());
            t.timestamp = timestamp();
            (t.work, t.op.clone(), t.forced_failure.clone())
        };
        let until = Instant::now() + work;
        loop {
            if st.shutdown {
                return;
            }
            let now = Instant::now();
            if now >= until {
                break;
            }
            st = shared
                .wake
                .wait_timeout(st, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let result = match &forced {
            Some(code) => Err(fail(code, "Injected failure")),
            None => plan(&st, &op).map(|p| p.commands),
        };
        drop(st);
        if let (
            Ok(_),
            Op::UpdateDb {
                client_certs: Some(list),
                ..
            },
        ) = (&result, &op)
        {
            // Who was connected when the list changed (see `client_cert_changes`).
            let connected = shared.redis.connected_ids().unwrap_or_default();
            shared
                .lock()
                .client_cert_changes
                .push((list.len(), connected));
        }
        let result = result.and_then(|commands| {
            shared
                .redis
                .run(&commands)
                .map_err(|e| fail("GENERAL_ERROR", &format!("applying the change failed: {e}")))
        });
        st = shared.lock();
        commit(&mut st, &id, result, forced.is_some());
        shared.wake.notify_all();
    }
}

// ------------------------------------------------------------------------------------------------
// Redis

struct RedisAdmin {
    addr: SocketAddr,
    password: String,
}

impl RedisAdmin {
    /// Ids of the connections open on Redis now, the admin's own left out.
    fn connected_ids(&self) -> Result<std::collections::BTreeSet<i64>, String> {
        let mut c = RespConn::try_connect(self.addr).map_err(|e| format!("connect: {e}"))?;
        c.try_send_raw(&encode_cmd(&["AUTH", ADMIN_USER, &self.password]))
            .map_err(|e| format!("write: {e}"))?;
        c.try_read_reply().map_err(|e| format!("read: {e}"))?;
        c.try_send_raw(&encode_cmd(&["CLIENT", "LIST"]))
            .map_err(|e| format!("write: {e}"))?;
        let list = c.try_read_reply().map_err(|e| format!("read: {e}"))?;
        Ok(list
            .as_str()
            .unwrap_or("")
            .lines()
            .filter(|l| !l.contains(&format!(" user={ADMIN_USER} ")))
            .filter_map(|l| l.strip_prefix("id=")?.split(' ').next()?.parse().ok())
            .collect())
    }

    /// Runs the commands on a fresh admin connection; an error reply is an `Err` (its text has
    /// no argument in it).
    fn run(&self, commands: &[Vec<String>]) -> Result<(), String> {
        if commands.is_empty() {
            return Ok(());
        }
        let mut c = RespConn::try_connect(self.addr).map_err(|e| format!("connect: {e}"))?;
        let mut one = |args: &[String]| -> Result<Frame, String> {
            c.try_send_raw(&encode_cmd(args))
                .map_err(|e| format!("write: {e}"))?;
            c.try_read_reply().map_err(|e| format!("read: {e}"))
        };
        let auth = one(&["AUTH".into(), ADMIN_USER.into(), self.password.clone()])?;
        if auth != Frame::simple("OK") {
            return Err("admin AUTH refused".into());
        }
        for cmd in commands {
            let reply = one(cmd)?;
            if let Frame::Error(e) = reply {
                return Err(format!("{} {}: {e}", cmd[0], cmd.get(1).map_or("", |s| s)));
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// A small blocking HTTP/1.1 client (tests need status, headers and body as sent).

fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> RawResponse {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect to the cloud emulator {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("write request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("read the emulator's answer to {method} {path}: {e}"));
    parse_response(&raw).unwrap_or_else(|| {
        panic!(
            "malformed HTTP answer to {method} {path}: {}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_response(raw: &[u8]) -> Option<RawResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Some(RawResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}
