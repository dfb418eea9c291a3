//! SIGTERM and SIGINT: stop without cutting off the application the proxy serves.
//!
//! A sidecar is usually told to stop at the same moment as its application (a Kubernetes pod
//! being deleted), while that application may still be finishing requests of its own, with
//! Redis commands among them. So the stop comes in two phases:
//!
//! 1. **waiting for clients** (`shutdown.wait_for_clients`, off by default): the proxy serves
//!    as before, new clients included, and `/readyz` answers 503, until no client is connected
//!    or the wait is over;
//! 2. **draining** (`shutdown.grace`): no new clients; each session delivers the replies it
//!    owes, then closes. The proxy exits when the last one has, or when the grace is over.
//!
//! A second signal cuts the current phase short: during the wait it starts the drain, during
//! the drain it exits at once.

use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// SIGTERM and SIGINT, installed once so that a second one is seen as well as the first.
pub struct StopSignals {
    term: Signal,
    interrupt: Signal,
}

impl StopSignals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// The next stop signal's name.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

/// Where a stop is, for `/readyz` and `/v1/status`.
#[derive(Debug, Default)]
pub struct ShutdownStatus {
    state: Mutex<Option<Stopping>>,
}

#[derive(Debug, Clone, Copy)]
struct Stopping {
    signal: &'static str,
    since: u64,
    phase: Phase,
}

/// The two phases of a stop (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    WaitingForClients,
    Draining,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::WaitingForClients => "waiting_for_clients",
            Phase::Draining => "draining",
        }
    }
}

impl ShutdownStatus {
    /// Records that `signal` started a stop, now in `phase`; a later phase keeps the first
    /// signal and time.
    pub fn enter(&self, signal: &'static str, phase: Phase) {
        let mut state = self.state.lock().expect("not poisoned");
        match state.as_mut() {
            Some(stopping) => stopping.phase = phase,
            None => {
                *state = Some(Stopping {
                    signal,
                    since: crate::rotation::state::now_unix(),
                    phase,
                })
            }
        }
    }

    /// Why the proxy is not ready, once a stop began.
    pub fn not_ready_reason(&self) -> Option<String> {
        let state = *self.state.lock().expect("not poisoned");
        state.map(|s| format!("shutting down ({}, {})", s.signal, s.phase.name()))
    }

    /// The `shutdown` object of `/v1/status`: null while running.
    pub fn to_json(&self) -> Value {
        let state = *self.state.lock().expect("not poisoned");
        match state {
            None => Value::Null,
            Some(s) => json!({ "signal": s.signal, "since": s.since, "phase": s.phase.name() }),
        }
    }
}

/// The client connections, counted against `listener.max_clients`, with a wake-up when one
/// ends so that a stop can wait for the last.
pub struct ClientSlots {
    slots: std::sync::Arc<Semaphore>,
    max: usize,
    left: std::sync::Arc<Notify>,
}

/// One client connection's place; given back when dropped.
pub struct ClientSlot {
    permit: Option<OwnedSemaphorePermit>,
    left: std::sync::Arc<Notify>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        // The permit first, so that whoever wakes up counts this client as gone.
        drop(self.permit.take());
        self.left.notify_waiters();
    }
}

impl ClientSlots {
    pub fn new(max: usize) -> Self {
        Self {
            slots: std::sync::Arc::new(Semaphore::new(max)),
            max,
            left: std::sync::Arc::new(Notify::new()),
        }
    }

    /// A place for a new client, or `None` at `max`.
    pub fn try_take(&self) -> Option<ClientSlot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(ClientSlot {
            permit: Some(permit),
            left: self.left.clone(),
        })
    }

    /// How many clients are connected now.
    pub fn connected(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// Returns once no client is connected.
    pub async fn all_gone(&self) {
        loop {
            let left = self.left.notified();
            tokio::pin!(left);
            // Registered before the count is read: a client leaving in between still wakes us.
            left.as_mut().enable();
            if self.connected() == 0 {
                return;
            }
            left.await;
        }
    }
}

/// Phase 1: serves on (the caller keeps accepting while this runs) until no client is
/// connected, `wait` is over, or another stop signal comes.
pub async fn wait_for_clients(
    clients: &ClientSlots,
    wait: Duration,
    signals: &mut StopSignals,
    first_signal: &'static str,
) {
    let connected = clients.connected();
    if wait.is_zero() || connected == 0 {
        return;
    }
    tracing::info!(
        signal = first_signal,
        clients = connected,
        wait = ?wait,
        "shutting down: serving on (new clients included; /readyz answers 503) until the clients \
         disconnect"
    );
    tokio::select! {
        _ = clients.all_gone() => tracing::info!("every client disconnected"),
        _ = tokio::time::sleep(wait) => tracing::info!(
            clients = clients.connected(),
            "shutdown.wait_for_clients is over with clients still connected"
        ),
        signal = signals.next() => tracing::info!(
            signal,
            clients = clients.connected(),
            "a second stop signal: not waiting for the clients any longer"
        ),
    }
}

/// Phase 2 (the listener is closed and the sessions told): returns once every session has
/// finished, `grace` is over, or another stop signal comes.
pub async fn drain(
    clients: &ClientSlots,
    grace: Duration,
    signals: &mut StopSignals,
    first_signal: &'static str,
) {
    tracing::info!(
        signal = first_signal,
        grace = ?grace,
        clients = clients.connected(),
        "shutting down: no new clients; finishing replies in flight"
    );
    tokio::select! {
        _ = clients.all_gone() => tracing::info!("every client session finished"),
        _ = tokio::time::sleep(grace) => tracing::warn!(
            clients = clients.connected(),
            "shutdown grace period over with client sessions still open"
        ),
        signal = signals.next() => tracing::warn!(
            signal,
            clients = clients.connected(),
            "a second stop signal while draining: exiting now"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn all_gone_wakes_when_the_last_client_leaves() {
        let clients = ClientSlots::new(2);
        let a = clients.try_take().expect("a place");
        let b = clients.try_take().expect("a place");
        assert!(clients.try_take().is_none(), "only two places");
        assert_eq!(clients.connected(), 2);
        let waiting = async {
            clients.all_gone().await;
            clients.connected()
        };
        let leaving = async {
            tokio::task::yield_now().await;
            drop(a);
            tokio::task::yield_now().await;
            drop(b);
        };
        let (left_at, ()) = tokio::join!(waiting, leaving);
        assert_eq!(left_at, 0);
        assert!(clients.try_take().is_some(), "places are given back");
    }

    #[test]
    fn the_status_keeps_the_first_signal_across_phases() {
        let status = ShutdownStatus::default();
        assert_eq!(status.to_json(), Value::Null);
        assert!(status.not_ready_reason().is_none());
        status.enter("SIGTERM", Phase::WaitingForClients);
        status.enter("SIGINT", Phase::Draining);
        let doc = status.to_json();
        assert_eq!(doc["signal"], "SIGTERM");
        assert_eq!(doc["phase"], "draining");
        assert_eq!(
            status.not_ready_reason().as_deref(),
            Some("shutting down (SIGTERM, draining)")
        );
    }
}
