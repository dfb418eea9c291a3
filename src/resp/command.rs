//! The few things the proxy must read from a command: its name (to classify it), and for the rare
//! commands it tracks or answers itself, its arguments. Also encodes the commands the proxy sends
//! on its own (AUTH, replayed SELECT, ...).
//!
//! Everything here is off the hot path except [`peek_head`] and [`classify`], which run once per
//! request and look at a few bytes only.

use std::ops::Range;

/// Command names longer than this are never special, so they are not even uppercased.
const MAX_SPECIAL_NAME: usize = 16;

/// The start of a multibulk request, read without consuming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// `*0` or `*-1`: a request Redis ignores without a reply.
    Empty,
    /// The argument count, and where the command name lies in the buffer (None when the name is
    /// too long to be one the proxy cares about).
    Command {
        argc: i64,
        name: Option<Range<usize>>,
    },
}

/// Outcome of looking at the start of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek<T> {
    Ready(T),
    /// More bytes are needed.
    Incomplete,
    /// Not a well-formed multibulk head: the scanner will report the precise protocol error.
    Malformed,
}

/// Reads `*<argc>\r\n$<len>\r\n<name>\r\n` at the start of `buf`.
pub fn peek_head(buf: &[u8]) -> Peek<Head> {
    let Some((argc, mut pos)) = header_int(buf, 0, b'*') else {
        return incomplete_or_malformed(buf, 0);
    };
    if argc <= 0 {
        return Peek::Ready(Head::Empty);
    }
    let Some((len, after)) = header_int(buf, pos, b'$') else {
        return incomplete_or_malformed(buf, pos);
    };
    if len < 0 {
        return Peek::Malformed;
    }
    pos = after;
    let len = len as usize;
    if len > MAX_SPECIAL_NAME {
        return Peek::Ready(Head::Command { argc, name: None });
    }
    if buf.len() < pos + len + 2 {
        return Peek::Incomplete;
    }
    Peek::Ready(Head::Command {
        argc,
        name: Some(pos..pos + len),
    })
}

fn incomplete_or_malformed<T>(buf: &[u8], pos: usize) -> Peek<T> {
    // A header line is short; if no CRLF shows up within a generous window it is garbage.
    if buf.len().saturating_sub(pos) < 24 && !buf[pos..].contains(&b'\n') {
        Peek::Incomplete
    } else {
        Peek::Malformed
    }
}

/// Parses `<type><i64>\r\n` at `pos`; returns the number and the offset after the CRLF.
fn header_int(buf: &[u8], pos: usize, ty: u8) -> Option<(i64, usize)> {
    if *buf.get(pos)? != ty {
        return None;
    }
    super::header_number(buf, pos)
}

/// Commands the proxy answers, rewrites, or tracks. Everything else is [`Kind::Other`] and passes
/// through untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Other,
    Auth,
    Hello,
    Quit,
    Reset,
    Select,
    Client,
    Multi,
    Exec,
    Discard,
    Watch,
    Unwatch,
    Subscribe,
    Psubscribe,
    Ssubscribe,
    Unsubscribe,
    Punsubscribe,
    Sunsubscribe,
    Monitor,
    Readonly,
    Readwrite,
    /// Always blocks until served or timed out (BLPOP, WAIT, ...).
    Blocking,
    /// Blocks only with a BLOCK option (XREAD, XREADGROUP): needs its arguments.
    MaybeBlocking,
    /// `POST` or `Host:`: a line of an HTTP request, not a command. Redis closes a connection
    /// that sends one (its defence against cross-protocol scripting), and so does the proxy.
    HttpRequest,
}

impl Kind {
    /// Whether Redis takes a request of this kind with `argc` arguments (its name included).
    /// Judged for the kinds whose effect on the connection the proxy follows as it forwards
    /// them (opening a transaction, arming a WATCH, resetting): Redis refuses a wrong count
    /// before anything else, so such a request changes nothing. AUTH, HELLO and CLIENT are
    /// judged where they are handled; the rest Redis judges alone. (Each count is checked
    /// against the server's `COMMAND INFO` in tests/proxy_core.rs.)
    pub fn argument_count_fits(self, argc: usize) -> bool {
        match self {
            Kind::Multi
            | Kind::Exec
            | Kind::Discard
            | Kind::Unwatch
            | Kind::Reset
            | Kind::Monitor
            | Kind::Readonly
            | Kind::Readwrite => argc == 1,
            Kind::Select => argc == 2,
            Kind::Watch | Kind::Subscribe | Kind::Psubscribe | Kind::Ssubscribe => argc >= 2,
            _ => true,
        }
    }

    /// Whether the proxy needs the whole request in memory (to read arguments or answer it) before
    /// deciding what to send upstream. False for commands it only counts.
    pub fn needs_arguments(self) -> bool {
        !matches!(
            self,
            Kind::Other
                | Kind::Blocking
                | Kind::Multi
                | Kind::Exec
                | Kind::Discard
                | Kind::Watch
                | Kind::Unwatch
                | Kind::Monitor
                | Kind::Readonly
                | Kind::Readwrite
                | Kind::HttpRequest
        )
    }
}

/// Classifies a command name (any case). Runs once per request: the name's length picks the few
/// candidates to compare (GET, SET and every other 3-letter name are settled by the length alone).
pub fn classify(name: &[u8]) -> Kind {
    use Kind::*;
    let candidates: &[(&[u8], Kind)] = match name.len() {
        4 => &[
            (b"AUTH", Auth),
            (b"QUIT", Quit),
            (b"EXEC", Exec),
            (b"WAIT", Blocking),
            (b"POST", HttpRequest),
        ],
        5 => &[
            (b"HELLO", Hello),
            (b"RESET", Reset),
            (b"MULTI", Multi),
            (b"WATCH", Watch),
            (b"BLPOP", Blocking),
            (b"BRPOP", Blocking),
            (b"XREAD", MaybeBlocking),
            (b"HOST:", HttpRequest),
        ],
        6 => &[
            (b"SELECT", Select),
            (b"CLIENT", Client),
            (b"BLMOVE", Blocking),
            (b"BLMPOP", Blocking),
            (b"BZMPOP", Blocking),
        ],
        7 => &[
            (b"DISCARD", Discard),
            (b"UNWATCH", Unwatch),
            (b"MONITOR", Monitor),
            (b"WAITAOF", Blocking),
        ],
        8 => &[
            (b"READONLY", Readonly),
            (b"BZPOPMIN", Blocking),
            (b"BZPOPMAX", Blocking),
        ],
        9 => &[(b"SUBSCRIBE", Subscribe), (b"READWRITE", Readwrite)],
        10 => &[
            (b"PSUBSCRIBE", Psubscribe),
            (b"SSUBSCRIBE", Ssubscribe),
            (b"BRPOPLPUSH", Blocking),
            (b"XREADGROUP", MaybeBlocking),
        ],
        11 => &[(b"UNSUBSCRIBE", Unsubscribe)],
        12 => &[
            (b"PUNSUBSCRIBE", Punsubscribe),
            (b"SUNSUBSCRIBE", Sunsubscribe),
        ],
        _ => return Other,
    };
    // Names are ASCII: comparing the first byte first rules out almost every candidate cheaply.
    let first = name[0].to_ascii_uppercase();
    candidates
        .iter()
        .find(|(n, _)| n[0] == first && name.eq_ignore_ascii_case(n))
        .map_or(Other, |&(_, kind)| kind)
}

/// Splits a complete multibulk request (already validated by the scanner) into its arguments.
pub fn multibulk_args(frame: &[u8]) -> Vec<&[u8]> {
    let Some((argc, mut pos)) = header_int(frame, 0, b'*') else {
        return Vec::new();
    };
    let mut args = Vec::with_capacity(argc.max(0) as usize);
    for _ in 0..argc.max(0) {
        let Some((len, after)) = header_int(frame, pos, b'$') else {
            break;
        };
        let end = after + len.max(0) as usize;
        let Some(arg) = frame.get(after..end) else {
            break;
        };
        args.push(arg);
        pos = end + 2;
    }
    args
}

/// Why an inline command could not be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unbalanced quotes in request")]
pub struct UnbalancedQuotes;

/// Splits an inline command line the way Redis does (`sdssplitargs`): whitespace separates
/// arguments; "double quotes" understand `\n \r \t \b \a \\ \" \xHH`; 'single quotes' understand
/// `\'`; a closing quote must be followed by whitespace or the end.
pub fn inline_args(line: &[u8]) -> Result<Vec<Vec<u8>>, UnbalancedQuotes> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut args = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= n {
            return Ok(args);
        }
        let mut cur = Vec::new();
        let mut in_double = false;
        let mut in_single = false;
        loop {
            if in_double {
                if i >= n {
                    return Err(UnbalancedQuotes);
                }
                let c = line[i];
                if c == b'\\'
                    && i + 3 < n
                    && line[i + 1] == b'x'
                    && line[i + 2].is_ascii_hexdigit()
                    && line[i + 3].is_ascii_hexdigit()
                {
                    let hex = std::str::from_utf8(&line[i + 2..i + 4]).expect("hex digits");
                    cur.push(u8::from_str_radix(hex, 16).expect("hex digits"));
                    i += 3;
                } else if c == b'\\' && i + 1 < n {
                    i += 1;
                    cur.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        other => other,
                    });
                } else if c == b'"' {
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return Err(UnbalancedQuotes);
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else if in_single {
                if i >= n {
                    return Err(UnbalancedQuotes);
                }
                let c = line[i];
                if c == b'\\' && i + 1 < n && line[i + 1] == b'\'' {
                    i += 1;
                    cur.push(b'\'');
                } else if c == b'\'' {
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return Err(UnbalancedQuotes);
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else {
                if i >= n {
                    break;
                }
                match line[i] {
                    c if c.is_ascii_whitespace() => break,
                    b'"' => in_double = true,
                    b'\'' => in_single = true,
                    c => cur.push(c),
                }
            }
            i += 1;
        }
        args.push(cur);
    }
}

/// Encodes a command as a multibulk request.
pub fn encode<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for arg in args {
        let arg = arg.as_ref();
        out.push(b'$');
        out.extend_from_slice(arg.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Case-insensitive comparison of an argument with an ASCII keyword.
pub fn is(arg: &[u8], keyword: &str) -> bool {
    arg.eq_ignore_ascii_case(keyword.as_bytes())
}

/// Parses a decimal argument.
pub fn parse_i64(arg: &[u8]) -> Option<i64> {
    std::str::from_utf8(arg).ok()?.parse().ok()
}

/// An integer argument as Redis reads one (its `string2ll`): an optional `-`, then digits with
/// no leading zero; no `+`, no spaces, and `0` alone (`-0` and `007` are not integers).
pub fn parse_redis_int(arg: &[u8]) -> Option<i64> {
    let digits = arg.strip_prefix(b"-").unwrap_or(arg);
    let canonical = match digits {
        [b'0'] => arg.len() == 1,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    if canonical { parse_i64(arg) } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_as_redis_reads_them() {
        assert_eq!(parse_redis_int(b"0"), Some(0));
        assert_eq!(parse_redis_int(b"3"), Some(3));
        assert_eq!(parse_redis_int(b"-12"), Some(-12));
        assert_eq!(parse_redis_int(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"-0",
            b"03",
            b"+3",
            b" 3",
            b"3 ",
            b"3x",
            b"9223372036854775808",
        ] {
            assert_eq!(parse_redis_int(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn head_of_a_command() {
        let buf = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n";
        let Peek::Ready(Head::Command { argc, name }) = peek_head(buf) else {
            panic!()
        };
        assert_eq!(argc, 3);
        assert_eq!(&buf[name.unwrap()], b"SET");
        assert_eq!(peek_head(b"*3\r\n$3\r\nSE"), Peek::Incomplete);
        assert_eq!(peek_head(b"*3\r"), Peek::Incomplete);
        assert_eq!(peek_head(b"*0\r\n"), Peek::Ready(Head::Empty));
        assert_eq!(peek_head(b"*x\r\n"), Peek::Malformed);
        assert_eq!(peek_head(b"*1\r\n:1\r\n"), Peek::Malformed);
        assert_eq!(
            peek_head(b"*1\r\n$100\r\n"),
            Peek::Ready(Head::Command {
                argc: 1,
                name: None
            })
        );
    }

    #[test]
    fn classification_ignores_case() {
        assert_eq!(classify(b"auth"), Kind::Auth);
        assert_eq!(classify(b"bLpOp"), Kind::Blocking);
        assert_eq!(classify(b"GET"), Kind::Other);
        assert_eq!(classify(b"SUNSUBSCRIBE"), Kind::Sunsubscribe);
        assert_eq!(classify(b"averyveryverylongcommandname"), Kind::Other);
    }

    #[test]
    fn multibulk_args_roundtrip() {
        let frame = encode(&[&b"SUBSCRIBE"[..], b"a", b"", b"c\r\nd"]);
        assert_eq!(
            multibulk_args(&frame),
            vec![&b"SUBSCRIBE"[..], b"a", b"", b"c\r\nd"]
        );
    }

    #[test]
    fn inline_splitting_follows_redis() {
        assert_eq!(
            inline_args(b"set  k \"a b\\x41\\n\" 'it\\'s'\r\n").unwrap(),
            vec![
                b"set".to_vec(),
                b"k".to_vec(),
                b"a bA\n".to_vec(),
                b"it's".to_vec()
            ]
        );
        assert_eq!(inline_args(b"\r\n").unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(inline_args(b"get \"k"), Err(UnbalancedQuotes));
        assert_eq!(inline_args(b"get \"k\"x"), Err(UnbalancedQuotes));
    }
}
