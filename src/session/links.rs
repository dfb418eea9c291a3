//! Client ids that survive a move, and tracking redirects that follow their target.
//!
//! Redis gives each connection an id (`CLIENT ID`) that never changes while it is open, and
//! clients use it to point one connection at another: `CLIENT TRACKING ON REDIRECT <id>` sends a
//! connection's cache invalidations to the connection with that id (the RESP2 way of client-side
//! caching: the target subscribes to `__redis__:invalidate`), and `CLIENT UNBLOCK <id>` or
//! `CLIENT KILL ID <id>` act on it. A session that moves to a fresh upstream connection gets a
//! new server-side id, so:
//!
//! - each session keeps a **public id**: the server-side id of its first upstream connection, so
//!   that without a move everything reads exactly as on Redis. `CLIENT ID` answers it, and ids
//!   given as arguments are translated to the target session's current server-side id;
//! - a session whose invalidations are redirected watches its target: when the target moves, it
//!   points its tracking at the target's new connection;
//! - the invalidations Redis dropped meanwhile (it drops them while the redirect target does not
//!   exist) cannot be recovered, so the target's client is told to flush its whole cache, the
//!   message Redis itself sends after `FLUSHALL`. The same happens when the tracking session
//!   moves, because its new connection starts with an empty tracking table;
//! - `CLIENT KILL ID <id>` of a session of this proxy disconnects that session's client, as Redis
//!   would (closing only its upstream connection would be healed by the session at once).
//!
//! Everything here is off the hot path: the registry is touched when a session gets or changes
//! its upstream connection, and sessions look at it only when woken through `Generations`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::Session;
use super::replies::Expect;
use super::state::Action;
use crate::credentials::Generations;
use crate::resp::command;

/// The public ids of this proxy's sessions.
pub struct ClientLinks {
    by_public_id: Mutex<HashMap<i64, Arc<ClientLink>>>,
    /// Wakes the sessions when a tracked session moves or a flush is asked for.
    generations: Arc<Generations>,
}

/// One session's public id and where it is now.
#[derive(Debug)]
pub struct ClientLink {
    public_id: i64,
    upstream_id: AtomicI64,
    /// A session redirecting its invalidations here asked this session to tell its client to
    /// flush its cache.
    flush_wanted: AtomicBool,
    /// Sessions whose tracking redirects here: only their targets' moves wake the sessions.
    trackers: AtomicUsize,
    /// Another client ran `CLIENT KILL ID` with this public id.
    kill_requested: AtomicBool,
}

impl ClientLink {
    pub fn public_id(&self) -> i64 {
        self.public_id
    }

    /// The server-side id of the session's connection now.
    pub fn upstream_id(&self) -> i64 {
        self.upstream_id.load(Ordering::Acquire)
    }

    /// Whether another client asked for this session's client to be disconnected.
    pub fn kill_requested(&self) -> bool {
        self.kill_requested.load(Ordering::Acquire)
    }

    /// Whether another session's tracking redirects here.
    pub fn is_redirect_target(&self) -> bool {
        self.trackers.load(Ordering::Acquire) > 0
    }

    /// Whether a flush was requested since the last call.
    pub fn take_flush_request(&self) -> bool {
        self.flush_wanted.swap(false, Ordering::AcqRel)
    }
}

impl ClientLinks {
    pub fn new(generations: Arc<Generations>) -> Self {
        Self {
            by_public_id: Mutex::default(),
            generations,
        }
    }

    /// Registers a session whose first upstream connection has server-side id `upstream_id`.
    /// None if a live session already holds that public id (ids start again when the server
    /// restarts): that session keeps it, and this one has no public id (its ids are passed
    /// through untranslated, as without the proxy).
    pub fn register(&self, upstream_id: i64) -> Option<Arc<ClientLink>> {
        let mut map = self.by_public_id.lock().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&upstream_id) {
            return None;
        }
        let link = Arc::new(ClientLink {
            public_id: upstream_id,
            upstream_id: AtomicI64::new(upstream_id),
            flush_wanted: AtomicBool::new(false),
            trackers: AtomicUsize::new(0),
            kill_requested: AtomicBool::new(false),
        });
        map.insert(upstream_id, link.clone());
        Some(link)
    }

    pub fn unregister(&self, link: &ClientLink) {
        let mut map = self.by_public_id.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&link.public_id);
    }

    pub fn lookup(&self, public_id: i64) -> Option<Arc<ClientLink>> {
        let map = self.by_public_id.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&public_id).cloned()
    }

    /// The session behind `link` now uses the connection with server-side id `upstream_id`.
    pub fn moved(&self, link: &ClientLink, upstream_id: i64) {
        let before = link.upstream_id.swap(upstream_id, Ordering::AcqRel);
        if before != upstream_id && link.trackers.load(Ordering::Acquire) > 0 {
            self.generations.wake_sessions();
        }
    }

    /// Asks the session behind `link` to disconnect its client.
    pub fn request_kill(&self, link: &ClientLink) {
        link.kill_requested.store(true, Ordering::Release);
        self.generations.wake_sessions();
    }

    /// Asks the session behind `link` to tell its client to flush its cache.
    pub fn request_flush(&self, link: &ClientLink) {
        link.flush_wanted.store(true, Ordering::Release);
        self.generations.wake_sessions();
    }

    /// The server-side id for an id a client gave: the current one of the session holding it
    /// as its public id, or the id itself (a connection not made through this proxy, or no
    /// connection at all: Redis answers as it would).
    pub fn translate(&self, id: &[u8]) -> Option<i64> {
        let public = command::parse_i64(id)?;
        let current = self.lookup(public)?.upstream_id();
        (current != public).then_some(current)
    }
}

/// A session's tracking redirect to another session of this proxy.
#[derive(Debug)]
pub struct Redirect {
    target: Arc<ClientLink>,
    /// The server-side id this session's connection was last told to redirect to.
    sent: i64,
}

impl Redirect {
    fn new(target: Arc<ClientLink>, sent: i64) -> Self {
        target.trackers.fetch_add(1, Ordering::AcqRel);
        Self { target, sent }
    }

    /// For a new connection's replay: the target's current server-side id, from now on the one
    /// sent.
    pub fn point_at_target(&mut self) -> i64 {
        self.sent = self.target.upstream_id();
        self.sent
    }
}

impl Drop for Redirect {
    fn drop(&mut self) {
        self.target.trackers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Session {
    /// The session has a new upstream connection with server-side id `upstream_id`: the first
    /// gives the session its public id; a later one is where the public id now leads.
    pub(super) fn note_new_connection(&mut self, upstream_id: Option<i64>) {
        let Some(id) = upstream_id else {
            return;
        };
        if !std::mem::replace(&mut self.public_id_decided, true) {
            self.own_link = self.ctx.links.register(id);
        } else if let Some(link) = &self.own_link {
            self.ctx.links.moved(link, id);
        }
    }

    /// Whether another session's tracking redirects to this one.
    pub(super) fn is_redirect_target(&self) -> bool {
        self.own_link
            .as_ref()
            .is_some_and(|link| link.is_redirect_target())
    }

    /// Keeps `redirect` in step with the tracking the server confirmed. `sent` is the id the
    /// proxy sent for the REDIRECT, when the confirmed command was the client's own.
    pub(super) fn sync_redirect(&mut self, sent: Option<i64>) {
        let Some(public) = self.state.tracking.as_deref().and_then(redirect_target) else {
            self.redirect = None;
            return;
        };
        if let Some(r) = &mut self.redirect
            && r.target.public_id == public
        {
            if let Some(sent) = sent {
                r.sent = sent;
            }
            return;
        }
        self.redirect = self.ctx.links.lookup(public).map(|target| {
            let sent = sent.unwrap_or_else(|| target.upstream_id());
            Redirect::new(target, sent)
        });
    }

    /// The session was woken: another session may have moved or asked this one for a flush.
    pub(super) fn on_links_changed(&mut self) {
        if let Some(link) = &self.own_link {
            self.flush_pending |= link.take_flush_request();
            self.killed = link.kill_requested();
        }
        self.links_pending = true;
    }

    /// Re-points the tracking redirect and delivers a flush, each as soon as the session can;
    /// what must wait stays pending and is tried again after the next event.
    pub(super) fn do_link_work(&mut self) {
        let repointed = self.repoint_redirect_if_stale();
        let flushed = self.deliver_flush_if_ready();
        self.links_pending = !(repointed && flushed);
    }

    /// Points the tracking at the target session's connection if it moved. False if the session
    /// cannot send a command now (one half-forwarded, an open MULTI, RESP2 subscribed).
    fn repoint_redirect_if_stale(&mut self) -> bool {
        let Some(r) = &self.redirect else {
            return true;
        };
        let now = r.target.upstream_id();
        if now == r.sent || self.upstream.is_none() {
            // Without a connection, the next one's replay points at the target.
            return true;
        }
        if self.closing {
            return true;
        }
        if self.in_multi
            || self.state.resp2_subscribed()
            || !matches!(self.request_mode, super::RequestMode::Start)
        {
            return false;
        }
        let Some(args) = self.state.tracking.clone() else {
            return true;
        };
        self.flush_forward();
        let up = self.upstream.as_mut().expect("checked above");
        // ON again with a new REDIRECT keeps the server's tracking table (what the client read
        // before stays tracked), except that the same prefixes again are refused as overlapping
        // and none would mean all keys: with prefixes, tracking starts over (the flush covers
        // what the table held).
        if args.iter().any(|a| command::is(a, "PREFIX")) {
            up.out
                .extend_from_slice(&command::encode(&[&b"CLIENT"[..], b"TRACKING", b"OFF"]));
            self.replies.push(super::injected("CLIENT TRACKING OFF"));
        }
        up.out
            .extend_from_slice(&tracking_command(&args, Some(now)));
        self.replies.push(Expect::Tracked {
            action: Action::RedirectPointed(now),
            relay: false,
            blocking: false,
        });
        if let Some(r) = &mut self.redirect {
            r.sent = now;
        }
        tracing::debug!(peer = %self.peer, upstream_id = now, "tracking redirect follows its target to a new connection");
        true
    }

    /// The server confirmed (or refused) a `CLIENT TRACKING ON` that points at the target's
    /// connection: invalidations sent before it were lost, so the target's client must flush.
    pub(super) fn on_redirect_pointed(&mut self, id: i64, ok: bool) {
        if !ok {
            // The target's connection went away meanwhile; Redis drops invalidations for a
            // missing target just the same, and the target's next move points here again.
            tracing::warn!(peer = %self.peer, upstream_id = id, "the server refused to point tracking at the target session's connection");
            return;
        }
        metrics::counter!("rotaproxy_tracking_redirects_followed_total").increment(1);
        if let Some(r) = &self.redirect {
            self.ctx.links.request_flush(&r.target);
        }
    }

    /// Tells the client to flush its cache, once no reply is owed (so the push goes between
    /// replies, after a move's subscriptions are confirmed). False while it must wait.
    fn deliver_flush_if_ready(&mut self) -> bool {
        if !self.flush_pending {
            return true;
        }
        if self.upstream.is_none()
            || self.old_upstream.is_some()
            || !self.replies.is_empty()
            || self.reply_frame.is_some()
        {
            return self.closing;
        }
        self.flush_pending = false;
        let message: &'static [u8] = if self.state.protocol == 3 {
            super::INVALIDATE_ALL
        } else if self.state.channels.contains(INVALIDATION_CHANNEL) {
            RESP2_FLUSH_MESSAGE
        } else {
            // Not listening for invalidations: nothing to tell.
            return true;
        };
        self.send_cache_flush(message);
        true
    }

    /// Tells the client to drop its whole cache (`message` in its protocol), after the replies
    /// already relayed.
    pub(super) fn send_cache_flush(&mut self, message: &'static [u8]) {
        self.flush_relay();
        self.client_out.extend_from_slice(message);
        metrics::counter!("rotaproxy_client_cache_flushes_total").increment(1);
    }

    /// The answer to `CLIENT GETREDIR` in terms of the ids the client knows: the REDIRECT it
    /// gave (the server would name the target's connection of now), 0 for tracking without a
    /// redirect, -1 without tracking. None when only the server can tell: a tracking change is
    /// still in flight, the command would be queued in MULTI, or a subscribed RESP2 connection
    /// would refuse it.
    pub(super) fn redirect_as_the_client_gave_it(&self) -> Option<i64> {
        if self.in_multi || !self.replies.nothing_owed() || self.state.resp2_subscribe_context() {
            return None;
        }
        let Some(args) = &self.state.tracking else {
            return Some(-1);
        };
        match redirect_position(args) {
            None => Some(0),
            Some(pos) => command::parse_i64(&args[pos]),
        }
    }

    /// `CLIENT KILL ID <id>` (that filter alone) naming a session of this proxy: asks that
    /// session to disconnect its client and returns the reply Redis would give (`SKIPME` is
    /// `yes` by default, so a client does not kill itself). None for any other command, which
    /// goes to the server with its ids translated.
    pub(super) fn kill_client_of_this_proxy(&mut self, args: &[&[u8]]) -> Option<Bytes> {
        if args.len() != 4 || !command::is(args[1], "KILL") || !command::is(args[2], "ID") {
            return None;
        }
        let public = command::parse_i64(args[3])?;
        let target = self.ctx.links.lookup(public)?;
        if self
            .own_link
            .as_ref()
            .is_some_and(|own| Arc::ptr_eq(own, &target))
        {
            return Some(Bytes::from_static(b":0\r\n"));
        }
        tracing::info!(peer = %self.peer, client_id = public, "CLIENT KILL ID: disconnecting a client of this proxy");
        self.ctx.links.request_kill(&target);
        Some(Bytes::from_static(b":1\r\n"))
    }

    /// `CLIENT UNBLOCK` or `CLIENT KILL ID` naming a session of this proxy that moved: the
    /// command with the ids it has now, or None when nothing needs translating.
    pub(super) fn translate_client_ids(&self, args: &[&[u8]]) -> Option<Vec<u8>> {
        let mut translated: Option<Vec<Vec<u8>>> = None;
        for i in client_id_arguments(args) {
            if let Some(now) = self.ctx.links.translate(args[i]) {
                let all =
                    translated.get_or_insert_with(|| args.iter().map(|a| a.to_vec()).collect());
                all[i] = now.to_string().into_bytes();
            }
        }
        translated.map(|all| command::encode(&all))
    }
}

/// Where the REDIRECT value sits in `CLIENT TRACKING` arguments (those after `TRACKING`). A
/// PREFIX takes the next argument as its value whatever it says, so a prefix named "redirect" is
/// not mistaken for the option.
pub fn redirect_position<A: AsRef<[u8]>>(args: &[A]) -> Option<usize> {
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_ref();
        if command::is(arg, "REDIRECT") {
            return (i + 1 < args.len()).then_some(i + 1);
        }
        i += if command::is(arg, "PREFIX") { 2 } else { 1 };
    }
    None
}

/// The public id a `CLIENT TRACKING ON` redirects to, if any.
pub fn redirect_target(args: &[Bytes]) -> Option<i64> {
    let value = &args[redirect_position(args)?];
    command::parse_i64(value)
}

/// `CLIENT TRACKING <args>`, with the REDIRECT value replaced by `redirect_to` when given.
pub fn tracking_command(args: &[Bytes], redirect_to: Option<i64>) -> Vec<u8> {
    let args = match redirect_to {
        Some(id) => with_redirect(args, id),
        None => args.to_vec(),
    };
    let mut full = vec![
        Bytes::from_static(b"CLIENT"),
        Bytes::from_static(b"TRACKING"),
    ];
    full.extend(args);
    command::encode(&full)
}

/// `args` with the REDIRECT value replaced by `upstream_id`.
fn with_redirect(args: &[Bytes], upstream_id: i64) -> Vec<Bytes> {
    let mut out = args.to_vec();
    if let Some(pos) = redirect_position(args) {
        out[pos] = Bytes::from(upstream_id.to_string());
    }
    out
}

/// Ids among `CLIENT UNBLOCK <id> ...` or `CLIENT KILL <filter> <value> ...` arguments (all of
/// the command's arguments, `CLIENT` first): the positions of the values to translate.
pub fn client_id_arguments(args: &[&[u8]]) -> Vec<usize> {
    let sub = args.get(1).copied().unwrap_or_default();
    if command::is(sub, "UNBLOCK") {
        return if args.len() >= 3 { vec![2] } else { Vec::new() };
    }
    if command::is(sub, "KILL") && args.len() >= 4 {
        // The filter form: pairs of a filter name and its value.
        return (2..args.len() - 1)
            .step_by(2)
            .filter(|&i| command::is(args[i], "ID"))
            .map(|i| i + 1)
            .collect();
    }
    Vec::new()
}

/// What a RESP2 subscriber of `__redis__:invalidate` gets when every key is invalidated (what
/// Redis sends on `FLUSHALL`).
pub const RESP2_FLUSH_MESSAGE: &[u8] =
    b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n$-1\r\n";
/// The channel RESP2 clients subscribe to for redirected invalidations.
pub const INVALIDATION_CHANNEL: &[u8] = b"__redis__:invalidate";

#[cfg(test)]
mod tests {
    use super::*;

    fn b(v: &[&str]) -> Vec<Bytes> {
        v.iter().map(|s| Bytes::from(s.to_string())).collect()
    }

    #[test]
    fn the_redirect_value_is_found_past_prefixes_that_look_like_options() {
        assert_eq!(redirect_position(&b(&["ON", "REDIRECT", "7"])), Some(2));
        assert_eq!(
            redirect_position(&b(&["on", "BCAST", "PREFIX", "redirect", "redirect", "9"])),
            Some(5)
        );
        assert_eq!(redirect_position(&b(&["ON", "PREFIX", "REDIRECT"])), None);
        assert_eq!(redirect_position(&b(&["ON", "REDIRECT"])), None);
        assert_eq!(
            redirect_target(&b(&["ON", "OPTIN", "redirect", "12"])),
            Some(12)
        );
        assert_eq!(redirect_target(&b(&["ON", "REDIRECT", "x"])), None);
    }

    #[test]
    fn only_the_redirect_value_is_rewritten() {
        let args = b(&["ON", "PREFIX", "7", "REDIRECT", "7", "NOLOOP"]);
        assert_eq!(
            with_redirect(&args, 42),
            b(&["ON", "PREFIX", "7", "REDIRECT", "42", "NOLOOP"])
        );
        assert_eq!(with_redirect(&b(&["ON"]), 42), b(&["ON"]));
    }

    #[test]
    fn ids_are_found_in_unblock_and_kill_filters() {
        let unblock: Vec<&[u8]> = vec![b"CLIENT", b"unblock", b"5", b"ERROR"];
        assert_eq!(client_id_arguments(&unblock), vec![2]);
        let kill: Vec<&[u8]> = vec![b"CLIENT", b"KILL", b"USER", b"id", b"ID", b"5"];
        assert_eq!(client_id_arguments(&kill), vec![5]);
        let old_form: Vec<&[u8]> = vec![b"CLIENT", b"KILL", b"127.0.0.1:5000"];
        assert!(client_id_arguments(&old_form).is_empty());
    }

    #[test]
    fn a_moved_session_is_found_by_its_first_id() {
        let generations = Arc::new(Generations::new(crate::credentials::Generation::new(
            1,
            crate::credentials::Endpoint {
                host: "127.0.0.1".into(),
                port: 6379,
                tls: None,
            },
            crate::credentials::Credential {
                username: None,
                password: None,
            },
        )));
        let links = ClientLinks::new(generations.clone());
        let link = links.register(10).expect("free id");
        assert!(links.register(10).is_none(), "a public id is held once");
        assert_eq!(
            links.translate(b"10"),
            None,
            "unmoved: the id is right as it is"
        );
        let before = generations.changes();
        links.moved(&link, 20);
        assert_eq!(
            generations.changes(),
            before,
            "nobody redirects here: nobody is woken"
        );
        let tracker = Redirect::new(link.clone(), 20);
        links.moved(&link, 25);
        assert!(
            generations.changes() > before,
            "a tracker's target moved: signalled"
        );
        drop(tracker);
        assert_eq!(link.trackers.load(Ordering::Acquire), 0);
        assert_eq!(links.translate(b"10"), Some(25));
        assert_eq!(links.translate(b"11"), None, "not ours: passed through");
        links.request_flush(&link);
        assert!(link.take_flush_request());
        assert!(!link.take_flush_request(), "taken once");
        links.unregister(&link);
        assert_eq!(links.translate(b"10"), None);
    }
}
