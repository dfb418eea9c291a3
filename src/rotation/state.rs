//! The rotation state: the CURRENT, PENDING and PREVIOUS credential slots, the generation number,
//! and the rotation in flight with the step it is at. It is persisted (see [`super::store`])
//! before each step takes effect, so a restart resumes the interrupted rotation and never locks
//! the proxy out.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// The schema version written into the state file.
pub const SCHEMA_VERSION: u32 = 1;

/// One credential slot.
#[derive(Clone, Serialize, Deserialize)]
pub struct Slot {
    /// ACL username; None means the `default` user.
    pub username: Option<String>,
    #[serde(with = "secret_as_string")]
    pub password: SecretString,
    /// When this password was made (unix seconds).
    pub created_at: u64,
}

impl Slot {
    pub fn new(username: Option<String>, password: SecretString) -> Self {
        Self {
            username,
            password,
            created_at: now_unix(),
        }
    }

    pub fn display_user(&self) -> &str {
        self.username.as_deref().unwrap_or("default")
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("username", &self.display_user())
            .field("password", &"<redacted>")
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// The steps of a rotation, in order. A persisted step is the one to run (again) next: every step
/// is idempotent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// Make the new secret and persist it as PENDING.
    Create,
    /// Make the server accept PENDING.
    Set,
    /// Authenticate a fresh connection with PENDING.
    Test,
    /// PENDING becomes CURRENT, CURRENT becomes PREVIOUS; a new generation is published.
    Finish,
    /// Sessions move to the new generation at their safe points.
    Drain,
    /// The old secret stops working.
    Revoke,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Create => "create",
            Step::Set => "set",
            Step::Test => "test",
            Step::Finish => "finish",
            Step::Drain => "drain",
            Step::Revoke => "revoke",
        }
    }

    pub const ALL: [Step; 6] = [
        Step::Create,
        Step::Set,
        Step::Test,
        Step::Finish,
        Step::Drain,
        Step::Revoke,
    ];
}

/// A rotation in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InFlight {
    pub id: String,
    pub step: Step,
    pub started_at: u64,
    /// Suspected compromise: short drain, old identity's other connections killed.
    pub urgent: bool,
    /// What started it: `schedule`, `api`, `api-urgent`, `source-change`.
    pub trigger: String,
    /// The identity sessions move away from, and the one they move to (known once PENDING is).
    #[serde(default)]
    pub from_user: String,
    #[serde(default)]
    pub to_user: String,
    /// The Redis Cloud task that sets PENDING, once submitted: a restart waits for this task
    /// instead of submitting another.
    #[serde(default)]
    pub task_id: Option<String>,
}

/// How a finished rotation ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub id: String,
    pub finished_at: u64,
    pub success: bool,
    /// Why it failed (never a secret).
    pub error: Option<String>,
    /// Connections of the old generation still open when the old secret was revoked.
    pub left_at_revoke: u64,
    /// Fleet members that had not moved off the old secret when it was revoked.
    #[serde(default)]
    pub members_left_at_revoke: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationState {
    pub version: u32,
    /// Generation number of CURRENT.
    pub generation: u64,
    pub current: Slot,
    pub pending: Option<Slot>,
    pub previous: Option<Slot>,
    pub rotation: Option<InFlight>,
    pub last: Option<Outcome>,
    /// The outcomes before `last`, oldest first (at most [`EARLIER_OUTCOMES`]), so that one who
    /// looks only now and then (a fleet member waiting for a rotation it passed on) still finds
    /// how its rotation ended when another one has ended since.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<Outcome>,
}

/// Outcomes kept besides the last one.
pub const EARLIER_OUTCOMES: usize = 7;

impl RotationState {
    pub fn new(current: Slot) -> Self {
        Self {
            version: SCHEMA_VERSION,
            generation: 1,
            current,
            pending: None,
            previous: None,
            rotation: None,
            last: None,
            earlier: Vec::new(),
        }
    }

    /// Records how a rotation ended (again, when `last` is the same rotation's: it replaces it).
    pub fn record(&mut self, outcome: Outcome) {
        if let Some(last) = self.last.take()
            && last.id != outcome.id
        {
            self.earlier.push(last);
            let excess = self.earlier.len().saturating_sub(EARLIER_OUTCOMES);
            self.earlier.drain(..excess);
        }
        self.last = Some(outcome);
    }

    /// The outcomes kept, newest first.
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.last
            .iter()
            .chain(self.earlier.iter().rev())
            .cloned()
            .collect()
    }

    /// The slots a restart tries, in order: CURRENT, then PENDING, then PREVIOUS.
    pub fn candidates(&self) -> Vec<(&'static str, &Slot)> {
        let mut out = vec![("current", &self.current)];
        if let Some(p) = &self.pending {
            out.push(("pending", p));
        }
        if let Some(p) = &self.previous {
            out.push(("previous", p));
        }
        out
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes a secret in clear, for the state file only (mode 0600). Nothing else serializes slots.
mod secret_as_string {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(secret: &SecretString, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(secret.expose_secret())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
        Ok(SecretString::from(String::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_passwords() {
        let mut state = RotationState::new(Slot::new(
            Some("app".into()),
            SecretString::from("current-secret".to_string()),
        ));
        state.pending = Some(Slot::new(
            None,
            SecretString::from("pending-secret".to_string()),
        ));
        let shown = format!("{state:?}");
        assert!(!shown.contains("current-secret") && !shown.contains("pending-secret"));
        assert!(shown.contains("app"));
    }

    #[test]
    fn candidates_are_current_pending_previous() {
        let mut state = RotationState::new(Slot::new(None, SecretString::from("c".to_string())));
        state.previous = Some(Slot::new(None, SecretString::from("p".to_string())));
        state.pending = Some(Slot::new(None, SecretString::from("n".to_string())));
        let names: Vec<_> = state.candidates().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["current", "pending", "previous"]);
    }

    fn outcome(id: &str, success: bool) -> Outcome {
        Outcome {
            id: id.to_string(),
            finished_at: 1,
            success,
            error: None,
            left_at_revoke: 0,
            members_left_at_revoke: Vec::new(),
        }
    }

    #[test]
    fn the_last_few_outcomes_are_kept_and_survive_a_reload() {
        let mut state = RotationState::new(Slot::new(None, SecretString::from("c".to_string())));
        // A rotation recorded twice (at revoke, then at its end) is one outcome.
        state.record(outcome("rot-1", false));
        state.record(outcome("rot-1", true));
        assert_eq!(state.outcomes(), [outcome("rot-1", true)]);
        for i in 2..=12 {
            state.record(outcome(&format!("rot-{i}"), true));
        }
        let ids: Vec<String> = state.outcomes().into_iter().map(|o| o.id).collect();
        assert_eq!(ids.len(), 1 + EARLIER_OUTCOMES);
        assert_eq!(ids[0], "rot-12");
        assert_eq!(ids[EARLIER_OUTCOMES], "rot-5", "the oldest go first");

        let reloaded: RotationState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        assert_eq!(reloaded.outcomes(), state.outcomes());
        // A state written before `earlier` existed still reads.
        let mut old = serde_json::to_value(&state).unwrap();
        old.as_object_mut().unwrap().remove("earlier");
        let old: RotationState = serde_json::from_value(old).unwrap();
        assert_eq!(old.outcomes(), [outcome("rot-12", true)]);
    }
}
