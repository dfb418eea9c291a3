//! The `rotaproxy` command line: `run` serves, `check-config` validates a config file.

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
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
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
