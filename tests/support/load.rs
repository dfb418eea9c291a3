//! A self-checking client load for the proxy: about fifty concurrent clients of every kind an
//! application runs (pipelines, optimistic and plain transactions, RESP2 and RESP3 pub/sub,
//! parked `BLPOP`s, connection churn, autopipelining, idle sessions, a RESP2 client-side cache),
//! each checking every reply.
//!
//! The promise it checks: whatever the proxy does meanwhile (e.g. a credential rotation that moves
//! sessions to new upstream connections), no client sees an error reply, a wrong value, a missing
//! or extra reply, a lost message or item, a hang or a disconnect.
//!
//! ```ignore
//! let load = Load::start(LoadConfig::new(proxy.client_addr(), random_token(8)));
//! assert_eventually(Duration::from_secs(20), "load ran a bit", || load.progress() > 2_000);
//! // ... rotate the credentials here ...
//! load.stop().assert_clean();
//! ```
//!
//! Every client owns one connection and one thread (the autopipeline client two threads on one
//! socket). A client that gets an error reply records it and goes on; a client whose connection
//! fails (EOF, reset, no reply within [`REPLY_TIMEOUT`]) records it and stops: it never
//! reconnects. Every loop is bounded by a count and by time; `stop` is bounded too.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::{Display, Write as _};
use std::io::{self, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::resp::{Frame, INVALIDATION_CHANNEL, RespConn, encode_cmd, is_timeout};
use super::wait_until;

/// Longest wait for one reply: generous for a busy 2-core machine, but a hang is an error.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Load::start`] waits for every client's first successful round.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Read timeout of clients that wait for pushes (subscribers, parked consumers), so they can
/// look at the clock and the stop flag.
const POLL: Duration = Duration::from_millis(100);
/// After the drain deadline, how long `stop` waits for threads before shutting their sockets.
const JOIN_GRACE: Duration = Duration::from_secs(10);
/// Upper bound on the iterations of every loop (time bounds them first in practice).
const MAX_ROUNDS: u64 = 10_000_000;
/// Errors kept verbatim (all are counted).
const MAX_STORED_ERRORS: usize = 1_000;
/// Commands per pipelined batch.
const PIPELINE_BATCH: usize = 16;
/// Shared keys the optimistic transactions contend on.
const TX_KEYS: usize = 3;
/// Attempts of one optimistic increment before giving up (not an error: contention).
const TX_RETRIES: usize = 100;
/// Autopipeline: commands in flight after each top-up...
const AUTO_WINDOW: usize = 64;
/// ...and the level at which the writer tops up (in batches of `AUTO_WINDOW - AUTO_LOW_WATER`).
const AUTO_LOW_WATER: usize = 48;
/// Autopipeline: the in-flight count the client aims never to go under (reported, see details).
const AUTO_MIN_IN_FLIGHT: usize = 32;
/// Timeout of the non-forever BLPOP consumers.
const BLPOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest pub/sub sequence number a subscriber accepts (bounds its memory).
const MAX_SEQ: usize = 10_000_000;
/// Pause between two requests of an idle client.
const IDLE_PERIOD: Duration = Duration::from_millis(300);
/// Keys of one cache pair, read through its client-side cache and written by the same client.
const CACHE_KEYS: usize = 4;

/// What to run. [`LoadConfig::new`] gives the defaults (50 connections at once).
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The proxy's client address.
    pub addr: SocketAddr,
    /// Batches of 16 commands (`INCR`, `SET`, `GET`) on their own keys; odd ones in db 1.
    pub pipelined_clients: usize,
    /// `WATCH`/`GET`/`MULTI`/`SET`/`EXEC` on shared keys, and plain `MULTI`/`INCR`/`INCR`/`EXEC`.
    pub transaction_clients: usize,
    /// `SUBSCRIBE` + `PSUBSCRIBE`, RESP2, with an occasional `PING`.
    pub resp2_subscribers: usize,
    /// `HELLO 3`, `SUBSCRIBE` + `PSUBSCRIBE`, with an occasional `PING` / `GET` while subscribed.
    pub resp3_subscribers: usize,
    /// Parked in `BLPOP`: half with timeout 0 (forever), half with 5 s (re-issued on nil).
    pub blpop_consumers: usize,
    /// Connect, one command, disconnect, repeat.
    pub churn_clients: usize,
    /// A writer and a reader thread on one socket, always >= 32 `INCR`s in flight.
    pub autopipeline_clients: usize,
    /// Mostly quiet sessions with state (name, db 2) that check it every 300 ms.
    pub idle_clients: usize,
    /// RESP2 client-side caching: a connection subscribed to `__redis__:invalidate` and one that
    /// redirects its invalidations there, reads through a local cache and writes the keys.
    pub cache_pairs: usize,
    /// Pause between rounds of the paced clients (pipelined, transactions, publisher, producer;
    /// churn waits 5x this). Default 5 ms.
    pub pace: Duration,
    /// Hard cap of the load phase: clients stop starting rounds after it even without `stop`.
    pub max_duration: Duration,
    /// After the stop (or `max_duration`), how long subscribers and consumers may take to receive
    /// everything that was published / produced. Default 15 s.
    pub drain_timeout: Duration,
    /// Prefix of every key, channel and client name: unique per test (e.g. `random_token(8)`).
    /// Letters, digits, `-` and `_` only (it is used inside a glob pattern).
    pub key_prefix: String,
    /// `AUTH <username> <password>` sent first on every connection, for a proxy whose listener
    /// requires client passwords (default: none).
    pub auth: Option<(String, String)>,
}

impl LoadConfig {
    /// The defaults: 10 pipelined, 6 transaction, 4 + 4 subscribers, 6 consumers, 6 churn,
    /// 4 autopipeline and 8 idle clients, one cache pair, one publisher and one producer (52
    /// connections).
    pub fn new(addr: SocketAddr, key_prefix: impl Into<String>) -> LoadConfig {
        LoadConfig {
            addr,
            pipelined_clients: 10,
            transaction_clients: 6,
            resp2_subscribers: 4,
            resp3_subscribers: 4,
            blpop_consumers: 6,
            churn_clients: 6,
            autopipeline_clients: 4,
            idle_clients: 8,
            cache_pairs: 1,
            pace: Duration::from_millis(5),
            max_duration: Duration::from_secs(120),
            drain_timeout: Duration::from_secs(15),
            key_prefix: key_prefix.into(),
            auth: None,
        }
    }

    fn subscribers(&self) -> usize {
        self.resp2_subscribers + self.resp3_subscribers
    }

    /// Client connections open at once (churn clients counted once each).
    pub fn connections(&self) -> usize {
        self.pipelined_clients
            + self.transaction_clients
            + self.subscribers()
            + self.blpop_consumers
            + self.churn_clients
            + self.autopipeline_clients
            + self.idle_clients
            + 2 * self.cache_pairs
            + usize::from(self.subscribers() > 0)
            + usize::from(self.blpop_consumers > 0)
    }
}

/// A running load. Dropping it without [`Load::stop`] only tells the clients to stop.
pub struct Load {
    sh: Arc<Shared>,
    workers: Vec<Worker>,
}

/// What [`Load::stop`] found.
#[derive(Debug)]
pub struct LoadReport {
    /// Every error reply, I/O error, unexpected EOF/disconnect, hang, wrong value, lost or
    /// duplicated item or message, each with the client that saw it and the time since start.
    pub errors: Vec<String>,
    /// Successful, checked operations (replies, messages, items).
    pub operations: u64,
    /// Sessions that were silently reset or had to be reopened. Clients never reconnect (a
    /// disconnect is an error and the client stops), so this counts sessions whose state (client
    /// name) vanished behind their back. Must stay 0.
    pub reconnects: u64,
    /// Per-workload counts, for failure messages.
    pub details: String,
}

impl LoadReport {
    /// No error, no reconnect, and some work done.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty() && self.reconnects == 0 && self.operations > 0
    }

    /// Panics unless [`LoadReport::is_clean`], listing up to 20 errors and the details.
    #[track_caller]
    pub fn assert_clean(&self) {
        if self.is_clean() {
            return;
        }
        let mut msg = format!(
            "the load was not clean: {} errors, {} reconnects, {} operations\n",
            self.errors.len(),
            self.reconnects,
            self.operations
        );
        for e in self.errors.iter().take(20) {
            let _ = writeln!(msg, "  {e}");
        }
        if self.errors.len() > 20 {
            let _ = writeln!(msg, "  ... and {} more", self.errors.len() - 20);
        }
        let _ = write!(msg, "details:\n{}", self.details);
        panic!("{msg}");
    }
}

impl Load {
    /// Starts every client and returns once each is connected and has done one successful round
    /// (subscribers confirmed, consumers parked in BLPOP as `CLIENT LIST` shows), and the
    /// publisher and producer have started. Failures are recorded for the report, not panics.
    pub fn start(config: LoadConfig) -> Load {
        let sh = Arc::new(Shared::new(config));
        let cfg = sh.cfg.clone();
        let mut workers = Vec::new();
        for i in 0..cfg.pipelined_clients {
            workers.push(spawn(&sh, "pipelined", i, move |sh, who, out| {
                pipelined(sh, who, i, out)
            }));
        }
        for i in 0..cfg.transaction_clients {
            workers.push(spawn(&sh, "transactions", i, move |sh, who, out| {
                transactions(sh, who, i, out)
            }));
        }
        for i in 0..cfg.resp2_subscribers {
            workers.push(spawn(&sh, "sub-resp2", i, |sh, who, out| {
                subscriber(sh, who, false, out)
            }));
        }
        for i in 0..cfg.resp3_subscribers {
            workers.push(spawn(&sh, "sub-resp3", i, |sh, who, out| {
                subscriber(sh, who, true, out)
            }));
        }
        for i in 0..cfg.blpop_consumers {
            let timeout = if i % 2 == 0 {
                Duration::ZERO
            } else {
                BLPOP_TIMEOUT
            };
            workers.push(spawn(&sh, "blpop", i, move |sh, who, out| {
                consumer(sh, who, timeout, out)
            }));
        }
        for i in 0..cfg.churn_clients {
            workers.push(spawn(&sh, "churn", i, move |sh, who, out| {
                churn(sh, who, i, out)
            }));
        }
        for i in 0..cfg.autopipeline_clients {
            workers.push(spawn(&sh, "autopipeline", i, move |sh, who, out| {
                autopipeline(sh, who, i, out)
            }));
        }
        for i in 0..cfg.idle_clients {
            workers.push(spawn(&sh, "idle", i, move |sh, who, out| {
                idle(sh, who, i, out)
            }));
        }
        for i in 0..cfg.cache_pairs {
            workers.push(spawn(&sh, "cache", i, move |sh, who, out| {
                cache_pair(sh, who, i, out)
            }));
        }
        let first_wave = workers.len();
        wait_ready(&sh, first_wave, "clients");
        if cfg.blpop_consumers > 0 {
            wait_consumers_parked(&sh);
        }

        // Subscribers are confirmed and consumers parked: messages and items may flow.
        sh.go.store(true, Ordering::SeqCst);
        if cfg.subscribers() > 0 {
            workers.push(spawn(&sh, "publisher", 0, |sh, who, out| {
                let r = publisher(sh, who, out);
                lock(&sh.publish).done = true;
                r
            }));
        }
        if cfg.blpop_consumers > 0 {
            workers.push(spawn(&sh, "producer", 0, |sh, who, out| {
                let r = producer(sh, who, out);
                sh.produce_done.store(true, Ordering::SeqCst);
                r
            }));
        }
        wait_ready(&sh, workers.len(), "publisher and producer");
        Load { sh, workers }
    }

    /// Successful operations so far (checked replies, messages and items).
    pub fn progress(&self) -> u64 {
        self.sh.ops.load(Ordering::Relaxed)
    }

    /// Errors recorded so far (for tests that want to fail fast).
    pub fn errors_so_far(&self) -> u64 {
        self.sh.error_total.load(Ordering::Relaxed)
    }

    /// Signals stop, lets in-flight work finish (subscribers and consumers drain, bounded by
    /// `drain_timeout`), joins every thread (bounded) and runs the final checks.
    pub fn stop(mut self) -> LoadReport {
        let sh = self.sh.clone();
        let stopped = Instant::now();
        let _ = sh.stop_at.set(stopped);
        sh.stop.store(true, Ordering::SeqCst);
        let ran = stopped.duration_since(sh.t0);
        let workers = std::mem::take(&mut self.workers);

        let join_deadline = sh.drain_deadline() + JOIN_GRACE;
        let all_done = |ws: &[Worker]| ws.iter().all(|w| w.handle.is_finished());
        if !wait_until(
            join_deadline.saturating_duration_since(Instant::now()),
            || all_done(&workers),
        ) {
            // Unblock whatever is stuck, so the threads end and report what they saw.
            for w in workers.iter().filter(|w| !w.handle.is_finished()) {
                sh.error(
                    &w.who,
                    "still running at the join deadline; its socket is shut down",
                );
            }
            for s in lock(&sh.sockets).values() {
                let _ = s.shutdown(Shutdown::Both);
            }
            wait_until(Duration::from_secs(5), || all_done(&workers));
        }
        let mut outcomes: Vec<(&'static str, String, Outcome)> = Vec::new();
        for w in workers {
            if !w.handle.is_finished() {
                sh.error(&w.who, "thread did not finish; abandoned");
                continue;
            }
            match w.handle.join() {
                Ok(o) => outcomes.push((w.kind, w.who, o)),
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    sh.error(&w.who, format!("thread panicked: {msg}"));
                }
            }
        }
        let joined = stopped.elapsed();

        let mut details = String::new();
        final_checks(&sh, &outcomes, &mut details);

        let operations = sh.ops.load(Ordering::Relaxed);
        let total_errors = sh.error_total.load(Ordering::Relaxed);
        let mut errors = lock(&sh.errors).clone();
        if total_errors as usize > errors.len() {
            errors.push(format!(
                "... {} more errors not kept",
                total_errors as usize - errors.len()
            ));
        }
        let mut head = format!(
            "load ran {:.1}s, stop took {:.1}s; {} connections; {} operations; {} errors\n",
            ran.as_secs_f64(),
            joined.as_secs_f64(),
            sh.cfg.connections(),
            operations,
            total_errors
        );
        head.push_str(&summarize(&outcomes));
        head.push_str(&details);
        LoadReport {
            errors,
            operations,
            reconnects: sh.reconnects.load(Ordering::Relaxed),
            details: head,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.sh.stop.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state, clients, bookkeeping
// ---------------------------------------------------------------------------------------------

struct Shared {
    cfg: LoadConfig,
    t0: Instant,
    stop: AtomicBool,
    stop_at: OnceLock<Instant>,
    /// Publisher and producer may begin (subscribers confirmed, consumers parked).
    go: AtomicBool,
    ops: AtomicU64,
    ready: AtomicUsize,
    not_ready: AtomicUsize,
    errors: Mutex<Vec<String>>,
    error_total: AtomicU64,
    reconnects: AtomicU64,
    /// Clones of every open client socket, to unblock stuck threads at the end.
    sockets: Mutex<HashMap<u64, TcpStream>>,
    next_socket: AtomicU64,
    publish: Mutex<PublishLog>,
    produce_done: AtomicBool,
}

impl Shared {
    fn new(cfg: LoadConfig) -> Shared {
        Shared {
            cfg,
            t0: Instant::now(),
            stop: AtomicBool::new(false),
            stop_at: OnceLock::new(),
            go: AtomicBool::new(false),
            ops: AtomicU64::new(0),
            ready: AtomicUsize::new(0),
            not_ready: AtomicUsize::new(0),
            errors: Mutex::new(Vec::new()),
            error_total: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            sockets: Mutex::new(HashMap::new()),
            next_socket: AtomicU64::new(0),
            publish: Mutex::new(PublishLog::default()),
            produce_done: AtomicBool::new(false),
        }
    }

    fn prefix(&self) -> &str {
        &self.cfg.key_prefix
    }

    /// Clients start no new round: `stop` was called or `max_duration` passed.
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.t0.elapsed() >= self.cfg.max_duration
    }

    /// When subscribers and consumers give up waiting for what is still owed to them.
    fn drain_deadline(&self) -> Instant {
        let cap = self.t0 + self.cfg.max_duration;
        let stop = self.stop_at.get().copied().unwrap_or(cap).min(cap);
        stop + self.cfg.drain_timeout
    }

    fn op(&self) {
        self.ops.fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self, who: &str, msg: impl Display) {
        self.error_total.fetch_add(1, Ordering::Relaxed);
        let mut errors = lock(&self.errors);
        if errors.len() < MAX_STORED_ERRORS {
            errors.push(format!(
                "[+{:.3}s] {who}: {msg}",
                self.t0.elapsed().as_secs_f64()
            ));
        }
    }

    /// Sleeps `d` (pacing inside load loops only), cut short by the stop flag.
    fn pause(&self, d: Duration) {
        let end = Instant::now() + d;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stopping() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts a client as started (or as failed to start, if dropped unmarked).
struct Ready<'a> {
    sh: &'a Shared,
    done: bool,
}

impl<'a> Ready<'a> {
    fn new(sh: &'a Shared) -> Ready<'a> {
        Ready { sh, done: false }
    }

    fn mark(&mut self) {
        if !self.done {
            self.done = true;
            self.sh.ready.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Ready<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.sh.not_ready.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn wait_ready(sh: &Shared, expected: usize, what: &str) {
    let settled = || sh.ready.load(Ordering::SeqCst) + sh.not_ready.load(Ordering::SeqCst);
    wait_until(READY_TIMEOUT, || settled() >= expected);
    let ready = sh.ready.load(Ordering::SeqCst);
    if ready < expected {
        sh.error(
            "load",
            format!(
                "only {ready} of {expected} clients did a first successful round \
                 (waiting for the {what}, {READY_TIMEOUT:?})"
            ),
        );
    }
}

/// Waits until `CLIENT LIST` (through the proxy) shows every consumer blocked in BLPOP (skipped if
/// the user may not run `CLIENT LIST`).
fn wait_consumers_parked(sh: &Arc<Shared>) {
    let Ok(mut c) = Client::connect(sh, "load-control") else {
        return;
    };
    let want = sh.cfg.blpop_consumers;
    let name_prefix = format!("name={}-blpop-", sh.prefix());
    let mut seen = 0;
    let mut last = Frame::Null;
    let ok = wait_until(Duration::from_secs(10), || {
        let Ok(f) = c.cmd(&["CLIENT", "LIST"]) else {
            return true;
        };
        if f.is_error() {
            // Not allowed for this user (e.g. NOPERM): the check is skipped.
            seen = want;
            return true;
        }
        seen = f
            .as_str()
            .unwrap_or("")
            .lines()
            .filter(|l| l.contains(&name_prefix) && l.contains(" cmd=blpop "))
            .count();
        last = f;
        seen >= want
    });
    if !ok || seen < want {
        sh.error(
            "load-control",
            format!("only {seen} of {want} consumers parked in BLPOP; CLIENT LIST: {last:?}"),
        );
    }
}

/// The connection is gone or out of step; the error is already recorded.
struct Dead;

type Step<T> = Result<T, Dead>;

/// One client connection that records what goes wrong under its name.
struct Client {
    who: String,
    conn: RespConn,
    sh: Arc<Shared>,
    socket: Option<u64>,
    timeout: Duration,
}

impl Client {
    fn connect(sh: &Arc<Shared>, who: &str) -> Step<Client> {
        match RespConn::try_connect(sh.cfg.addr) {
            Ok(conn) => {
                let socket = conn.tcp().try_clone().ok().map(|s| {
                    let id = sh.next_socket.fetch_add(1, Ordering::Relaxed);
                    lock(&sh.sockets).insert(id, s);
                    id
                });
                let _ = conn.tcp().set_write_timeout(Some(REPLY_TIMEOUT));
                let mut c = Client {
                    who: who.to_string(),
                    conn,
                    sh: sh.clone(),
                    socket,
                    timeout: REPLY_TIMEOUT,
                };
                if let Some((user, password)) = &sh.cfg.auth {
                    let f = c.cmd(&["AUTH", user, password])?;
                    if !is_ok(&f) {
                        c.err(format!("AUTH as {user:?} answered {f:?}"));
                        return Err(Dead);
                    }
                }
                Ok(c)
            }
            Err(e) => {
                sh.error(who, format!("connect to {} failed: {e}", sh.cfg.addr));
                Err(Dead)
            }
        }
    }

    fn err(&self, msg: impl Display) {
        self.sh.error(&self.who, msg);
    }

    /// Name given with `CLIENT SETNAME` (unique in the Redis instance).
    fn client_name(&self) -> String {
        format!("{}-{}", self.sh.prefix(), self.who)
    }

    fn set_timeout(&mut self, t: Duration) {
        if self.timeout != t {
            self.timeout = t;
            self.conn.set_read_timeout(Some(t));
        }
    }

    fn send_raw(&mut self, bytes: &[u8], what: &str) -> Step<()> {
        self.conn.try_send_raw(bytes).map_err(|e| {
            self.err(format!("write of {what} failed: {e}"));
            Dead
        })
    }

    fn send(&mut self, args: &[&str]) -> Step<()> {
        self.send_raw(&encode_cmd(args), args[0])
    }

    /// Reads one reply, waiting at most [`REPLY_TIMEOUT`].
    fn read(&mut self, what: &str) -> Step<Frame> {
        self.set_timeout(REPLY_TIMEOUT);
        self.conn.try_read_reply().map_err(|e| {
            self.io_error(&e, what);
            Dead
        })
    }

    /// Reads one frame if one comes within `wait`.
    fn poll(&mut self, wait: Duration, what: &str) -> Step<Option<Frame>> {
        self.set_timeout(wait);
        match self.conn.try_read_reply() {
            Ok(f) => Ok(Some(f)),
            Err(e) if is_timeout(&e) => Ok(None),
            Err(e) => {
                self.io_error(&e, what);
                Err(Dead)
            }
        }
    }

    fn io_error(&self, e: &io::Error, what: &str) {
        let how = if is_timeout(e) {
            format!("no reply within {REPLY_TIMEOUT:?}")
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            "disconnected".to_string()
        } else {
            format!("{:?}", e.kind())
        };
        self.err(format!("{how} while waiting for {what}: {e}"));
    }

    fn cmd(&mut self, args: &[&str]) -> Step<Frame> {
        self.send(args)?;
        self.read(args[0])
    }

    /// Runs a command whose reply must be `expected`; a different reply is recorded (the client
    /// goes on) and gives `false`.
    fn expect(&mut self, args: &[&str], expected: &Frame) -> Step<bool> {
        let f = self.cmd(args)?;
        Ok(self.check(&f, expected, &args.join(" ")))
    }

    fn check(&self, got: &Frame, expected: &Frame, what: &str) -> bool {
        if got == expected {
            self.sh.op();
            true
        } else {
            self.err(format!("{what}: got {got:?}, expected {expected:?}"));
            false
        }
    }

    /// A setup step: a wrong reply is recorded and ends the client.
    fn setup(&mut self, args: &[&str], ok: impl Fn(&Frame) -> bool) -> Step<Frame> {
        let f = self.cmd(args)?;
        if ok(&f) {
            self.sh.op();
            Ok(f)
        } else {
            self.err(format!("setup {}: unexpected reply {f:?}", args.join(" ")));
            Err(Dead)
        }
    }

    fn setup_name(&mut self) -> Step<()> {
        let name = self.client_name();
        self.setup(&["CLIENT", "SETNAME", &name], is_ok).map(drop)
    }

    /// `CLIENT GETNAME` still answers the name this session set: its state was not reset.
    fn check_name(&mut self) -> Step<()> {
        let name = self.client_name();
        let f = self.cmd(&["CLIENT", "GETNAME"])?;
        if f == Frame::bulk(&name) {
            self.sh.op();
        } else {
            if f.is_null() {
                self.sh.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            self.err(format!(
                "CLIENT GETNAME answered {f:?}, expected {name:?}: session state lost"
            ));
        }
        Ok(())
    }

    /// After QUIT: the peer must close the connection within `within`.
    fn expect_closed(&mut self, within: Duration) -> Step<()> {
        self.set_timeout(within);
        match self.conn.try_read_reply() {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(())
            }
            Ok(f) => {
                self.err(format!("reply {f:?} after QUIT's +OK"));
                Err(Dead)
            }
            Err(e) => {
                self.err(format!("connection not closed after QUIT: {e}"));
                Err(Dead)
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(id) = self.socket {
            lock(&self.sh.sockets).remove(&id);
        }
    }
}

fn is_ok(f: &Frame) -> bool {
    *f == Frame::simple("OK")
}

fn ok() -> Frame {
    Frame::simple("OK")
}

fn queued() -> Frame {
    Frame::simple("QUEUED")
}

/// A bulk string holding an integer.
/// A counter's value as `GET` answers it; a key never written (nil) counts 0.
fn bulk_i64(f: &Frame) -> Option<i64> {
    match f {
        Frame::Bulk(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Frame::Null => Some(0),
        _ => None,
    }
}

/// Whether a final value is right given `done` successes and `maybe` outcomes not known.
fn within(value: i64, done: u64, maybe: u64) -> bool {
    value >= done as i64 && value <= (done + maybe) as i64
}

/// What one client thread hands back.
#[derive(Default)]
struct Outcome {
    /// Counters summed per workload for the details.
    counts: BTreeMap<&'static str, u64>,
    /// A line about this client for the details.
    line: Option<String>,
    /// Transactions: commits, and outcomes not known, per shared key.
    tx_commits: Vec<u64>,
    tx_ambiguous: Vec<u64>,
    /// BLPOP consumer: items it received, and whether it got its stop sentinel.
    consumed: Vec<String>,
    sentinel: bool,
    /// Producer: items pushed, and items whose push had an unknown outcome.
    produced: Vec<String>,
    maybe_produced: Vec<String>,
}

impl Outcome {
    fn add(&mut self, counter: &'static str, n: u64) {
        *self.counts.entry(counter).or_default() += n;
    }
}

struct Worker {
    kind: &'static str,
    who: String,
    handle: JoinHandle<Outcome>,
}

fn spawn(
    sh: &Arc<Shared>,
    kind: &'static str,
    i: usize,
    body: impl FnOnce(&Arc<Shared>, &str, &mut Outcome) -> Step<()> + Send + 'static,
) -> Worker {
    let who = format!("{kind}-{i}");
    let sh = sh.clone();
    let name = who.clone();
    let handle = std::thread::Builder::new()
        .name(format!("load-{who}"))
        .stack_size(256 * 1024)
        .spawn(move || {
            let mut out = Outcome::default();
            let _ = body(&sh, &name, &mut out);
            out
        })
        .expect("spawn load thread");
    Worker { kind, who, handle }
}

// ---------------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------------

enum PipeExpect {
    Incr,
    Set,
    Get(u64),
}

/// Batches of 16 commands on the client's own keys: every INCR is the previous value + 1, every
/// GET answers what this client just SET. Odd clients work in db 1 (SELECT must survive moves).
fn pipelined(sh: &Arc<Shared>, who: &str, i: usize, out: &mut Outcome) -> Step<()> {
    let mut ready = Ready::new(sh);
    let key = format!("{}:pipe:{i}", sh.prefix());
    let skey = format!("{key}:s");
    let mut c = Client::connect(sh, who)?;
    c.setup_name()?;
    let db = if i % 2 == 1 { "1" } else { "0" };
    c.setup(&["SELECT", db], is_ok)?;
    c.setup(&["DEL", &key, &skey], |f| f.as_int().is_some())?;

    let incr = encode_cmd(&["INCR", key.as_str()]);
    let get = encode_cmd(&["GET", skey.as_str()]);
    let mut counter: Option<i64> = Some(0);
    let (mut incrs, mut ambiguous, mut seq) = (0u64, 0u64, 0u64);
    for _ in 0..MAX_ROUNDS {
        if sh.stopping() {
            break;
        }
        let mut batch = Vec::with_capacity(PIPELINE_BATCH * 40);
        let mut expect = Vec::with_capacity(PIPELINE_BATCH);
        for j in 0..PIPELINE_BATCH {
            match j % 4 {
                1 => {
                    seq += 1;
                    batch.extend(encode_cmd(&["SET", skey.as_str(), &seq.to_string()]));
                    expect.push(PipeExpect::Set);
                }
                3 => {
                    batch.extend_from_slice(&get);
                    expect.push(PipeExpect::Get(seq));
                }
                _ => {
                    batch.extend_from_slice(&incr);
                    expect.push(PipeExpect::Incr);
                }
            }
        }
        c.send_raw(&batch, "a pipelined batch")?;
        let mut set_ok = true;
        for e in expect {
            match e {
                PipeExpect::Incr => {
                    let f = c.read("INCR")?;
                    match (f.as_int(), counter) {
                        (Some(v), Some(prev)) if v == prev + 1 => sh.op(),
                        (Some(v), Some(prev)) => c.err(format!(
                            "INCR {key} answered {v}, expected {} (db {db})",
                            prev + 1
                        )),
                        (Some(_), None) => sh.op(),
                        (None, _) => {
                            c.err(format!("INCR {key}: unexpected reply {f:?}"));
                            ambiguous += 1;
                        }
                    }
                    if let Some(v) = f.as_int() {
                        incrs += 1;
                        counter = Some(v);
                    } else {
                        counter = None;
                    }
                }
                PipeExpect::Set => {
                    let f = c.read("SET")?;
                    set_ok &= c.check(&f, &ok(), &format!("SET {skey}"));
                }
                PipeExpect::Get(s) => {
                    let f = c.read("GET")?;
                    if set_ok {
                        c.check(&f, &Frame::bulk(s.to_string()), &format!("GET {skey}"));
                    }
                }
            }
        }
        out.add("batches", 1);
        ready.mark();
        sh.pause(sh.cfg.pace);
    }
    out.add("incrs", incrs);

    let f = c.cmd(&["GET", &key])?;
    match bulk_i64(&f) {
        Some(v) if within(v, incrs, ambiguous) => sh.op(),
        _ => c.err(format!(
            "final GET {key} (db {db}) = {f:?}, but {incrs} INCRs succeeded \
             ({ambiguous} with unknown outcome)"
        )),
    }
    c.check_name()
}

/// Optimistic increments of shared keys (WATCH/GET/MULTI/SET/EXEC, retried on a nil EXEC), and
/// plain MULTI/INCR/INCR/EXEC on the client's own key, whose array reply is checked.
fn transactions(sh: &Arc<Shared>, who: &str, i: usize, out: &mut Outcome) -> Step<()> {
    let mut ready = Ready::new(sh);
    let keys: Vec<String> = (0..TX_KEYS)
        .map(|k| format!("{}:tx:{k}", sh.prefix()))
        .collect();
    let plain = format!("{}:tx:plain:{i}", sh.prefix());
    out.tx_commits = vec![0; TX_KEYS];
    out.tx_ambiguous = vec![0; TX_KEYS];
    let mut c = Client::connect(sh, who)?;
    c.setup_name()?;
    c.setup(&["DEL", &plain], |f| f.as_int().is_some())?;

    let mut plain_value: Option<i64> = Some(0);
    let (mut plain_commits, mut plain_ambiguous) = (0u64, 0u64);
    for round in 0..MAX_ROUNDS as usize {
        if sh.stopping() {
            break;
        }
        if round % 4 == 3 {
            let mut b = encode_cmd(&["MULTI"]);
            b.extend(encode_cmd(&["INCR", &plain]));
            b.extend(encode_cmd(&["INCR", &plain]));
            b.extend(encode_cmd(&["EXEC"]));
            c.send_raw(&b, "MULTI/INCR/INCR/EXEC")?;
            let replies = [
                c.read("MULTI")?,
                c.read("INCR in MULTI")?,
                c.read("INCR in MULTI")?,
                c.read("EXEC")?,
            ];
            let exec = &replies[3];
            let opened = replies[0] == ok() && replies[1] == queued() && replies[2] == queued();
            let pair = exec
                .as_array()
                .filter(|_| matches!(exec, Frame::Array(_)))
                .and_then(|a| match a {
                    [Frame::Integer(x), Frame::Integer(y)] if *y == x + 1 => Some((*x, *y)),
                    _ => None,
                });
            match (opened, pair, plain_value) {
                (true, Some((x, y)), Some(v)) if x == v + 1 => {
                    sh.op();
                    plain_commits += 1;
                    plain_value = Some(y);
                }
                (true, Some((_, y)), None) => {
                    sh.op();
                    plain_commits += 1;
                    plain_value = Some(y);
                }
                _ => {
                    let why = if exec.is_null() {
                        "EXEC of a MULTI without WATCH answered nil: the transaction was dropped"
                    } else {
                        "unexpected replies"
                    };
                    c.err(format!(
                        "MULTI/INCR {plain}/INCR/EXEC: {why}: {replies:?} (value was {plain_value:?})"
                    ));
                    plain_ambiguous += 1;
                    plain_value = None;
                    tx_cleanup(&mut c)?;
                }
            }
            out.add("plain_multi", 1);
        } else {
            let k = (i + round) % TX_KEYS;
            watched_increment(sh, &mut c, &keys[k], round % 2 == 0, k, out)?;
        }
        ready.mark();
        sh.pause(sh.cfg.pace);
    }

    let f = c.cmd(&["GET", &plain])?;
    match bulk_i64(&f) {
        Some(v) if within(v, 2 * plain_commits, 2 * plain_ambiguous) => sh.op(),
        _ => c.err(format!(
            "final GET {plain} = {f:?}, but {plain_commits} MULTI/INCR/INCR/EXEC committed \
             ({plain_ambiguous} with unknown outcome)"
        )),
    }
    c.check_name()
}

/// One optimistic increment of `key`, retried while EXEC answers nil (someone else won).
fn watched_increment(
    sh: &Shared,
    c: &mut Client,
    key: &str,
    pipelined: bool,
    k: usize,
    out: &mut Outcome,
) -> Step<()> {
    for attempt in 0..TX_RETRIES {
        if attempt > 0 && sh.stopping() {
            return Ok(());
        }
        if !c.expect(&["WATCH", key], &ok())? {
            return tx_cleanup(c);
        }
        let f = c.cmd(&["GET", key])?;
        let n = match &f {
            Frame::Null => 0,
            f => match bulk_i64(f) {
                Some(n) => n,
                None => {
                    c.err(format!("GET {key} (watched): unexpected reply {f:?}"));
                    return tx_cleanup(c);
                }
            },
        };
        let next = (n + 1).to_string();
        let set = ["SET", key, next.as_str()];
        let (multi, queued_reply, exec) = if pipelined {
            let mut b = encode_cmd(&["MULTI"]);
            b.extend(encode_cmd(&set));
            b.extend(encode_cmd(&["EXEC"]));
            c.send_raw(&b, "MULTI/SET/EXEC")?;
            (
                c.read("MULTI")?,
                c.read("SET in MULTI")?,
                Some(c.read("EXEC")?),
            )
        } else {
            let multi = c.cmd(&["MULTI"])?;
            let q = if multi == ok() {
                c.cmd(&set)?
            } else {
                Frame::Null
            };
            let exec = if multi == ok() && q == queued() {
                Some(c.cmd(&["EXEC"])?)
            } else {
                None
            };
            (multi, q, exec)
        };
        let opened = multi == ok() && queued_reply == queued();
        match exec {
            Some(Frame::Array(a)) if opened && a == [ok()] => {
                sh.op();
                out.tx_commits[k] += 1;
                return Ok(());
            }
            Some(Frame::Null) if opened => {
                // The watched key changed: retry, as an application would.
                out.add("watch_aborts", 1);
                continue;
            }
            exec => {
                c.err(format!(
                    "WATCH {key}/MULTI/SET/EXEC: MULTI {multi:?}, SET {queued_reply:?}, EXEC {exec:?}"
                ));
                out.tx_ambiguous[k] += 1;
                return tx_cleanup(c);
            }
        }
    }
    out.add("tx_gave_up", 1);
    Ok(())
}

/// Leaves any transaction and watch after an unexpected reply (their replies do not matter).
fn tx_cleanup(c: &mut Client) -> Step<()> {
    c.cmd(&["DISCARD"])?;
    c.cmd(&["UNWATCH"])?;
    Ok(())
}

/// What the publisher did, for the subscribers' final check.
#[derive(Default)]
struct PublishLog {
    /// The publisher has stopped (nothing more will be published).
    done: bool,
    /// Sequence numbers sent (0..attempted), whether or not PUBLISH answered.
    attempted: usize,
    /// Per sequence number: PUBLISH on the channel / the pattern channel answered an integer.
    chan_ok: Vec<bool>,
    pat_ok: Vec<bool>,
}

/// How many times each sequence number arrived.
#[derive(Default)]
struct SeqTally {
    counts: Vec<u32>,
    total: u64,
}

impl SeqTally {
    fn add(&mut self, seq: usize) {
        if seq >= self.counts.len() {
            self.counts.resize(seq + 1, 0);
        }
        self.counts[seq] += 1;
        self.total += 1;
    }

    fn missing(&self, published: &[bool]) -> Vec<usize> {
        published
            .iter()
            .enumerate()
            .filter(|(s, p)| **p && self.counts.get(*s).copied().unwrap_or(0) == 0)
            .map(|(s, _)| s)
            .collect()
    }

    fn has_all(&self, published: &[bool]) -> bool {
        published
            .iter()
            .enumerate()
            .all(|(s, p)| !*p || self.counts.get(s).copied().unwrap_or(0) > 0)
    }

    fn duplicates(&self) -> u64 {
        self.counts
            .iter()
            .map(|&c| u64::from(c.saturating_sub(1)))
            .sum()
    }

    fn never_sent(&self, attempted: usize) -> Vec<usize> {
        (attempted..self.counts.len())
            .filter(|&s| self.counts[s] > 0)
            .collect()
    }
}

enum SubRequest {
    Ping,
    Get,
}

/// SUBSCRIBE + PSUBSCRIBE, then receives every published sequence number on both, at least once
/// each, and nothing else. RESP3 subscribers run PING / GET while subscribed (their replies
/// interleave with the pushes); RESP2 subscribers PING (answered `["pong", ""]`).
fn subscriber(sh: &Arc<Shared>, who: &str, resp3: bool, out: &mut Outcome) -> Step<()> {
    let mut ready = Ready::new(sh);
    let p = sh.prefix();
    let chan = format!("{p}:chan");
    let pattern = format!("{p}:pchan.*");
    let pchan_prefix = format!("{p}:pchan.");
    let own = format!("{p}:sub:{who}");
    let mut c = Client::connect(sh, who)?;
    if resp3 {
        c.setup(&["HELLO", "3"], |f| {
            f.map_get("proto") == Some(&Frame::Integer(3))
        })?;
    }
    c.setup_name()?;
    c.setup(&["SET", &own, who], is_ok)?;
    let wrap = |items: Vec<Frame>| {
        if resp3 {
            Frame::Push(items)
        } else {
            Frame::Array(items)
        }
    };
    let confirm = |kind: &str, name: &str, n: i64| {
        wrap(vec![
            Frame::bulk(kind),
            Frame::bulk(name),
            Frame::Integer(n),
        ])
    };
    let f = c.cmd(&["SUBSCRIBE", &chan])?;
    if !c.check(&f, &confirm("subscribe", &chan, 1), "SUBSCRIBE") {
        return Err(Dead);
    }
    let f = c.cmd(&["PSUBSCRIBE", &pattern])?;
    if !c.check(&f, &confirm("psubscribe", &pattern, 2), "PSUBSCRIBE") {
        return Err(Dead);
    }
    ready.mark();

    let mut chan_tally = SeqTally::default();
    let mut pat_tally = SeqTally::default();
    let mut pending: VecDeque<(Instant, SubRequest)> = VecDeque::new();
    let mut requests = 0u64;
    let every = if resp3 {
        Duration::from_millis(100)
    } else {
        Duration::from_millis(250)
    };
    let mut last_request = Instant::now();
    let mut last_complete_check = Instant::now();
    let pong2 = Frame::Array(vec![Frame::bulk("pong"), Frame::bulk("")]);
    let mut alive = true;
    for _ in 0..MAX_ROUNDS {
        let now = Instant::now();
        if sh.stopping() {
            if now >= sh.drain_deadline() {
                break;
            }
            if pending.is_empty() && now.duration_since(last_complete_check) >= POLL {
                last_complete_check = now;
                let log = lock(&sh.publish);
                if log.done && chan_tally.has_all(&log.chan_ok) && pat_tally.has_all(&log.pat_ok) {
                    break;
                }
            }
        } else if pending.is_empty() && now.duration_since(last_request) >= every {
            let req = if resp3 && requests % 2 == 1 {
                c.send(&["GET", &own])?;
                SubRequest::Get
            } else {
                c.send(&["PING"])?;
                SubRequest::Ping
            };
            requests += 1;
            pending.push_back((now, req));
            last_request = now;
        }
        if let Some((sent, _)) = pending.front()
            && now.duration_since(*sent) > REPLY_TIMEOUT
        {
            c.err(format!("no reply to PING/GET within {REPLY_TIMEOUT:?}"));
            alive = false;
            break;
        }
        let f = match c.poll(POLL, "messages") {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(Dead) => {
                alive = false;
                break;
            }
        };
        let items = match (&f, resp3) {
            (Frame::Push(items), true) | (Frame::Array(items), false) => Some(items.as_slice()),
            _ => None,
        };
        let kind = items
            .and_then(|i| i.first())
            .and_then(Frame::as_str)
            .unwrap_or("");
        let message = match (kind, items) {
            ("message", Some([_, ch, payload])) => Some((None, ch, payload)),
            ("pmessage", Some([_, pat, ch, payload])) => Some((Some(pat), ch, payload)),
            _ => None,
        };
        if let Some((pat, ch, payload)) = message {
            let ch = ch.as_str().unwrap_or("");
            let tally = match pat {
                None if ch == chan => &mut chan_tally,
                Some(pt)
                    if pt.as_str() == Some(pattern.as_str()) && ch.starts_with(&pchan_prefix) =>
                {
                    &mut pat_tally
                }
                _ => {
                    c.err(format!("a message it did not subscribe to: {f:?}"));
                    continue;
                }
            };
            match payload.as_str().and_then(|s| s.parse::<usize>().ok()) {
                Some(seq) if seq < MAX_SEQ => {
                    tally.add(seq);
                    sh.op();
                }
                _ => c.err(format!("a message with a bad payload: {f:?}")),
            }
            continue;
        }
        if (resp3 && f.is_push()) || (!resp3 && kind.ends_with("subscribe")) {
            c.err(format!("an unexpected push: {f:?}"));
            continue;
        }
        // Anything else answers the oldest request.
        let Some((_, req)) = pending.pop_front() else {
            c.err(format!("a reply with no request outstanding: {f:?}"));
            continue;
        };
        let expected = match (req, resp3) {
            (SubRequest::Ping, true) => Frame::simple("PONG"),
            (SubRequest::Ping, false) => pong2.clone(),
            (SubRequest::Get, _) => Frame::bulk(who),
        };
        c.check(&f, &expected, "PING/GET while subscribed");
    }

    let log = lock(&sh.publish);
    if !log.done {
        c.err("the publisher had not finished when this subscriber stopped");
    }
    let mut line = format!("{who}:");
    for (label, name, tally, published) in [
        ("channel", &chan, &chan_tally, &log.chan_ok),
        ("pattern", &pattern, &pat_tally, &log.pat_ok),
    ] {
        let missing = tally.missing(published);
        let required = published.iter().filter(|p| **p).count();
        if !missing.is_empty() {
            c.err(format!(
                "{label} {name}: {} of {required} published messages never arrived \
                 (first: {:?}){}",
                missing.len(),
                &missing[..missing.len().min(10)],
                if alive { "" } else { " (connection lost)" }
            ));
        }
        let never = tally.never_sent(log.attempted);
        if !never.is_empty() {
            c.err(format!(
                "{label} {name}: received sequence numbers never published: {:?}",
                &never[..never.len().min(10)]
            ));
        }
        let dupes = tally.duplicates();
        out.add("messages", tally.total);
        out.add("duplicates", dupes);
        let _ = write!(
            line,
            " {label} {}/{required} (dupes {dupes})",
            required - missing.len().min(required)
        );
    }
    drop(log);
    out.add("requests", requests);
    let _ = write!(line, ", {requests} PING/GET");
    out.line = Some(line);
    if alive && resp3 {
        let f = c.cmd(&["GET", &own])?;
        c.check(&f, &Frame::bulk(who), "final GET while subscribed");
    }
    Ok(())
}

/// Publishes 0, 1, 2, ... on the channel and on a pattern-matched channel; every tenth round also
/// on two channels nobody subscribed to (their PUBLISH must answer 0).
fn publisher(sh: &Arc<Shared>, who: &str, out: &mut Outcome) -> Step<()> {
    let mut ready = Ready::new(sh);
    let p = sh.prefix();
    let chan = format!("{p}:chan");
    let pchan = format!("{p}:pchan.x");
    let nobody = [format!("{p}:other"), format!("{p}:pchanx")];
    let subscribers = sh.cfg.subscribers() as i64;
    let mut c = Client::connect(sh, who)?;
    c.setup_name()?;
    if !wait_until(READY_TIMEOUT, || {
        sh.go.load(Ordering::SeqCst) || sh.stopping()
    }) || sh.stopping()
    {
        return Ok(());
    }
    let mut receivers = (i64::MAX, i64::MIN);
    let mut short = 0u64;
    for seq in 0..MAX_ROUNDS as usize {
        if sh.stopping() {
            break;
        }
        let s = seq.to_string();
        let extra = seq % 10 == 0;
        let mut b = encode_cmd(&["PUBLISH", &chan, &s]);
        b.extend(encode_cmd(&["PUBLISH", &pchan, &s]));
        if extra {
            for n in &nobody {
                b.extend(encode_cmd(&["PUBLISH", n, &s]));
            }
        }
        lock(&sh.publish).attempted = seq + 1;
        c.send_raw(&b, "PUBLISH")?;
        let mut oks = [false; 2];
        for (k, name) in [&chan, &pchan].into_iter().enumerate() {
            let f = c.read("PUBLISH")?;
            match f.as_int() {
                Some(n) => {
                    sh.op();
                    oks[k] = true;
                    receivers = (receivers.0.min(n), receivers.1.max(n));
                    if n < subscribers {
                        short += 1;
                    }
                }
                None => c.err(format!("PUBLISH {name} {s}: unexpected reply {f:?}")),
            }
        }
        {
            let mut log = lock(&sh.publish);
            log.chan_ok.push(oks[0]);
            log.pat_ok.push(oks[1]);
        }
        if extra {
            for n in &nobody {
                let f = c.read("PUBLISH")?;
                c.check(
                    &f,
                    &Frame::Integer(0),
                    &format!("PUBLISH {n} (nobody subscribed)"),
                );
            }
        }
        out.add("published", 1);
        ready.mark();
        sh.pause(sh.cfg.pace);
    }
    out.add("publish_below_subscribers", short);
    if receivers.0 <= receivers.1 {
        out.line = Some(format!(
            "{who}: PUBLISH reached {}..{} receivers (subscribers: {subscribers}); \
             {short} PUBLISHes reached fewer",
            receivers.0, receivers.1
        ));
    }
    Ok(())
}

/// LPUSHes unique items at a modest rate; at the stop, waits until the queue is empty and pushes
/// one sentinel per consumer.
fn producer(sh: &Arc<Shared>, who: &str, out: &mut Outcome) -> Step<()> {
    let mut ready = Ready::new(sh);
    let queue = format!("{}:q", sh.prefix());
    let mut c = Client::connect(sh, who)?;
    c.setup_name()?;
    if !wait_until(READY_TIMEOUT, || {
        sh.go.load(Ordering::SeqCst) || sh.stopping()
    }) {
        return Ok(());
    }
    for n in 0..MAX_ROUNDS {
        if sh.stopping() {
            break;
        }
        let item = format!("item-{n}");
        let f = c.cmd(&["LPUSH", &queue, &item])?;
        if f.as_int().is_some_and(|len| len >= 1) {
            sh.op();
            out.produced.push(item);
            out.add("produced", 1);
        } else {
            c.err(format!("LPUSH {queue} {item}: unexpected reply {f:?}"));
            out.maybe_produced.push(item);
        }
        ready.mark();
        sh.pause(sh.cfg.pace);
    }
    // Consumers take the sentinels only once every item is gone.
    let mut len = Frame::Null;
    for _ in 0..MAX_ROUNDS {
        len = c.cmd(&["LLEN", &queue])?;
        if len == Frame::Integer(0) || Instant::now() >= sh.drain_deadline() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if len != Frame::Integer(0) {
        c.err(format!(
            "the queue was not drained by the consumers in time: LLEN {len:?}"
        ));
    }
    let sentinels: Vec<String> = (0..sh.cfg.blpop_consumers)
        .map(|k| format!("stop-{k}"))
        .collect();
    let mut args = vec!["LPUSH", queue.as_str()];
    args.extend(sentinels.iter().map(String::as_str));
    let f = c.cmd(&args)?;
    if f.as_int().is_none() {
        c.err(format!("LPUSH of the sentinels: unexpected reply {f:?}"));
    }
    Ok(())
}

/// Parked in `BLPOP queue <timeout>` until served; a 0 timeout must never answer nil, a 5 s one
/// only after about 5 s (then it is re-issued). Stops at its sentinel.
fn consumer(sh: &Arc<Shared>, who: &str, timeout: Duration, out: &mut Outcome) -> Step<()> {
    let mut ready = Ready::new(sh);
    let queue = format!("{}:q", sh.prefix());
    let t = timeout.as_secs().to_string();
    let mut c = Client::connect(sh, who)?;
    c.setup_name()?;
    c.setup(&["PING"], |f| *f == Frame::simple("PONG"))?;
    let blpop = encode_cmd(&["BLPOP", queue.as_str(), t.as_str()]);
    for _ in 0..MAX_ROUNDS {
        if Instant::now() >= sh.drain_deadline() {
            c.err("no sentinel before the drain deadline");
            return Ok(());
        }
        c.send_raw(&blpop, "BLPOP")?;
        let sent = Instant::now();
        ready.mark();
        let mut reply = None;
        for _ in 0..MAX_ROUNDS {
            if let Some(f) = c.poll(POLL, "BLPOP")? {
                reply = Some(f);
                break;
            }
            let now = Instant::now();
            if !timeout.is_zero() && now.duration_since(sent) > timeout + REPLY_TIMEOUT {
                c.err(format!(
                    "BLPOP {t} not answered after {:.1}s",
                    now.duration_since(sent).as_secs_f64()
                ));
                return Err(Dead);
            }
            if now >= sh.drain_deadline() {
                c.err(format!(
                    "BLPOP {t} still parked at the drain deadline (no sentinel came)"
                ));
                return Err(Dead);
            }
        }
        let Some(f) = reply else {
            c.err(format!("BLPOP {t}: no reply after {MAX_ROUNDS} polls"));
            return Err(Dead);
        };
        let waited = sent.elapsed();
        match &f {
            Frame::Array(a) if a.len() == 2 && a[0] == Frame::bulk(&queue) => {
                let item = a[1].as_str().unwrap_or("").to_string();
                sh.op();
                if item.starts_with("stop-") {
                    out.sentinel = true;
                    break;
                }
                out.consumed.push(item);
                out.add("items", 1);
            }
            Frame::Null if !timeout.is_zero() => {
                if waited + Duration::from_millis(250) < timeout {
                    c.err(format!(
                        "BLPOP {t} answered nil after only {:.2}s",
                        waited.as_secs_f64()
                    ));
                } else {
                    sh.op();
                }
                out.add("blpop_timeouts", 1);
            }
            _ => c.err(format!("BLPOP {t}: unexpected reply {f:?}")),
        }
    }
    c.check_name()
}

/// Connect, one command (SET, GET of what it set on an earlier connection, or GET + QUIT),
/// disconnect, repeat.
fn churn(sh: &Arc<Shared>, who: &str, i: usize, out: &mut Outcome) -> Step<()> {
    let mut ready = Ready::new(sh);
    let key = format!("{}:churn:{i}", sh.prefix());
    let mut last: Option<String> = None;
    let mut known = true;
    for n in 0..MAX_ROUNDS {
        if sh.stopping() {
            break;
        }
        out.add("connections", 1);
        let Ok(mut c) = Client::connect(sh, who) else {
            sh.pause(sh.cfg.pace * 5);
            continue;
        };
        let round = churn_round(&mut c, &key, n, &mut last, &mut known);
        drop(c);
        if round.is_ok() {
            ready.mark();
        }
        sh.pause(sh.cfg.pace * 5);
    }
    Ok(())
}

/// One command of a churn client on a fresh connection; `Ok(true)` if its reply was right.
fn churn_round(
    c: &mut Client,
    key: &str,
    n: u64,
    last: &mut Option<String>,
    known: &mut bool,
) -> Step<bool> {
    let expected_get = match last {
        Some(v) => Frame::bulk(v),
        None => Frame::Null,
    };
    match n % 3 {
        0 => {
            let v = format!("v{n}");
            let good = c.expect(&["SET", key, &v], &ok())?;
            *known = good;
            *last = Some(v);
            Ok(good)
        }
        1 => {
            let f = c.cmd(&["GET", key])?;
            Ok(!*known || c.check(&f, &expected_get, &format!("GET {key}")))
        }
        _ => {
            let mut b = encode_cmd(&["GET", key]);
            b.extend(encode_cmd(&["QUIT"]));
            c.send_raw(&b, "GET + QUIT")?;
            let f = c.read("GET")?;
            let good = !*known || c.check(&f, &expected_get, &format!("GET {key}"));
            let q = c.read("QUIT")?;
            let good = c.check(&q, &ok(), "QUIT") && good;
            c.expect_closed(REPLY_TIMEOUT)?;
            Ok(good)
        }
    }
}

#[derive(Default)]
struct AutoState {
    in_flight: usize,
    writer_done: bool,
    reader_done: bool,
}

/// One socket, a writer thread and a reader thread: the writer tops the `INCR`s in flight up to
/// 64 whenever they fall to 48, and the reader never takes the count of replies still owed below
/// 32 while the writer runs (it waits for the top-up instead); it checks that they count up by
/// one.
fn autopipeline(sh: &Arc<Shared>, who: &str, i: usize, out: &mut Outcome) -> Step<()> {
    let mut ready = Ready::new(sh);
    let key = format!("{}:auto:{i}", sh.prefix());
    let mut c = Client::connect(sh, who)?;
    c.setup_name()?;
    c.setup(&["DEL", &key], |f| f.as_int().is_some())?;
    c.setup(&["INCR", &key], |f| *f == Frame::Integer(1))?;
    let mut writer_stream = match c.conn.tcp().try_clone() {
        Ok(s) => s,
        Err(e) => {
            c.err(format!("try_clone: {e}"));
            return Err(Dead);
        }
    };
    let state = Arc::new((Mutex::new(AutoState::default()), Condvar::new()));
    let writer = {
        let state = state.clone();
        let sh = sh.clone();
        let who = who.to_string();
        let incr = encode_cmd(&["INCR", key.as_str()]);
        std::thread::Builder::new()
            .name(format!("load-{who}-writer"))
            .stack_size(256 * 1024)
            .spawn(move || {
                let (m, cv) = &*state;
                for _ in 0..MAX_ROUNDS {
                    let mut n = 0;
                    let mut st = lock(m);
                    for _ in 0..MAX_ROUNDS {
                        if sh.stopping() || st.reader_done {
                            break;
                        }
                        if st.in_flight <= AUTO_LOW_WATER {
                            n = AUTO_WINDOW - st.in_flight;
                            st.in_flight += n;
                            break;
                        }
                        st = cv
                            .wait_timeout(st, POLL)
                            .map(|(g, _)| g)
                            .unwrap_or_else(|e| e.into_inner().0);
                    }
                    drop(st);
                    if n == 0 {
                        break;
                    }
                    cv.notify_all();
                    if let Err(e) = writer_stream.write_all(&incr.repeat(n)) {
                        sh.error(&who, format!("write of {n} INCRs failed: {e}"));
                        lock(m).in_flight -= n;
                        break;
                    }
                }
                lock(m).writer_done = true;
                cv.notify_all();
            })
            .expect("spawn autopipeline writer")
    };

    let (m, cv) = &*state;
    let mut expected = 2i64;
    let mut incrs = 1u64;
    let mut min_in_flight = usize::MAX;
    let mut below = 0u64;
    let mut result = Ok(());
    for _ in 0..MAX_ROUNDS {
        {
            // While the writer runs, leave at least AUTO_MIN_IN_FLIGHT replies owed (the writer
            // tops up at AUTO_LOW_WATER, so this wait is rare); once it is done, drain them all.
            let mut st = lock(m);
            let wait_end = Instant::now() + REPLY_TIMEOUT;
            while st.in_flight <= AUTO_MIN_IN_FLIGHT && !st.writer_done && Instant::now() < wait_end
            {
                st = cv
                    .wait_timeout(st, POLL)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            if st.in_flight == 0 {
                break;
            }
        }
        let f = match c.read("an autopipelined INCR") {
            Ok(f) => f,
            Err(d) => {
                result = Err(d);
                break;
            }
        };
        match f.as_int() {
            Some(v) => {
                if v == expected {
                    sh.op();
                } else {
                    c.err(format!("INCR {key} answered {v}, expected {expected}"));
                }
                expected = v + 1;
                incrs += 1;
            }
            None => c.err(format!("INCR {key}: unexpected reply {f:?}")),
        }
        let mut st = lock(m);
        st.in_flight -= 1;
        if !sh.stopping() && ready.done {
            min_in_flight = min_in_flight.min(st.in_flight);
            if st.in_flight < AUTO_MIN_IN_FLIGHT {
                below += 1;
            }
        }
        if st.in_flight <= AUTO_LOW_WATER {
            cv.notify_all();
        }
        drop(st);
        ready.mark();
    }
    lock(m).reader_done = true;
    cv.notify_all();
    let _ = writer.join();
    out.add("incrs", incrs);
    out.add("replies_below_32_in_flight", below);
    let min = if min_in_flight == usize::MAX {
        "n/a".to_string()
    } else {
        min_in_flight.to_string()
    };
    out.line = Some(format!(
        "{who}: {incrs} INCRs, fewest in flight while running: {min} ({below} replies left fewer \
         than {AUTO_MIN_IN_FLIGHT})"
    ));
    result?;
    let f = c.cmd(&["GET", &key])?;
    match bulk_i64(&f) {
        Some(v) if v == incrs as i64 => sh.op(),
        _ => c.err(format!(
            "final GET {key} = {f:?}, but {incrs} INCRs answered"
        )),
    }
    c.check_name()
}

/// A quiet session with state (name, db 2, a key there) that checks it every 300 ms.
fn idle(sh: &Arc<Shared>, who: &str, i: usize, out: &mut Outcome) -> Step<()> {
    let mut ready = Ready::new(sh);
    let key = format!("{}:idle:{i}", sh.prefix());
    let mut c = Client::connect(sh, who)?;
    c.setup_name()?;
    c.setup(&["SELECT", "2"], is_ok)?;
    c.setup(&["SET", &key, who], is_ok)?;
    ready.mark();
    for n in 0..MAX_ROUNDS {
        sh.pause(IDLE_PERIOD);
        if sh.stopping() {
            break;
        }
        if n % 2 == 0 {
            c.expect(&["GET", &key], &Frame::bulk(who))?;
        } else {
            c.check_name()?;
        }
        out.add("checks", 1);
    }
    c.expect(&["GET", &key], &Frame::bulk(who))?;
    Ok(())
}

/// RESP2 client-side caching as clients do it: `target` subscribes to the invalidation channel,
/// the tracker redirects its invalidations there and reads through a local cache. It also writes
/// the keys, so every write must come back as an invalidation, or as a flush-everything after a
/// move. One thread owns both connections, so no invalidation can race a cache fill. At the end,
/// once the target has read everything sent before its final PING, every cached value must be
/// the server's: a stale one means an invalidation was lost.
fn cache_pair(sh: &Arc<Shared>, who: &str, i: usize, out: &mut Outcome) -> Step<()> {
    let mut ready = Ready::new(sh);
    let keys: Vec<String> = (0..CACHE_KEYS)
        .map(|k| format!("{}:cache:{i}:{k}", sh.prefix()))
        .collect();
    let mut target = Client::connect(sh, &format!("{who}-target"))?;
    let id = target.setup(&["CLIENT", "ID"], |f| f.as_int().is_some())?;
    let confirmation = Frame::Array(vec![
        Frame::bulk("subscribe"),
        Frame::bulk(INVALIDATION_CHANNEL),
        Frame::Integer(1),
    ]);
    target.setup(&["SUBSCRIBE", INVALIDATION_CHANNEL], |f| f == &confirmation)?;
    let mut tracker = Client::connect(sh, who)?;
    let id = id.as_int().unwrap_or_default().to_string();
    tracker.setup(&["CLIENT", "TRACKING", "ON", "REDIRECT", &id], is_ok)?;
    let mut cache: HashMap<String, Frame> = HashMap::new();
    ready.mark();
    for n in 0..MAX_ROUNDS {
        sh.pause(sh.cfg.pace);
        if sh.stopping() {
            break;
        }
        read_invalidations(&mut target, &mut cache, out, None)?;
        let key = &keys[n as usize % CACHE_KEYS];
        if n % 3 == 2 {
            tracker.expect(&["SET", key, &n.to_string()], &ok())?;
            out.add("writes", 1);
        } else if cache.contains_key(key) {
            out.add("cache hits", 1);
        } else {
            let f = tracker.cmd(&["GET", key])?;
            if f.is_error() {
                tracker.err(format!("GET {key}: {f:?}"));
            } else {
                sh.op();
                cache.insert(key.clone(), f);
            }
            out.add("reads", 1);
        }
    }
    target.send(&["PING"])?;
    let pong = Frame::Array(vec![Frame::bulk("pong"), Frame::bulk("")]);
    read_invalidations(&mut target, &mut cache, out, Some(&pong))?;
    for (key, cached) in &cache {
        let now = tracker.cmd(&["GET", key])?;
        if &now == cached {
            sh.op();
        } else {
            tracker.err(format!(
                "cached {key} = {cached:?}, but the server has {now:?}: an invalidation was lost"
            ));
        }
    }
    Ok(())
}

/// Applies the invalidations `target` has received: those already waiting, or with `until`,
/// every frame before that reply.
fn read_invalidations(
    target: &mut Client,
    cache: &mut HashMap<String, Frame>,
    out: &mut Outcome,
    until: Option<&Frame>,
) -> Step<()> {
    loop {
        let f = match until {
            Some(_) => target.read("invalidations")?,
            None => match target.poll(Duration::from_millis(1), "invalidations")? {
                Some(f) => f,
                None => return Ok(()),
            },
        };
        if Some(&f) == until {
            target.sh.op();
            return Ok(());
        }
        match f.as_array() {
            Some([kind, channel, keys])
                if kind.as_str() == Some("message")
                    && channel.as_str() == Some(INVALIDATION_CHANNEL) =>
            {
                match keys {
                    Frame::Null => {
                        cache.clear();
                        out.add("flushes", 1);
                    }
                    Frame::Array(keys) => {
                        for key in keys.iter().filter_map(Frame::as_str) {
                            cache.remove(key);
                        }
                        out.add("invalidations", 1);
                    }
                    other => target.err(format!("invalidation of {other:?}")),
                }
                target.sh.op();
            }
            _ => target.err(format!("not an invalidation: {f:?}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Final checks and the details
// ---------------------------------------------------------------------------------------------

fn final_checks(
    sh: &Arc<Shared>,
    outcomes: &[(&'static str, String, Outcome)],
    details: &mut String,
) {
    let of_kind = |kind: &'static str| {
        outcomes
            .iter()
            .filter(move |(k, _, _)| *k == kind)
            .map(|(_, who, o)| (who, o))
    };
    let mut control: Option<Client> = None;
    let mut control_cmd = |args: &[&str]| -> Option<Frame> {
        if control.is_none() {
            control = Client::connect(sh, "load-final-check").ok();
        }
        let r = control.as_mut()?.cmd(args);
        match r {
            Ok(f) => Some(f),
            Err(Dead) => {
                control = None;
                None
            }
        }
    };

    // Transactions: every shared key holds exactly the number of committed increments.
    if sh.cfg.transaction_clients > 0 {
        let mut line = String::from("transactions: commits per shared key:");
        for k in 0..TX_KEYS {
            let commits: u64 = of_kind("transactions")
                .map(|(_, o)| o.tx_commits.get(k).copied().unwrap_or(0))
                .sum();
            let maybe: u64 = of_kind("transactions")
                .map(|(_, o)| o.tx_ambiguous.get(k).copied().unwrap_or(0))
                .sum();
            let key = format!("{}:tx:{k}", sh.prefix());
            let Some(f) = control_cmd(&["GET", &key]) else {
                continue;
            };
            let value = if f.is_null() { Some(0) } else { bulk_i64(&f) };
            match value {
                Some(v) if within(v, commits, maybe) => sh.op(),
                _ => sh.error(
                    "transactions",
                    format!(
                        "final GET {key} = {f:?}, but {commits} EXECs committed an increment \
                         ({maybe} with unknown outcome)"
                    ),
                ),
            }
            let _ = write!(line, " {commits}");
        }
        details.push_str(&line);
        details.push('\n');
    }

    // BLPOP: consumed == produced, no duplicates, one sentinel per consumer.
    if sh.cfg.blpop_consumers > 0 {
        let producer = of_kind("producer").next().map(|(_, o)| o);
        let produced: HashSet<&str> = producer
            .map(|o| o.produced.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let maybe: HashSet<&str> = producer
            .map(|o| o.maybe_produced.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let mut by_item: HashMap<&str, Vec<&str>> = HashMap::new();
        for (who, o) in of_kind("blpop") {
            for item in &o.consumed {
                by_item.entry(item.as_str()).or_default().push(who.as_str());
            }
        }
        let mut dupes: Vec<String> = by_item
            .iter()
            .filter(|(_, w)| w.len() > 1)
            .map(|(item, w)| format!("{item} by {w:?}"))
            .collect();
        dupes.sort();
        if !dupes.is_empty() {
            sh.error(
                "blpop",
                format!(
                    "{} items consumed more than once: {:?}",
                    dupes.len(),
                    &dupes[..dupes.len().min(10)]
                ),
            );
        }
        let mut lost: Vec<&str> = produced
            .iter()
            .filter(|i| !by_item.contains_key(*i))
            .copied()
            .collect();
        lost.sort_by_key(|i| i.trim_start_matches("item-").parse::<u64>().unwrap_or(0));
        if !lost.is_empty() {
            let queue = format!("{}:q", sh.prefix());
            let left = control_cmd(&["LRANGE", &queue, "0", "-1"]);
            sh.error(
                "blpop",
                format!(
                    "{} of {} produced items were never consumed (first: {:?}); still in the \
                     queue: {left:?}",
                    lost.len(),
                    produced.len(),
                    &lost[..lost.len().min(10)]
                ),
            );
        }
        let mut unexpected: Vec<&str> = by_item
            .keys()
            .filter(|i| !produced.contains(*i) && !maybe.contains(*i))
            .copied()
            .collect();
        unexpected.sort();
        if !unexpected.is_empty() {
            sh.error(
                "blpop",
                format!(
                    "{} consumed items were never produced: {:?}",
                    unexpected.len(),
                    &unexpected[..unexpected.len().min(10)]
                ),
            );
        }
        let consumers: Vec<_> = of_kind("blpop").collect();
        let sentinels = consumers.iter().filter(|(_, o)| o.sentinel).count();
        let per: Vec<String> = consumers
            .iter()
            .map(|(who, o)| format!("{who}={}", o.consumed.len()))
            .collect();
        let _ = writeln!(
            details,
            "blpop: produced {} (+{} unknown), consumed {}, duplicates {}, lost {}, sentinels \
             {sentinels}/{}; per consumer: {}",
            produced.len(),
            maybe.len(),
            by_item.len(),
            dupes.len(),
            lost.len(),
            sh.cfg.blpop_consumers,
            per.join(" ")
        );
    }
}

/// Counters summed per workload, then the per-client lines.
fn summarize(outcomes: &[(&'static str, String, Outcome)]) -> String {
    let mut kinds: Vec<&'static str> = Vec::new();
    for (k, _, _) in outcomes {
        if !kinds.contains(k) {
            kinds.push(k);
        }
    }
    let mut s = String::new();
    for kind in kinds {
        let mut sum: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut n = 0;
        for (_, _, o) in outcomes.iter().filter(|(k, _, _)| *k == kind) {
            n += 1;
            for (c, v) in &o.counts {
                *sum.entry(c).or_default() += v;
            }
        }
        let counts: Vec<String> = sum.iter().map(|(c, v)| format!("{c}={v}")).collect();
        let _ = writeln!(s, "{kind} x{n}: {}", counts.join(", "));
    }
    for (_, _, o) in outcomes {
        if let Some(line) = &o.line {
            let _ = writeln!(s, "  {line}");
        }
    }
    s
}
