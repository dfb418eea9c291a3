//! The operators' HTTP listener: health, readiness, Prometheus metrics, rotation status and
//! trigger. Loopback by default — but in a pod loopback is shared with the application, so every
//! POST requires the bearer token from `admin.token`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::ExposeSecret;
use serde_json::json;
use tokio::net::TcpListener;

use crate::rotation::fleet::Fleet;
use crate::rotation::{RequestAnswer, RotationHandle};
use crate::session::client_auth::constant_time_eq;
use crate::upstream::pool::Pool;

pub struct AdminState {
    pub prometheus: PrometheusHandle,
    pub metrics: crate::metrics::Metrics,
    pub pool: Pool,
    pub rotation: Option<RotationHandle>,
    /// Bearer token for POST endpoints; without one they are refused. A `file:` token is
    /// re-read when the file changes, so it is rotated without a restart.
    pub token: Option<std::sync::Mutex<crate::secrets::FollowedSecret>>,
    /// Certificates in use and their reloads.
    pub tls: Arc<crate::tls_reload::TlsStatus>,
    /// Proxy-owned client certificates (`[rotation.client_certificate]`).
    pub client_cert_rotation: Option<crate::rotation::client_cert::ClientCertRotation>,
    /// How clients log in, and who is logged in with which entry.
    pub client_auth: Arc<crate::session::client_auth::ClientAuth>,
    /// What the last SIGHUP did.
    pub hangup: Arc<crate::hangup::HangupStatus>,
    /// Whether a SIGTERM/SIGINT began a stop, and where it is.
    pub shutdown: Arc<crate::shutdown::ShutdownStatus>,
    /// When the proxy started (Unix seconds).
    pub started_at: u64,
    /// Where clients connect (`listeners` in `/v1/status`).
    pub listeners: serde_json::Value,
    /// The open client sessions (`GET /v1/clients`).
    pub clients: Arc<crate::session::registry::ClientRegistry>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/clients", get(clients))
        .route("/v1/rotate", post(rotate))
        .route(
            "/v1/client-certificate/rotate",
            post(rotate_client_certificate),
        )
        .with_state(state)
}

/// What `admin.metrics_bind` serves: metrics and health only, nothing that names a user, a
/// client or a certificate, and nothing that changes anything.
pub fn metrics_router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// What each admin listener holds at most (`admin.max_connections`, `admin.header_timeout`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Serves [`router`] on `admin.bind`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, limits: ConnectionLimits) {
    serve_bounded(listener, router(state), limits, "admin").await;
}

/// Serves [`metrics_router`] on `admin.metrics_bind`.
pub async fn serve_metrics(
    listener: TcpListener,
    state: Arc<AdminState>,
    limits: ConnectionLimits,
) {
    serve_bounded(listener, metrics_router(state), limits, "metrics").await;
}

/// Serves `router` with at most `limits.max_connections` connections at once, each closed if
/// it has not sent a whole request head within `limits.header_timeout` (hyper counts that
/// from the end of the previous request, so a kept-alive connection left idle is closed too).
/// `axum::serve` has neither bound: anyone who can reach a listener (the metrics listener is
/// meant for the pod's address) could hold connections until the process ran out of file
/// descriptors or memory, and the data path with it. Connections past the limit wait in the
/// kernel's backlog, unaccepted, until a place frees up.
async fn serve_bounded(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    listener_name: &'static str,
) {
    let places = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        let place = places
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                // Out of file descriptors, say: wait a little rather than spin.
                tracing::warn!(%error, listener = listener_name, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connection = http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
        tokio::spawn(async move {
            // Its end (a header timeout, a client gone, a bad request) is nothing to report.
            let _ = connection.await;
            drop(place);
        });
    }
}

/// 200 only while the proxy can open an authenticated upstream connection and is not
/// stopping.
async fn readyz(State(state): State<Arc<AdminState>>) -> (StatusCode, String) {
    if let Some(why) = state.shutdown.not_ready_reason() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
    } else if state.pool.is_ready() {
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
    match &state.rotation {
        Some(rotation) => rotation.update_gauges(),
        None => state
            .metrics
            .update_connection_gauges(state.pool.generations()),
    }
    state.metrics.publish_traffic();
    state.prometheus.render()
}

/// Every client session: peer, when it connected, and what its connection holds.
async fn clients(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    Json(state.clients.to_json())
}

async fn status(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let generations = state.pool.generations();
    let mut doc = match &state.rotation {
        Some(rotation) => rotation.status(),
        None => {
            let current = generations.current();
            json!({
                "strategy": null,
                "active_username": current.credential.display_user(),
                "generation": current.id,
                "connections": {
                    "current": current.live_connections(),
                    "previous": generations.previous().map_or(0, |p| p.live_connections()),
                },
            })
        }
    };
    doc["version"] = json!(env!("CARGO_PKG_VERSION"));
    doc["started_at"] = json!(state.started_at);
    doc["listeners"] = state.listeners.clone();
    doc["upstream_ready"] = json!(state.pool.is_ready());
    doc["upstream_error"] = json!(state.pool.last_error());
    doc["tls"] = state.tls.to_json();
    doc["client_auth"] = state.client_auth.status();
    doc["config"] = state.hangup.to_json();
    doc["shutdown"] = state.shutdown.to_json();
    if let Some(rotation) = &state.client_cert_rotation {
        doc["client_certificate_rotation"] = rotation.status();
    }
    Json(doc)
}

/// Whether `?name`, `?name=true` or `?name=1` is in the query.
fn query_flag(query: &HashMap<String, String>, name: &str) -> bool {
    query
        .get(name)
        .is_some_and(|v| v.is_empty() || v == "true" || v == "1")
}

/// `POST /v1/client-certificate/rotate[?wait=true]`: a new client certificate now.
async fn rotate_client_certificate(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(refusal) = authorize(&state, &headers) {
        return *refusal;
    }
    let Some(rotation) = &state.client_cert_rotation else {
        return error(
            StatusCode::CONFLICT,
            "client certificate rotation is not configured ([rotation.client_certificate] in the config)",
        );
    };
    let before = rotation.settled_count();
    let running = rotation.request();
    let mut body = match &running {
        Some(id) => json!({ "state": "in_progress", "rotation_id": id }),
        None => json!({ "state": "started" }),
    };
    if !query_flag(&query, "wait") {
        return (StatusCode::ACCEPTED, Json(body)).into_response();
    }
    // The rotation ended, or a step failed (it is retried at the next check or request).
    let status = rotation.wait_settled(before).await;
    let failed = status["in_progress"].is_object();
    body["state"] = json!(if failed { "step_failed" } else { "finished" });
    body["status"] = status;
    let code = if failed {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::OK
    };
    (code, Json(body)).into_response()
}

/// `POST /v1/rotate[?urgent=true][&wait=true]`, or `?dry_run=true`: the preflight's checks,
/// now (200 when a rotation could run, 412 with the failed checks when not).
async fn rotate(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(refusal) = authorize(&state, &headers) {
        return *refusal;
    }
    let Some(rotation) = &state.rotation else {
        return error(
            StatusCode::CONFLICT,
            "rotation is not configured ([rotation] in the config)",
        );
    };
    if query_flag(&query, "dry_run") {
        // Every member checks for itself: any of them may be the one that rotates next.
        let report = rotation.preflight().await;
        let code = if report.ok {
            StatusCode::OK
        } else {
            StatusCode::PRECONDITION_FAILED
        };
        let mut body = report.to_json();
        body["state"] = json!("dry_run");
        return (code, Json(body)).into_response();
    }
    let urgent = query_flag(&query, "urgent");
    if let Some(fleet) = rotation.fleet()
        && !fleet.is_leader()
    {
        return pass_on(rotation, fleet, urgent, query_flag(&query, "wait")).await;
    }
    let answer = rotation.request(urgent, if urgent { "api-urgent" } else { "api" });
    let (id, body) = match &answer {
        RequestAnswer::Started { id } => (
            id.clone(),
            json!({ "rotation_id": id, "state": "started", "urgent": urgent }),
        ),
        RequestAnswer::InProgress { id, escalated } => (
            id.clone(),
            json!({ "rotation_id": id, "state": "in_progress", "escalated": escalated }),
        ),
    };
    if !query_flag(&query, "wait") {
        return (StatusCode::ACCEPTED, Json(body)).into_response();
    }
    finish_waiting(rotation, &id, body).await
}

/// A fleet member that does not rotate passes a rotation request on to the one that does.
/// With `?wait=true` it waits for the rotator to take it, then for that rotation to end (the
/// follower sees the outcome in the shared state).
async fn pass_on(rotation: &RotationHandle, fleet: &Fleet, urgent: bool, wait: bool) -> Response {
    let passed = match fleet.pass_request(urgent).await {
        Ok(passed) => passed,
        Err(err) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("cannot pass the request on to the fleet's rotator: {err}"),
            );
        }
    };
    let mut body = json!({
        "state": "passed_on",
        "leader": fleet.leader_instance(),
        "urgent": urgent,
    });
    if !wait {
        return (StatusCode::ACCEPTED, Json(body)).into_response();
    }
    // The rotator takes requests at its heartbeat; after a crash, a new one leads within the
    // lease's life.
    let within = fleet.config().lease_ttl + fleet.config().poll_interval * 3;
    let id = match fleet.wait_for_answer(&passed.id, within).await {
        Ok(Some(id)) => id,
        Ok(None) => {
            body["error"] = json!(format!(
                "no rotator took the request within {}; it stays queued for the next one",
                humantime::format_duration(within)
            ));
            return (StatusCode::GATEWAY_TIMEOUT, Json(body)).into_response();
        }
        Err(err) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("cannot read the rotator's answer: {err}"),
            );
        }
    };
    body["rotation_id"] = json!(id);
    finish_waiting(rotation, &id, body).await
}

/// Waits for rotation `id` to end and answers with its outcome.
async fn finish_waiting(
    rotation: &RotationHandle,
    id: &str,
    mut body: serde_json::Value,
) -> Response {
    let outcome = rotation.wait_for(id).await;
    body["state"] = json!("finished");
    body["outcome"] = json!(if outcome.success { "success" } else { "failed" });
    body["error"] = json!(outcome.error);
    let code = if outcome.success {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    (code, Json(body)).into_response()
}

fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &state.token else {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "POST endpoints are disabled: set admin.token (env: or file: reference)",
        )));
    };
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let token = match token.lock().expect("not poisoned").current(false) {
        Ok(token) => token,
        Err(_) => {
            return Err(Box::new(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the admin token cannot be read",
            )));
        }
    };
    if !constant_time_eq(presented.as_bytes(), token.expose_secret().as_bytes()) {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        )));
    }
    Ok(())
}

fn error(code: StatusCode, message: &str) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}
