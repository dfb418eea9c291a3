//! Reply accounting: what the session expects the upstream to answer, in order.
//!
//! "No reply outstanding" must be exact for a safe point to be trustworthy, and replies must reach
//! the client in request order even when some are made by the proxy itself. Each entry is what
//! one or more requests will produce. Runs of ordinary commands collapse into one counter, so a
//! 10 000-command pipeline costs one entry, not 10 000; the run at the back is a plain counter
//! beside the entries, so ordinary traffic never touches the entries' memory at all.

use std::collections::VecDeque;

use bytes::Bytes;

use super::state::Action;
use crate::resp::reply::SubClass;

#[derive(Debug)]
pub enum Expect {
    /// `n` ordinary replies, relayed to the client.
    Relay(u64),
    /// One reply whose success applies `action`; relayed or swallowed (replies to commands the
    /// proxy injected). `blocking` marks a command that may wait server-side indefinitely.
    Tracked {
        action: Action,
        relay: bool,
        blocking: bool,
    },
    /// (Un)subscribe confirmations, one per channel. An error reply ends the entry at once (the
    /// command failed as a whole); `added` lists what the request added to the session's sets so
    /// the failure can undo it. `muted`: the client asked for no reply (`CLIENT REPLY OFF|SKIP`),
    /// which silences an error but, as on Redis, not the confirmations: Redis sends those
    /// (like messages) whatever the reply mode.
    Confirmations {
        remaining: u64,
        relay: bool,
        muted: bool,
        added: Vec<(SubClass, Bytes)>,
    },
    /// A reply the proxy makes itself, delivered when every reply before it has been.
    Local(Bytes),
    /// The frames an EXEC reply carries after its array when the transaction (un)subscribed
    /// (see `state::ExecFollower`): counted whatever they look like, confirmations included.
    ExecTail { remaining: u64, relay: bool },
}

/// What became of a counted reply when it was matched with its entry.
#[derive(Debug)]
pub struct Matched {
    pub action: Action,
    /// Channels to remove again because the subscribe failed.
    pub revert: Vec<(SubClass, Bytes)>,
}

impl Matched {
    /// A reply that changes nothing (an ordinary one, or one confirmation of several).
    fn nothing() -> Self {
        Self {
            action: Action::None,
            revert: Vec::new(),
        }
    }
}

#[derive(Debug, Default)]
pub struct ReplyQueue {
    entries: VecDeque<Expect>,
    /// Ordinary replies expected after every entry: the run at the back of the queue, kept out
    /// of `entries` until something else is queued behind it. Pipelined ordinary commands and
    /// their replies then only change this counter: the entries live in memory of their own,
    /// another cache miss per batch that a busy proxy pays for with every client (measured: the
    /// head entry's load was among the proxy's costliest instructions).
    trailing_relays: u64,
    /// Entries other than `Local` (replies the upstream still owes).
    upstream_owed: usize,
    blocking: usize,
    /// Replies asked of the upstream so far, in all: a command's position in a transaction is
    /// the difference from the count when MULTI was sent.
    asked: u64,
    /// While a request holds the session's barrier (see `Session::barrier`): how many entries
    /// are still to be answered up to and including it. Some(0): it has just been answered.
    barrier_countdown: Option<usize>,
}

impl ReplyQueue {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.trailing_relays == 0
    }

    /// True when the upstream owes no reply (proxy-made replies may still wait for delivery).
    pub fn nothing_owed(&self) -> bool {
        self.upstream_owed == 0 && self.trailing_relays == 0
    }

    /// True when no reply the upstream still owes is for the client: at most replies to the
    /// proxy's own commands (a replay after a move, a re-AUTH).
    pub fn owes_the_client_nothing(&self) -> bool {
        self.trailing_relays == 0
            && self.entries.iter().all(|e| match e {
                Expect::Relay(_) => false,
                Expect::Tracked { relay, .. }
                | Expect::Confirmations { relay, .. }
                | Expect::ExecTail { relay, .. } => !relay,
                Expect::Local(_) => true,
            })
    }

    /// Whether a blocking command (BLPOP, WAIT, XREAD BLOCK ...) is in flight.
    pub fn blocking_in_flight(&self) -> bool {
        self.blocking > 0
    }

    /// Whether the only reply owed is that of one blocking command (the one a drain may move).
    pub fn only_a_blocking_command_owed(&self) -> bool {
        self.upstream_owed == 1 && self.blocking == 1 && self.trailing_relays == 0
    }

    /// Whether a proxy-made reply is next.
    pub fn head_is_local(&self) -> bool {
        matches!(self.entries.front(), Some(Expect::Local(_)))
    }

    /// Whether the next upstream reply is relayed to the client (false: swallowed, or nothing is
    /// expected at all).
    pub fn head_relays(&self) -> bool {
        match self.entries.front() {
            Some(Expect::Relay(_)) => true,
            Some(Expect::Tracked { relay, .. } | Expect::ExecTail { relay, .. }) => *relay,
            Some(Expect::Confirmations { relay, muted, .. }) => *relay && !muted,
            Some(Expect::Local(_)) => false,
            None => self.trailing_relays > 0,
        }
    }

    /// Whether the confirmations the head entry expects go to the client: those of its own
    /// (un)subscribe, muted or not; not those of the proxy's replay.
    pub fn head_confirmations_reach_the_client(&self) -> bool {
        matches!(
            self.entries.front(),
            Some(Expect::Confirmations { relay: true, .. })
        )
    }

    /// How many ordinary replies the head entry still expects (None: the head is not a run of
    /// ordinary replies).
    pub fn head_relay_run(&self) -> Option<u64> {
        match self.entries.front() {
            Some(Expect::Relay(n)) => Some(*n),
            Some(_) => None,
            None => (self.trailing_relays > 0).then_some(self.trailing_relays),
        }
    }

    /// Matches `n` ordinary replies, no more than [`Self::head_relay_run`] gave, with the head.
    pub fn match_relayed(&mut self, n: u64) {
        if self.entries.is_empty() {
            debug_assert!(n <= self.trailing_relays);
            self.trailing_relays -= n.min(self.trailing_relays);
            return;
        }
        let Some(Expect::Relay(left)) = self.entries.front_mut() else {
            debug_assert!(false, "matched ordinary replies without a run at the head");
            return;
        };
        debug_assert!(n <= *left);
        *left -= n.min(*left);
        if *left == 0 {
            self.pop_upstream_entry();
        }
    }

    /// Removes the head entry, answered by the upstream.
    fn pop_upstream_entry(&mut self) {
        self.entries.pop_front();
        self.upstream_owed -= 1;
        if let Some(n) = &mut self.barrier_countdown {
            *n = n.saturating_sub(1);
        }
    }

    pub fn head_is_confirmations(&self) -> bool {
        matches!(self.entries.front(), Some(Expect::Confirmations { .. }))
    }

    /// Whether the next frames are the rest of an EXEC reply (see [`Expect::ExecTail`]).
    pub fn head_is_exec_tail(&self) -> bool {
        matches!(self.entries.front(), Some(Expect::ExecTail { .. }))
    }

    /// More frames of the EXEC reply at the head are due (see [`Expect::ExecTail`]).
    pub fn add_to_exec_tail(&mut self, n: u64) {
        if let Some(Expect::ExecTail { remaining, .. }) = self.entries.front_mut() {
            *remaining += n;
        }
    }

    /// Expects `expect` before anything already queued: what the reply being matched turned
    /// out to carry after itself.
    pub fn push_next(&mut self, expect: Expect) {
        debug_assert!(!matches!(expect, Expect::Relay(_) | Expect::Local(_)));
        self.upstream_owed += 1;
        self.entries.push_front(expect);
        // Now one more entry comes before the barrier's holder, unless that was answered.
        if let Some(n) = &mut self.barrier_countdown
            && *n > 0
        {
            *n += 1;
        }
    }

    /// The request just queued (the last entry) holds the session's barrier: requests behind it
    /// wait for its reply, and only its reply may let them go (`barrier_holder_answered`).
    pub fn hold_barrier_at_last(&mut self) {
        debug_assert_eq!(self.trailing_relays, 0, "the holder is an entry of its own");
        self.barrier_countdown = Some(self.upstream_owed);
    }

    /// Whether the reply just matched answered the request that holds the barrier (a reply
    /// to an earlier request must not lift it: its own request set none).
    pub fn barrier_holder_answered(&self) -> bool {
        self.barrier_countdown == Some(0)
    }

    /// No request holds the barrier any more.
    pub fn release_barrier(&mut self) {
        self.barrier_countdown = None;
    }

    /// Expects `n` ordinary replies.
    pub fn relay(&mut self, n: u64) {
        self.trailing_relays += n;
        self.asked += n;
    }

    /// Replies asked of the upstream so far (see `asked`).
    pub fn asked(&self) -> u64 {
        self.asked
    }

    /// Whether the head entry is an EXEC whose transaction changes session state.
    pub fn head_is_exec_with_actions(&self) -> bool {
        matches!(
            self.entries.front(),
            Some(Expect::Tracked { action: Action::Exec(actions), .. }) if !actions.is_empty()
        )
    }

    /// Moves the trailing run into `entries`, before something else is queued behind it.
    fn settle_trailing_relays(&mut self) {
        let n = std::mem::take(&mut self.trailing_relays);
        if n > 0 {
            self.upstream_owed += 1;
            self.entries.push_back(Expect::Relay(n));
        }
    }

    pub fn push(&mut self, expect: Expect) {
        if let Expect::Relay(n) = expect {
            return self.relay(n);
        }
        self.settle_trailing_relays();
        if !matches!(expect, Expect::Local(_)) {
            self.upstream_owed += 1;
            self.asked += 1;
        }
        if let Expect::Tracked { blocking: true, .. } = expect {
            self.blocking += 1;
        }
        self.entries.push_back(expect);
    }

    /// Matches one upstream reply with the head entry. `is_error` tells whether the reply was an
    /// error; `None` when nothing was expected.
    pub fn match_reply(&mut self, is_error: bool) -> Option<Matched> {
        if self.entries.is_empty() && self.trailing_relays > 0 {
            self.trailing_relays -= 1;
            return Some(Matched::nothing());
        }
        let head = self.entries.front_mut()?;
        let done = match head {
            Expect::Relay(n) | Expect::ExecTail { remaining: n, .. } => {
                *n -= 1;
                if *n > 0 {
                    return Some(Matched::nothing());
                }
                Matched::nothing()
            }
            Expect::Tracked { action, .. } => Matched {
                action: std::mem::replace(action, Action::None),
                ..Matched::nothing()
            },
            Expect::Confirmations {
                remaining, added, ..
            } => {
                if is_error {
                    Matched {
                        revert: std::mem::take(added),
                        ..Matched::nothing()
                    }
                } else {
                    *remaining = remaining.saturating_sub(1);
                    if *remaining > 0 {
                        // Confirmed one channel: whatever else it added stays.
                        return Some(Matched::nothing());
                    }
                    Matched::nothing()
                }
            }
            Expect::Local(_) => return None,
        };
        if let Some(Expect::Tracked { blocking: true, .. }) = self.entries.front() {
            self.blocking -= 1;
        }
        self.pop_upstream_entry();
        Some(done)
    }

    /// Removes and returns the proxy-made replies now at the head, in order.
    pub fn pop_ready_locals(&mut self) -> impl Iterator<Item = Bytes> + '_ {
        std::iter::from_fn(|| {
            if let Some(Expect::Local(_)) = self.entries.front() {
                match self.entries.pop_front() {
                    Some(Expect::Local(bytes)) => Some(bytes),
                    _ => unreachable!("checked above"),
                }
            } else {
                None
            }
        })
    }

    /// Empties the queue (the upstream connection is gone) and returns what was in it, in order.
    pub fn take_all(&mut self) -> Vec<Expect> {
        self.settle_trailing_relays();
        self.upstream_owed = 0;
        self.blocking = 0;
        self.barrier_countdown = None;
        self.entries.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(action: Action) -> Expect {
        Expect::Tracked {
            action,
            relay: true,
            blocking: false,
        }
    }

    #[test]
    fn only_the_reply_of_the_request_holding_the_barrier_releases_it() {
        let mut q = ReplyQueue::default();
        // An earlier HELLO (it holds nothing), a run of ordinary replies, then a RESET holding
        // the barrier.
        q.push(tracked(Action::Hello {
            protocol: None,
            name: None,
        }));
        q.relay(3);
        q.push(tracked(Action::Reset));
        q.hold_barrier_at_last();
        assert!(!q.barrier_holder_answered());
        assert!(q.match_reply(true).is_some());
        assert!(!q.barrier_holder_answered(), "the HELLO's reply");
        // The run is matched in two steps by the fast lane.
        q.match_relayed(2);
        q.match_relayed(1);
        assert!(!q.barrier_holder_answered(), "the ordinary replies");
        // A tail pushed before the holder is answered comes first and counts too.
        q.push_next(Expect::ExecTail {
            remaining: 1,
            relay: true,
        });
        assert!(q.match_reply(false).is_some());
        assert!(!q.barrier_holder_answered(), "the tail");
        assert!(q.match_reply(false).is_some());
        assert!(q.barrier_holder_answered(), "the RESET's reply");
        // Frames that follow the holder's reply leave it answered until released.
        q.push_next(Expect::ExecTail {
            remaining: 1,
            relay: true,
        });
        assert!(q.match_reply(false).is_some());
        assert!(q.barrier_holder_answered());
        q.release_barrier();
        assert!(!q.barrier_holder_answered());
    }

    #[test]
    fn an_exec_tail_comes_before_everything_queued_and_counts_as_owed() {
        let mut q = ReplyQueue::default();
        q.relay(2);
        q.push(Expect::Local(Bytes::from_static(b"+OK\r\n")));
        q.relay(1);
        q.push_next(Expect::ExecTail {
            remaining: 2,
            relay: true,
        });
        assert!(q.head_is_exec_tail());
        assert!(q.head_relays());
        // Not a run of ordinary replies: the fast lane leaves it to the general path.
        assert_eq!(q.head_relay_run(), None);
        assert!(q.match_reply(false).is_some());
        assert!(q.head_is_exec_tail());
        assert!(q.match_reply(true).is_some());
        assert!(!q.head_is_exec_tail());
        assert_eq!(q.head_relay_run(), Some(2));
        q.match_relayed(2);
        assert!(q.head_is_local());
        assert_eq!(q.pop_ready_locals().count(), 1);
        assert_eq!(q.head_relay_run(), Some(1));
        q.match_relayed(1);
        assert!(q.is_empty() && q.nothing_owed());
    }

    #[test]
    fn runs_collapse_and_locals_wait_their_turn() {
        let mut q = ReplyQueue::default();
        q.relay(1);
        q.relay(1);
        q.push(Expect::Local(Bytes::from_static(b"+OK\r\n")));
        q.relay(1);
        assert!(q.head_relays());
        assert_eq!(q.head_relay_run(), Some(2));
        assert!(q.match_reply(false).is_some());
        assert_eq!(q.pop_ready_locals().count(), 0);
        assert!(q.match_reply(false).is_some());
        assert_eq!(q.pop_ready_locals().count(), 1);
        assert!(!q.nothing_owed());
        assert!(q.match_reply(false).is_some());
        assert!(q.is_empty() && q.nothing_owed());
    }

    #[test]
    fn a_run_is_matched_in_one_step() {
        let mut q = ReplyQueue::default();
        q.relay(3);
        q.push(Expect::Local(Bytes::from_static(b"+OK\r\n")));
        assert_eq!(q.head_relay_run(), Some(3));
        q.match_relayed(2);
        assert_eq!(q.head_relay_run(), Some(1));
        assert!(!q.nothing_owed());
        q.match_relayed(1);
        assert_eq!(q.head_relay_run(), None);
        assert!(q.nothing_owed());
        assert_eq!(q.pop_ready_locals().count(), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn the_trailing_run_keeps_its_place_behind_other_entries() {
        let mut q = ReplyQueue::default();
        q.relay(2);
        q.push(Expect::Tracked {
            action: Action::None,
            relay: false,
            blocking: false,
        });
        q.relay(3);
        q.push(Expect::Local(Bytes::from_static(b"+OK\r\n")));
        q.relay(1);
        assert_eq!(q.head_relay_run(), Some(2));
        q.match_relayed(2);
        assert_eq!(q.head_relay_run(), None);
        assert!(!q.head_relays(), "the tracked reply is swallowed");
        assert!(q.match_reply(false).is_some());
        assert_eq!(q.head_relay_run(), Some(3));
        q.match_relayed(3);
        assert!(q.head_is_local());
        assert_eq!(q.pop_ready_locals().count(), 1);
        assert_eq!(q.head_relay_run(), Some(1));
        assert!(!q.nothing_owed() && !q.is_empty());
        assert!(q.match_reply(false).is_some());
        assert!(q.nothing_owed() && q.is_empty());
        assert!(
            q.match_reply(false).is_none(),
            "nothing is expected any more"
        );
    }

    #[test]
    fn take_all_returns_the_trailing_run_last() {
        let mut q = ReplyQueue::default();
        q.relay(2);
        q.push(Expect::Local(Bytes::from_static(b"+OK\r\n")));
        q.relay(4);
        let all = q.take_all();
        assert!(matches!(
            all.as_slice(),
            [Expect::Relay(2), Expect::Local(_), Expect::Relay(4)]
        ));
        assert!(q.is_empty() && q.nothing_owed());
    }

    fn blocking_command() -> Expect {
        Expect::Tracked {
            action: Action::None,
            relay: true,
            blocking: true,
        }
    }

    #[test]
    fn only_a_blocking_command_owed_counts_the_trailing_run() {
        let mut q = ReplyQueue::default();
        q.push(blocking_command());
        assert!(q.only_a_blocking_command_owed());
        q.relay(1);
        assert!(!q.only_a_blocking_command_owed());
    }

    #[test]
    fn subscribe_error_ends_the_entry_and_reverts() {
        let mut q = ReplyQueue::default();
        q.push(Expect::Confirmations {
            remaining: 2,
            relay: true,
            muted: false,
            added: vec![(SubClass::Channel, Bytes::from_static(b"a"))],
        });
        let m = q.match_reply(true).unwrap();
        assert_eq!(m.revert.len(), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn blocking_is_counted() {
        let mut q = ReplyQueue::default();
        q.push(blocking_command());
        assert!(q.blocking_in_flight());
        q.match_reply(false);
        assert!(!q.blocking_in_flight());
    }
}
