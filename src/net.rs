//! One stream type for every connection the proxy holds: plain TCP or TLS, client side or
//! upstream side, so sessions and the pool are written once.
//!
//! Reads and writes go straight to the kernel (rustix's raw system calls), not through glibc's
//! `recv`, `send` and `writev`. Once a process has had a second thread, however briefly (tokio
//! resolves a host name on a blocking thread; the file watcher has one), glibc wraps each of
//! those calls in thread-cancellation bookkeeping, for good. Side by side with a TLS upstream
//! (where the watcher's thread exists), that bookkeeping cost 1.5-2.4% of the proxy's CPU per
//! request; the floor forwarder it is compared with never has a second thread.

use std::io;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use rustix::net::{RecvFlags, SendFlags};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

pub enum Stream {
    Tcp(TcpStream),
    /// TLS towards the upstream (we are the TLS client).
    TlsUpstream(Box<tokio_rustls::client::TlsStream<RawTcp>>),
    /// TLS from an application (we are the TLS server).
    TlsClient(Box<tokio_rustls::server::TlsStream<RawTcp>>),
}

/// The TCP connection under a TLS layer, read and written with direct system calls (see the
/// module's note).
pub struct RawTcp(TcpStream);

impl RawTcp {
    pub fn new(tcp: TcpStream) -> Self {
        RawTcp(tcp)
    }
}

impl Stream {
    /// A plain TCP connection.
    pub fn plain(tcp: TcpStream) -> Self {
        Stream::Tcp(tcp)
    }

    /// The TCP socket under any TLS layer.
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(tcp) => tcp,
            Stream::TlsUpstream(s) => &s.get_ref().0.0,
            Stream::TlsClient(s) => &s.get_ref().0.0,
        }
    }

    /// True when written bytes may wait in this layer until a flush (TLS records); a plain
    /// socket hands every write to the kernel, so the flush after it can be skipped.
    pub fn buffers_writes(&self) -> bool {
        !matches!(self, Stream::Tcp(_))
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
        socket2::SockRef::from(self.tcp()).peek(&mut probe)
    }

    /// Reads what has arrived into the spare capacity of `buf` (the caller makes room; a full
    /// buffer gets a little), and returns how many bytes came (0: end of stream). A TLS stream
    /// hands over what it decrypts (`poll_read_tls`).
    ///
    /// A plain TCP stream reads straight away when tokio has seen it readable (`try_io`), without
    /// the task-budget and registration steps of tokio's `poll_read`, and registers for the next
    /// event only when there is nothing to read. (Skipping that registration while the previous
    /// one still stands was tried twice: judged by readiness alone it lost wake-ups on a
    /// multi-thread runtime; judged by a waker of our own that marks itself fired it was correct,
    /// but the extra waker cost more CPU per request than the skipped registrations saved. See
    /// the note in `a_multi_thread_runtime_serves_many_clients_without_a_stall`.)
    pub fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        if buf.capacity() == buf.len() {
            buf.reserve(64);
        }
        match self {
            Stream::Tcp(tcp) => poll_read_plain(tcp, cx, buf),
            Stream::TlsUpstream(s) => {
                let (io, conn) = s.get_mut();
                poll_read_tls(&io.0, conn, cx, buf.capacity() - buf.len(), |bytes| {
                    buf.extend_from_slice(bytes)
                })
            }
            Stream::TlsClient(s) => {
                let (io, conn) = s.get_mut();
                poll_read_tls(&io.0, conn, cx, buf.capacity() - buf.len(), |bytes| {
                    buf.extend_from_slice(bytes)
                })
            }
        }
    }
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
    tcp: &TcpStream,
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
        ready!(poll_recv(tcp, cx, || {
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

/// `Stream::poll_read_into` for plain TCP.
fn poll_read_plain(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let room = buf.capacity() - buf.len();
    poll_recv(tcp, cx, || {
        let n = recv_into(tcp, buf)?;
        Ok((n, 0 < n && n < room))
    })
}

/// Runs `recv` (a direct system call; it returns how many bytes came, and whether it emptied
/// the socket) when tokio has seen the socket readable, and waits for readability when there
/// is nothing to read.
fn poll_recv(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    mut recv: impl FnMut() -> io::Result<(usize, bool)>,
) -> Poll<io::Result<usize>> {
    loop {
        let mut drained = 0;
        // `try_io` runs the read only when tokio has seen the socket readable, and clears that
        // readiness when the read reports `WouldBlock`.
        let result = tcp.try_io(Interest::READABLE, || {
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
            // Not readable, or nothing left: wait (an event may have come in between).
            Err(_) => ready!(tcp.poll_read_ready(cx))?,
        }
    }
}

/// `recv(2)` into the spare capacity of `buf`, made directly (see the module's note).
fn recv_into(tcp: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let ((filled, _), _) = rustix::net::recv(tcp, buf.spare_capacity_mut(), RecvFlags::empty())?;
    let n = filled.len();
    // SAFETY: the kernel wrote the first `n` bytes of the spare capacity (`filled` is them).
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// `poll_write` for plain TCP: writes straight away when tokio has seen the socket writable
/// (the usual case), without the task-budget and registration steps of tokio's `poll_write`,
/// and waits for writability only when the socket is full.
fn poll_write_plain(tcp: &TcpStream, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    poll_send(tcp, cx, buf.len(), || {
        rustix::net::send(tcp, buf, SendFlags::NOSIGNAL)
    })
}

/// Runs `send` (a direct system call writing up to `len` bytes) when the socket is writable,
/// and waits for writability when it is not.
fn poll_send(
    tcp: &TcpStream,
    cx: &mut Context<'_>,
    len: usize,
    mut send: impl FnMut() -> rustix::io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        let mut partial = 0;
        // `try_io` runs the write only when tokio has seen the socket writable, and clears
        // that readiness when the write reports `WouldBlock`.
        let result = tcp.try_io(Interest::WRITABLE, || {
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
            Err(_) => ready!(tcp.poll_write_ready(cx))?,
        }
    }
}

impl AsyncRead for RawTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let tcp = &self.0;
        // Free when the caller reads into initialized memory, as the TLS layer does.
        let dst = buf.initialize_unfilled();
        let room = dst.len();
        let n = ready!(poll_recv(tcp, cx, || {
            let n = rustix::net::recv(tcp, &mut *dst, RecvFlags::empty())?.0;
            Ok((n, 0 < n && n < room))
        }))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for RawTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_write_plain(&self.0, cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        let tcp = &self.0;
        poll_send(tcp, cx, len, || rustix::io::writev(tcp, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
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
            Stream::Tcp(tcp) => return Pin::new(tcp).poll_read(cx, buf),
            // As `poll_read_into`, so that tokio-rustls's own read state is never half-used.
            Stream::TlsUpstream(s) => {
                let (io, conn) = s.get_mut();
                poll_read_tls(&io.0, conn, cx, room, put)
            }
            Stream::TlsClient(s) => {
                let (io, conn) = s.get_mut();
                poll_read_tls(&io.0, conn, cx, room, put)
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
            Stream::Tcp(tcp) => poll_write_plain(tcp, cx, buf),
            Stream::TlsUpstream(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::TlsUpstream(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::TlsUpstream(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
