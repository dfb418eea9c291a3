//! The server's command table, read from its `COMMAND` reply, so the proxy can answer a client
//! that has not authenticated the way Redis does.
//!
//! Redis judges a command's name and argument count before it asks for authentication: an
//! unauthenticated `GET` with no key gets `wrong number of arguments for 'get' command`, an
//! unknown name gets `unknown command ...`, and only a well-formed command gets `NOAUTH`. The
//! proxy answers unauthenticated clients itself (nothing of theirs goes upstream), so it needs
//! the server's own table to say the same: the names and arities of the server it fronts,
//! whatever its version, modules or renamed commands. The wording is Redis 7's.

use std::collections::HashMap;

use redis_protocol::resp2::types::OwnedFrame;

/// Longest part of a client's name or argument Redis quotes in an error (`%.128s`).
const QUOTED_MAX: usize = 128;

/// One command of the table, or one subcommand of a container command.
#[derive(Debug, PartialEq)]
struct Command {
    /// As Redis names it in errors: lower case, `container|sub` for a subcommand.
    full_name: String,
    /// Redis's arity: `n` exactly n arguments (the name included), `-n` at least n.
    arity: i64,
    /// Subcommands by lower-case name (empty for a command that has none).
    subcommands: HashMap<Vec<u8>, Command>,
}

/// The commands a server knows, by lower-case name.
#[derive(Debug, PartialEq)]
pub struct CommandTable {
    commands: HashMap<Vec<u8>, Command>,
}

impl CommandTable {
    /// Reads a `COMMAND` reply (RESP2). Each entry is `[name, arity, flags, first key, last key,
    /// step, ...]`; from Redis 7 the tenth element lists the subcommands, in the same shape.
    pub fn from_reply(reply: &OwnedFrame) -> Result<Self, String> {
        let OwnedFrame::Array(entries) = reply else {
            return Err("COMMAND did not answer an array".into());
        };
        let commands = read_commands(entries)?;
        if commands.is_empty() {
            return Err("COMMAND answered an empty table".into());
        }
        Ok(Self { commands })
    }

    /// How many commands the table holds (subcommands not counted).
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    /// Whether the table holds no commands (never true for a table read from a reply).
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// The error Redis answers before anything else for this request (`args[0]` is the name):
    /// an unknown command or subcommand, or a wrong number of arguments. `None` when the
    /// server knows the command and takes that many arguments. The text is the error line
    /// without its `-` and CRLF.
    pub fn refusal(&self, args: &[&[u8]]) -> Option<Vec<u8>> {
        let (&name, rest) = args.split_first()?;
        let Some(base) = self.commands.get(&name.to_ascii_lowercase()) else {
            return Some(unknown_command(name, rest));
        };
        let command = match rest.first() {
            Some(sub) if !base.subcommands.is_empty() => {
                match base.subcommands.get(&sub.to_ascii_lowercase()) {
                    Some(command) => command,
                    None => return Some(unknown_subcommand(name, sub)),
                }
            }
            _ => base,
        };
        let argc = args.len() as i64;
        let fits = if command.arity >= 0 {
            argc == command.arity
        } else {
            argc >= -command.arity
        };
        (!fits).then(|| {
            format!(
                "ERR wrong number of arguments for '{}' command",
                command.full_name
            )
            .into_bytes()
        })
    }
}

fn read_commands(entries: &[OwnedFrame]) -> Result<HashMap<Vec<u8>, Command>, String> {
    let mut commands = HashMap::with_capacity(entries.len());
    for entry in entries {
        let command = read_command(entry)?;
        // A subcommand is named `container|sub`; it is looked up by `sub`.
        let key = match command.full_name.rsplit_once('|') {
            Some((_, sub)) => sub.as_bytes().to_vec(),
            None => command.full_name.as_bytes().to_vec(),
        };
        commands.insert(key, command);
    }
    Ok(commands)
}

fn read_command(entry: &OwnedFrame) -> Result<Command, String> {
    let OwnedFrame::Array(fields) = entry else {
        return Err("a COMMAND entry is not an array".into());
    };
    let full_name = match fields.first() {
        Some(OwnedFrame::BulkString(name) | OwnedFrame::SimpleString(name)) => {
            String::from_utf8_lossy(name).to_ascii_lowercase()
        }
        _ => return Err("a COMMAND entry has no name".into()),
    };
    let arity = match fields.get(1) {
        Some(OwnedFrame::Integer(arity)) => *arity,
        _ => return Err(format!("COMMAND entry `{full_name}` has no arity")),
    };
    let subcommands = match fields.get(9) {
        Some(OwnedFrame::Array(subs)) => read_commands(subs)?,
        _ => HashMap::new(),
    };
    Ok(Command {
        full_name,
        arity,
        subcommands,
    })
}

/// `unknown command '<name>', with args beginning with: '<arg>' ...`: as many arguments as fit
/// in 128 bytes, the last one cut to fit.
fn unknown_command(name: &[u8], rest: &[&[u8]]) -> Vec<u8> {
    let mut listed = Vec::new();
    for arg in rest {
        if listed.len() >= QUOTED_MAX {
            break;
        }
        let room = QUOTED_MAX - listed.len();
        listed.push(b'\'');
        listed.extend_from_slice(quoted(arg, room));
        listed.extend_from_slice(b"' ");
    }
    let mut error = b"ERR unknown command '".to_vec();
    error.extend_from_slice(quoted(name, QUOTED_MAX));
    error.extend_from_slice(b"', with args beginning with: ");
    error.extend_from_slice(&listed);
    one_line(error)
}

/// `unknown subcommand '<sub>'. Try <CONTAINER> HELP.`
fn unknown_subcommand(container: &[u8], sub: &[u8]) -> Vec<u8> {
    let mut error = b"ERR unknown subcommand '".to_vec();
    error.extend_from_slice(quoted(sub, QUOTED_MAX));
    error.extend_from_slice(b"'. Try ");
    error.extend_from_slice(&c_string(container).to_ascii_uppercase());
    error.extend_from_slice(b" HELP.");
    one_line(error)
}

/// What C's `%.<max>s` prints of `bytes`: up to the first NUL, at most `max` bytes.
fn quoted(bytes: &[u8], max: usize) -> &[u8] {
    let s = c_string(bytes);
    &s[..s.len().min(max)]
}

/// `bytes` up to its first NUL (Redis formats its errors with C strings).
fn c_string(bytes: &[u8]) -> &[u8] {
    bytes.split(|&b| b == 0).next().unwrap_or(bytes)
}

/// Redis turns CR and LF in an error into spaces: a client's bytes cannot break the protocol.
fn one_line(mut error: Vec<u8>) -> Vec<u8> {
    for b in &mut error {
        if matches!(*b, b'\r' | b'\n') {
            *b = b' ';
        }
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> OwnedFrame {
        OwnedFrame::BulkString(s.as_bytes().to_vec())
    }

    /// An entry as Redis 7 writes it (flags, keys, categories, tips and key specs left empty).
    fn entry(name: &str, arity: i64, subs: Vec<OwnedFrame>) -> OwnedFrame {
        let mut fields = vec![
            bulk(name),
            OwnedFrame::Integer(arity),
            OwnedFrame::Array(vec![]),
            OwnedFrame::Integer(0),
            OwnedFrame::Integer(0),
            OwnedFrame::Integer(0),
            OwnedFrame::Array(vec![]),
            OwnedFrame::Array(vec![]),
            OwnedFrame::Array(vec![]),
        ];
        fields.push(OwnedFrame::Array(subs));
        OwnedFrame::Array(fields)
    }

    fn table() -> CommandTable {
        CommandTable::from_reply(&OwnedFrame::Array(vec![
            entry("get", 2, vec![]),
            entry("ping", -1, vec![]),
            entry(
                "client",
                -2,
                vec![
                    entry("client|kill", -3, vec![]),
                    entry("client|id", 2, vec![]),
                ],
            ),
        ]))
        .expect("a table")
    }

    fn refusal(t: &CommandTable, args: &[&[u8]]) -> Option<String> {
        t.refusal(args)
            .map(|e| String::from_utf8_lossy(&e).into_owned())
    }

    #[test]
    fn names_and_argument_counts_are_judged_as_redis_judges_them() {
        let t = table();
        assert_eq!(t.len(), 3);
        assert_eq!(refusal(&t, &[b"GET", b"k"]), None);
        assert_eq!(refusal(&t, &[b"ping"]), None);
        assert_eq!(refusal(&t, &[b"PiNg", b"a"]), None);
        assert_eq!(
            refusal(&t, &[b"get"]).as_deref(),
            Some("ERR wrong number of arguments for 'get' command")
        );
        assert_eq!(
            refusal(&t, &[b"GET", b"a", b"b"]).as_deref(),
            Some("ERR wrong number of arguments for 'get' command")
        );
        // A container alone is judged by its own arity, a subcommand by the subcommand's.
        assert_eq!(
            refusal(&t, &[b"CLIENT"]).as_deref(),
            Some("ERR wrong number of arguments for 'client' command")
        );
        assert_eq!(
            refusal(&t, &[b"client", b"KILL"]).as_deref(),
            Some("ERR wrong number of arguments for 'client|kill' command")
        );
        assert_eq!(refusal(&t, &[b"client", b"kill", b"1.2.3.4:5"]), None);
        assert_eq!(refusal(&t, &[b"client", b"id"]), None);
        assert_eq!(
            refusal(&t, &[b"client", b"nosuch"]).as_deref(),
            Some("ERR unknown subcommand 'nosuch'. Try CLIENT HELP.")
        );
    }

    #[test]
    fn unknown_commands_are_quoted_as_redis_quotes_them() {
        let t = table();
        assert_eq!(
            refusal(&t, &[b"foo", b"a"]).as_deref(),
            Some("ERR unknown command 'foo', with args beginning with: 'a' ")
        );
        assert_eq!(
            refusal(&t, &[b"foo"]).as_deref(),
            Some("ERR unknown command 'foo', with args beginning with: ")
        );
        // C strings: a NUL ends a name or an argument; CR and LF become spaces.
        assert_eq!(
            refusal(&t, &[b"FOO\0bar", b"a\0b", b"c"]).as_deref(),
            Some("ERR unknown command 'FOO', with args beginning with: 'a' 'c' ")
        );
        assert_eq!(
            refusal(&t, &[b"fo\r\no", b"a\nb"]).as_deref(),
            Some("ERR unknown command 'fo  o', with args beginning with: 'a b' ")
        );
        // Arguments are listed while fewer than 128 bytes are; the last is cut to fit.
        let arg = "abcdefghijklmnopqrstuvwxyz0123456789";
        let args: Vec<&[u8]> = std::iter::once(&b"foo"[..])
            .chain(std::iter::repeat_n(arg.as_bytes(), 5))
            .collect();
        assert_eq!(
            refusal(&t, &args).unwrap(),
            format!(
                "ERR unknown command 'foo', with args beginning with: '{arg}' '{arg}' '{arg}' 'abcdefghijk' "
            )
        );
        let long = "x".repeat(200);
        assert_eq!(
            refusal(&t, &[long.as_bytes(), long.as_bytes()]).unwrap(),
            format!(
                "ERR unknown command '{}', with args beginning with: '{}' ",
                &long[..128],
                &long[..128]
            )
        );
    }

    #[test]
    fn replies_that_are_no_command_table_are_refused() {
        assert!(CommandTable::from_reply(&OwnedFrame::Null).is_err());
        assert!(CommandTable::from_reply(&OwnedFrame::Array(vec![])).is_err());
        assert!(CommandTable::from_reply(&OwnedFrame::Array(vec![bulk("get")])).is_err());
        let no_arity = OwnedFrame::Array(vec![OwnedFrame::Array(vec![bulk("get")])]);
        assert!(CommandTable::from_reply(&no_arity).is_err());
        // Redis 6 has no subcommands: the table still reads.
        let six = OwnedFrame::Array(vec![OwnedFrame::Array(vec![
            bulk("get"),
            OwnedFrame::Integer(2),
        ])]);
        assert_eq!(CommandTable::from_reply(&six).map(|t| t.len()), Ok(1));
    }
}
