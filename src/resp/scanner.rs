//! Resumable RESP frame-boundary scanner.
//!
//! The scanner finds where RESP frames end in a byte stream without building any values, so the proxy
//! can forward bytes exactly as they arrived. It is:
//!
//! - **resumable**: [`Scanner::scan`] may be called with whatever bytes have arrived so far. Bulk payload
//!   bytes are consumed as they come (a huge value streams through in chunks); a partial *line* (a
//!   header, a simple string, an inline command) is left unconsumed, and the scanner remembers how far it
//!   already searched it, so the bytes are not searched again when they are presented once more;
//! - **iterative**: nesting is an explicit stack of remaining element counts, never recursion;
//! - **bounded**: nesting depth, bulk length, element count and line length are capped ([`ScanLimits`]).
//!
//! Cost is linear in the input: bulk payloads are skipped by arithmetic (only their CRLF trailer is
//! looked at), lines are found with `memchr`, and a re-presented partial line is searched only from where
//! the previous search stopped. Only a length/count header (at most a couple of dozen bytes when valid)
//! is read twice: once to find its end and once to parse its digits.

use memchr::memchr;

use super::reply;

/// Which side of the proxy a scanner reads: what a client may send is narrower than what a server may answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server: multibulk commands of bulk strings, or inline commands.
    Request,
    /// Server to client: every RESP2 and RESP3 type.
    Reply,
}

/// Caps on what a scanner accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanLimits {
    /// Deepest nesting of aggregates accepted (replies; requests are flat).
    pub max_depth: usize,
    /// Largest bulk string / verbatim / bulk error / streamed-string chunk length accepted.
    pub max_bulk_len: u64,
    /// Largest element count of one aggregate (for requests: the argument count).
    pub max_elements: u64,
    /// Longest line accepted: a header, a simple string/error/number line, or a whole inline command.
    pub max_line_len: usize,
}

impl ScanLimits {
    /// Redis's own limits for client input: 512 MiB bulk, argument count up to i32::MAX, inline 64 KiB, depth 1 (flat).
    pub fn request_defaults() -> Self {
        Self {
            max_depth: 1,
            max_bulk_len: 512 * 1024 * 1024,
            max_elements: i32::MAX as u64,
            max_line_len: 64 * 1024,
        }
    }

    /// Replies: any size streams through: bulk u64::MAX as far as the cap goes, elements u64::MAX, depth 1024, line 64 MiB.
    pub fn reply_defaults() -> Self {
        Self {
            max_depth: 1024,
            max_bulk_len: u64::MAX,
            max_elements: u64::MAX,
            max_line_len: 64 * 1024 * 1024,
        }
    }
}

/// What one call to [`Scanner::scan`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of `buf` that belong to the current frame and are now fully accounted for: the caller may
    /// forward or drop them and must NOT present them again.
    pub consumed: usize,
    /// True when a whole top-level frame ended exactly at `consumed`.
    pub complete: bool,
}

/// A protocol violation. Final for the stream.
///
/// The `Display` texts are meant to follow `ERR Protocol error: ` in a reply to a client, worded like
/// Redis words them. They never contain payload bytes beyond the one offending type byte (shown escaped
/// when it is not printable ASCII).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// A `*` count that does not parse, is out of range, or exceeds `max_elements`.
    #[error("invalid multibulk length")]
    InvalidMultibulkLength,
    /// A `$`/`!`/`=`/`;` length that does not parse, is negative (other than a null), or exceeds `max_bulk_len`.
    #[error("invalid bulk length")]
    InvalidBulkLength,
    /// A request argument longer than Redis takes from a client that has not authenticated.
    #[error("unauthenticated bulk length")]
    UnauthenticatedBulkLength,
    /// A request argument that does not start with `$`.
    #[error("expected '$', got '{}'", ShownByte(*.0))]
    ExpectedBulk(u8),
    /// An inline request longer than `max_line_len`.
    #[error("too big inline request")]
    TooBigInlineRequest,
    /// A request's `*` header line longer than `max_line_len`.
    #[error("too big mbulk count string")]
    TooBigMultibulkCount,
    /// A request's `$` header line longer than `max_line_len`.
    #[error("too big bulk count string")]
    TooBigBulkCount,
    /// A reply line longer than `max_line_len`.
    #[error("too big reply line (more than {0} bytes)")]
    LineTooLong(usize),
    /// The two bytes after a bulk payload are not `\r\n`.
    #[error("expected CRLF after bulk data")]
    ExpectedCrlfAfterBulk,
    /// A reply line that does not end with `\r\n` (or an end-of-stream line with content).
    #[error("expected CRLF at end of line")]
    ExpectedCrlf,
    /// A reply value starting with a byte that is no RESP type.
    #[error("invalid RESP type byte 0x{0:02x}")]
    InvalidTypeByte(u8),
    /// Aggregates nested deeper than `max_depth`.
    #[error("nesting deeper than {0}")]
    TooDeep(usize),
    /// A `.` end-of-stream marker where no streamed aggregate element may end the stream.
    #[error("unbalanced end-of-stream marker '.'")]
    UnexpectedEndOfStream,
    /// A streamed map or attribute ended after a key without its value.
    #[error("unbalanced streamed map: key without value")]
    UnbalancedStreamedMap,
    /// Inside a streamed string, a chunk that does not start with `;`.
    #[error("expected ';', got '{}'", ShownByte(*.0))]
    ExpectedChunk(u8),
    /// A `;` chunk outside a streamed string.
    #[error("unbalanced streamed string chunk ';'")]
    UnexpectedChunk,
}

/// Shows one byte in an error text: printable ASCII as itself, anything else as `\xNN`.
struct ShownByte(u8);

impl std::fmt::Display for ShownByte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if (0x20..0x7f).contains(&self.0) {
            write!(f, "{}", self.0 as char)
        } else {
            write!(f, "\\x{:02x}", self.0)
        }
    }
}

/// Where the scanner is inside the current frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting the first byte of a line: a frame, an element, an argument.
    Line,
    /// Inside a streamed string (`$?`): expecting a `;<len>` chunk header.
    ChunkLine,
    /// Skipping `rem` more bytes of a bulk payload, its CRLF trailer included.
    Payload { rem: u64 },
    /// Same for a streamed-string chunk; afterwards the next chunk header is expected.
    ChunkPayload { rem: u64 },
}

/// One open container of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Level {
    /// Counted kinds: elements still to come. Streamed maps/attributes: parity of elements seen so far.
    left: u64,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `*n`, `%n` (2n elements), `~n`, `>n`.
    Counted,
    /// `|n`: 2n elements, then the attributed value follows.
    Attr,
    /// `*?`, `%?`, `~?`, `>?`, `|?`: elements until `.`.
    Streamed { pairs: bool, attr: bool },
    /// An attribute ended: exactly one value follows, and belongs to the enclosing level. Not counted as
    /// depth; never stacked directly on another `AttrValue` (consecutive attributes share one value).
    AttrValue,
    /// `>n` inside another aggregate that is a message (`message`, `pmessage`, `smessage`,
    /// `invalidate`): written into the middle of a reply, and not one of its elements. Redis 7.0
    /// does this when a transaction publishes to a channel its own RESP3 connection subscribes
    /// to: `*3 :4 $4 v373 >3 message ... :1` is EXEC's array of three with the message between
    /// its second and third elements. Counted like `Counted`, but its end does not count as a
    /// value of the enclosing level. (A subscribe confirmation inside EXEC's array is that
    /// command's reply, and does count.)
    OutOfBand,
}

/// A parsed length/count header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Header {
    Len(i64),
    /// `?`: a streamed string or aggregate.
    Streamed,
}

/// A complete line that is not acceptable, or an incomplete one that already is too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineError {
    Invalid,
    TooLong,
}

/// Result of searching for the end of a line.
enum Line {
    /// Index of the terminating `\n`.
    Done(usize),
    /// No `\n` yet; the line is still within the cap.
    Partial,
    /// More than `max_line_len` bytes without `\n`.
    TooLong,
}

/// Finds RESP frame boundaries in a byte stream. See the module documentation.
#[derive(Debug, Clone)]
pub struct Scanner {
    direction: Direction,
    limits: ScanLimits,
    state: State,
    /// Requests: bulk arguments still expected in the current multibulk (0 between frames).
    args_left: u64,
    /// Replies: open containers, innermost last. Reused from frame to frame.
    stack: Vec<Level>,
    /// Replies: levels of `stack` that count as nesting (all but `AttrValue`).
    depth: usize,
    /// Bytes at the start of the next buffer (a partial line) already searched for `\n` in vain.
    carry: usize,
    /// Bytes accounted for: consumed plus newly searched bytes of partial lines.
    scanned: u64,
    /// Bytes actually looked at, re-examined header digits included (tests prove linearity with it).
    #[cfg(test)]
    examined: u64,
    error: Option<ScanError>,
    /// Every header of one or two digits is within the limits (true for any sensible limits),
    /// so the fast lanes may take such headers without checking them against the limits.
    small_headers_fit: bool,
    /// Requests come from a client that has not authenticated (see `set_unauthenticated`).
    unauthenticated: bool,
}

/// Bytes after a nested push's header read to learn its kind: a bulk header and the longest
/// kind `reply::push_is_message` looks at.
const LONGEST_KIND_LOOK: usize = 5 + reply::MAX_KIND_LEN + 2;

/// The longest request argument Redis reads from a client that has not authenticated (a
/// guard against unauthenticated clients making it buffer much).
const UNAUTHENTICATED_MAX_BULK: i64 = 16 * 1024;

/// Length of the longest header fast-path digit run: any 18-digit number fits an i64.
const FAST_DIGITS: usize = 18;

impl Scanner {
    /// A scanner for one direction of one connection, positioned at the start of a frame.
    pub fn new(direction: Direction, limits: ScanLimits) -> Self {
        let small_headers_fit =
            limits.max_line_len >= 4 && limits.max_elements >= 99 && limits.max_bulk_len >= 99;
        Self {
            direction,
            limits,
            small_headers_fit,
            state: State::Line,
            args_left: 0,
            stack: Vec::new(),
            depth: 0,
            carry: 0,
            scanned: 0,
            #[cfg(test)]
            examined: 0,
            error: None,
            unauthenticated: false,
        }
    }

    /// Holds requests to Redis's limit for clients that have not authenticated: an argument
    /// over 16 KiB is a protocol error (`unauthenticated bulk length`).
    pub fn set_unauthenticated(&mut self, unauthenticated: bool) {
        self.unauthenticated = unauthenticated;
    }

    /// Scans `buf`, which starts at the first byte not yet consumed. Stops right after a top-level frame
    /// ends (complete = true), so the caller can act on each frame. When the frame is not complete yet,
    /// consumes as much as it can: bulk payload bytes are consumed even though the bulk is unfinished (so a
    /// 200 MB value streams through in chunks); a partial line (header, simple string, inline command) is
    /// NOT consumed: the caller keeps those bytes and presents them again, with more appended, at the start
    /// of the next call. The scanner remembers how far it already searched that partial line, so the
    /// bytes are not searched again (linear cost). An error is final for the stream.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Progress, ScanError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let seen_before = self.carry.min(buf.len());
        let result = match self.direction {
            Direction::Request => self.scan_request(buf),
            Direction::Reply => self.scan_reply(buf),
        };
        match result {
            Ok(p) => {
                debug_assert!(p.consumed + self.carry <= buf.len());
                self.scanned += (p.consumed + self.carry).saturating_sub(seen_before) as u64;
                Ok(p)
            }
            Err(e) => {
                self.carry = 0;
                self.error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// True between frames (nothing of the next frame consumed yet).
    pub fn at_frame_start(&self) -> bool {
        self.state == State::Line && self.args_left == 0 && self.stack.is_empty()
    }

    /// Total bytes this scanner has examined (a re-presented partial line counts only its new bytes).
    /// Tests use it to prove the cost is linear in the input.
    pub fn bytes_scanned(&self) -> u64 {
        self.scanned
    }

    // ---- fast lanes -------------------------------------------------------------------------
    //
    // Most traffic is small commands and small scalar replies, whole in one read. For those, the
    // session asks the fast lanes below, which look at whole frames only and never change the
    // scanner's state, then records what it took with `skip_frames`. They accept a subset of what
    // `scan` accepts, with the same frame ends (property tests below check both); anything else —
    // partial, unusual, malformed, over a limit — is left to `scan`, which gives the exact answer.
    // A caller tries a fast lane once per frame start, so a failed try costs at most one look at
    // what is buffered.

    /// Fast lane for requests, between frames: the run of whole, well-formed multibulk requests
    /// within the limits at the start of `buf` that `take` accepts (it is shown each command's
    /// name), as (bytes, requests). Stops before the first request `take` refuses, and before
    /// anything else: an inline or empty command, a partial or malformed request.
    #[inline]
    pub fn peek_request_run(&self, buf: &[u8], take: impl FnMut(&[u8]) -> bool) -> (usize, u64) {
        if !self.fast_lane_open() {
            return (0, 0);
        }
        // Settled once per run rather than at every header.
        if self.small_headers_fit {
            self.request_run::<true>(buf, take)
        } else {
            self.request_run::<false>(buf, take)
        }
    }

    /// `peek_request_run`, with `small_headers_fit` known.
    #[inline(always)]
    fn request_run<const SMALL_FIT: bool>(
        &self,
        buf: &[u8],
        mut take: impl FnMut(&[u8]) -> bool,
    ) -> (usize, u64) {
        let mut taken = 0;
        let mut count = 0;
        loop {
            // The usual shape in a few loads; what it cannot read, header by header.
            let small = if SMALL_FIT {
                small_request(buf, taken)
            } else {
                SmallRequest::Other
            };
            let found = match small {
                SmallRequest::Whole(name, end) => Some((name, end)),
                SmallRequest::Started { name, end, left } => buf
                    .get(name)
                    .zip(self.lane_request_rest::<SMALL_FIT>(buf, end, left)),
                SmallRequest::Other => self.lane_request::<SMALL_FIT>(buf, taken),
            };
            let Some((name, end)) = found else {
                break;
            };
            if !take(name) {
                break;
            }
            taken = end;
            count += 1;
        }
        (taken, count)
    }

    /// The whole multibulk request at `buf[start..]`: its command name (the first argument) and
    /// where the request ends, read header by header (`lane_header`). For the shapes
    /// `small_request` does not start. Out of line, so the loop around `small_request` keeps
    /// its values in registers. (`lane_request_rest` stays inline: a request with a long
    /// argument, which `small_request` starts, then costs what it did before that lane.)
    #[inline(never)]
    fn lane_request<'a, const SMALL_FIT: bool>(
        &self,
        buf: &'a [u8],
        start: usize,
    ) -> Option<(&'a [u8], usize)> {
        let (argc, rest) = self.lane_header::<SMALL_FIT>(buf.get(start..)?, b'*')?;
        if argc == 0 {
            return None;
        }
        let (len, rest) = self.lane_header::<SMALL_FIT>(rest, b'$')?;
        let first_at = buf.len() - rest.len();
        let end = first_at.checked_add(usize::try_from(len).ok()?)?;
        let name = buf.get(first_at..end)?;
        Some((
            name,
            self.lane_request_rest::<SMALL_FIT>(buf, end, argc - 1)?,
        ))
    }

    /// The end of a request whose payload ending at `end` (where its CRLF should be) is
    /// followed by `left` more arguments, read header by header.
    #[inline(always)]
    fn lane_request_rest<const SMALL_FIT: bool>(
        &self,
        buf: &[u8],
        mut end: usize,
        left: u64,
    ) -> Option<usize> {
        for _ in 0..left {
            let after = buf.get(end..)?.strip_prefix(b"\r\n")?;
            let (len, rest) = self.lane_header::<SMALL_FIT>(after, b'$')?;
            end = (buf.len() - rest.len()).checked_add(usize::try_from(len).ok()?)?;
        }
        // The last payload's CRLF; every earlier one was checked above.
        (buf.get(end..)?.first_chunk::<2>()? == b"\r\n").then_some(end + 2)
    }

    /// Fast lane for replies, between frames: the whole scalar replies (simple strings, errors,
    /// integers, nulls, booleans, doubles, big numbers, bulk strings and errors, verbatim strings)
    /// at the start of `buf`, at most `max` of them, as (bytes, replies). Stops before anything
    /// else: aggregates, pushes, attributes, streamed strings, a partial or malformed frame.
    #[inline]
    pub fn peek_scalar_replies(&self, buf: &[u8], max: u64) -> (usize, u64) {
        if !self.fast_lane_open() {
            return (0, 0);
        }
        if self.small_headers_fit {
            self.scalar_run::<true>(buf, max)
        } else {
            self.scalar_run::<false>(buf, max)
        }
    }

    /// `peek_scalar_replies`, with `small_headers_fit` known.
    #[inline(always)]
    fn scalar_run<const SMALL_FIT: bool>(&self, buf: &[u8], max: u64) -> (usize, u64) {
        let max_line = self.limits.max_line_len;
        let mut pos = 0;
        let mut count = 0;
        // The last short line taken (its bytes, a mask over them, their count): the same bytes
        // again are the same reply, as in a run of `+OK` answering pipelined SETs.
        let (mut last, mut last_mask, mut last_len) = (0u64, 0u64, 0usize);
        // A bulk string's header, `$3\r\n` or `$16\r\n` (digits come out of the XOR as values).
        const BULK_1: u64 = u64::from_le_bytes(*b"$0\r\n\0\0\0\0");
        const BULK_2: u64 = u64::from_le_bytes(*b"$00\r\n\0\0\0");
        while count < max && pos < buf.len() {
            if let Some(w) = word_at(buf, pos) {
                if last_len != 0 && (w ^ last) & last_mask == 0 {
                    pos += last_len;
                    count += 1;
                    continue;
                }
                if SMALL_FIT {
                    // A digit byte (a value after the XOR) of at most 9 stays under 0x80 when
                    // 0x76 is added; so the digits and the bytes around them go in one test.
                    let x1 = (w ^ BULK_1) & 0xFFFF_FFFF;
                    let x2 = (w ^ BULK_2) & 0xFF_FFFF_FFFF;
                    let payload_end = if (x1 | (x1 + 0x7600)) & 0xFFFF_80FF == 0 {
                        Some(pos + 4 + usize::from((x1 >> 8) as u8))
                    } else if (x2 | (x2 + 0x76_7600)) & 0xFF_FF80_80FF == 0 {
                        let (d0, d1) = ((x2 >> 8) as u8, (x2 >> 16) as u8);
                        Some(pos + 5 + usize::from(d0 * 10 + d1))
                    } else {
                        None
                    };
                    if let Some(end) = payload_end {
                        // (`end` is at most `pos + 104`: no overflow.)
                        if buf.get(end..end + 2) != Some(b"\r\n") {
                            break;
                        }
                        pos = end + 2;
                        count += 1;
                        continue;
                    }
                }
            }
            let ty = buf[pos];
            match ty {
                b'$' | b'!' | b'=' => match self.lane_header::<SMALL_FIT>(&buf[pos..], ty) {
                    Some((n, after)) => match bulk_payload(after, n) {
                        Some((_, rest)) => pos = buf.len() - rest.len(),
                        None => break,
                    },
                    None if ty == b'$' && max_line >= 4 && buf[pos..].starts_with(b"$-1\r\n") => {
                        pos += 5
                    }
                    None => break,
                },
                b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => {
                    // Most such replies (`+OK`, `:1`, `_`) end within eight bytes: one load.
                    if let Some((end, line)) = short_line_end(&buf[pos..], max_line) {
                        pos += end;
                        count += 1;
                        (last, last_mask, last_len) = (line, u64::MAX >> (64 - 8 * end), end);
                        continue;
                    }
                    let limit = buf.len().min(pos + max_line + 1);
                    match find_lf(buf, pos + 1, limit) {
                        Some(nl) if buf[nl - 1] == b'\r' => pos = nl + 1,
                        _ => break,
                    }
                }
                _ => break,
            }
            count += 1;
        }
        (pos, count)
    }

    /// A non-negative length header of type `ty` at the front of `buf`, within the limits: its
    /// value and what follows its CRLF. None for anything else.
    #[inline(always)]
    fn lane_header<'a, const SMALL_FIT: bool>(
        &self,
        buf: &'a [u8],
        ty: u8,
    ) -> Option<(u64, &'a [u8])> {
        // Most headers are `*2`, `$3`, `$16`: one four-byte load settles them (when every
        // one- or two-digit value is within the limits: `small_headers_fit`).
        if SMALL_FIT && let Some((&word, after)) = buf.split_first_chunk::<4>() {
            let word = u32::from_le_bytes(word);
            let d0 = ((word >> 8) as u8).wrapping_sub(b'0');
            if d0 <= 9 {
                if word & 0xFFFF_00FF == u32::from_le_bytes([ty, 0, b'\r', b'\n']) {
                    return Some((u64::from(d0), after));
                }
                let d1 = ((word >> 16) as u8).wrapping_sub(b'0');
                if d1 <= 9
                    && word & 0xFF00_00FF == u32::from_le_bytes([ty, 0, 0, b'\r'])
                    && let Some((b'\n', after)) = after.split_first()
                {
                    return Some((u64::from(d0) * 10 + u64::from(d1), after));
                }
            }
        }
        if buf.first() != Some(&ty) {
            return None;
        }
        let (n, next) = fast_len(buf, 0, self.limits.max_line_len).ok()?;
        let limit = if ty == b'*' {
            self.limits.max_elements
        } else {
            self.limits.max_bulk_len
        };
        (n <= limit).then(|| (n, &buf[next..]))
    }

    /// Records `n` bytes of whole frames, found by a fast lane, as scanned and consumed.
    #[inline]
    pub fn skip_frames(&mut self, n: usize) {
        debug_assert!(self.fast_lane_open());
        self.scanned += n as u64;
        self.note_examined(n);
    }

    /// Fast lanes start only between frames, with no partial line remembered, and not for an
    /// unauthenticated client (they do not apply its tighter limit).
    #[inline(always)]
    fn fast_lane_open(&self) -> bool {
        self.carry == 0 && self.error.is_none() && self.at_frame_start() && !self.unauthenticated
    }

    #[inline(always)]
    fn note_examined(&mut self, _n: usize) {
        #[cfg(test)]
        {
            self.examined += _n as u64;
        }
    }

    /// Searches for the `\n` ending the line that starts at `start`, skipping the `carry` bytes already
    /// searched by an earlier call, and looking no further than the line cap allows.
    #[inline]
    fn find_line(&mut self, buf: &[u8], start: usize, carry: usize) -> Line {
        let max = self.limits.max_line_len;
        let limit = start.saturating_add(max).saturating_add(1).min(buf.len());
        let from = start.saturating_add(carry).min(limit);
        match memchr(b'\n', &buf[from..limit]) {
            Some(i) => {
                self.note_examined(i + 1);
                Line::Done(from + i)
            }
            None => {
                self.note_examined(limit - from);
                if limit - start > max {
                    Line::TooLong
                } else {
                    Line::Partial
                }
            }
        }
    }

    /// Reads the length/count header line starting at `start` (its type byte). `Ok(Some)` gives the header
    /// and the index after its `\n`; `Ok(None)` means the line is incomplete (and `self.carry` is set).
    #[inline(always)]
    fn header(
        &mut self,
        buf: &[u8],
        start: usize,
        carry: usize,
    ) -> Result<Option<(Header, usize)>, LineError> {
        if carry == 0 {
            match fast_len(buf, start, self.limits.max_line_len) {
                Ok((v, next)) => {
                    self.note_examined(next - start - 1);
                    return Ok(Some((Header::Len(v as i64), next)));
                }
                Err(looked) => self.note_examined(looked),
            }
        }
        match self.find_line(buf, start, carry) {
            Line::Done(nl) => {
                let content = &buf[start + 1..nl];
                // `parse_i64` gives up on more than 20 characters without reading them.
                self.note_examined(content.len().min(21));
                match content {
                    [b'?', b'\r'] => Ok(Some((Header::Streamed, nl + 1))),
                    [digits @ .., b'\r'] => match parse_i64(digits) {
                        Some(v) => Ok(Some((Header::Len(v), nl + 1))),
                        None => Err(LineError::Invalid),
                    },
                    _ => Err(LineError::Invalid),
                }
            }
            Line::Partial => {
                self.carry = buf.len() - start;
                Ok(None)
            }
            Line::TooLong => Err(LineError::TooLong),
        }
    }

    fn scan_request(&mut self, buf: &[u8]) -> Result<Progress, ScanError> {
        let len = buf.len();
        let max_bulk = self.limits.max_bulk_len;
        let mut carry = std::mem::take(&mut self.carry);
        let mut pos = 0usize;
        let mut args = self.args_left;

        if let State::Payload { rem } = self.state {
            let avail = (len - pos) as u64;
            if avail < rem {
                if !trailer_ok(buf, pos, rem, len - pos) {
                    return Err(ScanError::ExpectedCrlfAfterBulk);
                }
                self.state = State::Payload { rem: rem - avail };
                return Ok(partial(len));
            }
            let end = pos + rem as usize;
            if !trailer_ok(buf, pos, rem, rem as usize) {
                return Err(ScanError::ExpectedCrlfAfterBulk);
            }
            self.note_examined(rem.min(2) as usize);
            pos = end;
            args -= 1;
            self.state = State::Line;
            if args == 0 {
                self.args_left = 0;
                return Ok(complete(pos));
            }
        }

        loop {
            if pos == len {
                self.args_left = args;
                return Ok(partial(pos));
            }
            let b = buf[pos];
            self.note_examined(1);
            if args == 0 {
                if b != b'*' {
                    // Inline command: the line up to and including '\n'.
                    return match self.find_line(buf, pos, carry) {
                        Line::Done(nl) => Ok(complete(nl + 1)),
                        Line::Partial => {
                            self.carry = len - pos;
                            Ok(partial(pos))
                        }
                        Line::TooLong => Err(ScanError::TooBigInlineRequest),
                    };
                }
                let (n, next) = match self.header(buf, pos, carry) {
                    Ok(Some((Header::Len(n), next))) => (n, next),
                    Ok(Some((Header::Streamed, _))) | Err(LineError::Invalid) => {
                        return Err(ScanError::InvalidMultibulkLength);
                    }
                    Err(LineError::TooLong) => return Err(ScanError::TooBigMultibulkCount),
                    Ok(None) => return Ok(partial(pos)),
                };
                carry = 0;
                pos = next;
                if n <= 0 {
                    // Redis ignores an empty multibulk: a frame of its own.
                    return Ok(complete(pos));
                }
                if n as u64 > self.limits.max_elements {
                    return Err(ScanError::InvalidMultibulkLength);
                }
                args = n as u64;
            } else {
                if b != b'$' {
                    return Err(ScanError::ExpectedBulk(b));
                }
                let (n, next) = match self.header(buf, pos, carry) {
                    Ok(Some((Header::Len(n), next))) => (n, next),
                    Ok(Some((Header::Streamed, _))) | Err(LineError::Invalid) => {
                        return Err(ScanError::InvalidBulkLength);
                    }
                    Err(LineError::TooLong) => return Err(ScanError::TooBigBulkCount),
                    Ok(None) => {
                        self.args_left = args;
                        return Ok(partial(pos));
                    }
                };
                carry = 0;
                if n < 0 || n as u64 > max_bulk {
                    return Err(ScanError::InvalidBulkLength);
                }
                if self.unauthenticated && n > UNAUTHENTICATED_MAX_BULK {
                    return Err(ScanError::UnauthenticatedBulkLength);
                }
                pos = next;
                let rem = n as u64 + 2;
                let avail = (len - pos) as u64;
                if avail < rem {
                    if !trailer_ok(buf, pos, rem, len - pos) {
                        return Err(ScanError::ExpectedCrlfAfterBulk);
                    }
                    self.state = State::Payload { rem: rem - avail };
                    self.args_left = args;
                    return Ok(partial(len));
                }
                let end = pos + rem as usize;
                if buf[end - 2] != b'\r' || buf[end - 1] != b'\n' {
                    return Err(ScanError::ExpectedCrlfAfterBulk);
                }
                self.note_examined(2);
                pos = end;
                args -= 1;
                if args == 0 {
                    self.args_left = 0;
                    return Ok(complete(pos));
                }
            }
        }
    }

    fn scan_reply(&mut self, buf: &[u8]) -> Result<Progress, ScanError> {
        let len = buf.len();
        let max_bulk = self.limits.max_bulk_len;
        let mut carry = std::mem::take(&mut self.carry);
        let mut pos = 0usize;
        let mut state = self.state;

        loop {
            match state {
                State::Payload { rem } | State::ChunkPayload { rem } => {
                    let avail = (len - pos) as u64;
                    if avail < rem {
                        if !trailer_ok(buf, pos, rem, len - pos) {
                            return Err(ScanError::ExpectedCrlfAfterBulk);
                        }
                        self.state = match state {
                            State::Payload { .. } => State::Payload { rem: rem - avail },
                            _ => State::ChunkPayload { rem: rem - avail },
                        };
                        return Ok(partial(len));
                    }
                    if !trailer_ok(buf, pos, rem, rem as usize) {
                        return Err(ScanError::ExpectedCrlfAfterBulk);
                    }
                    self.note_examined(rem.min(2) as usize);
                    pos += rem as usize;
                    if let State::ChunkPayload { .. } = state {
                        state = State::ChunkLine;
                        continue;
                    }
                    state = State::Line;
                    if self.finish_value() {
                        self.state = State::Line;
                        return Ok(complete(pos));
                    }
                }
                State::ChunkLine => {
                    if pos == len {
                        self.state = state;
                        return Ok(partial(pos));
                    }
                    let b = buf[pos];
                    self.note_examined(1);
                    if b != b';' {
                        return Err(ScanError::ExpectedChunk(b));
                    }
                    let n = match self.header(buf, pos, carry) {
                        Ok(Some((Header::Len(n), next))) => {
                            pos = next;
                            n
                        }
                        Ok(Some((Header::Streamed, _))) | Err(LineError::Invalid) => {
                            return Err(ScanError::InvalidBulkLength);
                        }
                        Err(LineError::TooLong) => {
                            return Err(ScanError::LineTooLong(self.limits.max_line_len));
                        }
                        Ok(None) => {
                            self.state = state;
                            return Ok(partial(pos));
                        }
                    };
                    carry = 0;
                    if n == 0 {
                        state = State::Line;
                        if self.finish_value() {
                            self.state = State::Line;
                            return Ok(complete(pos));
                        }
                    } else if n < 0 || n as u64 > max_bulk {
                        return Err(ScanError::InvalidBulkLength);
                    } else {
                        state = State::ChunkPayload { rem: n as u64 + 2 };
                    }
                }
                State::Line => {
                    if carry == 0 {
                        pos = self.bulk_run(buf, pos);
                    }
                    if pos == len {
                        self.state = state;
                        return Ok(partial(pos));
                    }
                    let b = buf[pos];
                    self.note_examined(1);
                    match b {
                        b'$' | b'!' | b'=' => {
                            let (h, next) = match self.header(buf, pos, carry) {
                                Ok(Some(x)) => x,
                                Ok(None) => {
                                    self.state = state;
                                    return Ok(partial(pos));
                                }
                                Err(LineError::Invalid) => {
                                    return Err(ScanError::InvalidBulkLength);
                                }
                                Err(LineError::TooLong) => {
                                    return Err(ScanError::LineTooLong(self.limits.max_line_len));
                                }
                            };
                            carry = 0;
                            pos = next;
                            match h {
                                Header::Len(n) if n >= 0 => {
                                    if n as u64 > max_bulk {
                                        return Err(ScanError::InvalidBulkLength);
                                    }
                                    let rem = n as u64 + 2;
                                    if ((len - pos) as u64) < rem {
                                        state = State::Payload { rem };
                                        continue;
                                    }
                                    let end = pos + rem as usize;
                                    if buf[end - 2] != b'\r' || buf[end - 1] != b'\n' {
                                        return Err(ScanError::ExpectedCrlfAfterBulk);
                                    }
                                    self.note_examined(2);
                                    pos = end;
                                    if self.finish_value() {
                                        self.state = State::Line;
                                        return Ok(complete(pos));
                                    }
                                }
                                Header::Len(-1) if b == b'$' => {
                                    if self.finish_value() {
                                        self.state = State::Line;
                                        return Ok(complete(pos));
                                    }
                                }
                                Header::Streamed if b == b'$' => state = State::ChunkLine,
                                _ => return Err(ScanError::InvalidBulkLength),
                            }
                        }
                        b'*' | b'%' | b'~' | b'>' | b'|' => {
                            let (h, next) = match self.header(buf, pos, carry) {
                                Ok(Some(x)) => x,
                                Ok(None) => {
                                    self.state = state;
                                    return Ok(partial(pos));
                                }
                                Err(LineError::Invalid) => {
                                    return Err(ScanError::InvalidMultibulkLength);
                                }
                                Err(LineError::TooLong) => {
                                    return Err(ScanError::LineTooLong(self.limits.max_line_len));
                                }
                            };
                            let header_start = pos;
                            carry = 0;
                            pos = next;
                            let attr = b == b'|';
                            let pairs = attr || b == b'%';
                            let out_of_band = if b == b'>'
                                && self.depth > 0
                                && matches!(h, Header::Len(n) if n > 0)
                            {
                                // The header and at most a short first element.
                                self.note_examined((len - pos).min(LONGEST_KIND_LOOK));
                                match reply::push_is_message(&buf[header_start..]) {
                                    Some(is_message) => is_message,
                                    None => {
                                        // Its kind has not arrived: look again with more bytes
                                        // (a header and a short bulk, so linear all the same).
                                        // The header's line up to its `\n` counts as searched.
                                        self.carry = pos - header_start - 1;
                                        self.state = state;
                                        return Ok(partial(header_start));
                                    }
                                }
                            } else {
                                false
                            };
                            match h {
                                Header::Len(n) if n >= 0 => {
                                    if n as u64 > self.limits.max_elements {
                                        return Err(ScanError::InvalidMultibulkLength);
                                    }
                                    if self.depth >= self.limits.max_depth {
                                        return Err(ScanError::TooDeep(self.limits.max_depth));
                                    }
                                    let count = if pairs { n as u64 * 2 } else { n as u64 };
                                    if count > 0 {
                                        let kind = if attr {
                                            Kind::Attr
                                        } else if out_of_band {
                                            Kind::OutOfBand
                                        } else {
                                            Kind::Counted
                                        };
                                        self.depth += 1;
                                        self.stack.push(Level { left: count, kind });
                                    } else if attr {
                                        self.push_attr_value();
                                    } else if out_of_band {
                                        // An empty push inside a reply: nothing to count.
                                    } else if self.finish_value() {
                                        self.state = State::Line;
                                        return Ok(complete(pos));
                                    }
                                }
                                Header::Len(-1) if b == b'*' => {
                                    if self.finish_value() {
                                        self.state = State::Line;
                                        return Ok(complete(pos));
                                    }
                                }
                                Header::Streamed => {
                                    if self.depth >= self.limits.max_depth {
                                        return Err(ScanError::TooDeep(self.limits.max_depth));
                                    }
                                    self.depth += 1;
                                    self.stack.push(Level {
                                        left: 0,
                                        kind: Kind::Streamed { pairs, attr },
                                    });
                                }
                                Header::Len(_) => return Err(ScanError::InvalidMultibulkLength),
                            }
                        }
                        b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => {
                            match self.find_line(buf, pos, carry) {
                                Line::Done(nl) => {
                                    if buf[nl - 1] != b'\r' {
                                        return Err(ScanError::ExpectedCrlf);
                                    }
                                    carry = 0;
                                    pos = nl + 1;
                                    if self.finish_value() {
                                        self.state = State::Line;
                                        return Ok(complete(pos));
                                    }
                                }
                                Line::Partial => {
                                    self.carry = len - pos;
                                    self.state = state;
                                    return Ok(partial(pos));
                                }
                                Line::TooLong => {
                                    return Err(ScanError::LineTooLong(self.limits.max_line_len));
                                }
                            }
                        }
                        b'.' => {
                            match self.find_line(buf, pos, carry) {
                                Line::Done(nl) => {
                                    if nl != pos + 2 || buf[pos + 1] != b'\r' {
                                        return Err(ScanError::ExpectedCrlf);
                                    }
                                    carry = 0;
                                    pos = nl + 1;
                                }
                                Line::Partial => {
                                    self.carry = len - pos;
                                    self.state = state;
                                    return Ok(partial(pos));
                                }
                                Line::TooLong => {
                                    return Err(ScanError::LineTooLong(self.limits.max_line_len));
                                }
                            }
                            let Some(&Level {
                                left,
                                kind: Kind::Streamed { pairs, attr },
                            }) = self.stack.last()
                            else {
                                return Err(ScanError::UnexpectedEndOfStream);
                            };
                            if pairs && left != 0 {
                                return Err(ScanError::UnbalancedStreamedMap);
                            }
                            self.stack.pop();
                            self.depth -= 1;
                            if attr {
                                self.push_attr_value();
                            } else if self.finish_value() {
                                self.state = State::Line;
                                return Ok(complete(pos));
                            }
                        }
                        b';' => return Err(ScanError::UnexpectedChunk),
                        _ => return Err(ScanError::InvalidTypeByte(b)),
                    }
                }
            }
        }
    }

    /// Fast lane for replies: skips a run of complete, well-formed `$<len>\r\n<payload>\r\n` elements
    /// inside a counted aggregate, stopping before the aggregate's last element (which ends the
    /// aggregate) and before anything else; the general path takes it from there (and reports errors).
    /// Returns the new position.
    #[inline(always)]
    fn bulk_run(&mut self, buf: &[u8], mut pos: usize) -> usize {
        let len = buf.len();
        let max_bulk = self.limits.max_bulk_len;
        let max_line = self.limits.max_line_len;
        let Some(top) = self.stack.last_mut() else {
            return pos;
        };
        if top.kind != Kind::Counted {
            return pos;
        }
        let mut left = top.left;
        #[cfg(test)]
        let mut examined = 0;
        while left > 1 && pos < len && buf[pos] == b'$' {
            let (n, next) = match fast_len(buf, pos, max_line) {
                Ok(x) => x,
                Err(_looked) => {
                    #[cfg(test)]
                    {
                        examined += 1 + _looked;
                    }
                    break;
                }
            };
            #[cfg(test)]
            {
                examined += next - pos;
            }
            if n > max_bulk || ((len - next) as u64) < n + 2 {
                break;
            }
            let end = next + n as usize + 2;
            if buf[end - 2] != b'\r' || buf[end - 1] != b'\n' {
                break;
            }
            #[cfg(test)]
            {
                examined += 2;
            }
            pos = end;
            left -= 1;
        }
        top.left = left;
        #[cfg(test)]
        {
            self.examined += examined as u64;
        }
        pos
    }

    /// A value just ended at the innermost open level. Returns true when that ends the top-level frame.
    #[inline(always)]
    fn finish_value(&mut self) -> bool {
        while let Some(top) = self.stack.last_mut() {
            match top.kind {
                Kind::Counted => {
                    top.left -= 1;
                    if top.left != 0 {
                        return false;
                    }
                    self.stack.pop();
                    self.depth -= 1;
                }
                Kind::Attr => {
                    top.left -= 1;
                    if top.left != 0 {
                        return false;
                    }
                    self.stack.pop();
                    self.depth -= 1;
                    self.push_attr_value();
                    return false;
                }
                Kind::AttrValue => {
                    self.stack.pop();
                }
                Kind::OutOfBand => {
                    top.left -= 1;
                    if top.left == 0 {
                        // The push ended; the reply around it goes on as before it.
                        self.stack.pop();
                        self.depth -= 1;
                    }
                    return false;
                }
                Kind::Streamed { pairs, .. } => {
                    if pairs {
                        top.left ^= 1;
                    }
                    return false;
                }
            }
        }
        true
    }

    /// An attribute ended: the next value is the one it is attached to.
    #[inline]
    fn push_attr_value(&mut self) {
        if !matches!(
            self.stack.last(),
            Some(Level {
                kind: Kind::AttrValue,
                ..
            })
        ) {
            self.stack.push(Level {
                left: 1,
                kind: Kind::AttrValue,
            });
        }
    }
}

#[inline(always)]
fn partial(consumed: usize) -> Progress {
    Progress {
        consumed,
        complete: false,
    }
}

#[inline(always)]
fn complete(consumed: usize) -> Progress {
    Progress {
        consumed,
        complete: true,
    }
}

/// Fast path for the common header: non-negative digits right after the type byte at `start`, then
/// `\r\n`, all inside `buf` and within the line cap. Returns the value and the index after the `\n`.
/// Anything else (negative, `?`, junk, incomplete) returns `Err` with the number of bytes looked at,
/// and goes the general way, which gives the same answer for everything this accepts.
#[inline(always)]
fn fast_len(buf: &[u8], start: usize, max_line: usize) -> Result<(u64, usize), usize> {
    let first = start + 1;
    // Most headers are one or two digits (`*2`, `$3`, `$16`): read those without the loop.
    // (The line cap counts the type byte, the digits and the '\r'.)
    if let Some(&[d0, b1, b2, ..]) = buf.get(first..first + 3) {
        let d0 = d0.wrapping_sub(b'0');
        if d0 <= 9 {
            if b1 == b'\r' && b2 == b'\n' && max_line >= 3 {
                return Ok((d0 as u64, first + 3));
            }
            let d1 = b1.wrapping_sub(b'0');
            if d1 <= 9 && b2 == b'\r' && buf.get(first + 3) == Some(&b'\n') && max_line >= 4 {
                return Ok((d0 as u64 * 10 + d1 as u64, first + 4));
            }
        }
    }
    let end = buf.len().min(first + FAST_DIGITS);
    let mut i = first;
    let mut v: u64 = 0;
    while i < end {
        let d = buf[i].wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        v = v * 10 + d as u64;
        i += 1;
    }
    // The line (type byte, digits, '\r') must also respect the line cap.
    if i > first
        && i + 1 < buf.len()
        && buf[i] == b'\r'
        && buf[i + 1] == b'\n'
        && i + 1 - start <= max_line
    {
        Ok((v, i + 2))
    } else {
        Err((i + 2).min(buf.len()) - first)
    }
}

/// A bulk payload of `n` bytes at the front of `buf` and what follows its CRLF, if the whole of
/// it is in `buf` and the CRLF is right.
#[inline(always)]
fn bulk_payload(buf: &[u8], n: u64) -> Option<(&[u8], &[u8])> {
    let (payload, rest) = buf.split_at_checked(usize::try_from(n).ok()?)?;
    Some((payload, rest.strip_prefix(b"\r\n")?))
}

/// What `small_request` made of a request.
#[derive(Debug, PartialEq)]
enum SmallRequest<'a> {
    /// The whole request: its command name, and where it ends.
    Whole(&'a [u8], usize),
    /// Its start, up to a payload ending at `end` (where its CRLF should be): `left` more
    /// arguments follow, the first of them not one `small_request` reads (a payload of 100
    /// bytes or more) or not all buffered. `name` is where the command name is.
    Started {
        name: std::ops::Range<usize>,
        end: usize,
        left: u64,
    },
    /// Another start: more than nine arguments, a name of ten bytes or more, not a
    /// multibulk request, not all there.
    Other,
}

/// The multibulk request at `buf[start..]`, when it starts the usual way: at most nine
/// arguments and a command name of at most nine bytes. Read a word at a time:
/// `*3\r\n$3\r\n` (the argument count and the name's length) in one eight-byte load, and
/// after each payload its CRLF with the next length header (`\r\n$16\r\n`, `\r\n$5\r\n`) in
/// another, as long as the arguments are under a hundred bytes; from the first that is not,
/// `lane_request_rest` reads on. Only for limits that every one- or two-digit header is
/// within (`small_headers_fit`).
#[inline(always)]
fn small_request(buf: &[u8], start: usize) -> SmallRequest<'_> {
    // `*3\r\n$3\r\n`: with '0' where the digits go, the digits come out of the XOR as values.
    const START: u64 = u64::from_le_bytes(*b"*0\r\n$0\r\n");
    // The CRLF ending a payload and the next header, `\r\n$16\r\n` or `\r\n$5\r\n`.
    const NEXT_2: u64 = u64::from_le_bytes(*b"\r\n$00\r\n\0");
    const NEXT_1: u64 = u64::from_le_bytes(*b"\r\n$0\r\n\0\0");
    // Where the last eight-byte word of `buf` starts: every word read starts at or before it.
    let Some(last_word) = buf.len().checked_sub(8) else {
        return SmallRequest::Other;
    };
    if start > last_word {
        return SmallRequest::Other;
    }
    let x = word_at_checked(buf, start) ^ START;
    let (argc, name_len) = ((x >> 8) as u8, (x >> 40) as u8);
    if x & 0xFFFF_00FF_FFFF_00FF != 0 || argc.wrapping_sub(1) > 8 || name_len > 9 {
        return SmallRequest::Other;
    }
    // `end` is where the current argument's payload ends (where its CRLF should be). Each
    // step adds at most 106, so it stays far from overflowing.
    let mut end = start + 8 + usize::from(name_len);
    for read in 1..argc {
        let w = if end <= last_word {
            word_at_checked(buf, end)
        } else {
            0
        };
        let x = w ^ NEXT_2;
        // Both digits at once: a byte of at most 9 stays under 0x80 when 0x76 is added.
        let digits = (x >> 24) & 0xFFFF;
        if x & 0x00FF_FF00_00FF_FFFF == 0 && (digits | (digits + 0x7676)) & 0x8080 == 0 {
            end += 7 + usize::from((digits as u8) * 10 + (digits >> 8) as u8);
            continue;
        }
        let x = w ^ NEXT_1;
        let digit = (x >> 24) as u8;
        if x & 0x0000_FFFF_00FF_FFFF == 0 && digit <= 9 {
            end += 6 + usize::from(digit);
            continue;
        }
        return SmallRequest::Started {
            name: start + 8..start + 8 + usize::from(name_len),
            end,
            left: u64::from(argc - read),
        };
    }
    // The last payload's CRLF; every earlier one was checked above. (`buf` holds at least
    // eight bytes, so `last_crlf` is not below zero.)
    let last_crlf = buf.len() - 2;
    if end > last_crlf || buf[end] != b'\r' || buf[end + 1] != b'\n' {
        return SmallRequest::Other;
    }
    SmallRequest::Whole(&buf[start + 8..start + 8 + usize::from(name_len)], end + 2)
}

/// The eight bytes at `buf[at..]`, `at` at most `buf.len() - 8`.
#[inline(always)]
fn word_at_checked(buf: &[u8], at: usize) -> u64 {
    let word = &buf[at..at + 8];
    u64::from_le_bytes([
        word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7],
    ])
}

/// The eight bytes at `buf[at..]` as a little-endian word, if there are eight.
#[inline(always)]
fn word_at(buf: &[u8], at: usize) -> Option<u64> {
    // (A range that wraps around is empty, so `get` refuses it too.)
    let word = buf.get(at..at.wrapping_add(8))?;
    Some(u64::from_le_bytes(*word.first_chunk::<8>()?))
}

/// Where the line at the start of `buf` ends (the index after its `\n`) when the whole line,
/// CRLF included, lies in its first eight bytes, the `\n` follows a `\r` and it is within the
/// line cap, with the eight bytes read (the line is their first `end`). None for anything else,
/// including lines that are merely longer.
#[inline(always)]
fn short_line_end(buf: &[u8], max_line: usize) -> Option<(usize, u64)> {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const LOW7: u64 = ONES * 0x7F;
    let word = u64::from_le_bytes(*buf.first_chunk::<8>()?);
    // The high bit of every byte that is `\n` (exact: no carry crosses between bytes).
    let x = word ^ (ONES * u64::from(b'\n'));
    let newlines = !(((x & LOW7) + LOW7) | x | LOW7);
    if newlines == 0 {
        return None;
    }
    let nl = (newlines.trailing_zeros() / 8) as usize;
    // nl is at least 1 (byte 0 is the type); the byte before it must be the `\r`.
    let before = (word >> ((nl - 1) * 8)) as u8;
    (before == b'\r' && nl <= max_line).then_some((nl + 1, word))
}

/// The first `\n` in `buf[from..limit]`. Simple replies are short: a plain loop finds their end
/// sooner than setting up `memchr`, which takes over past the first few bytes.
#[inline(always)]
fn find_lf(buf: &[u8], from: usize, limit: usize) -> Option<usize> {
    let short = limit.min(from + 16);
    if let Some(i) = buf.get(from..short)?.iter().position(|&b| b == b'\n') {
        return Some(from + i);
    }
    memchr(b'\n', buf.get(short..limit)?).map(|i| short + i)
}

/// Checks the CRLF trailer bytes of a bulk that fall within `buf[pos..pos + take]`, when `rem` bytes of
/// payload plus trailer remain from `pos` on (the `\r` is at `rem - 2`, the `\n` at `rem - 1`).
#[inline(always)]
fn trailer_ok(buf: &[u8], pos: usize, rem: u64, take: usize) -> bool {
    let take = take as u64;
    if rem >= 2 && rem - 2 < take && buf[pos + (rem - 2) as usize] != b'\r' {
        return false;
    }
    if rem >= 1 && rem - 1 < take && buf[pos + (rem - 1) as usize] != b'\n' {
        return false;
    }
    true
}

/// Strict signed decimal: an optional `-`, then 1 to 19 digits, within i64. No `+`, no spaces.
fn parse_i64(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v = v * 10 + d as u64;
    }
    if neg {
        if v > i64::MAX as u64 + 1 {
            None
        } else {
            Some((v as i64).wrapping_neg())
        }
    } else if v > i64::MAX as u64 {
        None
    } else {
        Some(v as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(dir: Direction) -> ScanLimits {
        match dir {
            Direction::Request => ScanLimits::request_defaults(),
            Direction::Reply => ScanLimits::reply_defaults(),
        }
    }

    /// What feeding a whole input produced.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Outcome {
        /// Absolute offsets where frames ended.
        ends: Vec<usize>,
        error: Option<ScanError>,
        /// Bytes presented but not consumed at the end.
        leftover: usize,
    }

    /// Feeds `input` in pieces cut at `cuts` (ascending), keeping unconsumed bytes and presenting them
    /// again with the next piece appended, as the proxy does.
    fn feed(sc: &mut Scanner, input: &[u8], cuts: &[usize]) -> Outcome {
        let mut pending: Vec<u8> = Vec::new();
        let mut base = 0;
        let mut ends = Vec::new();
        let mut prev = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            let cut = cut.clamp(prev, input.len());
            pending.extend_from_slice(&input[prev..cut]);
            prev = cut;
            loop {
                match sc.scan(&pending) {
                    Ok(p) => {
                        assert!(p.consumed <= pending.len(), "consumed beyond the buffer");
                        base += p.consumed;
                        pending.drain(..p.consumed);
                        if p.complete {
                            assert!(p.consumed > 0);
                            assert!(sc.at_frame_start());
                            ends.push(base);
                            if !pending.is_empty() {
                                continue;
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        // Errors are final.
                        assert_eq!(sc.scan(&pending), Err(e.clone()));
                        // How much was left unconsumed before the error depends on the cuts.
                        return Outcome {
                            ends,
                            error: Some(e),
                            leftover: 0,
                        };
                    }
                }
            }
        }
        Outcome {
            ends,
            error: None,
            leftover: pending.len(),
        }
    }

    fn run(dir: Direction, lim: ScanLimits, input: &[u8], cuts: &[usize]) -> (Outcome, Scanner) {
        let mut sc = Scanner::new(dir, lim);
        let out = feed(&mut sc, input, cuts);
        (out, sc)
    }

    fn byte_cuts(len: usize) -> Vec<usize> {
        (1..len).collect()
    }

    /// Frame ends of `input` scanned in one piece, which must be error-free and end on a frame boundary.
    fn ends(dir: Direction, input: &[u8]) -> Vec<usize> {
        let (out, sc) = run(dir, limits(dir), input, &[]);
        assert_eq!(
            out.error,
            None,
            "input {:?}",
            String::from_utf8_lossy(input)
        );
        assert_eq!(
            out.leftover,
            0,
            "input {:?}",
            String::from_utf8_lossy(input)
        );
        assert_eq!(sc.bytes_scanned(), input.len() as u64);
        out.ends
    }

    /// The error `input` produces, checked to be the same in one piece and byte by byte.
    fn error_with(dir: Direction, lim: ScanLimits, input: &[u8]) -> ScanError {
        let (whole, _) = run(dir, lim, input, &[]);
        let (bytewise, _) = run(dir, lim, input, &byte_cuts(input.len()));
        assert_eq!(
            whole,
            bytewise,
            "input {:?}",
            String::from_utf8_lossy(input)
        );
        whole
            .error
            .unwrap_or_else(|| panic!("no error for {:?}", String::from_utf8_lossy(input)))
    }

    fn error(dir: Direction, input: &[u8]) -> ScanError {
        error_with(dir, limits(dir), input)
    }

    /// Whatever the cut points, the outcome equals the one-piece outcome; on a clean input every byte
    /// is accounted for exactly once and the real work stays linear.
    fn check_splits(dir: Direction, lim: ScanLimits, input: &[u8]) -> Outcome {
        let (whole, sc) = run(dir, lim, input, &[]);
        let clean = whole.error.is_none() && whole.leftover == 0;
        if clean {
            assert_eq!(sc.bytes_scanned(), input.len() as u64);
            // In one piece only headers off the fast path (negative, `?`, odd) are read twice.
            assert!(
                sc.examined <= 2 * input.len() as u64,
                "one piece re-examined too much"
            );
        }
        for k in 0..=input.len() {
            let (out, sc) = run(dir, lim, input, &[k]);
            assert_eq!(
                out,
                whole,
                "split at {k} of {:?}",
                String::from_utf8_lossy(input)
            );
            if clean {
                assert_eq!(sc.bytes_scanned(), input.len() as u64);
            }
        }
        let (out, sc) = run(dir, lim, input, &byte_cuts(input.len()));
        assert_eq!(
            out,
            whole,
            "byte by byte: {:?}",
            String::from_utf8_lossy(input)
        );
        if clean {
            assert_eq!(sc.bytes_scanned(), input.len() as u64);
            // Byte by byte, only a header's type byte and digits are looked at again: bounded per
            // line. A push inside a reply is looked at again, header and kind, until its kind
            // is whole: bounded per push.
            let pushes = input.windows(2).filter(|w| w == b"\n>").count() as u64;
            let per_push = (LONGEST_KIND_LOOK * LONGEST_KIND_LOOK) as u64;
            assert!(
                sc.examined <= 4 * input.len() as u64 + per_push * pushes,
                "examined {} for {} bytes",
                sc.examined,
                input.len()
            );
        }
        whole
    }

    #[test]
    fn a_message_inside_a_reply_is_not_one_of_its_elements() {
        let reply = Direction::Reply;
        let lim = limits(reply);
        // What Redis 7.0 writes for MULTI, APPEND, GET, PUBLISH (to a channel the RESP3
        // connection itself subscribes to), EXEC: the message sits between EXEC's elements.
        let exec: &[u8] =
            b"*3\r\n:4\r\n$4\r\nv373\r\n>3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$4\r\nv278\r\n:1\r\n";
        let (input, expected) = cumulative(&[exec, b"$3\r\ntag\r\n"]);
        assert_eq!(check_splits(reply, lim, &input).ends, expected);
        // Every message kind, here before a map's value.
        for kind in ["message", "pmessage", "smessage", "invalidate"] {
            let push = format!(">2\r\n${}\r\n{kind}\r\n*1\r\n:1\r\n", kind.len());
            let map = format!("%1\r\n+k\r\n{push}:5\r\n");
            let (input, expected) = cumulative(&[map.as_bytes(), b"+OK\r\n"]);
            assert_eq!(check_splits(reply, lim, &input).ends, expected, "{kind}");
        }
        // A message that is the reply itself is a frame of its own, as before.
        let top: &[u8] = b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nm\r\n";
        let (input, expected) = cumulative(&[top, b":1\r\n"]);
        assert_eq!(check_splits(reply, lim, &input).ends, expected);
    }

    #[test]
    fn a_subscribe_confirmation_inside_exec_is_its_reply() {
        let reply = Direction::Reply;
        // RESP3 MULTI, SUBSCRIBE a b, EXEC: the first confirmation is the array's element,
        // the second follows it (the session counts that one from its subscriptions).
        let exec: &[u8] = b"*1\r\n>3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n";
        let next: &[u8] = b">3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n";
        let (input, expected) = cumulative(&[exec, next]);
        assert_eq!(check_splits(reply, limits(reply), &input).ends, expected);
        // Pushes whose first element is not a short bulk, or is empty, are elements too.
        for push in [
            &b">1\r\n:1\r\n"[..],
            b">1\r\n$11\r\nmessagexxxx\r\n",
            b">0\r\n",
        ] {
            let array = [&b"*2\r\n"[..], push, b"+x\r\n"].concat();
            let (input, expected) = cumulative(&[&array, b"+OK\r\n"]);
            assert_eq!(check_splits(reply, limits(reply), &input).ends, expected);
        }
    }

    fn cumulative(frames: &[&[u8]]) -> (Vec<u8>, Vec<usize>) {
        let mut all = Vec::new();
        let mut ends = Vec::new();
        for f in frames {
            all.extend_from_slice(f);
            ends.push(all.len());
        }
        (all, ends)
    }

    // ---------------------------------------------------------------- requests

    #[test]
    fn request_multibulk() {
        let set = b"*3\r\n$3\r\nSET\r\n$16\r\nkey:000000000001\r\n$5\r\nvalue\r\n";
        assert_eq!(ends(Direction::Request, set), vec![set.len()]);
        let empty_arg = b"*2\r\n$4\r\nECHO\r\n$0\r\n\r\n";
        assert_eq!(ends(Direction::Request, empty_arg), vec![empty_arg.len()]);
        // CRLF and '$' inside a payload are just payload.
        let tricky = b"*1\r\n$6\r\n\r\n$*\r\n\r\n";
        assert_eq!(ends(Direction::Request, tricky), vec![tricky.len()]);
    }

    #[test]
    fn request_empty_multibulk_is_a_frame() {
        assert_eq!(ends(Direction::Request, b"*0\r\n"), vec![4]);
        assert_eq!(ends(Direction::Request, b"*-1\r\n"), vec![5]);
        assert_eq!(ends(Direction::Request, b"*-7\r\n*0\r\n"), vec![5, 9]);
    }

    #[test]
    fn request_inline() {
        assert_eq!(ends(Direction::Request, b"PING\r\n"), vec![6]);
        assert_eq!(ends(Direction::Request, b"PING\n"), vec![5]);
        assert_eq!(ends(Direction::Request, b"\r\n"), vec![2]);
        assert_eq!(ends(Direction::Request, b"\n"), vec![1]);
        assert_eq!(
            ends(Direction::Request, b"SET a \"b c\"\r\n\n$3\r\n"),
            vec![13, 14, 18]
        );
        // A partial inline line is not consumed, and not searched again.
        let mut sc = Scanner::new(Direction::Request, limits(Direction::Request));
        assert_eq!(sc.scan(b"GET fo"), Ok(partial(0)));
        assert!(sc.at_frame_start());
        assert_eq!(sc.bytes_scanned(), 6);
        assert_eq!(sc.scan(b"GET foo\r\nPI"), Ok(complete(9)));
        assert_eq!(sc.bytes_scanned(), 9);
        assert_eq!(sc.examined, 9 + 2, "only the type byte is looked at again");
    }

    #[test]
    fn request_payload_streams_and_state() {
        let mut sc = Scanner::new(Direction::Request, limits(Direction::Request));
        assert!(sc.at_frame_start());
        assert_eq!(sc.scan(b""), Ok(partial(0)));
        assert_eq!(sc.scan(b"*2\r\n$3\r\nGE"), Ok(partial(10)));
        assert!(!sc.at_frame_start());
        assert_eq!(sc.scan(b"T\r"), Ok(partial(2)));
        assert_eq!(sc.scan(b"\n$1"), Ok(partial(1)));
        assert_eq!(sc.scan(b"$1\r\nk\r\n*1"), Ok(complete(7)));
        assert!(sc.at_frame_start());
        assert_eq!(sc.bytes_scanned(), 10 + 2 + 1 + 7);
    }

    #[test]
    fn request_errors() {
        use ScanError::*;
        let r = Direction::Request;
        assert_eq!(error(r, b"*abc\r\n"), InvalidMultibulkLength);
        assert_eq!(error(r, b"*3x\r\n"), InvalidMultibulkLength);
        assert_eq!(error(r, b"*\r\n"), InvalidMultibulkLength);
        assert_eq!(error(r, b"*+3\r\n"), InvalidMultibulkLength);
        assert_eq!(error(r, b"*3\n"), InvalidMultibulkLength);
        assert_eq!(error(r, b"*?\r\n"), InvalidMultibulkLength);
        assert_eq!(error(r, b"*2147483648\r\n"), InvalidMultibulkLength);
        assert_eq!(
            error(r, b"*99999999999999999999\r\n"),
            InvalidMultibulkLength
        );
        assert_eq!(error(r, b"*1\r\n+OK\r\n"), ExpectedBulk(b'+'));
        assert_eq!(error(r, b"*1\r\n\r\n"), ExpectedBulk(b'\r'));
        assert_eq!(error(r, b"*1\r\n$-1\r\n"), InvalidBulkLength);
        assert_eq!(error(r, b"*1\r\n$x\r\n"), InvalidBulkLength);
        assert_eq!(error(r, b"*1\r\n$?\r\n"), InvalidBulkLength);
        assert_eq!(error(r, b"*1\r\n$536870913\r\n"), InvalidBulkLength);
        assert_eq!(error(r, b"*1\r\n$3\r\nfooXY"), ExpectedCrlfAfterBulk);
        assert_eq!(error(r, b"*1\r\n$3\r\nfoo\rX"), ExpectedCrlfAfterBulk);
        assert_eq!(error(r, b"*1\r\n$3\r\nfoo\n"), ExpectedCrlfAfterBulk);
        let mut big = vec![b'a'; 64 * 1024 + 1];
        assert_eq!(error(r, &big), TooBigInlineRequest);
        big.push(b'\n');
        assert_eq!(error(r, &big), TooBigInlineRequest);
        let mut ok = vec![b'a'; 64 * 1024];
        ok.push(b'\n');
        assert_eq!(ends(r, &ok), vec![ok.len()]);
        let mut mbulk = b"*".to_vec();
        mbulk.extend(std::iter::repeat_n(b'1', 64 * 1024));
        assert_eq!(error(r, &mbulk), TooBigMultibulkCount);
        let mut bulk = b"*1\r\n$".to_vec();
        bulk.extend(std::iter::repeat_n(b'1', 64 * 1024));
        assert_eq!(error(r, &bulk), TooBigBulkCount);
    }

    #[test]
    fn unauthenticated_clients_get_redis_limit_on_arguments() {
        let r = Direction::Request;
        let request = |len: usize| {
            let mut bytes = format!("*2\r\n$3\r\nGET\r\n${len}\r\n").into_bytes();
            bytes.extend(std::iter::repeat_n(b'k', len));
            bytes.extend_from_slice(b"\r\n");
            bytes
        };
        let mut sc = Scanner::new(r, limits(r));
        sc.set_unauthenticated(true);
        let at_limit = request(16 * 1024);
        assert_eq!(sc.scan(&at_limit), Ok(complete(at_limit.len())));
        // The fast lane does not apply the limit, so it is closed to such a client.
        assert_eq!(sc.peek_request_run(&at_limit, |_| true), (0, 0));
        assert_eq!(
            sc.scan(&request(16 * 1024 + 1)),
            Err(ScanError::UnauthenticatedBulkLength)
        );
        // Once the client has authenticated, only the configured limit holds.
        let mut sc = Scanner::new(r, limits(r));
        sc.set_unauthenticated(true);
        sc.set_unauthenticated(false);
        let over = request(16 * 1024 + 1);
        assert_eq!(sc.scan(&over), Ok(complete(over.len())));
        assert_eq!(
            ScanError::UnauthenticatedBulkLength.to_string(),
            "unauthenticated bulk length"
        );
    }

    #[test]
    fn request_caps() {
        let lim = ScanLimits {
            max_depth: 1,
            max_bulk_len: 3,
            max_elements: 2,
            max_line_len: 8,
        };
        let r = Direction::Request;
        let (out, _) = run(r, lim, b"*2\r\n$3\r\nabc\r\n$0\r\n\r\n", &[]);
        assert_eq!(out.ends, vec![19]);
        assert_eq!(
            error_with(r, lim, b"*3\r\n"),
            ScanError::InvalidMultibulkLength
        );
        assert_eq!(
            error_with(r, lim, b"*1\r\n$4\r\n"),
            ScanError::InvalidBulkLength
        );
        // The cap counts the bytes before '\n', a '\r' included.
        let (out, _) = run(r, lim, b"1234567\r\n12345678\n", &[]);
        assert_eq!(out.ends, vec![9, 18]);
        assert_eq!(
            error_with(r, lim, b"12345678\r\n"),
            ScanError::TooBigInlineRequest
        );
        assert_eq!(
            error_with(r, lim, b"123456789\n"),
            ScanError::TooBigInlineRequest
        );
        assert_eq!(
            error_with(r, lim, b"*0000002\r\n"),
            ScanError::TooBigMultibulkCount
        );
        let (out, _) = run(r, lim, b"*000002\r\n$3\r\nabc\r\n$3\r\nabc\r\n", &[]);
        assert_eq!(out.ends, vec![27]);
    }

    // ---------------------------------------------------------------- replies

    #[test]
    fn reply_scalars() {
        let p = Direction::Reply;
        for f in [
            &b"+OK\r\n"[..],
            b"+\r\n",
            b"-ERR unknown command\r\n",
            b":1000\r\n",
            b":-12\r\n",
            b"$5\r\nhello\r\n",
            b"$0\r\n\r\n",
            b"$-1\r\n",
            b"*-1\r\n",
            b"_\r\n",
            b"#t\r\n",
            b"#f\r\n",
            b",3.14\r\n",
            b",-inf\r\n",
            b"(3492890328409238509324850943850943825024385\r\n",
            b"!21\r\nSYNTAX invalid syntax\r\n",
            b"=15\r\ntxt:Some string\r\n",
        ] {
            assert_eq!(
                ends(p, f),
                vec![f.len()],
                "{:?}",
                String::from_utf8_lossy(f)
            );
        }
    }

    #[test]
    fn reply_aggregates() {
        let p = Direction::Reply;
        for f in [
            &b"*0\r\n"[..],
            b"*2\r\n$3\r\nfoo\r\n:1\r\n",
            b"*2\r\n*1\r\n+a\r\n*0\r\n",
            b"*3\r\n$-1\r\n*-1\r\n_\r\n",
            b"%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n",
            b"%0\r\n",
            b"~3\r\n+a\r\n+b\r\n+c\r\n",
            b"~0\r\n",
            b">3\r\n+message\r\n+channel\r\n$5\r\nhello\r\n",
            b"*1\r\n%1\r\n~1\r\n:1\r\n>1\r\n*0\r\n",
        ] {
            assert_eq!(
                ends(p, f),
                vec![f.len()],
                "{:?}",
                String::from_utf8_lossy(f)
            );
        }
    }

    #[test]
    fn reply_attributes() {
        let p = Direction::Reply;
        // Top level: the attribute and the value after it are one frame.
        let f = b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n*2\r\n:2039123\r\n:9543892\r\n";
        assert_eq!(ends(p, f), vec![f.len()]);
        // Nested: the attribute does not count as an element of the array.
        let f = b"*2\r\n:1\r\n|1\r\n+ttl\r\n:3600\r\n:2\r\n";
        assert_eq!(ends(p, f), vec![f.len()]);
        // Empty attribute, consecutive attributes, attributed aggregate and map values.
        let f = b"|0\r\n+x\r\n";
        assert_eq!(ends(p, f), vec![f.len()]);
        let f = b"|1\r\n+a\r\n+b\r\n|0\r\n|1\r\n+c\r\n|1\r\n+d\r\n+e\r\n+f\r\n*1\r\n+x\r\n";
        assert_eq!(ends(p, f), vec![f.len()]);
        let f = b"%1\r\n|1\r\n+k\r\n+v\r\n+key\r\n|0\r\n*1\r\n|0\r\n:1\r\n";
        assert_eq!(ends(p, f), vec![f.len()]);
        // Not complete until the attributed value arrived.
        let mut sc = Scanner::new(p, limits(p));
        assert_eq!(sc.scan(b"|1\r\n+a\r\n+b\r\n"), Ok(partial(12)));
        assert!(!sc.at_frame_start());
        assert_eq!(sc.scan(b"+c\r\n"), Ok(complete(4)));
    }

    #[test]
    fn reply_streamed() {
        let p = Direction::Reply;
        for f in [
            &b"$?\r\n;4\r\nHell\r\n;5\r\no wor\r\n;1\r\nd\r\n;0\r\n"[..],
            b"$?\r\n;0\r\n",
            b"*?\r\n:1\r\n:2\r\n:3\r\n.\r\n",
            b"*?\r\n.\r\n",
            b"%?\r\n+a\r\n:1\r\n+b\r\n:2\r\n.\r\n",
            b"~?\r\n+a\r\n:1\r\n.\r\n",
            b">?\r\n+a\r\n.\r\n",
            b"|?\r\n+a\r\n+b\r\n.\r\n:1\r\n",
            b"*?\r\n*?\r\n$?\r\n;1\r\nx\r\n;0\r\n.\r\n*2\r\n%?\r\n.\r\n$?\r\n;0\r\n.\r\n",
            b"*?\r\n|1\r\n+a\r\n+b\r\n:1\r\n.\r\n",
            b"*2\r\n$?\r\n;2\r\nab\r\n;0\r\n:1\r\n",
        ] {
            assert_eq!(
                ends(p, f),
                vec![f.len()],
                "{:?}",
                String::from_utf8_lossy(f)
            );
        }
    }

    #[test]
    fn reply_errors() {
        use ScanError::*;
        let p = Direction::Reply;
        assert_eq!(error(p, b"X\r\n"), InvalidTypeByte(b'X'));
        assert_eq!(error(p, b"*1\r\n\x00"), InvalidTypeByte(0));
        assert_eq!(error(p, b"$-2\r\n"), InvalidBulkLength);
        assert_eq!(error(p, b"$abc\r\n"), InvalidBulkLength);
        assert_eq!(error(p, b"!-1\r\n"), InvalidBulkLength);
        assert_eq!(error(p, b"=?\r\n"), InvalidBulkLength);
        assert_eq!(error(p, b"$9223372036854775808\r\n"), InvalidBulkLength);
        assert_eq!(error(p, b"*-2\r\n"), InvalidMultibulkLength);
        assert_eq!(error(p, b"%-1\r\n"), InvalidMultibulkLength);
        assert_eq!(error(p, b"*1x\r\n"), InvalidMultibulkLength);
        assert_eq!(error(p, b"$3\r\nabcde"), ExpectedCrlfAfterBulk);
        assert_eq!(error(p, b"+OK\n"), ExpectedCrlf);
        assert_eq!(error(p, b"*?\r\n.x\r\n"), ExpectedCrlf);
        assert_eq!(error(p, b".\r\n"), UnexpectedEndOfStream);
        assert_eq!(error(p, b"*1\r\n.\r\n"), UnexpectedEndOfStream);
        assert_eq!(error(p, b"*?\r\n|0\r\n.\r\n"), UnexpectedEndOfStream);
        assert_eq!(error(p, b"%?\r\n+a\r\n.\r\n"), UnbalancedStreamedMap);
        assert_eq!(error(p, b"|?\r\n+a\r\n.\r\n"), UnbalancedStreamedMap);
        assert_eq!(error(p, b";3\r\nabc\r\n"), UnexpectedChunk);
        assert_eq!(error(p, b"$?\r\n+a\r\n"), ExpectedChunk(b'+'));
        assert_eq!(error(p, b"$?\r\n;-1\r\n"), InvalidBulkLength);
        assert_eq!(error(p, b"$?\r\n;?\r\n"), InvalidBulkLength);
        assert_eq!(error(p, b"$?\r\n;1\r\nab\r\n"), ExpectedCrlfAfterBulk);
    }

    #[test]
    fn reply_caps() {
        use ScanError::*;
        let p = Direction::Reply;
        let lim = ScanLimits {
            max_depth: 2,
            max_bulk_len: 4,
            max_elements: 3,
            max_line_len: 6,
        };
        let ok = b"*3\r\n*1\r\n:1\r\n$4\r\nabcd\r\n%3\r\n+a\r\n+b\r\n+c\r\n+d\r\n+e\r\n+f\r\n";
        let (out, _) = run(p, lim, ok, &[]);
        assert_eq!(out.ends, vec![ok.len()]);
        assert_eq!(error_with(p, lim, b"*1\r\n*1\r\n*1\r\n:1\r\n"), TooDeep(2));
        assert_eq!(error_with(p, lim, b"*1\r\n*1\r\n*0\r\n"), TooDeep(2));
        assert_eq!(error_with(p, lim, b"*1\r\n*1\r\n*?\r\n"), TooDeep(2));
        // A streamed string is no nesting; an attribute's contents are.
        let (out, _) = run(p, lim, b"*1\r\n*1\r\n$?\r\n;1\r\na\r\n;0\r\n", &[]);
        assert_eq!(out.error, None);
        assert_eq!(error_with(p, lim, b"*1\r\n*1\r\n|1\r\n"), TooDeep(2));
        assert_eq!(error_with(p, lim, b"*4\r\n"), InvalidMultibulkLength);
        assert_eq!(error_with(p, lim, b"%4\r\n"), InvalidMultibulkLength);
        assert_eq!(error_with(p, lim, b"$5\r\n"), InvalidBulkLength);
        assert_eq!(error_with(p, lim, b"!5\r\n"), InvalidBulkLength);
        assert_eq!(error_with(p, lim, b"$?\r\n;5\r\n"), InvalidBulkLength);
        let (out, _) = run(p, lim, b"+abcd\r\n", &[]);
        assert_eq!(out.ends, vec![7]);
        assert_eq!(error_with(p, lim, b"+abcde\r\n"), LineTooLong(6));
        assert_eq!(error_with(p, lim, b"+abcdefghij"), LineTooLong(6));
        assert_eq!(error_with(p, lim, b"*000001\r\n"), LineTooLong(6));
        // Chained attributes share one value level: the stack stays bounded.
        let mut chain = b"*1\r\n".to_vec();
        chain.extend(b"|0\r\n".repeat(1000));
        chain.extend(b":1\r\n");
        let (out, sc) = run(p, lim, &chain, &[]);
        assert_eq!(out.ends, vec![chain.len()]);
        assert!(sc.stack.capacity() <= 8);
    }

    #[test]
    fn multi_frame_sequences() {
        let p = Direction::Reply;
        let frames: [&[u8]; 6] = [
            b"+OK\r\n",
            b"*2\r\n$3\r\nfoo\r\n$-1\r\n",
            b"|1\r\n+a\r\n:1\r\n%1\r\n+k\r\n~1\r\n#t\r\n",
            b"$?\r\n;3\r\nabc\r\n;0\r\n",
            b">2\r\n+pubsub\r\n*?\r\n_\r\n.\r\n",
            b"=7\r\nmkd:abc\r\n",
        ];
        let (all, expected) = cumulative(&frames);
        assert_eq!(ends(p, &all), expected);
    }

    #[test]
    fn display_texts() {
        use ScanError::*;
        assert_eq!(ExpectedBulk(b'x').to_string(), "expected '$', got 'x'");
        assert_eq!(ExpectedBulk(b'\r').to_string(), "expected '$', got '\\x0d'");
        assert_eq!(
            InvalidTypeByte(0x07).to_string(),
            "invalid RESP type byte 0x07"
        );
        assert_eq!(
            InvalidMultibulkLength.to_string(),
            "invalid multibulk length"
        );
        assert_eq!(InvalidBulkLength.to_string(), "invalid bulk length");
        assert_eq!(TooBigInlineRequest.to_string(), "too big inline request");
        assert_eq!(
            TooBigMultibulkCount.to_string(),
            "too big mbulk count string"
        );
        assert_eq!(TooBigBulkCount.to_string(), "too big bulk count string");
        assert_eq!(TooDeep(3).to_string(), "nesting deeper than 3");
        assert_eq!(
            ExpectedCrlfAfterBulk.to_string(),
            "expected CRLF after bulk data"
        );
    }

    // ---------------------------------------------------------------- resumability

    #[test]
    fn every_split_gives_the_same_frames() {
        let requests: &[&[u8]] = &[
            b"*3\r\n$3\r\nSET\r\n$16\r\nkey:000000000001\r\n$5\r\nvalue\r\n*1\r\n$4\r\nPING\r\n",
            b"PING\r\n\r\n\nGET a\n*0\r\n*-1\r\n*2\r\n$4\r\nECHO\r\n$0\r\n\r\n",
            b"*1\r\n$12\r\n\r\n\r\n\r\n\r\n\r\n\r\nQUIT\r\n",
            b"*2\r\n$3\r\nGET\r\n$3\r\nabc\r\n*1\r\n$3\r\nxyz\r\nX",
            b"*1\r\n$3\r\nabc\r\n*2\r\n+",
            b"*1\r\n$3\r\nabc\r\n*1\r\n$3\r\nabcXY",
            b"*1\r\n$3\r\nabc\r\n*1x\r\n",
        ];
        for input in requests {
            check_splits(Direction::Request, limits(Direction::Request), input);
        }
        let replies: &[&[u8]] = &[
            b"+OK\r\n-ERR x\r\n:1\r\n$3\r\nfoo\r\n$-1\r\n*-1\r\n_\r\n#t\r\n,1.5\r\n(12\r\n",
            b"!3\r\nerr\r\n=8\r\ntxt:abcd\r\n*2\r\n*1\r\n:1\r\n%1\r\n+a\r\n~1\r\n>0\r\n",
            b"|1\r\n+a\r\n:1\r\n*2\r\n|0\r\n:1\r\n|1\r\n+b\r\n%0\r\n:2\r\n+x\r\n",
            b"$?\r\n;3\r\nabc\r\n;1\r\n\n\r\n;0\r\n*?\r\n:1\r\n*?\r\n.\r\n.\r\n%?\r\n+a\r\n+b\r\n.\r\n|?\r\n.\r\n:1\r\n",
            b"*3\r\n$10\r\n0123456789\r\n$0\r\n\r\n:-9223372036854775808\r\n",
            b"*1\r\n:1\r\n.\r\n",
            b"%?\r\n+a\r\n.\r\n",
            b"*2\r\n$1\r\nab\r\n",
        ];
        for input in replies {
            check_splits(Direction::Reply, limits(Direction::Reply), input);
        }
        let tight = ScanLimits {
            max_depth: 2,
            max_bulk_len: 4,
            max_elements: 3,
            max_line_len: 6,
        };
        for input in [&b"+abc\r\n+abcde\r\n"[..], b"*1\r\n*1\r\n*1\r\n", b"$5\r\n"] {
            check_splits(Direction::Reply, tight, input);
        }
    }

    #[test]
    fn long_line_byte_by_byte_is_linear() {
        // A 60 KiB inline command and a 1 MiB simple string arriving one byte at a time.
        let mut inline = vec![b'x'; 60 * 1024];
        inline.extend_from_slice(b"\r\n");
        let (out, sc) = run(
            Direction::Request,
            limits(Direction::Request),
            &inline,
            &byte_cuts(inline.len()),
        );
        assert_eq!(out.ends, vec![inline.len()]);
        assert_eq!(sc.bytes_scanned(), inline.len() as u64);
        assert!(sc.examined <= 2 * inline.len() as u64 + 4);

        let mut simple = b"+".to_vec();
        simple.extend(std::iter::repeat_n(b'y', 1024 * 1024));
        simple.extend_from_slice(b"\r\n");
        let cuts: Vec<usize> = (1..simple.len()).step_by(7).collect();
        let (out, sc) = run(Direction::Reply, limits(Direction::Reply), &simple, &cuts);
        assert_eq!(out.ends, vec![simple.len()]);
        assert_eq!(sc.bytes_scanned(), simple.len() as u64);
        assert!(sc.examined <= simple.len() as u64 + cuts.len() as u64 + 4);
    }

    #[test]
    fn big_bulk_streams_in_chunks() {
        const LEN: usize = 8 * 1024 * 1024;
        const CHUNK: usize = 16 * 1024;
        for dir in [Direction::Request, Direction::Reply] {
            let mut input = format!("*1\r\n${LEN}\r\n").into_bytes();
            let header = input.len();
            input.resize(header + LEN, b'v');
            input.extend_from_slice(b"\r\n");
            let mut sc = Scanner::new(dir, limits(dir));
            let mut pending: Vec<u8> = Vec::new();
            let mut total = 0;
            let mut chunks = input.chunks(CHUNK).peekable();
            let mut first = true;
            while let Some(chunk) = chunks.next() {
                pending.extend_from_slice(chunk);
                let p = sc.scan(&pending).unwrap();
                if first {
                    assert_eq!(p, partial(CHUNK), "the header and the payload so far");
                    first = false;
                } else if chunks.peek().is_some() {
                    assert_eq!(p, partial(CHUNK), "a middle chunk is consumed whole");
                } else {
                    assert_eq!(p, complete(chunk.len()));
                }
                pending.drain(..p.consumed);
                total += p.consumed;
            }
            assert_eq!(total, input.len());
            assert!(sc.examined < 64, "the payload is skipped, not examined");
        }
    }

    // ------------------------------------------------ proptests against redis-protocol

    mod oracle {
        use super::*;
        use redis_protocol::resp2::types::{OwnedFrame as F2, Resp2Frame};
        use redis_protocol::resp3::types::{
            FrameKind, FrameMap, FrameSet, OwnedFrame as F3, Resp3Frame, VerbatimStringFormat,
        };
        use redis_protocol::resp3::{decode::streaming, types::DecodedRangeFrame};

        pub fn encode2(f: &F2) -> Vec<u8> {
            let mut buf = vec![0; f.encode_len(false)];
            let n = redis_protocol::resp2::encode::encode(&mut buf, f, false).unwrap();
            buf.truncate(n);
            buf
        }

        pub fn encode3(f: &F3) -> Vec<u8> {
            let mut buf = vec![0; f.encode_len(false)];
            let n = redis_protocol::resp3::encode::complete::encode(&mut buf, f, false).unwrap();
            buf.truncate(n);
            buf
        }

        /// Frame ends according to redis-protocol's RESP2 decoder.
        pub fn ends2(buf: &[u8]) -> Vec<usize> {
            let mut pos = 0;
            let mut ends = Vec::new();
            while pos < buf.len() {
                let (_, n) = redis_protocol::resp2::decode::decode_range(&buf[pos..])
                    .expect("oracle error")
                    .expect("oracle incomplete");
                pos += n;
                ends.push(pos);
            }
            ends
        }

        /// Frame ends according to redis-protocol's RESP3 streaming decoder: a streamed frame ends with
        /// its end-of-stream piece.
        pub fn ends3(buf: &[u8]) -> Vec<usize> {
            let mut pos = 0;
            let mut ends = Vec::new();
            let mut streaming = false;
            while pos < buf.len() {
                let (frame, n) = streaming::decode_range(&buf[pos..])
                    .expect("oracle error")
                    .expect("oracle incomplete");
                pos += n;
                match frame {
                    DecodedRangeFrame::Streaming(_) => streaming = true,
                    DecodedRangeFrame::Complete(f) => {
                        if !streaming || f.kind() == FrameKind::EndStream {
                            streaming = false;
                            ends.push(pos);
                        }
                    }
                }
            }
            ends
        }

        fn text() -> impl Strategy<Value = String> {
            "[a-zA-Z0-9 :.]{0,8}"
        }

        fn blob() -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec(any::<u8>(), 0..24)
        }

        pub fn frame2() -> impl Strategy<Value = F2> {
            let leaf = prop_oneof![
                text().prop_map(|s| F2::SimpleString(s.into_bytes())),
                text().prop_map(F2::Error),
                any::<i64>().prop_map(F2::Integer),
                blob().prop_map(F2::BulkString),
                Just(F2::Null),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop::collection::vec(inner, 0..4).prop_map(F2::Array)
            })
        }

        /// Scalars that may be map keys, set members and attribute entries.
        fn scalar3() -> BoxedStrategy<F3> {
            prop_oneof![
                blob().prop_map(|data| F3::BlobString {
                    data,
                    attributes: None
                }),
                blob().prop_map(|data| F3::BlobError {
                    data,
                    attributes: None
                }),
                text().prop_map(|s| F3::SimpleString {
                    data: s.into_bytes(),
                    attributes: None
                }),
                text().prop_map(|data| F3::SimpleError {
                    data,
                    attributes: None
                }),
                any::<bool>().prop_map(|data| F3::Boolean {
                    data,
                    attributes: None
                }),
                Just(F3::Null),
                any::<i64>().prop_map(|data| F3::Number {
                    data,
                    attributes: None
                }),
                (-4000i32..4000).prop_map(|x| F3::Double {
                    data: x as f64 / 8.0,
                    attributes: None
                }),
                "-?[1-9][0-9]{0,40}".prop_map(|s| F3::BigNumber {
                    data: s.into_bytes(),
                    attributes: None
                }),
                (blob(), any::<bool>()).prop_map(|(data, md)| F3::VerbatimString {
                    data,
                    format: if md {
                        VerbatimStringFormat::Markdown
                    } else {
                        VerbatimStringFormat::Text
                    },
                    attributes: None
                }),
            ]
            .boxed()
        }

        fn attrs() -> impl Strategy<Value = Option<FrameMap<F3, F3>>> {
            prop::option::weighted(
                0.2,
                prop::collection::vec((scalar3(), scalar3()), 0..3)
                    .prop_map(|kv| kv.into_iter().collect::<FrameMap<F3, F3>>()),
            )
        }

        fn with_attrs(f: F3, a: Option<FrameMap<F3, F3>>) -> F3 {
            let mut f = f;
            match &mut f {
                F3::BlobString { attributes, .. }
                | F3::BlobError { attributes, .. }
                | F3::SimpleString { attributes, .. }
                | F3::SimpleError { attributes, .. }
                | F3::Boolean { attributes, .. }
                | F3::Number { attributes, .. }
                | F3::Double { attributes, .. }
                | F3::BigNumber { attributes, .. }
                | F3::VerbatimString { attributes, .. }
                | F3::Array { attributes, .. }
                | F3::Map { attributes, .. }
                | F3::Set { attributes, .. }
                | F3::Push { attributes, .. } => *attributes = a,
                _ => {}
            }
            f
        }

        /// A reply: any value, or a push of values. Pushes are top-level only: one inside a
        /// reply is out of band (see `Kind::OutOfBand`), where redis-protocol counts it as an
        /// element.
        pub fn frame3() -> impl Strategy<Value = F3> {
            prop_oneof![
                4 => value3(),
                1 => (prop::collection::vec(value3(), 0..3), attrs()).prop_map(|(data, a)| {
                    with_attrs(F3::Push { data, attributes: None }, a)
                }),
            ]
        }

        fn value3() -> impl Strategy<Value = F3> {
            let leaf = (scalar3(), attrs()).prop_map(|(f, a)| with_attrs(f, a));
            leaf.prop_recursive(3, 24, 4, |inner| {
                let agg = prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(|data| F3::Array {
                        data,
                        attributes: None
                    }),
                    prop::collection::vec((scalar3(), inner), 0..3).prop_map(|kv| F3::Map {
                        data: kv.into_iter().collect(),
                        attributes: None
                    }),
                    prop::collection::vec(scalar3(), 0..4).prop_map(|v| F3::Set {
                        data: v.into_iter().collect::<FrameSet<F3>>(),
                        attributes: None
                    }),
                ];
                (agg, attrs()).prop_map(|(f, a)| with_attrs(f, a))
            })
        }

        /// A top-level RESP3 streamed string or aggregate, built by hand (redis-protocol encodes these
        /// piecewise).
        pub fn streamed3() -> impl Strategy<Value = Vec<u8>> {
            let string = prop::collection::vec(prop::collection::vec(any::<u8>(), 1..12), 0..4)
                .prop_map(|chunks| {
                    let mut out = b"$?\r\n".to_vec();
                    for c in chunks {
                        out.extend(format!(";{}\r\n", c.len()).into_bytes());
                        out.extend(c);
                        out.extend(b"\r\n");
                    }
                    out.extend(b";0\r\n");
                    out
                });
            let agg = (
                prop::sample::select(vec![b'*', b'~', b'%']),
                prop::collection::vec(frame3(), 0..4),
            )
                .prop_map(|(t, mut elems)| {
                    if t == b'%' && elems.len() % 2 == 1 {
                        elems.pop();
                    }
                    let mut out = vec![t, b'?', b'\r', b'\n'];
                    for e in &elems {
                        out.extend(encode3(e));
                    }
                    out.extend(b".\r\n");
                    out
                });
            prop_oneof![string, agg]
        }

        /// A request: a multibulk command (encoded by redis-protocol), an inline line, or an empty multibulk.
        pub fn request() -> impl Strategy<Value = (Vec<u8>, bool)> {
            let multibulk = prop::collection::vec(blob(), 1..5).prop_map(|args| {
                let f = F2::Array(args.into_iter().map(F2::BulkString).collect());
                (encode2(&f), true)
            });
            let inline = (
                prop::collection::vec(any::<u8>().prop_filter("no LF", |b| *b != b'\n'), 0..20)
                    .prop_filter("not multibulk", |v| v.first() != Some(&b'*')),
                any::<bool>(),
            )
                .prop_map(|(mut line, crlf)| {
                    line.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
                    (line, false)
                });
            let empty = prop::sample::select(vec![&b"*0\r\n"[..], b"*-1\r\n"])
                .prop_map(|b| (b.to_vec(), true));
            prop_oneof![4 => multibulk, 2 => inline, 1 => empty]
        }
    }

    fn cuts_for(len: usize, idx: &[prop::sample::Index]) -> Vec<usize> {
        let mut cuts: Vec<usize> = idx.iter().map(|i| i.index(len + 1)).collect();
        cuts.sort_unstable();
        cuts
    }

    /// Scans `input` in one piece and cut at `cuts`; both must give `expected` and account for every byte.
    fn assert_frames(dir: Direction, input: &[u8], cuts: &[usize], expected: &[usize]) {
        for c in [&[][..], cuts] {
            let (out, sc) = run(dir, limits(dir), input, c);
            assert_eq!(out.error, None, "cuts {c:?}");
            assert_eq!(out.ends, expected, "cuts {c:?}");
            assert_eq!(out.leftover, 0);
            assert_eq!(sc.bytes_scanned(), input.len() as u64);
        }
    }

    /// Where the general scanner, starting from `sc`'s state, ends `frames` whole frames in `buf`
    /// (None if it errs or runs out of input first).
    fn general_end(sc: &Scanner, buf: &[u8], frames: u64) -> Option<usize> {
        let mut sc = sc.clone();
        let mut pos = 0;
        for _ in 0..frames {
            loop {
                let p = sc.scan(&buf[pos..]).ok()?;
                if p.consumed == 0 && !p.complete {
                    return None;
                }
                pos += p.consumed;
                if p.complete {
                    break;
                }
            }
        }
        Some(pos)
    }

    /// Walks `input` frame by frame, taking the fast lane wherever it offers something and
    /// checking each offer against the general scanner; returns the bytes scanned.
    fn walk_with_fast_lanes(dir: Direction, lim: ScanLimits, input: &[u8], max: u64) -> u64 {
        let mut sc = Scanner::new(dir, lim);
        let mut pos = 0;
        while pos < input.len() {
            let buf = &input[pos..];
            let offered = match dir {
                Direction::Request => {
                    // Take up to `max` requests, checking each name the lane shows.
                    let mut names = Vec::new();
                    let (bytes, n) = sc.peek_request_run(buf, |name| {
                        names.push(name.to_vec());
                        names.len() as u64 <= max
                    });
                    let mut at = 0;
                    for name in names.iter().take(n as usize) {
                        let end = general_end(&sc, &buf[at..], 1).unwrap();
                        let args = crate::resp::command::multibulk_args(&buf[at..at + end]);
                        assert_eq!(args[0], &name[..]);
                        at += end;
                    }
                    assert_eq!(at, bytes);
                    Some((bytes, n)).filter(|o| o.1 > 0)
                }
                Direction::Reply => Some(sc.peek_scalar_replies(buf, max)).filter(|o| o.1 > 0),
            };
            if let Some((bytes, frames)) = offered {
                assert!(frames <= max.max(1));
                assert_eq!(
                    general_end(&sc, buf, frames),
                    Some(bytes),
                    "fast lane at {pos}"
                );
                sc.skip_frames(bytes);
                pos += bytes;
                continue;
            }
            match sc.scan(buf) {
                Ok(p) if p.consumed > 0 || p.complete => pos += p.consumed,
                _ => break,
            }
        }
        sc.bytes_scanned()
    }

    #[test]
    fn fast_lanes_take_the_common_frames() {
        let sc = Scanner::new(Direction::Request, limits(Direction::Request));
        let get = b"*2\r\n$3\r\nGET\r\n$16\r\nkey:__rand_int__\r\n";
        let all = |_: &[u8]| true;
        assert_eq!(sc.peek_request_run(get, all), (get.len(), 1));
        let twice = [&get[..], &get[..], b"*1\r\n$4\r\nEXEC\r\n", &get[..]].concat();
        let not_exec = |name: &[u8]| name != b"EXEC";
        assert_eq!(sc.peek_request_run(&twice, not_exec), (2 * get.len(), 2));
        assert_eq!(sc.peek_request_run(&get[..get.len() - 1], all), (0, 0));
        assert_eq!(sc.peek_request_run(b"PING\r\n", all), (0, 0));
        assert_eq!(sc.peek_request_run(b"*0\r\n", all), (0, 0));
        let sc = Scanner::new(Direction::Reply, limits(Direction::Reply));
        let replies = b"+OK\r\n$3\r\nabc\r\n$-1\r\n:12\r\n-ERR x\r\n*1\r\n:1\r\n";
        assert_eq!(sc.peek_scalar_replies(replies, 9), (replies.len() - 8, 5));
        assert_eq!(sc.peek_scalar_replies(replies, 2), (14, 2));
        assert_eq!(sc.peek_scalar_replies(b">2\r\n", 9), (0, 0));
        assert_eq!(sc.peek_scalar_replies(b"$3\r\nab", 9), (0, 0));
        // A wrong trailer is the general path's to report.
        let sc = Scanner::new(Direction::Request, limits(Direction::Request));
        assert_eq!(sc.peek_request_run(b"*1\r\n$3\r\nGETxx", |_| true), (0, 0));
        let sc = Scanner::new(Direction::Reply, limits(Direction::Reply));
        assert_eq!(sc.peek_scalar_replies(b"$3\r\nabcXY+OK\r\n", 9), (0, 0));
        assert_eq!(sc.peek_scalar_replies(b"+OK\n", 9), (0, 0));
        // Runs of the same short reply, broken by near misses (a longer line, a bulk, a line
        // that differs only in an extra `\r`, which RESP2 scanners accept as content) and by the
        // end of what is buffered.
        let run = b"+OK\r\n+OK\r\n+OKK\r\n+OK\r\n:1\r\n:1\r\n$3\r\nabc\r\n:1\r\n+OK\r\n+OK\r\n";
        assert_eq!(sc.peek_scalar_replies(run, 99), (run.len(), 10));
        assert_eq!(sc.peek_scalar_replies(run, 2), (10, 2));
        assert_eq!(
            sc.peek_scalar_replies(&run[..run.len() - 1], 99),
            (run.len() - 5, 9)
        );
        let near = b"+OK\r\n+OK\r\r\n+OK\r\n";
        assert_eq!(sc.peek_scalar_replies(near, 99), (near.len(), 3));
        assert_eq!(ends(Direction::Reply, near), [5, 11, 16]);
        // Never in the middle of a frame.
        let mut sc = Scanner::new(Direction::Reply, limits(Direction::Reply));
        sc.scan(b"$5\r\nab").unwrap();
        assert_eq!(sc.peek_scalar_replies(b"c\r\n+OK\r\n", 9), (0, 0));
    }

    /// Every one-byte change to the usual small frames (a header's CR or LF, a digit, a type
    /// byte, a payload byte) leaves the fast lanes agreeing with the general scanner: they read
    /// several bytes per test, so a mask one byte short would let a broken frame through.
    #[test]
    fn fast_lanes_agree_after_any_one_byte_change() {
        let requests: [&[u8]; 3] = [
            b"*2\r\n$3\r\nGET\r\n$16\r\nkey:__rand_int__\r\n",
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nabc\r\n",
            b"*1\r\n$4\r\nPING\r\n",
        ];
        let replies: [&[u8]; 4] = [
            b"$3\r\nabc\r\n",
            b"$16\r\n0123456789abcdef\r\n",
            b"+OK\r\n",
            b":12\r\n",
        ];
        let cases = requests
            .iter()
            .map(|f| (Direction::Request, f))
            .chain(replies.iter().map(|f| (Direction::Reply, f)));
        for (dir, frame) in cases {
            // Twice, so a broken first frame is followed by a good one.
            let twice = [*frame, *frame].concat();
            for i in 0..frame.len() {
                for byte in 0..=255u8 {
                    let mut input = twice.clone();
                    input[i] = byte;
                    walk_with_fast_lanes(dir, limits(dir), &input, 4);
                }
            }
        }
    }

    /// The word-at-a-time lane reads the usual shapes itself, up to its bounds, and hands on
    /// where it stopped. (The lanes answer the same either way, so the agreement tests above
    /// cannot tell a lane that gave up for nothing: this one can.)
    #[test]
    fn small_request_reads_the_usual_shapes() {
        let arg =
            |len: usize| [format!("${len}\r\n").as_bytes(), &b"v".repeat(len), b"\r\n"].concat();
        let request = |name: &[u8], lens: &[usize]| {
            let mut r = [
                format!("*{}\r\n${}\r\n", lens.len() + 1, name.len()).as_bytes(),
                name,
                b"\r\n",
            ]
            .concat();
            for &len in lens {
                r.extend(arg(len));
            }
            r
        };
        let at = 5; // not at the start of the buffer
        let within = |r: &[u8]| [&b"junk\n"[..], r, b"*1\r\n"].concat();
        let general = Scanner::new(Direction::Request, limits(Direction::Request));
        let usual = [
            request(b"GET", &[16]),
            request(b"SET", &[16, 3]),
            request(b"PING", &[]),
            request(b"SET", &[0, 9, 10, 99]),
            request(b"ZRANGEBYS", &[1; 8]),
        ];
        for r in &usual {
            let name = &r[8..8 + usize::from(r[5] - b'0')];
            let expected = SmallRequest::Whole(name, at + r.len());
            assert_eq!(small_request(&within(r), at), expected, "{r:?}");
            assert_eq!(general_end(&general, r, 1), Some(r.len()));
        }
        // A long argument: read up to its header, the rest left to `lane_request_rest`.
        let set = request(b"SET", &[16, 100, 5]);
        let started = SmallRequest::Started {
            name: at + 8..at + 11,
            end: at + 34,
            left: 2,
        };
        assert_eq!(small_request(&within(&set), at), started);
        assert_eq!(&set[34..40], b"\r\n$100");
        let lanes = general.peek_request_run(&within(&set)[at..], |name| name == b"SET");
        assert_eq!(lanes, (set.len(), 1));
        // Not the usual start.
        let other = [
            request(b"SET", &[1; 9]),
            request(b"CLUSTERXYZ", &[1]),
            request(b"GET", &[])[2..].to_vec(),
        ];
        for r in &other {
            assert_eq!(small_request(r, 0), SmallRequest::Other, "{r:?}");
        }
        // Not all there yet. Once the start is read (eight bytes), a header not yet whole is
        // `lane_request_rest`'s (the word after the name ends at 19); a last payload not whole
        // is nobody's.
        let get = request(b"GET", &[16]);
        for cut in 0..get.len() {
            let found = small_request(&get[..cut], 0);
            if (8..19).contains(&cut) {
                assert!(
                    matches!(found, SmallRequest::Started { left: 1, .. }),
                    "{cut}"
                );
            } else {
                assert_eq!(found, SmallRequest::Other, "{cut}");
            }
        }
    }

    /// The lanes read a header's digits out of a word: a byte that is not a digit must stop them
    /// wherever it sits, even when the rest of the input would parse had it been taken for one
    /// (the payload here is as long as such a misreading would make it).
    #[test]
    fn fast_lanes_refuse_a_non_digit_in_a_short_header() {
        let requests = Scanner::new(Direction::Request, limits(Direction::Request));
        let replies = Scanner::new(Direction::Reply, limits(Direction::Reply));
        for b in (0..=255u8).filter(|b| !b.is_ascii_digit()) {
            let misread = usize::from(b ^ b'0');
            let bulk = |len: usize| [&b"a".repeat(len)[..], b"\r\n"].concat();
            // A bulk string whose one- or two-digit length has `b` in one of its digits: a reply
            // as it stands, a request's second argument after `*2\r\n$3\r\nGET\r\n`.
            let bulks = [
                [&b"$"[..], &[b], b"\r\n", &bulk(misread)].concat(),
                [
                    &b"$"[..],
                    &[b, b'5'],
                    b"\r\n",
                    &bulk((misread * 10 + 5) % 256),
                ]
                .concat(),
                [&b"$1"[..], &[b], b"\r\n", &bulk(10 + misread)].concat(),
            ];
            let mut cases: Vec<(Direction, Vec<u8>)> = vec![
                // The argument count, then that many one-byte arguments.
                (
                    Direction::Request,
                    [&[b'*', b][..], b"\r\n", &b"$1\r\nA\r\n".repeat(misread)].concat(),
                ),
                // The first argument's length (read with the count).
                (
                    Direction::Request,
                    [&b"*1\r\n$"[..], &[b], b"\r\n", &bulk(misread)].concat(),
                ),
            ];
            for reply in bulks {
                cases.push((
                    Direction::Request,
                    [&b"*2\r\n$3\r\nGET\r\n"[..], &reply].concat(),
                ));
                cases.push((Direction::Reply, reply));
            }
            for (dir, input) in cases {
                let shown = String::from_utf8_lossy(&input).into_owned();
                let (out, _) = run(dir, limits(dir), &input, &[]);
                assert!(out.error.is_some(), "{shown:?} should be refused");
                let offered = match dir {
                    Direction::Request => requests.peek_request_run(&input, |_| true),
                    Direction::Reply => replies.peek_scalar_replies(&input, 9),
                };
                assert_eq!(offered, (0, 0), "{shown:?}");
            }
        }
    }

    /// The lanes read one- and two-digit headers a word at a time without checking them against
    /// the limits, which is only right when every such header fits: check the edge both ways.
    #[test]
    fn fast_lanes_respect_limits_at_the_two_digit_edge() {
        let arg = [b'a'; 99];
        let request = [&b"*1\r\n$99\r\n"[..], &arg, b"\r\n"].concat();
        let reply = [&b"$99\r\n"[..], &arg, b"\r\n"].concat();
        let edge = |bulk: u64, line: usize| ScanLimits {
            max_depth: 1,
            max_bulk_len: bulk,
            max_elements: 99,
            max_line_len: line,
        };
        let sc = Scanner::new(Direction::Request, edge(99, 4));
        assert_eq!(sc.peek_request_run(&request, |_| true), (request.len(), 1));
        let sc = Scanner::new(Direction::Reply, edge(99, 4));
        assert_eq!(sc.peek_scalar_replies(&reply, 1), (reply.len(), 1));
        for (bulk, line) in [(98, 4), (99, 3)] {
            let sc = Scanner::new(Direction::Request, edge(bulk, line));
            assert_eq!(sc.peek_request_run(&request, |_| true), (0, 0));
            assert!(
                run(Direction::Request, edge(bulk, line), &request, &[])
                    .1
                    .error
                    .is_some()
            );
            let sc = Scanner::new(Direction::Reply, edge(bulk, line));
            assert_eq!(sc.peek_scalar_replies(&reply, 1), (0, 0));
        }
    }

    #[test]
    fn fast_lanes_respect_the_line_cap_on_short_lines() {
        // Lines of every length around the eight-byte shortcut, under every small cap: the lane
        // takes exactly the lines the scanner accepts.
        for cap in 1..=10 {
            let lim = ScanLimits {
                max_depth: 1,
                max_bulk_len: 99,
                max_elements: 99,
                max_line_len: cap,
            };
            for content in 0..=9 {
                let line = [&b"+"[..], &b"x".repeat(content), b"\r\n"].concat();
                let padded = [&line[..], b"+OK\r\n"].concat();
                let (outcome, _) = run(Direction::Reply, lim, &line, &[]);
                let accepted = outcome.error.is_none();
                let sc = Scanner::new(Direction::Reply, lim);
                for buf in [&line, &padded] {
                    let expected = if accepted { (line.len(), 1) } else { (0, 0) };
                    assert_eq!(
                        sc.peek_scalar_replies(buf, 1),
                        expected,
                        "cap {cap}, {content} bytes of content, {} bytes buffered",
                        buf.len()
                    );
                }
            }
        }
    }

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn resp2_replies_match_redis_protocol(
            frames in prop::collection::vec(oracle::frame2(), 1..6),
            idx in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let input: Vec<u8> = frames.iter().flat_map(oracle::encode2).collect();
            let expected = oracle::ends2(&input);
            prop_assert_eq!(expected.len(), frames.len());
            assert_frames(Direction::Reply, &input, &cuts_for(input.len(), &idx), &expected);
        }

        #[test]
        fn resp3_replies_match_redis_protocol(
            frames in prop::collection::vec(
                prop_oneof![4 => oracle::frame3().prop_map(|f| oracle::encode3(&f)), 1 => oracle::streamed3()],
                1..6,
            ),
            idx in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let input: Vec<u8> = frames.concat();
            let expected = oracle::ends3(&input);
            prop_assert_eq!(expected.len(), frames.len());
            assert_frames(Direction::Reply, &input, &cuts_for(input.len(), &idx), &expected);
        }

        #[test]
        fn requests_match_redis_protocol(
            reqs in prop::collection::vec(oracle::request(), 1..8),
            idx in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let input: Vec<u8> = reqs.iter().flat_map(|(b, _)| b.clone()).collect();
            let mut expected = Vec::new();
            let mut pos = 0;
            for (bytes, multibulk) in &reqs {
                if *multibulk {
                    let (_, n) = redis_protocol::resp2::decode::decode_range(&input[pos..])
                        .unwrap()
                        .unwrap();
                    prop_assert_eq!(n, bytes.len());
                }
                pos += bytes.len();
                expected.push(pos);
            }
            assert_frames(Direction::Request, &input, &cuts_for(input.len(), &idx), &expected);
        }

        #[test]
        fn fast_lanes_agree_with_the_general_scanner(
            reqs in prop::collection::vec(oracle::request(), 1..8),
            replies in prop::collection::vec(
                prop_oneof![
                    oracle::frame2().prop_map(|f| oracle::encode2(&f)),
                    oracle::frame3().prop_map(|f| oracle::encode3(&f)),
                    oracle::streamed3(),
                ],
                1..8,
            ),
            cut in any::<prop::sample::Index>(),
            max in 1u64..5,
        ) {
            for (dir, input) in [
                (Direction::Request, reqs.iter().flat_map(|(b, _)| b.clone()).collect::<Vec<u8>>()),
                (Direction::Reply, replies.concat()),
            ] {
                let input = &input[..cut.index(input.len() + 1)];
                let (_, general) = run(dir, limits(dir), input, &[]);
                let scanned = walk_with_fast_lanes(dir, limits(dir), input, max);
                prop_assert_eq!(scanned, general.bytes_scanned());
            }
        }

        #[test]
        fn fast_lanes_agree_on_corrupted_input(
            reqs in prop::collection::vec(oracle::request(), 1..6),
            replies in prop::collection::vec(oracle::frame2().prop_map(|f| oracle::encode2(&f)), 1..6),
            at in any::<prop::sample::Index>(),
            byte in prop::sample::select(b"*$+-:\r\n0123456789xX".to_vec()),
            max in 1u64..5,
        ) {
            for (dir, mut input) in [
                (Direction::Request, reqs.iter().flat_map(|(b, _)| b.clone()).collect::<Vec<u8>>()),
                (Direction::Reply, replies.concat()),
            ] {
                let i = at.index(input.len());
                input[i] = byte;
                walk_with_fast_lanes(dir, limits(dir), &input, max);
            }
        }

        #[test]
        fn fast_lanes_never_take_what_the_scanner_refuses(
            input in prop::collection::vec(
                prop_oneof![
                    3 => prop::sample::select(b"*$+-:_#,(!=%~>|;.?\r\n\r\n0123456789-".to_vec()),
                    1 => any::<u8>(),
                ],
                0..64,
            ),
            reply in any::<bool>(),
            tight in 0u8..3,
            max in 1u64..5,
        ) {
            let dir = if reply { Direction::Reply } else { Direction::Request };
            let lim = match tight {
                0 => limits(dir),
                1 => ScanLimits { max_depth: 3, max_bulk_len: 8, max_elements: 4, max_line_len: 4 },
                // Just inside the lanes' two-digit shortcut.
                _ => ScanLimits { max_depth: 3, max_bulk_len: 99, max_elements: 99, max_line_len: 4 },
            };
            walk_with_fast_lanes(dir, lim, &input, max);
        }

        #[test]
        fn garbage_never_panics_and_splits_agree(
            input in prop::collection::vec(
                prop_oneof![
                    3 => prop::sample::select(b"*$+-:_#,(!=%~>|;.?\r\n\r\n0123456789-".to_vec()),
                    1 => any::<u8>(),
                ],
                0..64,
            ),
            idx in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
            reply in any::<bool>(),
            tight in any::<bool>(),
        ) {
            let dir = if reply { Direction::Reply } else { Direction::Request };
            let lim = if tight {
                ScanLimits { max_depth: 3, max_bulk_len: 8, max_elements: 4, max_line_len: 8 }
            } else {
                limits(dir)
            };
            let (whole, sc) = run(dir, lim, &input, &[]);
            prop_assert!(whole.ends.iter().all(|&e| e <= input.len()));
            prop_assert!(sc.bytes_scanned() <= input.len() as u64);
            let (split, _) = run(dir, lim, &input, &cuts_for(input.len(), &idx));
            prop_assert_eq!(&split, &whole);
            let (bytewise, _) = run(dir, lim, &input, &byte_cuts(input.len()));
            prop_assert_eq!(&bytewise, &whole);
        }
    }
}
