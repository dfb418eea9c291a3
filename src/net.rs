//! One stream type for every connection the proxy holds: plain TCP or TLS, client side or
//! upstream side, so sessions and the pool are written once.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

pub enum Stream {
    Tcp {
        tcp: TcpStream,
        /// What this stream last left with tokio for its next readable event. See
        /// `poll_read_into`.
        registration: ReadRegistration,
    },
    /// TLS towards the upstream (we are the TLS client).
    TlsUpstream(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// TLS from an application (we are the TLS server).
    TlsClient(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    /// A plain TCP connection.
    pub fn plain(tcp: TcpStream) -> Self {
        Stream::Tcp {
            tcp,
            registration: ReadRegistration::default(),
        }
    }

    /// The TCP socket under any TLS layer. Whatever waits for it to become readable other than
    /// `poll_read_into` replaces that method's registration, and must say so (`looks_closed`).
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp { tcp, .. } => tcp,
            Stream::TlsUpstream(s) => s.get_ref().0,
            Stream::TlsClient(s) => s.get_ref().0,
        }
    }

    /// True when written bytes may wait in this layer until a flush (TLS records); a plain
    /// socket hands every write to the kernel, so the flush after it can be skipped.
    pub fn buffers_writes(&self) -> bool {
        !matches!(self, Stream::Tcp { .. })
    }

    /// True when the peer has closed the connection or sent something unexpected while it sat
    /// idle. Checked without blocking before an idle connection is handed out.
    pub fn looks_closed(&mut self) -> bool {
        // The peek below leaves its own (no-op) waker with tokio in place of any earlier one.
        if let Stream::Tcp { registration, .. } = self {
            registration.replaced();
        }
        let mut probe = [0u8; 1];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut buf = ReadBuf::new(&mut probe);
        // Ready means EOF, an error, or bytes nobody asked for (a TLS alert, a shutdown notice).
        self.tcp().poll_peek(&mut cx, &mut buf).is_ready()
    }

    /// Reads what has arrived into the spare capacity of `buf` (the caller makes room), as
    /// `tokio_util::io::poll_read_buf` would, and returns how many bytes came (0: end of stream).
    ///
    /// A plain TCP stream reads straight away when tokio has seen it readable (`try_io`), without
    /// the task-budget and registration steps of tokio's `poll_read`. When there is nothing to
    /// read it registers for the next event only if its previous registration is gone: a session
    /// polls both of its streams after every event, and re-registering a waker tokio still holds
    /// costs a task-budget check, a lock and a waker comparison each time (about 120 instructions
    /// per request at `-P 1`, 4% of the proxy's). See `ReadRegistration` for how it knows.
    pub fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Tcp { tcp, registration } => poll_read_plain(tcp, registration, cx, buf),
            tls => tokio_util::io::poll_read_buf(Pin::new(tls), cx, buf),
        }
    }
}

/// Whether tokio still holds a plain TCP stream's waker for its next readable event.
///
/// Tokio keeps one waker per socket for readability and *takes* it when an event arrives, then
/// wakes it. Knowing that the waker is still there takes more than remembering that one was
/// registered and no readiness has been seen since: an event whose data a poll already read
/// (the driver on another thread marks the socket readable, the poll reads, and only then does
/// the driver take the waker) takes a registration made *after* that read, with no readiness
/// left to show for it. (A record without the flag below lost wake-ups exactly so, on a
/// two-worker runtime: `a_multi_thread_runtime_serves_many_clients_without_a_stall` timed out
/// in 2 of 36 runs, six at a time; with the flag it passed 108 of 108.)
///
/// So the waker registered is our own, wrapping the task's: waking it marks it fired before it
/// wakes the task. A registration stands while it has not fired; tokio always wakes a waker it
/// takes, and the task it wakes polls again after the mark, so the next poll cannot miss it.
#[derive(Default)]
pub struct ReadRegistration {
    /// The waker last registered (kept for the next registration by the same task).
    waker: Option<(Waker, Arc<RegistrationWaker>)>,
    /// `waker` was left with tokio and nothing else has replaced it since.
    placed: bool,
}

struct RegistrationWaker {
    task: Waker,
    fired: AtomicBool,
}

impl Wake for RegistrationWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl ReadRegistration {
    /// Tokio still holds this task's waker for the next event, or is about to wake it.
    fn stands_for(&self, cx: &Context<'_>) -> bool {
        self.placed
            && self.waker.as_ref().is_some_and(|(_, own)| {
                !own.fired.load(Ordering::Acquire) && own.task.will_wake(cx.waker())
            })
    }

    /// The waker to register for `cx`'s task, reset to "not fired". A wake still on its way
    /// from an earlier registration may mark it fired again: that only costs one more
    /// registration.
    fn waker_for(&mut self, cx: &Context<'_>) -> &Waker {
        let reusable = self
            .waker
            .as_ref()
            .is_some_and(|(_, own)| own.task.will_wake(cx.waker()));
        if !reusable {
            let own = Arc::new(RegistrationWaker {
                task: cx.waker().clone(),
                fired: AtomicBool::new(false),
            });
            self.waker = Some((Waker::from(own.clone()), own));
        }
        let (waker, own) = self.waker.as_ref().expect("set above");
        own.fired.store(false, Ordering::Relaxed);
        waker
    }

    /// Something other than `poll_read_into` registered for readability on this socket.
    fn replaced(&mut self) {
        self.placed = false;
    }
}

/// `Stream::poll_read_into` for plain TCP.
fn poll_read_plain(
    tcp: &TcpStream,
    registration: &mut ReadRegistration,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    loop {
        let spare = buf.capacity() - buf.len();
        let mut attempted = false;
        let mut drained = 0;
        // `try_io` runs the read only when tokio has seen the socket readable, and clears that
        // readiness when the read reports `WouldBlock`.
        let result = tcp.try_io(Interest::READABLE, || {
            attempted = true;
            let n = tcp.try_read_buf(buf)?;
            if 0 < n && n < spare {
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
            // Without an attempt the error can only be tokio's "not readable".
            Err(e) if attempted && e.kind() != io::ErrorKind::WouldBlock => {
                return Poll::Ready(Err(e));
            }
            Err(_) => {}
        }
        if registration.stands_for(cx) {
            return Poll::Pending;
        }
        registration.placed = false;
        let mut own_cx = Context::from_waker(registration.waker_for(cx));
        match tcp.poll_read_ready(&mut own_cx) {
            // An event came in between the two looks.
            Poll::Ready(Ok(())) => continue,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                registration.placed = true;
                return Poll::Pending;
            }
        }
    }
}

/// `poll_write` for plain TCP: writes straight away when tokio has seen the socket writable
/// (the usual case), without the task-budget and registration steps of tokio's `poll_write`,
/// which is left to wait for writability when the socket is full.
fn poll_write_plain(
    tcp: &mut TcpStream,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    let mut attempted = false;
    let mut partial = 0;
    let result = tcp.try_io(Interest::WRITABLE, || {
        attempted = true;
        let n = tcp.try_write(buf)?;
        if n < buf.len() {
            // The socket is full: clear the readiness, as tokio's own `poll_write` does.
            partial = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match result {
        Ok(n) => Poll::Ready(Ok(n)),
        Err(_) if partial > 0 => Poll::Ready(Ok(partial)),
        // Without an attempt the error can only be tokio's "not writable".
        Err(e) if attempted && e.kind() != io::ErrorKind::WouldBlock => Poll::Ready(Err(e)),
        // Not writable now: tokio's `poll_write` waits for it.
        Err(_) => Pin::new(tcp).poll_write(cx, buf),
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp { tcp, registration } => {
                // Tokio's own read registers its own waker when it finds nothing.
                registration.replaced();
                Pin::new(tcp).poll_read(cx, buf)
            }
            Stream::TlsUpstream(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp { tcp, .. } => poll_write_plain(tcp, cx, buf),
            Stream::TlsUpstream(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp { tcp, .. } => Pin::new(tcp).poll_flush(cx),
            Stream::TlsUpstream(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp { tcp, .. } => Pin::new(tcp).poll_shutdown(cx),
            Stream::TlsUpstream(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::TlsClient(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
