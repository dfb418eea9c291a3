//! Credential rotation: a state machine create → set → test → finish → drain → revoke over the
//! CURRENT / PENDING / PREVIOUS slots, run by one task per proxy.
//!
//! Every step is persisted before its effect and is idempotent, so a crash at any point restarts
//! into a state that still authenticates (CURRENT, then PENDING, then PREVIOUS are tried) and the
//! interrupted rotation resumes instead of a new one starting. Sessions move to the new
//! generation at their safe points (see [`crate::session`]); the old secret is revoked only when
//! no connection of the old generation is left, or at the drain deadline.

pub mod check;
pub mod client_cert;
pub mod fleet;
pub mod preflight;
pub mod secret;
pub mod state;
pub mod store;
pub mod strategy;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use metrics::{counter, gauge, histogram};
use serde_json::json;
use tokio::sync::{Notify, watch};

use crate::config::{Config, RotationConfig, RotationStrategy, RotationTiming, TimeoutsConfig};
use crate::credentials::{Generation, Generations};
use crate::metrics::Metrics;
use crate::upstream::connector::{self, ConnectError};
use crate::upstream::pool::Pool;
use crate::watch::FileWatch;
use fleet::Fleet;
use preflight::{Check, Report};
use state::{InFlight, Outcome, RotationState, Slot, Step, now_unix};
use store::{FileStore, Store, StoreError};
use strategy::{ServerControl, Strategy, SuccessorCheck, credential_of};

/// Why a rotation step failed. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(transparent)]
    Secret(#[from] secret::SecretGenError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Upstream(#[from] ConnectError),
    #[error("{what} was refused by the server ({code})")]
    Refused { what: String, code: String },
    #[error("the new credential did not authenticate: {0}")]
    TestFailed(String),
    #[error("credential source: {0}")]
    Source(String),
    #[error("the other user cannot take over: {0}")]
    Successor(String),
    #[error(transparent)]
    Cloud(#[from] crate::cloud::CloudError),
}

/// How many times a failing set/test/revoke is tried before the step gives up.
const STEP_ATTEMPTS: u32 = 5;
const STEP_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How many times a preflight runs its checks again when a rotation changed the credential
/// under it.
const PREFLIGHT_ATTEMPTS: u32 = 3;
/// After a failed rotation, the next scheduled attempt waits at least this long.
const FAILURE_BACKOFF: Duration = Duration::from_secs(5);

/// What `POST /v1/rotate` gets back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestAnswer {
    Started {
        id: String,
    },
    /// A rotation was already running; `escalated` when this request made it urgent.
    InProgress {
        id: String,
        escalated: bool,
    },
}

/// The rotation as other parts of the proxy see it (admin API, status).
#[derive(Clone)]
pub struct RotationHandle {
    shared: Arc<Shared>,
}

struct Shared {
    config: RotationConfig,
    store: Store,
    strategy: Strategy,
    generations: Arc<Generations>,
    pool: Pool,
    timeouts: TimeoutsConfig,
    metrics: Metrics,
    state: Mutex<RotationState>,
    /// Set by an urgent request while a rotation runs.
    escalate: AtomicBool,
    wake: Notify,
    /// The outcomes the state keeps, newest first: what `wait_for` looks for.
    finished: watch::Sender<Vec<Outcome>>,
    next_scheduled: Mutex<Option<SystemTime>>,
    /// The latest step error, shown in status until the rotation ends.
    last_error: Mutex<Option<String>>,
    /// When the current drain started, and how many old connections it began with.
    drain: Mutex<Option<(SystemTime, i64)>>,
    /// Fleet members that had not moved off the old generation at the rotator's last look.
    members_left: Mutex<Vec<String>>,
    /// The fleet store's last error, logged once until it changes.
    fleet_error: Mutex<Option<String>>,
    /// Proven upstream TLS material waiting to become a generation (see `change_tls`), and
    /// who waits for its id.
    tls_change: Mutex<Option<TlsChange>>,
    /// The last preflight's report.
    preflight: Mutex<Option<Report>>,
    /// When rotations happen and how long drains take: `config`'s, until a SIGHUP changes them
    /// (see [`RotationHandle::set_timing`]).
    timing: watch::Sender<RotationTiming>,
}

type TlsChange = (
    Arc<rustls::ClientConfig>,
    tokio::sync::oneshot::Sender<Result<u64, String>>,
);

/// Prepares rotation at start-up: loads (or creates) the state, finds the credential the server
/// accepts, and returns the generation to start with. `first` is the generation built from the
/// config (endpoint, TLS material, configured credential).
pub async fn prepare(
    config: &Config,
    rotation: &RotationConfig,
    first: Generation,
    metrics: &Metrics,
) -> Result<(Generation, RotationState, Store), RotationError> {
    let store = match &rotation.fleet {
        None => Store::File(FileStore::new(&rotation.state_dir)?),
        Some(fleet) => Store::Fleet(Arc::new(
            Fleet::new(fleet, &first, &config.timeouts, metrics)
                .map_err(|e| RotationError::Source(e.to_string()))?,
        )),
    };
    let loaded = match &store {
        Store::File(file) => file.load()?,
        Store::Fleet(fleet) => first_look_at_the_fleet(fleet).await?,
    };
    let state = match loaded {
        Some(state) => state,
        None => {
            let password = match (&rotation.strategy, &rotation.external) {
                (RotationStrategy::External, Some(ext)) => ext
                    .password
                    .resolve()
                    .map_err(|e| RotationError::Source(e.to_string()))?,
                _ => first
                    .credential
                    .password
                    .clone()
                    .expect("validated: rotation needs a password"),
            };
            let state = RotationState::new(Slot::new(first.credential.username.clone(), password));
            // A follower waits for the rotator to create the fleet's state.
            if store.fleet().is_none_or(|fleet| fleet.is_leader()) {
                match (store.save(&state).await, store.fleet()) {
                    (Ok(()), _) => {
                        tracing::info!(store = %store.describe(), "rotation state created")
                    }
                    // A write that does not hold yet (the store gone again, a replica not
                    // reached) is no reason not to serve: whoever leads next creates it.
                    (Err(err @ StoreError::Fleet { .. }), Some(fleet)) => {
                        tracing::warn!(error = %err, "cannot create the fleet's shared state yet; serving with the configured credential");
                        fleet.drop_lease();
                    }
                    (Err(err), _) => return Err(err.into()),
                }
            }
            state
        }
    };
    let (name, slot, probed) = slot_to_start_with(&state, &first, config, metrics).await;
    match &probed {
        Ok(_) if name != "current" => tracing::warn!(
            slot = name,
            user = slot.display_user(),
            "CURRENT was refused; starting with another slot"
        ),
        // Every slot refused: the pool says so as it fills.
        Err(ConnectError::Auth { .. }) => {}
        Err(err) => {
            tracing::warn!(error = %err, "upstream unreachable at start-up; starting with CURRENT")
        }
        Ok(_) => {}
    }
    let generation = first.with_credential(state.generation, credential_of(&slot));
    Ok((generation, state, store))
}

/// The slot a start uses, its name, and what a fresh connection made with it gave: the first
/// of CURRENT, PENDING and PREVIOUS the server accepts (a crash may have left it accepting
/// PENDING or PREVIOUS rather than CURRENT). A server that cannot be reached, or that refuses
/// them all, says nothing of the slots: then CURRENT, with that error.
async fn slot_to_start_with(
    state: &RotationState,
    first: &Generation,
    config: &Config,
    metrics: &Metrics,
) -> (
    &'static str,
    Slot,
    Result<connector::UpstreamConn, ConnectError>,
) {
    let mut refusal = None;
    for (name, slot) in state.candidates() {
        let generation = Arc::new(first.with_credential(state.generation, credential_of(slot)));
        match connector::probe(&generation, &config.timeouts, metrics).await {
            Ok(conn) => return (name, slot.clone(), Ok(conn)),
            Err(err @ ConnectError::Auth { .. }) => {
                refusal.get_or_insert(err);
            }
            Err(err) => return ("current", state.current.clone(), Err(err)),
        }
    }
    let refusal = refusal.expect("CURRENT is always a candidate");
    ("current", state.current.clone(), Err(refusal))
}

/// The `state` check of a state file: its directory takes a file (written, synced, removed).
fn state_file_check(file: &FileStore) -> Check {
    match file.check_writable() {
        Ok(()) => Check::ok("state", file.path().display().to_string()),
        Err(e) => Check::failed(
            "state",
            format!("cannot write in {}: {e}", file.path().display()),
        ),
    }
}

/// A fleet member's first look: seeks the rotator's lease and reads the shared state. A store
/// that cannot be reached is no reason not to serve (the member starts with the configured
/// credential and keeps trying); a store that refuses the fleet's user, or a state the fleet's
/// key does not open, is a set-up error to fix before starting.
async fn first_look_at_the_fleet(fleet: &Fleet) -> Result<Option<RotationState>, RotationError> {
    let look = async {
        fleet.seek_lease().await?;
        fleet.load().await
    };
    match look.await {
        Ok(state) => {
            tracing::info!(
                target: "rotaproxy::audit",
                event = "fleet.joined",
                instance = fleet.instance(),
                role = if fleet.is_leader() { "leader" } else { "follower" },
                leader = fleet.leader_instance().as_deref().unwrap_or(""),
                shared_state = state.is_some(),
                "joined the fleet"
            );
            Ok(state)
        }
        Err(err @ StoreError::Fleet { .. }) => {
            tracing::warn!(error = %err, "the fleet's store is unreachable at start-up; following the configured credential until it answers");
            Ok(None)
        }
        Err(err) => Err(err.into()),
    }
}

/// What the rotation task works with.
pub struct RotationParts {
    pub config: RotationConfig,
    pub state: RotationState,
    pub store: Store,
    pub generations: Arc<Generations>,
    pub pool: Pool,
    pub timeouts: TimeoutsConfig,
    pub metrics: Metrics,
    /// Credential for ACL SETUSER / CLIENT KILL; None: the proxied user itself.
    pub admin: Option<strategy::AdminCredential>,
}

impl RotationHandle {
    /// Starts the rotation task.
    pub fn start(parts: RotationParts) -> Result<Self, RotationError> {
        let RotationParts {
            config: rotation,
            state,
            store,
            generations,
            pool,
            timeouts,
            metrics,
            admin,
        } = parts;
        let control = ServerControl {
            generations: generations.clone(),
            admin,
            timeouts: timeouts.clone(),
            metrics: metrics.clone(),
        };
        let strategy = Strategy::new(&rotation, control)?;
        if let Some(fleet) = store.fleet() {
            fleet.attach(generations.clone());
            if credential_of(&state.current).same_as(&generations.current().credential) {
                fleet.set_synced(state.generation);
            }
        }
        let (finished, _) = watch::channel(state.outcomes());
        let (timing, _) = watch::channel(rotation.timing());
        let shared = Arc::new(Shared {
            config: rotation,
            store,
            strategy,
            generations,
            pool,
            timeouts,
            metrics,
            state: Mutex::new(state),
            escalate: AtomicBool::new(false),
            wake: Notify::new(),
            finished,
            next_scheduled: Mutex::new(None),
            last_error: Mutex::new(None),
            drain: Mutex::new(None),
            members_left: Mutex::new(Vec::new()),
            fleet_error: Mutex::new(None),
            tls_change: Mutex::new(None),
            preflight: Mutex::new(None),
            timing,
        });
        let handle = RotationHandle { shared };
        let runner = handle.clone();
        tokio::spawn(async move { runner.run().await });
        if handle.shared.strategy.kind == RotationStrategy::External {
            let watcher = handle.clone();
            tokio::spawn(async move { watcher.watch_source().await });
        }
        if handle.shared.store.fleet().is_some() {
            let member = handle.clone();
            tokio::spawn(async move { member.fleet_heartbeat().await });
        }
        let checker = handle.clone();
        tokio::spawn(async move {
            let mut timing = checker.shared.timing.subscribe();
            loop {
                let report = checker.preflight().await;
                let every =
                    preflight::next_look(timing.borrow_and_update().preflight_interval, &report);
                // A new interval counts from now.
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = timing.changed() => {}
                }
            }
        });
        Ok(handle)
    }

    /// The Redis Cloud API client and database, with `backend = "cloud"`.
    pub fn cloud_api(
        &self,
    ) -> Option<(crate::cloud::CloudClient, Option<crate::cloud::DatabaseRef>)> {
        self.shared
            .strategy
            .cloud()
            .map(|(client, db)| (client.clone(), db))
    }

    /// The fleet this proxy is a member of, if any.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.shared.store.fleet()
    }

    /// Asks for a rotation. A rotation already running is reported, never started twice; an
    /// urgent request escalates it. (A fleet member that does not lead passes requests on
    /// instead: see [`Fleet::pass_request`].)
    pub fn request(&self, urgent: bool, trigger: &str) -> RequestAnswer {
        let answer = {
            let mut state = self.shared.state.lock().expect("not poisoned");
            match &state.rotation {
                Some(running) => {
                    let escalated = urgent && !running.urgent;
                    if escalated {
                        self.shared.escalate.store(true, Ordering::Release);
                        // Waiting sessions re-check the (now shorter) drain deadline.
                        self.shared.wake.notify_one();
                    }
                    RequestAnswer::InProgress {
                        id: running.id.clone(),
                        escalated,
                    }
                }
                None => {
                    let id = new_rotation_id();
                    let from_user = state.current.display_user().to_string();
                    state.rotation = Some(InFlight {
                        id: id.clone(),
                        step: Step::Create,
                        started_at: now_unix(),
                        urgent,
                        trigger: trigger.to_string(),
                        from_user,
                        to_user: String::new(),
                        task_id: None,
                    });
                    RequestAnswer::Started { id }
                }
            }
        };
        self.shared.wake.notify_one();
        answer
    }

    /// Applies the `[rotation]` settings a SIGHUP may change. A new schedule is computed at
    /// once; a drain under way keeps the deadline it started with. Returns the names of the
    /// settings that changed.
    pub fn set_timing(&self, new: RotationTiming) -> Vec<&'static str> {
        let old = *self.shared.timing.borrow();
        let changed: Vec<&'static str> = [
            ("rotate_every", old.rotate_every != new.rotate_every),
            ("jitter", old.jitter != new.jitter),
            (
                "preflight_interval",
                old.preflight_interval != new.preflight_interval,
            ),
            ("drain_deadline", old.drain_deadline != new.drain_deadline),
            (
                "urgent_drain_deadline",
                old.urgent_drain_deadline != new.urgent_drain_deadline,
            ),
        ]
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect();
        if !changed.is_empty() {
            self.shared.timing.send_replace(new);
            // The run loop computes the next scheduled rotation again.
            self.shared.wake.notify_one();
        }
        changed
    }

    /// The timing settings as they are now, and as SIGHUPs change them (for the client
    /// certificate rotation's drain).
    pub fn timing(&self) -> watch::Receiver<RotationTiming> {
        self.shared.timing.subscribe()
    }

    /// Checks, changing nothing, that a rotation could run now (see [`preflight`]), and keeps
    /// the report for status and the gauge. A change of verdict is logged.
    pub async fn preflight(&self) -> Report {
        let s = &self.shared;
        let generation_now = || s.state.lock().expect("not poisoned").generation;
        let mut attempt = 1;
        let checks = loop {
            let (current, generation) = {
                let state = s.state.lock().expect("not poisoned");
                (state.current.clone(), state.generation)
            };
            let mut checks = vec![self.check_store().await];
            checks.extend(s.strategy.preflight(&current).await);
            // A rotation that finished meanwhile may have revoked the identity the checks
            // acted as (alternating users scramble it): what they found is of the past.
            if generation_now() == generation || attempt == PREFLIGHT_ATTEMPTS {
                break checks;
            }
            attempt += 1;
        };
        let report = Report::new(now_unix(), checks);
        gauge!("rotaproxy_rotation_preflight_ok").set(f64::from(u8::from(report.ok)));
        let previous = s
            .preflight
            .lock()
            .expect("not poisoned")
            .replace(report.clone());
        if previous.is_none_or(|p| !p.same_verdict(&report)) {
            if report.ok {
                tracing::info!(
                    target: "rotaproxy::audit",
                    event = "rotation.preflight",
                    ok = true,
                    "a rotation could run now"
                );
            } else {
                tracing::warn!(
                    target: "rotaproxy::audit",
                    event = "rotation.preflight",
                    ok = false,
                    failed = %report.failures(),
                    "a rotation could not run now"
                );
            }
        }
        report
    }

    /// The preflight's look at where the state is kept.
    async fn check_store(&self) -> Check {
        match &self.shared.store {
            Store::File(file) => state_file_check(file),
            Store::Fleet(fleet) => match fleet.load().await {
                Ok(_) => Check::ok("state", fleet.describe()),
                Err(e) => Check::failed("state", e.to_string()),
            },
        }
    }

    /// Waits until the rotation `id` has finished and returns how it ended.
    pub async fn wait_for(&self, id: &str) -> Outcome {
        let mut rx = self.shared.finished.subscribe();
        loop {
            if let Some(outcome) = rx.borrow_and_update().iter().find(|o| o.id == id) {
                return outcome.clone();
            }
            if rx.changed().await.is_err() {
                return Outcome {
                    id: id.to_string(),
                    finished_at: now_unix(),
                    success: false,
                    error: Some("the rotation task stopped".into()),
                    left_at_revoke: 0,
                    members_left_at_revoke: Vec::new(),
                };
            }
        }
    }

    /// The status document of `GET /v1/status` (no secret in it, by construction: slots are
    /// described by username and age only).
    pub fn status(&self) -> serde_json::Value {
        let s = &self.shared;
        let state = s.state.lock().expect("not poisoned").clone();
        let current = s.generations.current();
        let previous = s.generations.previous();
        let drain = *s.drain.lock().expect("not poisoned");
        let preflight = s.preflight.lock().expect("not poisoned").clone();
        let next = *s.next_scheduled.lock().expect("not poisoned");
        let last_error = s.last_error.lock().expect("not poisoned").clone();
        json!({
            "strategy": s.strategy.kind.as_str(),
            "state_store": s.store.describe(),
            "fleet": s.store.fleet().map(|fleet| fleet.status()),
            "active_username": current.credential.display_user(),
            "generation": current.id,
            "credential_age_seconds": now_unix().saturating_sub(state.current.created_at),
            "slots": {
                "current": slot_json(Some(&state.current)),
                "pending": slot_json(state.pending.as_ref()),
                "previous": slot_json(state.previous.as_ref()),
            },
            "rotation": state.rotation.as_ref().map(|r| json!({
                "id": r.id,
                "state": "in_progress",
                "step": r.step.as_str(),
                "started_at": rfc3339(r.started_at),
                "urgent": r.urgent || s.escalate.load(Ordering::Acquire),
                "trigger": r.trigger,
                "last_error": last_error,
            })),
            "last_rotation": state.last.as_ref().map(|o| json!({
                "id": o.id,
                "finished_at": rfc3339(o.finished_at),
                "outcome": if o.success { "success" } else { "failed" },
                "error": o.error,
                "connections_left_at_revoke": o.left_at_revoke,
                "fleet_members_left_at_revoke": o.members_left_at_revoke,
            })),
            "preflight": preflight.map(|p| p.to_json()),
            "next_scheduled_rotation": next.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            "connections": {
                "current": current.live_connections(),
                "previous": previous.as_ref().map_or(0, |p| p.live_connections()),
            },
            "drain": drain.map(|(started, at_start)| json!({
                "started_at": humantime::format_rfc3339_seconds(started).to_string(),
                "old_connections_at_start": at_start,
                "old_connections_left": previous.as_ref().map_or(0, |p| p.live_connections()),
            })),
        })
    }

    /// Refreshes the gauges that are derived from time or from the generations.
    pub fn update_gauges(&self) {
        let s = &self.shared;
        let state = s.state.lock().expect("not poisoned");
        gauge!("rotaproxy_credential_generation").set(state.generation as f64);
        gauge!("rotaproxy_credential_age_seconds")
            .set(now_unix().saturating_sub(state.current.created_at) as f64);
        gauge!("rotaproxy_rotation_in_progress").set(f64::from(u8::from(state.rotation.is_some())));
        drop(state);
        s.metrics.update_connection_gauges(&s.generations);
    }

    /// Makes new upstream TLS material (already proven by `tls_reload`) a generation. The
    /// rotation task does it between rotations, so that a generation's TLS material and
    /// credential always come from one place in one order and the generation counter persisted
    /// in the state stays the one source of ids. Waits until it is published (the drain that
    /// follows is the rotation task's business) and returns the generation's id.
    pub async fn change_tls(&self, config: Arc<rustls::ClientConfig>) -> Result<u64, String> {
        let (done, published) = tokio::sync::oneshot::channel();
        // A change still waiting is replaced: only the newest files matter.
        *self.shared.tls_change.lock().expect("not poisoned") = Some((config, done));
        self.shared.wake.notify_one();
        published
            .await
            .unwrap_or_else(|_| Err("replaced by newer TLS files before it was applied".into()))
    }

    /// Publishes the waiting TLS change, if any, then drains like a rotation does, so that a
    /// rotation starting next finds no connection older than PREVIOUS.
    async fn apply_tls_change(&self) {
        let s = &self.shared;
        let Some((config, done)) = s.tls_change.lock().expect("not poisoned").take() else {
            return;
        };
        let generation = if s.store.fleet().is_some() {
            // A member's TLS files are its own: the fleet's shared generations count
            // credentials only, and this one stays local.
            let id = s.generations.current_id() + 1;
            s.generations.current().with_tls(id, config)
        } else {
            let generation = {
                let mut state = s.state.lock().expect("not poisoned");
                state.generation += 1;
                s.generations.current().with_tls(state.generation, config)
            };
            if let Err(err) = self.persist().await {
                s.state.lock().expect("not poisoned").generation -= 1;
                let _ = done.send(Err(format!("cannot save the rotation state: {err}")));
                return;
            }
            generation
        };
        let id = s.generations.publish(generation).id;
        s.pool.purge_old_generations();
        self.update_gauges();
        let _ = done.send(Ok(id));
        self.drain(false, DrainFor::TlsChange).await;
        *s.drain.lock().expect("not poisoned") = None;
        s.generations.set_drain_deadline(None);
    }

    // ---- the rotation task ------------------------------------------------------------------

    async fn run(self) {
        let s = &self.shared;
        let mut failures = 0u32;
        // A fleet member rotates only while it holds the lease; a single proxy always does.
        let mut leading = s.store.fleet().is_none();
        loop {
            if let Some(fleet) = s.store.fleet().cloned() {
                if !fleet.is_leader() {
                    leading = false;
                    *s.next_scheduled.lock().expect("not poisoned") = None;
                    self.apply_tls_change().await;
                    self.follow(&fleet).await;
                    tokio::select! {
                        _ = tokio::time::sleep(fleet.config().poll_interval) => {}
                        _ = s.wake.notified() => {}
                    }
                    continue;
                }
                if !leading {
                    if let Err(error) = self.take_over(&fleet).await {
                        self.note_fleet_error(Some(&error.to_string()));
                        tokio::time::sleep(fleet.config().poll_interval).await;
                        continue;
                    }
                    leading = true;
                }
            }
            self.apply_tls_change().await;
            let in_flight = s.state.lock().expect("not poisoned").rotation.is_some();
            if in_flight {
                if self.run_rotation().await {
                    failures = 0;
                } else {
                    failures += 1;
                }
            }
            if s.tls_change.lock().expect("not poisoned").is_some() {
                // Arrived during the rotation, whose drain took the wake-up meant for it.
                continue;
            }
            if s.store.fleet().is_some_and(|fleet| !fleet.is_leader()) {
                // Deposed during the rotation: follow from now on.
                continue;
            }
            let next = self.schedule_next(failures);
            *s.next_scheduled.lock().expect("not poisoned") = next;
            let sleep = async {
                match next {
                    Some(at) => {
                        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
                        tokio::time::sleep(wait).await;
                        true
                    }
                    None => std::future::pending().await,
                }
            };
            // A fleet's rotator looks at its lease again now and then, should a wake-up from
            // the heartbeat have been taken by a drain.
            let recheck = async {
                match s.store.fleet() {
                    Some(fleet) => tokio::time::sleep(fleet.config().poll_interval).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = s.wake.notified() => {}
                due = sleep => if due { self.request(false, "schedule"); },
                _ = recheck => {}
            }
        }
    }

    /// When the next scheduled rotation is due (None: no schedule).
    fn schedule_next(&self, failures: u32) -> Option<SystemTime> {
        let s = &self.shared;
        let timing = *s.timing.borrow();
        let every = timing.rotate_every?;
        let state = s.state.lock().expect("not poisoned");
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(state.current.created_at);
        let mut at = base + every;
        let jitter = timing.jitter;
        if !jitter.is_zero() {
            let mut b = [0u8; 8];
            let _ = getrandom::fill(&mut b);
            let frac = (u64::from_le_bytes(b) as f64 / u64::MAX as f64) * 2.0 - 1.0;
            let shift = jitter.mul_f64(frac.abs());
            at = if frac >= 0.0 { at + shift } else { at - shift };
        }
        if failures > 0 {
            let backoff = FAILURE_BACKOFF * 2u32.saturating_pow(failures.min(6));
            at = at.max(SystemTime::now() + backoff.min(every));
        }
        Some(at)
    }

    /// Runs (or resumes) the rotation in flight to its end. True when it succeeded.
    async fn run_rotation(&self) -> bool {
        let s = &self.shared;
        let started = Instant::now();
        gauge!("rotaproxy_rotation_in_progress").set(1.0);
        let result = loop {
            let (id, step, urgent, trigger) = {
                let state = s.state.lock().expect("not poisoned");
                let Some(r) = &state.rotation else {
                    break Ok(());
                };
                (
                    r.id.clone(),
                    r.step,
                    r.urgent || s.escalate.load(Ordering::Acquire),
                    r.trigger.clone(),
                )
            };
            if let Err(err) = self.persist().await {
                break Err(err);
            }
            fault_injection(step).await;
            let step_started = Instant::now();
            let outcome = self.run_step(step, urgent).await;
            let elapsed = step_started.elapsed();
            histogram!("rotaproxy_rotation_step_seconds", "step" => step.as_str())
                .record(elapsed.as_secs_f64());
            self.audit(&id, step, &outcome, elapsed, urgent, &trigger);
            match outcome {
                Ok(StepDone::Next(next)) => self.set_step(next),
                Ok(StepDone::Finished) | Ok(StepDone::NothingToDo) => break Ok(()),
                Err(err) => break Err(err),
            }
        };
        if let (Err(RotationError::Store(err)), Some(fleet)) = (&result, s.store.fleet()) {
            // The shared state is the fleet's memory: a rotator that cannot write it (it lost
            // the lease, or the store is out of reach) stops here, without taking PENDING
            // back, and whoever leads next resumes the rotation from the shared state.
            tracing::warn!(
                target: "rotaproxy::audit",
                event = "fleet.stepped_down",
                instance = fleet.instance(),
                error = %err,
                "this proxy stops rotating; the fleet's next rotator resumes from the shared state"
            );
            fleet.drop_lease();
            s.state.lock().expect("not poisoned").rotation = None;
            self.clear_rotation_bookkeeping();
            return false;
        }
        let success = result.is_ok();
        let (id, error) = {
            let state = s.state.lock().expect("not poisoned");
            (
                state.rotation.as_ref().map(|r| r.id.clone()),
                result.as_ref().err().map(|e| e.to_string()),
            )
        };
        if let Err(err) = &result {
            self.abandon(err).await;
        }
        let (outcome, outcomes) = {
            let mut state = s.state.lock().expect("not poisoned");
            let left = state.last.as_ref().map_or(0, |o| o.left_at_revoke);
            let members_left = state
                .last
                .as_ref()
                .map(|o| o.members_left_at_revoke.clone())
                .unwrap_or_default();
            let id = id
                .or_else(|| state.last.as_ref().map(|o| o.id.clone()))
                .unwrap_or_default();
            let outcome = Outcome {
                id,
                finished_at: now_unix(),
                success,
                error: error.clone(),
                left_at_revoke: if success { left } else { 0 },
                members_left_at_revoke: if success { members_left } else { Vec::new() },
            };
            state.rotation = None;
            state.record(outcome.clone());
            (outcome, state.outcomes())
        };
        if let Err(err) = self.persist().await {
            tracing::error!(error = %err, "cannot persist the end of the rotation");
        }
        self.clear_rotation_bookkeeping();
        counter!("rotaproxy_rotations_total", "result" => if success { "success" } else { "failed" })
            .increment(1);
        tracing::info!(
            target: "rotaproxy::audit",
            event = "rotation.end",
            rotation_id = %outcome.id,
            outcome = if success { "success" } else { "failed" },
            duration_ms = started.elapsed().as_millis() as u64,
            error = error.as_deref().unwrap_or(""),
            "rotation finished"
        );
        s.finished.send_replace(outcomes);
        success
    }

    /// Forgets what only a running rotation keeps: escalation, step error, drain progress and
    /// deadline.
    fn clear_rotation_bookkeeping(&self) {
        let s = &self.shared;
        s.escalate.store(false, Ordering::Release);
        *s.last_error.lock().expect("not poisoned") = None;
        *s.drain.lock().expect("not poisoned") = None;
        s.generations.set_drain_deadline(None);
        gauge!("rotaproxy_rotation_in_progress").set(0.0);
        self.update_gauges();
    }

    /// A failed rotation leaves CURRENT as it was: PENDING is taken back from the server (best
    /// effort) and dropped, unless the switch already happened (then the rotation keeps the new
    /// credential and only the revoke is missing: PREVIOUS stays until the next rotation).
    async fn abandon(&self, err: &RotationError) {
        let s = &self.shared;
        tracing::warn!(error = %err, "rotation failed");
        s.generations.set_candidate(None);
        let (current, pending) = {
            let mut state = s.state.lock().expect("not poisoned");
            (state.current.clone(), state.pending.take())
        };
        if let Some(pending) = pending
            && let Err(e) = s.strategy.discard(&current, &pending).await
        {
            tracing::warn!(error = %e, "could not take the pending credential back");
        }
    }

    fn set_step(&self, step: Step) {
        let mut state = self.shared.state.lock().expect("not poisoned");
        if let Some(r) = &mut state.rotation {
            r.step = step;
        }
    }

    /// The id of a new local generation for the shared generation `shared`. A single proxy's
    /// generations are the state's; a fleet member's also count its own TLS changes, so the
    /// shared number may lag behind them.
    fn local_id(&self, shared: u64) -> u64 {
        match self.shared.store.fleet() {
            None => shared,
            Some(_) => shared.max(self.shared.generations.current_id() + 1),
        }
    }

    // ---- a fleet member ---------------------------------------------------------------------

    /// Renews or seeks the rotator's lease, reports this member, and (leading) takes the
    /// rotation requests other members passed on. Runs beside the rotation task, whose steps
    /// may take minutes.
    async fn fleet_heartbeat(self) {
        let s = &self.shared;
        let fleet = s.store.fleet().expect("started for a fleet member").clone();
        let every = fleet.config().poll_interval;
        let mut leading = fleet.is_leader();
        let mut renewed = Instant::now();
        loop {
            let beat = async {
                if fleet.seek_lease().await? {
                    renewed = Instant::now();
                }
                // Read before this member reports: a report under its name written since its
                // last one is another process's (see `Fleet::members`).
                let members = fleet.members().await?;
                gauge!("rotaproxy_fleet_members").set(members.len() as f64);
                let previous = s.generations.previous().map_or(0, |p| p.live_connections());
                fleet.report(previous.max(0)).await?;
                if fleet.is_leader() {
                    for passed in fleet.take_requests().await? {
                        tracing::info!(from = %passed.from, urgent = passed.urgent, "rotation requested through another fleet member");
                        let trigger = if passed.urgent {
                            "fleet-urgent"
                        } else {
                            "fleet"
                        };
                        let rotation = match self.request(passed.urgent, trigger) {
                            RequestAnswer::Started { id } => id,
                            RequestAnswer::InProgress { id, .. } => id,
                        };
                        fleet.answer(&passed.id, &rotation).await?;
                    }
                }
                Ok::<(), StoreError>(())
            };
            match beat.await {
                Ok(()) => self.note_fleet_error(None),
                Err(error) => self.note_fleet_error(Some(&error.to_string())),
            }
            // Unrenewed for most of its life, the lease may be someone else's by now.
            if fleet.is_leader() && renewed.elapsed() > fleet.config().lease_ttl * 2 / 3 {
                fleet.drop_lease();
            }
            let leads = fleet.is_leader();
            gauge!("rotaproxy_fleet_leader").set(f64::from(u8::from(leads)));
            if leads != leading {
                leading = leads;
                tracing::info!(
                    target: "rotaproxy::audit",
                    event = if leads { "fleet.leader_elected" } else { "fleet.lease_lost" },
                    instance = fleet.instance(),
                    leader = fleet.leader_instance().as_deref().unwrap_or(""),
                    "fleet rotator changed"
                );
                s.wake.notify_one();
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Logs a store error once when it starts (or changes), and once when it is over.
    fn note_fleet_error(&self, error: Option<&str>) {
        let mut last = self.shared.fleet_error.lock().expect("not poisoned");
        if last.as_deref() == error {
            return;
        }
        match error {
            Some(error) => tracing::warn!(%error, "fleet store error"),
            None => tracing::info!("the fleet's store answers again"),
        }
        *last = error.map(str::to_string);
    }

    /// A follower's turn: reads the shared state, moves to its CURRENT when it changed, and
    /// lets its own sessions drain off the old one (the rotator waits for that before it
    /// revokes).
    async fn follow(&self, fleet: &Arc<Fleet>) {
        let s = &self.shared;
        let state = match fleet.load().await {
            Ok(Some(state)) => state,
            Ok(None) => return,
            Err(error) => {
                self.note_fleet_error(Some(&error.to_string()));
                return;
            }
        };
        self.follow_pending(&state);
        let urgent = state.rotation.as_ref().is_some_and(|r| r.urgent);
        let adopted = match self.adopt(fleet, &state).await {
            Ok(adopted) => adopted,
            Err(error) => {
                self.note_fleet_error(Some(&format!(
                    "the fleet's current credential did not authenticate here: {error}"
                )));
                false
            }
        };
        // A rotation the rotator finished is over here too (a passed-on `?wait=true` waits
        // for it).
        let ended = state.outcomes();
        *s.state.lock().expect("not poisoned") = state;
        s.finished.send_if_modified(|seen| {
            let changed = *seen != ended;
            if changed {
                *seen = ended;
            }
            changed
        });
        self.update_gauges();
        if adopted {
            self.drain(urgent, DrainFor::Follow).await;
            *s.drain.lock().expect("not poisoned") = None;
            s.generations.set_drain_deadline(None);
        }
    }

    /// While the rotator replaces a password that has no overlap on the server (the default
    /// user), new connections that CURRENT no longer opens may try PENDING, as on the rotator.
    fn follow_pending(&self, state: &RotationState) {
        let s = &self.shared;
        let changing = state
            .rotation
            .as_ref()
            .is_some_and(|r| matches!(r.step, Step::Set | Step::Test | Step::Finish));
        let candidate = match &state.pending {
            Some(pending) if changing && s.strategy.replaces_in_place() => {
                let id = self.local_id(state.generation + 1);
                Some(Arc::new(
                    s.generations
                        .current()
                        .with_credential(id, credential_of(pending)),
                ))
            }
            _ => None,
        };
        let same = match (&candidate, s.generations.candidate()) {
            (Some(a), Some(b)) => a.credential.same_as(&b.credential),
            (None, None) => true,
            _ => false,
        };
        if !same {
            s.generations.set_candidate(candidate);
        }
    }

    /// Moves this proxy to the shared state's CURRENT once a fresh connection proved it.
    /// True when a new generation was published.
    async fn adopt(&self, fleet: &Fleet, state: &RotationState) -> Result<bool, RotationError> {
        let s = &self.shared;
        let wanted = credential_of(&state.current);
        if s.generations.current().credential.same_as(&wanted) {
            fleet.set_synced(state.generation);
            return Ok(false);
        }
        let id = self.local_id(state.generation);
        let current = s.generations.current();
        let proof = Arc::new(current.with_credential(id, wanted.clone()));
        connector::probe(&proof, &s.timeouts, &s.metrics).await?;
        drop(proof);
        let generation = current.with_credential(id, wanted);
        let published = s.generations.publish_candidate_or(generation);
        s.pool.purge_old_generations();
        // After the publish: a report never says "synced" while the old generation is not
        // yet counted as previous.
        fleet.set_synced(state.generation);
        tracing::info!(
            target: "rotaproxy::audit",
            event = "fleet.followed",
            instance = fleet.instance(),
            user = state.current.display_user(),
            shared_generation = state.generation,
            generation = published.id,
            "moving to the credential the fleet's rotator made"
        );
        Ok(true)
    }

    /// This member just took the lease: the shared state becomes its own (resuming whatever
    /// rotation the last rotator left in flight), or, in a new fleet, its state becomes the
    /// shared one.
    async fn take_over(&self, fleet: &Arc<Fleet>) -> Result<(), RotationError> {
        let s = &self.shared;
        match fleet.load().await? {
            Some(state) => {
                // The shared CURRENT may be refused while a default-user change lands; the
                // resumed rotation publishes the credential that works.
                if let Err(error) = self.adopt(fleet, &state).await {
                    tracing::warn!(%error, "the fleet's current credential did not authenticate; resuming the rotation with the one in use");
                }
                *s.state.lock().expect("not poisoned") = state;
            }
            None => {
                let state = s.state.lock().expect("not poisoned").clone();
                fleet.save(&state).await?;
                fleet.set_synced(state.generation);
                tracing::info!(store = %s.store.describe(), "rotation state created for the fleet");
            }
        }
        let resumes = s
            .state
            .lock()
            .expect("not poisoned")
            .rotation
            .as_ref()
            .map(|r| r.id.clone());
        tracing::info!(
            target: "rotaproxy::audit",
            event = "fleet.rotating",
            instance = fleet.instance(),
            resumes_rotation = resumes.as_deref().unwrap_or(""),
            "this proxy now rotates for the fleet"
        );
        Ok(())
    }

    async fn persist(&self) -> Result<(), RotationError> {
        let s = &self.shared;
        let snapshot = s.state.lock().expect("not poisoned").clone();
        Ok(s.store.save(&snapshot).await?)
    }

    async fn run_step(&self, step: Step, urgent: bool) -> Result<StepDone, RotationError> {
        let s = &self.shared;
        let (current, pending) = {
            let state = s.state.lock().expect("not poisoned");
            (state.current.clone(), state.pending.clone())
        };
        match step {
            Step::Create => {
                self.check_successor(&current).await?;
                let Some(pending) = s.strategy.make_pending(&current)? else {
                    return Ok(StepDone::NothingToDo);
                };
                {
                    let mut state = s.state.lock().expect("not poisoned");
                    if let Some(r) = &mut state.rotation {
                        r.to_user = pending.display_user().to_string();
                    }
                    state.pending = Some(pending);
                }
                // PENDING is on disk before the server learns it.
                self.persist().await?;
                Ok(StepDone::Next(Step::Set))
            }
            Step::Set => {
                let pending = pending.ok_or_else(missing_pending)?;
                if s.strategy.replaces_in_place() {
                    // No overlap on the server: until the change lands, new connections try
                    // CURRENT, then PENDING.
                    let next = self.local_id(s.state.lock().expect("not poisoned").generation + 1);
                    let candidate = s
                        .generations
                        .current()
                        .with_credential(next, credential_of(&pending));
                    s.generations.set_candidate(Some(Arc::new(candidate)));
                }
                let submitted = s
                    .state
                    .lock()
                    .expect("not poisoned")
                    .rotation
                    .as_ref()
                    .and_then(|r| r.task_id.clone());
                if let Some(task) = submitted {
                    // Resumed after a restart: wait for the task already submitted.
                    match s.strategy.wait(&pending, &task).await {
                        Ok(()) => return Ok(StepDone::Next(Step::Test)),
                        Err(RotationError::Cloud(
                            e @ crate::cloud::CloudError::TaskFailed { .. },
                        )) => {
                            return Err(RotationError::Cloud(e));
                        }
                        Err(err) => {
                            tracing::info!(task = %task, error = %err, "submitted task not usable; sending the same PENDING again");
                        }
                    }
                }
                let task = self
                    .retry("set", || s.strategy.submit(&current, &pending))
                    .await?;
                if let Some(task) = task {
                    if let Some(r) = &mut s.state.lock().expect("not poisoned").rotation {
                        r.task_id = Some(task.clone());
                    }
                    // The task id is on disk before it is waited for.
                    self.persist().await?;
                    s.strategy.wait(&pending, &task).await?;
                }
                Ok(StepDone::Next(Step::Test))
            }
            Step::Test => {
                let pending = pending.ok_or_else(missing_pending)?;
                let generation = s.strategy.probe_generation(&pending);
                self.retry("test", || async {
                    connector::probe(&generation, &s.timeouts, &s.metrics)
                        .await
                        .map(drop)
                        .map_err(|e| RotationError::TestFailed(e.to_string()))
                })
                .await?;
                Ok(StepDone::Next(Step::Finish))
            }
            Step::Finish => {
                let generation = {
                    let mut state = s.state.lock().expect("not poisoned");
                    if let Some(pending) = state.pending.take() {
                        state.previous = Some(std::mem::replace(&mut state.current, pending));
                        state.generation += 1;
                    }
                    if let Some(r) = &mut state.rotation {
                        r.step = Step::Drain;
                    }
                    let id = self.local_id(state.generation);
                    s.generations
                        .current()
                        .with_credential(id, credential_of(&state.current))
                };
                // The switch is on disk before any session moves.
                self.persist().await?;
                // Resumed after a restart or a take-over, the proxy may use it already.
                if !s
                    .generations
                    .current()
                    .credential
                    .same_as(&generation.credential)
                {
                    s.generations.publish_candidate_or(generation);
                    s.pool.purge_old_generations();
                }
                if let Some(fleet) = s.store.fleet() {
                    fleet.set_synced(s.state.lock().expect("not poisoned").generation);
                }
                self.update_gauges();
                Ok(StepDone::Next(Step::Drain))
            }
            Step::Drain => {
                self.drain(urgent, DrainFor::Rotation).await;
                Ok(StepDone::Next(Step::Revoke))
            }
            Step::Revoke => {
                let previous = s.state.lock().expect("not poisoned").previous.clone();
                let mut killed = 0;
                if let Some(previous) = &previous {
                    killed = self
                        .retry("revoke", || s.strategy.revoke(&current, previous, urgent))
                        .await?;
                }
                let left = s.generations.previous().map_or(0, |p| p.live_connections());
                let members_left = s.members_left.lock().expect("not poisoned").clone();
                let mut state = s.state.lock().expect("not poisoned");
                state.previous = None;
                if let Some(id) = state.rotation.as_ref().map(|r| r.id.clone()) {
                    state.record(Outcome {
                        id,
                        finished_at: now_unix(),
                        success: true,
                        error: None,
                        left_at_revoke: left.max(0) as u64,
                        members_left_at_revoke: members_left,
                    });
                }
                if killed > 0 {
                    tracing::warn!(
                        target: "rotaproxy::audit",
                        event = "rotation.killed_connections",
                        count = killed,
                        "closed connections still authenticated with the old identity"
                    );
                }
                Ok(StepDone::Finished)
            }
        }
    }

    /// Waits until no connection of the previous generation is left, or the drain deadline. A
    /// fleet's rotator also waits for every live member to follow the shared generation and
    /// leave the old one: the old secret is revoked only once nobody uses it.
    async fn drain(&self, urgent_at_start: bool, purpose: DrainFor) {
        let s = &self.shared;
        let fleet = match (purpose, s.store.fleet()) {
            (DrainFor::Rotation, Some(fleet)) if fleet.is_leader() => Some(fleet.clone()),
            _ => None,
        };
        let previous = s.generations.previous();
        if previous.is_none() && fleet.is_none() {
            return;
        }
        let local_left = || previous.as_ref().map_or(0, |p| p.live_connections());
        let shared_generation = s.state.lock().expect("not poisoned").generation;
        let started = Instant::now();
        let at_start = local_left();
        *s.drain.lock().expect("not poisoned") = Some((SystemTime::now(), at_start));
        s.members_left.lock().expect("not poisoned").clear();
        let mut members_settled = fleet.is_none();
        let mut next_look = Instant::now();
        let mut urgent = urgent_at_start;
        let mut deadline = self.set_deadline(urgent);
        loop {
            if let Some(fleet) = &fleet
                && !members_settled
                && Instant::now() >= next_look
            {
                match fleet.lagging(shared_generation).await {
                    Ok(lagging) => {
                        members_settled = lagging.is_empty();
                        *s.members_left.lock().expect("not poisoned") = lagging;
                    }
                    Err(error) => {
                        tracing::info!(%error, "cannot read the fleet's members; looking again");
                    }
                }
                next_look = Instant::now() + fleet::MEMBER_CHECK_EVERY;
            }
            if local_left() <= 0 && members_settled {
                s.members_left.lock().expect("not poisoned").clear();
                break;
            }
            if fleet.as_ref().is_some_and(|fleet| !fleet.is_leader()) {
                // Deposed: the next step's write of the state is refused, and the fleet's
                // new rotator drains and revokes.
                break;
            }
            if purpose == DrainFor::TlsChange
                && s.state.lock().expect("not poisoned").rotation.is_some()
            {
                // A requested rotation (perhaps an urgent one) goes first; sessions keep
                // moving off the old TLS material at their safe points all the same.
                break;
            }
            if !urgent && s.escalate.load(Ordering::Acquire) {
                urgent = true;
                deadline = deadline.min(self.set_deadline(true));
            }
            if Instant::now() >= deadline {
                let left = local_left();
                let members = s.members_left.lock().expect("not poisoned").join(",");
                counter!("rotaproxy_drain_deadline_connections_total")
                    .increment(left.max(0) as u64);
                tracing::warn!(
                    target: "rotaproxy::audit",
                    event = "rotation.drain_deadline",
                    connections_left = left,
                    fleet_members_left = %members,
                    "drain deadline reached with connections of the old generation still open"
                );
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = s.wake.notified() => {}
            }
        }
        histogram!("rotaproxy_drain_seconds").record(started.elapsed().as_secs_f64());
    }

    fn set_deadline(&self, urgent: bool) -> Instant {
        let timing = *self.shared.timing.borrow();
        let within = if urgent {
            timing.urgent_drain_deadline
        } else {
            timing.drain_deadline
        };
        self.shared
            .generations
            .set_drain_deadline(Some(SystemTime::now() + within));
        Instant::now() + within
    }

    /// [`Strategy::check_successor`], tried like a step (a connection may fail), but a user
    /// that cannot take over fails the rotation at once: nothing has changed yet.
    async fn check_successor(&self, current: &Slot) -> Result<(), RotationError> {
        let s = &self.shared;
        let check = self
            .retry("check", || async {
                match s.strategy.check_successor(current).await {
                    Err(e @ RotationError::Successor(_)) => Ok(Err(e)),
                    other => other.map(Ok),
                }
            })
            .await??;
        if let SuccessorCheck::Unchecked(why) = check {
            tracing::warn!(
                reason = %why,
                "cannot compare the permissions of the two rotated users; rotating anyway: make sure both have the same rules (or give the acting user +acl|getuser)"
            );
        }
        Ok(())
    }

    async fn retry<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, RotationError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RotationError>>,
    {
        let mut pause = STEP_RETRY_PAUSE;
        let mut attempt = 1;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(err) if attempt < STEP_ATTEMPTS => {
                    tracing::info!(step = what, attempt, error = %err, "rotation step failed; retrying");
                    *self.shared.last_error.lock().expect("not poisoned") = Some(err.to_string());
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    fn audit(
        &self,
        id: &str,
        step: Step,
        outcome: &Result<StepDone, RotationError>,
        elapsed: Duration,
        urgent: bool,
        trigger: &str,
    ) {
        let s = &self.shared;
        let state = s.state.lock().expect("not poisoned");
        let (from_user, to_user) = state
            .rotation
            .as_ref()
            .map(|r| (r.from_user.clone(), r.to_user.clone()))
            .unwrap_or_default();
        let (result, error) = match outcome {
            Ok(StepDone::NothingToDo) => ("skipped", String::new()),
            Ok(_) => ("ok", String::new()),
            Err(e) => ("failed", e.to_string()),
        };
        tracing::info!(
            target: "rotaproxy::audit",
            event = "rotation.step",
            rotation_id = id,
            step = step.as_str(),
            outcome = result,
            duration_ms = elapsed.as_millis() as u64,
            strategy = s.strategy.kind.as_str(),
            from_user = %from_user,
            to_user = %to_user,
            generation = state.generation,
            urgent,
            trigger,
            error = %error,
            "rotation step"
        );
    }

    /// `external`: re-reads the source whenever its directory changes (see [`crate::watch`]),
    /// and at least every `poll_interval`.
    async fn watch_source(self) {
        let s = &self.shared;
        let Some(ext) = &s.config.external else {
            return;
        };
        let files: Vec<&std::path::Path> = ext.password.path().into_iter().collect();
        let mut watch = FileWatch::new(&files, ext.poll_interval, "credential source");
        loop {
            watch.next().await;
            self.check_source();
        }
    }

    /// The upstream refused the current credential (WRONGPASS/NOAUTH): with `external`, the
    /// source may already hold the new password, or will soon. Re-reads it and waits (at most
    /// `refresh_window`) until a rotation has moved the proxy to a generation the server
    /// accepts. True when a new generation is current.
    pub async fn recover_from_refusal(&self, refused_generation: u64) -> bool {
        let s = &self.shared;
        if let Some(fleet) = s.store.fleet() {
            // The shared state knows better: a default-user change may have landed (PENDING is
            // worth a try at once), or this member fell behind (the follower's turn moves it
            // to the credential of now; wait for that).
            let deadline = Instant::now() + fleet.config().poll_interval * 3;
            let had_candidate = s.generations.candidate().is_some();
            while Instant::now() < deadline {
                if s.generations.current_id() != refused_generation {
                    return true;
                }
                if !fleet.is_leader()
                    && let Ok(Some(state)) = fleet.load().await
                {
                    self.follow_pending(&state);
                    if !had_candidate && s.generations.candidate().is_some() {
                        return true;
                    }
                }
                s.wake.notify_one();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            return false;
        }
        let Some(ext) = &s.config.external else {
            return false;
        };
        let deadline = Instant::now() + ext.refresh_window;
        while Instant::now() < deadline {
            if s.generations.current_id() != refused_generation
                && s.state.lock().expect("not poisoned").rotation.is_none()
            {
                return true;
            }
            self.check_source();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Starts a rotation if the external source holds a password other than CURRENT's.
    pub fn check_source(&self) {
        let s = &self.shared;
        let Ok(value) = s.strategy.read_source() else {
            return;
        };
        let changed = {
            use secrecy::ExposeSecret;
            let state = s.state.lock().expect("not poisoned");
            state.rotation.is_none()
                && value.expose_secret() != state.current.password.expose_secret()
        };
        if changed {
            tracing::info!("the credential source changed; rotating to the new value");
            self.request(false, "source-change");
        }
    }
}

impl crate::upstream::pool::AuthRecovery for RotationHandle {
    fn may_recover(&self) -> bool {
        self.shared.config.external.is_some()
            || self.fleet().is_some_and(|fleet| !fleet.is_leader())
    }

    fn recover(
        &self,
        refused_generation: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(self.recover_from_refusal(refused_generation))
    }
}

/// What a drain waits for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DrainFor {
    /// The rotator's drain before the revoke (a fleet's rotator waits for its members too).
    Rotation,
    /// A fleet member's own sessions moving to the credential the rotator made.
    Follow,
    TlsChange,
}

enum StepDone {
    Next(Step),
    Finished,
    NothingToDo,
}

fn missing_pending() -> RotationError {
    RotationError::Source("the state has no PENDING credential at this step".into())
}

fn new_rotation_id() -> String {
    format!("rot-{}-{}", now_unix(), secret::random_hex(6))
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(unix))
        .to_string()
}

fn slot_json(slot: Option<&Slot>) -> serde_json::Value {
    match slot {
        None => serde_json::Value::Null,
        Some(slot) => json!({
            "username": slot.display_user(),
            "created_at": rfc3339(slot.created_at),
        }),
    }
}

/// Test hook: with `ROTAPROXY_FAULT_HANG_AT_STEP=<step>`, the rotation stops for good right after
/// that step was persisted and before it takes effect, so a test can kill the process exactly
/// there.
async fn fault_injection(step: Step) {
    hang_if_asked("ROTAPROXY_FAULT_HANG_AT_STEP", step.as_str(), "rotation").await;
}

/// Hangs forever when the environment variable `var` names `step` (crash tests of `what`).
pub(crate) async fn hang_if_asked(var: &str, step: &str, what: &str) {
    if std::env::var(var).ok().as_deref() == Some(step) {
        tracing::warn!(step, "fault injection: hanging at {what} step");
        std::future::pending::<()>().await;
    }
}
