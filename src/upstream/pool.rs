//! The warm pool: authenticated upstream connections kept ready, so a new client never waits for a
//! TCP + TLS + AUTH round trip to the cloud, and so a rotation can warm a new generation before
//! the cut-over.
//!
//! Capacity is a semaphore: every open connection (idle or in use) holds one permit, so
//! `pool.max` bounds them all. At the maximum a client waits `checkout_timeout`, then gets an
//! error. A background task keeps `pool.warm` idle connections of the current generation, replaces
//! broken ones with backoff, and PINGs idle ones every `idle_check_interval`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

use super::connector::{self, ConnectError, UpstreamConn};
use crate::config::{PoolConfig, TimeoutsConfig};
use crate::credentials::Generations;
use crate::metrics::Metrics;

/// Most connections the refill task opens at once.
const MAX_PARALLEL_CONNECTS: usize = 8;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why no upstream connection could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("all {max} upstream connections are in use (waited {waited:?})")]
    Exhausted { max: usize, waited: Duration },
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    generations: Arc<Generations>,
    config: PoolConfig,
    timeouts: TimeoutsConfig,
    metrics: Metrics,
    idle: Mutex<VecDeque<UpstreamConn>>,
    capacity: Arc<Semaphore>,
    /// Wakes the refill task when a connection was taken or dropped.
    refill: Notify,
    /// Wakes a client waiting at the pool maximum when a connection becomes idle.
    returned: Notify,
    /// Whether the latest attempt to open or check a connection succeeded.
    ready: AtomicBool,
    last_error: Mutex<Option<String>>,
    auth_recovery: std::sync::OnceLock<Arc<dyn AuthRecovery>>,
}

/// Something that can bring a credential the server accepts after a refusal.
pub trait AuthRecovery: Send + Sync {
    /// Whether a refusal may be a credential change this proxy follows rather than makes (the
    /// `external` strategy; a fleet member that does not rotate): such a refusal is expected
    /// until recovery says otherwise.
    fn may_recover(&self) -> bool;

    /// Returns true when a newer generation is current and worth a retry.
    fn recover(
        &self,
        refused_generation: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>>;
}

impl Pool {
    pub fn new(
        generations: Arc<Generations>,
        config: PoolConfig,
        timeouts: TimeoutsConfig,
        metrics: Metrics,
    ) -> Self {
        let capacity = Arc::new(Semaphore::new(config.max));
        Self {
            inner: Arc::new(Inner {
                generations,
                config,
                timeouts,
                metrics,
                idle: Mutex::new(VecDeque::new()),
                capacity,
                refill: Notify::new(),
                returned: Notify::new(),
                ready: AtomicBool::new(false),
                last_error: Mutex::new(None),
                auth_recovery: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Starts the task that keeps the pool warm and healthy.
    pub fn spawn_maintenance(&self) {
        let pool = self.clone();
        tokio::spawn(async move { pool.maintain().await });
    }

    /// True when the latest upstream connection attempt or health check succeeded.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    /// Sets what the pool does when the upstream refuses the current credential: wait for the
    /// credential source to catch up (the `external` strategy) before failing a client.
    pub fn set_auth_recovery(&self, recovery: Arc<dyn AuthRecovery>) {
        let _ = self.inner.auth_recovery.set(recovery);
    }

    /// The latest connection error, for readiness and status output (never holds a secret).
    pub fn last_error(&self) -> Option<String> {
        self.inner.last_error.lock().expect("not poisoned").clone()
    }

    pub fn idle_count(&self) -> usize {
        self.inner.idle.lock().expect("not poisoned").len()
    }

    /// Hands out an authenticated connection of the current generation: an idle one if there is
    /// one, otherwise a new one.
    pub async fn checkout(&self) -> Result<UpstreamConn, PoolError> {
        let inner = &self.inner;
        let current = inner.generations.current().id;
        let deadline = tokio::time::Instant::now() + inner.config.checkout_timeout;
        let permit = loop {
            // Registered before looking, so a connection checked in meanwhile is not missed.
            let returned = inner.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(conn) = self.take_idle(current) {
                return Ok(conn);
            }
            if let Ok(permit) = inner.capacity.clone().try_acquire_owned() {
                break permit;
            }
            // At the maximum: wait for a connection to come back, or for one to close.
            tokio::select! {
                _ = returned => continue,
                permit = inner.capacity.clone().acquire_owned() => {
                    break permit.expect("the pool never closes its semaphore");
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(PoolError::Exhausted {
                        max: inner.config.max,
                        waited: inner.config.checkout_timeout,
                    });
                }
            }
        };
        // Boxed: opening a connection (TCP, TLS, HELLO) is a large future, and every session
        // that may check a connection out would otherwise carry its room all its life.
        let conn = Box::pin(self.open_recovering(current)).await;
        inner.refill.notify_one();
        let mut conn = conn?;
        conn.permit = Some(permit);
        Ok(conn)
    }

    /// An idle connection of generation `current` that still looks alive; stale ones are closed.
    fn take_idle(&self, current: u64) -> Option<UpstreamConn> {
        let inner = &self.inner;
        loop {
            let conn = inner.idle.lock().expect("not poisoned").pop_front()?;
            inner.metrics.pool_idle.decrement(1.0);
            inner.refill.notify_one();
            if conn.generation.id >= current && !conn.stream.looks_closed() {
                return Some(conn);
            }
        }
    }

    /// Takes back a connection whose session left it in the default state (db 0, RESP2, no name,
    /// no subscriptions, no tracking, nothing outstanding). Others must be dropped instead.
    pub fn checkin(&self, conn: UpstreamConn) {
        let inner = &self.inner;
        if conn.generation.id < inner.generations.current().id {
            return;
        }
        let mut idle = inner.idle.lock().expect("not poisoned");
        // Keep some headroom above `warm` so bursts of short-lived clients reuse connections.
        if idle.len() < inner.config.warm.max(1) * 2 {
            idle.push_back(conn);
            inner.metrics.pool_idle.increment(1.0);
            inner.returned.notify_one();
        }
    }

    /// Closes idle connections of older generations (a new one was published) and lets the
    /// refill task warm the new generation.
    pub fn purge_old_generations(&self) {
        let inner = &self.inner;
        let current = inner.generations.current().id;
        let mut idle = inner.idle.lock().expect("not poisoned");
        let before = idle.len();
        idle.retain(|c| c.generation.id >= current);
        inner
            .metrics
            .pool_idle
            .decrement((before - idle.len()) as f64);
        drop(idle);
        inner.refill.notify_one();
    }

    pub fn generations(&self) -> &Arc<Generations> {
        &self.inner.generations
    }

    /// Opens a connection of generation `current` or later. A refusal that may be a
    /// credential change this proxy follows is waited out once (see [`AuthRecovery`]), and
    /// counted as a real authentication failure only if it was not one: alerts on
    /// `rotaproxy_upstream_auth_failures_total` stay quiet through a change the proxy follows.
    async fn open_recovering(&self, current: u64) -> Result<UpstreamConn, ConnectError> {
        let inner = &self.inner;
        let Some(recovery) = inner.auth_recovery.get().filter(|r| r.may_recover()) else {
            return self.open(false).await;
        };
        let conn = self.open(true).await;
        let Err(err @ ConnectError::Auth { .. }) = &conn else {
            return conn;
        };
        if recovery.recover(current).await {
            return self.open(false).await;
        }
        inner.metrics.connect_failure(err.stage());
        inner.metrics.upstream_auth_failures.increment(1);
        conn
    }

    /// Opens a connection of the current generation (`expect_refusal`: a refusal is counted as
    /// an expected probe failure, for the caller to judge).
    async fn open(&self, expect_refusal: bool) -> Result<UpstreamConn, ConnectError> {
        let inner = &self.inner;
        let generation = inner.generations.current();
        let result = match inner.generations.candidate() {
            // A password without overlap is being replaced: the server accepts CURRENT until
            // the change lands and the candidate after, so a refusal of either is expected.
            Some(candidate) => {
                match connector::probe(&generation, &inner.timeouts, &inner.metrics).await {
                    Err(ConnectError::Auth { .. }) => {
                        connector::probe(&candidate, &inner.timeouts, &inner.metrics).await
                    }
                    other => other,
                }
            }
            None if expect_refusal => {
                connector::probe(&generation, &inner.timeouts, &inner.metrics).await
            }
            None => connector::connect(&generation, &inner.timeouts, &inner.metrics).await,
        };
        match &result {
            Ok(_) => self.mark_ready(),
            Err(err) => self.mark_failed(err),
        }
        result
    }

    fn mark_ready(&self) {
        if !self.inner.ready.swap(true, Ordering::Relaxed) {
            tracing::info!("upstream reachable and authenticated");
        }
        *self.inner.last_error.lock().expect("not poisoned") = None;
    }

    fn mark_failed(&self, err: &ConnectError) {
        self.inner.ready.store(false, Ordering::Relaxed);
        let text = err.to_string();
        let mut last = self.inner.last_error.lock().expect("not poisoned");
        if last.as_deref() != Some(text.as_str()) {
            tracing::warn!(error = %text, "upstream connection failed");
        }
        *last = Some(text);
    }

    async fn maintain(self) {
        let inner = &self.inner;
        let mut backoff = MIN_BACKOFF;
        let mut next_check = tokio::time::Instant::now() + inner.config.idle_check_interval;
        loop {
            let missing = inner.config.warm.saturating_sub(self.idle_count());
            if missing > 0 {
                if self.refill(missing).await {
                    backoff = MIN_BACKOFF;
                } else {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                continue;
            }
            tokio::select! {
                _ = inner.refill.notified() => {}
                _ = tokio::time::sleep_until(next_check) => {
                    self.check_idle().await;
                    next_check = tokio::time::Instant::now() + inner.config.idle_check_interval;
                }
            }
        }
    }

    /// Opens up to `missing` connections in parallel; true if all that could start succeeded.
    async fn refill(&self, missing: usize) -> bool {
        let mut tasks = JoinSet::new();
        for _ in 0..missing.min(MAX_PARALLEL_CONNECTS) {
            let Ok(permit) = self.inner.capacity.clone().try_acquire_owned() else {
                break;
            };
            let pool = self.clone();
            tasks.spawn(async move {
                let current = pool.inner.generations.current_id();
                let mut conn = pool.open_recovering(current).await?;
                conn.permit = Some(permit);
                Ok::<_, ConnectError>(conn)
            });
        }
        if tasks.is_empty() {
            // At capacity: wait until a connection is returned or dropped.
            self.inner.refill.notified().await;
            return true;
        }
        let mut all_ok = true;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(conn)) => self.checkin(conn),
                _ => all_ok = false,
            }
        }
        all_ok
    }

    /// PINGs every idle connection; keeps those that answer.
    async fn check_idle(&self) {
        let inner = &self.inner;
        let idle: Vec<UpstreamConn> = {
            let mut guard = inner.idle.lock().expect("not poisoned");
            inner.metrics.pool_idle.decrement(guard.len() as f64);
            guard.drain(..).collect()
        };
        for mut conn in idle {
            let sent = std::time::Instant::now();
            match connector::ping(&mut conn, inner.timeouts.auth).await {
                Ok(()) => {
                    inner
                        .metrics
                        .upstream_ping_seconds
                        .record(sent.elapsed().as_secs_f64());
                    self.mark_ready();
                    self.checkin(conn);
                }
                Err(err) => {
                    tracing::debug!(error = %err, "idle upstream connection failed its check; replacing it");
                }
            }
        }
    }
}
