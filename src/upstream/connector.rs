//! Opens one upstream connection: TCP, then TLS, then the proxy's own AUTH.
//!
//! The handshake pipelines `AUTH` with `CLIENT ID` so it costs one round trip, and remembers the
//! server-side client id (a rotation needs it to unblock a parked command from a control
//! connection). Errors name the stage and the cause an operator can act on, never a secret.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout;

use crate::config::TimeoutsConfig;
use crate::credentials::Generation;
use crate::metrics::{ConnectStage, Metrics};
use crate::net::{RawTcp, Stream};
use crate::resp::command;

/// Why an upstream connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connecting to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: String, after: Duration },
    #[error("TLS handshake with {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error(
        "TLS handshake with {addr} timed out after {after:?} (a port that takes plain TCP \
         never answers a TLS handshake: if the server does not use TLS, use a redis:// URL)"
    )]
    TlsTimeout { addr: String, after: Duration },
    #[error("upstream rejected the proxy's credential for user `{user}`: {message}")]
    Auth { user: String, message: String },
    /// The server answered the handshake with an error that says nothing of the credential:
    /// `ERR max number of clients reached`, protected mode's `DENIED`. Not an authentication
    /// failure, so neither the auth-failure alerts nor a credential recovery follow it.
    #[error("upstream refused the connection: {message}")]
    Refused { message: String },
    #[error("upstream did not answer AUTH within {after:?}")]
    AuthTimeout { after: Duration },
    #[error("upstream sent an unexpected reply: {0}")]
    Protocol(String),
    #[error("upstream sent bytes that are not a RESP2 reply: {0}")]
    NotResp(String),
    #[error("upstream closed the connection during the handshake: {0}")]
    Closed(io::Error),
    /// A plain-TCP handshake the server closed, or answered with bytes that are not RESP: what
    /// a port that takes only TLS does (Redis's `tls-port`, a Redis Cloud database with TLS
    /// on), so the message says what to try.
    #[error(
        "{cause} (a port that takes only TLS closes plain-text connections: if the server \
         requires TLS, use a rediss:// URL)"
    )]
    PlainToTls { cause: Box<ConnectError> },
}

impl ConnectError {
    pub fn stage(&self) -> ConnectStage {
        match self {
            ConnectError::Connect { .. }
            | ConnectError::ConnectTimeout { .. }
            | ConnectError::Refused { .. } => ConnectStage::Connect,
            ConnectError::Tls { .. } | ConnectError::TlsTimeout { .. } => ConnectStage::Tls,
            ConnectError::Auth { .. } | ConnectError::AuthTimeout { .. } => ConnectStage::Auth,
            ConnectError::Protocol(_) | ConnectError::NotResp(_) | ConnectError::Closed(_) => {
                ConnectStage::Protocol
            }
            ConnectError::PlainToTls { cause } => cause.stage(),
        }
    }
}

/// An authenticated upstream connection.
pub struct UpstreamConn {
    pub stream: Stream,
    /// The generation (endpoint, TLS material, credential) it was opened with.
    pub generation: Arc<Generation>,
    /// `CLIENT ID` on the server, when the proxy's user may ask for it.
    pub client_id: Option<i64>,
    pub opened_at: Instant,
    /// A place in the pool's capacity, held for as long as the connection is open.
    pub(crate) permit: Option<OwnedSemaphorePermit>,
}

/// Upstream connections open now, of every generation.
static OPEN_CONNECTIONS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Upstream connections open now, of every generation.
pub fn open_connections() -> i64 {
    OPEN_CONNECTIONS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Server-side ids of the connections this proxy holds: an urgent rotation kills every other
/// connection of the old identity, never these.
fn own_client_ids() -> std::sync::MutexGuard<'static, std::collections::HashSet<i64>> {
    static IDS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<i64>>> =
        std::sync::LazyLock::new(Default::default);
    IDS.lock().expect("not poisoned")
}

/// Whether a server-side client id is one of this proxy's own connections.
pub fn is_own_client(id: i64) -> bool {
    own_client_ids().contains(&id)
}

impl Drop for UpstreamConn {
    fn drop(&mut self) {
        if let Some(id) = self.client_id {
            own_client_ids().remove(&id);
        }
        OPEN_CONNECTIONS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.generation.connection_closed();
    }
}

impl UpstreamConn {
    /// Counts the connection under another generation (after it re-authenticated in place).
    pub fn set_generation(&mut self, generation: Arc<Generation>) {
        generation.connection_opened();
        let old = std::mem::replace(&mut self.generation, generation);
        old.connection_closed();
    }
}

/// Opens and authenticates a connection with `generation`.
pub async fn connect(
    generation: &Arc<Generation>,
    timeouts: &TimeoutsConfig,
    metrics: &Metrics,
) -> Result<UpstreamConn, ConnectError> {
    let result = connect_timed(generation, timeouts, metrics).await;
    if let Err(err) = &result {
        metrics.connect_failure(err.stage());
        if matches!(err, ConnectError::Auth { .. }) {
            metrics.upstream_auth_failures.increment(1);
        }
    }
    result
}

/// Like [`connect`], for a credential that may legitimately be refused (testing PENDING, trying
/// CURRENT/PENDING/PREVIOUS after a restart): a refusal is counted as an expected probe failure,
/// so alerts on real authentication failures stay quiet.
pub async fn probe(
    generation: &Arc<Generation>,
    timeouts: &TimeoutsConfig,
    metrics: &Metrics,
) -> Result<UpstreamConn, ConnectError> {
    let result = connect_timed(generation, timeouts, metrics).await;
    if let Err(ConnectError::Auth { .. }) = &result {
        metrics.upstream_auth_probe_failures.increment(1);
    } else if let Err(err) = &result {
        metrics.connect_failure(err.stage());
    }
    result
}

/// `connect_inner`, its time recorded when it succeeds.
async fn connect_timed(
    generation: &Arc<Generation>,
    timeouts: &TimeoutsConfig,
    metrics: &Metrics,
) -> Result<UpstreamConn, ConnectError> {
    let started = std::time::Instant::now();
    let result = connect_inner(generation, timeouts).await;
    if let Ok(conn) = &result {
        metrics
            .upstream_connect_seconds
            .record(started.elapsed().as_secs_f64());
        if let Stream::TlsUpstream(tls) = &conn.stream {
            match tls.get_ref().1.handshake_kind() {
                Some(rustls::HandshakeKind::Resumed) => {
                    metrics.upstream_tls_resumed_handshakes.increment(1)
                }
                _ => metrics.upstream_tls_full_handshakes.increment(1),
            }
        }
    }
    result
}

async fn connect_inner(
    generation: &Arc<Generation>,
    timeouts: &TimeoutsConfig,
) -> Result<UpstreamConn, ConnectError> {
    let ep = &generation.endpoint;
    let addr = format!("{}:{}", ep.host, ep.port);
    let tcp = timeout(
        timeouts.connect,
        TcpStream::connect((ep.host.as_str(), ep.port)),
    )
    .await
    .map_err(|_| ConnectError::ConnectTimeout {
        addr: addr.clone(),
        after: timeouts.connect,
    })?
    .map_err(|source| ConnectError::Connect {
        addr: addr.clone(),
        source,
    })?;
    // Commands are small and latency matters more than packet count.
    let _ = tcp.set_nodelay(true);
    if let Err(error) = crate::net::set_keepalive(&tcp, timeouts.tcp_keepalive) {
        tracing::warn!(%error, addr, "cannot turn TCP keepalive on for an upstream connection");
    }
    let stream = match &ep.tls {
        None => Stream::plain(tcp),
        Some((config, name)) => {
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            let tls = timeout(
                timeouts.tls_handshake,
                connector.connect(name.clone(), RawTcp::new(tcp)),
            )
            .await
            .map_err(|_| ConnectError::TlsTimeout {
                addr: addr.clone(),
                after: timeouts.tls_handshake,
            })?
            .map_err(|e| ConnectError::Tls {
                addr: addr.clone(),
                reason: crate::tls::explain_handshake_error(&e),
            })?;
            if let Some(server_cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                crate::tls_reload::note_upstream_server_certificate(server_cert);
            }
            Stream::TlsUpstream(Box::new(tls))
        }
    };
    OPEN_CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    generation.connection_opened();
    let mut conn = UpstreamConn {
        stream,
        generation: generation.clone(),
        client_id: None,
        opened_at: Instant::now(),
        permit: None,
    };
    conn.client_id = timeout(timeouts.auth, handshake(&mut conn))
        .await
        .map_err(|_| ConnectError::AuthTimeout {
            after: timeouts.auth,
        })?
        .map_err(|err| match err {
            ConnectError::Closed(_) | ConnectError::NotResp(_) if ep.tls.is_none() => {
                ConnectError::PlainToTls {
                    cause: Box::new(err),
                }
            }
            err => err,
        })?;
    if let Some(id) = conn.client_id {
        own_client_ids().insert(id);
    }
    Ok(conn)
}

/// Sends AUTH (when the generation has a password) and CLIENT ID, and reads both replies.
async fn handshake(conn: &mut UpstreamConn) -> Result<Option<i64>, ConnectError> {
    let cred = &conn.generation.credential;
    let mut out = cred.auth_command().unwrap_or_default();
    let auths = !out.is_empty();
    out.extend_from_slice(&command::encode(&[&b"CLIENT"[..], b"ID"]));
    send(&mut conn.stream, &out).await?;
    let mut buf = BytesMut::with_capacity(256);
    let refused = |message: String| {
        let message = without_echoed_arguments(message);
        if turns_the_connection_away(&message) {
            ConnectError::Refused { message }
        } else {
            ConnectError::Auth {
                user: cred.display_user().to_string(),
                message,
            }
        }
    };
    if auths {
        match read_reply(&mut conn.stream, &mut buf).await? {
            OwnedFrame::SimpleString(_) => {}
            OwnedFrame::Error(message) => return Err(refused(message)),
            other => return Err(ConnectError::Protocol(describe(&other))),
        }
    }
    match read_reply(&mut conn.stream, &mut buf).await? {
        OwnedFrame::Integer(id) => Ok(Some(id)),
        // Without AUTH configured, a server that requires it answers NOAUTH here; a server
        // that turns the connection away answers its reason first (then closes).
        OwnedFrame::Error(message)
            if message.starts_with("NOAUTH") || turns_the_connection_away(&message) =>
        {
            Err(refused(message))
        }
        // The proxy's user may not be allowed CLIENT ID (an ACL rule, a renamed or disabled
        // command); the connection is still good.
        OwnedFrame::Error(_) => Ok(None),
        other => Err(ConnectError::Protocol(describe(&other))),
    }
}

/// Whether an error answering the handshake is the server turning every new connection away
/// for a reason of its own, which it writes before closing: `ERR max number of clients
/// reached` (`+ cluster connections` in a cluster) and protected mode's `DENIED`. Any other
/// error answering `AUTH` stays a refusal of the credential, as it always was: the start-up's
/// choice between the state's slots and the recovery of a credential changed elsewhere both
/// rest on telling those apart, and an error text not listed here must not leave them unsure.
fn turns_the_connection_away(message: &str) -> bool {
    message.starts_with("ERR max number of clients") || message.starts_with("DENIED")
}

/// An error line without what a server may quote of the command after it (Redis's `unknown
/// command 'AUTH', with args beginning with: ...` would quote the password).
fn without_echoed_arguments(mut message: String) -> String {
    if let Some(at) = message.find(", with args beginning with") {
        message.truncate(at);
    }
    message
}

/// Runs one command on a RESP2 connection the proxy uses for itself (rotation, control) and
/// returns the reply. Replies to credential commands can echo their arguments: callers must not
/// log an error reply's text.
pub async fn run_command(
    conn: &mut UpstreamConn,
    args: &[&[u8]],
    within: Duration,
) -> Result<OwnedFrame, ConnectError> {
    run_command_up_to(conn, args, within, SMALL_REPLY_MAX).await
}

/// Reads the server's command table (`COMMAND`, about 90 KB on Redis 7.0) on a RESP2
/// connection the proxy uses for itself.
pub async fn command_table(
    conn: &mut UpstreamConn,
    within: Duration,
) -> Result<OwnedFrame, ConnectError> {
    run_command_up_to(conn, &[b"COMMAND"], within, COMMAND_TABLE_MAX).await
}

/// Reads a user's rules (`ACL GETUSER`) on a RESP2 connection the proxy uses for itself. The
/// reply holds the hashes of the user's passwords: callers must keep them out of logs.
pub async fn acl_getuser(
    conn: &mut UpstreamConn,
    user: &str,
    within: Duration,
) -> Result<OwnedFrame, ConnectError> {
    run_command_up_to(
        conn,
        &[b"ACL", b"GETUSER", user.as_bytes()],
        within,
        ACL_USER_MAX,
    )
    .await
}

/// Reads `CLIENT LIST` on a RESP2 connection the proxy uses for itself. It runs to a few
/// hundred bytes per connection: megabytes on a busy database, or on one that many sidecars
/// share.
pub async fn client_list(
    conn: &mut UpstreamConn,
    within: Duration,
) -> Result<OwnedFrame, ConnectError> {
    run_command_up_to(conn, &[b"CLIENT", b"LIST"], within, CLIENT_LIST_MAX).await
}

/// `run_command` for a reply of at most about `max_reply` bytes.
async fn run_command_up_to(
    conn: &mut UpstreamConn,
    args: &[&[u8]],
    within: Duration,
    max_reply: usize,
) -> Result<OwnedFrame, ConnectError> {
    let mut replies = run_pipeline_up_to(conn, &[args], within, max_reply).await?;
    Ok(replies.pop().expect("one reply per command"))
}

/// Runs several commands in one write on a RESP2 connection the proxy uses for itself, and
/// returns their replies in order (a `WAIT` that must follow its write on the same connection).
/// Used by the fleet's store, whose member list grows with the fleet.
pub async fn run_pipeline(
    conn: &mut UpstreamConn,
    commands: &[&[&[u8]]],
    within: Duration,
) -> Result<Vec<OwnedFrame>, ConnectError> {
    run_pipeline_up_to(conn, commands, within, PIPELINE_REPLY_MAX).await
}

/// `run_pipeline` for replies of at most about `max_reply` bytes each.
async fn run_pipeline_up_to(
    conn: &mut UpstreamConn,
    commands: &[&[&[u8]]],
    within: Duration,
    max_reply: usize,
) -> Result<Vec<OwnedFrame>, ConnectError> {
    let run = async {
        let mut out = Vec::new();
        for args in commands {
            out.extend_from_slice(&command::encode(args));
        }
        send(&mut conn.stream, &out).await?;
        let mut buf = BytesMut::with_capacity(256);
        let mut replies = Vec::with_capacity(commands.len());
        for _ in commands {
            replies.push(read_reply_up_to(&mut conn.stream, &mut buf, max_reply).await?);
        }
        Ok(replies)
    };
    timeout(within, run)
        .await
        .map_err(|_| ConnectError::AuthTimeout { after: within })?
}

/// Sends PING on an idle RESP2 connection and checks the answer.
pub async fn ping(conn: &mut UpstreamConn, within: Duration) -> Result<(), ConnectError> {
    let check = async {
        send(&mut conn.stream, b"*1\r\n$4\r\nPING\r\n").await?;
        let mut buf = BytesMut::with_capacity(64);
        match read_reply(&mut conn.stream, &mut buf).await? {
            OwnedFrame::SimpleString(s) if s == b"PONG" => Ok(()),
            other => Err(ConnectError::Protocol(describe(&other))),
        }
    };
    timeout(within, check)
        .await
        .map_err(|_| ConnectError::AuthTimeout { after: within })?
}

/// Writes `out` whole and flushes it.
async fn send(stream: &mut Stream, out: &[u8]) -> Result<(), ConnectError> {
    stream.write_all(out).await.map_err(ConnectError::Closed)?;
    stream.flush().await.map_err(ConnectError::Closed)
}

/// Largest handshake, health-check or control reply read.
const SMALL_REPLY_MAX: usize = 64 * 1024;
/// Largest command table read: room for many modules' commands.
const COMMAND_TABLE_MAX: usize = 8 * 1024 * 1024;
/// Largest reply of a [`run_pipeline`] (the fleet's store): its member list grows with the
/// fleet, a few hundred bytes a member.
const PIPELINE_REPLY_MAX: usize = 16 * 1024 * 1024;
/// Largest `ACL GETUSER` read: a user of a multi-tenant database can carry thousands of key
/// patterns (10 000 of them come to about 230 KB).
const ACL_USER_MAX: usize = 16 * 1024 * 1024;
/// Largest `CLIENT LIST` read: about 200 000 connections.
const CLIENT_LIST_MAX: usize = 64 * 1024 * 1024;

/// Reads exactly one RESP2 reply. Only used off the hot path (handshakes, health checks).
async fn read_reply(stream: &mut Stream, buf: &mut BytesMut) -> Result<OwnedFrame, ConnectError> {
    read_reply_up_to(stream, buf, SMALL_REPLY_MAX).await
}

/// Reads exactly one RESP2 reply of at most about `max` bytes.
async fn read_reply_up_to(
    stream: &mut Stream,
    buf: &mut BytesMut,
    max: usize,
) -> Result<OwnedFrame, ConnectError> {
    loop {
        match redis_protocol::resp2::decode::decode(buf) {
            Ok(Some((frame, used))) => {
                let _ = buf.split_to(used);
                return Ok(frame);
            }
            Ok(None) => {}
            Err(e) => return Err(ConnectError::NotResp(e.to_string())),
        }
        if buf.len() > max {
            return Err(ConnectError::Protocol(format!(
                "reply larger than {max} bytes"
            )));
        }
        let n = stream.read_buf(buf).await.map_err(ConnectError::Closed)?;
        if n == 0 {
            return Err(ConnectError::Closed(io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

/// A short description of an unexpected reply for a log line (never its payload).
fn describe(frame: &OwnedFrame) -> String {
    match frame {
        OwnedFrame::SimpleString(_) => "a simple string".into(),
        OwnedFrame::Error(e) => format!("error `{e}`"),
        OwnedFrame::Integer(_) => "an integer".into(),
        OwnedFrame::BulkString(_) => "a bulk string".into(),
        OwnedFrame::Array(_) => "an array".into(),
        OwnedFrame::Null => "a null".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::loopback_pair;

    #[tokio::test]
    async fn replies_are_read_one_by_one_however_the_bytes_arrive() {
        let (mut server, mut stream) = loopback_pair().await;
        let big = vec![b'x'; 3 * 1024 * 1024];
        let mut wire = format!("${}\r\n", big.len()).into_bytes();
        wire.extend_from_slice(&big);
        wire.extend_from_slice(b"\r\n+OK\r\n:42\r\n*2\r\n$1\r\na\r\n*1\r\n:-1\r\n");
        let writer = tokio::spawn(async move {
            // Uneven pieces, so headers and payloads are cut anywhere.
            for piece in wire.chunks(7919) {
                server.write_all(piece).await.unwrap();
            }
            server
        });
        let mut buf = BytesMut::new();
        let max = 4 * 1024 * 1024;
        let first = read_reply_up_to(&mut stream, &mut buf, max).await.unwrap();
        assert_eq!(first, OwnedFrame::BulkString(big));
        let rest = [
            OwnedFrame::SimpleString(b"OK".to_vec()),
            OwnedFrame::Integer(42),
            OwnedFrame::Array(vec![
                OwnedFrame::BulkString(b"a".to_vec()),
                OwnedFrame::Array(vec![OwnedFrame::Integer(-1)]),
            ]),
        ];
        for expected in rest {
            let frame = read_reply_up_to(&mut stream, &mut buf, max).await.unwrap();
            assert_eq!(frame, expected);
        }
        assert!(buf.is_empty(), "bytes left over: {buf:?}");
        writer.await.unwrap();
    }

    /// Only a server's known ways of turning every connection away are told apart from a
    /// refused credential: alerts and the recovery that follows a refused credential must not
    /// act on a full server, and must not miss a refusal worded in a way not listed.
    #[test]
    fn handshake_errors_are_told_apart() {
        for server in [
            "ERR max number of clients reached",
            "ERR max number of clients + cluster connections reached",
            "DENIED Redis is running in protected mode because protected mode is enabled",
        ] {
            assert!(turns_the_connection_away(server), "{server}");
        }
        for credential in [
            "WRONGPASS invalid username-password pair or user is disabled.",
            "NOAUTH Authentication required.",
            "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
            "ERR invalid password",
            "ERR some wording no Redis uses today",
        ] {
            assert!(!turns_the_connection_away(credential), "{credential}");
        }
        assert_eq!(
            without_echoed_arguments(
                "ERR unknown command 'AUTH', with args beginning with: 'app' 's3cret' ".into()
            ),
            "ERR unknown command 'AUTH'"
        );
        assert_eq!(
            without_echoed_arguments("ERR max number of clients reached".into()),
            "ERR max number of clients reached"
        );
    }

    #[tokio::test]
    async fn a_reply_past_its_limit_or_not_resp2_is_refused() {
        let (mut server, mut stream) = loopback_pair().await;
        let mut wire = format!("${}\r\n", 300_000).into_bytes();
        wire.extend(std::iter::repeat_n(b'y', 300_000));
        wire.extend_from_slice(b"\r\n");
        let writer = tokio::spawn(async move {
            // The reader gives up part way: what it does not read may not be written.
            let _ = server.write_all(&wire).await;
            server
        });
        let error = read_reply_up_to(&mut stream, &mut BytesMut::new(), 64 * 1024)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("reply larger than 65536 bytes"),
            "{error}"
        );
        drop(stream);
        let _ = writer.await;

        // A RESP3 map on a connection that asked for RESP2, and bytes that are not RESP.
        for wire in [&b"%1\r\n+a\r\n+b\r\n"[..], b"?what\r\n"] {
            let (mut server, mut stream) = loopback_pair().await;
            server.write_all(wire).await.unwrap();
            let error = read_reply_up_to(&mut stream, &mut BytesMut::new(), 1024)
                .await
                .unwrap_err();
            assert!(matches!(error, ConnectError::NotResp(_)), "{error}");
        }
    }
}
