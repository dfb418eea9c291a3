//! One stream type for every connection the proxy holds: plain TCP or TLS, client side or
//! upstream side, so sessions and the pool are written once.
//!
//! Reads and writes go straight to the kernel (rustix's raw system calls), not through glibc's
//! `recv`, `send` and `writev`. Once a process has had a second thread, however briefly (tokio
//! resolves a host name on a blocking thread), glibc wraps each of those calls in
//! thread-cancellation bookkeeping, for good. Side by side with a TLS upstream (where a file
//! watcher's thread then ran), that bookkeeping cost 1.5-2.4% of the proxy's CPU per request;
//! the floor forwarder it is compared with never has a second thread. (Nor, at work, does the
//! proxy: see `watch::FileWatch`.)

use std::io;
use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use rustix::net::{RecvFlags, SendFlags};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::read_buffers::{make_read_room, read_room};

/// The longest keepalive idle time Linux takes (`TCP_KEEPIDLE`, in seconds).
const KEEPALIVE_MAX_SECS: u64 = 32_767;

/// Whether `idle` can be a keepalive time: 0 (off), or whole seconds up to Linux's limit.
pub fn check_keepalive(idle: std::time::Duration) -> Result<(), &'static str> {
    if idle.is_zero() {
        return Ok(());
    }
    if idle.subsec_nanos() != 0 || idle.as_secs() > KEEPALIVE_MAX_SECS {
        return Err("must be 0 (off) or whole seconds from 1s to 32767s");
    }
    Ok(())
}

/// Turns TCP keepalive on for `tcp` the way Redis does (`tcp-keepalive`): the first probe
/// after `idle` without traffic, then every third of it, and the connection is given up after
/// 3 probes go unanswered, so a dead peer is found within twice `idle`. A zero `idle` leaves
/// keepalive off. Fails only if the kernel refuses the options.
pub fn set_keepalive(tcp: &TcpStream, idle: std::time::Duration) -> io::Result<()> {
    if idle.is_zero() {
        return Ok(());
    }
    let interval = (idle / 3).max(std::time::Duration::from_secs(1));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(3);
    socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive)
}

/// Who is at the other end of a client connection, for logs and audit events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(std::net::SocketAddr),
    /// A client of the Unix socket listener: its process and user, as the kernel gave them
    /// when it connected (`SO_PEERCRED`).
    Unix {
        pid: Option<i32>,
        uid: Option<u32>,
    },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "{addr}"),
            Peer::Unix { pid, uid } => {
                f.write_str("unix")?;
                if let Some(pid) = pid {
                    write!(f, ":pid={pid}")?;
                }
                if let Some(uid) = uid {
                    write!(f, ":uid={uid}")?;
                }
                Ok(())
            }
        }
    }
}

impl Peer {
    /// The peer of an accepted Unix socket connection.
    pub fn of_unix(unix: &UnixStream) -> Self {
        let credentials = unix.peer_cred().ok();
        Peer::Unix {
            pid: credentials.as_ref().and_then(|c| c.pid()),
            uid: credentials.map(|c| c.uid()),
        }
    }
}

pub enum Stream {
    Tcp(RawTcp),
    /// A client on the Unix socket listener (always plain).
    Unix(RawUnix),
    /// TLS towards the upstream (we are the TLS client).
    TlsUpstream(Box<tokio_rustls::client::TlsStream<RawTcp>>),
    /// TLS from an application (we are the TLS server).
    TlsClient(Box<tokio_rustls::server::TlsStream<RawTcp>>),
}

/// The socket under every stream (under the TLS layer, if any), read and written with direct
/// system calls (see the module's note).
pub struct RawSocket<S> {
    socket: S,
    read_waiter: ReadWaiter,
}

/// A TCP connection (client or upstream side; TLS runs over these only).
pub type RawTcp = RawSocket<TcpStream>;
/// A client connection on the Unix socket listener.
pub type RawUnix = RawSocket<UnixStream>;

impl<S: ReadySocket> RawSocket<S> {
    pub fn new(socket: S) -> Self {
        RawSocket {
            socket,
            read_waiter: ReadWaiter::new(),
        }
    }

    /// Reads into `dst`, as `poll_recv` does.
    fn poll_recv_into(&mut self, cx: &mut Context<'_>, dst: &mut [u8]) -> Poll<io::Result<usize>> {
        let socket = &self.socket;
        let room = dst.len();
        poll_recv(socket, &mut self.read_waiter, cx, || {
            let n = rustix::net::recv(socket, &mut *dst, RecvFlags::empty())?.0;
            Ok((n, 0 < n && n < room))
        })
    }
}

/// What the direct reads and writes need of a tokio socket: its readiness and its descriptor.
/// TCP and Unix stream sockets take the same `recv`, `send` and `writev`.
pub trait ReadySocket: AsFd {
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// `ReadySocket` for tokio's stream sockets, which have these methods under the same names.
macro_rules! ready_socket {
    ($($socket:ty),*) => {$(
        impl ReadySocket for $socket {
            #[inline]
            fn try_io<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                <$socket>::try_io(self, interest, f)
            }

            #[inline]
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$socket>::poll_read_ready(self, cx)
            }

            #[inline]
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$socket>::poll_write_ready(self, cx)
            }
        }
    )*};
}

ready_socket!(TcpStream, UnixStream);

/// The task tokio will wake when the socket next becomes readable, when the reads know it: it
/// lets a read that finds nothing skip registering again (see `poll_recv`).
///
/// Registering (`poll_read_ready`) takes the socket's waiter lock and the task budget: about 120
/// instructions, and a session polls both its sockets on every pass, so most of its reads find
/// nothing on a socket whose registration from an earlier pass still stands. At -c 50 -P 1 that
/// was five registrations per request where three were already in place.
///
/// Why the registration is known to stand: tokio's reader slot gives up its waker only when the
/// I/O driver finds the socket readable; the driver marks the socket readable first, then takes
/// the waker. On a current-thread runtime the driver runs on the same thread as the tasks,
/// between their polls, so the two steps are never seen apart: a read that finds the socket not
/// readable knows its waker is still in the slot, unless a read since has seen the socket
/// readable (and cleared that itself). Every read of our sockets goes through `poll_recv`, which
/// forgets the holder whenever it sees the socket readable. On a multi-thread runtime the driver
/// runs elsewhere: a wake for bytes already read can take a registration made after them (test
/// `a_multi_thread_runtime_serves_many_clients_without_a_stall` caught that once), so there
/// every read that finds nothing registers.
struct ReadWaiter {
    /// Skipping is sound here: the socket belongs to a current-thread runtime.
    may_skip: bool,
    /// The waker (its data and vtable pointers) in tokio's reader slot, when known. The slot
    /// holds a clone of it, so that task is alive and no other waker can have those pointers.
    registered: Option<(usize, usize)>,
}

impl ReadWaiter {
    fn new() -> Self {
        let current_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        ReadWaiter {
            may_skip: current_thread,
            registered: None,
        }
    }

    fn key(waker: &std::task::Waker) -> (usize, usize) {
        (
            waker.data() as usize,
            std::ptr::from_ref(waker.vtable()) as usize,
        )
    }

    /// True when tokio holds this task's waker for the socket's next readable event.
    #[inline]
    fn holds(&self, cx: &Context<'_>) -> bool {
        self.registered == Some(Self::key(cx.waker()))
    }
}

impl Stream {
    /// A plain TCP connection.
    pub fn plain(tcp: TcpStream) -> Self {
        Stream::Tcp(RawTcp::new(tcp))
    }

    /// A client connection on the Unix socket listener.
    pub fn unix(unix: UnixStream) -> Self {
        Stream::Unix(RawUnix::new(unix))
    }

    /// The socket under any TLS layer.
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(raw) => raw.socket.as_fd(),
            Stream::Unix(raw) => raw.socket.as_fd(),
            Stream::TlsUpstream(s) => s.get_ref().0.socket.as_fd(),
            Stream::TlsClient(s) => s.get_ref().0.socket.as_fd(),
        }
    }

    /// True when written bytes may wait in this layer until a flush (TLS records); a plain
    /// socket hands every write to the kernel, so the flush after it can be skipped.
    pub fn buffers_writes(&self) -> bool {
        !matches!(self, Stream::Tcp(_) | Stream::Unix(_))
    }

    /// True when the peer has closed the connection or sent something unexpected while it sat
    /// idle. Checked without blocking before an idle connection is handed out.
    ///
    /// It asks the kernel (a non-blocking `MSG_PEEK`), not tokio's readiness: that is updated
    /// only when the reactor next polls, so a connection the server closed a moment ago (a
    /// `CLIENT KILL USER` that took the session's connection and the idle ones together) still
    /// looked alive, and the session that had just lost its own connection was handed a dead one.
    pub fn looks_closed(&self) -> bool {
        // Anything but "nothing to read" means EOF, an error, or bytes nobody asked for (a TLS
        // alert, a shutdown notice).
        match self.peek_one() {
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
            Ok(_) => true,
        }
    }

    /// True when the kernel already knows the peer closed the connection (end of stream, or a
    /// reset), whatever tokio's readiness says. Unlike `looks_closed`, bytes waiting to be
    /// read say nothing: they may be the answers the caller expects.
    pub fn peer_has_closed(&self) -> bool {
        match self.peek_one() {
            Ok(n) => n == 0,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        }
    }

    /// A non-blocking `MSG_PEEK` of one byte (tokio keeps the socket non-blocking).
    fn peek_one(&self) -> io::Result<usize> {
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        socket2::SockRef::from(&self.fd()).peek(&mut probe)
    }

    /// Reads what has arrived into `buf`, and returns how many bytes came (0: end of stream).
    /// Room is made only once there is something to read (`read_buffers::make_read_room`): a
    /// buffer with no memory of its own takes one from the thread's stock then, and not for a
    /// poll that finds nothing. A TLS stream hands over what it decrypts (`poll_read_tls`).
    ///
    /// A plain TCP stream reads straight away when tokio has seen it readable (`try_io`), without
    /// the task-budget and registration steps of tokio's `poll_read`, and registers for the next
    /// event only when there is nothing to read, and only when its registration from an earlier
    /// poll may be gone (`ReadWaiter`: on a current-thread runtime that is known; on a
    /// multi-thread runtime every such read registers).
    pub fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Tcp(raw) => poll_read_plain(raw, cx, buf),
            Stream::Unix(raw) => poll_read_plain(raw, cx, buf),
            Stream::TlsUpstream(s) => {
                let (io, conn) = s.get_mut();
                poll_read_tls_into(io, conn, cx, buf)
            }
            Stream::TlsClient(s) => {
                let (io, conn) = s.get_mut();
                poll_read_tls_into(io, conn, cx, buf)
            }
        }
    }
}

/// `Stream::poll_read_into` for a TLS stream: room is made in `buf` when decrypted bytes are
/// there to hand over.
fn poll_read_tls_into<D>(
    io: &mut RawTcp,
    conn: &mut rustls::ConnectionCommon<D>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let room = read_room(buf);
    poll_read_tls(io, conn, cx, room, |bytes| {
        make_read_room(buf);
        buf.extend_from_slice(bytes)
    })
}

/// Reads decrypted bytes, at most `room` of them, handing them to `put`, and returns how many
/// came (0: the peer closed the TLS session cleanly).
///
/// This drives rustls's buffered API (`read_tls`, `process_new_packets`, `reader`) directly
/// instead of through tokio-rustls's `poll_read`, which costs a second pass through every layer
/// after each read that brought data (it tries to fill the buffer, and finds the socket empty)
/// and the full stack of adapters for every poll that finds nothing. With a TLS upstream those
/// passes were all the proxy spent on TLS beyond what the floor forwarder spends: driving
/// rustls here took GET -P 16 from 825 to 756 instructions per request (the floor: 617;
/// benches/callgrind.sh --tls) and 2-3% off the CPU per request side by side.
/// Every read of a TLS stream goes through here once the handshake is done, so tokio-rustls's
/// own read state is never half-used. Writes, flushes and shutdown stay with tokio-rustls.
fn poll_read_tls<D>(
    io: &mut RawTcp,
    conn: &mut rustls::ConnectionCommon<D>,
    cx: &mut Context<'_>,
    room: usize,
    mut put: impl FnMut(&[u8]),
) -> Poll<io::Result<usize>> {
    if room == 0 {
        return Poll::Ready(Ok(0));
    }
    // `wants_read` says rustls holds no decrypted bytes and has not seen the session end: the
    // common case, when the only thing to do is to read the socket.
    if !conn.wants_read()
        && let Some(read) = take_plaintext(conn, room, &mut put)
    {
        return Poll::Ready(read);
    }
    loop {
        // Read what the socket holds (or wait for it), and decrypt it.
        let RawSocket {
            socket: tcp,
            read_waiter,
        } = io;
        let tcp = &*tcp;
        ready!(poll_recv(tcp, read_waiter, cx, || {
            let mut socket = SocketReader {
                tcp,
                drained: false,
            };
            let n = conn.read_tls(&mut socket)?;
            Ok((n, socket.drained))
        }))?;
        if let Err(e) = conn.process_new_packets() {
            // rustls queued an alert telling the peer why: one attempt to send it, as
            // tokio-rustls makes, without waiting.
            let _ = conn.write_tls(&mut SocketWriter(tcp));
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
        }
        // Nothing yet when only part of a record came, or a record for rustls alone (a
        // session ticket, a key update): read on.
        if let Some(read) = take_plaintext(conn, room, &mut put) {
            return Poll::Ready(read);
        }
    }
}

/// Hands `put` up to `room` bytes rustls has decrypted and returns how many, or 0 when the
/// peer closed the TLS session cleanly (close_notify), or an error when the connection ended
/// without it; `None` when there is nothing to hand over yet.
fn take_plaintext<D>(
    conn: &mut rustls::ConnectionCommon<D>,
    room: usize,
    put: &mut impl FnMut(&[u8]),
) -> Option<io::Result<usize>> {
    let mut n = 0;
    loop {
        let mut reader = conn.reader();
        match io::BufRead::fill_buf(&mut reader) {
            Ok([]) => return Some(Ok(n)), // close_notify: the clean end
            Ok(chunk) => {
                let take = chunk.len().min(room - n);
                put(&chunk[..take]);
                io::BufRead::consume(&mut reader, take);
                n += take;
                if n == room {
                    return Some(Ok(n));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return (n > 0).then_some(Ok(n));
            }
            // The end came without close_notify: said once the bytes before it are read.
            Err(e) => return Some(if n > 0 { Ok(n) } else { Err(e) }),
        }
    }
}

/// The socket as rustls reads TLS records from it: one direct `recv`, noting whether it
/// emptied the socket (see `poll_recv`).
struct SocketReader<'a> {
    tcp: &'a TcpStream,
    drained: bool,
}

impl io::Read for SocketReader<'_> {
    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        let n = rustix::net::recv(self.tcp, &mut *dst, RecvFlags::empty())?.0;
        self.drained = 0 < n && n < dst.len();
        Ok(n)
    }
}

/// The socket as rustls writes an alert to it on a failed read.
struct SocketWriter<'a>(&'a TcpStream);

impl io::Write for SocketWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(rustix::net::send(self.0, buf, SendFlags::NOSIGNAL)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `Stream::poll_read_into` for a plain socket.
fn poll_read_plain<S: ReadySocket>(
    raw: &mut RawSocket<S>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let socket = &raw.socket;
    poll_recv(socket, &mut raw.read_waiter, cx, || {
        make_read_room(buf);
        let room = buf.capacity() - buf.len();
        let n = recv_into(socket, buf)?;
        Ok((n, 0 < n && n < room))
    })
}

/// Runs `recv` (a direct system call; it returns how many bytes came, and whether it emptied
/// the socket) when tokio has seen the socket readable, and waits for readability when there
/// is nothing to read: it registers with tokio for the next readable event, unless `waiter`
/// knows this task's registration still stands.
fn poll_recv<S: ReadySocket>(
    socket: &S,
    waiter: &mut ReadWaiter,
    cx: &mut Context<'_>,
    mut recv: impl FnMut() -> io::Result<(usize, bool)>,
) -> Poll<io::Result<usize>> {
    loop {
        let mut drained = 0;
        // `try_io` runs the read only when tokio has seen the socket readable, and clears that
        // readiness when the read reports `WouldBlock`.
        let result = socket.try_io(Interest::READABLE, || {
            // Readable: the driver may have taken the registered waker when it saw that.
            waiter.registered = None;
            let (n, emptied) = recv()?;
            if emptied {
                // A read that did not fill the buffer emptied the socket (epoll is
                // edge-triggered): clear the readiness, as tokio's own `poll_read` does, so
                // the next read waits for an event instead of making a system call in vain.
                drained = n;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match result {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(_) if drained > 0 => return Poll::Ready(Ok(drained)),
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Poll::Ready(Err(e)),
            // Not readable, and tokio already holds this task's waker for the next event.
            Err(_) if waiter.holds(cx) => return Poll::Pending,
            // Not readable, or nothing left: wait (an event may have come in between).
            Err(_) => match socket.poll_read_ready(cx) {
                Poll::Ready(ready) => ready?,
                Poll::Pending => {
                    // A poll refused for the task budget registers nothing (tokio wakes the
                    // task at once instead); any other pending poll left this waker in the
                    // reader slot.
                    if waiter.may_skip && tokio::task::coop::has_budget_remaining() {
                        waiter.registered = Some(ReadWaiter::key(cx.waker()));
                    }
                    return Poll::Pending;
                }
            },
        }
    }
}

/// `recv(2)` into the spare capacity of `buf`, made directly (see the module's note).
fn recv_into(socket: impl AsFd, buf: &mut BytesMut) -> io::Result<usize> {
    let ((filled, _), _) = rustix::net::recv(socket, buf.spare_capacity_mut(), RecvFlags::empty())?;
    let n = filled.len();
    // SAFETY: the kernel wrote the first `n` bytes of the spare capacity (`filled` is them).
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// `poll_write` for a plain socket: writes straight away when tokio has seen the socket
/// writable (the usual case), without the task-budget and registration steps of tokio's
/// `poll_write`, and waits for writability only when the socket is full.
fn poll_write_plain<S: ReadySocket>(
    socket: &S,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    poll_send(socket, cx, buf.len(), || {
        rustix::net::send(socket, buf, SendFlags::NOSIGNAL)
    })
}

/// Runs `send` (a direct system call writing up to `len` bytes) when the socket is writable,
/// and waits for writability when it is not.
fn poll_send<S: ReadySocket>(
    socket: &S,
    cx: &mut Context<'_>,
    len: usize,
    mut send: impl FnMut() -> rustix::io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        let mut partial = 0;
        // `try_io` runs the write only when tokio has seen the socket writable, and clears
        // that readiness when the write reports `WouldBlock`.
        let result = socket.try_io(Interest::WRITABLE, || {
            let n = send()?;
            if n < len {
                // The socket is full: clear the readiness, as tokio's own `poll_write` does.
                partial = n;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match result {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(_) if partial > 0 => return Poll::Ready(Ok(partial)),
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Poll::Ready(Err(e)),
            Err(_) => ready!(socket.poll_write_ready(cx))?,
        }
    }
}

impl<S: ReadySocket + Unpin> AsyncRead for RawSocket<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Free when the caller reads into initialized memory, as the TLS layer does.
        let n = ready!(self.get_mut().poll_recv_into(cx, buf.initialize_unfilled()))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: ReadySocket + AsyncWrite + Unpin> AsyncWrite for RawSocket<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_write_plain(&self.socket, cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        let socket = &self.socket;
        poll_send(socket, cx, len, || rustix::io::writev(socket, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = buf.remaining();
        let put = |bytes: &[u8]| buf.put_slice(bytes);
        let read = match self.get_mut() {
            Stream::Tcp(raw) => return Pin::new(raw).poll_read(cx, buf),
            Stream::Unix(raw) => return Pin::new(raw).poll_read(cx, buf),
            // As `poll_read_into`, so that tokio-rustls's own read state is never half-used.
            Stream::TlsUpstream(s) => {
                let (io, conn) = s.get_mut();
                poll_read_tls(io, conn, cx, room, put)
            }
            Stream::TlsClient(s) => {
                let (io, conn) = s.get_mut();
                poll_read_tls(io, conn, cx, room, put)
            }
        };
        ready!(read)?;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(raw) => poll_write_plain(&raw.socket, cx, buf),
            Stream::Unix(raw) => poll_write_plain(&raw.socket, cx, buf),
            Stream::TlsUpstream(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(raw) => Pin::new(raw).poll_flush(cx),
            Stream::Unix(raw) => Pin::new(raw).poll_flush(cx),
            Stream::TlsUpstream(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(raw) => Pin::new(raw).poll_shutdown(cx),
            Stream::Unix(raw) => Pin::new(raw).poll_shutdown(cx),
            Stream::TlsUpstream(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A connected pair on loopback, for tests: the far end, and the near end as a `Stream`.
#[cfg(test)]
pub(crate) async fn loopback_pair() -> (TcpStream, Stream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let far = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (near, _) = listener.accept().await.unwrap();
    (far, Stream::plain(near))
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    #[tokio::test]
    async fn keepalive_is_set_the_way_redis_sets_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let socket = socket2::SockRef::from(&tcp);
        super::set_keepalive(&tcp, Duration::ZERO).unwrap();
        assert!(!socket.keepalive().unwrap(), "0 leaves it off");
        super::set_keepalive(&tcp, Duration::from_secs(60)).unwrap();
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(60)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(20)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
        // A short time still probes at least every second.
        super::set_keepalive(&tcp, Duration::from_secs(2)).unwrap();
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn keepalive_times_are_whole_seconds_linux_takes() {
        assert!(super::check_keepalive(Duration::ZERO).is_ok());
        assert!(super::check_keepalive(Duration::from_secs(1)).is_ok());
        assert!(super::check_keepalive(Duration::from_secs(32_767)).is_ok());
        assert!(super::check_keepalive(Duration::from_secs(32_768)).is_err());
        assert!(super::check_keepalive(Duration::from_millis(1500)).is_err());
    }

    use super::*;

    use super::loopback_pair as pair;

    /// Reads once into `buf`, in a task of its own; after the read's `pending`-th pending
    /// poll it tells `waiting`, and the test then sends what the read is waiting for.
    fn read_in_a_task(
        mut stream: Stream,
        pending: usize,
        waiting: Arc<Notify>,
        before: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<(Stream, BytesMut)> {
        tokio::spawn(async move {
            before.await;
            let mut buf = BytesMut::with_capacity(64);
            let mut pendings = 0;
            let n = poll_fn(|cx| {
                let read = stream.poll_read_into(cx, &mut buf);
                if read.is_pending() {
                    pendings += 1;
                    if pendings == pending {
                        waiting.notify_one();
                    }
                }
                read
            })
            .await
            .unwrap();
            assert!(n > 0);
            (stream, buf)
        })
    }

    /// Once the reader says it waits, sends `bytes` from `far`; returns what the reader read.
    async fn send_when_waiting(
        far: &mut TcpStream,
        waiting: &Notify,
        reader: tokio::task::JoinHandle<(Stream, BytesMut)>,
        bytes: &[u8],
    ) -> (Stream, BytesMut) {
        waiting.notified().await;
        far.write_all(bytes).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the reader was never woken")
            .unwrap()
    }

    fn plain_waiter(stream: &Stream) -> &ReadWaiter {
        match stream {
            Stream::Tcp(raw) => &raw.read_waiter,
            _ => unreachable!("a plain stream"),
        }
    }

    #[tokio::test]
    async fn a_task_is_woken_again_after_it_read_what_woke_it() {
        let (mut far, mut near) = pair().await;
        let waiting = Arc::new(Notify::new());
        let reader = tokio::spawn({
            let waiting = waiting.clone();
            async move {
                let mut buf = BytesMut::with_capacity(64);
                // Each round waits (registering), is woken by the bytes, and empties the
                // socket; the wake took the registration, so the next round must make another.
                for _ in 0..3 {
                    let mut notified = false;
                    poll_fn(|cx| {
                        let read = near.poll_read_into(cx, &mut buf);
                        if read.is_pending() && !notified {
                            notified = true;
                            waiting.notify_one();
                        }
                        read
                    })
                    .await
                    .unwrap();
                }
                buf
            }
        });
        let write_each_round = async {
            for _ in 0..3 {
                waiting.notified().await;
                far.write_all(b"+OK\r\n").await.unwrap();
            }
            reader.await.unwrap()
        };
        let buf = tokio::time::timeout(Duration::from_secs(10), write_each_round)
            .await
            .expect("the reader was never woken");
        assert_eq!(&buf[..], b"+OK\r\n+OK\r\n+OK\r\n");
    }

    #[tokio::test]
    async fn a_read_in_another_task_registers_that_task() {
        let (mut far, mut near) = pair().await;
        assert!(plain_waiter(&near).may_skip, "a current-thread runtime");
        // One task reads, finds nothing, registers, and is gone.
        near = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64);
            let first = poll_fn(|cx| Poll::Ready(near.poll_read_into(cx, &mut buf))).await;
            assert!(first.is_pending());
            assert!(plain_waiter(&near).registered.is_some());
            near
        })
        .await
        .unwrap();
        // Another task reads the same stream (as a session reads a connection the pool
        // checked): it must register itself, not rely on the first task's registration.
        let waiting = Arc::new(Notify::new());
        let reader = read_in_a_task(near, 1, waiting.clone(), async {});
        let (_, buf) = send_when_waiting(&mut far, &waiting, reader, b"+PONG\r\n").await;
        assert_eq!(&buf[..], b"+PONG\r\n");
    }

    #[tokio::test]
    async fn a_read_refused_for_the_task_budget_registers_on_the_next_poll() {
        let (mut far, near) = pair().await;
        // Spend the task's budget on a channel full of ready messages: tokio then refuses the
        // read's registration (and wakes the task to try again) instead of storing its waker.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..1000 {
            tx.send(()).unwrap();
        }
        let spend_budget = async move {
            while tokio::task::coop::has_budget_remaining() {
                rx.recv().await.unwrap();
            }
        };
        let waiting = Arc::new(Notify::new());
        // The first pending poll is the refused one; the second must have registered.
        let reader = read_in_a_task(near, 2, waiting.clone(), spend_budget);
        let (near, buf) = send_when_waiting(&mut far, &waiting, reader, b"+PONG\r\n").await;
        assert_eq!(&buf[..], b"+PONG\r\n");
        // Having read, the stream no longer claims a registration.
        assert_eq!(plain_waiter(&near).registered, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_on_a_multi_thread_runtime_always_register() {
        let (mut far, near) = pair().await;
        assert!(!plain_waiter(&near).may_skip);
        let waiting = Arc::new(Notify::new());
        let reader = read_in_a_task(near, 1, waiting.clone(), async {});
        let (near, _) = send_when_waiting(&mut far, &waiting, reader, b"+PONG\r\n").await;
        assert_eq!(plain_waiter(&near).registered, None);
    }
}
