//! Secrets given as a file that another system replaces (a secrets manager, a Kubernetes
//! secret volume), read again when the file changes, so that rotating them needs no restart.

use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};

use crate::config::{SecretError, SecretRef};

/// One secret reference and its last reading. A file is re-read when its length, mtime or
/// inode changes (a Kubernetes secret volume swaps a symlink: `metadata` follows it); an `env:`
/// reference is re-read every time (cheap). `Debug` shows the reference, never the value.
#[derive(Debug)]
pub struct FollowedSecret {
    /// What the secret is, in log lines ("Redis Cloud API key", "admin token").
    what: &'static str,
    reference: SecretRef,
    stamp: Option<FileStamp>,
    value: Option<SecretString>,
    /// Bumped whenever the value read differs from the one before.
    generation: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    device: u64,
}

impl FileStamp {
    fn of(path: &std::path::Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            len: m.len(),
            modified: m.modified().ok(),
            inode: m.ino(),
            device: m.dev(),
        })
    }
}

impl FollowedSecret {
    pub fn new(what: &'static str, reference: SecretRef) -> FollowedSecret {
        FollowedSecret {
            what,
            reference,
            stamp: None,
            value: None,
            generation: 0,
        }
    }

    /// A followed secret read now: one that cannot be read is an error (at start, say so
    /// rather than fail at the first use).
    pub fn read_now(
        what: &'static str,
        reference: SecretRef,
    ) -> Result<FollowedSecret, SecretError> {
        let mut secret = FollowedSecret::new(what, reference);
        secret.current(true)?;
        Ok(secret)
    }

    pub fn reference(&self) -> &SecretRef {
        &self.reference
    }

    /// How many different values were read so far (a changed value, a new generation).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The secret as its source holds it now (`force`: read it even if the file looks
    /// unchanged). While the source cannot be read (a file briefly missing mid-swap), the
    /// value read before; an error only when there is none.
    pub fn current(&mut self, force: bool) -> Result<SecretString, SecretError> {
        let stamp = self.reference.path().and_then(FileStamp::of);
        if let (false, Some(value), Some(stamp), Some(old)) =
            (force, &self.value, stamp, self.stamp)
            && stamp == old
        {
            return Ok(value.clone());
        }
        match self.reference.resolve() {
            Ok(value) => {
                let changed = self
                    .value
                    .as_ref()
                    .is_none_or(|old| old.expose_secret() != value.expose_secret());
                if changed {
                    if self.value.is_some() {
                        tracing::info!(
                            target: "rotaproxy::audit",
                            event = "secret.reloaded",
                            secret = self.what,
                            reference = %self.reference,
                            "{} changed; using the new one",
                            self.what
                        );
                    }
                    self.generation += 1;
                }
                self.stamp = stamp;
                self.value = Some(value.clone());
                Ok(value)
            }
            Err(e) => match &self.value {
                Some(value) => {
                    tracing::warn!(reference = %self.reference, error = %e, "cannot re-read the {}; using the one read before", self.what);
                    Ok(value.clone())
                }
                None => Err(e),
            },
        }
    }
}
