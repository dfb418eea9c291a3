//! The little the proxy reads inside replies: whether a reply is an error, and the kind of a push
//! (or of a RESP2 pub/sub array), so it can tell a confirmation of its subscribe from a published
//! message, and drop maintenance pushes that would point clients past the proxy.

use std::ops::Range;

use super::command::Peek;
use super::scanner::{Direction, ScanLimits, Scanner};

/// Longest first element the proxy inspects; every kind it cares about is shorter.
pub(crate) const MAX_KIND_LEN: usize = 32;

/// Whether a reply starting with this byte is an error (`-` simple error, `!` bulk error).
pub fn is_error(first_byte: u8) -> bool {
    first_byte == b'-' || first_byte == b'!'
}

/// What a push (RESP3 `>`), or an array on a RESP2 subscribed connection, is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushKind {
    /// A (un)subscribe confirmation: `subscribe`, `psubscribe`, `ssubscribe`, `unsubscribe`, ...
    Confirmation(SubKind),
    /// A published message: `message`, `pmessage`, `smessage`.
    Message,
    /// A client-side-caching invalidation.
    Invalidate,
    /// A maintenance notification (MOVING, MIGRATING, ...): never relayed, it would send clients
    /// straight to the upstream endpoint.
    Maintenance,
    /// Anything else (e.g. `pong` on a RESP2 subscribed connection).
    Other,
}

/// Which of the three subscription sets a confirmation is about, and in which direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubKind {
    pub class: SubClass,
    pub subscribe: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubClass {
    Channel,
    Pattern,
    Shard,
}

/// Classifies the first element of a push or array.
pub fn push_kind(first: &[u8]) -> PushKind {
    let mut upper = [0u8; MAX_KIND_LEN];
    if first.len() > MAX_KIND_LEN {
        return PushKind::Other;
    }
    let upper = &mut upper[..first.len()];
    upper.copy_from_slice(first);
    upper.make_ascii_uppercase();
    let conf = |class, subscribe| PushKind::Confirmation(SubKind { class, subscribe });
    match &*upper {
        b"SUBSCRIBE" => conf(SubClass::Channel, true),
        b"PSUBSCRIBE" => conf(SubClass::Pattern, true),
        b"SSUBSCRIBE" => conf(SubClass::Shard, true),
        b"UNSUBSCRIBE" => conf(SubClass::Channel, false),
        b"PUNSUBSCRIBE" => conf(SubClass::Pattern, false),
        b"SUNSUBSCRIBE" => conf(SubClass::Shard, false),
        b"MESSAGE" | b"PMESSAGE" | b"SMESSAGE" => PushKind::Message,
        b"INVALIDATE" => PushKind::Invalidate,
        b"MOVING" | b"MIGRATING" | b"MIGRATED" | b"FAILING_OVER" | b"FAILED_OVER" => {
            PushKind::Maintenance
        }
        _ => PushKind::Other,
    }
}

/// Whether the push starting `frame` (its `>n` header included) is a message or an
/// invalidation, traffic rather than a reply; None while its first element is incomplete.
pub fn push_is_message(frame: &[u8]) -> Option<bool> {
    match peek_first_element(frame) {
        Peek::Incomplete => None,
        Peek::Ready(Some(kind)) => Some(matches!(
            push_kind(&frame[kind]),
            PushKind::Message | PushKind::Invalidate
        )),
        Peek::Ready(None) | Peek::Malformed => Some(false),
    }
}

/// Reads the first element of an aggregate (`>n` or `*n`) at the start of `buf`, if it is a short
/// bulk or simple string. `Ready(None)` means the frame has no such element (empty, null, or a
/// first element of another type or too long to be a kind).
pub fn peek_first_element(buf: &[u8]) -> Peek<Option<Range<usize>>> {
    let Some((count, pos)) = line_int(buf, 0) else {
        return short_line_or_malformed(buf, 0);
    };
    if count <= 0 {
        return Peek::Ready(None);
    }
    match buf.get(pos) {
        None => Peek::Incomplete,
        Some(b'$') => {
            let Some((len, start)) = line_int(buf, pos) else {
                return short_line_or_malformed(buf, pos);
            };
            if len < 0 || len as usize > MAX_KIND_LEN {
                return Peek::Ready(None);
            }
            let end = start + len as usize;
            if buf.len() < end + 2 {
                return Peek::Incomplete;
            }
            Peek::Ready(Some(start..end))
        }
        Some(b'+') => match buf[pos..]
            .iter()
            .take(MAX_KIND_LEN + 2)
            .position(|&b| b == b'\r')
        {
            Some(cr) => Peek::Ready(Some(pos + 1..pos + cr)),
            None if buf.len() - pos < MAX_KIND_LEN + 2 => Peek::Incomplete,
            None => Peek::Ready(None),
        },
        Some(_) => Peek::Ready(None),
    }
}

fn short_line_or_malformed<T>(buf: &[u8], pos: usize) -> Peek<T> {
    if buf.len().saturating_sub(pos) < 24 && !buf[pos..].contains(&b'\n') {
        Peek::Incomplete
    } else {
        Peek::Malformed
    }
}

/// Parses `<any type byte><i64>\r\n` at `pos`.
fn line_int(buf: &[u8], pos: usize) -> Option<(i64, usize)> {
    super::header_number(buf, pos)
}

/// The subscription count carried by a complete (un)subscribe confirmation: the last element,
/// an integer, `[kind, channel-or-null, count]`.
pub fn confirmation_count(frame: &[u8]) -> Option<i64> {
    let body = frame.strip_suffix(b"\r\n")?;
    let colon = memchr::memrchr(b':', body)?;
    if colon == 0 || frame[colon - 1] != b'\n' {
        return None;
    }
    std::str::from_utf8(&body[colon + 1..]).ok()?.parse().ok()
}

/// Whether a complete simple-string reply is a MONITOR line (`+<unix time>.<micros> [db addr] ...`)
/// rather than an answer to a command.
pub fn is_monitor_line(frame: &[u8]) -> bool {
    let Some(rest) = frame.strip_prefix(b"+") else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && rest.get(digits) == Some(&b'.') && {
        let frac = rest[digits + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        frac > 0 && rest[digits + 1 + frac..].starts_with(b" [")
    }
}

/// Which commands of a transaction failed, read off EXEC's array as its bytes pass through
/// (they are relayed as they come; a 200 MB element is not held).
///
/// EXEC answers a command that failed when it ran with an error element (`SELECT 99`, a
/// `CLIENT SETNAME` with a space, an `SSUBSCRIBE` Redis 7.0 refuses inside MULTI), and the
/// proxy must not apply what that command would have changed: replayed after a move, a
/// `SELECT 99` the server refused put the session on db 0.
#[derive(Debug)]
pub struct ExecOutcomes {
    /// Scans one element at a time: each element of the array is a frame of its own.
    elements: Scanner,
    /// Bytes passed in but not consumed yet (a partial line; payloads are consumed as they come).
    pending: Vec<u8>,
    header_seen: bool,
    /// The element being scanned has been classified.
    started: bool,
    /// Per element, in order: whether it is an error.
    failed: Vec<bool>,
    /// Not an array, or malformed: the outcome is unknown.
    lost: bool,
}

impl Default for ExecOutcomes {
    fn default() -> Self {
        ExecOutcomes {
            elements: Scanner::new(Direction::Reply, ScanLimits::reply_defaults()),
            pending: Vec::new(),
            header_seen: false,
            started: false,
            failed: Vec::new(),
            lost: false,
        }
    }
}

impl ExecOutcomes {
    /// Follows `bytes`, the next bytes of the EXEC reply (exactly those its scanner consumed).
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.lost {
            return;
        }
        self.pending.extend_from_slice(bytes);
        let mut at = 0;
        while at < self.pending.len() {
            let rest = &self.pending[at..];
            if !self.header_seen {
                // `*<n>\r\n`: anything else (`*-1`, `_`, an error) means nothing ran.
                if rest[0] != b'*' || rest.get(1) == Some(&b'-') {
                    self.lost = true;
                    return;
                }
                let Some(nl) = memchr::memchr(b'\n', rest) else {
                    break;
                };
                self.header_seen = true;
                at += nl + 1;
                continue;
            }
            if !self.started {
                if rest[0] == b'>' {
                    // A message written into the middle of the array is not an element.
                    match push_is_message(rest) {
                        None => break,
                        Some(true) => {}
                        Some(false) => self.failed.push(false),
                    }
                } else {
                    self.failed.push(is_error(rest[0]));
                }
                self.started = true;
            }
            match self.elements.scan(rest) {
                Ok(progress) => {
                    at += progress.consumed;
                    if progress.complete {
                        self.started = false;
                    } else if progress.consumed == 0 {
                        break;
                    }
                }
                Err(_) => {
                    self.lost = true;
                    return;
                }
            }
        }
        self.pending.drain(..at);
    }

    /// Per element of the array, whether it is an error; None when that could not be told.
    pub fn failed(self) -> Option<Vec<bool>> {
        (!self.lost && self.header_seen).then_some(self.failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(push_kind(b"message"), PushKind::Message);
        assert_eq!(
            push_kind(b"sunsubscribe"),
            PushKind::Confirmation(SubKind {
                class: SubClass::Shard,
                subscribe: false
            })
        );
        assert_eq!(push_kind(b"MOVING"), PushKind::Maintenance);
        assert_eq!(push_kind(b"pong"), PushKind::Other);
    }

    #[test]
    fn first_element() {
        let f = b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n";
        let Peek::Ready(Some(r)) = peek_first_element(f) else {
            panic!()
        };
        assert_eq!(&f[r], b"subscribe");
        assert_eq!(peek_first_element(b">3\r\n$9\r\nsubsc"), Peek::Incomplete);
        assert_eq!(peek_first_element(b"*2\r\n:1\r\n:2\r\n"), Peek::Ready(None));
        assert_eq!(peek_first_element(b"*-1\r\n"), Peek::Ready(None));
        assert_eq!(confirmation_count(f), Some(1));
        assert_eq!(
            confirmation_count(b">3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n"),
            Some(0)
        );
    }

    #[test]
    fn monitor_lines() {
        assert!(is_monitor_line(
            b"+1700000000.123456 [0 127.0.0.1:5000] \"get\" \"k\"\r\n"
        ));
        assert!(!is_monitor_line(b"+OK\r\n"));
    }

    #[test]
    fn exec_outcomes_tell_which_commands_failed_whatever_the_pieces() {
        // SELECT 99 (error), GET (a 20-byte bulk), a message written in between, an empty
        // array, a blob error, HELLO's map.
        let reply: &[u8] = b"*5\r\n-ERR DB index is out of range\r\n$20\r\nabcdefghijklmnopqrst\r\n>3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n*0\r\n!3\r\nbad\r\n%1\r\n+k\r\n:1\r\n";
        let expected = vec![true, false, false, true, false];
        for piece in [reply.len(), 1, 2, 3, 7] {
            let mut exec = ExecOutcomes::default();
            for chunk in reply.chunks(piece) {
                exec.feed(chunk);
            }
            assert_eq!(exec.failed(), Some(expected.clone()), "pieces of {piece}");
        }
        // A transaction that did not run tells nothing.
        for reply in [&b"*-1\r\n"[..], b"_\r\n", b"-EXECABORT x\r\n"] {
            let mut exec = ExecOutcomes::default();
            exec.feed(reply);
            assert_eq!(exec.failed(), None);
        }
    }
}
