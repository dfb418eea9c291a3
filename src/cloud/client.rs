//! The HTTP client of the Redis Cloud REST API.
//!
//! Each request goes through the same path: wait for a turn of the self rate limiter, take the
//! API keys (re-read if their file changed), send, count the answer in
//! `rotaproxy_cloud_api_requests_total{code}`, and then
//! - 2xx: done (success codes differ per operation, 202 or 200: any 2xx is accepted);
//! - 401/403: re-read the keys once more; if they changed, try again with them, otherwise fail
//!   with [`CloudError::KeyRejected`] and one clear log line;
//! - 429 (quota or "account busy"), 5xx, connection errors: retry with jittered exponential
//!   backoff ([`retry_base`](super::CloudApiConfig::retry_base) doubling up to
//!   [`retry_max`](super::CloudApiConfig::retry_max)). A `POST` is retried only when the server
//!   cannot have acted on it (429, or no connection);
//! - anything else: an error naming the operation and the status, never the body verbatim.
//!
//! Bodies are never logged: requests carry passwords, and a database `GET` may carry
//! `security.password`.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::Method;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::CloudApiConfig;
use super::tasks::{TaskId, TaskState};
use crate::config::{SecretError, SecretRef};
use crate::secrets::FollowedSecret;

/// Counter of API requests, labelled `code` (HTTP status, or `error` when there was no answer).
pub const METRIC_REQUESTS: &str = "rotaproxy_cloud_api_requests_total";

/// Header with the requests left in the account key's current minute.
pub const RATE_LIMIT_REMAINING: &str = "x-rate-limit-remaining";

/// Database (default-user) passwords must be shorter than 50 characters.
pub const DATABASE_PASSWORD_MAX_LEN: usize = 49;
/// ACL user passwords are 8 to 128 characters long.
pub const ACL_PASSWORD_LEN: std::ops::RangeInclusive<usize> = 8..=128;

/// The id of an ACL user (`aclUserId`).
pub type AclUserId = i64;

/// An ACL user as `GET /v1/acl/users/{aclUserId}` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AclUser {
    pub id: AclUserId,
    pub name: String,
    /// The database access role assigned to the user.
    #[serde(default)]
    pub role: String,
    /// `active`, `pending`, `error` or `deleting`.
    #[serde(default)]
    pub status: String,
}

/// Which kind of subscription a database belongs to: the update path differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseKind {
    /// Pro (flexible/annual): `/v1/subscriptions/{subscriptionId}/databases/{databaseId}`.
    Pro,
    /// Essentials (fixed): `/v1/fixed/subscriptions/{subscriptionId}/databases/{databaseId}`.
    Essentials,
}

/// A Redis Cloud database, by subscription and database id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseRef {
    pub kind: DatabaseKind,
    pub subscription_id: i64,
    pub database_id: i64,
}

impl DatabaseRef {
    /// The database's path under the API root.
    pub fn path(&self) -> String {
        let prefix = match self.kind {
            DatabaseKind::Pro => "",
            DatabaseKind::Essentials => "/fixed",
        };
        format!(
            "/v1{prefix}/subscriptions/{}/databases/{}",
            self.subscription_id, self.database_id
        )
    }
}

/// Why a call to the Redis Cloud API failed. Never carries a key or a password.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("invalid Redis Cloud API settings: {0}")]
    Config(String),
    #[error("cannot read a Redis Cloud API key: {0}")]
    KeySource(#[from] SecretError),
    #[error("the Redis Cloud API key in {reference} is not a valid header value")]
    KeyFormat { reference: String },
    #[error(
        "API key rejected (HTTP {status}) — was it rotated? check the key file / the key's IP allow-list"
    )]
    KeyRejected { status: u16 },
    #[error(
        "Redis Cloud API busy or rate limited (HTTP 429) on {operation} after {attempts} attempts"
    )]
    Busy {
        operation: &'static str,
        attempts: u32,
    },
    #[error(
        "Redis Cloud API server error (HTTP {status}) on {operation} after {attempts} attempts"
    )]
    Server {
        operation: &'static str,
        status: u16,
        attempts: u32,
    },
    #[error("Redis Cloud API unreachable on {operation} after {attempts} attempts: {reason}")]
    Unreachable {
        operation: &'static str,
        attempts: u32,
        reason: String,
    },
    #[error("Redis Cloud API: {operation}: not found (HTTP 404)")]
    NotFound { operation: &'static str },
    #[error("Redis Cloud API: {operation} answered HTTP {status}: {message}")]
    Http {
        operation: &'static str,
        status: u16,
        message: String,
    },
    #[error("Redis Cloud API: {operation}: unexpected answer: {message}")]
    Decode {
        operation: &'static str,
        message: String,
    },
    #[error("Redis Cloud ACL user {user} not found")]
    AclUserNotFound { user: String },
    #[error("Redis Cloud task {task_id} failed: {error}")]
    TaskFailed {
        task_id: TaskId,
        error: super::tasks::TaskError,
    },
    #[error(
        "Redis Cloud task {task_id} still {last_status} at the deadline (it may still complete)"
    )]
    TaskTimeout {
        task_id: TaskId,
        last_status: String,
    },
    #[error("Redis Cloud task {task_id} unknown to the API after {polls} polls (HTTP 404)")]
    TaskUnknown { task_id: TaskId, polls: u32 },
    #[error("Redis Cloud ACL user {user_id} is {status}, not active")]
    UserStatus { user_id: AclUserId, status: String },
}

impl CloudError {
    /// A short stable label for metrics and the status API.
    pub fn reason(&self) -> &'static str {
        match self {
            CloudError::Config(_) => "config",
            CloudError::KeySource(_) | CloudError::KeyFormat { .. } => "key_source",
            CloudError::KeyRejected { .. } => "key_rejected",
            CloudError::Busy { .. } => "busy",
            CloudError::Server { .. } => "server_error",
            CloudError::Unreachable { .. } => "unreachable",
            CloudError::NotFound { .. } | CloudError::AclUserNotFound { .. } => "not_found",
            CloudError::Http { .. } => "http_error",
            CloudError::Decode { .. } => "bad_answer",
            CloudError::TaskFailed { .. } => "task_failed",
            CloudError::TaskTimeout { .. } => "task_timeout",
            CloudError::TaskUnknown { .. } => "task_unknown",
            CloudError::UserStatus { .. } => "user_status",
        }
    }

    /// The API's error code of a failed task (e.g. `ACL_USER_PASSWORD_NOT_VALID`).
    pub fn task_error_code(&self) -> Option<&str> {
        match self {
            CloudError::TaskFailed { error, .. } => Some(&error.code),
            _ => None,
        }
    }

    /// Whether trying again later may help (as opposed to a refused request or a rejected key).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CloudError::Busy { .. }
                | CloudError::Server { .. }
                | CloudError::Unreachable { .. }
                | CloudError::TaskTimeout { .. }
        )
    }
}

/// A client of the Redis Cloud REST API. Cheap to clone; clones share keys and rate limiter.
#[derive(Clone)]
pub struct CloudClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `api_root` without a trailing slash.
    root: String,
    config: CloudApiConfig,
    keys: Mutex<Keys>,
    limiter: Mutex<RateLimiter>,
}

impl fmt::Debug for CloudClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudClient")
            .field("api_root", &self.inner.root)
            .field("account_key", &self.inner.config.account_key)
            .field("secret_key", &self.inner.config.secret_key)
            .finish_non_exhaustive()
    }
}

/// One request, already encoded. The body may hold a password: it is sent, never logged.
struct Call<'a> {
    method: Method,
    path: &'a str,
    body: Option<Vec<u8>>,
    operation: &'static str,
    /// A secret the body carries, masked out of any error message built from the answer.
    secret: Option<&'a SecretString>,
}

impl CloudClient {
    /// Builds the client. The keys are read at the first request (and whenever their file
    /// changes), so a missing key file is reported by the first call, not here.
    pub fn new(config: CloudApiConfig) -> Result<CloudClient, CloudError> {
        let root = config.api_root.trim_end_matches('/').to_string();
        let url =
            reqwest::Url::parse(&root).map_err(|e| CloudError::Config(format!("api_root: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" => {
                let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
                if !loopback {
                    tracing::warn!(api_root = %root, "Redis Cloud API root is plain http: keys travel unencrypted");
                }
            }
            other => {
                return Err(CloudError::Config(format!(
                    "api_root: scheme {other} is not http or https"
                )));
            }
        }
        if config.requests_per_minute == 0 {
            return Err(CloudError::Config(
                "requests_per_minute must be at least 1".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("rotaproxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CloudError::Config(format!("HTTP client: {e}")))?;
        let keys = Keys {
            account: FollowedSecret::new("Redis Cloud API key", config.account_key.clone()),
            secret: FollowedSecret::new("Redis Cloud API key", config.secret_key.clone()),
        };
        let limiter =
            RateLimiter::new(config.requests_per_minute as usize, Duration::from_secs(60));
        Ok(CloudClient {
            inner: Arc::new(Inner {
                http,
                root,
                config,
                keys: Mutex::new(keys),
                limiter: Mutex::new(limiter),
            }),
        })
    }

    /// The settings the client was built with.
    pub fn config(&self) -> &CloudApiConfig {
        &self.inner.config
    }

    /// All ACL users of the account. The list is parsed leniently: a `users` property (what the
    /// API sends, though the spec's schema lacks it) or a bare array.
    pub async fn list_acl_users(&self) -> Result<Vec<AclUser>, CloudError> {
        let body = self.get("/v1/acl/users", "list ACL users").await?;
        parse_user_list(&body).map_err(|message| CloudError::Decode {
            operation: "list ACL users",
            message,
        })
    }

    /// One ACL user by id.
    pub async fn get_acl_user(&self, id: AclUserId) -> Result<AclUser, CloudError> {
        let path = format!("/v1/acl/users/{id}");
        match self.get(&path, "get ACL user").await {
            Ok(body) => serde_json::from_slice(&body).map_err(|e| CloudError::Decode {
                operation: "get ACL user",
                message: format!("not an ACL user: {e}"),
            }),
            Err(CloudError::NotFound { .. }) => Err(CloudError::AclUserNotFound {
                user: id.to_string(),
            }),
            Err(e) => Err(e),
        }
    }

    /// The database's `status` (`active`, `pending`, ...), from a `GET` of the database. That
    /// answer can carry the default user's password (`security.password`): nothing else is
    /// read from it, and it is not kept.
    pub async fn database_status(&self, db: &DatabaseRef) -> Result<String, CloudError> {
        #[derive(serde::Deserialize)]
        struct Database {
            #[serde(default)]
            status: String,
        }
        let body = self.get(&db.path(), "get database").await?;
        let database: Database = serde_json::from_slice(&body).map_err(|_| CloudError::Decode {
            operation: "get database",
            message: "not a database".into(),
        })?;
        Ok(database.status)
    }

    /// An ACL user by id (all digits) or by name.
    pub async fn find_acl_user(&self, name_or_id: &str) -> Result<AclUser, CloudError> {
        if let Ok(id) = name_or_id.parse::<AclUserId>() {
            match self.get_acl_user(id).await {
                Ok(user) => return Ok(user),
                // A user may be named with digits only: look the name up too.
                Err(CloudError::AclUserNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.list_acl_users()
            .await?
            .into_iter()
            .find(|u| u.name == name_or_id)
            .ok_or_else(|| CloudError::AclUserNotFound {
                user: name_or_id.to_string(),
            })
    }

    /// Submits the creation of an ACL user (`POST /v1/acl/users`). Wait for the task, then for
    /// the user (its id is the task's `resourceId`) to be `active`.
    pub async fn create_acl_user(
        &self,
        name: &str,
        role: &str,
        password: &SecretString,
    ) -> Result<TaskId, CloudError> {
        let body = json!({"name": name, "role": role, "password": password.expose_secret()});
        self.submit(Call {
            method: Method::POST,
            path: "/v1/acl/users",
            body: Some(encode(&body)),
            operation: "create ACL user",
            secret: Some(password),
        })
        .await
    }

    /// Submits a new password for an ACL user (`PUT /v1/acl/users/{aclUserId}`): the user's one
    /// password is replaced.
    pub async fn set_acl_user_password(
        &self,
        user_id: AclUserId,
        password: &SecretString,
    ) -> Result<TaskId, CloudError> {
        let path = format!("/v1/acl/users/{user_id}");
        let body = json!({"password": password.expose_secret()});
        self.submit(Call {
            method: Method::PUT,
            path: &path,
            body: Some(encode(&body)),
            operation: "set ACL user password",
            secret: Some(password),
        })
        .await
    }

    /// Submits a new password for a database's `default` user (Pro or Essentials path). The
    /// default user has one password: the old one stops working when the task completes.
    pub async fn set_database_password(
        &self,
        db: &DatabaseRef,
        password: &SecretString,
    ) -> Result<TaskId, CloudError> {
        let path = db.path();
        let body = json!({"password": password.expose_secret()});
        self.submit(Call {
            method: Method::PUT,
            path: &path,
            body: Some(encode(&body)),
            operation: "set database password",
            secret: Some(password),
        })
        .await
    }

    /// Replaces the database's list of trusted client certificates (`clientTlsCertificates`;
    /// the list given is the whole new list). Certificates are public: nothing to redact.
    pub async fn set_database_client_certificates(
        &self,
        db: &DatabaseRef,
        certificates: &[String],
    ) -> Result<TaskId, CloudError> {
        let path = db.path();
        let list: Vec<serde_json::Value> = certificates
            .iter()
            .map(|pem| json!({"publicCertificatePEMString": pem}))
            .collect();
        let body = json!({"clientTlsCertificates": list});
        self.submit(Call {
            method: Method::PUT,
            path: &path,
            body: Some(encode(&body)),
            operation: "set database client certificates",
            secret: None,
        })
        .await
    }

    /// Sends a change and returns its task id.
    async fn submit(&self, call: Call<'_>) -> Result<TaskId, CloudError> {
        let operation = call.operation;
        let body = self.send(call).await?;
        let task = TaskState::from_json(&body, None)
            .map_err(|message| CloudError::Decode { operation, message })?;
        tracing::debug!(operation, task = %task.id, status = %task.status, "Redis Cloud task submitted");
        Ok(task.id)
    }

    /// `GET path`; the answer's body.
    pub(crate) async fn get(
        &self,
        path: &str,
        operation: &'static str,
    ) -> Result<Bytes, CloudError> {
        self.send(Call {
            method: Method::GET,
            path,
            body: None,
            operation,
            secret: None,
        })
        .await
    }

    async fn send(&self, call: Call<'_>) -> Result<Bytes, CloudError> {
        let config = &self.inner.config;
        let url = format!("{}{}", self.inner.root, call.path);
        let operation = call.operation;
        let idempotent = call.method != Method::POST;
        let max_attempts = config.max_attempts.max(1);
        let mut attempt = 0u32;
        let mut keys_reread = false;
        loop {
            attempt += 1;
            self.wait_turn(operation).await;
            let keys = self.keys(false)?;
            let mut request = self
                .inner
                .http
                .request(call.method.clone(), &url)
                .headers(keys.headers.clone())
                .header(ACCEPT, "application/json");
            if let Some(body) = &call.body {
                request = request
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            let retry = |retryable: bool| retryable && attempt < max_attempts;
            let response = match request.send().await {
                Ok(r) => r,
                Err(e) => {
                    count(None);
                    // Without a connection the server cannot have acted: safe to resend anything.
                    if retry(e.is_connect() || idempotent) {
                        let pause = self.backoff(attempt, None);
                        tracing::warn!(operation, attempt, ?pause, error = %error_chain(&e), "Redis Cloud API unreachable; retrying");
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                    return Err(CloudError::Unreachable {
                        operation,
                        attempts: attempt,
                        reason: error_chain(&e),
                    });
                }
            };
            let status = response.status().as_u16();
            count(Some(status));
            tracing::debug!(operation, method = %call.method, path = call.path, status, attempt, "Redis Cloud API answered");
            self.observe_remaining(response.headers());
            let retry_after = retry_after(response.headers());
            let body = match response.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    if retry(idempotent) {
                        let pause = self.backoff(attempt, None);
                        tracing::warn!(operation, attempt, ?pause, error = %error_chain(&e), "Redis Cloud API answer cut short; retrying");
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                    return Err(CloudError::Unreachable {
                        operation,
                        attempts: attempt,
                        reason: error_chain(&e),
                    });
                }
            };
            match status {
                200..=299 => return Ok(body),
                401 | 403 => {
                    if !keys_reread {
                        keys_reread = true;
                        let fresh = self.keys(true)?;
                        if fresh.fingerprint != keys.fingerprint {
                            tracing::info!(
                                operation,
                                status,
                                "Redis Cloud API refused the key; the key file has changed since, retrying with the new key"
                            );
                            attempt -= 1;
                            continue;
                        }
                    }
                    tracing::error!(
                        operation,
                        status,
                        account_key = %config.account_key,
                        secret_key = %config.secret_key,
                        "Redis Cloud API key rejected (HTTP {status}) — was it rotated? check the key file / the key's IP allow-list"
                    );
                    return Err(CloudError::KeyRejected { status });
                }
                429 => {
                    if retry(true) {
                        let pause = self.backoff(attempt, retry_after);
                        tracing::warn!(
                            operation,
                            attempt,
                            ?pause,
                            "Redis Cloud API busy or rate limited (HTTP 429); retrying"
                        );
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                    return Err(CloudError::Busy {
                        operation,
                        attempts: attempt,
                    });
                }
                500..=599 => {
                    if retry(idempotent) {
                        let pause = self.backoff(attempt, retry_after);
                        tracing::warn!(
                            operation,
                            attempt,
                            status,
                            ?pause,
                            "Redis Cloud API server error; retrying"
                        );
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                    return Err(CloudError::Server {
                        operation,
                        status,
                        attempts: attempt,
                    });
                }
                404 => return Err(CloudError::NotFound { operation }),
                _ => {
                    return Err(CloudError::Http {
                        operation,
                        status,
                        message: summarize(&body, call.secret),
                    });
                }
            }
        }
    }

    /// Waits until the rate limiter lets one more request go.
    async fn wait_turn(&self, operation: &'static str) {
        let now = Instant::now();
        let at = self
            .inner
            .limiter
            .lock()
            .expect("limiter lock")
            .reserve(now);
        if at > now {
            let pause = at - now;
            if pause >= Duration::from_secs(1) {
                tracing::info!(operation, ?pause, "Redis Cloud API rate limit: pausing");
            }
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        }
    }

    fn observe_remaining(&self, headers: &HeaderMap) {
        let remaining = headers
            .get(RATE_LIMIT_REMAINING)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        if let Some(r) = remaining {
            self.inner
                .limiter
                .lock()
                .expect("limiter lock")
                .observe_remaining(r, Instant::now());
        }
    }

    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let c = &self.inner.config;
        let pause = backoff(c.retry_base, c.retry_max, attempt, random_unit());
        match retry_after {
            Some(r) => pause.max(r.min(c.retry_max)),
            None => pause,
        }
    }

    /// The current keys as request headers; `force` re-reads them even if unchanged on disk.
    fn keys(&self, force: bool) -> Result<KeyHeaders, CloudError> {
        let mut keys = self.inner.keys.lock().expect("keys lock");
        let account = keys.account.current(force)?;
        let secret = keys.secret.current(force)?;
        let header = |value: &SecretString, reference: &SecretRef| {
            let mut v = HeaderValue::from_str(value.expose_secret()).map_err(|_| {
                CloudError::KeyFormat {
                    reference: reference.to_string(),
                }
            })?;
            v.set_sensitive(true);
            Ok::<_, CloudError>(v)
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", header(&account, keys.account.reference())?);
        headers.insert(
            "x-api-secret-key",
            header(&secret, keys.secret.reference())?,
        );
        Ok(KeyHeaders {
            headers,
            fingerprint: (keys.account.generation(), keys.secret.generation()),
        })
    }
}

fn encode(body: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(body).expect("a JSON value always encodes")
}

fn count(status: Option<u16>) {
    let code = match status {
        Some(s) => s.to_string(),
        None => "error".to_string(),
    };
    metrics::counter!(METRIC_REQUESTS, "code" => code).increment(1);
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// An error and its causes on one line (reqwest's own message is terse).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// What an unexpected answer said, for an error message: a few known JSON fields, or only the
/// body's kind and size. `secret` (what the request carried) is masked if the answer echoes it.
fn summarize(body: &[u8], secret: Option<&SecretString>) -> String {
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => {
            let field = |name: &str| match v.get(name) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Object(o)) => o
                    .get("type")
                    .or_else(|| o.get("description"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            };
            let parts: Vec<String> = ["error", "description", "message"]
                .iter()
                .filter_map(|n| field(n))
                .collect();
            if parts.is_empty() {
                format!("JSON answer of {} bytes", body.len())
            } else {
                parts.join(": ")
            }
        }
        Err(_) => format!("non-JSON answer of {} bytes", body.len()),
    };
    let mut text: String = text.chars().take(300).collect();
    if let Some(secret) = secret {
        let s = secret.expose_secret();
        if !s.is_empty() && text.contains(s) {
            text = text.replace(s, "[redacted]");
        }
    }
    text
}

/// The list of ACL users: `{"users": [...]}` or a bare array.
fn parse_user_list(body: &[u8]) -> Result<Vec<AclUser>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let list = match &value {
        serde_json::Value::Array(_) => value,
        serde_json::Value::Object(o) => match o.get("users") {
            Some(users @ serde_json::Value::Array(_)) => users.clone(),
            Some(_) => return Err("`users` is not an array".into()),
            None => return Err("no `users` in the list of ACL users".into()),
        },
        _ => return Err("neither an object nor an array".into()),
    };
    serde_json::from_value(list).map_err(|e| format!("bad ACL user in the list: {e}"))
}

/// The keys of one request, and which reading of the key sources they came from.
struct KeyHeaders {
    headers: HeaderMap,
    fingerprint: (u64, u64),
}

struct Keys {
    account: FollowedSecret,
    secret: FollowedSecret,
}

/// A uniform number in [0, 1) from the OS (jitter only; a failure means no jitter).
fn random_unit() -> f64 {
    getrandom::u64()
        .map(|r| (r >> 11) as f64 / (1u64 << 53) as f64)
        .unwrap_or(0.5)
}

/// Pause before attempt `attempt + 1`: `base * 2^(attempt-1)` capped at `max`, then "equal
/// jitter": a uniform pick in the upper half, so retries of many proxies spread out but never
/// come back at once.
pub(crate) fn backoff(base: Duration, max: Duration, attempt: u32, unit: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let full = base.saturating_mul(1u32 << exp).min(max);
    full / 2 + full.mul_f64(unit.clamp(0.0, 1.0) / 2.0)
}

/// Client-side rate limiting: at most `limit` requests in any `window`, and, when the server's
/// `X-Rate-Limit-Remaining` says the account key's budget is low (shared with other proxies or
/// tools), requests spread over the rest of the window instead of running it dry.
pub(crate) struct RateLimiter {
    limit: usize,
    window: Duration,
    /// Send times granted, oldest first (some may lie in the future).
    granted: VecDeque<Instant>,
    /// Last `X-Rate-Limit-Remaining` and when it was seen.
    remaining: Option<(u32, Instant)>,
}

impl RateLimiter {
    pub(crate) fn new(limit: usize, window: Duration) -> RateLimiter {
        RateLimiter {
            limit: limit.max(1),
            window,
            granted: VecDeque::new(),
            remaining: None,
        }
    }

    /// Below this many remaining requests the limiter spreads requests out.
    fn low_water(&self) -> u32 {
        (self.limit / 10).max(1) as u32
    }

    pub(crate) fn observe_remaining(&mut self, remaining: u32, now: Instant) {
        self.remaining = Some((remaining, now));
    }

    /// Grants one request and returns when it may be sent.
    pub(crate) fn reserve(&mut self, now: Instant) -> Instant {
        while self
            .granted
            .front()
            .is_some_and(|t| *t + self.window <= now)
        {
            self.granted.pop_front();
        }
        let mut at = now;
        if let Some(last) = self.granted.back() {
            at = at.max(*last);
        }
        if self.granted.len() >= self.limit {
            let oldest_in_window = self.granted[self.granted.len() - self.limit];
            at = at.max(oldest_in_window + self.window);
        }
        if let Some((remaining, seen)) = self.remaining
            && seen + self.window > now
            && remaining < self.low_water()
            && let Some(last) = self.granted.back()
        {
            at = at.max(*last + self.window / (remaining + 1));
        }
        self.granted.push_back(at);
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        assert_eq!(backoff(base, max, 1, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(base, max, 1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(base, max, 3, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(base, max, 3, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(base, max, 7, 1.0), Duration::from_secs(60));
        assert_eq!(backoff(base, max, 40, 1.0), Duration::from_secs(60));
        for _ in 0..100 {
            let d = backoff(base, max, 2, random_unit());
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
    }

    #[test]
    fn limiter_allows_the_limit_per_window_then_waits() {
        let now = Instant::now();
        let window = Duration::from_secs(60);
        let mut l = RateLimiter::new(400, window);
        for _ in 0..400 {
            assert_eq!(l.reserve(now), now);
        }
        assert_eq!(l.reserve(now), now + window);
        // Once the window has passed, requests go at once again.
        let later = now + window + Duration::from_secs(1);
        assert_eq!(l.reserve(later), later);
    }

    #[test]
    fn limiter_spreads_requests_when_the_server_says_the_budget_is_low() {
        let now = Instant::now();
        let window = Duration::from_secs(60);
        let mut l = RateLimiter::new(400, window);
        l.observe_remaining(100, now);
        assert_eq!(l.reserve(now), now);
        assert_eq!(l.reserve(now), now, "100 left is not low");
        l.observe_remaining(5, now);
        assert_eq!(l.reserve(now), now + Duration::from_secs(10));
        assert_eq!(l.reserve(now), now + Duration::from_secs(20));
        l.observe_remaining(0, now);
        assert_eq!(l.reserve(now), now + Duration::from_secs(80));
        // An old reading no longer applies.
        let later = now + Duration::from_secs(200);
        assert_eq!(l.reserve(later), later);
    }

    #[test]
    fn user_list_parsed_leniently() {
        let with_property = br#"{"accountId":1,"users":[{"id":1,"name":"a","role":"r","status":"active","links":[]}]}"#;
        let bare = br#"[{"id":2,"name":"b","role":"r","status":"pending"}]"#;
        assert_eq!(parse_user_list(with_property).unwrap()[0].name, "a");
        assert_eq!(parse_user_list(bare).unwrap()[0].status, "pending");
        assert!(parse_user_list(br#"{"accountId":1}"#).is_err());
        assert!(parse_user_list(b"<html>").is_err());
    }

    #[test]
    fn summaries_never_echo_the_secret() {
        let secret = SecretString::from("hunter2hunter2".to_string());
        let body = br#"{"description":"password hunter2hunter2 is bad"}"#;
        let s = summarize(body, Some(&secret));
        assert!(!s.contains("hunter2hunter2"), "{s}");
        assert!(s.contains("[redacted]"));
        assert_eq!(
            summarize(b"<html>no</html>", None),
            "non-JSON answer of 15 bytes"
        );
    }

    #[test]
    fn database_paths() {
        let pro = DatabaseRef {
            kind: DatabaseKind::Pro,
            subscription_id: 12,
            database_id: 34,
        };
        assert_eq!(pro.path(), "/v1/subscriptions/12/databases/34");
        let ess = DatabaseRef {
            kind: DatabaseKind::Essentials,
            ..pro
        };
        assert_eq!(ess.path(), "/v1/fixed/subscriptions/12/databases/34");
    }

    #[test]
    fn debug_shows_references_not_keys() {
        let dir = std::env::temp_dir();
        let config = CloudApiConfig::new(
            SecretRef::File(dir.join("no-such-account-key")),
            SecretRef::Env("ROTAPROXY_TEST_NO_SUCH_VAR".into()),
        );
        let client = CloudClient::new(config).unwrap();
        let text = format!("{client:?}");
        assert!(text.contains("no-such-account-key"), "{text}");
        assert!(text.contains("ROTAPROXY_TEST_NO_SUCH_VAR"), "{text}");
    }
}
