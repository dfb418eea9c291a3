//! Redis Cloud REST API: the way a password is *set* when the upstream is a Redis Cloud database.
//!
//! Redis Cloud refuses `ACL SETUSER`; every credential change goes through its REST API as an
//! asynchronous task (see `../shared/redis-cloud-api.md` for the facts this module relies on).
//!
//! - [`client`]: [`CloudClient`], the HTTP side: API keys re-read when their file changes, self rate
//!   limiting (400 requests/minute, slowing down when `X-Rate-Limit-Remaining` runs low), retries
//!   with jittered exponential backoff on 429/5xx/connection errors, a clear error on 401/403, and
//!   the operations rotaproxy needs (ACL user password, ACL user creation, default-user password of
//!   Pro and Essentials databases).
//! - [`tasks`]: the task life-cycle (`received` → `processing-in-progress` →
//!   `processing-completed` | `processing-error`): polling with tolerance for the 404s seen right
//!   after a submission, and both shapes of `response.error` (object in real answers, string in the
//!   spec).
//!
//! Nothing in this module logs a request or response body (they carry passwords), and every type's
//! `Debug` leaves secrets out.

pub mod client;
pub mod tasks;

use std::time::Duration;

use serde::Deserialize;

use crate::config::SecretRef;

pub use client::{AclUser, AclUserId, CloudClient, CloudError, DatabaseKind, DatabaseRef};
pub use tasks::{TaskError, TaskId, TaskState, TaskStatus};

/// Where and how to reach the Redis Cloud REST API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudApiConfig {
    /// API root without the `/v1` (request paths carry `/v1/...` exactly as the official OpenAPI
    /// description does). Default `https://api.redislabs.com`.
    #[serde(default = "default_api_root")]
    pub api_root: String,
    /// The account key, sent as `x-api-key`: `env:NAME` or `file:/path`.
    pub account_key: SecretRef,
    /// The user key, sent as `x-api-secret-key`: `env:NAME` or `file:/path`. A file is re-read
    /// whenever it changes (and once more on a 401/403 before giving up), so an operator can create
    /// a new key in the console, drop it into the file and delete the old key without a restart.
    pub secret_key: SecretRef,
    /// Most requests this proxy sends per minute (Redis Cloud allows 400 per account key; lower it
    /// when several proxies share an account).
    #[serde(default = "default_requests_per_minute")]
    pub requests_per_minute: u32,
    /// Longest one HTTP request may take, connection included.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// First pause before retrying a 429, a 5xx or a connection error; doubled (with jitter) at
    /// each further attempt.
    #[serde(default = "default_retry_base", with = "humantime_serde")]
    pub retry_base: Duration,
    /// Longest pause between two attempts.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// Attempts per request (the first one included) before the error is returned.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Pause between two polls of a task (or of an ACL user waiting to become `active`).
    #[serde(default = "default_task_poll_interval", with = "humantime_serde")]
    pub task_poll_interval: Duration,
    /// How long a task (and the user's return to `active`) may take before waiting gives up. The
    /// task keeps running on the server; waiting again with the same task id resumes.
    #[serde(default = "default_task_timeout", with = "humantime_serde")]
    pub task_timeout: Duration,
    /// 404 answers tolerated for a task (or a just-created user) before it counts as unknown:
    /// the task service may not know a task for a moment after its submission.
    #[serde(default = "default_not_found_polls")]
    pub task_not_found_polls: u32,
}

impl CloudApiConfig {
    /// A configuration with every default and the two key references.
    pub fn new(account_key: SecretRef, secret_key: SecretRef) -> CloudApiConfig {
        CloudApiConfig {
            api_root: default_api_root(),
            account_key,
            secret_key,
            requests_per_minute: default_requests_per_minute(),
            request_timeout: default_request_timeout(),
            retry_base: default_retry_base(),
            retry_max: default_retry_max(),
            max_attempts: default_max_attempts(),
            task_poll_interval: default_task_poll_interval(),
            task_timeout: default_task_timeout(),
            task_not_found_polls: default_not_found_polls(),
        }
    }
}

fn default_api_root() -> String {
    "https://api.redislabs.com".to_string()
}
fn default_requests_per_minute() -> u32 {
    400
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_retry_base() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(60)
}
fn default_max_attempts() -> u32 {
    8
}
fn default_task_poll_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_task_timeout() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_not_found_polls() -> u32 {
    10
}

/// Describes this module's metrics to the installed recorder (call next to
/// `crate::metrics::install_recorder`).
pub fn describe_metrics() {
    metrics::describe_counter!(
        client::METRIC_REQUESTS,
        "Requests sent to the Redis Cloud REST API, by HTTP status code (`error`: no answer)"
    );
    metrics::describe_histogram!(
        tasks::METRIC_TASK_SECONDS,
        metrics::Unit::Seconds,
        "Time spent waiting for Redis Cloud tasks to end, by outcome"
    );
}

/// `rotaproxy cloud setup-alternating`: makes sure the second user of an alternating pair
/// exists, with the first one's role. Its password is random and stored nowhere: the first
/// rotation sets one the proxy knows. Returns what was done, for the operator.
pub async fn setup_alternating(
    api: &CloudApiConfig,
    users: &[String],
) -> Result<String, CloudError> {
    let [first, second] = users else {
        return Err(CloudError::Config(
            "rotation.users must name the two alternating users".into(),
        ));
    };
    let client = CloudClient::new(api.clone())?;
    let model = client.find_acl_user(first).await?;
    match client.find_acl_user(second).await {
        Ok(existing) if existing.role == model.role => Ok(format!(
            "ACL user {second} already exists with role {} (id {})",
            existing.role, existing.id
        )),
        Ok(existing) => Err(CloudError::Config(format!(
            "ACL user {second} exists with role {} but {first} has role {}: give both the same role",
            existing.role, model.role
        ))),
        Err(CloudError::AclUserNotFound { .. }) => {
            let password = crate::rotation::secret::generate_password(32)
                .map_err(|e| CloudError::Config(e.to_string()))?;
            let task = client
                .create_acl_user(second, &model.role, &password)
                .await?;
            let done = client.wait_task(&task).await?;
            let id = done
                .resource_id
                .ok_or_else(|| CloudError::Config(format!("task {task} created no ACL user id")))?;
            client.wait_user_active(id).await?;
            Ok(format!(
                "created ACL user {second} (id {id}) with role {}, like {first}",
                model.role
            ))
        }
        Err(other) => Err(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_fields() {
        let c: CloudApiConfig =
            toml::from_str("account_key = \"env:A\"\nsecret_key = \"file:/run/k\"\n").unwrap();
        assert_eq!(c.api_root, "https://api.redislabs.com");
        assert_eq!(c.requests_per_minute, 400);
        assert_eq!(c.retry_base, Duration::from_secs(1));
        assert_eq!(c.retry_max, Duration::from_secs(60));
        let c: CloudApiConfig = toml::from_str(
            "account_key = \"env:A\"\nsecret_key = \"env:B\"\nretry_base = \"10ms\"\n",
        )
        .unwrap();
        assert_eq!(c.retry_base, Duration::from_millis(10));
        let err = toml::from_str::<CloudApiConfig>(
            "account_key = \"env:A\"\nsecret_key = \"env:B\"\nsecret = \"x\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
