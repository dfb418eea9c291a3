//! Prometheus metrics, all named `rotaproxy_*`.
//!
//! Handles are registered once and kept in [`Metrics`], so the hot path increments an atomic
//! instead of looking a metric up by name. The counters every batch of traffic moves
//! (commands, scanned bytes) are kept per session instead and added up when /metrics is
//! scraped: see [`Traffic`]. Labels never carry a secret.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, Gauge, Histogram, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Bucket bounds (seconds) of the upstream latency histograms: from a server on the same host
/// to one across regions, and the connect timeouts' range.
const UPSTREAM_LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the global Prometheus recorder. Call once, before [`Metrics::new`].
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    // Real histograms (buckets), so that latency can be summed over a fleet of sidecars; the
    // other timings stay summaries.
    let mut builder = PrometheusBuilder::new();
    for name in [
        "rotaproxy_upstream_connect_seconds",
        "rotaproxy_upstream_ping_seconds",
    ] {
        builder =
            builder.set_buckets_for_metric(Matcher::Full(name.into()), UPSTREAM_LATENCY_BUCKETS)?;
    }
    let handle = builder.install_recorder()?;
    describe();
    crate::cloud::describe_metrics();
    crate::tls_reload::describe_metrics();
    crate::session::client_auth::describe_metrics();
    Ok(handle)
}

fn describe() {
    describe_gauge!(
        "rotaproxy_client_connections",
        "Client connections open now"
    );
    describe_counter!(
        "rotaproxy_client_connections_total",
        "Client connections accepted"
    );
    describe_counter!(
        "rotaproxy_client_connections_rejected_total",
        "Client connections refused (max clients, TLS handshake failure)"
    );
    describe_gauge!(
        "rotaproxy_upstream_connections",
        "Upstream connections open now (idle in the pool or in use), by generation: current, previous (being drained), older"
    );
    describe_gauge!(
        "rotaproxy_build_info",
        "Always 1; the version of the running proxy is its label"
    );
    describe_gauge!(
        "rotaproxy_start_time_seconds",
        "When the proxy started, in Unix seconds"
    );
    describe_gauge!(
        "rotaproxy_config_restart_pending",
        "1 when the config file, as the last SIGHUP read it, has changes only a restart applies (the log names them)"
    );
    describe_gauge!(
        "rotaproxy_pool_idle_connections",
        "Authenticated upstream connections waiting in the pool"
    );
    describe_counter!(
        "rotaproxy_commands_total",
        "Client commands forwarded upstream"
    );
    describe_counter!(
        "rotaproxy_client_errors_total",
        "Error replies the proxy itself returned to clients, by reason"
    );
    describe_counter!(
        "rotaproxy_upstream_connect_failures_total",
        "Failed attempts to open an upstream connection, by stage"
    );
    describe_counter!(
        "rotaproxy_upstream_auth_failures_total",
        "Upstream authentication failures (real ones, not expected probes)"
    );
    describe_counter!(
        "rotaproxy_upstream_auth_probe_failures_total",
        "Expected upstream authentication refusals: probing a credential during a rotation or restart, or a change the proxy follows and recovered from"
    );
    describe_histogram!(
        "rotaproxy_upstream_connect_seconds",
        metrics::Unit::Seconds,
        "Time to open an authenticated upstream connection (TCP connect, TLS handshake, AUTH), successful ones"
    );
    describe_histogram!(
        "rotaproxy_upstream_ping_seconds",
        metrics::Unit::Seconds,
        "Round trips of the PINGs that check idle pooled connections: the network and server latency under every command"
    );
    describe_counter!(
        "rotaproxy_upstream_tls_handshakes_total",
        "TLS handshakes of upstream connections that got as far as AUTH, by kind: full, or resumed (a session ticket of an earlier connection)"
    );
    describe_counter!(
        "rotaproxy_upstream_reconnects_total",
        "Sessions moved to a fresh upstream connection after theirs was lost"
    );
    describe_counter!(
        "rotaproxy_tracking_redirects_followed_total",
        "CLIENT TRACKING redirects pointed at their target session's new connection after one of the two moved"
    );
    describe_counter!(
        "rotaproxy_client_cache_flushes_total",
        "Flush-everything invalidations sent to clients whose tracking lost invalidations in a move"
    );
    describe_counter!(
        "rotaproxy_scanned_bytes_total",
        "Bytes examined by the RESP scanners, by direction"
    );
}

/// Why the proxy answered a client with an error of its own.
#[derive(Debug, Clone, Copy)]
pub enum ClientErrorReason {
    Protocol,
    Auth,
    Unsupported,
    UpstreamUnavailable,
    UpstreamLost,
    Limit,
    /// An HTTP request (`POST`, `Host:`) where commands were expected: the client was closed.
    HttpRequest,
    /// A subscriber whose upstream connection closed while it was not keeping up: the client
    /// was closed, as Redis closes a subscriber past its output buffer limit.
    SlowConsumer,
}

impl ClientErrorReason {
    fn label(self) -> &'static str {
        match self {
            ClientErrorReason::Protocol => "protocol",
            ClientErrorReason::Auth => "auth",
            ClientErrorReason::Unsupported => "unsupported",
            ClientErrorReason::UpstreamUnavailable => "upstream_unavailable",
            ClientErrorReason::UpstreamLost => "upstream_lost",
            ClientErrorReason::Limit => "limit",
            ClientErrorReason::HttpRequest => "http_request",
            ClientErrorReason::SlowConsumer => "slow_consumer",
        }
    }
}

/// Stage at which an upstream connection attempt failed.
#[derive(Debug, Clone, Copy)]
pub enum ConnectStage {
    Connect,
    Tls,
    Auth,
    Protocol,
}

impl ConnectStage {
    fn label(self) -> &'static str {
        match self {
            ConnectStage::Connect => "connect",
            ConnectStage::Tls => "tls",
            ConnectStage::Auth => "auth",
            ConnectStage::Protocol => "protocol",
        }
    }
}

/// Registered metric handles.
#[derive(Clone)]
pub struct Metrics {
    pub client_connections: Gauge,
    pub client_connections_total: Counter,
    pub client_connections_rejected: Counter,
    pub pool_idle: Gauge,
    pub upstream_auth_failures: Counter,
    pub upstream_auth_probe_failures: Counter,
    pub upstream_reconnects: Counter,
    pub upstream_connect_seconds: Histogram,
    pub upstream_tls_full_handshakes: Counter,
    pub upstream_tls_resumed_handshakes: Counter,
    pub upstream_ping_seconds: Histogram,
    /// Commands and scanned bytes, counted per session.
    pub traffic: Traffic,
    commands: Counter,
    scanned_request_bytes: Counter,
    scanned_reply_bytes: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            client_connections: gauge!("rotaproxy_client_connections"),
            client_connections_total: counter!("rotaproxy_client_connections_total"),
            client_connections_rejected: counter!("rotaproxy_client_connections_rejected_total"),
            pool_idle: gauge!("rotaproxy_pool_idle_connections"),
            commands: counter!("rotaproxy_commands_total"),
            upstream_auth_failures: counter!("rotaproxy_upstream_auth_failures_total"),
            upstream_auth_probe_failures: counter!("rotaproxy_upstream_auth_probe_failures_total"),
            upstream_reconnects: counter!("rotaproxy_upstream_reconnects_total"),
            upstream_connect_seconds: histogram!("rotaproxy_upstream_connect_seconds"),
            upstream_tls_full_handshakes: counter!("rotaproxy_upstream_tls_handshakes_total", "kind" => "full"),
            upstream_tls_resumed_handshakes: counter!("rotaproxy_upstream_tls_handshakes_total", "kind" => "resumed"),
            upstream_ping_seconds: histogram!("rotaproxy_upstream_ping_seconds"),
            scanned_request_bytes: counter!("rotaproxy_scanned_bytes_total", "direction" => "request"),
            scanned_reply_bytes: counter!("rotaproxy_scanned_bytes_total", "direction" => "reply"),
            traffic: Traffic::default(),
        }
    }

    /// Sets the traffic counters to what every session, past and present, has counted (read
    /// when /metrics is scraped).
    pub fn publish_traffic(&self) {
        let totals = self.traffic.totals();
        self.commands.absolute(totals.commands);
        self.scanned_request_bytes.absolute(totals.request_bytes);
        self.scanned_reply_bytes.absolute(totals.reply_bytes);
    }

    /// Sets the gauges derived from the generations (read when /metrics is scraped).
    pub fn update_connection_gauges(&self, generations: &crate::credentials::Generations) {
        let current = generations.current().live_connections();
        let previous = generations.previous().map_or(0, |p| p.live_connections());
        let all = crate::upstream::connector::open_connections();
        gauge!("rotaproxy_upstream_connections", "generation" => "current").set(current as f64);
        gauge!("rotaproxy_upstream_connections", "generation" => "previous").set(previous as f64);
        gauge!("rotaproxy_upstream_connections", "generation" => "older")
            .set((all - current - previous).max(0) as f64);
    }

    pub fn client_error(&self, reason: ClientErrorReason) {
        counter!("rotaproxy_client_errors_total", "reason" => reason.label()).increment(1);
    }

    pub fn connect_failure(&self, stage: ConnectStage) {
        counter!("rotaproxy_upstream_connect_failures_total", "stage" => stage.label())
            .increment(1);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The counters every batch of traffic moves. Incrementing one shared atomic counter (two, with
/// the exporter's bookkeeping) per batch is a locked read-modify-write on a cache line every
/// session touches; instead each session counts in its own [`SessionTraffic`], and a scrape adds
/// the live sessions' counts to what finished sessions left behind.
#[derive(Clone, Default)]
pub struct Traffic {
    inner: Arc<Mutex<TrafficBook>>,
}

#[derive(Default)]
struct TrafficBook {
    live: Vec<Arc<TrafficCells>>,
    finished: TrafficTotals,
}

#[derive(Default)]
struct TrafficCells {
    commands: AtomicU64,
    request_bytes: AtomicU64,
    reply_bytes: AtomicU64,
}

/// Sums of the traffic counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrafficTotals {
    pub commands: u64,
    pub request_bytes: u64,
    pub reply_bytes: u64,
}

impl TrafficTotals {
    fn add(&mut self, cells: &TrafficCells) {
        self.commands += cells.commands.load(Ordering::Relaxed);
        self.request_bytes += cells.request_bytes.load(Ordering::Relaxed);
        self.reply_bytes += cells.reply_bytes.load(Ordering::Relaxed);
    }
}

impl Traffic {
    /// Counters for one session; its counts stay in the totals after it is dropped.
    pub fn session(&self) -> SessionTraffic {
        let cells = Arc::new(TrafficCells::default());
        self.book().live.push(cells.clone());
        SessionTraffic {
            cells,
            traffic: self.clone(),
        }
    }

    pub fn totals(&self) -> TrafficTotals {
        let book = self.book();
        let mut totals = book.finished;
        for cells in &book.live {
            totals.add(cells);
        }
        totals
    }

    fn book(&self) -> std::sync::MutexGuard<'_, TrafficBook> {
        // A panic elsewhere while holding the lock leaves plain numbers behind: keep counting.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One session's traffic counters. Only its owner writes them, so an update is a plain load
/// and store (no locked instruction); a scrape may read them at any time.
pub struct SessionTraffic {
    cells: Arc<TrafficCells>,
    traffic: Traffic,
}

impl SessionTraffic {
    #[inline]
    pub fn commands(&self, n: u64) {
        bump(&self.cells.commands, n);
    }

    #[inline]
    pub fn request_bytes(&self, n: u64) {
        bump(&self.cells.request_bytes, n);
    }

    #[inline]
    pub fn reply_bytes(&self, n: u64) {
        bump(&self.cells.reply_bytes, n);
    }
}

impl Drop for SessionTraffic {
    fn drop(&mut self) {
        let mut book = self.traffic.book();
        book.finished.add(&self.cells);
        book.live.retain(|cells| !Arc::ptr_eq(cells, &self.cells));
    }
}

/// Adds `n` to a counter that only the caller writes.
#[inline]
fn bump(cell: &AtomicU64, n: u64) {
    cell.store(cell.load(Ordering::Relaxed) + n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_totals_keep_what_finished_sessions_counted() {
        let traffic = Traffic::default();
        let a = traffic.session();
        let b = traffic.session();
        a.commands(3);
        a.request_bytes(100);
        b.commands(2);
        b.reply_bytes(7);
        let expected = TrafficTotals {
            commands: 5,
            request_bytes: 100,
            reply_bytes: 7,
        };
        assert_eq!(traffic.totals(), expected);
        drop(a);
        assert_eq!(
            traffic.totals(),
            expected,
            "a finished session's counts stay"
        );
        b.commands(1);
        drop(b);
        assert_eq!(traffic.totals().commands, 6);
        assert!(traffic.book().live.is_empty());
    }
}
