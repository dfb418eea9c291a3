//! Redis Cloud tasks: every change is answered at once with a task id, then applied
//! asynchronously. A task goes `received` → `processing-in-progress` → `processing-completed` or
//! `processing-error`; this module polls `GET /v1/tasks/{taskId}` until it ends.
//!
//! What the spec does not say, and the code handles:
//! - right after a submission the task service may answer 404 a few times
//!   ([`crate::cloud::CloudApiConfig::task_not_found_polls`] are tolerated);
//! - `response.error` is an object `{"type","status","description"}` in real answers although the
//!   spec declares a string: both decode into [`TaskError`];
//! - `processing-completed` is necessary, not sufficient, for ACL users: their `status` must also
//!   be back to `active` ([`CloudClient::wait_user_active`]).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::client::{AclUser, AclUserId, CloudClient, CloudError};

/// Histogram of the time spent waiting for tasks, labelled `outcome`.
pub const METRIC_TASK_SECONDS: &str = "rotaproxy_cloud_task_seconds";

/// The id of a Redis Cloud task (a UUID). Stored in the rotation state, so a restart resumes the
/// same task instead of submitting a new one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub String);

impl TaskId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for TaskId {
    fn from(s: &str) -> TaskId {
        TaskId(s.to_string())
    }
}

/// Where a task is in its life-cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskStatus {
    Initialized,
    Received,
    InProgress,
    Completed,
    Failed,
    /// A status this version does not know; treated as still running.
    Other(String),
}

impl TaskStatus {
    pub fn parse(s: &str) -> TaskStatus {
        match s {
            "initialized" => TaskStatus::Initialized,
            "received" => TaskStatus::Received,
            "processing-in-progress" => TaskStatus::InProgress,
            "processing-completed" => TaskStatus::Completed,
            "processing-error" => TaskStatus::Failed,
            other => TaskStatus::Other(other.to_string()),
        }
    }

    /// The API's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            TaskStatus::Initialized => "initialized",
            TaskStatus::Received => "received",
            TaskStatus::InProgress => "processing-in-progress",
            TaskStatus::Completed => "processing-completed",
            TaskStatus::Failed => "processing-error",
            TaskStatus::Other(s) => s,
        }
    }

    /// `processing-completed` or `processing-error`.
    pub fn is_final(&self) -> bool {
        matches!(self, TaskStatus::Completed | TaskStatus::Failed)
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a task failed: the API's error code (e.g. `ACL_USER_PASSWORD_NOT_VALID`) and what came
/// with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    /// The error code: `type` of the object form, or the string itself.
    pub code: String,
    /// `status` of the object form (e.g. `400 BAD_REQUEST`).
    pub status: Option<String>,
    /// `description` of the object form, or `additionalInfo`.
    pub description: Option<String>,
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.code)?;
        if let Some(d) = &self.description {
            write!(f, " ({})", d)?;
        }
        Ok(())
    }
}

/// One answer of `GET /v1/tasks/{taskId}` (or of a submission).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    pub id: TaskId,
    pub command_type: Option<String>,
    pub status: TaskStatus,
    pub description: Option<String>,
    /// `response.resourceId`: e.g. the id of a created ACL user.
    pub resource_id: Option<i64>,
    /// `response.error`, set on `processing-error`.
    pub error: Option<TaskError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireTask {
    #[serde(default)]
    task_id: Option<String>,
    #[serde(default)]
    command_type: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    response: Option<WireResponse>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireResponse {
    #[serde(default)]
    resource_id: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<WireError>,
    #[serde(default)]
    additional_info: Option<String>,
}

/// `response.error`: an object in real answers, a string in the spec.
#[derive(Deserialize)]
#[serde(untagged)]
enum WireError {
    Code(String),
    Object {
        #[serde(rename = "type", default)]
        kind: Option<String>,
        #[serde(default)]
        status: Option<serde_json::Value>,
        #[serde(default)]
        description: Option<String>,
    },
    /// Any other shape (a number, an array): the task failed, the reason is unknown.
    Other(#[allow(dead_code)] serde::de::IgnoredAny),
}

/// Cap on the text kept from an error description (it ends up in logs and the status API).
const MAX_DESCRIPTION: usize = 300;

fn clip(s: String) -> String {
    if s.len() <= MAX_DESCRIPTION {
        return s;
    }
    let mut end = MAX_DESCRIPTION;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

impl TaskState {
    /// Decodes a task answer leniently: unknown fields are ignored, `error` may be an object or a
    /// string. `fallback_id` is used when the answer has no `taskId`.
    pub fn from_json(body: &[u8], fallback_id: Option<&TaskId>) -> Result<TaskState, String> {
        let wire: WireTask =
            serde_json::from_slice(body).map_err(|e| format!("not a task object: {e}"))?;
        let id = match (wire.task_id, fallback_id) {
            (Some(id), _) if !id.is_empty() => TaskId(id),
            (_, Some(id)) => id.clone(),
            _ => return Err("the answer has no taskId".to_string()),
        };
        let status = TaskStatus::parse(wire.status.as_deref().unwrap_or("initialized"));
        let (resource_id, error) = match wire.response {
            None => (None, None),
            Some(r) => {
                let resource_id = r.resource_id.as_ref().and_then(|v| {
                    v.as_i64()
                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                });
                let error = r.error.map(|e| match e {
                    WireError::Code(code) => TaskError {
                        code,
                        status: None,
                        description: r.additional_info.clone().map(clip),
                    },
                    WireError::Object {
                        kind,
                        status,
                        description,
                    } => TaskError {
                        code: kind.unwrap_or_else(|| "UNKNOWN".to_string()),
                        status: status.map(|s| match s {
                            serde_json::Value::String(s) => s,
                            other => other.to_string(),
                        }),
                        description: description.or(r.additional_info.clone()).map(clip),
                    },
                    WireError::Other(_) => TaskError {
                        code: "UNKNOWN".to_string(),
                        status: None,
                        description: None,
                    },
                });
                (resource_id, error)
            }
        };
        Ok(TaskState {
            id,
            command_type: wire.command_type,
            status,
            description: wire.description.map(clip),
            resource_id,
            error,
        })
    }
}

impl CloudClient {
    /// One poll of a task: `None` when the task service does not know it (404).
    pub async fn task(&self, id: &TaskId) -> Result<Option<TaskState>, CloudError> {
        let path = format!("/v1/tasks/{}", encode_segment(id.as_str()));
        match self.get(&path, "get task").await {
            Ok(body) => TaskState::from_json(&body, Some(id))
                .map(Some)
                .map_err(|message| CloudError::Decode {
                    operation: "get task",
                    message,
                }),
            Err(CloudError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Polls a task until it ends, for at most [`task_timeout`](super::CloudApiConfig::task_timeout).
    /// `Ok` only for `processing-completed`; `processing-error` is [`CloudError::TaskFailed`].
    pub async fn wait_task(&self, id: &TaskId) -> Result<TaskState, CloudError> {
        let deadline = Instant::now() + self.config().task_timeout;
        self.wait_task_until(id, deadline).await
    }

    /// [`wait_task`](Self::wait_task) with an explicit deadline. On [`CloudError::TaskTimeout`]
    /// the task still runs on the server: waiting again with the same id resumes.
    pub async fn wait_task_until(
        &self,
        id: &TaskId,
        deadline: Instant,
    ) -> Result<TaskState, CloudError> {
        let started = Instant::now();
        let result = self.poll_task(id, deadline).await;
        let outcome = match &result {
            Ok(_) => "completed",
            Err(CloudError::TaskFailed { .. }) => "error",
            Err(CloudError::TaskTimeout { .. }) => "timeout",
            Err(_) => "unknown",
        };
        metrics::histogram!(METRIC_TASK_SECONDS, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        match &result {
            Ok(t) => {
                tracing::debug!(task = %id, command = ?t.command_type, waited = ?started.elapsed(), "Redis Cloud task completed")
            }
            Err(e) => {
                tracing::warn!(task = %id, waited = ?started.elapsed(), error = %e, "Redis Cloud task did not complete")
            }
        }
        result
    }

    async fn poll_task(&self, id: &TaskId, deadline: Instant) -> Result<TaskState, CloudError> {
        let interval = self.config().task_poll_interval;
        let tolerated = self.config().task_not_found_polls;
        let mut not_found = 0u32;
        let mut last_status: Option<TaskStatus> = None;
        loop {
            match self.task(id).await? {
                Some(t) => match t.status {
                    TaskStatus::Completed => return Ok(t),
                    TaskStatus::Failed => {
                        let error = t.error.unwrap_or(TaskError {
                            code: "UNKNOWN".to_string(),
                            status: None,
                            description: None,
                        });
                        return Err(CloudError::TaskFailed {
                            task_id: id.clone(),
                            error,
                        });
                    }
                    status => last_status = Some(status),
                },
                None => {
                    not_found += 1;
                    if not_found > tolerated {
                        return Err(CloudError::TaskUnknown {
                            task_id: id.clone(),
                            polls: not_found,
                        });
                    }
                }
            }
            if !sleep_before(deadline, interval).await {
                return Err(CloudError::TaskTimeout {
                    task_id: id.clone(),
                    last_status: last_status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "not found yet".to_string()),
                });
            }
        }
    }

    /// Polls an ACL user until its `status` is `active` (after a task on it completed), for at
    /// most [`task_timeout`](super::CloudApiConfig::task_timeout). A user in `error` fails at once.
    pub async fn wait_user_active(&self, user_id: AclUserId) -> Result<AclUser, CloudError> {
        let deadline = Instant::now() + self.config().task_timeout;
        self.wait_user_active_until(user_id, deadline).await
    }

    /// [`wait_user_active`](Self::wait_user_active) with an explicit deadline.
    pub async fn wait_user_active_until(
        &self,
        user_id: AclUserId,
        deadline: Instant,
    ) -> Result<AclUser, CloudError> {
        let interval = self.config().task_poll_interval;
        let tolerated = self.config().task_not_found_polls;
        let mut not_found = 0u32;
        let mut last = String::from("not found yet");
        loop {
            match self.get_acl_user(user_id).await {
                Ok(user) => match user.status.as_str() {
                    "active" => return Ok(user),
                    "error" => {
                        return Err(CloudError::UserStatus {
                            user_id,
                            status: user.status,
                        });
                    }
                    _ => last = user.status,
                },
                Err(CloudError::AclUserNotFound { .. }) => {
                    not_found += 1;
                    if not_found > tolerated {
                        return Err(CloudError::AclUserNotFound {
                            user: user_id.to_string(),
                        });
                    }
                }
                Err(e) => return Err(e),
            }
            if !sleep_before(deadline, interval).await {
                return Err(CloudError::UserStatus {
                    user_id,
                    status: format!("still {last} at the deadline"),
                });
            }
        }
    }

    /// Sets an ACL user's password and waits until the task completed and the user is `active`
    /// again. (The caller still tests the password on a fresh connection before promoting it.)
    pub async fn apply_acl_user_password(
        &self,
        user_id: AclUserId,
        password: &secrecy::SecretString,
    ) -> Result<AclUser, CloudError> {
        let task = self.set_acl_user_password(user_id, password).await?;
        self.wait_task(&task).await?;
        self.wait_user_active(user_id).await
    }
}

/// Sleeps `pause`, unless that would pass `deadline`: then returns false at once.
async fn sleep_before(deadline: Instant, pause: Duration) -> bool {
    let wake = Instant::now() + pause;
    if wake > deadline {
        return false;
    }
    tokio::time::sleep_until(wake).await;
    true
}

/// Percent-encodes what is not safe in one path segment (task ids are UUIDs; be safe anyway).
pub(crate) fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_as_object_as_in_real_answers() {
        let body = br#"{"taskId":"t-1","commandType":"aclUserUpdateRequest","status":"processing-error",
            "description":"Task request failed during processing. See error information for failure details.",
            "timestamp":"2024-01-01T00:00:00Z",
            "response":{"error":{"type":"ACL_USER_PASSWORD_NOT_VALID","status":"400 BAD_REQUEST",
            "description":"The password is not valid"}},"links":[]}"#;
        let t = TaskState::from_json(body, None).unwrap();
        assert_eq!(t.id, TaskId::from("t-1"));
        assert_eq!(t.status, TaskStatus::Failed);
        let e = t.error.unwrap();
        assert_eq!(e.code, "ACL_USER_PASSWORD_NOT_VALID");
        assert_eq!(e.status.as_deref(), Some("400 BAD_REQUEST"));
        assert_eq!(e.description.as_deref(), Some("The password is not valid"));
    }

    #[test]
    fn error_as_string_as_in_the_spec() {
        let body = br#"{"taskId":"t-2","status":"processing-error",
            "response":{"error":"DATABASE_PASSWORD_IS_TOO_LONG","additionalInfo":"too long"}}"#;
        let t = TaskState::from_json(body, None).unwrap();
        let e = t.error.unwrap();
        assert_eq!(e.code, "DATABASE_PASSWORD_IS_TOO_LONG");
        assert_eq!(e.description.as_deref(), Some("too long"));
    }

    #[test]
    fn completed_with_resource_id_and_unknown_fields() {
        let body = br#"{"taskId":"t-3","status":"processing-completed","future":1,
            "response":{"resourceId":42,"additionalResourceId":7,"resource":{}}}"#;
        let t = TaskState::from_json(body, None).unwrap();
        assert_eq!(t.status, TaskStatus::Completed);
        assert_eq!(t.resource_id, Some(42));
        assert!(t.error.is_none());
        let t =
            TaskState::from_json(br#"{"status":"received"}"#, Some(&TaskId::from("x"))).unwrap();
        assert_eq!(t.id.as_str(), "x");
        assert_eq!(t.status, TaskStatus::Received);
        assert!(TaskState::from_json(br#"{"status":"received"}"#, None).is_err());
        assert!(TaskState::from_json(b"<html>", None).is_err());
        let t =
            TaskState::from_json(br#"{"taskId":"y","status":"queued-somewhere"}"#, None).unwrap();
        assert_eq!(t.status, TaskStatus::Other("queued-somewhere".into()));
        assert!(!t.status.is_final());
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(
            encode_segment("0b6c8f52-1c1e-4f0e-9a2b-123456789abc"),
            "0b6c8f52-1c1e-4f0e-9a2b-123456789abc"
        );
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }
}
