//! Generations: everything needed to open an authenticated upstream connection.
//!
//! Any change of endpoint, TLS material or credential makes a new [`Generation`]; every upstream
//! connection remembers the generation it was opened with, so a rotation can tell old connections
//! from new ones. The current generation is published through an [`ArcSwap`]: readers take the
//! latest one per connection, lock-free.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Notify;

use crate::config::{Config, SecretError, UpstreamUrl};
use crate::tls::{self, TlsError, UpstreamTls};

/// Where and how to reach the upstream.
#[derive(Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// TLS config and the name to verify, or None for plain TCP.
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.as_ref().map(|(_, name)| name))
            .finish()
    }
}

impl Endpoint {
    /// Whether a connection opened for `self` is one `other` would open too: same address,
    /// same TLS material (the very same config, so a reloaded one counts as different).
    pub fn same_as(&self, other: &Endpoint) -> bool {
        self.host == other.host
            && self.port == other.port
            && match (&self.tls, &other.tls) {
                (None, None) => true,
                (Some((a, a_name)), Some((b, b_name))) => Arc::ptr_eq(a, b) && a_name == b_name,
                _ => false,
            }
    }
}

/// An upstream credential: the username and its password.
#[derive(Clone)]
pub struct Credential {
    /// None means the `default` user (`AUTH <password>`).
    pub username: Option<String>,
    /// None means the upstream needs no authentication.
    pub password: Option<SecretString>,
}

impl Credential {
    /// The `AUTH [user] password` command for this credential; None without a password. Always
    /// sends the username when there is one (password-only AUTH means `default`).
    pub fn auth_command(&self) -> Option<Vec<u8>> {
        let pw = self.password.as_ref()?.expose_secret().as_bytes();
        Some(match &self.username {
            Some(user) => crate::resp::command::encode(&[b"AUTH", user.as_bytes(), pw]),
            None => crate::resp::command::encode(&[&b"AUTH"[..], pw]),
        })
    }

    /// The username for logs and status ("default" when none is configured).
    pub fn display_user(&self) -> &str {
        self.username.as_deref().unwrap_or("default")
    }

    /// Whether `other` is the same user with the same password.
    pub fn same_as(&self, other: &Credential) -> bool {
        self.username == other.username
            && self.password.as_ref().map(|p| p.expose_secret())
                == other.password.as_ref().map(|p| p.expose_secret())
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.display_user())
            .field(
                "password",
                &if self.password.is_some() {
                    "<redacted>"
                } else {
                    "<none>"
                },
            )
            .finish()
    }
}

/// Everything needed to open an upstream connection, numbered.
#[derive(Debug)]
pub struct Generation {
    pub id: u64,
    pub endpoint: Endpoint,
    pub credential: Credential,
    /// Upstream connections authenticated with this generation that are open now.
    live: AtomicI64,
}

/// Why the first generation could not be built from the config.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error("upstream TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("credentials.password: {0}")]
    Secret(#[from] SecretError),
}

impl Generation {
    /// Builds generation 1 from the config: reads the TLS files and resolves the password.
    pub fn from_config(config: &Config) -> Result<Generation, GenerationError> {
        let url: UpstreamUrl = config.upstream_url();
        let tls = if url.tls {
            let up = &config.upstream;
            let tls_config = tls::upstream_client_config(&UpstreamTls::from_config(up))?;
            let name = tls::server_name(up.server_name.as_deref().unwrap_or(&url.host))?;
            Some((tls_config, name))
        } else {
            None
        };
        let password = match &config.credentials.password {
            Some(reference) => Some(reference.resolve()?),
            None => None,
        };
        Ok(Generation::new(
            1,
            Endpoint {
                host: url.host,
                port: url.port,
                tls,
            },
            Credential {
                username: config.credentials.username.clone(),
                password,
            },
        ))
    }

    pub fn new(id: u64, endpoint: Endpoint, credential: Credential) -> Self {
        Self {
            id,
            endpoint,
            credential,
            live: AtomicI64::new(0),
        }
    }

    /// The same endpoint and TLS material with another credential.
    pub fn with_credential(&self, id: u64, credential: Credential) -> Generation {
        Generation::new(id, self.endpoint.clone(), credential)
    }

    /// The same endpoint and credential with other TLS material (a renewed client certificate
    /// or CA bundle). Only for a TLS endpoint: a plain one has no TLS material to replace.
    pub fn with_tls(&self, id: u64, config: Arc<rustls::ClientConfig>) -> Generation {
        let mut endpoint = self.endpoint.clone();
        if let Some((tls, _)) = &mut endpoint.tls {
            *tls = config;
        }
        Generation::new(id, endpoint, self.credential.clone())
    }

    /// Upstream connections of this generation open now.
    pub fn live_connections(&self) -> i64 {
        self.live.load(Ordering::Relaxed)
    }

    pub(crate) fn connection_opened(&self) {
        self.live.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long before the drain deadline sessions waiting on a blocking command move it.
pub const BLOCKED_MOVE_LEAD: std::time::Duration = std::time::Duration::from_secs(1);

/// The generation new upstream connections are opened with, and the one before it (whose
/// connections a drain is moving away from).
pub struct Generations {
    current: ArcSwap<Generation>,
    /// The current generation's id, readable with one atomic load on the hot path.
    current_id: AtomicU64,
    previous: Mutex<Option<Arc<Generation>>>,
    /// While a password that has no overlap on the server is being replaced (the default
    /// user), new connections that CURRENT no longer opens try this one.
    candidate: Mutex<Option<Arc<Generation>>>,
    /// Woken when a new generation is published: sessions then move at their next safe point.
    changed: Arc<Notify>,
    /// Times `changed` was notified, bumped just before each notification: a session polls its
    /// `changed` future again only when this moved (see `Session::signals_polled`).
    changes: AtomicU64,
    /// Unix-epoch milliseconds after which sessions stop waiting for blocking commands to end
    /// and move them instead (0: no drain deadline).
    drain_deadline_ms: AtomicU64,
}

impl Generations {
    pub fn new(first: Generation) -> Self {
        Self {
            current_id: AtomicU64::new(first.id),
            current: ArcSwap::from_pointee(first),
            previous: Mutex::new(None),
            candidate: Mutex::new(None),
            changed: Arc::new(Notify::new()),
            changes: AtomicU64::new(0),
            drain_deadline_ms: AtomicU64::new(0),
        }
    }

    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    pub fn current_id(&self) -> u64 {
        self.current_id.load(Ordering::Acquire)
    }

    pub fn previous(&self) -> Option<Arc<Generation>> {
        self.previous.lock().expect("not poisoned").clone()
    }

    /// A future that completes at the next [`Generations::publish`] (or drain deadline).
    pub fn changed(&self) -> tokio::sync::futures::OwnedNotified {
        self.changed.clone().notified_owned()
    }

    /// How many times [`Generations::changed`] futures were woken so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    fn notify_changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Wakes every session to look at its signals without a new generation: a session another
    /// one redirects to moved, or asked for a cache flush (`session::links`). Rare, and a
    /// session woken for nothing only finds it has nothing to do, so sessions need no second
    /// signal to check on every event.
    pub fn wake_sessions(&self) {
        self.notify_changed();
    }

    /// Publishes a new generation: connections opened from now on use it, and every session is
    /// told to move at its next safe point.
    pub fn publish(&self, generation: Generation) -> Arc<Generation> {
        self.publish_arc(Arc::new(generation))
    }

    /// The candidate generation, if a password without overlap is being replaced.
    pub fn candidate(&self) -> Option<Arc<Generation>> {
        self.candidate.lock().expect("not poisoned").clone()
    }

    /// Sets (or clears) the candidate generation.
    pub fn set_candidate(&self, candidate: Option<Arc<Generation>>) {
        *self.candidate.lock().expect("not poisoned") = candidate;
    }

    /// Publishes the candidate itself (its connections already count as current), or
    /// `generation` when there is none.
    pub fn publish_candidate_or(&self, generation: Generation) -> Arc<Generation> {
        match self.candidate.lock().expect("not poisoned").take() {
            Some(candidate) if candidate.id == generation.id => self.publish_arc(candidate),
            _ => self.publish(generation),
        }
    }

    fn publish_arc(&self, generation: Arc<Generation>) -> Arc<Generation> {
        let old = self.current.swap(generation.clone());
        *self.previous.lock().expect("not poisoned") = Some(old);
        self.current_id.store(generation.id, Ordering::Release);
        self.notify_changed();
        generation
    }

    /// Sets when sessions stop waiting for blocking commands, and wakes them to notice.
    pub fn set_drain_deadline(&self, deadline: Option<std::time::SystemTime>) {
        let ms = deadline
            .and_then(|d| d.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        self.drain_deadline_ms.store(ms, Ordering::Release);
        self.notify_changed();
    }

    /// When a session still waiting for a blocking command's answer moves it instead (CLIENT
    /// UNBLOCK, then the command again on the new connection): [`BLOCKED_MOVE_LEAD`] before the
    /// drain deadline, so the move is over by the time the rotation counts what is left.
    pub fn blocked_move_time(&self) -> Option<std::time::SystemTime> {
        self.drain_deadline()
            .map(|d| d.checked_sub(BLOCKED_MOVE_LEAD).unwrap_or(d))
    }

    /// Whether blocked commands are due to be moved (see [`Self::blocked_move_time`]).
    pub fn blocked_move_due(&self) -> bool {
        self.blocked_move_time()
            .is_some_and(|t| std::time::SystemTime::now() >= t)
    }

    pub fn drain_deadline(&self) -> Option<std::time::SystemTime> {
        match self.drain_deadline_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let c = Credential {
            username: Some("app".into()),
            password: Some(SecretString::from("very-secret-pw".to_string())),
        };
        let shown = format!("{c:?}");
        assert!(
            shown.contains("app") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(!shown.contains("very-secret-pw"));
    }
}
