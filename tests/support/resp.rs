//! A raw, blocking RESP client for tests: plain TCP or TLS (rustls), RESP2 and RESP3 replies.
//!
//! Replies are decoded with `redis-protocol` (the RESP3 decoder first; RESP2-only shapes such as
//! `$-1` / `*-1` nulls fall back to the RESP2 decoder) into [`Frame`], a small enum that is easy to
//! match and assert on.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_protocol::resp2::types::OwnedFrame as R2;
use redis_protocol::resp3::types::{OwnedFrame as R3, Resp3Frame, VerbatimStringFormat};

/// Default read timeout of a [`RespConn`]: generous, but a test never hangs forever.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// One decoded reply (RESP2 or RESP3). Attributes (`|`) are not part of the frame: see
/// [`RespConn::last_attributes`].
#[derive(Clone, PartialEq)]
pub enum Frame {
    /// `+...` simple string.
    Simple(String),
    /// `-...` simple error or `!...` blob error (the whole text, e.g. `ERR unknown command`).
    Error(String),
    /// `:...` integer.
    Integer(i64),
    /// `$...` bulk / blob string.
    Bulk(Vec<u8>),
    /// `*...` array.
    Array(Vec<Frame>),
    /// `$-1`, `*-1` (RESP2) or `_` (RESP3).
    Null,
    /// `,...` double (RESP3).
    Double(f64),
    /// `#t` / `#f` (RESP3).
    Boolean(bool),
    /// `(...` big number (RESP3), as its decimal text.
    BigNumber(String),
    /// `=...` verbatim string (RESP3): format (`txt`, `mkd`) and text.
    Verbatim(String, Vec<u8>),
    /// `%...` map (RESP3), in the order received.
    Map(Vec<(Frame, Frame)>),
    /// `~...` set (RESP3).
    Set(Vec<Frame>),
    /// `>...` push (RESP3).
    Push(Vec<Frame>),
}

impl Frame {
    /// A bulk string frame (for `assert_eq!`).
    pub fn bulk(b: impl AsRef<[u8]>) -> Frame {
        Frame::Bulk(b.as_ref().to_vec())
    }

    /// A simple string frame (for `assert_eq!`).
    pub fn simple(s: &str) -> Frame {
        Frame::Simple(s.to_string())
    }

    /// An array of bulk strings (for `assert_eq!`).
    pub fn bulks<B: AsRef<[u8]>>(items: &[B]) -> Frame {
        Frame::Array(items.iter().map(Frame::bulk).collect())
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Frame::Error(_))
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Frame::Null)
    }

    pub fn is_push(&self) -> bool {
        matches!(self, Frame::Push(_))
    }

    /// Text of a simple string, bulk string (if UTF-8), verbatim string or error.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Frame::Simple(s) | Frame::Error(s) => Some(s),
            Frame::Bulk(b) | Frame::Verbatim(_, b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// Bytes of a bulk, simple or verbatim string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Frame::Simple(s) => Some(s.as_bytes()),
            Frame::Bulk(b) | Frame::Verbatim(_, b) => Some(b),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Frame::Integer(i) => Some(*i),
            _ => None,
        }
    }

    /// Elements of an array, set or push.
    pub fn as_array(&self) -> Option<&[Frame]> {
        match self {
            Frame::Array(v) | Frame::Set(v) | Frame::Push(v) => Some(v),
            _ => None,
        }
    }

    /// Value of a map entry whose key is the string `key` (RESP3 map, or a RESP2 flat
    /// key/value array such as the HELLO reply).
    pub fn map_get(&self, key: &str) -> Option<&Frame> {
        match self {
            Frame::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            Frame::Array(items) => items
                .chunks(2)
                .find(|kv| kv.len() == 2 && kv[0].as_str() == Some(key))
                .map(|kv| &kv[1]),
            _ => None,
        }
    }

    /// Panics unless this is `+OK`.
    #[track_caller]
    pub fn assert_ok(&self) {
        assert_eq!(self, &Frame::simple("OK"), "expected +OK");
    }

    /// Panics unless this is the simple string `s`.
    #[track_caller]
    pub fn assert_simple(&self, s: &str) {
        assert_eq!(self, &Frame::simple(s), "expected +{s}");
    }

    /// Panics unless this is the bulk string `b`.
    #[track_caller]
    pub fn assert_bulk(&self, b: impl AsRef<[u8]>) {
        assert_eq!(self, &Frame::bulk(b), "expected a bulk string");
    }

    /// Panics unless this is the integer `i`.
    #[track_caller]
    pub fn assert_int(&self, i: i64) {
        assert_eq!(self, &Frame::Integer(i), "expected :{i}");
    }

    /// Panics unless this is a null.
    #[track_caller]
    pub fn assert_null(&self) {
        assert!(self.is_null(), "expected a null, got {self:?}");
    }

    /// Panics unless this is an error whose text starts with `prefix` (e.g. `"WRONGPASS"`,
    /// `"ERR unknown"`). Returns the whole error text.
    #[track_caller]
    pub fn assert_error(&self, prefix: &str) -> &str {
        match self {
            Frame::Error(e) if e.starts_with(prefix) => e,
            other => panic!("expected an error starting with {prefix:?}, got {other:?}"),
        }
    }

    /// Panics if this is an error (returns self for chaining).
    #[track_caller]
    pub fn assert_not_error(&self) -> &Frame {
        assert!(!self.is_error(), "unexpected error reply: {self:?}");
        self
    }

    fn from_resp3(f: R3) -> Frame {
        match f {
            R3::BlobString { data, .. } => Frame::Bulk(data),
            R3::BlobError { data, .. } => Frame::Error(String::from_utf8_lossy(&data).into_owned()),
            R3::SimpleString { data, .. } => {
                Frame::Simple(String::from_utf8_lossy(&data).into_owned())
            }
            R3::SimpleError { data, .. } => Frame::Error(data),
            R3::Boolean { data, .. } => Frame::Boolean(data),
            R3::Null => Frame::Null,
            R3::Number { data, .. } => Frame::Integer(data),
            R3::Double { data, .. } => Frame::Double(data),
            R3::BigNumber { data, .. } => {
                Frame::BigNumber(String::from_utf8_lossy(&data).into_owned())
            }
            R3::VerbatimString { data, format, .. } => {
                let format = match format {
                    VerbatimStringFormat::Text => "txt",
                    VerbatimStringFormat::Markdown => "mkd",
                };
                Frame::Verbatim(format.to_string(), data)
            }
            R3::Array { data, .. } => {
                Frame::Array(data.into_iter().map(Frame::from_resp3).collect())
            }
            R3::Map { data, .. } => Frame::Map(
                data.into_iter()
                    .map(|(k, v)| (Frame::from_resp3(k), Frame::from_resp3(v)))
                    .collect(),
            ),
            R3::Set { data, .. } => Frame::Set(data.into_iter().map(Frame::from_resp3).collect()),
            R3::Push { data, .. } => Frame::Push(data.into_iter().map(Frame::from_resp3).collect()),
            R3::ChunkedString(data) => Frame::Bulk(data),
            R3::Hello { .. } => panic!("a server never sends HELLO"),
        }
    }

    fn from_resp2(f: R2) -> Frame {
        match f {
            R2::SimpleString(s) => Frame::Simple(String::from_utf8_lossy(&s).into_owned()),
            R2::Error(e) => Frame::Error(e),
            R2::Integer(i) => Frame::Integer(i),
            R2::BulkString(b) => Frame::Bulk(b),
            R2::Array(v) => Frame::Array(v.into_iter().map(Frame::from_resp2).collect()),
            R2::Null => Frame::Null,
        }
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Simple(s) => write!(f, "+{s:?}"),
            Frame::Error(e) => write!(f, "-{e:?}"),
            Frame::Integer(i) => write!(f, ":{i}"),
            Frame::Bulk(b) => write!(f, "Bulk(\"{}\")", show(b, 200)),
            Frame::Array(v) => f.debug_list().entries(v).finish(),
            Frame::Null => write!(f, "Null"),
            Frame::Double(d) => write!(f, ",{d}"),
            Frame::Boolean(b) => write!(f, "#{b}"),
            Frame::BigNumber(n) => write!(f, "({n}"),
            Frame::Verbatim(fmt_, b) => write!(f, "Verbatim({fmt_}:\"{}\")", show(b, 200)),
            Frame::Map(m) => f
                .debug_map()
                .entries(m.iter().map(|(k, v)| (k, v)))
                .finish(),
            Frame::Set(v) => {
                write!(f, "Set")?;
                f.debug_set().entries(v).finish()
            }
            Frame::Push(v) => {
                write!(f, "Push")?;
                f.debug_list().entries(v).finish()
            }
        }
    }
}

/// Escaped, truncated view of bytes for messages.
pub fn show(b: &[u8], max: usize) -> String {
    let shown = &b[..b.len().min(max)];
    let mut s = shown.escape_ascii().to_string();
    if b.len() > max {
        s.push_str(&format!("...({} bytes)", b.len()));
    }
    s
}

/// Encodes a command as a RESP multibulk array.
pub fn encode_cmd<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// RESP3 attributes (`|`) that came with a reply.
pub type Attributes = Vec<(Frame, Frame)>;

/// Attempts to decode one complete reply from the start of `buf`.
/// `Ok(None)`: more bytes are needed.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize, Attributes)>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    match redis_protocol::resp3::decode::complete::decode(buf) {
        Ok(Some((mut frame, n))) => {
            let attrs = frame
                .take_attributes()
                .map(|a| {
                    a.into_iter()
                        .map(|(k, v)| (Frame::from_resp3(k), Frame::from_resp3(v)))
                        .collect()
                })
                .unwrap_or_default();
            Ok(Some((Frame::from_resp3(frame), n, attrs)))
        }
        Ok(None) => Ok(None),
        // RESP2 null bulk/array (`$-1`, `*-1`) look like RESP3 streaming headers to the RESP3
        // decoder; the RESP2 decoder understands them.
        Err(e3) => match redis_protocol::resp2::decode::decode(buf) {
            Ok(Some((frame, n))) => Ok(Some((Frame::from_resp2(frame), n, Vec::new()))),
            Ok(None) => Ok(None),
            Err(e2) => match decode_mixed(buf, 0) {
                Ok(Some((frame, n))) => Ok(Some((frame, n, Vec::new()))),
                Ok(None) => Ok(None),
                Err(e) => Err(format!(
                    "undecodable reply (resp3: {e3:?}; resp2: {e2:?}; mixed: {e}): \"{}\"",
                    show(buf, 300)
                )),
            },
        },
    }
}

/// Decodes the union of RESP2 and RESP3 (no attributes) from `buf[at..]`, returning the frame
/// and where it ends. For the one reply that mixes them, which neither decoder above takes: an
/// EXEC whose transaction ran HELLO, so that its array starts in one protocol and goes on in
/// the other (`*2\r\n$-1\r\n%7\r\n...`).
fn decode_mixed(buf: &[u8], at: usize) -> Result<Option<(Frame, usize)>, String> {
    let Some(len) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let Some((&kind, line)) = buf[at..at + len].split_first() else {
        return Err(format!("empty line at {at}"));
    };
    let text = || String::from_utf8_lossy(line).into_owned();
    let number = || -> Result<i64, String> {
        text()
            .parse()
            .map_err(|_| format!("bad length or integer {:?}", text()))
    };
    let next = at + len + 2;
    let aggregate = |count: i64, per_item: usize| -> Result<Option<(Vec<Frame>, usize)>, String> {
        let mut items = Vec::new();
        let mut end = next;
        for _ in 0..count.max(0) as usize * per_item {
            match decode_mixed(buf, end)? {
                Some((item, after)) => {
                    items.push(item);
                    end = after;
                }
                None => return Ok(None),
            }
        }
        Ok(Some((items, end)))
    };
    let blob = |n: i64| -> Option<(Vec<u8>, usize)> {
        let end = next + n as usize;
        (buf.len() >= end + 2).then(|| (buf[next..end].to_vec(), end + 2))
    };
    Ok(Some(match kind {
        b'+' => (Frame::Simple(text()), next),
        b'-' => (Frame::Error(text()), next),
        b':' => (Frame::Integer(number()?), next),
        b'_' => (Frame::Null, next),
        b'#' => (Frame::Boolean(line == b"t"), next),
        b',' => (
            Frame::Double(
                text()
                    .parse()
                    .map_err(|_| format!("bad double {:?}", text()))?,
            ),
            next,
        ),
        b'(' => (Frame::BigNumber(text()), next),
        b'$' | b'*' if number()? < 0 => (Frame::Null, next),
        b'$' | b'!' | b'=' => {
            let Some((bytes, end)) = blob(number()?) else {
                return Ok(None);
            };
            let frame = match kind {
                b'$' => Frame::Bulk(bytes),
                b'!' => Frame::Error(String::from_utf8_lossy(&bytes).into_owned()),
                _ => {
                    let (format, body) = bytes.split_at(bytes.len().min(4));
                    let format = String::from_utf8_lossy(&format[..format.len().min(3)]);
                    Frame::Verbatim(format.into_owned(), body.to_vec())
                }
            };
            (frame, end)
        }
        b'*' | b'~' | b'>' | b'%' => {
            let per_item = if kind == b'%' { 2 } else { 1 };
            let Some((items, end)) = aggregate(number()?, per_item)? else {
                return Ok(None);
            };
            let frame = match kind {
                b'*' => Frame::Array(items),
                b'~' => Frame::Set(items),
                b'>' => Frame::Push(items),
                _ => {
                    let mut pairs = Vec::new();
                    let mut items = items.into_iter();
                    while let (Some(k), Some(v)) = (items.next(), items.next()) {
                        pairs.push((k, v));
                    }
                    Frame::Map(pairs)
                }
            };
            (frame, end)
        }
        other => return Err(format!("unknown type byte {:?} at {at}", other as char)),
    }))
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    Unix(std::os::unix::net::UnixStream),
}

impl Stream {
    #[track_caller]
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
            Stream::Unix(_) => panic!("a Unix socket connection has no TCP stream"),
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            _ => self.tcp().set_read_timeout(t),
        }
    }

    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
            _ => self.tcp().shutdown(Shutdown::Write),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// A blocking RESP connection. Methods that return `Frame` panic on I/O errors, timeouts and
/// protocol errors (with a clear message); the `try_` variants return them.
pub struct RespConn {
    stream: Stream,
    buf: Vec<u8>,
    last_attributes: Attributes,
}

/// TLS options of [`RespConn::connect_tls_with`].
#[derive(Default, Clone)]
pub struct TlsClientOptions<'a> {
    /// Trusted CA (PEM).
    pub ca: Option<&'a Path>,
    /// Name to verify the server certificate against (SNI); default `localhost`.
    pub server_name: Option<&'a str>,
    /// Client certificate chain and key (PEM) for mutual TLS.
    pub client_cert: Option<(&'a Path, &'a Path)>,
}

/// Where RESP2 clients receive the invalidations other connections redirect to them.
pub const INVALIDATION_CHANNEL: &str = "__redis__:invalidate";

/// What a RESP2 subscriber of [`INVALIDATION_CHANNEL`] gets for `keys` (None: flush everything,
/// as Redis sends after FLUSHALL).
pub fn invalidation_message(keys: Option<&[&str]>) -> Frame {
    Frame::Array(vec![
        Frame::bulk("message"),
        Frame::bulk(INVALIDATION_CHANNEL),
        keys.map_or(Frame::Null, Frame::bulks),
    ])
}

impl RespConn {
    /// `CLIENT ID`.
    #[track_caller]
    pub fn client_id(&mut self) -> i64 {
        let reply = self.cmd(&["CLIENT", "ID"]);
        reply
            .as_int()
            .unwrap_or_else(|| panic!("CLIENT ID answered {reply:?}"))
    }

    /// `CLIENT TRACKING ON REDIRECT <target>`, which must succeed.
    #[track_caller]
    pub fn redirect_tracking_to(&mut self, target: i64) {
        self.cmd(&["CLIENT", "TRACKING", "ON", "REDIRECT", &target.to_string()])
            .assert_ok();
    }

    /// Connects over plain TCP (panics on failure). Read timeout: [`DEFAULT_READ_TIMEOUT`].
    #[track_caller]
    pub fn connect(addr: impl ToSocketAddrs + fmt::Debug) -> RespConn {
        match Self::try_connect(&addr) {
            Ok(c) => c,
            Err(e) => panic!("cannot connect to {addr:?}: {e}"),
        }
    }

    pub fn try_connect(addr: impl ToSocketAddrs) -> io::Result<RespConn> {
        let tcp = connect_tcp(addr)?;
        Ok(RespConn::from_stream(Stream::Plain(tcp)))
    }

    /// Connects over TLS, trusting the CA in `ca_path`, verifying the name `localhost`.
    #[track_caller]
    pub fn connect_tls(addr: impl ToSocketAddrs + fmt::Debug, ca_path: &Path) -> RespConn {
        Self::connect_tls_with(
            addr,
            TlsClientOptions {
                ca: Some(ca_path),
                ..Default::default()
            },
        )
    }

    /// Connects over TLS with the given options (panics on failure, including a failed handshake).
    #[track_caller]
    pub fn connect_tls_with(
        addr: impl ToSocketAddrs + fmt::Debug,
        opts: TlsClientOptions<'_>,
    ) -> RespConn {
        match Self::try_connect_tls_with(&addr, opts) {
            Ok(c) => c,
            Err(e) => panic!("cannot connect over TLS to {addr:?}: {e}"),
        }
    }

    /// Connects over TLS and completes the handshake; a handshake failure (wrong CA, missing or
    /// rejected client certificate) is an `Err`.
    pub fn try_connect_tls_with(
        addr: impl ToSocketAddrs,
        opts: TlsClientOptions<'_>,
    ) -> io::Result<RespConn> {
        let config = tls_client_config(&opts)?;
        let name = rustls::pki_types::ServerName::try_from(
            opts.server_name.unwrap_or("localhost").to_string(),
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let conn =
            rustls::ClientConnection::new(Arc::new(config), name).map_err(io::Error::other)?;
        let tcp = connect_tcp(addr)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        // Drive the handshake now so that failures surface here.
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(RespConn::from_stream(Stream::Tls(Box::new(tls))))
    }

    /// Connects to a Unix socket (panics on failure). Read timeout: [`DEFAULT_READ_TIMEOUT`].
    #[track_caller]
    pub fn connect_unix(path: &Path) -> RespConn {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => RespConn::from_stream(Stream::Unix(s)),
            Err(e) => panic!("cannot connect to {}: {e}", path.display()),
        }
    }

    fn from_stream(stream: Stream) -> RespConn {
        if !matches!(stream, Stream::Unix(_)) {
            let _ = stream.tcp().set_nodelay(true);
        }
        let _ = stream.set_read_timeout(Some(DEFAULT_READ_TIMEOUT));
        RespConn {
            stream,
            buf: Vec::new(),
            last_attributes: Vec::new(),
        }
    }

    /// Sets the read timeout (`None`: block forever — avoid in tests).
    pub fn set_read_timeout(&mut self, t: Option<Duration>) {
        self.stream.set_read_timeout(t).expect("set_read_timeout");
    }

    /// The underlying TCP stream (local/peer address, shutdown...).
    pub fn tcp(&self) -> &TcpStream {
        self.stream.tcp()
    }

    /// Sends bytes as they are (inline commands, partial frames, garbage).
    #[track_caller]
    pub fn send_raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.try_send_raw(bytes) {
            panic!("write failed: {e}");
        }
    }

    pub fn try_send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Ends a TLS session the clean way, with a `close_notify` alert, leaving the TCP
    /// connection open (panics on a plain connection).
    #[track_caller]
    pub fn send_close_notify(&mut self) {
        let Stream::Tls(tls) = &mut self.stream else {
            panic!("send_close_notify on a plain connection");
        };
        tls.conn.send_close_notify();
        tls.flush().expect("close_notify sent");
    }

    /// Sends one command without reading its reply (for pipelining).
    #[track_caller]
    pub fn send_cmd<A: AsRef<[u8]>>(&mut self, args: &[A]) {
        self.send_raw(&encode_cmd(args));
    }

    /// Sends one command and reads one reply. Accepts `&[&str]`, `&[&[u8]]`, `&[Vec<u8>]`, ...
    #[track_caller]
    pub fn cmd<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Frame {
        self.send_cmd(args);
        self.read_reply()
    }

    /// Reads one reply (a push frame counts as one). Panics on EOF, timeout or protocol error.
    #[track_caller]
    pub fn read_reply(&mut self) -> Frame {
        match self.try_read_reply() {
            Ok(f) => f,
            Err(e) => panic!("reading a reply failed: {e}"),
        }
    }

    /// Reads one reply. EOF is `ErrorKind::UnexpectedEof`; a timeout is `WouldBlock` or
    /// `TimedOut`; a protocol error is `InvalidData`.
    pub fn try_read_reply(&mut self) -> io::Result<Frame> {
        self.try_read_reply_raw().map(|(frame, _)| frame)
    }

    /// [`RespConn::try_read_reply`], also returning the reply's bytes exactly as they came
    /// (attributes included).
    pub fn try_read_reply_raw(&mut self) -> io::Result<(Frame, Vec<u8>)> {
        loop {
            match decode_frame(&self.buf) {
                Ok(Some((frame, n, attrs))) => {
                    let raw = self.buf.drain(..n).collect();
                    self.last_attributes = attrs;
                    return Ok((frame, raw));
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            self.fill()?;
        }
    }

    /// Reads `n` replies.
    #[track_caller]
    pub fn read_replies(&mut self, n: usize) -> Vec<Frame> {
        (0..n).map(|_| self.read_reply()).collect()
    }

    /// Attributes (`|`) that came with the last reply read, if any.
    pub fn last_attributes(&self) -> &[(Frame, Frame)] {
        &self.last_attributes
    }

    /// Reads whatever raw bytes are available (at least one, or EOF = empty vec), bypassing the
    /// decoder. Bytes already buffered are returned first.
    pub fn read_raw(&mut self) -> io::Result<Vec<u8>> {
        if self.buf.is_empty() {
            match self.fill() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        }
        Ok(std::mem::take(&mut self.buf))
    }

    /// Asserts that no reply arrives within `wait` (e.g. a blocked BLPOP, a subscriber with no
    /// message). Restores the default read timeout afterwards.
    #[track_caller]
    pub fn assert_no_reply_within(&mut self, wait: Duration) {
        self.set_read_timeout(Some(wait));
        let r = self.try_read_reply();
        self.set_read_timeout(Some(DEFAULT_READ_TIMEOUT));
        match r {
            Err(e) if is_timeout(&e) => {}
            Err(e) => panic!("expected no reply, got error {e}"),
            Ok(f) => panic!("expected no reply, got {f:?}"),
        }
    }

    /// Asserts that the peer closes the connection within `within` (any pending replies are
    /// read and returned first).
    #[track_caller]
    pub fn expect_closed(&mut self, within: Duration) -> Vec<Frame> {
        let deadline = Instant::now() + within;
        let mut replies = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "connection still open after {within:?}; replies read: {replies:?}"
            );
            self.set_read_timeout(Some(left));
            match self.try_read_reply() {
                Ok(f) => replies.push(f),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e) if is_timeout(&e) => {
                    panic!("connection still open after {within:?}; replies read: {replies:?}")
                }
                Err(e) => panic!("expected the connection to close, got error {e}"),
            }
        }
        replies
    }

    /// Closes the write half (the peer sees EOF).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown_write();
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "connection closed by peer ({} undecoded bytes buffered: \"{}\")",
                            self.buf.len(),
                            show(&self.buf, 200)
                        ),
                    ));
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// True for the errors a read timeout produces.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn connect_tcp(addr: impl ToSocketAddrs) -> io::Result<TcpStream> {
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address")))
}

/// A rustls client config from PEM files.
pub fn tls_client_config(opts: &TlsClientOptions<'_>) -> io::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = opts.ca {
        for cert in CertificateDer::pem_file_iter(ca).map_err(io::Error::other)? {
            roots
                .add(cert.map_err(io::Error::other)?)
                .map_err(io::Error::other)?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots);
    let config = match opts.client_cert {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(io::Error::other)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(io::Error::other)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(io::Error::other)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(io::Error::other)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}
