//! The little the proxy reads inside replies: whether a reply is an error, and the kind of a push
//! (or of a RESP2 pub/sub array), so it can tell a confirmation of its subscribe from a published
//! message, and drop maintenance pushes that would point clients past the proxy.

use std::ops::Range;

use super::command::Peek;

/// Longest first element the proxy inspects; every kind it cares about is shorter.
const MAX_KIND_LEN: usize = 32;

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
}
