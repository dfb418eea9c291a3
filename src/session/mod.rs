//! One session per client connection: the client's stream, the upstream connection it uses, and
//! everything needed to keep the two in step.
//!
//! Life of a session:
//! 1. **accept** — the server hands over the client stream (TLS already terminated).
//! 2. **client auth** — the proxy answers AUTH (and the AUTH inside HELLO) itself.
//! 3. **upstream checkout** — at the first command that must reach Redis, a warm, authenticated
//!    connection is taken from the pool.
//! 4. **forward** — the hot path: request bytes go up and reply bytes come down exactly as they
//!    arrived; the scanners only find frame boundaries. A few commands are tracked (SELECT, HELLO,
//!    CLIENT SETNAME, MULTI, subscriptions, ...) so the session knows its state.
//! 5. **reconnect** — if the upstream connection is lost, outstanding commands get an error, and
//!    the session continues on a fresh connection with its state replayed.
//! 6. **close** — a connection left in the default state goes back to the pool.
//!
//! Everything runs in one task, and I/O is polled by hand ([`Session::poll_io`]): writes in both
//! directions make progress while reads are waited for, with no locks and no extra copies of
//! the stream halves.

pub mod client_auth;
mod drain;
mod hello;
pub mod links;
pub mod registry;
pub mod replies;
pub mod state;

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWrite;

use crate::credentials::{Generation, Generations};
use crate::metrics::{ClientErrorReason, Metrics, SessionTraffic};
use crate::net::{Peer, Stream};
use crate::read_buffers::release_if_empty;
use crate::resp::command::{self, Head, Kind, Peek};
use crate::resp::reply::{self, ExecOutcomes, PushKind, SubClass, SubKind};
use crate::resp::scanner::{Direction, ScanLimits, Scanner};
use crate::upstream::connector::UpstreamConn;
use crate::upstream::pool::{Pool, PoolError};
use crate::upstream::server_facts::KnownServer;
use client_auth::ClientAuth;
use hello::{Hello, HelloOption};
use replies::{Expect, ReplyQueue};
use state::{Action, ConnState, ExecFollower};

/// Output waiting for a slow peer beyond which the session stops reading from the other side.
const HIGH_WATER: usize = 256 * 1024;
/// How recently a subscriber's upstream reads must have been held back for the connection's
/// loss to count as Redis closing a client that could not keep up (see `on_upstream_lost`).
const SLOW_CONSUMER_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Events a session handles in a row before it lets the other tasks run. Plain TCP reads and
/// writes skip tokio's task budget (see `Stream::poll_read_into`), so a client that never stops
/// sending must not keep the thread to itself.
const EVENTS_PER_TURN: u32 = 16;

/// How long a session that waits for pushes (subscriptions, MONITOR, tracking) keeps trying to
/// restore itself on a fresh upstream connection before it gives up and closes.
const RESTORE_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);
/// Bytes a reply must show before the session can tell a MONITOR line from an answer.
const MONITOR_PREFIX: usize = 40;

const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
/// Redis 7.2 and later's refusal of an unauthenticated HELLO without AUTH.
const NOAUTH_HELLO: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";
/// The same refusal as Redis 7.0 and 7.1 word it.
const NOAUTH_HELLO_7_0: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";
const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
const AUTH_ARITY: &[u8] = b"-ERR wrong number of arguments for 'auth' command\r\n";
const SYNTAX_ERROR: &[u8] = b"-ERR syntax error\r\n";
/// An argument-less AUTH: Redis refuses it for its argument count before anything else, and
/// inside MULTI that refusal aborts the transaction (see `refuse_in_multi`).
const AUTH_WITHOUT_ARGUMENTS: &[u8] = b"*1\r\n$4\r\nAUTH\r\n";
/// Queued in the place of an AUTH inside MULTI: it answers +OK in EXEC and changes nothing
/// there (EXEC has checked the watched keys before it runs the commands).
const UNWATCH: &[u8] = b"*1\r\n$7\r\nUNWATCH\r\n";
const UPSTREAM_LOST: &[u8] = b"-ERR rotaproxy: upstream connection lost before the reply; the command may or may not have run\r\n";
/// Redis's refusal (7.0 and later, word for word) of `command` (its lower-case full name) on a
/// subscribed RESP2 connection.
fn refused_while_subscribed(command: &str) -> Bytes {
    format!(
        "-ERR Can't execute '{command}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"
    )
    .into()
}

/// A RESP3 push telling a client-side cache to drop everything (null = all keys).
const INVALIDATE_ALL: &[u8] = b">2\r\n$10\r\ninvalidate\r\n_\r\n";

/// What every session shares.
pub struct SessionContext {
    pub pool: Pool,
    /// The generation sessions must be on; a new one makes them move at their next safe point.
    pub generations: Arc<Generations>,
    /// Longest a busy session stops reading its client to create a safe point.
    pub max_pause: std::time::Duration,
    /// Set when the proxy is shutting down: sessions finish what they owe, then close.
    pub shutdown: Arc<tokio::sync::Notify>,
    pub shutting_down: std::sync::atomic::AtomicBool,
    pub client_auth: Arc<ClientAuth>,
    /// Sessions' public client ids, for tracking redirects and ids given as arguments.
    pub links: links::ClientLinks,
    pub request_limits: ScanLimits,
    /// Most bytes of one command the proxy holds while it must read the command whole.
    pub max_buffered: usize,
    pub metrics: Metrics,
    /// The server's command table and version, once read (only when clients must
    /// authenticate), and kept up to date: how the proxy tells an unauthenticated client of an
    /// unknown command or a wrong argument count before asking it to authenticate, as Redis
    /// does, in the words of the server's version.
    pub server: Arc<KnownServer>,
    /// Every open session, for `GET /v1/clients`.
    pub clients: Arc<registry::ClientRegistry>,
}

impl SessionContext {
    /// Changes whenever a session must look at its signals (a generation change, a drain
    /// deadline, a client link event, shutdown); read before polling them, so a change made
    /// meanwhile is not missed.
    fn signal_epoch(&self) -> u64 {
        let shutting_down = self
            .shutting_down
            .load(std::sync::atomic::Ordering::Acquire);
        (self.generations.changes() << 1) | u64::from(shutting_down)
    }

    /// Tells every session to stop reading requests and close once its replies are delivered.
    pub fn begin_shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::Release);
        self.shutdown.notify_waiters();
    }
}

/// How the request now being read is handled.
#[derive(Debug)]
enum RequestMode {
    /// Between requests.
    Start,
    /// Forwarded as it arrives (ordinary commands); the kind decides the accounting at its end.
    Stream(Kind),
    /// Held until complete, then handled: the proxy needs its arguments. `inline` for an inline
    /// command, whose kind is known only once it is split.
    Buffer { kind: Kind, inline: bool },
    /// Read and discarded; answered with the reply at its end (None: no reply, as for `*0`).
    Discard(Option<Bytes>),
}

/// How the reply now being read is handled.
#[derive(Debug, Clone, Copy)]
struct ReplyFrame {
    first: u8,
    /// Relayed to the client (false: swallowed).
    relay: bool,
    /// Answers a request (false: a message, invalidation or monitor line nobody asked for).
    counts: bool,
    /// A (un)subscribe confirmation: held whole to read the subscription count it carries.
    confirmation: Option<SubKind>,
    /// `*-1`: a null array (an aborted EXEC under RESP2).
    null_array: bool,
}

struct Upstream {
    conn: UpstreamConn,
    out: BytesMut,
    input: BytesMut,
    needs_flush: bool,
}

enum Event {
    /// A new generation was published (or a drain deadline set): time to move. Also the wake-up
    /// for client link events (`links`).
    GenerationChanged,
    /// The pause that creates a safe point, or the wait for a drain deadline, is over.
    MoveTimer,
    /// The connection left behind by a move (kept for pushes until its replacement is
    /// subscribed) sent something, or closed (0).
    OldUpstreamRead(usize),
    /// Bytes read from the client; 0 means it closed.
    ClientRead(usize),
    /// Bytes came from the client while the connection the session just moved to, with only
    /// its replay answered so far, has already been closed by the server (see
    /// `moved_onto_a_closed_connection`). The bytes wait in the input.
    ClientReadAfterUpstreamClosed,
    ClientFailed(io::Error),
    /// Bytes read from the upstream; 0 means it closed. `poll_io` takes the bytes itself (see
    /// `InputHandled`): only 0 reaches `run`.
    UpstreamRead(usize),
    UpstreamFailed(io::Error),
    /// The upstream sent something that is not RESP.
    UpstreamInvalid(String),
    /// `poll_io` took the input itself; `run` has only its after-event work to do.
    InputHandled,
    /// The session has handled `EVENTS_PER_TURN` events in a row: it yields to the others.
    TurnEnded,
    /// The session is closing and everything owed to the client has been delivered.
    Finished,
}

/// A client's session.
///
/// The fields are laid out in the order written (`repr(C)`), those read on every pass of the
/// event loop first. Between two passes of one session the kernel and the other sessions run,
/// so the session's memory is mostly out of the nearest cache when it wakes; each cache line
/// it touches then costs a miss. With the compiler's own order the hot fields were spread over
/// about twenty of the struct's 33 lines. Kept together (and the rarely present old upstream
/// connection boxed), callgrind's cache model counts 37.6 first-level misses per request at
/// GET -c 50 -P 1 instead of 43.1 (the floor forwarder: 4.9), and side by side the CPU per
/// request fell 0.3-0.9%.
#[repr(C)]
pub struct Session {
    // ---- Read on every pass of the event loop.
    ctx: Arc<SessionContext>,
    /// This session's commands and scanned bytes (see `metrics::Traffic`).
    traffic: SessionTraffic,
    client: Stream,
    client_in: BytesMut,
    client_out: BytesMut,
    upstream: Option<Upstream>,
    request_scanner: Scanner,
    reply_scanner: Scanner,
    replies: ReplyQueue,
    /// Bytes at the front of `client_in` scanned and waiting to be forwarded upstream.
    forward_len: usize,
    /// Bytes of the request being held (`RequestMode::Buffer`) scanned so far.
    held_len: usize,
    /// Bytes at the front of the upstream input scanned and waiting to be relayed.
    relay_len: usize,
    /// Bytes of a confirmation being held whole scanned so far.
    held_reply_len: usize,
    /// Commands forwarded since the metric was last updated.
    commands_forwarded: u64,
    /// `SessionContext::signal_epoch` and the task's waker when the two futures above were last
    /// polled. While neither changed, polling them again would only take their locks (measurable
    /// per request): they are registered with this waker and nothing was signalled since.
    signals_polled: Option<(u64, std::task::Waker)>,
    /// Ends a pause, or wakes the session at the drain deadline.
    move_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A blocking command to send again, with its remaining timeout, once the session moved.
    reissue: Option<Vec<u8>>,
    /// The connection a subscribed session moved away from, kept until the new one is
    /// subscribed so no message published meanwhile is lost.
    old_upstream: Option<Box<drain::OldUpstream>>,
    request_mode: RequestMode,
    reply_frame: Option<ReplyFrame>,
    /// Events handled since the session last waited or yielded (see `EVENTS_PER_TURN`).
    events_this_turn: u32,
    client_needs_flush: bool,
    authenticated: bool,
    /// The connection holding the open MULTI was lost: queued commands are acknowledged and the
    /// EXEC answers nil.
    multi_lost: bool,
    /// `CLIENT REPLY OFF` is in force. The server is never told (the proxy needs every reply to
    /// keep count): the proxy drops what the client asked not to get.
    reply_off: bool,
    /// `CLIENT REPLY SKIP`: the next command's reply is dropped.
    skip_next_reply: bool,
    /// Requests wait until a reply arrives: after RESET (the proxy re-authenticates first), after
    /// a HELLO that names a protocol, and after a RESP2 EXEC that (un)subscribes or runs a HELLO
    /// (the reply tells which protocol is in force and whether the connection is subscribed,
    /// which changes how Redis takes what follows).
    barrier: bool,
    /// Input waited at a barrier and may be processed now.
    resume_input: bool,
    /// No more client input is read; the session ends once every reply is delivered.
    closing: bool,
    /// Which side `poll_io` reads first: the one that did not give the last bytes read, so
    /// neither side starves the other when both are busy. It is also the side that is usually
    /// ready next (a batch of requests, then their replies), so one read attempt seldom goes
    /// to a side with nothing to give.
    upstream_first: bool,
    /// Client input is paused so replies drain and the session reaches a safe point to move.
    paused_for_move: bool,
    /// What keeps the session from moving to a newer generation, as `/v1/clients` shows it.
    waiting_to_move: Option<&'static str>,
    /// CLIENT UNBLOCK was sent for `blocked`: its nil answer is swallowed and it is re-issued.
    unblocking: bool,
    /// Link work is waiting (a re-point or a flush the session could not do at once).
    links_pending: bool,
    in_multi: bool,
    watch_armed: bool,
    state: ConnState,
    // ---- Read when a command or reply needs it.
    peer: Peer,
    /// The client auth entry the client logged in with (counted there while this lives).
    login: Option<client_auth::Login>,
    /// State changes of commands queued in the open MULTI, applied when EXEC succeeds.
    multi_actions: Vec<(usize, Action)>,
    /// `replies.asked()` right after the open MULTI was sent: positions in the transaction
    /// count from there.
    multi_base: u64,
    /// Follows the EXEC reply now passing, when its transaction changes session state.
    exec_outcomes: Option<ExecOutcomes>,
    /// What the frames after EXEC's array tell about the commands whose replies landed there.
    exec_follower: Option<ExecFollower>,
    /// The connection holding the WATCH was lost: the next EXEC must answer nil, as if a watched
    /// key had changed — never a silent success.
    watch_lost: bool,
    /// When the session last stopped reading its upstream connection because the client was
    /// behind (`HIGH_WATER`). Meanwhile Redis holds what it cannot send in the connection's
    /// output buffer, and closes the connection when that passes its
    /// `client-output-buffer-limit`; the session sees the close only once the client has
    /// taken what was read before it, holding back again and again on the way.
    upstream_held_back_at: Option<tokio::time::Instant>,
    /// Completes when a new generation is published.
    generation_changed: Pin<Box<tokio::sync::futures::OwnedNotified>>,
    /// Completes when the proxy begins to shut down.
    shutdown: Pin<Box<tokio::sync::futures::OwnedNotified>>,
    /// The generation an in-place AUTH is moving the connection to.
    reauth_target: Option<Arc<Generation>>,
    /// The server refused an in-place AUTH: move by swapping connections instead.
    reauth_refused: bool,
    /// The blocking command in flight, kept so a drain can move it instead of waiting.
    blocked: Option<drain::BlockedCommand>,
    /// This session's public client id, from its first upstream connection (see `links`).
    own_link: Option<Arc<links::ClientLink>>,
    /// Whether the session's first upstream connection was installed (and so `own_link` set,
    /// when the server told the id and it was free).
    public_id_decided: bool,
    /// The session of this proxy that this session's tracking redirects invalidations to.
    redirect: Option<links::Redirect>,
    /// The client must be told to flush its cache, as soon as a push can go in.
    flush_pending: bool,
    /// Another client ran `CLIENT KILL ID` with this session's public id: it ends now.
    killed: bool,
    /// This session in `GET /v1/clients`, while it lives.
    registration: registry::Registration,
}

impl Session {
    pub fn new(ctx: Arc<SessionContext>, client: Stream, peer: Peer) -> Self {
        let authenticated = !ctx.client_auth.required();
        let mut request_scanner = Scanner::new(Direction::Request, ctx.request_limits);
        request_scanner.set_unauthenticated(!authenticated);
        let generation_changed = Box::pin(ctx.generations.changed());
        let shutdown = Box::pin(ctx.shutdown.clone().notified_owned());
        // A session accepted just as shutdown began finishes at once.
        let closing = ctx.shutting_down.load(std::sync::atomic::Ordering::Acquire);
        let registration = ctx.clients.register(peer);
        Self {
            traffic: ctx.metrics.traffic.session(),
            ctx,
            peer,
            client,
            client_in: BytesMut::new(),
            client_out: BytesMut::new(),
            client_needs_flush: false,
            request_scanner,
            request_mode: RequestMode::Start,
            forward_len: 0,
            held_len: 0,
            upstream: None,
            reply_scanner: new_reply_scanner(),
            reply_frame: None,
            relay_len: 0,
            held_reply_len: 0,
            replies: ReplyQueue::default(),
            state: ConnState::new(),
            authenticated,
            login: None,
            in_multi: false,
            multi_actions: Vec::new(),
            multi_base: 0,
            exec_outcomes: None,
            exec_follower: None,
            watch_armed: false,
            watch_lost: false,
            multi_lost: false,
            barrier: false,
            resume_input: false,
            closing,
            upstream_first: false,
            upstream_held_back_at: None,
            events_this_turn: 0,
            commands_forwarded: 0,
            reply_off: false,
            skip_next_reply: false,
            generation_changed,
            shutdown,
            signals_polled: None,
            paused_for_move: false,
            waiting_to_move: None,
            move_timer: None,
            reauth_target: None,
            reauth_refused: false,
            old_upstream: None,
            blocked: None,
            unblocking: false,
            reissue: None,
            own_link: None,
            public_id_decided: false,
            redirect: None,
            links_pending: false,
            flush_pending: false,
            killed: false,
            registration,
        }
    }

    /// Publishes what the session holds now for `GET /v1/clients` (after a change of state,
    /// login or upstream connection; never per ordinary command).
    fn publish_view(&self) {
        let state = &self.state;
        self.registration.publish(registry::ClientView {
            id: self.own_link.as_ref().map(|link| link.public_id()),
            authenticated: self.authenticated,
            user: self
                .login
                .as_ref()
                .and_then(|login| login.username())
                .map(str::to_string),
            db: state.db,
            name: state
                .name
                .as_ref()
                .map(|name| String::from_utf8_lossy(name).into_owned()),
            protocol: state.protocol,
            subscriptions: state.channels.len() + state.patterns.len() + state.shard_channels.len(),
            monitor: state.monitor,
            tracking: state.tracking.is_some(),
            generation: self.upstream.as_ref().map(|up| up.conn.generation.id),
            waiting_to_move: self.waiting_to_move,
        });
    }

    /// A session may change its upstream connection only here: nothing owed, no transaction
    /// open or armed, no command half-read.
    pub fn at_safe_point(&self) -> bool {
        self.replies.nothing_owed()
            && !self.in_multi
            && !self.watch_armed
            && matches!(self.request_mode, RequestMode::Start)
            && self.forward_len == 0
            && self.reply_frame.is_none()
    }

    /// Serves the client until it leaves.
    ///
    /// The session is boxed: an `async fn` keeps its arguments in its future beside the locals
    /// they move into, so a session passed by value took its room twice in every client's task.
    pub async fn run(mut self: Box<Self>) {
        let metrics = self.ctx.metrics.clone();
        metrics.client_connections.increment(1.0);
        self.publish_view();
        loop {
            let event = poll_fn(|cx| self.poll_io(cx)).await;
            match event {
                Event::ClientRead(0) | Event::Finished => break,
                // A TLS record that does not decrypt, or a fatal alert, is the client's fault
                // and worth a line; resets and broken pipes are clients going away.
                Event::ClientFailed(err) if err.kind() == io::ErrorKind::InvalidData => {
                    tracing::info!(peer = %self.peer, error = %err, "closing client after a TLS error");
                    break;
                }
                Event::ClientFailed(err) => {
                    tracing::debug!(peer = %self.peer, error = %err, "client connection failed");
                    break;
                }
                Event::ClientRead(_) => self.on_client_input().await,
                Event::UpstreamRead(0) => {
                    self.on_upstream_lost("the server closed the connection")
                        .await
                }
                Event::ClientReadAfterUpstreamClosed => {
                    self.on_upstream_lost("the server closed the connection")
                        .await;
                    self.resume_input = true;
                }
                Event::UpstreamFailed(err) => self.on_upstream_lost(&err.to_string()).await,
                Event::UpstreamInvalid(fault) => self.on_upstream_lost(&fault).await,
                Event::UpstreamRead(_) | Event::InputHandled => {}
                // `yield_now` (unlike a plain self-wake) lets the runtime look for I/O events
                // before the session runs again, so the others are served within a turn.
                Event::TurnEnded => tokio::task::yield_now().await,
                Event::GenerationChanged => self.on_links_changed(),
                Event::MoveTimer => self.on_move_timer(),
                Event::OldUpstreamRead(n) => self.on_old_upstream_input(n),
            }
            if self.move_wanted() {
                self.maybe_move().await;
            }
            if self.resume_input {
                self.resume_input = false;
                self.on_client_input().await;
            }
            if self.links_pending {
                self.do_link_work();
                if self.killed {
                    tracing::info!(peer = %self.peer, "client disconnected by CLIENT KILL");
                    break;
                }
            }
        }
        self.finish();
        metrics.client_connections.decrement(1.0);
    }

    // ---- I/O ----------------------------------------------------------------------------

    /// Waits for the next thing `run` must handle. Ordinary traffic never gets that far: a
    /// batch of ordinary requests is forwarded and a batch of replies relayed right here, and
    /// the loop goes on to write them and read again, as a plain forwarder would.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        loop {
            if self.events_this_turn == EVENTS_PER_TURN {
                self.events_this_turn = 0;
                return Poll::Ready(Event::TurnEnded);
            }
            let Poll::Ready(event) = self.poll_event(cx) else {
                self.events_this_turn = 0;
                self.release_empty_buffers();
                return Poll::Pending;
            };
            self.events_this_turn += 1;
            match event {
                Event::ClientRead(n) if n > 0 => {
                    if self.moved_onto_a_closed_connection() {
                        return Poll::Ready(Event::ClientReadAfterUpstreamClosed);
                    }
                    if !self.take_ordinary_requests() {
                        // Something else is in there: `on_client_input` goes on from here.
                        return Poll::Ready(event);
                    }
                }
                Event::UpstreamRead(n) if n > 0 => {
                    if let Err(fault) = self.on_upstream_input() {
                        return Poll::Ready(Event::UpstreamInvalid(fault));
                    }
                }
                _ => return Poll::Ready(event),
            }
            // What `run` does after every event, were there anything to do.
            if self.resume_input || self.links_pending || self.move_wanted() {
                return Poll::Ready(Event::InputHandled);
            }
        }
    }

    /// Hands back the read buffers the session emptied, now that it waits (see
    /// `crate::read_buffers`).
    #[inline(always)]
    fn release_empty_buffers(&mut self) {
        release_if_empty(&mut self.client_in);
        if let Some(up) = &mut self.upstream {
            release_if_empty(&mut up.input);
        }
    }

    /// Writes what is owed in both directions, then reports the first thing that happened.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        // Replies: what the proxy queued, then relayed bytes straight from the upstream's input.
        if let Err(e) = poll_write_queued_then_passed(
            &mut self.client,
            &mut self.client_out,
            self.upstream.as_mut().map(|up| &mut up.input),
            &mut self.relay_len,
            &mut self.client_needs_flush,
            cx,
        ) {
            return Poll::Ready(Event::ClientFailed(e));
        }
        // Requests: what the proxy queued, then forwarded bytes straight from the client's input.
        if let Some(up) = &mut self.upstream
            && let Err(e) = poll_write_queued_then_passed(
                &mut up.conn.stream,
                &mut up.out,
                Some(&mut self.client_in),
                &mut self.forward_len,
                &mut up.needs_flush,
                cx,
            )
        {
            return Poll::Ready(Event::UpstreamFailed(e));
        }
        if self.closing
            && self.replies.is_empty()
            && self.client_out.is_empty()
            && self.relay_len == 0
            && !self.client_needs_flush
        {
            return Poll::Ready(Event::Finished);
        }
        if let Poll::Ready(event) = self.poll_signals(cx) {
            return Poll::Ready(event);
        }
        if let Some(timer) = &mut self.move_timer
            && timer.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Event::MoveTimer);
        }
        if let Poll::Ready(n) = self.poll_read_old_upstream(cx) {
            return Poll::Ready(Event::OldUpstreamRead(n));
        }
        // Alternate for fairness while replies flow. With none owed to the client, anything
        // the upstream sent is a push, an answer to the proxy's own commands, or the end of
        // the connection: looking there first lets a session notice a connection the server
        // closed (a kill, a restart) before it forwards the client's next command into it, so
        // that command goes to a new connection instead of failing as "lost before the reply".
        // That holds for a connection just taken over too, while its replay is answered: a
        // kill of many connections closes them one by one, and the session may have moved to
        // one the same kill was about to close.
        let event = if self.upstream_first || self.replies.owes_the_client_nothing() {
            match self.poll_read_upstream(cx) {
                Poll::Pending => self.poll_read_client(cx),
                ready => ready,
            }
        } else {
            match self.poll_read_client(cx) {
                Poll::Pending => self.poll_read_upstream(cx),
                ready => ready,
            }
        };
        match event {
            Poll::Ready(Event::ClientRead(_)) => self.upstream_first = true,
            Poll::Ready(Event::UpstreamRead(_)) => self.upstream_first = false,
            _ => {}
        }
        event
    }

    /// Whether the session's connection, taken over a moment ago (nothing owed yet but the
    /// answers to its replay), is one the server has closed since. A kill of many connections
    /// closes them one by one: the session that lost its own may have moved to one the same
    /// kill closes a moment later, and tokio may report the client's next command before that
    /// close. Asked only in that state (never while the client is owed replies or the queue
    /// is empty), so the hot path makes no extra system call.
    fn moved_onto_a_closed_connection(&self) -> bool {
        !self.replies.is_empty()
            && self.replies.owes_the_client_nothing()
            && self
                .upstream
                .as_ref()
                .is_some_and(|u| u.conn.stream.peer_has_closed())
    }

    /// Shutdown and generation changes. See `signals_polled`.
    fn poll_signals(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let epoch = self.ctx.signal_epoch();
        if let Some((seen, waker)) = &self.signals_polled
            && *seen == epoch
            && waker.will_wake(cx.waker())
        {
            return Poll::Pending;
        }
        self.signals_polled = None;
        if !self.closing && self.shutdown.as_mut().poll(cx).is_ready() {
            // Stop reading requests; `Finished` follows once every owed reply is delivered.
            self.closing = true;
            return Poll::Ready(Event::GenerationChanged);
        }
        if self.generation_changed.as_mut().poll(cx).is_ready() {
            self.generation_changed = Box::pin(self.ctx.generations.changed());
            return Poll::Ready(Event::GenerationChanged);
        }
        self.signals_polled = Some((epoch, cx.waker().clone()));
        Poll::Pending
    }

    fn poll_read_client(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let upstream_full = self
            .upstream
            .as_ref()
            .is_some_and(|u| u.out.len() + self.forward_len >= HIGH_WATER);
        if self.closing || self.barrier || self.paused_for_move || upstream_full {
            return Poll::Pending;
        }
        match self.client.poll_read_into(cx, &mut self.client_in) {
            Poll::Ready(Ok(n)) => Poll::Ready(Event::ClientRead(n)),
            Poll::Ready(Err(e)) => Poll::Ready(Event::ClientFailed(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_read_upstream(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if self.client_out.len() + self.relay_len >= HIGH_WATER {
            self.upstream_held_back_at = Some(tokio::time::Instant::now());
            return Poll::Pending;
        }
        let Some(up) = &mut self.upstream else {
            return Poll::Pending;
        };
        match up.conn.stream.poll_read_into(cx, &mut up.input) {
            Poll::Ready(Ok(n)) => Poll::Ready(Event::UpstreamRead(n)),
            Poll::Ready(Err(e)) => Poll::Ready(Event::UpstreamFailed(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    // ---- requests -----------------------------------------------------------------------

    /// Scans what the client sent: forwards ordinary commands as they arrive, holds and handles
    /// the ones the proxy must understand.
    async fn on_client_input(&mut self) {
        let scanned_before = self.request_scanner.bytes_scanned();
        loop {
            if self.barrier || self.closing {
                break;
            }
            let pos = self.forward_len + self.held_len;
            if pos >= self.client_in.len() {
                break;
            }
            if matches!(self.request_mode, RequestMode::Start) {
                if self.stream_ordinary_requests() {
                    continue;
                }
                if !self.start_request(pos).await {
                    break;
                }
            }
            let pos = self.forward_len + self.held_len;
            let progress = match self.request_scanner.scan(&self.client_in[pos..]) {
                Ok(p) => p,
                Err(e) => {
                    self.protocol_error(&e.to_string());
                    break;
                }
            };
            match self.request_mode {
                RequestMode::Stream(_) => self.forward_len += progress.consumed,
                RequestMode::Buffer { .. } => self.held_len += progress.consumed,
                RequestMode::Discard(_) => self.client_in.advance(progress.consumed),
                RequestMode::Start => unreachable!("a mode is chosen before scanning"),
            }
            if !progress.complete {
                if self.held_len > self.ctx.max_buffered {
                    self.ctx.metrics.client_error(ClientErrorReason::Limit);
                    self.protocol_error("too big request (limits.max_buffered_bytes)");
                }
                break;
            }
            match std::mem::replace(&mut self.request_mode, RequestMode::Start) {
                RequestMode::Stream(kind) => self.on_streamed_request(kind),
                RequestMode::Buffer { kind, inline } => {
                    let frame = self.client_in.split_to(self.held_len).freeze();
                    self.held_len = 0;
                    self.on_held_request(kind, inline, frame).await;
                }
                RequestMode::Discard(reply) => {
                    if let Some(reply) = reply {
                        self.reply_local(reply);
                    }
                }
                RequestMode::Start => unreachable!(),
            }
        }
        // Forwarded bytes stay where they are: `poll_io` writes them from `client_in`.
        self.count_requests_scanned(scanned_before);
    }

    /// New client input, as `poll_io` sees it: forwards the ordinary commands at its front.
    /// True when that was all of it (and nothing else is under way), so `on_client_input` has
    /// nothing to do.
    fn take_ordinary_requests(&mut self) -> bool {
        if self.barrier
            || self.closing
            || !matches!(self.request_mode, RequestMode::Start)
            || self.held_len != 0
        {
            return false;
        }
        let scanned_before = self.request_scanner.bytes_scanned();
        let took = self.stream_ordinary_requests();
        if took {
            self.count_requests_scanned(scanned_before);
        }
        took && self.forward_len == self.client_in.len()
    }

    /// Updates the metrics after a batch of client input: one update per batch, not per command.
    fn count_requests_scanned(&mut self, scanned_before: u64) {
        let scanned = self.request_scanner.bytes_scanned() - scanned_before;
        self.traffic.request_bytes(scanned);
        self.traffic
            .commands(std::mem::take(&mut self.commands_forwarded));
    }

    /// The fast lane: forwards the run of whole, ordinary commands at the front of the unscanned
    /// input in one step. False when it took nothing (the general path decides what comes next).
    fn stream_ordinary_requests(&mut self) -> bool {
        if !self.authenticated
            || self.multi_lost
            || self.upstream.is_none()
            || self.reply_off
            || self.skip_next_reply
        {
            return false;
        }
        debug_assert_eq!(self.held_len, 0);
        let start = self.forward_len;
        let (taken, count) = self
            .request_scanner
            .peek_request_run(&self.client_in[start..], |name| {
                command::classify(name) == Kind::Other
            });
        if count == 0 {
            return false;
        }
        self.request_scanner.skip_frames(taken);
        self.forward_len = start + taken;
        self.commands_forwarded += count;
        self.replies.relay(count);
        true
    }

    /// Decides how the request starting at `pos` is handled. False when more bytes are needed.
    async fn start_request(&mut self, pos: usize) -> bool {
        let buf = &self.client_in[pos..];
        let (kind, argc) = if buf[0] == b'*' {
            match command::peek_head(buf) {
                Peek::Incomplete => return false,
                // The scanner names the exact protocol error; nothing needs an upstream for it.
                Peek::Malformed => {
                    self.set_mode_held_or_discarded(RequestMode::Discard(None));
                    return true;
                }
                Peek::Ready(Head::Empty) => {
                    self.set_mode_held_or_discarded(RequestMode::Discard(None));
                    return true;
                }
                Peek::Ready(Head::Command { argc, name }) => (
                    name.map_or(Kind::Other, |r| command::classify(&buf[r])),
                    argc,
                ),
            }
        } else {
            self.set_mode_held_or_discarded(RequestMode::Buffer {
                kind: Kind::Other,
                inline: true,
            });
            return true;
        };
        // Redis refuses long commands from unauthenticated clients outright, AUTH among them,
        // as it reads the count (the scanner refuses long arguments the same way).
        if !self.authenticated && argc > 10 {
            self.protocol_error("unauthenticated multibulk length");
            return false;
        }
        if kind == Kind::HttpRequest {
            self.close_on_http_request();
            return false;
        }
        if self.authenticated && self.multi_lost && matches!(kind, Kind::Other | Kind::Blocking) {
            self.set_mode_held_or_discarded(RequestMode::Discard(Some(Bytes::from_static(
                b"+QUEUED\r\n",
            ))));
            return true;
        }
        // Held whole: the commands the proxy reads, blocking ones (short; a drain may need to
        // send them again), and every command of a client that has not authenticated (judged by
        // `answer_unauthenticated`; at most 10 arguments of at most 16 KiB).
        if !self.authenticated || kind != Kind::Other {
            self.set_mode_held_or_discarded(RequestMode::Buffer {
                kind,
                inline: false,
            });
            return true;
        }
        // The common case, connected already, skips the async call (measurable per command).
        if self.upstream.is_some() {
            self.request_mode = RequestMode::Stream(kind);
            return true;
        }
        match self.upstream_for_command().await {
            Ok(()) => self.request_mode = RequestMode::Stream(kind),
            Err(reply) => self.set_mode_held_or_discarded(RequestMode::Discard(Some(reply))),
        }
        true
    }

    /// Held and discarded requests start at the front of the buffer: what was scanned before them
    /// goes upstream first.
    fn set_mode_held_or_discarded(&mut self, mode: RequestMode) {
        self.flush_forward();
        self.request_mode = mode;
    }

    fn on_streamed_request(&mut self, kind: Kind) {
        self.commands_forwarded += 1;
        let expect = if kind == Kind::Blocking && !self.in_multi {
            Expect::Tracked {
                action: Action::None,
                relay: true,
                blocking: true,
            }
        } else {
            Expect::Relay(1)
        };
        let expect = self.as_client_asked(expect);
        self.replies.push(expect);
    }

    /// Whether the reply to the client's current command is dropped (`CLIENT REPLY OFF|SKIP`).
    /// Called once per command: it uses up a SKIP.
    fn reply_muted(&mut self) -> bool {
        std::mem::take(&mut self.skip_next_reply) || self.reply_off
    }

    /// The expectation for a client command's reply, muted if the client asked for no reply: the
    /// reply is still counted, and dropped.
    fn as_client_asked(&mut self, mut expect: Expect) -> Expect {
        // The proxy's own commands have no reply for the client: a SKIP is not theirs to use.
        let relayed = match &expect {
            Expect::Relay(_) | Expect::Local(_) => true,
            Expect::Tracked { relay, .. }
            | Expect::Confirmations { relay, .. }
            | Expect::ExecTail { relay, .. } => *relay,
        };
        if !relayed || !self.reply_muted() {
            return expect;
        }
        match &mut expect {
            Expect::Relay(_) => {
                return Expect::Tracked {
                    action: Action::None,
                    relay: false,
                    blocking: false,
                };
            }
            Expect::Tracked { relay, .. } | Expect::ExecTail { relay, .. } => *relay = false,
            Expect::Confirmations { muted, .. } => *muted = true,
            Expect::Local(_) => {}
        }
        expect
    }

    async fn on_held_request(&mut self, kind: Kind, inline: bool, frame: Bytes) {
        let owned;
        let args: Vec<&[u8]> = if inline {
            match command::inline_args(&frame) {
                Ok(a) => {
                    owned = a;
                    owned.iter().map(Vec::as_slice).collect()
                }
                Err(e) => {
                    self.protocol_error(&e.to_string());
                    return;
                }
            }
        } else {
            command::multibulk_args(&frame)
        };
        let Some(name) = args.first() else {
            // An empty inline line: Redis ignores it and answers nothing.
            return;
        };
        let kind = if inline {
            command::classify(name)
        } else {
            kind
        };
        if kind == Kind::HttpRequest {
            return self.close_on_http_request();
        }
        if !self.authenticated && !matches!(kind, Kind::Auth | Kind::Hello | Kind::Quit) {
            return self.answer_unauthenticated(kind, &args);
        }
        self.handle_command(kind, &args, &frame).await;
    }

    /// Answers a command (other than AUTH, HELLO and QUIT) from a client that has not
    /// authenticated, in Redis's order: an unknown command or subcommand, or a wrong number
    /// of arguments, as the server's command table has them (once read); then `RESET`, which
    /// Redis runs for anyone (the client stays unauthenticated, and has no state to reset);
    /// then `NOAUTH`. Nothing goes upstream.
    ///
    /// EXEC's refusals take Redis's `EXECABORT` form; `DISCARD` and the rest keep theirs.
    fn answer_unauthenticated(&mut self, kind: Kind, args: &[&[u8]]) {
        let refusal = self
            .ctx
            .server
            .load()
            .as_ref()
            .and_then(|server| server.command_table.as_ref()?.refusal(args));
        let error = match refusal {
            Some(error) => error,
            None if kind == Kind::Reset && kind.argument_count_fits(args.len()) => {
                return self.reply_local(Bytes::from_static(b"+RESET\r\n"));
            }
            None => NOAUTH[1..NOAUTH.len() - 2].to_vec(),
        };
        // Redis words any refusal of EXEC as the end of a transaction.
        let line = if kind == Kind::Exec {
            let reason = error.strip_prefix(b"ERR ").unwrap_or(&error);
            [
                &b"-EXECABORT Transaction discarded because of: "[..],
                reason,
                b"\r\n",
            ]
            .concat()
        } else {
            [&b"-"[..], &error, b"\r\n"].concat()
        };
        self.ctx.metrics.client_error(ClientErrorReason::Auth);
        self.reply_local(line.into());
    }

    /// Handles a command the proxy must understand. `frame` is the request as the client sent it.
    async fn handle_command(&mut self, kind: Kind, args: &[&[u8]], frame: &[u8]) {
        let relay_one = Expect::Relay(1);
        if !kind.argument_count_fits(args.len()) {
            if kind == Kind::Exec {
                // Redis answers a refused EXEC by aborting the transaction, open or not
                // (`-EXECABORT`): the MULTI ends there with what it queued, and the WATCHes
                // go. What follows runs at once, a HELLO or a SUBSCRIBE included.
                self.in_multi = false;
                self.multi_lost = false;
                self.watch_armed = false;
                self.watch_lost = false;
                self.multi_actions.clear();
                return self.forward(frame, relay_one).await;
            }
            // Redis refuses it before anything else, and nothing changes (inside MULTI it is
            // answered at once, and EXEC will abort the transaction).
            return if self.in_multi && !self.multi_lost {
                self.forward_answered_at_once(frame, relay_one).await
            } else {
                self.forward(frame, relay_one).await
            };
        }
        if self.multi_lost {
            // The transaction went with its connection (EXEC will answer nil): nothing of it
            // may run on the next one, where no MULTI is open.
            match kind {
                Kind::Exec | Kind::Discard | Kind::Quit | Kind::Reset => {}
                Kind::Multi => {
                    return self.reply_local(Bytes::from_static(
                        b"-ERR MULTI calls can not be nested\r\n",
                    ));
                }
                Kind::Watch => {
                    return self.reply_local(Bytes::from_static(
                        b"-ERR WATCH inside MULTI is not allowed\r\n",
                    ));
                }
                _ => return self.reply_local(Bytes::from_static(b"+QUEUED\r\n")),
            }
        }
        match kind {
            Kind::Other => self.forward(frame, relay_one).await,
            Kind::Blocking | Kind::MaybeBlocking => {
                let blocks =
                    kind == Kind::Blocking || args.iter().skip(1).any(|a| command::is(a, "BLOCK"));
                if blocks && !self.in_multi {
                    self.blocked = drain::BlockedCommand::new(args);
                    self.forward(
                        frame,
                        Expect::Tracked {
                            action: Action::None,
                            relay: true,
                            blocking: true,
                        },
                    )
                    .await
                } else {
                    self.forward(frame, relay_one).await
                }
            }
            Kind::Auth => self.handle_auth(args, frame).await,
            Kind::Hello => self.handle_hello(args, frame).await,
            Kind::Quit => {
                self.reply_after_pushes(Bytes::from_static(b"+OK\r\n"))
                    .await;
                self.closing = true;
            }
            Kind::Reset => {
                self.in_multi = false;
                self.multi_actions.clear();
                self.watch_armed = false;
                self.watch_lost = false;
                self.multi_lost = false;
                // RESET turns CLIENT REPLY OFF off before it answers (a SKIP before it still
                // silences its answer, as on Redis).
                self.reply_off = false;
                // Nothing more goes upstream until the proxy has re-authenticated after RESET.
                self.barrier = true;
                let expect = self.tracked(Action::Reset);
                self.forward(frame, expect).await;
                if self.upstream.is_some() {
                    self.raise_barrier();
                } else {
                    self.barrier = false;
                }
            }
            Kind::Select => {
                let action = args
                    .get(1)
                    .and_then(|a| command::parse_i64(a))
                    .map_or(Action::None, Action::SelectDb);
                let expect = self.tracked(action);
                self.forward(frame, expect).await
            }
            Kind::Client => self.handle_client(args, frame).await,
            Kind::Multi => {
                // A RESP2 connection with subscriptions refuses MULTI: what follows runs at once.
                let refused = self.state.resp2_subscribe_context();
                let opens = !self.in_multi && !refused;
                if opens {
                    self.in_multi = true;
                    self.multi_actions.clear();
                }
                if opens {
                    self.forward(frame, relay_one).await;
                    self.multi_base = self.replies.asked();
                } else if self.in_multi {
                    // Refused at once ("can not be nested").
                    self.forward_answered_at_once(frame, relay_one).await;
                } else {
                    self.forward(frame, relay_one).await;
                }
            }
            Kind::Exec => self.handle_exec(frame).await,
            Kind::Discard => {
                let was_lost = std::mem::take(&mut self.multi_lost);
                self.in_multi = false;
                self.watch_armed = false;
                self.watch_lost = false;
                self.multi_actions.clear();
                if was_lost {
                    self.reply_local(Bytes::from_static(b"+OK\r\n"));
                } else {
                    self.forward(frame, relay_one).await
                }
            }
            // A RESP2 connection with subscriptions refuses both, as it refuses MULTI: nothing
            // changes. (Judged when the request passes, like MULTI, so that an EXEC or DISCARD
            // pipelined behind keeps its order with them.)
            Kind::Watch | Kind::Unwatch
                if self.in_multi || self.state.resp2_subscribe_context() =>
            {
                if self.in_multi && kind == Kind::Watch {
                    // Refused at once ("inside MULTI is not allowed"); UNWATCH is queued.
                    self.forward_answered_at_once(frame, relay_one).await;
                } else {
                    self.forward(frame, relay_one).await;
                }
            }
            Kind::Watch => {
                self.watch_armed = true;
                self.forward(frame, relay_one).await
            }
            Kind::Unwatch => {
                self.watch_armed = false;
                self.watch_lost = false;
                self.forward(frame, relay_one).await
            }
            Kind::Subscribe | Kind::Psubscribe | Kind::Ssubscribe => {
                let class = sub_class(kind);
                if self.in_multi {
                    let channels = args[1..].iter().map(|c| Bytes::copy_from_slice(c));
                    let expect = self.tracked(Action::Subscribe(class, channels.collect()));
                    return self.forward(frame, expect).await;
                }
                // Connect (and replay) before the set changes, or the replay would subscribe too.
                if let Err(reply) = self.upstream_for_command().await {
                    return self.reply_local(reply);
                }
                let mut added = Vec::new();
                for channel in &args[1..] {
                    let channel = Bytes::copy_from_slice(channel);
                    if self.state.set_of(class).insert(channel.clone()) {
                        added.push((class, channel));
                    }
                }
                // The sets change as the command is sent, before its confirmations.
                self.publish_view();
                let expect = Expect::Confirmations {
                    remaining: (args.len() as u64 - 1).max(1),
                    relay: true,
                    muted: false,
                    added,
                };
                self.forward(frame, expect).await
            }
            Kind::Unsubscribe | Kind::Punsubscribe | Kind::Sunsubscribe => {
                let class = sub_class(kind);
                if self.in_multi {
                    let channels = args[1..].iter().map(|c| Bytes::copy_from_slice(c));
                    let expect = self.tracked(Action::Unsubscribe(class, channels.collect()));
                    return self.forward(frame, expect).await;
                }
                if let Err(reply) = self.upstream_for_command().await {
                    return self.reply_local(reply);
                }
                self.finish_old_upstream();
                let set = self.state.set_of(class);
                let remaining = if args.len() > 1 {
                    for channel in &args[1..] {
                        set.shift_remove(*channel);
                    }
                    args.len() as u64 - 1
                } else {
                    let n = set.len() as u64;
                    set.clear();
                    n.max(1)
                };
                self.publish_view();
                let expect = Expect::Confirmations {
                    remaining,
                    relay: true,
                    muted: false,
                    added: Vec::new(),
                };
                self.forward(frame, expect).await
            }
            Kind::Monitor => {
                let expect = self.tracked(Action::Monitor);
                self.forward(frame, expect).await
            }
            Kind::Readonly | Kind::Readwrite => {
                let expect = self.tracked(Action::Readonly(kind == Kind::Readonly));
                self.forward(frame, expect).await
            }
            // Caught as its head is read; never forwarded.
            Kind::HttpRequest => self.close_on_http_request(),
        }
    }

    /// Forwards a command that Redis answers at once inside MULTI instead of queueing it: it
    /// takes no place in EXEC's array, so the positions of the commands after it count from
    /// one later.
    async fn forward_answered_at_once(&mut self, frame: &[u8], expect: Expect) {
        let asked = self.replies.asked();
        self.forward(frame, expect).await;
        self.multi_base += self.replies.asked() - asked;
    }

    /// An expectation for a command whose success changes the session state. Inside MULTI the
    /// change waits for EXEC.
    fn tracked(&mut self, action: Action) -> Expect {
        if self.in_multi && action != Action::None {
            let position = (self.replies.asked() - self.multi_base) as usize;
            self.multi_actions.push((position, action));
            return Expect::Relay(1);
        }
        Expect::Tracked {
            action,
            relay: true,
            blocking: false,
        }
    }

    /// `AUTH [user] password`, answered by the proxy against its own client auth; the client's
    /// password never goes upstream. What Redis would say first (a wrong argument count; a
    /// subscribed RESP2 connection's refusal) comes first here too.
    async fn handle_auth(&mut self, args: &[&[u8]], frame: &[u8]) {
        if args.len() < 2 {
            if self.in_multi {
                // Redis refuses it at once and aborts the transaction: let it (no secret in it).
                return self.forward_answered_at_once(frame, Expect::Relay(1)).await;
            }
            return self
                .reply_after_pushes(Bytes::from_static(AUTH_ARITY))
                .await;
        }
        if !self.in_multi && self.state.resp2_subscribe_context() {
            return self
                .reply_after_pushes(refused_while_subscribed("auth"))
                .await;
        }
        let outcome = match args {
            [_, pass] => self.check_client_auth(b"default", pass),
            [_, user, pass] => self.check_client_auth(user, pass),
            _ => Err(SYNTAX_ERROR),
        };
        match (self.in_multi, outcome) {
            (false, Ok(login)) => {
                self.log_in(login);
                self.reply_after_pushes(Bytes::from_static(b"+OK\r\n"))
                    .await;
            }
            (false, Err(error)) => self.reply_after_pushes(Bytes::from_static(error)).await,
            // Redis would queue the AUTH and answer +OK for it in EXEC. The client stays
            // counted with the entry it logged in with before (it is already logged in).
            (true, Ok(_)) => self.forward(UNWATCH, Expect::Relay(1)).await,
            (true, Err(error)) => self.refuse_in_multi(Bytes::from_static(error)).await,
        }
    }

    /// Checks a user/password pair against the proxy's client auth; Err is the reply.
    fn check_client_auth(
        &mut self,
        user: &[u8],
        pass: &[u8],
    ) -> Result<client_auth::Login, &'static [u8]> {
        if let Some(login) = self.ctx.client_auth.check(user, pass) {
            return Ok(login);
        }
        self.ctx.metrics.client_error(ClientErrorReason::Auth);
        self.ctx.client_auth.log_refusal(&self.peer, user);
        Err(WRONGPASS)
    }

    /// Refuses, inside MULTI, a command that Redis would queue but the proxy will not send (an
    /// AUTH whose check failed: Redis would report that in EXEC's array). The client gets the
    /// error now, and the transaction is aborted on the server, as after any command refused
    /// while queueing: an argument-less AUTH goes in its place, which Redis refuses for its
    /// argument count (its reply is swallowed), so EXEC answers EXECABORT.
    async fn refuse_in_multi(&mut self, error: Bytes) {
        // Connected first: a failure to connect answers the client itself.
        if let Err(reply) = self.upstream_for_command().await {
            return self.reply_local(reply);
        }
        let swallowed = Expect::Tracked {
            action: Action::None,
            relay: false,
            blocking: false,
        };
        self.forward_answered_at_once(AUTH_WITHOUT_ARGUMENTS, swallowed)
            .await;
        self.reply_local(error);
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]` (see `hello.rs`): the AUTH part is
    /// the proxy's to check; the rest goes upstream so the client sees the real server's reply,
    /// refusals included (they then come after anything Redis wrote before them).
    async fn handle_hello(&mut self, args: &[&[u8]], frame: &[u8]) {
        let hello = Hello::parse(args);
        // Sent as the client wrote it unless something had to be cut out (an AUTH, or what
        // follows a bad option, which may be a password).
        let upstream_args = hello.without_auth(args);
        let upstream_request =
            (upstream_args.len() != args.len()).then(|| command::encode(&upstream_args));
        let request = upstream_request.as_deref().unwrap_or(frame);
        let protocol = hello.protocol.ok().flatten();
        let action = Action::Hello {
            protocol,
            name: hello.name(),
        };
        if self.in_multi {
            // Queued, and run by EXEC, whose array holds whatever Redis makes of it. Only the
            // AUTH is judged now: the proxy cannot queue the client's password.
            for option in &hello.options {
                if let HelloOption::Auth { user, password } = option
                    && let Err(error) = self.check_client_auth(user, password)
                {
                    return self.refuse_in_multi(Bytes::from_static(error)).await;
                }
            }
            let expect = self.tracked(action);
            return self.forward(request, expect).await;
        }
        // A subscribed RESP2 connection refuses it unread; otherwise Redis 7.0 reads it in
        // order: the version, then each option, trying an AUTH when it gets to it.
        let mut refusal = None;
        if !self.state.resp2_subscribe_context() {
            refusal = hello.protocol.err().map(Bytes::from_static);
            for option in &hello.options {
                if refusal.is_some() {
                    break;
                }
                match option {
                    HelloOption::Auth { user, password } => {
                        match self.check_client_auth(user, password) {
                            Ok(login) => self.log_in(login),
                            Err(error) => {
                                return self.reply_after_pushes(Bytes::from_static(error)).await;
                            }
                        }
                    }
                    HelloOption::SetName(_) => {}
                    HelloOption::Bad(option) => refusal = Some(hello::syntax_error(option)),
                }
            }
        }
        if !self.authenticated {
            // Nothing of an unauthenticated client goes upstream.
            if refusal.is_none() {
                self.ctx.metrics.client_error(ClientErrorReason::Auth);
            }
            let version = self.ctx.server.load().as_ref().and_then(|s| s.version);
            let noauth = match version {
                Some(version) if version < (7, 2) => NOAUTH_HELLO_7_0,
                _ => NOAUTH_HELLO,
            };
            return self.reply_local(refusal.unwrap_or(Bytes::from_static(noauth)));
        }
        let expect = self.tracked(action);
        self.forward(request, expect).await;
        // What Redis accepts next depends on the protocol (a subscribed RESP2 connection takes
        // only pub/sub commands), which only the reply settles: requests wait for it.
        if protocol.is_some() && self.upstream.is_some() {
            self.raise_barrier();
        }
    }

    /// Answers from the proxy, but when Redis may write pushes to this connection (it has
    /// subscriptions, or tracks keys) only after a PING has come back from the upstream: a push
    /// Redis wrote right after the reply before (an invalidation the client's own write caused,
    /// a message it published to itself) then reaches the client first, as it would from
    /// Redis. A round trip, on commands clients send rarely (AUTH, CLIENT ID, QUIT).
    async fn reply_after_pushes(&mut self, reply: Bytes) {
        let may_push = !self.state.monitor
            && (self.state.has_subscriptions() || self.state.tracking.is_some());
        if may_push && !self.in_multi && self.upstream.is_some() {
            self.forward(b"*1\r\n$4\r\nPING\r\n", injected("PING"))
                .await;
        }
        self.reply_local(reply);
    }

    async fn handle_client(&mut self, args: &[&[u8]], frame: &[u8]) {
        let sub = args.get(1).copied().unwrap_or_default();
        let arg = |i: usize| args.get(i).map(|a| Bytes::copy_from_slice(a));
        let on = |i: usize| args.get(i).is_some_and(|a| command::is(a, "ON"));
        let action = if command::is(sub, "SETNAME") {
            Action::SetName(arg(2).filter(|n| !n.is_empty()))
        } else if command::is(sub, "SETINFO") && args.len() == 4 {
            Action::SetInfo(arg(2).unwrap_or_default(), arg(3).unwrap_or_default())
        } else if command::is(sub, "NO-EVICT") {
            Action::NoEvict(on(2))
        } else if command::is(sub, "NO-TOUCH") {
            Action::NoTouch(on(2))
        } else if command::is(sub, "TRACKING") {
            let tracking: Option<Vec<Bytes>> = on(2).then(|| {
                args[2..]
                    .iter()
                    .map(|a| Bytes::copy_from_slice(a))
                    .collect()
            });
            // A redirect to one of this proxy's sessions goes to that session's connection now.
            let target = tracking
                .as_deref()
                .and_then(links::redirect_target)
                .and_then(|public| self.ctx.links.lookup(public));
            if let (Some(target), Some(args)) = (target, &tracking) {
                let sent = target.upstream_id();
                let rewritten =
                    (sent != target.public_id()).then(|| links::tracking_command(args, Some(sent)));
                let expect = self.tracked(Action::Tracking {
                    args: tracking,
                    sent_redirect: Some(sent),
                });
                return self
                    .forward(rewritten.as_deref().unwrap_or(frame), expect)
                    .await;
            }
            Action::Tracking {
                args: tracking,
                sent_redirect: None,
            }
        } else if command::is(sub, "ID")
            && args.len() == 2
            && !self.in_multi
            && !self.state.resp2_subscribe_context()
        {
            // The session's public id, which stays when it moves. (Inside MULTI the command is
            // queued and answered in the EXEC reply; a subscribed RESP2 connection refuses it.)
            if let Err(reply) = self.upstream_for_command().await {
                return self.reply_local(reply);
            }
            if let Some(link) = &self.own_link {
                let id = Bytes::from(format!(":{}\r\n", link.public_id()));
                return self.reply_after_pushes(id).await;
            }
            Action::None
        } else if command::is(sub, "GETREDIR")
            && args.len() == 2
            && let Some(id) = self.redirect_as_the_client_gave_it()
        {
            return self
                .reply_after_pushes(Bytes::from(format!(":{id}\r\n")))
                .await;
        } else if !self.in_multi
            && let Some(reply) = self.kill_client_of_this_proxy(args)
        {
            return self.reply_local(reply);
        } else if let Some(translated) = self.translate_client_ids(args) {
            return self.forward(&translated, Expect::Relay(1)).await;
        } else if command::is(sub, "REPLY") && args.len() == 3 {
            if self.state.resp2_subscribe_context() {
                // Redis refuses it there. It may see it only when nothing in flight could
                // change that (a subscribe still unanswered may yet fail, and a CLIENT REPLY
                // OFF Redis took would silence the connection the proxy counts replies on);
                // then its refusal comes in order with the messages it sent before.
                if self.replies.is_empty() && self.state.resp2_subscribed() {
                    return self.forward(frame, Expect::Relay(1)).await;
                }
                return self.reply_local(refused_while_subscribed("client|reply"));
            }
            return self.handle_client_reply(args[2], frame).await;
        } else if command::is(sub, "MAINT_NOTIFICATIONS") {
            // Maintenance notifications would send clients straight to the upstream endpoint,
            // past the proxy: accept the request and never relay them.
            return self.reply_local(Bytes::from_static(b"+OK\r\n"));
        } else {
            Action::None
        };
        let expect = self.tracked(action);
        self.forward(frame, expect).await
    }

    /// `CLIENT REPLY ON|OFF|SKIP`, kept by the proxy: the server keeps answering every command
    /// (the proxy must count replies to find safe points and to answer in order), and the proxy
    /// drops the replies the client asked not to get. Anything else goes to the server, which
    /// answers with its own error.
    async fn handle_client_reply(&mut self, mode: &[u8], frame: &[u8]) {
        if self.in_multi {
            self.ctx
                .metrics
                .client_error(ClientErrorReason::Unsupported);
            // Refused when queued, so the transaction is aborted: run without it, the commands
            // after it would answer where the client expects silence.
            return self
                .refuse_in_multi(Bytes::from_static(
                    b"-ERR rotaproxy does not support CLIENT REPLY inside MULTI\r\n",
                ))
                .await;
        }
        if command::is(mode, "ON") {
            self.reply_off = false;
            self.skip_next_reply = false;
            // Sent on (the server's mode is always ON, so nothing changes there): its +OK then
            // comes after whatever Redis wrote after the reply before it, as an invalidation a
            // muted write caused, which a +OK of the proxy's own would overtake.
            self.forward(frame, Expect::Relay(1)).await;
        } else if command::is(mode, "OFF") {
            self.reply_off = true;
        } else if command::is(mode, "SKIP") {
            // The SKIP itself gets no reply either; the command after it is the one skipped.
            self.skip_next_reply = !self.reply_off;
        } else {
            let expect = self.tracked(Action::None);
            self.forward(frame, expect).await;
        }
    }

    async fn handle_exec(&mut self, frame: &[u8]) {
        if std::mem::take(&mut self.multi_lost) {
            self.in_multi = false;
            self.multi_actions.clear();
            return self.reply_local(self.null_reply());
        }
        if !self.in_multi {
            return self.forward(frame, Expect::Relay(1)).await;
        }
        self.in_multi = false;
        self.watch_armed = false;
        let actions = std::mem::take(&mut self.multi_actions);
        if std::mem::take(&mut self.watch_lost) {
            // The WATCH lived on a connection that is gone: abort, as if a watched key changed.
            let discard = command::encode(&[&b"DISCARD"[..]]);
            self.forward(&discard, injected("DISCARD")).await;
            return self.reply_local(self.null_reply());
        }
        // Whether the connection is subscribed under RESP2 after this EXEC, and which protocol
        // it speaks, decide how Redis takes the next commands (a MULTI is refused, a SUBSCRIBE
        // runs at once), and only the reply tells: the next requests wait for it.
        let settles_what_follows = actions.iter().any(|(_, a)| match a {
            Action::Subscribe(..) | Action::Unsubscribe(..) => self.state.protocol == 2,
            Action::Hello { protocol, .. } => protocol.is_some(),
            _ => false,
        });
        self.forward(
            frame,
            Expect::Tracked {
                action: Action::Exec(actions),
                relay: true,
                blocking: false,
            },
        )
        .await;
        if settles_what_follows && self.upstream.is_some() {
            self.raise_barrier();
        }
    }

    fn null_reply(&self) -> Bytes {
        if self.state.protocol == 3 {
            Bytes::from_static(b"_\r\n")
        } else {
            Bytes::from_static(b"*-1\r\n")
        }
    }

    /// Sends a whole request upstream and records what it will answer.
    async fn forward(&mut self, request: &[u8], expect: Expect) {
        if let Err(reply) = self.upstream_for_command().await {
            return self.reply_local(reply);
        }
        self.commands_forwarded += 1;
        self.flush_forward();
        let up = self.upstream.as_mut().expect("ensured above");
        up.out.extend_from_slice(request);
        let expect = self.as_client_asked(expect);
        self.replies.push(expect);
    }

    /// Moves the scanned, forwardable prefix of the client input to the upstream output. Needed
    /// only before something else is queued upstream (it must go after them) or before the front
    /// of the client input is taken for a held request; otherwise `poll_io` writes those bytes
    /// straight from `client_in`, without a copy.
    fn flush_forward(&mut self) {
        if self.forward_len == 0 {
            return;
        }
        let n = std::mem::take(&mut self.forward_len);
        match &mut self.upstream {
            Some(up) => up.out.extend_from_slice(&self.client_in[..n]),
            None => debug_assert!(false, "forwarded bytes without an upstream"),
        }
        self.client_in.advance(n);
    }

    /// Answers the client from the proxy, after every reply still owed before it.
    fn reply_local(&mut self, reply: Bytes) {
        if self.reply_muted() {
            return;
        }
        if self.replies.is_empty() {
            self.flush_relay();
            self.client_out.extend_from_slice(&reply);
        } else {
            self.replies.push(Expect::Local(reply));
        }
    }

    /// The client logged in with `login`'s entry (a new AUTH replaces the one before).
    fn log_in(&mut self, login: client_auth::Login) {
        self.login = Some(login);
        self.set_authenticated(true);
        self.publish_view();
    }

    /// After `RESET`: a client that must authenticate must do so again.
    fn log_out(&mut self) {
        self.login = None;
        self.set_authenticated(!self.ctx.client_auth.required());
    }

    /// Records whether the client has authenticated. Until it has, the request scanner holds it
    /// to Redis's limits for unauthenticated clients (no argument over 16 KiB).
    fn set_authenticated(&mut self, authenticated: bool) {
        self.authenticated = authenticated;
        self.request_scanner.set_unauthenticated(!authenticated);
    }

    /// A request named `POST` or `Host:` is a line of an HTTP request: a web page may have made
    /// a browser send one to the proxy's port, with Redis commands in its body. Redis closes
    /// such a connection without an answer, logging a possible attack; so does the proxy, before
    /// anything of the request goes upstream. (Forwarded, it would make Redis close the upstream
    /// connection, the session would replace that as it replaces any lost connection, and the
    /// commands in the body would run on the new one.) What was asked before it is answered.
    fn close_on_http_request(&mut self) {
        tracing::warn!(
            target: "rotaproxy::audit",
            event = "client.http_request",
            peer = %self.peer,
            "possible cross-protocol attack: the client sent an HTTP request (POST or Host:) \
             instead of commands; connection closed"
        );
        self.ctx
            .metrics
            .client_error(ClientErrorReason::HttpRequest);
        self.flush_forward();
        self.closing = true;
    }

    /// Malformed input: a protocol error to this client, then the connection closes.
    fn protocol_error(&mut self, message: &str) {
        tracing::info!(peer = %self.peer, error = message, "closing client after a protocol error");
        self.ctx.metrics.client_error(ClientErrorReason::Protocol);
        self.reply_local(Bytes::from(format!("-ERR Protocol error: {message}\r\n")));
        self.closing = true;
    }

    // ---- upstream -----------------------------------------------------------------------

    /// Makes sure the session has an upstream connection, taking one from the pool and replaying
    /// the session's state onto it if needed.
    async fn ensure_upstream(&mut self) -> Result<(), PoolError> {
        if self.upstream.is_some() {
            return Ok(());
        }
        let conn = self.ctx.pool.checkout().await.inspect_err(|err| {
            tracing::warn!(peer = %self.peer, error = %err, "no upstream connection for client");
        })?;
        self.install_upstream(conn);
        Ok(())
    }

    /// Makes `conn` the session's upstream connection and replays the session's state onto it.
    fn install_upstream(&mut self, conn: UpstreamConn) {
        debug_assert!(self.upstream.is_none() && self.relay_len == 0 && self.forward_len == 0);
        self.reply_scanner = new_reply_scanner();
        self.reply_frame = None;
        self.exec_outcomes = None;
        self.exec_follower = None;
        self.relay_len = 0;
        self.held_reply_len = 0;
        self.upstream_held_back_at = None;
        let mut up = Upstream {
            conn,
            out: BytesMut::new(),
            input: BytesMut::new(),
            needs_flush: false,
        };
        // The new connection has no subscriptions until the replay is confirmed.
        self.state.server_subscriptions = 0;
        self.state.server_shard_subscriptions = 0;
        self.note_new_connection(up.conn.client_id);
        let redirect_to = self.redirect.as_mut().map(links::Redirect::point_at_target);
        for (cmd, replies, what) in self.state.replay_commands(redirect_to) {
            up.out.extend_from_slice(&cmd);
            if let (Some(id), state::TRACKING_REPLAY) = (redirect_to, what) {
                // Once it is on, the target's client learns its cache may hold stale entries.
                self.replies.push(Expect::Tracked {
                    action: Action::RedirectPointed(id),
                    relay: false,
                    blocking: false,
                });
            } else if what.ends_with("SUBSCRIBE") {
                self.replies.push(Expect::Confirmations {
                    remaining: replies,
                    relay: false,
                    muted: false,
                    added: Vec::new(),
                });
            } else {
                self.replies.push(injected(what));
            }
        }
        self.upstream = Some(up);
        self.publish_view();
        if self.state.tracking.is_some() && self.state.protocol == 3 {
            // The new connection's tracking table is empty: the client's cache must not trust
            // entries whose invalidations would have gone to the old one.
            self.send_cache_flush(INVALIDATE_ALL);
        }
    }

    /// Connects for a command; on failure returns the error reply the client gets instead.
    async fn upstream_for_command(&mut self) -> Result<(), Bytes> {
        self.ensure_upstream().await.map_err(|err| {
            self.ctx
                .metrics
                .client_error(ClientErrorReason::UpstreamUnavailable);
            Bytes::from(format!(
                "-ERR rotaproxy: upstream unavailable: {}\r\n",
                single_line(&err.to_string())
            ))
        })
    }

    /// The upstream connection is gone. Owed replies become errors (never a silent drop, never a
    /// second execution); the session continues on a fresh connection.
    async fn on_upstream_lost(&mut self, why: &str) {
        let owed = !self.replies.nothing_owed();
        tracing::info!(peer = %self.peer, reason = why, replies_owed = owed, "upstream connection lost");
        // Complete replies already read are delivered; part of one cannot be finished or taken
        // back, so a client that got part of a reply can only be disconnected once it has it.
        let cut_mid_reply = self
            .reply_frame
            .is_some_and(|f| f.relay && f.confirmation.is_none())
            && !self.reply_scanner.at_frame_start();
        // Redis closes a subscriber (or monitor) that cannot keep up once its output buffer
        // passes the limit, and the client learns from the disconnect that messages were lost.
        // Subscribing again on a new connection would hide that loss, and the slow client would
        // lose the next batch the same way: it is closed, as Redis would close it. (A client
        // that only tracks keys is told to flush its cache instead, as after any lost
        // connection.)
        let slow_consumer = self
            .upstream_held_back_at
            .is_some_and(|at| at.elapsed() < SLOW_CONSUMER_WINDOW)
            && (self.state.has_subscriptions() || self.state.monitor)
            && !self.closing;
        if slow_consumer {
            tracing::warn!(
                peer = %self.peer,
                "the upstream connection of a subscriber closed while its client was not \
                 keeping up (Redis's client-output-buffer-limit closes such connections); \
                 messages were lost, so the client is closed rather than subscribed again"
            );
            self.ctx
                .metrics
                .client_error(ClientErrorReason::SlowConsumer);
        }
        self.flush_relay();
        self.upstream = None;
        self.publish_view();
        if cut_mid_reply {
            if !slow_consumer {
                tracing::warn!(peer = %self.peer, "upstream lost in the middle of a reply; closing the client");
                self.ctx
                    .metrics
                    .client_error(ClientErrorReason::UpstreamLost);
            }
            self.replies.take_all();
            self.reply_frame = None;
            self.closing = true;
            self.resume_input = false;
            return;
        }
        self.reply_scanner = new_reply_scanner();
        self.reply_frame = None;
        self.exec_outcomes = None;
        self.exec_follower = None;
        self.relay_len = 0;
        self.held_reply_len = 0;
        for expect in self.replies.take_all() {
            let errors = match expect {
                Expect::Relay(n) => n,
                Expect::Tracked { relay, .. } => u64::from(relay),
                Expect::Confirmations { relay, muted, .. } => u64::from(relay && !muted),
                // The client counts these frames as replies of their own (as it would from
                // Redis): one error stands in for each.
                Expect::ExecTail { remaining, relay } => remaining * u64::from(relay),
                Expect::Local(reply) => {
                    self.client_out.extend_from_slice(&reply);
                    0
                }
            };
            for _ in 0..errors {
                self.ctx
                    .metrics
                    .client_error(ClientErrorReason::UpstreamLost);
                self.client_out.extend_from_slice(UPSTREAM_LOST);
            }
        }
        // Requests scanned but not yet sent were already counted (and have just been answered
        // with an error): they must not run on the next connection.
        self.client_in.advance(self.forward_len);
        self.forward_len = 0;
        if let RequestMode::Stream(_) = self.request_mode {
            self.ctx
                .metrics
                .client_error(ClientErrorReason::UpstreamLost);
            self.request_mode = RequestMode::Discard(Some(Bytes::from_static(UPSTREAM_LOST)));
        }
        if self.in_multi {
            self.multi_lost = true;
        }
        if self.watch_armed {
            self.watch_armed = false;
            self.watch_lost = true;
        }
        self.lift_barrier();
        self.state.server_subscriptions = 0;
        self.state.server_shard_subscriptions = 0;
        self.ctx.metrics.upstream_reconnects.increment(1);
        if slow_consumer {
            self.closing = true;
            self.resume_input = false;
        }
        if (self.state.needs_live_connection() || self.is_redirect_target()) && !self.closing {
            // A subscriber (or monitor, or tracking client, or a client others send their
            // invalidations to) is waiting for pushes, not sending commands: reconnect now
            // rather than at its next command, retrying for a while (a restarting server takes
            // a moment to come back).
            let deadline = tokio::time::Instant::now() + RESTORE_WINDOW;
            let mut pause = std::time::Duration::from_millis(50);
            while self.ensure_upstream().await.is_err() {
                if tokio::time::Instant::now() + pause > deadline {
                    tracing::warn!(peer = %self.peer, "cannot restore a subscribed session; closing it");
                    self.closing = true;
                    self.resume_input = false;
                    break;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }

    /// Scans what the upstream sent and relays it, matching each reply with its request.
    fn on_upstream_input(&mut self) -> Result<(), String> {
        let scanned_before = self.reply_scanner.bytes_scanned();
        let result = self.scan_replies();
        self.flush_old_upstream_pushes();
        self.drop_old_upstream_when_replaced();
        let scanned = self.reply_scanner.bytes_scanned() - scanned_before;
        self.traffic.reply_bytes(scanned);
        result
    }

    fn scan_replies(&mut self) -> Result<(), String> {
        loop {
            let Some(up) = &self.upstream else {
                return Ok(());
            };
            let pos = self.relay_len + self.held_reply_len;
            if pos >= up.input.len() {
                return Ok(());
            }
            if self.reply_frame.is_none() {
                if self.relay_scalar_replies(pos) {
                    continue;
                }
                let Some(frame) = self.start_reply(pos) else {
                    return Ok(());
                };
                if !frame.relay || frame.confirmation.is_some() {
                    // Swallowed and held frames start at the front of the input.
                    self.flush_relay();
                }
                if frame.counts && self.replies.head_is_exec_with_actions() {
                    self.exec_outcomes = Some(ExecOutcomes::default());
                }
                self.reply_frame = Some(frame);
            }
            let frame = self.reply_frame.expect("set above");
            let up = self.upstream.as_mut().expect("checked above");
            let pos = self.relay_len + self.held_reply_len;
            let progress = self
                .reply_scanner
                .scan(&up.input[pos..])
                .map_err(|e| format!("malformed reply from upstream: {e}"))?;
            if let Some(exec) = &mut self.exec_outcomes {
                exec.feed(&up.input[pos..pos + progress.consumed]);
            }
            if frame.confirmation.is_some() {
                self.held_reply_len += progress.consumed;
            } else if frame.relay {
                self.relay_len += progress.consumed;
            } else {
                up.input.advance(progress.consumed);
            }
            if !progress.complete {
                return Ok(());
            }
            self.reply_frame = None;
            if let Some(kind) = frame.confirmation {
                let held = up.input.split_to(self.held_reply_len);
                self.held_reply_len = 0;
                self.on_confirmation(frame, kind, &held);
            } else if frame.counts {
                self.on_reply_matched(frame);
            }
        }
    }

    /// The fast lane: relays the whole scalar replies at `pos` that answer the run of ordinary
    /// commands at the head of the queue, in one step. False when it took nothing.
    fn relay_scalar_replies(&mut self, pos: usize) -> bool {
        // A swallowed nil (CLIENT UNBLOCK) or a MONITOR line needs a look at each frame.
        if self.unblocking || self.state.monitor {
            return false;
        }
        let (Some(run), Some(up)) = (self.replies.head_relay_run(), &self.upstream) else {
            return false;
        };
        let (bytes, count) = self
            .reply_scanner
            .peek_scalar_replies(&up.input[pos..], run);
        if count == 0 {
            return false;
        }
        self.reply_scanner.skip_frames(bytes);
        self.relay_len += bytes;
        self.replies.match_relayed(count);
        self.deliver_ready_locals();
        true
    }

    /// Delivers the proxy-made replies now at the head of the queue, after what was relayed.
    fn deliver_ready_locals(&mut self) {
        if self.replies.head_is_local() {
            self.flush_relay();
            while let Some(local) = self.replies.pop_ready_locals().next() {
                self.client_out.extend_from_slice(&local);
            }
        }
    }

    /// Decides how the reply starting at `pos` is handled; None when more bytes are needed.
    fn start_reply(&self, pos: usize) -> Option<ReplyFrame> {
        let buf = &self.upstream.as_ref()?.input[pos..];
        let first = buf[0];
        let plain = ReplyFrame {
            first,
            // The nil a CLIENT UNBLOCK provoked is not the client's: its command is re-issued.
            relay: self.replies.head_relays() && !(self.unblocking && is_null_reply(buf)),
            counts: true,
            confirmation: None,
            null_array: buf.starts_with(b"*-1"),
        };
        let not_a_reply = |relay| ReplyFrame {
            relay,
            counts: false,
            ..plain
        };
        if self.replies.head_is_exec_tail() {
            // The rest of an EXEC reply: every frame counts, but for a message that a PUBLISH
            // in the transaction sent to this RESP3 connection itself.
            if first == b'>' && reply::push_is_message(buf)? {
                return Some(not_a_reply(true));
            }
            return Some(plain);
        }
        let head_confirms = self.replies.head_is_confirmations();
        if first == b'>' || (first == b'*' && (head_confirms || self.state.resp2_subscribed())) {
            let kind = match reply::peek_first_element(buf) {
                Peek::Incomplete => return None,
                Peek::Ready(Some(range)) => reply::push_kind(&buf[range]),
                Peek::Ready(None) | Peek::Malformed => PushKind::Other,
            };
            return Some(match kind {
                // Redis sends confirmations, messages and invalidations whatever the client's
                // `CLIENT REPLY` mode (7.0.15 here, and later versions).
                PushKind::Confirmation(k) => ReplyFrame {
                    relay: !head_confirms || self.replies.head_confirmations_reach_the_client(),
                    counts: head_confirms,
                    confirmation: Some(k),
                    ..plain
                },
                PushKind::Message | PushKind::Invalidate => not_a_reply(true),
                PushKind::Maintenance => not_a_reply(false),
                PushKind::Other if first == b'>' => not_a_reply(true),
                PushKind::Other => plain,
            });
        }
        if first == b'+' && self.state.monitor {
            if buf.len() < MONITOR_PREFIX && !buf.contains(&b'\n') {
                return None;
            }
            if reply::is_monitor_line(&buf[..buf.len().min(MONITOR_PREFIX)]) {
                return Some(not_a_reply(!self.reply_off));
            }
        }
        Some(plain)
    }

    fn on_confirmation(&mut self, frame: ReplyFrame, kind: SubKind, bytes: &[u8]) {
        if let Some(count) = reply::confirmation_count(bytes) {
            if kind.class == SubClass::Shard {
                self.state.server_shard_subscriptions = count;
            } else {
                self.state.server_subscriptions = count;
            }
        }
        if frame.relay {
            self.client_out.extend_from_slice(bytes);
        }
        if frame.counts {
            self.on_reply_matched(frame);
        }
    }

    /// A reply answered the head of the queue: apply what it confirms, then deliver any
    /// proxy-made replies that were waiting behind it.
    fn on_reply_matched(&mut self, frame: ReplyFrame) {
        let was_blocking = self.replies.blocking_in_flight();
        if self.replies.head_is_exec_tail() {
            self.follow_exec_tail(reply::is_error(frame.first));
        }
        let Some(matched) = self.replies.match_reply(reply::is_error(frame.first)) else {
            tracing::warn!(peer = %self.peer, "upstream sent a reply nobody asked for; dropped");
            return;
        };
        if was_blocking && !self.replies.blocking_in_flight() {
            self.on_blocking_answered(!frame.relay);
        }
        if !matched.revert.is_empty() {
            for (class, channel) in matched.revert {
                self.state.set_of(class).shift_remove(&channel);
            }
            self.publish_view();
        }
        if let Action::Exec(actions) = matched.action {
            let failed = self.exec_outcomes.take().and_then(ExecOutcomes::failed);
            // An array (not a null: an aborted transaction) means EXEC ran the commands.
            if frame.first == b'*' && !frame.null_array {
                let tail = match failed {
                    Some(failed) => {
                        let mut follower = ExecFollower::new(actions, failed.len());
                        for is_error in failed {
                            follower.frame(&mut self.state, is_error);
                        }
                        let due = follower.frames_due();
                        if due > 0 {
                            self.exec_follower = Some(follower);
                        }
                        due
                    }
                    None => self.state.apply_exec(actions),
                };
                self.sync_redirect(None);
                self.publish_view();
                if tail > 0 {
                    self.replies.push_next(Expect::ExecTail {
                        remaining: tail,
                        relay: frame.relay,
                    });
                }
            }
            // Requests held back behind an EXEC that may have (un)subscribed or changed the
            // protocol go on once what it did is known.
            if self.exec_follower.is_none() {
                self.lift_barrier_if_its_reply();
            }
        } else if matched.action != Action::None {
            let ok = match &matched.action {
                Action::Hello { .. } => frame.first == b'%' || frame.first == b'*',
                Action::Reset => frame.first == b'+',
                _ => !reply::is_error(frame.first),
            };
            self.apply(matched.action, ok);
            self.publish_view();
        }
        self.deliver_ready_locals();
    }

    /// One frame after EXEC's array: the command it belongs to may now be known to have run
    /// (and a (un)subscribe that ran makes more frames due).
    fn follow_exec_tail(&mut self, is_error: bool) {
        let Some(follower) = &mut self.exec_follower else {
            return;
        };
        let due = follower.frames_due();
        follower.frame(&mut self.state, is_error);
        let now_due = follower.frames_due();
        // This frame is one of those due; the rest, and any new confirmations, follow it.
        self.replies
            .add_to_exec_tail((now_due + 1).saturating_sub(due));
        if now_due == 0 {
            self.exec_follower = None;
            self.sync_redirect(None);
            self.lift_barrier_if_its_reply();
        }
    }

    /// Holds the requests behind the one just forwarded until its reply (see `barrier`).
    fn raise_barrier(&mut self) {
        self.barrier = true;
        self.replies.hold_barrier_at_last();
    }

    /// Requests held back at a barrier go on (see `barrier`).
    fn lift_barrier(&mut self) {
        self.replies.release_barrier();
        if std::mem::take(&mut self.barrier) {
            self.resume_input = true;
        }
    }

    /// Lifts the barrier if the reply just matched answered the request that raised it. A
    /// reply to an earlier request must not: an invalid HELLO or an EXEC that settles nothing
    /// raised none, and lifting a RESET's barrier for them let the next command run before
    /// the RESET's reply had logged the client out.
    fn lift_barrier_if_its_reply(&mut self) {
        if self.replies.barrier_holder_answered() {
            self.lift_barrier();
        }
    }

    fn apply(&mut self, action: Action, ok: bool) {
        match action {
            Action::Injected(what) => {
                if !ok {
                    tracing::warn!(peer = %self.peer, command = what, "a command the proxy sent upstream failed");
                }
            }
            Action::Reauth => self.on_reauth_answered(ok),
            Action::RedirectPointed(id) => self.on_redirect_pointed(id, ok),
            Action::Tracking {
                args,
                sent_redirect,
            } => {
                self.state.apply(
                    Action::Tracking {
                        args,
                        sent_redirect,
                    },
                    ok,
                );
                if ok {
                    self.sync_redirect(sent_redirect);
                }
            }
            Action::Reset => {
                self.state.apply(Action::Reset, ok);
                self.sync_redirect(None);
                // A RESET always holds the barrier while it is answered.
                self.lift_barrier();
                self.resume_input = true;
                if ok {
                    // RESET logged the upstream connection out to the default user.
                    self.log_out();
                    self.reauthenticate();
                }
            }
            Action::Hello { protocol, name } => {
                self.state.apply(Action::Hello { protocol, name }, ok);
                self.lift_barrier_if_its_reply();
            }
            other => self.state.apply(other, ok),
        }
    }

    /// Sends the proxy's AUTH again on the current connection.
    fn reauthenticate(&mut self) {
        self.flush_forward();
        let Some(up) = &mut self.upstream else {
            return;
        };
        let Some(auth) = up.conn.generation.credential.auth_command() else {
            return;
        };
        up.out.extend_from_slice(&auth);
        self.replies.push(injected("AUTH"));
    }

    /// Moves the scanned, relayable prefix of the upstream input to the client output. Needed only
    /// before the proxy queues a reply of its own (it must go after them), before the front of the
    /// upstream input is held or dropped, and before the upstream connection goes away; otherwise
    /// `poll_io` writes those bytes straight from the upstream's input, without a copy.
    fn flush_relay(&mut self) {
        if self.relay_len == 0 {
            return;
        }
        let n = std::mem::take(&mut self.relay_len);
        let up = self
            .upstream
            .as_mut()
            .expect("relayed bytes come from an upstream");
        self.client_out.extend_from_slice(&up.input[..n]);
        up.input.advance(n);
    }

    /// The session is over: a connection in the default state, with nothing in flight, serves the
    /// next client; any other is closed.
    fn finish(&mut self) {
        self.release_empty_buffers();
        // Other sessions' invalidations still go to this connection: it must not serve anyone.
        let redirect_target = self
            .own_link
            .take()
            .inspect(|link| self.ctx.links.unregister(link))
            .is_some_and(|link| link.is_redirect_target());
        let Some(up) = self.upstream.take() else {
            return;
        };
        let clean = !redirect_target
            && !self.killed
            && self.at_safe_point()
            && self.relay_len == 0
            && self.replies.is_empty()
            && self.state.is_default()
            && up.out.is_empty()
            && up.input.is_empty();
        if clean {
            self.ctx.pool.checkin(up.conn);
        }
    }
}

/// Whether a reply starts as a null (`_`, `*-1`, `$-1`): what a timed-out blocking command says.
fn is_null_reply(buf: &[u8]) -> bool {
    buf.starts_with(b"_") || buf.starts_with(b"*-1") || buf.starts_with(b"$-1")
}

fn new_reply_scanner() -> Scanner {
    Scanner::new(Direction::Reply, ScanLimits::reply_defaults())
}

fn injected(what: &'static str) -> Expect {
    Expect::Tracked {
        action: Action::Injected(what),
        relay: false,
        blocking: false,
    }
}

fn sub_class(kind: Kind) -> SubClass {
    match kind {
        Kind::Psubscribe | Kind::Punsubscribe => SubClass::Pattern,
        Kind::Ssubscribe | Kind::Sunsubscribe => SubClass::Shard,
        _ => SubClass::Channel,
    }
}

/// Keeps an error message on one RESP line.
fn single_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

/// Writes `queued` (what the proxy put together) and then the first `*passed_len` bytes of
/// `passed` (bytes passed through from the other side, written from where they were read), as
/// much as the stream takes now; flushes once both are written. Written bytes are removed from
/// the front of each buffer.
///
/// Called for both directions on every pass of the event loop, and most passes have nothing
/// to write in one of them: that case is settled inline, before any call.
#[inline(always)]
fn poll_write_queued_then_passed(
    stream: &mut Stream,
    queued: &mut BytesMut,
    passed: Option<&mut BytesMut>,
    passed_len: &mut usize,
    needs_flush: &mut bool,
    cx: &mut Context<'_>,
) -> io::Result<()> {
    if queued.is_empty() && *passed_len == 0 && !*needs_flush {
        return Ok(());
    }
    poll_write_some_queued_then_passed(stream, queued, passed, passed_len, needs_flush, cx)
}

/// The body of `poll_write_queued_then_passed`, kept out of line: only passes with something
/// to write (or flush) get here.
fn poll_write_some_queued_then_passed(
    stream: &mut Stream,
    queued: &mut BytesMut,
    passed: Option<&mut BytesMut>,
    passed_len: &mut usize,
    needs_flush: &mut bool,
    cx: &mut Context<'_>,
) -> io::Result<()> {
    let mut queued_len = queued.len();
    if queued_len > 0 && !poll_write_front(stream, queued, &mut queued_len, needs_flush, cx)? {
        return Ok(());
    }
    if let Some(passed) = passed
        && !poll_write_front(stream, passed, passed_len, needs_flush, cx)?
    {
        return Ok(());
    }
    poll_flush_if_needed(stream, needs_flush, cx)
}

/// Writes as much of `buf` as the stream takes now, then flushes once it is all written.
fn poll_write_all(
    stream: &mut Stream,
    buf: &mut BytesMut,
    needs_flush: &mut bool,
    cx: &mut Context<'_>,
) -> io::Result<()> {
    let mut len = buf.len();
    if poll_write_front(stream, buf, &mut len, needs_flush, cx)? {
        poll_flush_if_needed(stream, needs_flush, cx)?;
    }
    Ok(())
}

/// Writes the first `*len` bytes of `buf`, as much as the stream takes now, removing what was
/// written from the front. True when all of them were written.
fn poll_write_front(
    stream: &mut Stream,
    buf: &mut BytesMut,
    len: &mut usize,
    needs_flush: &mut bool,
    cx: &mut Context<'_>,
) -> io::Result<bool> {
    while *len > 0 {
        match Pin::new(&mut *stream).poll_write(cx, &buf[..*len]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                // All of it written (the usual case): clearing keeps the buffer's start where
                // it is, so the next read lands in the same cache lines, with no compaction.
                if n == buf.len() {
                    buf.clear();
                } else {
                    buf.advance(n);
                }
                *len -= n;
                *needs_flush = stream.buffers_writes();
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(false),
        }
    }
    Ok(true)
}

/// Flushes (TLS buffers what it encrypts) after everything was written.
fn poll_flush_if_needed(
    stream: &mut Stream,
    needs_flush: &mut bool,
    cx: &mut Context<'_>,
) -> io::Result<()> {
    if *needs_flush {
        match Pin::new(&mut *stream).poll_flush(cx) {
            Poll::Ready(Ok(())) => *needs_flush = false,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => {}
        }
    }
    Ok(())
}
