//! The client listeners: TCP at `listener.bind` (TLS with `[listener.tls]`) and, with
//! `listener.unix_socket`, a Unix socket; and what a new client connection goes through before
//! its session starts (socket options, the TLS handshake).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_rustls::TlsAcceptor;

use crate::config::ListenerConfig;
use crate::metrics::Metrics;
use crate::net::{Peer, RawTcp, Stream};

/// How long a client may take to finish its TLS handshake.
const CLIENT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Both listeners. Dropping them stops accepting (and removes the socket file).
pub struct ClientListeners {
    tcp: TcpListener,
    unix: Option<UnixSocket>,
    setup: ClientSetup,
}

/// What a TCP client connection gets before its session starts.
#[derive(Clone)]
pub struct ClientSetup {
    tls: Option<TlsAcceptor>,
    keepalive: Duration,
}

/// A new client connection, before it is a [`Stream`].
pub enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl ClientListeners {
    pub async fn bind(config: &ListenerConfig, tls: Option<TlsAcceptor>) -> anyhow::Result<Self> {
        let tcp = TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("cannot listen on {} (listener.bind)", config.bind))?;
        let unix = match &config.unix_socket {
            Some(path) => Some(
                UnixSocket::bind(path, config.unix_socket_mode.0).with_context(|| {
                    format!("cannot listen on {} (listener.unix_socket)", path.display())
                })?,
            ),
            None => None,
        };
        Ok(Self {
            tcp,
            unix,
            setup: ClientSetup {
                tls,
                keepalive: config.tcp_keepalive,
            },
        })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.tcp.local_addr()
    }

    /// Whether TCP clients speak TLS.
    pub fn tls(&self) -> bool {
        self.setup.tls.is_some()
    }

    pub fn unix_socket(&self) -> Option<&Path> {
        self.unix.as_ref().map(|u| u.path.as_path())
    }

    pub fn setup(&self) -> ClientSetup {
        self.setup.clone()
    }

    /// The next client of either listener.
    pub async fn accept(&self) -> (Accepted, Peer) {
        loop {
            let accepted = tokio::select! {
                tcp = self.tcp.accept() => tcp.map(|(socket, peer)| (Accepted::Tcp(socket), Peer::Tcp(peer))),
                unix = accept_unix(self.unix.as_ref()) => unix.map(|unix| {
                    let peer = Peer::of_unix(&unix);
                    (Accepted::Unix(unix), peer)
                }),
            };
            match accepted {
                Ok(client) => return client,
                Err(err) => {
                    // Out of file descriptors and the like: keep serving the clients there are.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// The next client of the Unix socket listener; never, without one.
async fn accept_unix(listener: Option<&UnixSocket>) -> std::io::Result<UnixStream> {
    match listener {
        Some(unix) => Ok(unix.listener.accept().await?.0),
        None => std::future::pending().await,
    }
}

impl Accepted {
    /// The client made ready for its session: a TCP client's socket options set and, on a
    /// TLS listener, its handshake done (`None`, logged and counted, when that fails).
    pub async fn into_stream(
        self,
        peer: &Peer,
        setup: &ClientSetup,
        metrics: &Metrics,
    ) -> Option<Stream> {
        let socket = match self {
            Accepted::Unix(unix) => return Some(Stream::unix(unix)),
            Accepted::Tcp(socket) => socket,
        };
        let _ = socket.set_nodelay(true);
        if let Err(error) = crate::net::set_keepalive(&socket, setup.keepalive) {
            tracing::warn!(%peer, %error, "cannot turn TCP keepalive on for a client");
        }
        let Some(acceptor) = &setup.tls else {
            return Some(Stream::plain(socket));
        };
        match tokio::time::timeout(
            CLIENT_TLS_HANDSHAKE_TIMEOUT,
            acceptor.accept(RawTcp::new(socket)),
        )
        .await
        {
            Ok(Ok(tls)) => Some(Stream::TlsClient(Box::new(tls))),
            Ok(Err(err)) => {
                metrics.client_connections_rejected.increment(1);
                tracing::info!(%peer, error = %err, "client TLS handshake failed");
                None
            }
            Err(_) => {
                metrics.client_connections_rejected.increment(1);
                tracing::info!(%peer, "client TLS handshake timed out");
                None
            }
        }
    }

    /// Answers a client over `listener.max_clients` the way Redis does, then closes.
    pub async fn refuse(self) {
        use tokio::io::AsyncWriteExt;
        const REFUSAL: &[u8] = b"-ERR max number of clients reached\r\n";
        let _ = match self {
            Accepted::Tcp(mut socket) => socket.write_all(REFUSAL).await,
            Accepted::Unix(mut socket) => socket.write_all(REFUSAL).await,
        };
    }
}

/// The Unix socket listener (`listener.unix_socket`). Its file is removed when it is dropped.
struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl UnixSocket {
    /// Listens on `path` with permission bits `mode`. A socket file nobody listens on (left by
    /// a crash) is replaced; one another process listens on, or a file that is no socket, is
    /// an error.
    fn bind(path: &Path, mode: u32) -> anyhow::Result<Self> {
        use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
        if let Ok(existing) = std::fs::symlink_metadata(path) {
            anyhow::ensure!(
                existing.file_type().is_socket(),
                "the path exists and is not a socket"
            );
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => anyhow::bail!("another process listens on it"),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing a stale socket file");
                    std::fs::remove_file(path).context("cannot remove the stale socket file")?;
                }
                Err(e) => return Err(e).context("cannot tell whether the socket is in use"),
            }
        }
        let listener = UnixListener::bind(path)?;
        let socket = Self {
            listener,
            path: path.to_path_buf(),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .context("cannot set listener.unix_socket_mode")?;
        Ok(socket)
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
