//! What a client connection has told the server about itself, as the proxy must remember it to
//! move the session onto a fresh upstream connection ("replay") and to know whether a connection
//! may go back to the pool.
//!
//! Most fields change when the server *confirms* a command (the reply is not an error), because a
//! failed `SELECT 99` leaves the db as it was. Subscription sets are kept at request time: an
//! `UNSUBSCRIBE` without arguments answers once per current channel, so the proxy must know the
//! set when the request passes, not when the answers come.

use bytes::Bytes;
use indexmap::IndexSet;

use crate::resp::command;
use crate::resp::reply::SubClass;

/// What the replayed `CLIENT TRACKING` is called in `ConnState::replay_commands`.
pub const TRACKING_REPLAY: &str = "CLIENT TRACKING";

/// A change that takes effect when the server accepts the command that carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    None,
    SelectDb(i64),
    SetName(Option<Bytes>),
    SetInfo(Bytes, Bytes),
    Hello {
        protocol: Option<u8>,
        name: Option<Bytes>,
    },
    NoEvict(bool),
    NoTouch(bool),
    Readonly(bool),
    /// `CLIENT TRACKING` arguments after the subcommand (`ON ...`) as the client gave them, or
    /// None for `OFF`. `sent_redirect` is the server-side id the proxy put in place of a
    /// REDIRECT to one of its own sessions (see `links`).
    Tracking {
        args: Option<Vec<Bytes>>,
        sent_redirect: Option<i64>,
    },
    /// A `CLIENT TRACKING ON` the proxy sent to point the redirect at the target session's
    /// connection with this server-side id (a replay, or the target moved).
    RedirectPointed(i64),
    Monitor,
    /// The client's own RESET: the upstream connection falls back to the default user.
    Reset,
    /// Actions queued inside MULTI, each with the position of its command in the transaction,
    /// applied when EXEC answers with an array (each only if its element is not an error).
    Exec(Vec<(usize, Action)>),
    /// `(P|S)SUBSCRIBE` inside MULTI: the channels join the set when EXEC runs it.
    Subscribe(SubClass, Vec<Bytes>),
    /// `(P|S)UNSUBSCRIBE` inside MULTI: the channels (all of them when empty) leave the set.
    Unsubscribe(SubClass, Vec<Bytes>),
    /// A command the proxy injected (replay, re-authentication); an error is logged.
    Injected(&'static str),
    /// The AUTH that moves the connection to a new generation in place.
    Reauth,
}

/// The channels (or patterns) of one kind of subscription, in the order the client subscribed.
/// The replay subscribes in that order so the new connection lists them as the old one did:
/// an argument-less `(P|S)UNSUBSCRIBE` answers in the server's order (for patterns on Redis
/// 7.0, the order of subscription), and a client may compare those answers with what it sent.
pub type Subscriptions = IndexSet<Bytes>;

/// Connection state as the server sees it.
#[derive(Debug, Clone, Default)]
pub struct ConnState {
    /// 2 or 3 (HELLO).
    pub protocol: u8,
    pub db: i64,
    pub name: Option<Bytes>,
    /// `CLIENT SETINFO` attributes in the order they were set.
    pub info: Vec<(Bytes, Bytes)>,
    pub no_evict: bool,
    pub no_touch: bool,
    pub readonly: bool,
    pub tracking: Option<Vec<Bytes>>,
    pub monitor: bool,
    pub channels: Subscriptions,
    pub patterns: Subscriptions,
    pub shard_channels: Subscriptions,
    /// Channel + pattern subscriptions as last counted by the server.
    pub server_subscriptions: i64,
    /// Shard channel subscriptions as last counted by the server.
    pub server_shard_subscriptions: i64,
}

impl ConnState {
    pub fn new() -> Self {
        Self {
            protocol: 2,
            ..Default::default()
        }
    }

    /// True when the upstream connection is indistinguishable from a freshly authenticated one,
    /// so it may serve another client.
    pub fn is_default(&self) -> bool {
        self.protocol == 2
            && self.db == 0
            && self.name.is_none()
            && self.info.is_empty()
            && !self.no_evict
            && !self.no_touch
            && !self.readonly
            && self.tracking.is_none()
            && !self.monitor
            && !self.has_subscriptions()
    }

    pub fn has_subscriptions(&self) -> bool {
        !self.channels.is_empty()
            || !self.patterns.is_empty()
            || !self.shard_channels.is_empty()
            || self.server_subscriptions > 0
            || self.server_shard_subscriptions > 0
    }

    /// Whether the connection holds a subscription once the server has run every command sent
    /// so far (the sets change when a (un)subscribe is sent, and change back if it fails).
    pub fn has_subscribed_channels(&self) -> bool {
        !self.channels.is_empty() || !self.patterns.is_empty() || !self.shard_channels.is_empty()
    }

    /// Whether Redis will take only (un)subscribe commands, PING, QUIT and RESET from this
    /// connection once it has run everything sent so far: a subscribed RESP2 connection.
    pub fn resp2_subscribe_context(&self) -> bool {
        self.protocol == 2 && self.has_subscribed_channels()
    }

    /// Under RESP2 a subscribed connection receives messages as plain arrays, so arrays must be
    /// looked into to tell a message from a reply.
    pub fn resp2_subscribed(&self) -> bool {
        self.protocol == 2 && (self.server_subscriptions > 0 || self.server_shard_subscriptions > 0)
    }

    /// Whether the session needs a live upstream connection even while the client sends nothing
    /// (it is waiting for messages, monitor lines or invalidations).
    pub fn needs_live_connection(&self) -> bool {
        self.has_subscriptions() || self.monitor || self.tracking.is_some()
    }

    pub fn set_of(&mut self, class: SubClass) -> &mut Subscriptions {
        match class {
            SubClass::Channel => &mut self.channels,
            SubClass::Pattern => &mut self.patterns,
            SubClass::Shard => &mut self.shard_channels,
        }
    }

    /// Applies a confirmed action. `ok` is false when the server answered with an error.
    pub fn apply(&mut self, action: Action, ok: bool) {
        if !ok {
            return;
        }
        match action {
            Action::None | Action::Injected(_) | Action::Reauth | Action::RedirectPointed(_) => {}
            Action::SelectDb(db) => self.db = db,
            Action::SetName(name) => self.name = name,
            Action::SetInfo(attr, value) => {
                match self
                    .info
                    .iter_mut()
                    .find(|(a, _)| a.eq_ignore_ascii_case(&attr))
                {
                    Some(entry) => entry.1 = value,
                    None => self.info.push((attr, value)),
                }
            }
            Action::Hello { protocol, name } => {
                if let Some(p) = protocol {
                    self.protocol = p;
                }
                if name.is_some() {
                    self.name = name;
                }
            }
            Action::NoEvict(on) => self.no_evict = on,
            Action::NoTouch(on) => self.no_touch = on,
            Action::Readonly(on) => self.readonly = on,
            Action::Tracking { args, .. } => self.tracking = args,
            Action::Monitor => self.monitor = true,
            Action::Reset => *self = ConnState::new(),
            Action::Exec(actions) => {
                self.apply_exec(actions, None);
            }
            Action::Subscribe(class, channels) => {
                self.set_of(class).extend(channels);
                self.count_subscriptions_as_the_server_does();
            }
            Action::Unsubscribe(class, channels) => {
                let set = self.set_of(class);
                if channels.is_empty() {
                    set.clear();
                } else {
                    for channel in &channels {
                        set.shift_remove(channel);
                    }
                }
                self.count_subscriptions_as_the_server_does();
            }
        }
    }

    /// Applies the actions of a transaction EXEC ran, in order, and returns how many frames its
    /// reply carries beyond the array's own count. Redis counts a (un)subscribe command once in
    /// the EXEC array's length but writes one confirmation per channel (per subscription for an
    /// UNSUBSCRIBE without arguments, at least one), so those frames follow the array.
    /// `failed` tells, per element of EXEC's array, whether that command failed (None: unknown,
    /// taken as success); a failed command changes nothing and answers with its error alone.
    /// The confirmations beyond the first of an earlier (un)subscribe push a command's reply
    /// that many elements later (past the array's end, it is not known, taken as success).
    pub fn apply_exec(&mut self, actions: Vec<(usize, Action)>, failed: Option<&[bool]>) -> u64 {
        let mut extra = 0;
        for (position, action) in actions {
            let element = position + extra as usize;
            if failed.and_then(|f| f.get(element)).copied() == Some(true) {
                continue;
            }
            let confirmations = match &action {
                Action::Subscribe(_, channels) => channels.len() as u64,
                Action::Unsubscribe(class, channels) if channels.is_empty() => {
                    self.set_of(*class).len() as u64
                }
                Action::Unsubscribe(_, channels) => channels.len() as u64,
                _ => 1,
            };
            extra += confirmations.max(1) - 1;
            self.apply(action, true);
        }
        extra
    }

    /// After (un)subscribe commands whose confirmations the proxy did not read one by one (they
    /// came inside an EXEC reply): the server now counts what the sets hold.
    fn count_subscriptions_as_the_server_does(&mut self) {
        self.server_subscriptions = (self.channels.len() + self.patterns.len()) as i64;
        self.server_shard_subscriptions = self.shard_channels.len() as i64;
    }

    /// Commands that recreate this state on a fresh, authenticated RESP2 connection, each with the
    /// number of replies it produces. HELLO goes first so every later reply is in the session's
    /// protocol. `redirect_to` replaces the value of a tracking REDIRECT (the target session's
    /// current server-side id).
    pub fn replay_commands(&self, redirect_to: Option<i64>) -> Vec<(Vec<u8>, u64, &'static str)> {
        let mut cmds = Vec::new();
        if self.protocol == 3 {
            cmds.push((command::encode(&[&b"HELLO"[..], b"3"]), 1, "HELLO 3"));
        }
        if self.db != 0 {
            let db = self.db.to_string();
            cmds.push((command::encode(&[b"SELECT", db.as_bytes()]), 1, "SELECT"));
        }
        if let Some(name) = &self.name {
            cmds.push((
                command::encode(&[&b"CLIENT"[..], b"SETNAME", name]),
                1,
                "CLIENT SETNAME",
            ));
        }
        for (attr, value) in &self.info {
            cmds.push((
                command::encode(&[&b"CLIENT"[..], b"SETINFO", attr, value]),
                1,
                "CLIENT SETINFO",
            ));
        }
        if self.no_evict {
            cmds.push((
                command::encode(&[&b"CLIENT"[..], b"NO-EVICT", b"ON"]),
                1,
                "CLIENT NO-EVICT",
            ));
        }
        if self.no_touch {
            cmds.push((
                command::encode(&[&b"CLIENT"[..], b"NO-TOUCH", b"ON"]),
                1,
                "CLIENT NO-TOUCH",
            ));
        }
        if self.readonly {
            cmds.push((command::encode(&[&b"READONLY"[..]]), 1, "READONLY"));
        }
        if let Some(args) = &self.tracking {
            let cmd = super::links::tracking_command(args, redirect_to);
            cmds.push((cmd, 1, TRACKING_REPLAY));
        }
        for (name, set) in [
            ("SUBSCRIBE", &self.channels),
            ("PSUBSCRIBE", &self.patterns),
            ("SSUBSCRIBE", &self.shard_channels),
        ] {
            if !set.is_empty() {
                let mut full: Vec<&[u8]> = vec![name.as_bytes()];
                full.extend(set.iter().map(|c| c.as_ref()));
                cmds.push((command::encode(&full), set.len() as u64, name));
            }
        }
        if self.monitor {
            cmds.push((command::encode(&[&b"MONITOR"[..]]), 1, "MONITOR"));
        }
        cmds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_select_keeps_db() {
        let mut s = ConnState::new();
        s.apply(Action::SelectDb(3), true);
        s.apply(Action::SelectDb(99), false);
        assert_eq!(s.db, 3);
        assert!(!s.is_default());
    }

    #[test]
    fn replay_starts_with_hello_and_counts_subscriptions() {
        let mut s = ConnState::new();
        s.apply(
            Action::Hello {
                protocol: Some(3),
                name: None,
            },
            true,
        );
        s.apply(Action::SelectDb(2), true);
        s.channels.insert(Bytes::from_static(b"a"));
        s.channels.insert(Bytes::from_static(b"b"));
        let cmds = s.replay_commands(None);
        assert_eq!(cmds[0].2, "HELLO 3");
        assert_eq!(cmds[1].2, "SELECT");
        assert_eq!(cmds[2].1, 2);
    }

    #[test]
    fn reset_returns_to_default() {
        let mut s = ConnState::new();
        s.apply(Action::SetName(Some(Bytes::from_static(b"n"))), true);
        s.apply(Action::Reset, true);
        assert!(s.is_default());
    }

    fn channels(names: &[&'static str]) -> Vec<Bytes> {
        names
            .iter()
            .map(|n| Bytes::from_static(n.as_bytes()))
            .collect()
    }

    #[test]
    fn exec_counts_one_frame_per_confirmation_beyond_the_array() {
        let mut s = ConnState::new();
        // SUBSCRIBE a b a: three confirmations (one per argument), two channels.
        let extra = s.apply_exec(
            vec![
                (
                    0,
                    Action::Subscribe(SubClass::Channel, channels(&["a", "b", "a"])),
                ),
                (1, Action::SelectDb(1)),
                (3, Action::Subscribe(SubClass::Pattern, channels(&["p*"]))),
            ],
            None,
        );
        assert_eq!(extra, 2);
        assert_eq!(s.channels.len(), 2);
        assert_eq!(s.db, 1);
        assert_eq!(s.server_subscriptions, 3);
        assert!(s.resp2_subscribed());
        // UNSUBSCRIBE without arguments: one confirmation per channel it leaves.
        assert_eq!(
            s.apply_exec(
                vec![(0, Action::Unsubscribe(SubClass::Channel, Vec::new()))],
                None
            ),
            1
        );
        assert!(s.channels.is_empty());
        assert_eq!(s.server_subscriptions, 1);
        // ... and still one when there is none to leave.
        assert_eq!(
            s.apply_exec(
                vec![
                    (0, Action::Unsubscribe(SubClass::Channel, Vec::new())),
                    (
                        1,
                        Action::Unsubscribe(SubClass::Pattern, channels(&["p*", "q*"]))
                    ),
                ],
                None
            ),
            1
        );
        assert!(!s.has_subscriptions());
    }

    #[test]
    fn exec_applies_nothing_of_a_command_that_failed() {
        let mut s = ConnState::new();
        s.apply(Action::SelectDb(2), true);
        // MULTI, SELECT 99, GET k, CLIENT SETNAME x, SSUBSCRIBE a b, EXEC: the SELECT and the
        // SSUBSCRIBE answer with errors (and the SSUBSCRIBE with nothing after the array).
        let extra = s.apply_exec(
            vec![
                (0, Action::SelectDb(99)),
                (2, Action::SetName(Some(Bytes::from_static(b"x")))),
                (3, Action::Subscribe(SubClass::Shard, channels(&["a", "b"]))),
            ],
            Some(&[true, false, false, true]),
        );
        assert_eq!(extra, 0);
        assert_eq!(s.db, 2);
        assert_eq!(s.name.as_deref(), Some(&b"x"[..]));
        assert!(!s.has_subscriptions());
    }

    #[test]
    fn exec_reads_a_failure_after_a_subscribe_one_element_later_per_extra_confirmation() {
        let mut s = ConnState::new();
        // MULTI, SUBSCRIBE a b, SSUBSCRIBE s, SELECT 1, EXEC. Redis writes `*3`, the two
        // confirmations, the SSUBSCRIBE's error, then (after the array) SELECT's +OK.
        let extra = s.apply_exec(
            vec![
                (
                    0,
                    Action::Subscribe(SubClass::Channel, channels(&["a", "b"])),
                ),
                (1, Action::Subscribe(SubClass::Shard, channels(&["s"]))),
                (2, Action::SelectDb(1)),
            ],
            Some(&[false, false, true]),
        );
        assert_eq!(extra, 1);
        assert_eq!(s.channels.len(), 2);
        assert!(s.shard_channels.is_empty(), "the SSUBSCRIBE failed");
        assert_eq!(s.db, 1, "past the array: taken as done");
    }
}
