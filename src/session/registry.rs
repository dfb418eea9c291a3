//! The client sessions of this proxy, for `GET /v1/clients`: who is connected and, for each,
//! what its connection holds (db, name, protocol, subscriptions) and which credential
//! generation its upstream connection was opened or re-authenticated with (during a rotation:
//! which sessions are still on the previous one, and whose they are).
//!
//! Sessions publish their view when it changes (a command that changes connection state, a
//! login, a move), never per ordinary command, so the hot path does not pay for it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{Value, json};

use crate::net::Peer;

/// Every open session.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    next: AtomicU64,
    entries: Mutex<BTreeMap<u64, Arc<ClientEntry>>>,
}

#[derive(Debug)]
struct ClientEntry {
    peer: Peer,
    connected_at: u64,
    view: Mutex<ClientView>,
}

/// What one session holds, as it last published it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClientView {
    /// The id `CLIENT ID` answers (once the first upstream connection told it).
    pub id: Option<i64>,
    pub authenticated: bool,
    /// The client auth entry's username the client logged in with.
    pub user: Option<String>,
    pub db: i64,
    /// `CLIENT SETNAME` (lossy UTF-8).
    pub name: Option<String>,
    pub protocol: u8,
    /// Channels, patterns and shard channels.
    pub subscriptions: usize,
    pub monitor: bool,
    pub tracking: bool,
    /// The credential generation of the session's upstream connection; none while it has none.
    pub generation: Option<u64>,
    /// While a newer generation waits for this session: what keeps it from moving
    /// (`transaction`, `watch`, `blocking_command`, `replies`; see
    /// `Session::note_what_the_move_waits_for`).
    pub waiting_to_move: Option<&'static str>,
}

/// A session's place in the registry; removed when dropped.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<ClientRegistry>,
    number: u64,
    entry: Arc<ClientEntry>,
}

impl ClientRegistry {
    /// Enters a new session.
    pub fn register(self: &Arc<Self>, peer: Peer) -> Registration {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(ClientEntry {
            peer,
            connected_at: crate::rotation::state::now_unix(),
            view: Mutex::new(ClientView {
                protocol: 2,
                ..ClientView::default()
            }),
        });
        self.entries
            .lock()
            .expect("not poisoned")
            .insert(number, entry.clone());
        Registration {
            registry: self.clone(),
            number,
            entry,
        }
    }

    /// The `GET /v1/clients` document: one object per session, oldest first.
    pub fn to_json(&self) -> Value {
        let entries: Vec<Arc<ClientEntry>> = self
            .entries
            .lock()
            .expect("not poisoned")
            .values()
            .cloned()
            .collect();
        let clients: Vec<Value> = entries
            .iter()
            .map(|entry| {
                let view = entry.view.lock().expect("not poisoned").clone();
                let mut doc = serde_json::to_value(view).unwrap_or(Value::Null);
                doc["peer"] = json!(entry.peer.to_string());
                doc["connected_at"] = json!(entry.connected_at);
                doc
            })
            .collect();
        json!({ "count": clients.len(), "clients": clients })
    }
}

impl Registration {
    /// Replaces the session's view.
    pub fn publish(&self, view: ClientView) {
        *self.entry.view.lock().expect("not poisoned") = view;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .entries
            .lock()
            .expect("not poisoned")
            .remove(&self.number);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_listed_while_they_live_with_their_last_view() {
        let registry = Arc::new(ClientRegistry::default());
        let a = registry.register(Peer::Tcp("127.0.0.1:5000".parse().unwrap()));
        let b = registry.register(Peer::Unix {
            pid: Some(7),
            uid: Some(1000),
        });
        b.publish(ClientView {
            db: 3,
            name: Some("worker".into()),
            generation: Some(2),
            ..ClientView::default()
        });
        let doc = registry.to_json();
        assert_eq!(doc["count"], 2);
        assert_eq!(doc["clients"][0]["peer"], "127.0.0.1:5000");
        assert_eq!(doc["clients"][0]["protocol"], 2);
        assert_eq!(doc["clients"][1]["peer"], "unix:pid=7:uid=1000");
        assert_eq!(doc["clients"][1]["db"], 3);
        assert_eq!(doc["clients"][1]["name"], "worker");
        assert_eq!(doc["clients"][1]["generation"], 2);
        drop(a);
        let doc = registry.to_json();
        assert_eq!(doc["count"], 1);
        assert_eq!(doc["clients"][0]["name"], "worker");
    }
}
