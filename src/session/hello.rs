//! `HELLO [protover [AUTH username password] [SETNAME clientname]]`, read the way Redis 7.0
//! reads it. The AUTH option is the proxy's to check and must never reach the upstream, so the
//! proxy also answers what Redis would say before or instead of it (a bad version, an option
//! that does not parse) with Redis's words and in Redis's order, and forwards the rest.
//!
//! Redis 7.0 walks the options in order and authenticates when it reaches an AUTH: in
//! `HELLO 3 AUTH u p BADOPT` the AUTH counts (a right password authenticates, a wrong one is the
//! error) and the syntax error follows it, while in `HELLO 3 BADOPT AUTH u p` the syntax error
//! comes first and the AUTH is never tried.

use bytes::Bytes;

use crate::resp::command;

pub const BAD_VERSION: &[u8] = b"-ERR Protocol version is not an integer or out of range\r\n";
pub const NOPROTO: &[u8] = b"-NOPROTO unsupported protocol version\r\n";

/// One option of a HELLO, in the order Redis meets them.
#[derive(Debug, PartialEq)]
pub enum HelloOption<'a> {
    Auth {
        user: &'a [u8],
        password: &'a [u8],
    },
    SetName(&'a [u8]),
    /// An option Redis cannot read (unknown, or missing its arguments): Redis stops there with
    /// a syntax error naming it.
    Bad(&'a [u8]),
}

#[derive(Debug)]
pub struct Hello<'a> {
    /// The protocol asked for: `Ok(None)` when the request names none, `Err` with Redis's reply
    /// when the version is not one Redis takes (nothing after it is read then).
    pub protocol: Result<Option<u8>, &'static [u8]>,
    /// The options up to and including the first bad one.
    pub options: Vec<HelloOption<'a>>,
}

impl<'a> Hello<'a> {
    /// `args`: the whole request, `HELLO` included.
    pub fn parse(args: &[&'a [u8]]) -> Self {
        let mut options = Vec::new();
        let protocol = match args.get(1) {
            None => Ok(None),
            Some(version) => match command::parse_redis_int(version) {
                None => Err(BAD_VERSION),
                Some(2) => Ok(Some(2)),
                Some(3) => Ok(Some(3)),
                Some(_) => Err(NOPROTO),
            },
        };
        if protocol.is_err() {
            return Hello { protocol, options };
        }
        let mut i = 2;
        while i < args.len() {
            let more = args.len() - 1 - i;
            let option = args[i];
            if command::is(option, "AUTH") && more >= 2 {
                options.push(HelloOption::Auth {
                    user: args[i + 1],
                    password: args[i + 2],
                });
                i += 3;
            } else if command::is(option, "SETNAME") && more >= 1 {
                options.push(HelloOption::SetName(args[i + 1]));
                i += 2;
            } else {
                options.push(HelloOption::Bad(option));
                break;
            }
        }
        Hello { protocol, options }
    }

    /// The name a successful HELLO gives the connection (the last SETNAME wins, as on Redis).
    pub fn name(&self) -> Option<Bytes> {
        self.options.iter().rev().find_map(|o| match o {
            HelloOption::SetName(name) => Some(Bytes::copy_from_slice(name)),
            _ => None,
        })
    }

    /// The request as it may go upstream: without the AUTH options, and cut after the first
    /// bad option (a bare `AUTH` there keeps none of what followed it, which may have been a
    /// password), so that Redis still answers it as it would the client's own request.
    pub fn without_auth(&self, args: &[&'a [u8]]) -> Vec<&'a [u8]> {
        let mut out: Vec<&[u8]> = args.iter().take(2).copied().collect();
        if self.protocol.is_err() {
            return out;
        }
        for option in &self.options {
            match option {
                HelloOption::Auth { .. } => {}
                HelloOption::SetName(name) => out.extend([b"SETNAME".as_slice(), name]),
                HelloOption::Bad(option) => out.push(option),
            }
        }
        out
    }
}

/// Redis's answer to an option it cannot read. Like Redis, the option's CR and LF bytes become
/// spaces (trailing ones are dropped) so the error stays one line.
pub fn syntax_error(option: &[u8]) -> Bytes {
    let end = option
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n'))
        .map_or(0, |p| p + 1);
    let option: Vec<u8> = option[..end]
        .iter()
        .map(|&b| if matches!(b, b'\r' | b'\n') { b' ' } else { b })
        .collect();
    let mut reply = b"-ERR Syntax error in HELLO option '".to_vec();
    reply.extend_from_slice(&option);
    reply.extend_from_slice(b"'\r\n");
    reply.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<'a>(args: &[&'a str]) -> (Hello<'a>, Vec<&'a [u8]>) {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let hello = Hello::parse(&args);
        let upstream = hello.without_auth(&args);
        (hello, upstream)
    }

    #[test]
    fn versions_redis_refuses() {
        for (version, reply) in [
            ("abc", BAD_VERSION),
            ("03", BAD_VERSION),
            ("+3", BAD_VERSION),
            ("", BAD_VERSION),
            ("4", NOPROTO),
            ("1", NOPROTO),
            ("-2", NOPROTO),
        ] {
            let (hello, upstream) = parse(&["HELLO", version, "AUTH", "u", "secret"]);
            assert_eq!(hello.protocol, Err(reply), "{version}");
            assert_eq!(upstream, [b"HELLO".as_slice(), version.as_bytes()]);
        }
        assert_eq!(parse(&["HELLO"]).0.protocol, Ok(None));
    }

    #[test]
    fn options_in_order_up_to_the_first_bad_one() {
        let (hello, upstream) = parse(&[
            "hello", "3", "auth", "u", "secret", "SETNAME", "n", "BAD", "AUTH", "u", "later",
        ]);
        assert_eq!(hello.protocol, Ok(Some(3)));
        assert_eq!(
            hello.options,
            [
                HelloOption::Auth {
                    user: b"u",
                    password: b"secret"
                },
                HelloOption::SetName(b"n"),
                HelloOption::Bad(b"BAD"),
            ]
        );
        let upstream: Vec<&str> = upstream
            .iter()
            .map(|a| std::str::from_utf8(a).unwrap())
            .collect();
        assert_eq!(upstream, ["hello", "3", "SETNAME", "n", "BAD"]);
    }

    #[test]
    fn an_incomplete_auth_goes_upstream_bare() {
        // The client may have put its password where the user name goes.
        let (hello, upstream) = parse(&["HELLO", "2", "AUTH", "secret"]);
        assert_eq!(hello.options, [HelloOption::Bad(b"AUTH")]);
        assert_eq!(upstream, [b"HELLO".as_slice(), b"2", b"AUTH"]);
        let (hello, _) = parse(&["HELLO", "2", "SETNAME"]);
        assert_eq!(hello.options, [HelloOption::Bad(b"SETNAME")]);
    }

    #[test]
    fn the_last_name_wins() {
        let (hello, _) = parse(&["HELLO", "3", "SETNAME", "a", "SETNAME", "b"]);
        assert_eq!(hello.name().as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn syntax_errors_stay_on_one_line() {
        assert_eq!(
            &syntax_error(b"BAD")[..],
            b"-ERR Syntax error in HELLO option 'BAD'\r\n"
        );
        assert_eq!(
            &syntax_error(b"a\r\nb\n\r\n")[..],
            b"-ERR Syntax error in HELLO option 'a  b'\r\n"
        );
    }
}
