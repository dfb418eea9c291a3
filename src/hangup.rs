//! SIGHUP: the configuration file read again for what can change without a restart.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::config::Config;
use crate::logging::FilterChange;
use crate::rotation::RotationHandle;
use crate::session::client_auth::ClientAuth;

/// What the last SIGHUP did, for `/v1/status`.
#[derive(Debug, Default)]
pub struct HangupStatus {
    last: Mutex<Option<Value>>,
}

impl HangupStatus {
    fn record(&self, outcome: Value) {
        *self.last.lock().expect("not poisoned") = Some(outcome);
    }

    /// The `config` object of `/v1/status`: `last_sighup` is null until the first SIGHUP.
    pub fn to_json(&self) -> Value {
        json!({ "last_sighup": *self.last.lock().expect("not poisoned") })
    }
}

/// SIGHUP re-reads the configuration file for its client auth entries (`listener.auth.users`),
/// so an application password can be added or retired without dropping a client, for its
/// log filter (`log.level`), so `debug` can be turned on for a while, and for when rotations
/// happen and how long their drains take (`rotation.rotate_every`, `jitter`,
/// `preflight_interval`, `drain_deadline`, `urgent_drain_deadline`), since restarting a sidecar
/// would cut its application's connections. Nothing else is reloaded: any other difference
/// from the configuration the proxy started with (`running`) is named in a warning and raises
/// `rotaproxy_config_restart_pending`, so an operator who expected it to apply learns it did
/// not. A file that does not load changes nothing.
pub async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    path: PathBuf,
    running: Config,
    client_auth: Arc<ClientAuth>,
    rotation: Option<RotationHandle>,
    status: Arc<HangupStatus>,
) {
    let restart_pending = metrics::gauge!("rotaproxy_config_restart_pending");
    restart_pending.set(0.0);
    while hangup.recv().await.is_some() {
        let config = match Config::load(&path) {
            Ok(config) => config,
            Err(error) => {
                // Status first: whoever sees the line below sees the status too.
                status.record(json!({
                    "at": crate::rotation::state::now_unix(),
                    "result": "refused",
                    "error": error.to_string(),
                }));
                tracing::warn!(
                    path = %path.display(),
                    %error,
                    "SIGHUP: config not reloaded (the file does not load); nothing changed"
                );
                continue;
            }
        };
        // The filter first, so that the lines below already follow it.
        let log_level_error = match crate::logging::set_filter(&config.log.level) {
            Ok(FilterChange::Applied) => {
                tracing::info!(filter = %config.log.level, "SIGHUP: log filter set");
                None
            }
            Ok(FilterChange::FixedByEnvironment) => {
                tracing::info!("SIGHUP: log filter kept: RUST_LOG sets it");
                None
            }
            Ok(FilterChange::NoLogger) => None,
            Err(error) => {
                tracing::warn!(%error, "SIGHUP: log filter not changed");
                Some(error.to_string())
            }
        };
        let rotation_changes = match (&rotation, &config.rotation) {
            (Some(handle), Some(settings)) => handle.set_timing(settings.timing()),
            _ => Vec::new(),
        };
        if !rotation_changes.is_empty() {
            tracing::info!(
                changed = %rotation_changes.join(","),
                "SIGHUP: rotation timing set"
            );
        }
        let client_auth_result = client_auth.reload(&config.listener.auth);
        let client_auth_error = client_auth_result.as_ref().err().cloned();
        let not_applied = config.restart_needed_for(&running);
        // Gauge and status before the lines that end the reload: whoever sees those lines
        // sees the outcome everywhere.
        restart_pending.set(if not_applied.is_empty() { 0.0 } else { 1.0 });
        status.record(json!({
            "at": crate::rotation::state::now_unix(),
            "result": if client_auth_error.is_some() || log_level_error.is_some() {
                "partly_applied"
            } else {
                "applied"
            },
            "client_auth_error": client_auth_error,
            "log_level_error": log_level_error,
            "restart_needed_for": not_applied,
            "rotation_changed": rotation_changes,
        }));
        match client_auth_result {
            Ok(()) => {
                tracing::info!(path = %path.display(), "SIGHUP: client auth entries re-read")
            }
            Err(error) => tracing::warn!(
                path = %path.display(),
                %error,
                "SIGHUP: client auth entries not reloaded; they are as before"
            ),
        }
        if !not_applied.is_empty() {
            tracing::warn!(
                path = %path.display(),
                changed = %not_applied.join(","),
                "SIGHUP: these changes are not applied until a restart (a SIGHUP reloads only \
                 listener.auth.users, log.level and the rotation's timing)"
            );
        }
    }
}
