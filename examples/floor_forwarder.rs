//! The cheapest possible 1:1 TCP forwarder: the CPU "floor" that `benches/compare.sh` measures
//! the sidecars against.
//!
//! For each accepted client it opens ONE upstream connection (plain TCP, or TLS with rustls and
//! aws-lc-rs) and copies bytes both ways with `tokio::io::copy_bidirectional`. No RESP awareness,
//! no pooling, no auth: the client's own AUTH passes through to Redis.
//!
//! ```text
//! floor_forwarder LISTEN UPSTREAM [--tls CA_FILE SERVER_NAME] [--threads N]
//! floor_forwarder 127.0.0.1:7001 127.0.0.1:6379
//! floor_forwarder 127.0.0.1:7002 127.0.0.1:6390 --tls /tmp/ca.pem localhost
//! ```
//!
//! `--threads 1` (the default) runs a current-thread runtime; more runs a multi-thread runtime with
//! that many workers. Prints `listening LISTEN` on stderr once the listener is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio_rustls::TlsConnector;

const USAGE: &str =
    "usage: floor_forwarder LISTEN UPSTREAM [--tls CA_FILE SERVER_NAME] [--threads N]";

struct Args {
    listen: SocketAddr,
    upstream: String,
    tls: Option<(PathBuf, String)>,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut positional = Vec::new();
    let mut tls = None;
    let mut threads = 1usize;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tls" => {
                let ca = it.next().ok_or("--tls needs CA_FILE SERVER_NAME")?;
                let name = it.next().ok_or("--tls needs CA_FILE SERVER_NAME")?;
                tls = Some((PathBuf::from(ca), name));
            }
            "--threads" => {
                let n = it.next().ok_or("--threads needs N")?;
                threads = n.parse().map_err(|_| format!("bad --threads `{n}`"))?;
                if threads == 0 {
                    return Err("--threads must be at least 1".into());
                }
            }
            "-h" | "--help" => return Err(String::new()),
            s if s.starts_with("--") => return Err(format!("unknown flag `{s}`")),
            _ => positional.push(a),
        }
    }
    let [listen, upstream]: [String; 2] = positional
        .try_into()
        .map_err(|_| "need exactly LISTEN and UPSTREAM".to_string())?;
    let listen = listen
        .parse()
        .map_err(|_| format!("bad LISTEN address `{listen}`"))?;
    Ok(Args {
        listen,
        upstream,
        tls,
        threads,
    })
}

fn tls_connector(ca_file: &PathBuf) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let tls = match &args.tls {
        Some((ca, name)) => Some((tls_connector(ca)?, ServerName::try_from(name.clone())?)),
        None => None,
    };
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!("listening {}", listener.local_addr()?);
    let upstream: Arc<str> = args.upstream.into();
    // SIGTERM ends the process through `main`'s return, not the default signal death, so that
    // exit-time work runs: an instrumented build (scripts/build-pgo) writes its profile then.
    let mut terminate = signal(SignalKind::terminate())?;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = terminate.recv() => return Ok(()),
        };
        let (mut client, _) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let upstream = upstream.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let up = match TcpStream::connect(&*upstream).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("connect {upstream}: {e}");
                    return;
                }
            };
            let _ = up.set_nodelay(true);
            let result = match tls {
                None => {
                    let mut up = up;
                    tokio::io::copy_bidirectional(&mut client, &mut up).await
                }
                Some((connector, name)) => match connector.connect(name, up).await {
                    Ok(mut up) => tokio::io::copy_bidirectional(&mut client, &mut up).await,
                    Err(e) => {
                        eprintln!("tls handshake with {upstream}: {e}");
                        return;
                    }
                },
            };
            // Resets at the end of a benchmark are normal; report nothing.
            let _ = result;
        });
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("floor_forwarder: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let runtime = runtime.expect("tokio runtime");
    if let Err(e) = runtime.block_on(serve(args)) {
        eprintln!("floor_forwarder: {e:#}");
        std::process::exit(1);
    }
}
