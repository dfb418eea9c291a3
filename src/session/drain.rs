//! Moving a session to a new generation (the drain): only at a safe point, cheapest way first.
//!
//! - **re-AUTH in place**: `AUTH user new-password` on the same connection keeps its client id,
//!   tracking table and everything else; allowed unless subscribed under RESP2 or in MONITOR.
//! - **swap**: take a warm connection of the new generation, replay the session's state on it,
//!   close the old one. A subscribed session keeps its old connection until the new one has
//!   confirmed every subscription, relaying messages from both meanwhile: delivery across the
//!   move is at-least-once.
//!
//! A busy session (auto-pipelining clients never pause) creates its safe point: it stops reading
//! its client for at most `max_pause`, lets the outstanding replies arrive, moves, and resumes.
//! A session in MULTI or with a WATCH armed waits for EXEC/DISCARD/UNWATCH. A blocking command
//! still waiting as the drain deadline nears (`BLOCKED_MOVE_LEAD` before it, so the move is over
//! by the deadline) is moved, not failed: `CLIENT UNBLOCK <id> TIMEOUT` from a control
//! connection makes it answer nil at once (consuming nothing), the nil is swallowed, and the
//! command is sent again on the new connection with the time it had left.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::OwnedFrame;

use super::replies::Expect;
use super::state::Action;
use super::{Session, Upstream, new_reply_scanner};
use crate::credentials::Generation;
use crate::resp::command::{self, Peek};
use crate::resp::reply::{self, PushKind};
use crate::resp::scanner::Scanner;
use crate::upstream::connector;

/// How long a replaced connection is kept for its pushes at most.
const OLD_UPSTREAM_GRACE: Duration = Duration::from_secs(10);

/// The connection a subscribed session moved away from.
pub(super) struct OldUpstream {
    up: Upstream,
    scanner: Scanner,
    /// Complete message frames waiting for the client stream to be at a frame boundary.
    pending: BytesMut,
    /// Bytes of the frame being read already scanned (frames are kept whole until complete).
    scanned: usize,
    /// A PING was sent once the new connection held every subscription: its answer comes after
    /// every message the server sent this connection before, so none is left unread.
    ping_sent: bool,
    /// Everything it had to deliver has been read: its PING was answered (what comes after
    /// is on the new connection too), or the client left channels (what comes after may be
    /// of those). Later messages are not relayed.
    finished: bool,
    since: Instant,
}

/// A blocking command in flight, as needed to send it again with its remaining timeout.
#[derive(Debug)]
pub(super) struct BlockedCommand {
    args: Vec<Bytes>,
    timeout: Option<Timeout>,
    sent_at: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Timeout {
    index: usize,
    /// In seconds (BLPOP and friends) or milliseconds (XREAD BLOCK).
    millis: bool,
    value: f64,
}

impl BlockedCommand {
    pub(super) fn new(args: &[&[u8]]) -> Option<Self> {
        let name = args.first()?;
        let upper = String::from_utf8_lossy(name).to_ascii_uppercase();
        let index = match upper.as_str() {
            "BLPOP" | "BRPOP" | "BZPOPMIN" | "BZPOPMAX" | "BRPOPLPUSH" | "BLMOVE" => {
                Some((args.len() - 1, false))
            }
            "BLMPOP" | "BZMPOP" => Some((1, false)),
            "XREAD" | "XREADGROUP" => args
                .iter()
                .position(|a| command::is(a, "BLOCK"))
                .map(|i| (i + 1, true)),
            // WAIT / WAITAOF cannot be unblocked and re-run: the session waits for them.
            _ => None,
        };
        let timeout = index.and_then(|(index, millis)| {
            let value: f64 = std::str::from_utf8(args.get(index)?).ok()?.parse().ok()?;
            Some(Timeout {
                index,
                millis,
                value,
            })
        });
        Some(Self {
            args: args.iter().map(|a| Bytes::copy_from_slice(a)).collect(),
            timeout,
            sent_at: Instant::now(),
        })
    }

    /// The same command with the time it has left (0 stays 0: block forever).
    fn reissue(&self) -> Option<Vec<u8>> {
        let t = self.timeout?;
        let elapsed = self.sent_at.elapsed();
        let left = if t.value == 0.0 {
            "0".to_string()
        } else if t.millis {
            let left = (t.value - elapsed.as_millis() as f64).max(1.0);
            format!("{}", left as u64)
        } else {
            let left = (t.value - elapsed.as_secs_f64()).max(0.001);
            format!("{left:.3}")
        };
        let mut args = self.args.clone();
        args[t.index] = Bytes::from(left);
        Some(command::encode(&args))
    }
}

impl Session {
    /// Whether the session's connection belongs to an older generation (or a move is unfinished).
    pub(super) fn move_wanted(&self) -> bool {
        self.reissue.is_some()
            || self
                .upstream
                .as_ref()
                .is_some_and(|u| u.conn.generation.id < self.ctx.generations.current_id())
    }

    /// Moves now if at a safe point; otherwise works towards one.
    pub(super) async fn maybe_move(&mut self) {
        if self.closing || self.reauth_target.is_some() {
            return;
        }
        let behind = self
            .upstream
            .as_ref()
            .is_some_and(|u| u.conn.generation.id < self.ctx.generations.current_id());
        self.note_what_the_move_waits_for(behind);
        if self.at_safe_point() {
            self.paused_for_move = false;
            self.move_timer = None;
            if behind {
                self.move_now().await;
            }
            if let Some(again) = self.reissue.take() {
                let expect = Expect::Tracked {
                    action: Action::None,
                    relay: true,
                    blocking: true,
                };
                self.forward(&again, expect).await;
                if let Some(blocked) = &mut self.blocked {
                    blocked.sent_at = Instant::now();
                }
            }
            return;
        }
        if !behind || self.in_multi || self.watch_armed {
            // A transaction ends only when the client sends EXEC/DISCARD: pausing its input
            // would stall it. Wait for the natural safe point.
            return;
        }
        if self.replies.blocking_in_flight() {
            if self.ctx.generations.blocked_move_due() {
                if self.replies.only_a_blocking_command_owed() && !self.unblocking {
                    self.unblock_for_move().await;
                }
            } else if self.move_timer.is_none()
                && let Some(due) = self.ctx.generations.blocked_move_time()
            {
                let wait = due
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                self.move_timer = Some(Box::pin(tokio::time::sleep(wait)));
            }
            return;
        }
        if !self.paused_for_move && self.move_timer.is_none() {
            self.paused_for_move = true;
            self.move_timer = Some(Box::pin(tokio::time::sleep(self.ctx.max_pause)));
        }
    }

    /// Publishes (for `/v1/clients`) what keeps a session that is behind from moving, when
    /// that changes: during a drain an operator sees which sessions hold the old generation,
    /// and why. Only sessions that are behind get here, so the steady state never does.
    fn note_what_the_move_waits_for(&mut self, behind: bool) {
        let waits_for = if !behind || self.at_safe_point() {
            None
        } else if self.in_multi {
            Some("transaction")
        } else if self.watch_armed {
            Some("watch")
        } else if self.replies.blocking_in_flight() {
            Some("blocking_command")
        } else {
            Some("replies")
        };
        if waits_for != self.waiting_to_move {
            self.waiting_to_move = waits_for;
            self.publish_view();
        }
    }

    /// A pause ends after `max_pause` even without a safe point (reading resumes for as long
    /// again before the next try); a wait to move a blocked command ends when that is due.
    pub(super) fn on_move_timer(&mut self) {
        if self.paused_for_move {
            self.paused_for_move = false;
            self.resume_input = true;
            self.move_timer = Some(Box::pin(tokio::time::sleep(self.ctx.max_pause)));
        } else {
            self.move_timer = None;
        }
    }

    async fn move_now(&mut self) {
        let target = self.ctx.generations.current();
        // RESP2 refuses AUTH while subscribed; MONITOR streams forever.
        let resp2_subscribed = self.state.protocol == 2 && self.state.has_subscriptions();
        // AUTH changes the credential only: new TLS material needs a new connection.
        let same_endpoint = self
            .upstream
            .as_ref()
            .is_some_and(|u| u.conn.generation.endpoint.same_as(&target.endpoint));
        let in_place = !(self.reauth_refused || self.state.monitor || resp2_subscribed)
            && same_endpoint
            && target.credential.password.is_some();
        if in_place {
            self.reauthenticate_as(target);
        } else {
            self.swap_to(target).await;
        }
    }

    /// Sends `AUTH` with the new generation's credential on the current connection.
    fn reauthenticate_as(&mut self, target: Arc<Generation>) {
        self.flush_forward();
        let Some(up) = &mut self.upstream else {
            return;
        };
        let Some(auth) = target.credential.auth_command() else {
            return;
        };
        up.out.extend_from_slice(&auth);
        self.replies.push(Expect::Tracked {
            action: Action::Reauth,
            relay: false,
            blocking: false,
        });
        self.reauth_target = Some(target);
    }

    pub(super) fn on_reauth_answered(&mut self, ok: bool) {
        let Some(target) = self.reauth_target.take() else {
            return;
        };
        if ok {
            if let Some(up) = &mut self.upstream {
                up.conn.set_generation(target);
            }
            metrics::counter!("rotaproxy_sessions_moved_total", "how" => "reauth").increment(1);
        } else {
            // Not a client-visible failure: the session swaps connections instead.
            tracing::warn!(peer = %self.peer, "in-place re-authentication refused; swapping connections");
            self.reauth_refused = true;
        }
    }

    /// Moves to a warm connection of the new generation and replays the session's state.
    async fn swap_to(&mut self, target: Arc<Generation>) {
        let conn = match self.ctx.pool.checkout().await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(peer = %self.peer, error = %err, "cannot move session yet; will retry");
                self.move_timer = Some(Box::pin(tokio::time::sleep(self.ctx.max_pause)));
                return;
            }
        };
        if conn.generation.id != target.id {
            // A newer generation was published meanwhile; the next move catches up.
            tracing::debug!(peer = %self.peer, "moved to a newer generation than asked");
        }
        // Replies still waiting to be written leave with the old connection's buffer otherwise.
        self.flush_relay();
        let old = self.upstream.take();
        self.install_upstream(conn);
        metrics::counter!("rotaproxy_sessions_moved_total", "how" => "swap").increment(1);
        if let Some(old) = old
            && self.state.has_subscriptions()
        {
            self.old_upstream = Some(Box::new(OldUpstream {
                up: old,
                scanner: new_reply_scanner(),
                pending: BytesMut::new(),
                scanned: 0,
                ping_sent: false,
                finished: false,
                since: Instant::now(),
            }));
        }
    }

    pub(super) fn poll_read_old_upstream(&mut self, cx: &mut Context<'_>) -> Poll<usize> {
        let Some(old) = &mut self.old_upstream else {
            return Poll::Pending;
        };
        let up = &mut old.up;
        if super::poll_write_all(&mut up.conn.stream, &mut up.out, &mut up.needs_flush, cx).is_err()
        {
            return Poll::Ready(0);
        }
        match old.up.conn.stream.poll_read_into(cx, &mut old.up.input) {
            Poll::Ready(Ok(n)) => Poll::Ready(n),
            Poll::Ready(Err(_)) => Poll::Ready(0),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Relays the messages the old connection still delivers; everything else from it is
    /// dropped (nothing is owed on it).
    pub(super) fn on_old_upstream_input(&mut self, n: usize) {
        if n == 0 {
            self.old_upstream = None;
            return;
        }
        let Some(old) = &mut self.old_upstream else {
            return;
        };
        loop {
            if old.scanned >= old.up.input.len() {
                break;
            }
            let Ok(progress) = old.scanner.scan(&old.up.input[old.scanned..]) else {
                self.old_upstream = None;
                return;
            };
            old.scanned += progress.consumed;
            if !progress.complete {
                break;
            }
            let frame = old.up.input.split_to(std::mem::take(&mut old.scanned));
            let is_message = matches!(
                reply::peek_first_element(&frame),
                Peek::Ready(Some(ref r))
                    if matches!(reply::push_kind(&frame[r.clone()]), PushKind::Message | PushKind::Invalidate)
            );
            if is_message {
                if !old.finished {
                    old.pending.extend_from_slice(&frame);
                }
            } else if old.ping_sent {
                // Nothing is owed on this connection but the PING: everything before its
                // answer has been read.
                old.finished = true;
            }
        }
        self.flush_old_upstream_pushes();
        self.drop_old_upstream_when_replaced();
    }

    /// Appends held messages from the old connection when the client stream is between frames.
    pub(super) fn flush_old_upstream_pushes(&mut self) {
        if self.reply_frame.is_some()
            || self.held_reply_len != 0
            || self
                .old_upstream
                .as_ref()
                .is_none_or(|old| old.pending.is_empty())
        {
            return;
        }
        // After the complete replies already relayed from the new connection.
        self.flush_relay();
        let old = self.old_upstream.as_mut().expect("checked above");
        // Messages, whatever the client's CLIENT REPLY mode (as from Redis).
        self.client_out.extend_from_slice(&old.pending);
        old.pending.clear();
    }

    /// The client leaves channels while the connection it moved from still delivers: that one
    /// would go on delivering messages of channels the client has left (and count in PUBLISH's
    /// answer), so it goes once what it already delivered has been relayed.
    pub(super) fn finish_old_upstream(&mut self) {
        if let Some(old) = &mut self.old_upstream {
            old.finished = true;
            self.flush_old_upstream_pushes();
            self.drop_old_upstream_when_replaced();
        }
    }

    /// Closes the old connection once the new one holds every subscription and every message
    /// the old one was sent before that has been relayed (or after a grace period).
    pub(super) fn drop_old_upstream_when_replaced(&mut self) {
        // Called after every batch of replies; almost always there is no old connection.
        let Some(old) = &mut self.old_upstream else {
            return;
        };
        let s = &self.state;
        let replaced = s.server_subscriptions >= (s.channels.len() + s.patterns.len()) as i64
            && s.server_shard_subscriptions >= s.shard_channels.len() as i64;
        if replaced && !old.ping_sent {
            // The server answers this PING after every message it already sent here.
            old.up.out.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
            old.ping_sent = true;
        }
        if (old.finished && old.pending.is_empty()) || old.since.elapsed() > OLD_UPSTREAM_GRACE {
            self.old_upstream = None;
        }
    }

    /// Shortly before the drain deadline, makes the blocked command answer at once (nil,
    /// consuming nothing) so the session can move; the command is then sent again. Without a
    /// control connection or the right to CLIENT UNBLOCK, the session keeps waiting for the reply.
    async fn unblock_for_move(&mut self) {
        let Some(blocked) = &self.blocked else {
            return;
        };
        if blocked.timeout.is_none() {
            return;
        }
        let Some(id) = self.upstream.as_ref().and_then(|u| u.conn.client_id) else {
            return;
        };
        let mut control = match self.ctx.pool.checkout().await {
            Ok(c) => c,
            Err(err) => {
                tracing::warn!(peer = %self.peer, error = %err, "no control connection to unblock a blocked command");
                return;
            }
        };
        let id = id.to_string();
        let reply = connector::run_command(
            &mut control,
            &[b"CLIENT", b"UNBLOCK", id.as_bytes(), b"TIMEOUT"],
            Duration::from_secs(5),
        )
        .await;
        match reply {
            Ok(OwnedFrame::Integer(1)) => {
                self.unblocking = true;
                self.ctx.pool.checkin(control);
            }
            Ok(OwnedFrame::Integer(_)) => {
                // Not blocked any more: its answer is on the way.
                self.ctx.pool.checkin(control);
            }
            Ok(OwnedFrame::Error(e)) => {
                let code = e.split_whitespace().next().unwrap_or("ERR").to_string();
                tracing::warn!(peer = %self.peer, code, "CLIENT UNBLOCK refused; waiting for the blocked command instead");
                // Do not try again for this command.
                if let Some(b) = &mut self.blocked {
                    b.timeout = None;
                }
            }
            Ok(_) | Err(_) => {}
        }
    }

    /// The blocking command in flight has answered. `swallowed` when that answer was the nil a
    /// CLIENT UNBLOCK provoked: the command is sent again after the move.
    pub(super) fn on_blocking_answered(&mut self, swallowed: bool) {
        let blocked = self.blocked.take();
        if std::mem::take(&mut self.unblocking) && swallowed {
            self.reissue = blocked.as_ref().and_then(BlockedCommand::reissue);
            // Keep the original start time so the remaining timeout keeps shrinking.
            self.blocked = blocked;
        }
    }
}
