//! Where the rotation state lives. A single proxy keeps it in a local file; a fleet of proxies
//! shares it in the upstream Redis (see [`super::fleet`]).

use std::fs;
use std::path::{Path, PathBuf};

use super::state::{RotationState, SCHEMA_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read rotation state {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write rotation state {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("rotation state {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    /// The store could not be reached (it may answer later).
    #[error("fleet state {keys}: {message}")]
    Fleet { keys: String, message: String },
    /// The store answered with a refusal: the fleet's user, its password or its permissions.
    #[error("fleet state {keys}: {message}")]
    FleetRefused { keys: String, message: String },
    #[error("fleet state {key} cannot be used: {message}")]
    FleetCorrupt { key: String, message: String },
    /// Another member took the rotator's lease: this proxy must stop rotating at once.
    #[error("this proxy no longer holds the fleet's rotator lease")]
    Fenced,
}

/// Persists the rotation state. `save` returns only once the state is durable (in the file,
/// or accepted by the fleet's Redis).
pub enum Store {
    File(FileStore),
    Fleet(std::sync::Arc<super::fleet::Fleet>),
}

impl Store {
    pub async fn save(&self, state: &RotationState) -> Result<(), StoreError> {
        match self {
            Store::File(file) => file.save(state),
            Store::Fleet(fleet) => fleet.save(state).await,
        }
    }

    /// Where the state lives, for logs and status.
    pub fn describe(&self) -> String {
        match self {
            Store::File(file) => format!("file {}", file.path.display()),
            Store::Fleet(fleet) => fleet.describe(),
        }
    }

    pub fn fleet(&self) -> Option<&std::sync::Arc<super::fleet::Fleet>> {
        match self {
            Store::File(_) => None,
            Store::Fleet(fleet) => Some(fleet),
        }
    }
}

/// A JSON file, replaced atomically: written to a temporary file (mode 0600) in the same
/// directory, fsynced, renamed over the old one, and the directory fsynced, so a crash leaves
/// either the old state or the new one, never a torn file.
pub struct FileStore {
    path: PathBuf,
}

pub const STATE_FILE_NAME: &str = "rotaproxy-state.json";

impl FileStore {
    /// A store in `dir` (created with mode 0700 if missing).
    pub fn new(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(STATE_FILE_NAME);
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| StoreError::Write {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(Self { path })
    }

    /// A store in `dir`, which is not created: for looking only.
    pub fn at(dir: &Path) -> Self {
        Self {
            path: dir.join(STATE_FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the state file's directory takes a file now (written, synced, removed).
    pub fn check_writable(&self) -> std::io::Result<()> {
        let probe = self.path.with_file_name(".rotaproxy-preflight");
        crate::files::write_durably(&probe, b"", 0o600)?;
        fs::remove_file(&probe)
    }
}

use std::os::unix::fs::DirBuilderExt;

impl FileStore {
    pub fn load(&self) -> Result<Option<RotationState>, StoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        // serde_json's messages name the position, never the content of a string value.
        let state: RotationState =
            serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                message: format!("line {} column {}", e.line(), e.column()),
            })?;
        if state.version != SCHEMA_VERSION {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                message: format!(
                    "schema version {} (this proxy reads {SCHEMA_VERSION})",
                    state.version
                ),
            });
        }
        Ok(Some(state))
    }

    pub fn save(&self, state: &RotationState) -> Result<(), StoreError> {
        let err = |source| StoreError::Write {
            path: self.path.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(state).expect("the state always serializes");
        crate::files::write_durably(&self.path, &json, 0o600).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotation::state::{Slot, Step};
    use secrecy::{ExposeSecret, SecretString};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(&dir.path().join("state")).unwrap();
        assert!(store.load().unwrap().is_none());
        let mut state = RotationState::new(Slot::new(
            Some("app".into()),
            SecretString::from("pw-1".to_string()),
        ));
        state.pending = Some(Slot::new(
            Some("app".into()),
            SecretString::from("pw-2".to_string()),
        ));
        state.rotation = Some(crate::rotation::state::InFlight {
            id: "r1".into(),
            step: Step::Set,
            started_at: 1,
            urgent: false,
            trigger: "api".into(),
            from_user: "app".into(),
            to_user: "app".into(),
            task_id: None,
        });
        store.save(&state).unwrap();
        let mode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = store.load().unwrap().unwrap();
        assert_eq!(back.pending.unwrap().password.expose_secret(), "pw-2");
        assert_eq!(back.rotation.unwrap().step, Step::Set);
    }

    #[test]
    fn corrupt_file_is_reported_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path()).unwrap();
        fs::write(
            store.path(),
            "{\"version\": 1, \"password\": \"leaky-secret",
        )
        .unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(!err.contains("leaky-secret"), "{err}");
    }
}
