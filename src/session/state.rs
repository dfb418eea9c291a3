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
#[repr(C)] // `monitor` and `protocol` first: they are read with every batch of replies.
pub struct ConnState {
    /// 2 or 3 (HELLO).
    pub protocol: u8,
    pub monitor: bool,
    pub db: i64,
    pub name: Option<Bytes>,
    /// `CLIENT SETINFO` attributes in the order they were set.
    pub info: Vec<(Bytes, Bytes)>,
    pub no_evict: bool,
    pub no_touch: bool,
    pub readonly: bool,
    pub tracking: Option<Vec<Bytes>>,
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

    pub fn set(&self, class: SubClass) -> &Subscriptions {
        match class {
            SubClass::Channel => &self.channels,
            SubClass::Pattern => &self.patterns,
            SubClass::Shard => &self.shard_channels,
        }
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
                self.apply_exec(actions);
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

    /// Applies the actions of a transaction EXEC ran, all taken as done (what each command did
    /// is not known), and returns how many frames its reply carries beyond the array's own
    /// count (see [`ExecFollower`]).
    pub fn apply_exec(&mut self, actions: Vec<(usize, Action)>) -> u64 {
        let mut follower = ExecFollower::new(actions, usize::MAX);
        while !follower.actions.is_empty() {
            follower.frame(self, false);
        }
        follower.extra_so_far
    }

    /// How many frames a (un)subscribe run now writes: one per channel it names, or per
    /// subscription it leaves when it names none (at least one).
    fn confirmations_of(&self, action: &Action) -> u64 {
        let n = match action {
            Action::Subscribe(_, channels) => channels.len(),
            Action::Unsubscribe(class, channels) if channels.is_empty() => self.set(*class).len(),
            Action::Unsubscribe(_, channels) => channels.len(),
            _ => 1,
        };
        n.max(1) as u64
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

/// Follows the frames of an EXEC reply, the array's elements and then the frames after it,
/// and applies each queued command's action once its first frame shows whether it ran (an
/// error: it changed nothing).
///
/// Redis counts a (un)subscribe once in the array's length but writes one confirmation per
/// channel (per subscription it leaves when it names none), so the frames of every command
/// after it come that many places later, and the last ones after the array. Which frame
/// belongs to which command is known only frame by frame: a (un)subscribe that fails writes
/// its error alone.
#[derive(Debug)]
pub struct ExecFollower {
    actions: std::collections::VecDeque<(usize, Action)>,
    /// Commands in the transaction: the array's length.
    commands: usize,
    /// The command the next frame starts.
    position: usize,
    /// Confirmations still to come of the (un)subscribe that ran last.
    confirmations_left: u64,
    /// Confirmations beyond the first, of every (un)subscribe so far.
    extra_so_far: u64,
}

impl ExecFollower {
    /// `actions`: the transaction's actions with their positions, in order.
    pub fn new(actions: Vec<(usize, Action)>, commands: usize) -> Self {
        ExecFollower {
            actions: actions.into(),
            commands,
            position: 0,
            confirmations_left: 0,
            extra_so_far: 0,
        }
    }

    /// Takes the next frame of the reply: `is_error` tells whether it is an error.
    pub fn frame(&mut self, state: &mut ConnState, is_error: bool) {
        if self.confirmations_left > 0 {
            self.confirmations_left -= 1;
            return;
        }
        let position = self.position;
        self.position += 1;
        if self.actions.front().is_none_or(|(p, _)| *p != position) {
            return;
        }
        let (_, action) = self.actions.pop_front().expect("checked above");
        if is_error {
            return;
        }
        let extra = state.confirmations_of(&action) - 1;
        self.confirmations_left = extra;
        self.extra_so_far += extra;
        state.apply(action, true);
    }

    /// Frames still due as far as is known now: one per command not yet started, and the
    /// confirmations still to come. A (un)subscribe not yet started may add some.
    pub fn frames_due(&self) -> u64 {
        self.commands.saturating_sub(self.position) as u64 + self.confirmations_left
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
        let extra = s.apply_exec(vec![
            (
                0,
                Action::Subscribe(SubClass::Channel, channels(&["a", "b", "a"])),
            ),
            (1, Action::SelectDb(1)),
            (3, Action::Subscribe(SubClass::Pattern, channels(&["p*"]))),
        ]);
        assert_eq!(extra, 2);
        assert_eq!(s.channels.len(), 2);
        assert_eq!(s.db, 1);
        assert_eq!(s.server_subscriptions, 3);
        assert!(s.resp2_subscribed());
        // UNSUBSCRIBE without arguments: one confirmation per channel it leaves.
        assert_eq!(
            s.apply_exec(vec![(
                0,
                Action::Unsubscribe(SubClass::Channel, Vec::new())
            )]),
            1
        );
        assert!(s.channels.is_empty());
        assert_eq!(s.server_subscriptions, 1);
        // ... and still one when there is none to leave.
        assert_eq!(
            s.apply_exec(vec![
                (0, Action::Unsubscribe(SubClass::Channel, Vec::new())),
                (
                    1,
                    Action::Unsubscribe(SubClass::Pattern, channels(&["p*", "q*"]))
                ),
            ]),
            1
        );
        assert!(!s.has_subscriptions());
    }

    /// Feeds a follower of `commands` commands the frames of EXEC's reply (whether each is an
    /// error), as the session does; returns the frames it still expects.
    fn follow_exec(
        s: &mut ConnState,
        actions: Vec<(usize, Action)>,
        commands: usize,
        frames: &[bool],
    ) -> u64 {
        let mut follower = ExecFollower::new(actions, commands);
        for &is_error in frames {
            follower.frame(s, is_error);
        }
        follower.frames_due()
    }

    #[test]
    fn exec_applies_nothing_of_a_command_that_failed() {
        let mut s = ConnState::new();
        s.apply(Action::SelectDb(2), true);
        // MULTI, SELECT 99, GET k, CLIENT SETNAME x, SSUBSCRIBE a b, EXEC: the SELECT and the
        // SSUBSCRIBE answer with errors (and the SSUBSCRIBE with nothing after the array).
        let due = follow_exec(
            &mut s,
            vec![
                (0, Action::SelectDb(99)),
                (2, Action::SetName(Some(Bytes::from_static(b"x")))),
                (3, Action::Subscribe(SubClass::Shard, channels(&["a", "b"]))),
            ],
            4,
            &[true, false, false, true],
        );
        assert_eq!(due, 0);
        assert_eq!(s.db, 2);
        assert_eq!(s.name.as_deref(), Some(&b"x"[..]));
        assert!(!s.has_subscriptions());
    }

    #[test]
    fn exec_frames_after_a_subscribe_belong_to_the_commands_after_it() {
        let mut s = ConnState::new();
        s.apply(Action::SelectDb(2), true);
        let actions = || {
            vec![
                (
                    0,
                    Action::Subscribe(SubClass::Channel, channels(&["a", "b"])),
                ),
                (1, Action::Subscribe(SubClass::Shard, channels(&["s"]))),
                (2, Action::SelectDb(99)),
            ]
        };
        // MULTI, SUBSCRIBE a b, SSUBSCRIBE s, SELECT 99, EXEC. Redis writes `*3`, the two
        // confirmations, the SSUBSCRIBE's error (inside a transaction), then after the array
        // the SELECT's error.
        assert_eq!(follow_exec(&mut s, actions(), 3, &[false, false, true]), 1);
        assert_eq!(s.channels.len(), 2);
        assert!(s.shard_channels.is_empty(), "the SSUBSCRIBE failed");
        assert_eq!(
            follow_exec(
                &mut ConnState::new(),
                actions(),
                3,
                &[false, false, true, true]
            ),
            0
        );
        let mut s = ConnState::new();
        s.apply(Action::SelectDb(2), true);
        follow_exec(&mut s, actions(), 3, &[false, false, true, true]);
        assert_eq!(s.db, 2, "the SELECT after the array failed");
        // A subscribe that starts after the array announces its own confirmations: MULTI,
        // SUBSCRIBE a b, SUBSCRIBE c d, EXEC is `*2`, two confirmations, then two more.
        let mut s = ConnState::new();
        let mut follower = ExecFollower::new(
            vec![
                (
                    0,
                    Action::Subscribe(SubClass::Channel, channels(&["a", "b"])),
                ),
                (
                    1,
                    Action::Subscribe(SubClass::Channel, channels(&["c", "d"])),
                ),
            ],
            2,
        );
        follower.frame(&mut s, false);
        follower.frame(&mut s, false);
        assert_eq!(follower.frames_due(), 1, "after the array");
        follower.frame(&mut s, false);
        assert_eq!(follower.frames_due(), 1, "c's confirmation announced d's");
        follower.frame(&mut s, false);
        assert_eq!(follower.frames_due(), 0);
        assert_eq!(s.channels.len(), 4);
    }
}
