//! The `rotaproxy` command line: `run` serves, `check-config` validates a config file, `probe`
//! asks a running proxy whether it is alive or ready.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rotaproxy::config::Config;

#[derive(Parser)]
#[command(
    version,
    about = "RESP-aware TLS sidecar for Redis that owns and rotates its upstream credentials"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Path of the TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit: non-zero, naming the offending key, if it is invalid.
    CheckConfig {
        /// Path of the TOML config file.
        file: PathBuf,
        /// Also connect: the credential a start would use must authenticate, and with
        /// [rotation] the preflight's checks must pass (permissions, the idle user, the API,
        /// the state). Nothing changes and nothing is served.
        #[arg(long)]
        connect: bool,
    },
    /// Ask a running proxy's admin listener whether it is alive or ready, for container health
    /// checks (an exec probe reaches the admin listener on loopback): exit 0 when it is, 1 with
    /// the reason when it is not.
    Probe {
        /// `live` (GET /healthz) or `ready` (GET /readyz).
        check: rotaproxy::probe::Check,
        /// The proxy's config file; its `admin.bind` is asked.
        #[arg(long, short, default_value = "/etc/rotaproxy/rotaproxy.toml")]
        config: PathBuf,
        /// The admin listener's address, instead of the config file's.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// Seconds to wait for the connection, and again for the answer.
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
    },
    /// Redis Cloud helpers.
    #[command(subcommand)]
    Cloud(CloudCommand),
}

#[derive(Subcommand)]
enum CloudCommand {
    /// Create the second user of `rotation.users` with the first one's role (through the REST
    /// API in `[rotation.cloud]`), if it does not exist yet.
    SetupAlternating {
        /// Path of the TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file, connect } => match Config::load(&file) {
            Ok(config) => {
                println!("{}: ok", file.display());
                if connect {
                    check_against_the_server(&config)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Probe {
            check,
            config,
            admin,
            timeout,
        } => probe(check, &config, admin, timeout),
        Command::Cloud(CloudCommand::SetupAlternating { config }) => {
            match setup_alternating(&config) {
                Ok(done) => {
                    println!("{done}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run {
            config: config_path,
        } => {
            let config = match Config::load(&config_path) {
                Ok(c) => c,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::FAILURE;
                }
            };
            rotaproxy::logging::init(&config.log);
            match run(config, config_path) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!("{err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn probe(
    check: rotaproxy::probe::Check,
    config: &std::path::Path,
    admin: Option<std::net::SocketAddr>,
    timeout: f64,
) -> ExitCode {
    let admin = match admin {
        Some(admin) => admin,
        None => match Config::load(config) {
            Ok(loaded) if loaded.admin.bind.port() == 0 => {
                eprintln!(
                    "error: admin.bind in {} has port 0 (the proxy picks one when it starts, and \
                     logs it): pass --admin",
                    config.display()
                );
                return ExitCode::FAILURE;
            }
            Ok(loaded) => loaded.admin.bind,
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::FAILURE;
            }
        },
    };
    let Ok(timeout) = std::time::Duration::try_from_secs_f64(timeout) else {
        eprintln!("error: --timeout must be a number of seconds");
        return ExitCode::FAILURE;
    };
    let outcome = rotaproxy::probe::probe(admin, check, timeout);
    println!("{}", outcome.message);
    if outcome.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run(config: Config, config_path: std::path::PathBuf) -> anyhow::Result<()> {
    let runtime = if config.runtime.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.runtime.worker_threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(async {
        let prometheus = rotaproxy::metrics::install_recorder()?;
        rotaproxy::server::run(config, prometheus, Some(config_path)).await
    })
}

/// `check-config --connect`: one line per check, exit 1 when one failed.
fn check_against_the_server(config: &Config) -> ExitCode {
    // Lines from the connector (a refused credential, an unreachable server) go to stderr,
    // at the config's level; the checks themselves are printed below.
    rotaproxy::logging::init(&config.log);
    let checks = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            runtime.block_on(async {
                let metrics = rotaproxy::metrics::Metrics::new();
                Ok(
                    rotaproxy::rotation::check::check_config_against_the_server(config, &metrics)
                        .await?,
                )
            })
        });
    let checks = match checks {
        Ok(checks) => checks,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let report = rotaproxy::rotation::preflight::Report::new(0, checks);
    for check in &report.checks {
        println!(
            "{:<20} {:<10} {}",
            check.check,
            check.result.as_str(),
            check.detail
        );
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: {}", report.failures());
        ExitCode::FAILURE
    }
}

fn setup_alternating(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let config = Config::load(path)?;
    let rotation = config
        .rotation
        .as_ref()
        .context("the config has no [rotation] section")?;
    let api = rotation
        .cloud
        .as_ref()
        .context("the config has no [rotation.cloud] section")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(rotaproxy::cloud::setup_alternating(api, &rotation.users))?)
}
