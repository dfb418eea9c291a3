//! The operators' HTTP listener: health, readiness, Prometheus metrics. Loopback by default: in a
//! pod, loopback is shared with the application.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::upstream::pool::Pool;

pub struct AdminState {
    pub prometheus: PrometheusHandle,
    pub pool: Pool,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    if let Err(err) = axum::serve(listener, router(state)).await {
        tracing::error!(error = %err, "admin listener stopped");
    }
}

/// 200 only while the proxy can open an authenticated upstream connection.
async fn readyz(State(state): State<Arc<AdminState>>) -> (StatusCode, String) {
    if state.pool.is_ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        let why = state
            .pool
            .last_error()
            .unwrap_or_else(|| "no upstream connection has been authenticated yet".to_string());
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> String {
    state.prometheus.render()
}
