//! How clients authenticate to the proxy. Their AUTH never reaches the upstream: the upstream
//! credential is the proxy's own.
//!
//! Rotating the application-side password is the operators' own job, done with an overlap:
//! two entries, the application moved from one to the other, the old one retired. Three things
//! make that safe without a restart (which would drop every client):
//! - SIGHUP re-reads the entries from the configuration file (`ClientAuth::reload`): an entry
//!   can be added, and one removed, while everyone stays connected;
//! - a password given as `file:` is followed: when the file changes (a Kubernetes secret
//!   volume, a secrets agent), new logins are checked against what it holds now. Clients
//!   already logged in stay logged in, as Redis keeps a connection authenticated when its
//!   user's password changes;
//! - each entry counts the clients logged in with it now and the logins it has taken
//!   (`rotaproxy_client_auth_connections` and `rotaproxy_client_auth_total`, and
//!   `client_auth` in `/v1/status`), so an operator can see that nobody still uses the
//!   password about to be retired.

use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use crate::config::{ClientAuthConfig, ClientAuthMode, ClientUser, SecretError, SecretRef};
use crate::watch::FileWatch;

pub struct ClientAuth {
    /// False (`none`): any AUTH is accepted (applications migrating from a direct connection
    /// still send their old password). True: any of `entries` is accepted. Fixed at start.
    required: bool,
    /// The accepted entries; replaced as a whole when the configuration is reloaded (SIGHUP).
    entries: ArcSwap<Vec<Arc<Entry>>>,
    /// Entries a reload removed while clients were still logged in with them: shown in the
    /// status until the last of those clients has gone.
    retired: Mutex<Vec<Arc<Entry>>>,
    /// Told when the entries change, so that the files followed change with them.
    entries_changed: tokio::sync::Notify,
    /// Refused logins are logged at most once a second (an application in a reconnect loop
    /// with a retired password must not flood the log); the others are counted here and
    /// reported with the next line.
    refusals_logged_at: Mutex<Option<std::time::Instant>>,
    refusals_unlogged: AtomicU64,
}

/// Least time between two log lines about refused logins.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// One accepted username and password.
struct Entry {
    username: String,
    /// Where the password comes from, as configured (`env:NAME`, `file:/path`): names the
    /// entry in metrics, status and logs. Never the password.
    source: SecretRef,
    password: ArcSwap<SecretString>,
    /// Clients logged in with this entry now.
    connections: AtomicI64,
    /// Logins accepted with this entry since start.
    logins: AtomicU64,
    /// The two as metrics (`rotaproxy_client_auth_connections`, `rotaproxy_client_auth_total`).
    connections_gauge: metrics::Gauge,
    logins_counter: metrics::Counter,
    /// When the file last brought a new password (None: the one read at start).
    changed_at: Mutex<Option<SystemTime>>,
    /// Whether the file's being unreadable was logged (once, until it is readable again).
    unreadable_logged: Mutex<bool>,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries = self.entries.load();
        let users: Vec<&str> = entries.iter().map(|e| e.username.as_str()).collect();
        f.debug_struct("ClientAuth")
            .field("required", &self.required)
            .field("users", &users)
            .finish()
    }
}

/// A client's login: while it lives, the client counts as logged in with its entry. Dropped
/// when the client logs out (`RESET`), logs in again, or leaves.
pub struct Login {
    entry: Option<Arc<Entry>>,
}

impl Login {
    /// The username of the entry the client logged in with (none where no login is needed).
    pub fn username(&self) -> Option<&str> {
        self.entry.as_ref().map(|entry| entry.username.as_str())
    }

    fn with(entry: &Arc<Entry>) -> Login {
        entry.connections.fetch_add(1, Ordering::Relaxed);
        entry.logins.fetch_add(1, Ordering::Relaxed);
        entry.connections_gauge.increment(1.0);
        entry.logins_counter.increment(1);
        Login {
            entry: Some(entry.clone()),
        }
    }
}

impl Drop for Login {
    fn drop(&mut self) {
        if let Some(entry) = &self.entry {
            entry.connections.fetch_sub(1, Ordering::Relaxed);
            entry.connections_gauge.decrement(1.0);
        }
    }
}

impl Entry {
    fn new(user: &ClientUser) -> Result<Entry, SecretError> {
        let labels = [
            ("username", user.username.clone()),
            ("source", user.password.to_string()),
        ];
        let connections_gauge = metrics::gauge!("rotaproxy_client_auth_connections", &labels);
        // Shown from the start, at 0, so that an entry nobody uses is there to be seen.
        connections_gauge.set(0.0);
        Ok(Entry {
            username: user.username.clone(),
            source: user.password.clone(),
            password: ArcSwap::from_pointee(user.password.resolve()?),
            connections: AtomicI64::new(0),
            logins: AtomicU64::new(0),
            connections_gauge,
            logins_counter: metrics::counter!("rotaproxy_client_auth_total", &labels),
            changed_at: Mutex::new(None),
            unreadable_logged: Mutex::new(false),
        })
    }

    /// Reads the file again and takes the password it holds. An unreadable or empty file keeps
    /// the password in use (a replacement may be under way), said once.
    fn reload(&self) {
        let fresh = match self.source.resolve() {
            Ok(fresh) => fresh,
            Err(err) => {
                let mut logged = self.unreadable_logged.lock().expect("not poisoned");
                if !*logged {
                    *logged = true;
                    tracing::warn!(
                        username = %self.username,
                        source = %self.source,
                        error = %err,
                        "cannot read a client password; clients keep logging in with the one \
                         read before"
                    );
                }
                return;
            }
        };
        *self.unreadable_logged.lock().expect("not poisoned") = false;
        if fresh.expose_secret() == self.password.load().expose_secret() {
            return;
        }
        self.password.store(Arc::new(fresh));
        *self.changed_at.lock().expect("not poisoned") = Some(SystemTime::now());
        tracing::info!(
            target: "rotaproxy::audit",
            event = "client_auth.reloaded",
            username = %self.username,
            source = %self.source,
            "a client password changed: new logins are checked against it; clients logged in \
             stay logged in"
        );
    }
}

impl ClientAuth {
    pub fn from_config(config: &ClientAuthConfig) -> Result<Self, SecretError> {
        let required = config.mode == ClientAuthMode::Password;
        let entries = if required {
            config
                .users
                .iter()
                .map(|u| Entry::new(u).map(Arc::new))
                .collect::<Result<_, SecretError>>()?
        } else {
            Vec::new()
        };
        Ok(Self::with_entries(required, entries))
    }

    fn with_entries(required: bool, entries: Vec<Arc<Entry>>) -> Self {
        Self {
            required,
            entries: ArcSwap::from_pointee(entries),
            retired: Mutex::new(Vec::new()),
            entries_changed: tokio::sync::Notify::new(),
            refusals_logged_at: Mutex::new(None),
            refusals_unlogged: AtomicU64::new(0),
        }
    }

    /// Takes the entries of a reloaded configuration: an entry with the same username and
    /// source as before is kept (its counts and the password it holds go on), a new one is
    /// read, a removed one is no longer accepted. Clients logged in with a removed entry stay
    /// logged in, as on Redis when a user's password is removed, and stay counted under it.
    /// Nothing changes when a new entry's password cannot be read, or the mode changed (that
    /// decides how every client starts: a restart).
    pub fn reload(&self, config: &ClientAuthConfig) -> Result<(), String> {
        if (config.mode == ClientAuthMode::Password) != self.required {
            return Err("listener.auth.mode changed; that needs a restart".to_string());
        }
        if !self.required {
            return Ok(());
        }
        let old = self.entries.load_full();
        let same =
            |e: &Arc<Entry>, u: &ClientUser| e.username == u.username && e.source == u.password;
        let mut added = Vec::new();
        let new: Vec<Arc<Entry>> = config
            .users
            .iter()
            .map(|u| match old.iter().find(|e| same(e, u)) {
                Some(kept) => Ok(kept.clone()),
                None => {
                    added.push(u.password.to_string());
                    Entry::new(u).map(Arc::new).map_err(|e| e.to_string())
                }
            })
            .collect::<Result<_, String>>()?;
        let removed: Vec<Arc<Entry>> = old
            .iter()
            .filter(|e| !config.users.iter().any(|u| same(e, u)))
            .cloned()
            .collect();
        if added.is_empty() && removed.is_empty() {
            return Ok(());
        }
        let removed_sources: Vec<String> = removed.iter().map(|e| e.source.to_string()).collect();
        self.retired.lock().expect("not poisoned").extend(removed);
        self.entries.store(Arc::new(new));
        self.entries_changed.notify_one();
        tracing::info!(
            target: "rotaproxy::audit",
            event = "client_auth.entries_changed",
            added = ?added,
            removed = ?removed_sources,
            "client auth entries reloaded: new logins are checked against the new list; \
             clients logged in stay logged in"
        );
        Ok(())
    }

    /// Puts a refused login on record, as Redis's ACL LOG keeps it: an application still
    /// sending a retired password shows here. The username is the client's (escaped); never
    /// the password.
    pub fn log_refusal(&self, peer: &crate::net::Peer, username: &[u8]) {
        let now = std::time::Instant::now();
        let mut last = self.refusals_logged_at.lock().expect("not poisoned");
        if last.is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_INTERVAL) {
            self.refusals_unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        // Taken outside the macro, whose fields are only evaluated when the line is enabled.
        let not_logged_before = self.refusals_unlogged.swap(0, Ordering::Relaxed);
        tracing::info!(
            target: "rotaproxy::audit",
            event = "client.auth_failed",
            peer = %peer,
            username = %String::from_utf8_lossy(username).escape_debug(),
            not_logged_before,
            "a client's AUTH was refused"
        );
    }

    /// Whether clients must authenticate before running commands.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Checks a username/password pair: the login when an entry accepts it. Every entry is
    /// compared in full, so timing does not reveal which user matched or how much of a password
    /// was right. With client auth `none` anything is accepted, and counted nowhere.
    pub fn check(&self, username: &[u8], password: &[u8]) -> Option<Login> {
        if !self.required {
            return Some(Login { entry: None });
        }
        let entries = self.entries.load();
        let mut matched = None;
        for entry in entries.iter() {
            let user_ok = constant_time_eq(entry.username.as_bytes(), username);
            let pass_ok =
                constant_time_eq(entry.password.load().expose_secret().as_bytes(), password);
            if user_ok & pass_ok && matched.is_none() {
                matched = Some(entry);
            }
        }
        matched.map(Login::with)
    }

    /// The files client passwords are read from now.
    fn files(&self) -> Vec<std::path::PathBuf> {
        self.entries
            .load()
            .iter()
            .filter_map(|e| e.source.path().map(Path::to_path_buf))
            .collect()
    }

    /// `client_auth` in `/v1/status`: each entry by username and source, with the clients
    /// logged in with it now and the logins it took. Never a password.
    pub fn status(&self) -> serde_json::Value {
        if !self.required {
            return json!({ "mode": "none" });
        }
        let show = |e: &Arc<Entry>| {
            let changed_at = e
                .changed_at
                .lock()
                .expect("not poisoned")
                .map(|t| humantime::format_rfc3339_seconds(t).to_string());
            json!({
                "username": e.username,
                "source": e.source.to_string(),
                "connections": e.connections.load(Ordering::Relaxed),
                "logins": e.logins.load(Ordering::Relaxed),
                "password_changed_at": changed_at,
            })
        };
        let entries: Vec<_> = self.entries.load().iter().map(show).collect();
        let mut retired = self.retired.lock().expect("not poisoned");
        retired.retain(|e| e.connections.load(Ordering::Relaxed) > 0);
        let retired: Vec<_> = retired.iter().map(show).collect();
        json!({ "mode": "password", "entries": entries, "retired": retired })
    }
}

pub fn describe_metrics() {
    metrics::describe_gauge!(
        "rotaproxy_client_auth_connections",
        "Clients logged in now, by the client auth entry (username, and source: where its password is read from) they logged in with"
    );
    metrics::describe_counter!(
        "rotaproxy_client_auth_total",
        "Client logins accepted, by client auth entry (username, source)"
    );
}

/// Follows the files client passwords are read from (see the module's note), and the entries
/// a reload brings.
pub async fn follow_files(auth: Arc<ClientAuth>, poll_interval: Duration) {
    loop {
        let files = auth.files();
        if files.is_empty() {
            auth.entries_changed.notified().await;
            continue;
        }
        let paths: Vec<&Path> = files.iter().map(|f| f.as_path()).collect();
        let mut watch = FileWatch::new(&paths, poll_interval, "client password files");
        loop {
            tokio::select! {
                _ = watch.next() => {}
                _ = auth.entries_changed.notified() => break,
            }
            for entry in auth.entries.load().iter() {
                if entry.source.path().is_some() {
                    entry.reload();
                }
            }
        }
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(pairs: &[(&str, &str)]) -> ClientAuth {
        let users = pairs
            .iter()
            .enumerate()
            .map(|(i, (user, pass))| {
                let var = format!("ROTAPROXY_CLIENT_AUTH_UNIT_{}_{i}", std::process::id());
                // SAFETY (test only): each test sets variables of its own names before reading.
                unsafe { std::env::set_var(&var, pass) };
                ClientUser {
                    username: user.to_string(),
                    password: SecretRef::Env(var),
                }
            })
            .collect();
        ClientAuth::from_config(&ClientAuthConfig {
            mode: ClientAuthMode::Password,
            users,
            poll_interval: Duration::from_secs(30),
        })
        .expect("readable")
    }

    #[test]
    fn any_listed_pair_is_accepted_and_counted_while_logged_in() {
        let a = auth(&[("default", "old"), ("default", "new"), ("app", "x")]);
        let old = a.check(b"default", b"old").expect("old accepted");
        let new = a.check(b"default", b"new").expect("new accepted");
        assert!(a.check(b"app", b"x").is_some());
        assert!(a.check(b"app", b"old").is_none());
        assert!(a.check(b"default", b"ol").is_none());
        let counts = |a: &ClientAuth| -> Vec<(i64, u64)> {
            a.status()["entries"]
                .as_array()
                .expect("entries")
                .iter()
                .map(|e| {
                    (
                        e["connections"].as_i64().expect("n"),
                        e["logins"].as_u64().expect("n"),
                    )
                })
                .collect()
        };
        // The app login above was dropped at once.
        assert_eq!(counts(&a), vec![(1, 1), (1, 1), (0, 1)]);
        drop(old);
        assert_eq!(counts(&a), vec![(0, 1), (1, 1), (0, 1)]);
        drop(new);
        assert_eq!(counts(&a), vec![(0, 1), (0, 1), (0, 1)]);
        let shown = format!("{a:?} {}", a.status());
        assert!(!shown.contains("old") && !shown.contains("new"), "{shown}");
    }

    #[test]
    fn refusals_are_logged_at_most_once_a_second_and_the_rest_counted() {
        let a = auth(&[("app", "pw")]);
        let peer = crate::net::Peer::Tcp("127.0.0.1:5000".parse().expect("address"));
        a.log_refusal(&peer, b"app");
        a.log_refusal(&peer, b"app");
        a.log_refusal(&peer, b"other");
        assert_eq!(a.refusals_unlogged.load(Ordering::Relaxed), 2);
        // A second later the next one is logged, with the count of those that were not.
        *a.refusals_logged_at.lock().expect("not poisoned") =
            Some(std::time::Instant::now() - REFUSAL_LOG_INTERVAL);
        a.log_refusal(&peer, b"app");
        assert_eq!(a.refusals_unlogged.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn mode_none_accepts_anything() {
        let a = ClientAuth::with_entries(false, Vec::new());
        assert!(!a.required());
        assert!(a.check(b"whoever", b"whatever").is_some());
        assert_eq!(a.status(), json!({ "mode": "none" }));
    }
}
