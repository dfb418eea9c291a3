//! Start-up and the client listener: builds the shared parts from the config, binds the
//! listeners, and runs one [`Session`] task per accepted client.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::admin::{self, AdminState};
use crate::config::{ClientAuthMode, Config};
use crate::credentials::{Generation, Generations};
use crate::hangup::HangupStatus;
use crate::listener::ClientListeners;
use crate::metrics::Metrics;
use crate::resp::scanner::ScanLimits;
use crate::rotation::client_cert::{ClientCertParts, ClientCertRotation};
use crate::rotation::strategy::AdminCredential;
use crate::rotation::{RotationHandle, RotationParts};
use crate::session::client_auth::ClientAuth;
use crate::session::links::ClientLinks;
use crate::session::registry::ClientRegistry;
use crate::session::{Session, SessionContext};
use crate::shutdown::{ClientSlots, Phase, ShutdownStatus, StopSignals};
use crate::tls::UpstreamTls;
use crate::tls_reload::{
    Publisher, Side, TlsStatus, UpstreamFilesParts, UpstreamTlsFiles, follow_listener,
};
use crate::upstream::pool::Pool;
use crate::upstream::server_facts::{self, KnownServer};
use crate::watch::contents_digest;

/// Runs the proxy until SIGINT/SIGTERM.
/// `config_path`, when given, is re-read on SIGHUP for the client auth entries and the log
/// filter.
pub async fn run(
    config: Config,
    prometheus: PrometheusHandle,
    config_path: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let started_at = crate::rotation::state::now_unix();
    let metrics = Metrics::new();
    metrics::gauge!("rotaproxy_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::gauge!("rotaproxy_start_time_seconds").set(started_at as f64);
    warn_about_risky_settings(&config);

    if let Some(rotation) = &config.rotation
        && rotation.client_certificate.is_some()
        && let (Some(cert), Some(key)) = (&config.upstream.client_cert, &config.upstream.client_key)
    {
        crate::rotation::client_cert::repair_interrupted_install(&rotation.state_dir, cert, key)
            .context("upstream.client_cert")?;
    }
    // What the upstream TLS files hold before they are read: a change from now on is followed.
    let upstream_tls = UpstreamTls::from_config(&config.upstream);
    let upstream_tls_loaded = contents_digest(&upstream_tls.files());
    let first = Generation::from_config(&config).context("cannot prepare the upstream")?;
    let (generation, rotation_state) = match &config.rotation {
        Some(rotation) => {
            let (generation, state, store) =
                crate::rotation::prepare(&config, rotation, first, &metrics)
                    .await
                    .context("cannot prepare credential rotation")?;
            (generation, Some((state, store)))
        }
        None => (first, None),
    };
    tracing::info!(
        upstream = %format!("{}:{}", generation.endpoint.host, generation.endpoint.port),
        tls = generation.endpoint.tls.is_some(),
        user = generation.credential.display_user(),
        generation = generation.id,
        "upstream configured"
    );
    let generations = Arc::new(Generations::new(generation));
    let pool = Pool::new(
        generations.clone(),
        config.pool.clone(),
        config.timeouts.clone(),
        metrics.clone(),
    );
    pool.spawn_maintenance();
    let rotation = match (rotation_state, &config.rotation) {
        (Some((state, store)), Some(rotation_config)) => {
            let admin = match &rotation_config.admin {
                Some(admin) => Some(
                    AdminCredential::new(admin.username.clone(), admin.password.clone())
                        .context("rotation.admin.password")?,
                ),
                None => None,
            };
            tracing::info!(
                strategy = rotation_config.strategy.as_str(),
                "credential rotation enabled"
            );
            Some(
                RotationHandle::start(RotationParts {
                    config: rotation_config.clone(),
                    state,
                    store,
                    generations: generations.clone(),
                    pool: pool.clone(),
                    timeouts: config.timeouts.clone(),
                    metrics: metrics.clone(),
                    admin,
                })
                .context("cannot start credential rotation")?,
            )
        }
        _ => None,
    };
    if let Some(rotation) = &rotation {
        pool.set_auth_recovery(Arc::new(rotation.clone()));
    }
    let fleet = rotation.as_ref().and_then(|r| r.fleet().cloned());
    let admin_token = match &config.admin.token {
        Some(token) => Some(std::sync::Mutex::new(
            crate::secrets::FollowedSecret::read_now("admin token", token.clone())
                .context("admin.token")?,
        )),
        None => None,
    };

    let tls_status = Arc::new(TlsStatus::default());
    let client_cert_rotation = if generations.current().endpoint.tls.is_some() {
        follow_upstream_tls(
            &config,
            UpstreamFilesParts {
                tls: upstream_tls,
                loaded: upstream_tls_loaded,
                poll_interval: config.upstream.tls_poll_interval,
                generations: generations.clone(),
                publisher: match &rotation {
                    Some(rotation) => Publisher::Rotation(rotation.clone()),
                    None => Publisher::Direct {
                        generations: generations.clone(),
                        pool: pool.clone(),
                    },
                },
                timeouts: config.timeouts.clone(),
                metrics: metrics.clone(),
                status: tls_status.clone(),
            },
            rotation.as_ref(),
        )?
    } else {
        None
    };

    let client_auth =
        Arc::new(ClientAuth::from_config(&config.listener.auth).context("listener.auth.users")?);
    tokio::spawn(crate::session::client_auth::follow_files(
        client_auth.clone(),
        config.listener.auth.poll_interval,
    ));
    let hangup_status = Arc::new(HangupStatus::default());
    let shutdown_status = Arc::new(ShutdownStatus::default());
    if let Some(path) = config_path {
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot handle SIGHUP")?;
        tokio::spawn(crate::hangup::reload_on_hangup(
            hangup,
            path,
            config.clone(),
            client_auth.clone(),
            rotation.clone(),
            hangup_status.clone(),
        ));
    }
    let tls_acceptor = match &config.listener.tls {
        Some(tls) => {
            let loaded = contents_digest(&tls.files());
            let (server_config, parts) = crate::tls::listener_server_config(
                &tls.cert,
                &tls.key,
                tls.client_ca.as_deref(),
                tls.requires_client_certificates(),
            )
            .context("listener.tls")?;
            tls_status.started(Side::Listener, parts.cert.summary());
            tokio::spawn(follow_listener(
                parts,
                tls.clone(),
                loaded,
                tls_status.clone(),
            ));
            Some(tokio_rustls::TlsAcceptor::from(server_config))
        }
        None => None,
    };
    let limits = &config.limits;
    let ctx = Arc::new(SessionContext {
        pool: pool.clone(),
        generations: generations.clone(),
        max_pause: config
            .rotation
            .as_ref()
            .map_or(std::time::Duration::from_millis(250), |r| r.max_pause),
        shutdown: Arc::new(tokio::sync::Notify::new()),
        shutting_down: std::sync::atomic::AtomicBool::new(false),
        client_auth: client_auth.clone(),
        links: ClientLinks::new(generations.clone()),
        request_limits: ScanLimits {
            max_depth: 1,
            max_bulk_len: limits.max_bulk_len.0,
            max_elements: limits.max_args,
            max_line_len: usize::try_from(limits.max_inline_len.0).unwrap_or(usize::MAX),
        },
        max_buffered: usize::try_from(limits.max_buffered_bytes.0).unwrap_or(usize::MAX),
        metrics: metrics.clone(),
        server: Arc::new(KnownServer::empty()),
        clients: Arc::new(ClientRegistry::default()),
    });
    if ctx.client_auth.required() {
        tokio::spawn(server_facts::follow(
            pool.clone(),
            ctx.server.clone(),
            config.upstream.command_table_refresh,
        ));
    }

    let listeners = ClientListeners::bind(&config.listener, tls_acceptor).await?;
    let admin_listener = TcpListener::bind(config.admin.bind)
        .await
        .with_context(|| format!("cannot listen on {} (admin.bind)", config.admin.bind))?;
    let metrics_listener = match config.admin.metrics_bind {
        Some(bind) => Some(
            TcpListener::bind(bind)
                .await
                .with_context(|| format!("cannot listen on {bind} (admin.metrics_bind)"))?,
        ),
        None => None,
    };
    let client_addr = listeners.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let metrics_addr = match &metrics_listener {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    let admin_state = Arc::new(AdminState {
        prometheus,
        metrics: metrics.clone(),
        pool: pool.clone(),
        rotation,
        token: admin_token,
        tls: tls_status,
        client_cert_rotation,
        client_auth,
        hangup: hangup_status,
        shutdown: shutdown_status.clone(),
        started_at,
        listeners: serde_json::json!({
            "tcp": client_addr.to_string(),
            "tls": listeners.tls(),
            "client_certificates_required": config
                .listener
                .tls
                .as_ref()
                .is_some_and(|tls| tls.requires_client_certificates()),
            "client_certificates_checked": config
                .listener
                .tls
                .as_ref()
                .is_some_and(|tls| tls.client_ca.is_some()),
            "unix_socket": listeners.unix_socket(),
        }),
        clients: ctx.clients.clone(),
    });
    let limits = admin::ConnectionLimits {
        max_connections: config.admin.max_connections,
        header_timeout: config.admin.header_timeout,
    };
    if let Some(listener) = metrics_listener {
        tokio::spawn(admin::serve_metrics(listener, admin_state.clone(), limits));
    }
    tokio::spawn(admin::serve(admin_listener, admin_state, limits));
    tracing::info!(
        %client_addr,
        %admin_addr,
        metrics_addr = metrics_addr.map(tracing::field::display),
        tls = listeners.tls(),
        unix_socket = listeners.unix_socket().map(|path| path.display().to_string()),
        "listening"
    );
    tracing::info!(
        target: "rotaproxy::audit",
        event = "proxy.started",
        version = env!("CARGO_PKG_VERSION"),
        %client_addr,
        "rotaproxy started"
    );

    // Installed before the first client: a stop signal from now on is a graceful stop.
    let mut signals = StopSignals::install().context("cannot install the SIGTERM handler")?;
    let clients = ClientSlots::new(config.listener.max_clients);
    let accept = async {
        loop {
            let (client, peer) = listeners.accept().await;
            metrics.client_connections_total.increment(1);
            let Some(slot) = clients.try_take() else {
                metrics.client_connections_rejected.increment(1);
                tokio::spawn(client.refuse());
                continue;
            };
            let ctx = ctx.clone();
            let setup = listeners.setup();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let _slot = slot;
                if let Some(stream) = client.into_stream(&peer, &setup, &metrics).await {
                    Box::new(Session::new(ctx, stream, peer)).run().await;
                }
            });
        }
    };
    let mut accept = Box::pin(accept);
    let signal = tokio::select! {
        _ = &mut accept => return Ok(()),
        signal = signals.next() => signal,
    };
    // A stop: first serve on while the application still has clients connected (if
    // configured), then stop accepting and let every session deliver the replies it owes
    // before it closes (a session closes at once when nothing is owed). See `shutdown`.
    tracing::info!(
        target: "rotaproxy::audit",
        event = "proxy.stopping",
        signal,
        clients = clients.connected(),
        "rotaproxy stopping"
    );
    if let Some(fleet) = &fleet {
        // Another member rotates from now on; one in flight here resumes there.
        fleet.retire().await;
    }
    let shutdown = &config.shutdown;
    if !shutdown.wait_for_clients.is_zero() {
        shutdown_status.enter(signal, Phase::WaitingForClients);
    }
    tokio::select! {
        _ = &mut accept => return Ok(()),
        _ = crate::shutdown::wait_for_clients(
            &clients,
            shutdown.wait_for_clients,
            &mut signals,
            signal,
        ) => {}
    }
    shutdown_status.enter(signal, Phase::Draining);
    drop(accept);
    // A client trying either listener now is refused at once (the socket file goes too).
    drop(listeners);
    ctx.begin_shutdown();
    crate::shutdown::drain(&clients, shutdown.grace, &mut signals, signal).await;
    if let Some(fleet) = &fleet {
        fleet.leave().await;
    }
    Ok(())
}

/// Follows the upstream TLS files, and starts the client-certificate rotation when it is
/// configured (it writes those files).
fn follow_upstream_tls(
    config: &Config,
    parts: UpstreamFilesParts,
    rotation: Option<&RotationHandle>,
) -> anyhow::Result<Option<ClientCertRotation>> {
    parts
        .status
        .started(Side::Upstream, parts.tls.client_cert_summary());
    let generations = parts.generations.clone();
    let files = UpstreamTlsFiles::new(parts);
    tokio::spawn(files.clone().follow());
    let (Some(rotation_config), Some(rotation)) = (&config.rotation, rotation) else {
        return Ok(None);
    };
    let (Some(cert_config), Some((cloud, Some(database)))) =
        (&rotation_config.client_certificate, rotation.cloud_api())
    else {
        return Ok(None);
    };
    let started = ClientCertRotation::start(ClientCertParts {
        config: cert_config.clone(),
        timing: rotation.timing(),
        state_dir: rotation_config.state_dir.clone(),
        cloud,
        database,
        files,
        generations,
    })
    .context("cannot start client certificate rotation")?;
    Ok(Some(started))
}

fn warn_about_risky_settings(config: &Config) {
    if config.upstream.insecure_skip_verify {
        tracing::warn!(
            "upstream.insecure_skip_verify is ON: the upstream certificate is NOT verified; anyone on the path can read and change traffic and steal the credential"
        );
    }
    let bind: SocketAddr = config.listener.bind;
    if config.listener.auth.mode == ClientAuthMode::None && !bind.ip().is_loopback() {
        tracing::warn!(
            %bind,
            "client auth is \"none\" on a non-loopback listener: anyone who can reach it uses the proxy's credential"
        );
    }
    if !config.admin.bind.ip().is_loopback() {
        tracing::warn!(bind = %config.admin.bind, "the admin listener is not on loopback");
    }
}
