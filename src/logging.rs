//! Logging: set up once at start, with a filter (`log.level`) that a SIGHUP can change while
//! the proxy runs, so an operator can turn on `debug` for a while without dropping a client.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LogConfig, LogFormat};

/// The live filter, when `log.level` (not `RUST_LOG`) set it.
static LIVE_FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Reads a filter such as `info` or `info,rotaproxy::audit=warn`, refusing one that has a
/// directive tracing cannot read (rather than dropping that directive silently).
pub fn parse_filter(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::builder()
        .parse(level)
        .map_err(|e| format!("`{level}` is not a log filter: {e}"))
}

/// Installs the process's logger: text or JSON lines on stderr. `RUST_LOG`, when set and
/// valid, overrides `log.level` for the life of the process.
pub fn init(log: &LogConfig) {
    let (filter, live) = match EnvFilter::try_from_default_env() {
        Ok(from_env) => (from_env, false),
        // The config loader has checked `log.level` already.
        Err(_) => (
            parse_filter(&log.level).unwrap_or_else(|_| EnvFilter::new(&log.level)),
            true,
        ),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    match log.format {
        LogFormat::Text => registry.with(lines).init(),
        LogFormat::Json => registry.with(lines.json()).init(),
    }
    if live {
        let _ = LIVE_FILTER.set(handle);
    }
}

/// What [`set_filter`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum FilterChange {
    /// The new filter applies from the next line on.
    Applied,
    /// `RUST_LOG` set the filter at start; it stays.
    FixedByEnvironment,
    /// No logger was installed by [`init`] (the library is used on its own, as in tests).
    NoLogger,
}

/// Replaces the live filter with `level` (SIGHUP). A filter that does not parse changes nothing.
pub fn set_filter(level: &str) -> Result<FilterChange, String> {
    let filter = parse_filter(level)?;
    let Some(handle) = LIVE_FILTER.get() else {
        return Ok(match std::env::var_os("RUST_LOG") {
            Some(_) => FilterChange::FixedByEnvironment,
            None => FilterChange::NoLogger,
        });
    };
    handle
        .reload(filter)
        .map(|()| FilterChange::Applied)
        .map_err(|e| format!("cannot change the log filter: {e}"))
}
