//! `rotaproxy check-config --connect`: what a start with this config would find, found out
//! before deploying it. The credential a start would use must authenticate, and with
//! `[rotation]` the preflight's checks (see [`super::preflight`]) run against the real server
//! and API. Nothing changes (the state directory is proven with a file written and removed
//! again), no fleet lease is sought, nothing is served.

use std::sync::Arc;

use super::preflight::Check;
use super::state::{RotationState, Slot};
use super::store::FileStore;
use super::strategy::{AdminCredential, ServerControl, Strategy, credential_of};
use super::{RotationError, fleet::Fleet};
use crate::config::{Config, RotationConfig, RotationStrategy};
use crate::credentials::{Generation, Generations};
use crate::metrics::Metrics;
use crate::upstream::connector::{self, ConnectError};

/// Runs every check; a config whose upstream cannot even be described is an error.
pub async fn check_config_against_the_server(
    config: &Config,
    metrics: &Metrics,
) -> Result<Vec<Check>, RotationError> {
    let first = Generation::from_config(config)
        .map_err(|e| RotationError::Source(format!("cannot prepare the upstream: {e}")))?;
    let Some(rotation) = &config.rotation else {
        let generation = Arc::new(first);
        return Ok(vec![upstream_check(
            &generation,
            "configured",
            connector::probe(&generation, &config.timeouts, metrics).await,
        )]);
    };
    let (state_check, state) = read_state(config, rotation, &first, metrics).await;
    let mut checks = vec![state_check];
    // The slot a start would use.
    let (name, slot, probed) = super::slot_to_start_with(&state, &first, config, metrics).await;
    let generation = first.with_credential(state.generation, credential_of(&slot));
    let reachable = probed.is_ok();
    checks.push(upstream_check(&generation, name, probed));
    if !reachable {
        return Ok(checks);
    }
    let admin = match &rotation.admin {
        Some(admin) => Some(
            AdminCredential::new(admin.username.clone(), admin.password.clone())
                .map_err(|e| RotationError::Source(e.to_string()))?,
        ),
        None => None,
    };
    let control = ServerControl {
        generations: Arc::new(Generations::new(
            first.with_credential(state.generation, credential_of(&slot)),
        )),
        admin,
        timeouts: config.timeouts.clone(),
        metrics: metrics.clone(),
    };
    let strategy = Strategy::new(rotation, control)?;
    checks.extend(strategy.preflight(&slot).await);
    Ok(checks)
}

fn upstream_check(
    generation: &Generation,
    slot: &str,
    result: Result<connector::UpstreamConn, ConnectError>,
) -> Check {
    let endpoint = format!("{}:{}", generation.endpoint.host, generation.endpoint.port);
    let user = generation.credential.display_user();
    match result {
        Ok(_) => Check::ok(
            "upstream",
            format!("{endpoint}: authenticated as {user} ({slot} credential)"),
        ),
        Err(e) => Check::failed("upstream", format!("{endpoint}: {e}")),
    }
}

/// The rotation state a start would read (not created when there is none: the configured
/// credential stands in for it), and what the preflight's `state` check says of its store.
async fn read_state(
    config: &Config,
    rotation: &RotationConfig,
    first: &Generation,
    metrics: &Metrics,
) -> (Check, RotationState) {
    let configured = || {
        let password = match (&rotation.strategy, &rotation.external) {
            (RotationStrategy::External, Some(ext)) => ext.password.resolve().ok(),
            _ => first.credential.password.clone(),
        };
        password.map(|p| RotationState::new(Slot::new(first.credential.username.clone(), p)))
    };
    let fallback = |check: Check| {
        let state = configured().unwrap_or_else(|| {
            RotationState::new(Slot::new(
                first.credential.username.clone(),
                secrecy::SecretString::from(String::new()),
            ))
        });
        (check, state)
    };
    match &rotation.fleet {
        None => {
            let dir = &rotation.state_dir;
            if !dir.exists() {
                return fallback(Check::ok(
                    "state",
                    format!("{} does not exist yet: a start creates it", dir.display()),
                ));
            }
            let store = FileStore::at(dir);
            match store.load() {
                Ok(Some(state)) => (super::state_file_check(&store), state),
                Ok(None) => fallback(super::state_file_check(&store)),
                Err(e) => fallback(Check::failed("state", e.to_string())),
            }
        }
        Some(fleet_config) => {
            let fleet = match Fleet::new(fleet_config, first, &config.timeouts, metrics) {
                Ok(fleet) => fleet,
                Err(e) => return fallback(Check::failed("state", e.to_string())),
            };
            match fleet.load().await {
                Ok(Some(state)) => (Check::ok("state", fleet.describe()), state),
                Ok(None) => fallback(Check::ok(
                    "state",
                    format!(
                        "{}: none yet (the first rotator creates it)",
                        fleet.describe()
                    ),
                )),
                Err(e) => fallback(Check::failed("state", e.to_string())),
            }
        }
    }
}
