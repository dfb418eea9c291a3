//! Prometheus metrics, all named `rotaproxy_*`.
//!
//! Handles are registered once and kept in [`Metrics`], so the hot path increments an atomic
//! instead of looking a metric up by name. Labels never carry a secret.

use metrics::{Counter, Gauge, counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Installs the global Prometheus recorder. Call once, before [`Metrics::new`].
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    describe();
    crate::cloud::describe_metrics();
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
        "Expected upstream authentication refusals while probing a credential during a rotation or restart"
    );
    describe_counter!(
        "rotaproxy_upstream_reconnects_total",
        "Sessions moved to a fresh upstream connection after theirs was lost"
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
    pub commands: Counter,
    pub upstream_auth_failures: Counter,
    pub upstream_auth_probe_failures: Counter,
    pub upstream_reconnects: Counter,
    pub scanned_request_bytes: Counter,
    pub scanned_reply_bytes: Counter,
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
            scanned_request_bytes: counter!("rotaproxy_scanned_bytes_total", "direction" => "request"),
            scanned_reply_bytes: counter!("rotaproxy_scanned_bytes_total", "direction" => "reply"),
        }
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
