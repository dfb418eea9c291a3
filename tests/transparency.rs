//! Differential transparency: random client sessions run twice, once straight against a Redis
//! and once through rotaproxy against an identical twin, and the client must read the same
//! bytes on both. The sessions mix pipelines split at random points, inline commands,
//! transactions (with WATCH, HELLO, RESET, a nested MULTI and refused commands inside),
//! SELECT, HELLO 2/3, RESET, CLIENT SETNAME, CLIENT REPLY OFF/SKIP/ON, pub/sub in every
//! flavour (messages to itself and from outside), blocking pops, commands Redis refuses and
//! (where the proxy never moves the session) client-side caching, while the proxy's upstream
//! connections are killed between batches (TLS on both sides of the proxy) or its credential
//! rotates.
//!
//! A failure prints the seed; `ROTAPROXY_DIFF_SEED=<seed>` replays it,
//! `ROTAPROXY_DIFF_SCRIPTS=<n>` runs more sessions per test (a longer search), and
//! `ROTAPROXY_DIFF_LOG=debug` sets the TLS test's proxy log level.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::rotation::*;
use support::*;

/// SplitMix64: small, seedable, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// One command as the client writes it.
struct Cmd {
    args: Vec<Vec<u8>>,
    /// Sent as an inline command (`SET k v\r\n`) instead of a multibulk.
    inline: bool,
    /// Redis refuses it or it changes nothing about the connection (see `odd_command`): the
    /// guess does not follow it.
    changes_nothing: bool,
    /// An AUTH or HELLO ... AUTH with the right password (`Names::client_password`).
    authenticates: bool,
}

impl Cmd {
    fn bytes(&self) -> Vec<u8> {
        if !self.inline {
            return encode_cmd(&self.args);
        }
        let mut out = Vec::new();
        for (i, arg) in self.args.iter().enumerate() {
            if i > 0 {
                out.push(b' ');
            }
            if arg.contains(&b' ') || arg.is_empty() {
                out.push(b'"');
                out.extend_from_slice(arg);
                out.push(b'"');
            } else {
                out.extend_from_slice(arg);
            }
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Inline commands cannot carry CR, LF, quotes or backslashes as plain bytes, and Redis
    /// takes at most 64 KiB on one line.
    fn can_be_inline(&self) -> bool {
        self.args.iter().map(Vec::len).sum::<usize>() < 16 * 1024
            && self.args.iter().all(|a| {
                !a.iter()
                    .any(|b| matches!(b, b'\r' | b'\n' | b'"' | b'\'' | b'\\'))
            })
    }
}

/// What the generator believes about the connection. It steers the choice of commands, decides
/// when killing the upstream connection is fair, and keeps `CLIENT REPLY OFF` from silencing
/// the sentinel; the comparison never relies on it.
///
/// Where it cannot know, it leans towards a RESP2 subscription: `resp3` is true only when
/// RESP3 is surely in force, and `subscriptions` may hold some that a transaction queued but
/// never ran.
#[derive(Default, Clone)]
struct Guess {
    resp3: bool,
    /// `CLIENT REPLY OFF` is in force: the batch must end with `CLIENT REPLY ON`, and nothing
    /// before it may leave a RESP2 subscription (which would refuse the ON).
    reply_off: bool,
    subscriptions: BTreeSet<Vec<u8>>,
    /// A WATCH may be armed: a lost connection would make the next EXEC fail (by design), so
    /// no kill until a RESET.
    watch_maybe: bool,
    /// A pattern subscription may exist: a PUBLISH inside MULTI then puts `pmessage`s inside
    /// EXEC's array, in the order of the server's hash table, which cannot be compared. Until
    /// a RESET or an argument-less PUNSUBSCRIBE outside MULTI, transactions do not publish.
    patterns_maybe: bool,
    /// Clients must authenticate (`Names::client_password`): RESET logs the connection out.
    client_auth: bool,
    /// Not authenticated (yet, or again after a RESET): Redis runs nothing but AUTH, HELLO
    /// with AUTH, RESET and QUIT, and refuses more than 10 arguments or one over 16 KiB by
    /// closing the connection.
    unauthenticated: bool,
}

impl Guess {
    fn resp2_subscribed(&self) -> bool {
        !self.resp3 && !self.subscriptions.is_empty()
    }

    /// A connection that must authenticate, not authenticated yet.
    fn logged_out(client_auth: bool) -> Guess {
        Guess {
            client_auth,
            unauthenticated: client_auth,
            ..Guess::default()
        }
    }

    /// Whether `cmd` may be sent now. Redis closes an unauthenticated connection that sends
    /// more than 10 arguments or one over 16 KiB. And Redis 7.0 (not 7.2) sets the name of an
    /// unauthenticated `HELLO ... SETNAME` it refuses for want of authentication, which the
    /// proxy does not copy (see README, "Known limits").
    /// Whether `cmd` may be sent after `before` commands of the same batch. Where clients must
    /// authenticate, a RESET comes first in its batch or not at all. Once (seed 101015, not on
    /// replay) the direct server closed a session's connection "for overcoming of output buffer
    /// limits" right after a RESET had logged it out behind 49 KB of replies not yet sent: the
    /// limit on unauthenticated clients' output that Debian's 7.0.15 carries since deb12u4
    /// (CVE-2025-21605; normal clients have no limit here). Replies before a logging-out RESET
    /// are what it counts.
    fn may_send_at(&self, cmd: &Cmd, before: usize) -> bool {
        let logs_out =
            self.client_auth && cmd.args[0].eq_ignore_ascii_case(b"RESET") && !cmd.changes_nothing;
        self.may_send(cmd) && !(logs_out && before > 0)
    }

    fn may_send(&self, cmd: &Cmd) -> bool {
        if !self.unauthenticated {
            return true;
        }
        let names_itself = cmd.args[0].eq_ignore_ascii_case(b"HELLO")
            && cmd.args.iter().any(|a| a.eq_ignore_ascii_case(b"SETNAME"));
        cmd.args.len() <= 10 && cmd.args.iter().all(|a| a.len() <= 16 * 1024) && !names_itself
    }

    /// Follows a command queued inside MULTI, which EXEC may or may not run: only what makes
    /// a RESP2 subscription more likely is taken (so `reply_off` never ends in one).
    fn follow_queued(&mut self, cmd: &Cmd) {
        if cmd.changes_nothing || self.unauthenticated {
            return;
        }
        let name = cmd.args[0].to_ascii_uppercase();
        let taken = match name.as_slice() {
            b"SUBSCRIBE" | b"PSUBSCRIBE" | b"SSUBSCRIBE" => true,
            b"HELLO" => cmd.args.get(1).map(Vec::as_slice) == Some(b"2"),
            _ => false,
        };
        if taken {
            self.follow(cmd);
        }
    }

    fn follow(&mut self, cmd: &Cmd) {
        if cmd.changes_nothing {
            return;
        }
        let name = cmd.args[0].to_ascii_uppercase();
        if self.unauthenticated {
            // Only a right password changes anything (and RESET, which changes nothing here).
            if !cmd.authenticates {
                return;
            }
            self.unauthenticated = false;
        }
        let rest = &cmd.args[1..];
        match (name.as_slice(), rest.is_empty()) {
            (b"PSUBSCRIBE", _) => self.patterns_maybe = true,
            (b"PUNSUBSCRIBE", true) => self.patterns_maybe = false,
            _ => {}
        }
        match name.as_slice() {
            b"RESET" => *self = Guess::logged_out(self.client_auth),
            // Refused in a RESP2 subscription; a SKIP leaves OFF in force.
            b"CLIENT"
                if rest.len() == 2
                    && rest[0].eq_ignore_ascii_case(b"REPLY")
                    && !self.resp2_subscribed() =>
            {
                if rest[1].eq_ignore_ascii_case(b"OFF") {
                    self.reply_off = true;
                } else if rest[1].eq_ignore_ascii_case(b"ON") {
                    self.reply_off = false;
                }
            }
            // A RESP2 subscription refuses HELLO: `resp3` is set only when surely in force.
            b"HELLO" if rest.first().map(Vec::as_slice) == Some(b"3") => {
                self.resp3 |= !self.resp2_subscribed()
            }
            b"HELLO" if rest.first().map(Vec::as_slice) == Some(b"2") => self.resp3 = false,
            b"WATCH" => self.watch_maybe = true,
            b"SUBSCRIBE" | b"PSUBSCRIBE" | b"SSUBSCRIBE" | b"UNSUBSCRIBE" | b"PUNSUBSCRIBE"
            | b"SUNSUBSCRIBE" => {
                let class = match name.as_slice() {
                    b"PSUBSCRIBE" | b"PUNSUBSCRIBE" => b'p',
                    b"SSUBSCRIBE" | b"SUNSUBSCRIBE" => b's',
                    _ => b'c',
                };
                let entry = |c: &Vec<u8>| [&[class][..], c.as_slice()].concat();
                if !name.ends_with(b"UNSUBSCRIBE") {
                    self.subscriptions.extend(rest.iter().map(entry));
                } else if rest.is_empty() {
                    self.subscriptions.retain(|s| s[0] != class);
                } else {
                    for c in rest {
                        self.subscriptions.remove(&entry(c));
                    }
                }
            }
            _ => {}
        }
    }
}

/// Names and values of one session, under its own prefix so sessions never share keys or
/// channels.
struct Names {
    prefix: String,
    /// The proxy may move the session to another connection. A moved tracking client gets a
    /// flush-everything invalidation Redis would not send (skipped by the comparison), and none
    /// for keys it read before the move (by design; see
    /// `resp3_tracking_flushes_the_client_cache_after_a_lost_connection` in tests/proxy_core.rs),
    /// so there client-side caching always uses NOLOOP: no invalidation comes at all, and what
    /// is compared is that the tracking state survives the move.
    moves: bool,
    /// Clients must authenticate, with this password for `default` (the proxy's client auth,
    /// and the direct server's default user): sessions start logged out, and RESET logs out.
    client_password: Option<&'static str>,
}

impl Names {
    fn key(&self, rng: &mut Rng) -> Vec<u8> {
        format!("{}:k{}", self.prefix, rng.below(4)).into_bytes()
    }
    fn list(&self, rng: &mut Rng) -> Vec<u8> {
        format!("{}:l{}", self.prefix, rng.below(2)).into_bytes()
    }
    fn hash(&self) -> Vec<u8> {
        format!("{}:h", self.prefix).into_bytes()
    }
    fn zset(&self) -> Vec<u8> {
        format!("{}:z", self.prefix).into_bytes()
    }
    fn stream(&self) -> Vec<u8> {
        format!("{}:x", self.prefix).into_bytes()
    }
    fn set(&self) -> Vec<u8> {
        format!("{}:s", self.prefix).into_bytes()
    }
    fn channel(&self, rng: &mut Rng) -> Vec<u8> {
        format!("{}:ch{}", self.prefix, rng.below(3)).into_bytes()
    }
    fn pattern(&self, rng: &mut Rng) -> Vec<u8> {
        match rng.below(2) {
            0 => format!("{}:ch*", self.prefix),
            _ => format!("{}:c?1", self.prefix),
        }
        .into_bytes()
    }
    fn shard_channel(&self, rng: &mut Rng) -> Vec<u8> {
        format!("{}:sh{}", self.prefix, rng.below(2)).into_bytes()
    }

    fn value(&self, rng: &mut Rng) -> Vec<u8> {
        match rng.below(10) {
            0 => Vec::new(),
            1 => b"with space".to_vec(),
            // Bytes a line-based parser would trip over.
            2 => b"a\r\nb\r\n*1\r\n$4\r\nPING\r\n\x00\xff".to_vec(),
            3 => {
                let len = 1 + rng.below(40_000);
                (0..len).map(|i| b'a' + (i % 26) as u8).collect()
            }
            4 => b"-ERR not an error".to_vec(),
            _ => format!("v{}", rng.below(1000)).into_bytes(),
        }
    }
}

fn cmd(parts: Vec<Vec<u8>>) -> Cmd {
    Cmd {
        args: parts,
        inline: false,
        changes_nothing: false,
        authenticates: false,
    }
}

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// A command on data: allowed anywhere outside a RESP2 subscription, queued inside MULTI.
fn data_command(rng: &mut Rng, n: &Names, in_multi: bool) -> Cmd {
    let k = n.key(rng);
    let l = n.list(rng);
    match rng.below(29) {
        0 => cmd(vec![b("SET"), k, n.value(rng)]),
        1 => cmd(vec![b("GET"), k]),
        2 => cmd(vec![b("INCR"), format!("{}:n", n.prefix).into_bytes()]),
        3 => cmd(vec![b("APPEND"), k, n.value(rng)]),
        4 => cmd(vec![b("DEL"), k, n.key(rng)]),
        5 => cmd(vec![b("MGET"), k, n.key(rng), n.key(rng)]),
        6 => cmd(vec![b("MSET"), k, n.value(rng), n.key(rng), n.value(rng)]),
        7 => cmd(vec![b("GETRANGE"), k, b("0"), b("5")]),
        8 => cmd(vec![b("LPUSH"), l, n.value(rng), n.value(rng)]),
        9 => cmd(vec![b("RPOP"), l]),
        10 => cmd(vec![b("LRANGE"), l, b("0"), b("-1")]),
        // Outside MULTI this blocks for 20 ms when the list is empty; inside, it is an RPOP.
        11 if !in_multi || rng.chance(50) => cmd(vec![b("BLPOP"), l, b("0.02")]),
        11 => cmd(vec![b("LLEN"), l]),
        // Small values only: a hash holding a big one is a hash table, whose order is the
        // server's random seed's (as SMEMBERS's would be).
        12 => cmd(vec![
            b("HSET"),
            n.hash(),
            b("f"),
            format!("v{}", rng.below(1000)).into_bytes(),
            b("g"),
            b("1"),
        ]),
        // A map under RESP3, a flat array under RESP2: shows which protocol the server speaks.
        13 => cmd(vec![b("HGETALL"), n.hash()]),
        14 => cmd(vec![b("HINCRBYFLOAT"), n.hash(), b("g"), b("0.5")]),
        15 => cmd(vec![
            b("ZADD"),
            n.zset(),
            b("1.5"),
            b("m1"),
            b("2.25"),
            b("m2"),
        ]),
        // Doubles under RESP3.
        16 => cmd(vec![
            b("ZRANGE"),
            n.zset(),
            b("0"),
            b("-1"),
            b("WITHSCORES"),
        ]),
        17 => cmd(vec![b("ZSCORE"), n.zset(), b("m1")]),
        18 => cmd(vec![b("SADD"), n.set(), b("a"), b("b")]),
        19 => cmd(vec![b("SMISMEMBER"), n.set(), b("a"), b("z")]),
        20 => cmd(vec![b("DBSIZE")]),
        21 => cmd(vec![b("ECHO"), n.value(rng)]),
        // WRONGTYPE at run time (inside MULTI: EXEC's array carries the error).
        22 => cmd(vec![b("GET"), l]),
        // Streams, with ids of the session's own (`*` would take the server's clock). An id
        // not above the last one is refused alike on both sides.
        24 => cmd(vec![
            b("XADD"),
            n.stream(),
            format!("1-{}", rng.below(400)).into_bytes(),
            b("f"),
            n.value(rng),
        ]),
        // A map under RESP3.
        25 => cmd(vec![
            b("XREAD"),
            b("COUNT"),
            b("2"),
            b("STREAMS"),
            n.stream(),
            b("0"),
        ]),
        // Waits 20 ms for an entry nobody adds (inside MULTI it does not wait).
        26 => cmd(vec![
            b("XREAD"),
            b("BLOCK"),
            b("20"),
            b("STREAMS"),
            n.stream(),
            b("$"),
        ]),
        27 => cmd(vec![
            b("XRANGE"),
            n.stream(),
            b("-"),
            b("+"),
            b("COUNT"),
            b("3"),
        ]),
        // No replica: at once, or after 20 ms.
        28 => cmd(vec![
            b("WAIT"),
            rng.pick(&["0", "1"]).as_bytes().to_vec(),
            b("20"),
        ]),
        _ => cmd(vec![b("TYPE"), k]),
    }
}

/// A command Redis refuses before running it (inside MULTI: the transaction aborts at EXEC).
fn refused_command(rng: &mut Rng, n: &Names) -> Cmd {
    match rng.below(4) {
        0 => cmd(vec![b("NOSUCHCOMMAND"), n.key(rng)]),
        1 => cmd(vec![b("GET")]),
        2 => cmd(vec![b("SET"), n.key(rng)]),
        _ => cmd(vec![b("CLIENT"), b("NOSUCHSUBCOMMAND")]),
    }
}

/// A command the proxy reads (rather than only forwards) in a form Redis refuses or that
/// changes nothing: a wrong number of arguments, a value out of range, an option that does not
/// exist, an id no client has; and AUTH as the `default` user, which needs no password on these
/// servers and which the proxy answers itself. Inside MULTI a wrong argument count makes
/// Redis refuse the command at once and abort the transaction at EXEC, while a bad value fails
/// only when EXEC runs it. None changes the connection, so the guess does not follow them.
/// `client_auth`: clients must authenticate, so the forms with a password have a wrong one
/// and change nothing; inside MULTI they are left out (Redis would queue them and report the
/// failure in EXEC's array, the proxy refuses them when queued: see README, "Known limits").
fn odd_command(rng: &mut Rng, in_multi: bool, client_auth: bool) -> Cmd {
    const OUTSIDE_MULTI: &[&[&str]] = &[
        &["WATCH"],
        &["CLIENT", "REPLY"],
        &["CLIENT", "REPLY", "MAYBE"],
        &["CLIENT", "REPLY", "ON", "OFF"],
        // Inside MULTI Redis would answer it in EXEC's array; the proxy refuses it when queued
        // (see README, "Known limits").
        &["AUTH", "a", "b", "c"],
    ];
    const ANYWHERE: &[&[&str]] = &[
        &["SELECT"],
        &["SELECT", "abc"],
        &["SELECT", "-1"],
        &["SELECT", "1", "2"],
        &["SELECT", "01"],
        &["SELECT", "+1"],
        &["HELLO", "abc"],
        &["HELLO", "03"],
        &["HELLO", "+3"],
        &["HELLO", "3", "AUTH", "default"],
        &["HELLO", "3", "AUTH", "default", "x", "extra"],
        &["HELLO", "2", "SETNAME"],
        &["HELLO", "3", "NOSUCHOPTION"],
        &["HELLO", "3", "SETNAME", "has space"],
        &["AUTH"],
        &["AUTH", "default", "anything"],
        &["HELLO", "2", "AUTH", "default", "anything"],
        &["CLIENT"],
        &["CLIENT", "SETNAME"],
        &["CLIENT", "SETNAME", "a", "b"],
        &["CLIENT", "GETNAME", "x"],
        &["CLIENT", "ID", "x"],
        &["CLIENT", "GETREDIR", "x"],
        &["CLIENT", "TRACKINGINFO", "x"],
        &["CLIENT", "TRACKING"],
        &["CLIENT", "TRACKING", "MAYBE"],
        &["CLIENT", "TRACKING", "ON", "NOSUCHOPTION"],
        &["CLIENT", "TRACKING", "ON", "REDIRECT"],
        &["CLIENT", "TRACKING", "ON", "REDIRECT", "abc"],
        &["CLIENT", "TRACKING", "ON", "REDIRECT", "987654321"],
        &["CLIENT", "TRACKING", "ON", "OPTIN", "OPTOUT"],
        &["CLIENT", "TRACKING", "OFF", "PREFIX", "a"],
        &["CLIENT", "CACHING"],
        &["CLIENT", "CACHING", "MAYBE"],
        &["CLIENT", "KILL"],
        &["CLIENT", "KILL", "ID", "abc"],
        &["CLIENT", "KILL", "ID", "987654321"],
        &["CLIENT", "KILL", "ID"],
        &["CLIENT", "KILL", "127.0.0.1:1"],
        &["CLIENT", "UNBLOCK"],
        &["CLIENT", "UNBLOCK", "abc"],
        &["CLIENT", "UNBLOCK", "987654321"],
        &["CLIENT", "UNBLOCK", "987654321", "MAYBE"],
        &["SUBSCRIBE"],
        &["PSUBSCRIBE"],
        &["SSUBSCRIBE"],
        &["MULTI", "x"],
        &["EXEC", "x"],
        &["DISCARD", "x"],
        &["UNWATCH", "x"],
        &["RESET", "x"],
        &["PING", "a", "b"],
        &["ECHO"],
        &["BLPOP"],
        &["BLPOP", "k"],
        &["BLPOP", "k", "abc"],
        &["BLPOP", "k", "-1"],
        &["XREAD", "BLOCK", "abc", "STREAMS", "x", "0"],
        &["XREAD", "BLOCK"],
        &["WAIT"],
        &["WAIT", "0", "abc"],
    ];
    let forms = if in_multi || rng.chance(70) {
        ANYWHERE
    } else {
        OUTSIDE_MULTI
    };
    let has_password = |form: &[&str]| {
        let auth_at = form.iter().position(|a| *a == "AUTH");
        auth_at.is_some_and(|at| form.len() > at + 2)
    };
    let form = loop {
        let form = rng.pick(forms);
        if !(client_auth && in_multi && has_password(form)) {
            break form;
        }
    };
    Cmd {
        args: form.iter().map(|a| b(a)).collect(),
        inline: false,
        // The one form here that changes the connection: it sets RESP2 (where any password
        // is right).
        changes_nothing: client_auth
            || form[0] != "HELLO"
            || form.get(2) != Some(&"AUTH")
            || form.len() != 5,
        authenticates: false,
    }
}

/// Logging in, where clients must authenticate: AUTH or HELLO ... AUTH, with the right
/// password (`password`) or, outside MULTI, a wrong one (see `odd_command` for why not inside).
fn auth_command(rng: &mut Rng, password: &str, in_multi: bool) -> Cmd {
    let right = in_multi || rng.chance(75);
    let pw = if right { password } else { "wrong-password" };
    // Inside MULTI only AUTH: a HELLO there changes the protocol in the middle of EXEC's
    // reply, which `batch` allows only in transactions that do not publish.
    let args = match rng.below(if in_multi { 2 } else { 4 }) {
        0 => vec![b("AUTH"), b(pw)],
        1 => vec![b("AUTH"), b("default"), b(pw)],
        _ => vec![
            b("HELLO"),
            rng.pick(&["2", "3"]).as_bytes().to_vec(),
            b("AUTH"),
            b("default"),
            b(pw),
        ],
    };
    Cmd {
        args,
        inline: false,
        changes_nothing: !right,
        authenticates: right,
    }
}

/// The same command as a client may spell it: a name in lower or mixed case.
fn respell(rng: &mut Rng, c: &mut Cmd) {
    let name = &mut c.args[0];
    match rng.below(20) {
        0 | 1 => name.make_ascii_lowercase(),
        2 => {
            for (i, byte) in name.iter_mut().enumerate() {
                if i % 2 == 1 {
                    byte.make_ascii_lowercase();
                }
            }
        }
        _ => {}
    }
}

/// `in_multi`: unsubscribes name what they leave. An argument-less one answers in the order of
/// the server's hash table (see `Seen::Unordered`), and inside EXEC's array that order cannot
/// be compared.
fn pubsub_command(rng: &mut Rng, n: &Names, in_multi: bool) -> Cmd {
    match rng.below(9) {
        0 | 1 => {
            let mut args = vec![b("SUBSCRIBE"), n.channel(rng)];
            if rng.chance(40) {
                args.push(n.channel(rng));
            }
            cmd(args)
        }
        2 => unsubscribe("UNSUBSCRIBE", n.channel(rng), rng, in_multi),
        3 => cmd(vec![b("PSUBSCRIBE"), n.pattern(rng)]),
        4 => unsubscribe("PUNSUBSCRIBE", n.pattern(rng), rng, in_multi),
        5 => cmd(vec![b("SSUBSCRIBE"), n.shard_channel(rng)]),
        6 => unsubscribe("SUNSUBSCRIBE", n.shard_channel(rng), rng, in_multi),
        7 => cmd(vec![b("PING")]),
        _ => cmd(vec![b("PING"), n.value(rng)]),
    }
}

/// `name` with `one` as its argument, or (outside MULTI, half the time) none: leave them all.
fn unsubscribe(name: &str, one: Vec<u8>, rng: &mut Rng, in_multi: bool) -> Cmd {
    if in_multi || rng.chance(50) {
        cmd(vec![b(name), one])
    } else {
        cmd(vec![b(name)])
    }
}

/// A command about the connection itself.
fn connection_command(rng: &mut Rng, n: &Names) -> Cmd {
    match rng.below(18) {
        14..=17 => tracking_command(rng, n.moves),
        0 | 1 => cmd(vec![b("SELECT"), rng.below(4).to_string().into_bytes()]),
        2 => cmd(vec![b("SELECT"), b("99")]),
        3 => cmd(vec![
            b("CLIENT"),
            b("SETNAME"),
            format!("n{}", rng.below(5)).into_bytes(),
        ]),
        4 => cmd(vec![b("CLIENT"), b("SETNAME"), b("has space")]),
        5 => cmd(vec![b("CLIENT"), b("GETNAME")]),
        6 => cmd(vec![b("HELLO"), b("3")]),
        7 => cmd(vec![b("HELLO"), b("2")]),
        8 => cmd(vec![b("HELLO")]),
        9 => cmd(vec![b("HELLO"), b("4")]),
        10 => cmd(vec![
            b("HELLO"),
            rng.pick(&["2", "3"]).as_bytes().to_vec(),
            b("SETNAME"),
            format!("h{}", rng.below(5)).into_bytes(),
        ]),
        11 => cmd(vec![b("RESET")]),
        12 => cmd(vec![b("WATCH"), n.key(rng)]),
        _ => cmd(vec![b("UNWATCH")]),
    }
}

/// Client-side caching: under RESP3 the invalidations come as pushes, also in the middle of
/// EXEC's array and under CLIENT REPLY OFF (under RESP2 without a redirect, Redis sends none).
/// `noloop`: every ON says NOLOOP (see `Names::moves`).
fn tracking_command(rng: &mut Rng, noloop: bool) -> Cmd {
    let mut args: Vec<Vec<u8>> = match rng.below(10) {
        0 | 1 => vec![b("CLIENT"), b("TRACKING"), b("ON")],
        2 => vec![
            b("CLIENT"),
            b("TRACKING"),
            b("ON"),
            rng.pick(&["OPTIN", "OPTOUT"]).as_bytes().to_vec(),
        ],
        // No BCAST: Redis sends those invalidations when its event loop next sleeps, so where
        // they fall among the replies depends on how the pipeline reached it.
        3 => vec![b("CLIENT"), b("TRACKING"), b("ON"), b("NOLOOP")],
        4 | 5 => vec![b("CLIENT"), b("TRACKING"), b("OFF")],
        6 => vec![
            b("CLIENT"),
            b("CACHING"),
            rng.pick(&["YES", "NO"]).as_bytes().to_vec(),
        ],
        7 => vec![b("CLIENT"), b("TRACKINGINFO")],
        8 => vec![b("CLIENT"), b("GETREDIR")],
        _ => vec![b("HELLO"), b("3")],
    };
    if noloop && args[1] == b"TRACKING" && args[2] == b"ON" && args.last() != Some(&b("NOLOOP")) {
        args.push(b("NOLOOP"));
    }
    cmd(args)
}

/// PUBLISH / SPUBLISH to the session's own channels (allowed outside a RESP2 subscription).
fn publish_command(rng: &mut Rng, n: &Names) -> Cmd {
    if rng.chance(70) {
        cmd(vec![b("PUBLISH"), n.channel(rng), n.value(rng)])
    } else {
        cmd(vec![b("SPUBLISH"), n.shard_channel(rng), n.value(rng)])
    }
}

/// One batch of commands, written in one go (in random pieces). Every MULTI opened in a batch
/// is closed in it, so the batch's last reply is always the sentinel PING's.
fn batch(rng: &mut Rng, n: &Names, guess: &mut Guess) -> Vec<Cmd> {
    let mut cmds = Vec::new();
    if let Some(password) = n.client_password
        && !guess.resp2_subscribed()
        && rng.chance(if guess.unauthenticated { 30 } else { 4 })
    {
        let login = auth_command(rng, password, false);
        guess.follow(&login);
        cmds.push(login);
    }
    // No transaction while logged out: MULTI would be refused and its body run at once.
    if !guess.resp2_subscribed() && !guess.unauthenticated && rng.chance(25) {
        // A transaction, sometimes guarded by WATCH. WATCH..EXEC leaves nothing armed.
        if rng.chance(40) {
            let k = n.key(rng);
            cmds.push(cmd(vec![b("WATCH"), k.clone()]));
            cmds.push(cmd(vec![b("GET"), k]));
        }
        cmds.push(cmd(vec![b("MULTI")]));
        // Subscribing and publishing in one transaction is left out: under RESP2 a message to
        // the connection itself then follows EXEC's array looking like any array reply, and
        // where it ends no parser can tell (the scripted RESP3 test covers it).
        let pubsub = rng.chance(50);
        // After a RESET (which Redis runs at once, inside MULTI too) or an EXEC refused for
        // its arguments (which aborts the transaction) the rest runs outside any transaction,
        // and the guess must follow it, until a MULTI opens one again.
        let mut outside = false;
        for _ in 0..rng.below(5) {
            let c = match rng.below(16) {
                0 => refused_command(rng, n),
                11 if rng.chance(40) => odd_command(rng, true, n.client_password.is_some()),
                10 if let Some(password) = n.client_password => auth_command(rng, password, true),
                // Sometimes one that fails when EXEC runs it.
                1 => cmd(vec![
                    b("SELECT"),
                    rng.pick(&["0", "1", "2", "3", "99"]).as_bytes().to_vec(),
                ]),
                2 | 3 if pubsub => pubsub_command(rng, n, true),
                2 | 3 if !guess.patterns_maybe => publish_command(rng, n),
                // Refused at once without aborting the transaction.
                12 => cmd(vec![b("MULTI")]),
                13 => cmd(vec![b("WATCH"), n.key(rng)]),
                // Queued, and run by EXEC: the protocol changes in the middle of EXEC's reply.
                // Not where the transaction publishes: after a HELLO 2 a message to the
                // connection itself is a plain array inside EXEC's (see README, "Known limits").
                14 if pubsub => cmd(vec![b("HELLO"), rng.pick(&["2", "3"]).as_bytes().to_vec()]),
                15 if rng.chance(30) => cmd(vec![b("RESET")]),
                15 => cmd(vec![
                    b("CLIENT"),
                    b("SETNAME"),
                    format!("m{}", rng.below(3)).into_bytes(),
                ]),
                _ => data_command(rng, n, true),
            };
            if !guess.may_send_at(&c, cmds.len()) {
                continue;
            }
            let name = c.args[0].to_ascii_uppercase();
            if (name == b"RESET" && !c.changes_nothing) || name == b"EXEC" {
                outside = true;
            } else if outside && name == b"MULTI" && c.args.len() == 1 {
                outside = false;
            }
            if outside {
                guess.follow(&c);
            } else {
                guess.follow_queued(&c);
            }
            cmds.push(c);
        }
        cmds.push(if rng.chance(80) {
            cmd(vec![b("EXEC")])
        } else {
            cmd(vec![b("DISCARD")])
        });
    } else {
        if !guess.resp2_subscribed() && rng.chance(8) {
            let off = cmd(vec![b("CLIENT"), b("REPLY"), b("OFF")]);
            guess.follow(&off);
            cmds.push(off);
        }
        for _ in 0..1 + rng.below(6) {
            let c = if guess.resp2_subscribed() && rng.chance(80) {
                pubsub_command(rng, n, false)
            } else {
                match rng.below(22) {
                    0..=7 => data_command(rng, n, false),
                    8..=10 => pubsub_command(rng, n, false),
                    11 | 12 => publish_command(rng, n),
                    13 => refused_command(rng, n),
                    20 | 21 => odd_command(rng, false, n.client_password.is_some()),
                    _ => connection_command(rng, n),
                }
            };
            if !guess.may_send_at(&c, cmds.len()) {
                continue;
            }
            if guess.reply_off {
                let mut after = guess.clone();
                after.follow(&c);
                if after.resp2_subscribed() {
                    continue;
                }
            }
            if rng.chance(6) {
                // The reply to `c` is skipped (pub/sub confirmations and messages still come).
                cmds.push(cmd(vec![b("CLIENT"), b("REPLY"), b("SKIP")]));
            }
            // The one WATCH that can stay armed after a batch.
            guess.follow(&c);
            cmds.push(c);
        }
        if guess.reply_off {
            let on = cmd(vec![b("CLIENT"), b("REPLY"), b("ON")]);
            guess.follow(&on);
            cmds.push(on);
        }
    }
    for c in &mut cmds {
        c.inline = c.can_be_inline() && rng.chance(15);
        respell(rng, c);
    }
    cmds
}

/// The HELLO reply carries the connection's id, which differs between any two connections:
/// its digits become `0`, also in a HELLO reply inside EXEC's array.
fn mask_connection_id(raw: &mut Vec<u8>) {
    let hello = b"$6\r\nserver\r\n$5\r\nredis\r\n";
    let field = b"$2\r\nid\r\n:";
    if !raw.windows(hello.len()).any(|w| w == hello) {
        return;
    }
    let mut from = 0;
    while let Some(at) = raw[from..].windows(field.len()).position(|w| w == field) {
        let digits = from + at + field.len();
        let end = digits
            + raw[digits..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
        raw.splice(digits..end, *b"0");
        from = digits;
    }
}

/// What a reply is compared as: its bytes, or its place in a run of replies whose order
/// Redis does not define.
#[derive(PartialEq)]
enum Seen {
    Bytes(Vec<u8>),
    /// Consecutive frames that differ only in one member, whose order comes from a hash table
    /// that every redis-server process seeds at random, so it differs between any two servers
    /// (and, after a move, between two connections to one):
    /// - the confirmations of an argument-less `(P|S)UNSUBSCRIBE` (member: the channel; the
    ///   counts stay in order);
    /// - the `pmessage`s of one message matching several patterns (member: the pattern).
    Unordered {
        /// What the frames share: their kind, RESP2 or RESP3, and for `pmessage` the
        /// channel and the message.
        shared: Vec<Vec<u8>>,
        members: Vec<Option<Vec<u8>>>,
        counts: Vec<i64>,
    },
}

/// What a frame of an unordered run shares with the others, its member, and its count.
type RunMember = (Vec<Vec<u8>>, Option<Vec<u8>>, Option<i64>);

/// The [`RunMember`] of a frame that may belong to an unordered run.
fn unordered_member(frame: &Frame) -> Option<RunMember> {
    let (items, push) = match frame {
        Frame::Push(items) => (items, "push"),
        Frame::Array(items) => (items, "array"),
        _ => return None,
    };
    let bytes = |f: &Frame| match f {
        Frame::Null => Some(None),
        other => other.as_bytes().map(|b| Some(b.to_vec())),
    };
    match items.as_slice() {
        [kind, channel, count]
            if matches!(
                kind.as_bytes(),
                Some(b"unsubscribe" | b"punsubscribe" | b"sunsubscribe")
            ) =>
        {
            let shared = vec![kind.as_bytes()?.to_vec(), push.into()];
            Some((shared, bytes(channel)?, Some(count.as_int()?)))
        }
        [kind, pattern, channel, message] if kind.as_bytes() == Some(b"pmessage") => {
            let shared = vec![
                b"pmessage".to_vec(),
                push.into(),
                channel.as_bytes()?.to_vec(),
                message.as_bytes()?.to_vec(),
            ];
            Some((shared, bytes(pattern)?, None))
        }
        _ => None,
    }
}

/// Adds one reply to what was seen, folding frames of unordered runs together.
fn note_reply(seen: &mut Vec<Seen>, frame: &Frame, mut raw: Vec<u8>) {
    let Some((shared, member, count)) = unordered_member(frame) else {
        mask_connection_id(&mut raw);
        seen.push(Seen::Bytes(raw));
        return;
    };
    match seen.last_mut() {
        Some(Seen::Unordered {
            shared: s,
            members,
            counts,
        }) if *s == shared => {
            let at = members.partition_point(|m| *m <= member);
            members.insert(at, member);
            counts.extend(count);
        }
        _ => seen.push(Seen::Unordered {
            shared,
            members: vec![member],
            counts: count.into_iter().collect(),
        }),
    }
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = |b: &[u8]| support::resp::show(b, 160);
        match self {
            Seen::Bytes(b) => write!(f, "{}", text(b)),
            Seen::Unordered {
                shared,
                members,
                counts,
            } => {
                let shared: Vec<String> = shared.iter().map(|b| text(b)).collect();
                let members: Vec<String> = members
                    .iter()
                    .map(|m| m.as_deref().map_or("nil".into(), text))
                    .collect();
                write!(f, "{shared:?} for each of {members:?} (counts {counts:?})")
            }
        }
    }
}

const INVALIDATE_ALL: &[u8] = b">2\r\n$10\r\ninvalidate\r\n_\r\n";

/// Reads replies up to and including the sentinel's (`PING <tag>`: a bulk, or `pong` and the
/// tag in a RESP2 subscription).
fn read_through_sentinel(conn: &mut RespConn, tag: &[u8], side: &str) -> Result<Vec<Seen>, String> {
    let mut seen = Vec::new();
    loop {
        let (frame, raw) = conn.try_read_reply_raw().map_err(|e| {
            format!(
                "{side}: reading failed after {} replies: {e}; read: {seen:#?}",
                seen.len()
            )
        })?;
        let sentinel = frame.as_bytes() == Some(tag)
            || frame.as_array().is_some_and(|a| {
                a.len() == 2 && a[0].as_bytes() == Some(b"pong") && a[1].as_bytes() == Some(tag)
            })
            || matches!(&frame, Frame::Error(e)
                if e.starts_with("ERR unknown command") && e.contains(&*String::from_utf8_lossy(tag)));
        // The flush-everything invalidation a moved tracking client gets (Redis sends it only
        // after FLUSHALL / FLUSHDB, which the sessions never send).
        if raw != INVALIDATE_ALL {
            note_reply(&mut seen, &frame, raw);
        }
        if sentinel {
            return Ok(seen);
        }
        if seen.len() > 10_000 {
            return Err(format!("{side}: no sentinel after 10000 replies"));
        }
    }
}

/// Writes `bytes` to both connections in the same random pieces.
fn send_in_pieces(rng: &mut Rng, conns: [&mut RespConn; 2], bytes: &[u8]) {
    let mut cuts: Vec<usize> = (0..rng.below(4)).map(|_| rng.below(bytes.len())).collect();
    cuts.push(bytes.len());
    cuts.sort_unstable();
    for conn in conns {
        let mut from = 0;
        for &to in &cuts {
            if to > from {
                conn.send_raw(&bytes[from..to]);
                from = to;
            }
        }
    }
}

/// Sends `bytes` (ending with `PING <tag>`) to both sides and compares what comes back.
fn exchange(
    rng: &mut Rng,
    [direct, proxied]: [&mut RespConn; 2],
    bytes: &[u8],
    tag: &[u8],
) -> Result<(), String> {
    send_in_pieces(rng, [&mut *direct, &mut *proxied], bytes);
    let want = read_through_sentinel(direct, tag, "direct")?;
    let got = read_through_sentinel(proxied, tag, "through rotaproxy")
        .map_err(|e| format!("{e}\nRedis answered: {want:#?}"))?;
    if got != want {
        return Err(format!(
            "replies differ\nRedis:     {want:#?}\nrotaproxy: {got:#?}"
        ));
    }
    Ok(())
}

/// What happens around the sessions.
#[derive(Clone, Copy)]
struct Disruptions {
    /// Kill the proxy's upstream connections (CLIENT KILL USER) between some batches. Tests
    /// that move sessions otherwise (rotations) set it too (see `Names::moves`).
    kill_upstream_as: Option<&'static str>,
    /// Publish from outside, to both servers, between some batches.
    outside_publishers: bool,
}

struct Twin<'a> {
    direct: &'a RedisServer,
    behind_proxy: &'a RedisServer,
    proxy: std::net::SocketAddr,
    /// The proxy's listener speaks TLS, with a certificate signed by this CA.
    proxy_ca: Option<&'a std::path::Path>,
    /// Clients must authenticate (see `Names::client_password`).
    client_password: Option<&'static str>,
}

impl Twin<'_> {
    fn connect_to_proxy(&self) -> RespConn {
        match self.proxy_ca {
            Some(ca) => RespConn::connect_tls(self.proxy, ca),
            None => RespConn::connect(self.proxy),
        }
    }
}

/// Runs one random session of `steps` batches on both sides; Err describes the first
/// difference.
fn run_session(twin: &Twin<'_>, seed: u64, steps: usize, d: Disruptions) -> Result<(), String> {
    let mut rng = Rng(seed);
    let names = Names {
        prefix: format!("s{seed:x}"),
        moves: d.kill_upstream_as.is_some(),
        client_password: twin.client_password,
    };
    let mut direct = RespConn::connect(twin.direct.addr());
    let mut proxied = twin.connect_to_proxy();
    let mut direct_admin = twin.direct.admin_conn();
    let mut proxied_admin = twin.behind_proxy.admin_conn();
    let mut guess = Guess::logged_out(twin.client_password.is_some());
    let mut log: Vec<String> = Vec::new();
    for step in 0..steps {
        if let Some(user) = d.kill_upstream_as
            && !guess.watch_maybe
            && rng.chance(15)
        {
            // All at once: killed one by one, the session would move to a connection the
            // next kill takes from under it (which the proxy rightly answers with errors).
            let killed = twin.behind_proxy.kill_connections_of(user);
            log.push(format!("[killed {killed} upstream connections]"));
        }
        let cmds = batch(&mut rng, &names, &mut guess);
        let tag = format!("{}:t{step}", names.prefix).into_bytes();
        log.push(format!("--- batch {step}"));
        let mut bytes: Vec<u8> = cmds.iter().flat_map(Cmd::bytes).collect();
        if rng.chance(5) {
            // An empty inline line: Redis skips it without a reply.
            bytes.splice(0..0, b"\r\n".iter().copied());
        }
        // The sentinel: a PING echoes the tag; a logged-out client's PING is refused, so
        // there a command named after the tag, which Redis refuses quoting its name whether
        // the client has logged in or not.
        if names.client_password.is_some() {
            bytes.extend(encode_cmd(&[&tag]));
        } else {
            bytes.extend(encode_cmd(&[b"PING".as_slice(), &tag]));
        }
        for c in &cmds {
            log.push(format!(
                "{}{}",
                if c.inline { "(inline) " } else { "" },
                support::resp::show(&c.bytes(), 100)
            ));
        }
        let context = |log: &[String]| {
            let from = log.len().saturating_sub(40);
            format!(
                "seed {seed} (ROTAPROXY_DIFF_SEED={seed}), step {step}; last commands:\n  {}",
                log[from..].join("\n  ")
            )
        };
        exchange(&mut rng, [&mut direct, &mut proxied], &bytes, &tag)
            .map_err(|e| format!("{e}\n{}", context(&log)))?;
        // Not after the last batch: a message still on its way could come before or after the
        // +OK the proxy answers QUIT with (below).
        if d.outside_publishers && step + 1 < steps && rng.chance(20) {
            let args = [
                b"PUBLISH".to_vec(),
                names.channel(&mut rng),
                names.value(&mut rng),
            ];
            let to_direct = direct_admin.cmd(&args);
            let to_proxied = proxied_admin.cmd(&args);
            log.push(format!(
                "[outside: {}]",
                support::resp::show(&encode_cmd(&args), 80)
            ));
            if to_direct != to_proxied {
                return Err(format!(
                    "an outside PUBLISH reached {to_direct:?} subscribers on Redis, {to_proxied:?} behind rotaproxy\n{}",
                    context(&log)
                ));
            }
        }
    }
    quit_both([&mut direct, &mut proxied]).map_err(|e| {
        format!(
            "{e}\n  {}",
            log[log.len().saturating_sub(40)..].join("\n  ")
        )
    })
}

/// Sends QUIT to both sides and compares the answers. The proxy answers QUIT itself, after
/// every reply it still expects: one it expects and Redis never sends (its count went wrong,
/// which the bytes of the replies need not show) holds the +OK back.
fn quit_both([direct, proxied]: [&mut RespConn; 2]) -> Result<(), String> {
    let quit = encode_cmd(&["QUIT"]);
    direct.send_raw(&quit);
    proxied.send_raw(&quit);
    let want = direct.try_read_reply_raw().map(|(_, raw)| raw);
    let got = proxied.try_read_reply_raw().map(|(_, raw)| raw);
    if got.as_ref().ok() != want.as_ref().ok() {
        return Err(format!(
            "QUIT at the end: Redis answered {want:?}, rotaproxy {got:?} (a reply the proxy \
             still expected?)"
        ));
    }
    Ok(())
}

/// A reply the proxy did not expect (its count of replies went the other way) is logged and
/// dropped.
#[track_caller]
fn assert_every_reply_was_expected(proxy: &Proxy) {
    let unexpected: Vec<String> = proxy
        .logs()
        .into_iter()
        .filter(|l| l.contains("nobody asked for"))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:#?}");
}

fn seeds(base: u64, default_count: usize) -> Vec<u64> {
    let base = std::env::var("ROTAPROXY_DIFF_SEED")
        .ok()
        .map(|s| s.parse().expect("ROTAPROXY_DIFF_SEED is a u64"))
        .unwrap_or(base);
    let count = std::env::var("ROTAPROXY_DIFF_SCRIPTS")
        .ok()
        .map(|s| s.parse().expect("ROTAPROXY_DIFF_SCRIPTS is a count"))
        .unwrap_or(default_count);
    (0..count as u64).map(|i| base.wrapping_add(i)).collect()
}

const STEPS: usize = 80;

fn run_sessions(twin: &Twin<'_>, base_seed: u64, sessions: usize, d: Disruptions) {
    for seed in seeds(base_seed, sessions) {
        if let Err(difference) = run_session(twin, seed, STEPS, d) {
            panic!("{difference}");
        }
    }
}

#[test]
fn random_sessions_read_the_same_replies_as_from_redis_itself() {
    let direct = RedisServer::start(RedisOptions::new());
    let behind = RedisServer::start(RedisOptions::new());
    let proxy = Proxy::start(&ProxyConfig::plain(&behind).to_toml(), &[]);
    let twin = Twin {
        direct: &direct,
        behind_proxy: &behind,
        proxy: proxy.client_addr(),
        proxy_ca: None,
        client_password: None,
    };
    run_sessions(
        &twin,
        1,
        12,
        Disruptions {
            kill_upstream_as: None,
            outside_publishers: true,
        },
    );
    assert_every_reply_was_expected(&proxy);
}

/// Clients that must authenticate, on Redis (its default user has a password) and on the proxy
/// (client auth `password`): sessions start logged out and log in now and then, with the right
/// password or a wrong one, by AUTH or HELLO, before or among other commands; RESET logs them
/// out again. Until they log in, every command must be answered as Redis answers it.
#[test]
fn random_sessions_of_clients_that_must_authenticate_read_as_from_redis() {
    const CLIENT_PASSWORD: &str = "client-pw-7f3a";
    let direct = RedisServer::start(RedisOptions::new().requirepass(CLIENT_PASSWORD));
    let behind = RedisServer::start(RedisOptions::new());
    let config = ProxyConfig::plain(&behind).client_password("env:CLIENT_PW");
    let proxy = Proxy::start(&config.to_toml(), &[("CLIENT_PW", CLIENT_PASSWORD)]);
    // Unauthenticated clients are judged by the server's command table, read in the
    // background once the proxy reaches the server.
    proxy.wait_for_command_table();
    let twin = Twin {
        direct: &direct,
        behind_proxy: &behind,
        proxy: proxy.client_addr(),
        proxy_ca: None,
        client_password: Some(CLIENT_PASSWORD),
    };
    run_sessions(
        &twin,
        5_000,
        10,
        Disruptions {
            kill_upstream_as: None,
            outside_publishers: true,
        },
    );
    assert_every_reply_was_expected(&proxy);
    assert_no_secret_in_logs(&proxy, &[CLIENT_PASSWORD]);
}

/// A Redis, and its TLS twin behind a proxy that authenticates as `app` and serves its
/// clients over TLS too.
struct TlsTwin {
    _pki: tempfile::TempDir,
    ca: std::path::PathBuf,
    password: String,
    direct: RedisServer,
    behind: RedisServer,
    proxy: Proxy,
}

impl TlsTwin {
    fn start() -> TlsTwin {
        let pki = temp_dir();
        let certs = Certs::generate(pki.path());
        let password = random_token(24);
        let direct = RedisServer::start(RedisOptions::new());
        let behind = RedisServer::start(
            RedisOptions::new()
                .tls(RedisTls::from_certs(&certs, false))
                .user(&format!("app on >{password} ~* &* +@all")),
        );
        let mut config = ProxyConfig::tls(&behind, &certs.ca)
            .credentials(Some("app"), "env:TEST_UPSTREAM_PASSWORD");
        config.log_level = std::env::var("ROTAPROXY_DIFF_LOG").unwrap_or("info".into());
        config.listener_extra = format!(
            "tls = {{ cert = {}, key = {} }}",
            toml_path(&certs.server.cert),
            toml_path(&certs.server.key)
        );
        let proxy = Proxy::start(&config.to_toml(), &[("TEST_UPSTREAM_PASSWORD", &password)]);
        TlsTwin {
            _pki: pki,
            ca: certs.ca.clone(),
            password,
            direct,
            behind,
            proxy,
        }
    }

    fn twin(&self) -> Twin<'_> {
        Twin {
            direct: &self.direct,
            behind_proxy: &self.behind,
            proxy: self.proxy.client_addr(),
            proxy_ca: Some(&self.ca),
            client_password: None,
        }
    }

    fn assert_no_secret_in_logs(&self) {
        assert_no_secret_in_logs(&self.proxy, &[&self.password]);
    }
}

#[test]
fn random_sessions_are_unchanged_when_upstream_connections_die_between_batches() {
    let env = TlsTwin::start();
    run_sessions(
        &env.twin(),
        1_000,
        10,
        Disruptions {
            kill_upstream_as: Some("app"),
            outside_publishers: true,
        },
    );
    assert_every_reply_was_expected(&env.proxy);
    env.assert_no_secret_in_logs();
}

#[test]
fn random_sessions_are_unchanged_while_the_credential_rotates() {
    let mut env = RotEnv::multi_password("");
    let direct = RedisServer::start(RedisOptions::new());
    let rotations_done = std::sync::atomic::AtomicUsize::new(0);
    let sessions_done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let proxy = env.proxy();
        s.spawn(|| {
            // Rotations back to back while the sessions run (bounded by count and time).
            let deadline = Instant::now() + Duration::from_secs(120);
            while !sessions_done.load(std::sync::atomic::Ordering::SeqCst)
                && rotations_done.load(std::sync::atomic::Ordering::SeqCst) < 40
                && Instant::now() < deadline
            {
                let (code, body) = proxy.http_post("/v1/rotate?wait=true", Some(TOKEN), "");
                assert_eq!(code, 200, "{body}");
                assert!(body.contains("\"success\""), "{body}");
                rotations_done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let twin = Twin {
            direct: &direct,
            behind_proxy: &env.redis,
            proxy: proxy.client_addr(),
            proxy_ca: None,
            client_password: None,
        };
        // No outside publishers: a RESP2 subscriber moves by swapping connections, and a
        // message published while both are subscribed may arrive twice (see README).
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_sessions(
                &twin,
                2_000,
                8,
                Disruptions {
                    kill_upstream_as: Some("app"),
                    outside_publishers: false,
                },
            )
        }));
        sessions_done.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
    let rotations = rotations_done.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        rotations >= 2,
        "only {rotations} rotations ran during the sessions"
    );
    assert_every_reply_was_expected(env.proxy());
    env.remember_current_password();
    let secrets: Vec<&str> = env.secrets.iter().map(String::as_str).collect();
    assert_no_secret_in_logs(env.proxy(), &secrets);
}

/// A scripted session: batches of commands, and kills of the proxy's upstream connections.
enum Step {
    Send(&'static [&'static [&'static str]]),
    /// Commands sent without a sentinel (under `CLIENT REPLY OFF`), and how many frames they
    /// bring (messages).
    SendQuietly(&'static [&'static [&'static str]], usize),
    Kill,
    /// A command another client sends to both servers.
    Outside(&'static [&'static str]),
}

/// Runs `steps` against both sides of a [`TlsTwin`].
fn scripted(steps: &[Step]) {
    let twin = TlsTwin::start();
    let mut direct_conn = RespConn::connect(twin.direct.addr());
    let mut proxied = twin.twin().connect_to_proxy();
    let mut rng = Rng(7);
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Kill => {
                twin.behind.kill_connections_of("app");
            }
            Step::SendQuietly(cmds, frames) => {
                let bytes: Vec<u8> = cmds.iter().flat_map(|c| encode_cmd(c)).collect();
                send_in_pieces(&mut rng, [&mut direct_conn, &mut proxied], &bytes);
                let want = direct_conn.read_replies(*frames);
                let got = proxied.read_replies(*frames);
                assert_eq!(got, want, "step {i} ({cmds:?})");
            }
            Step::Outside(args) => {
                let direct = twin.direct.admin_cmd(args);
                assert_eq!(twin.behind.admin_cmd(args), direct, "step {i} ({args:?})");
            }
            Step::Send(cmds) => {
                let tag = format!("tag{i}");
                let mut bytes: Vec<u8> = cmds.iter().flat_map(|c| encode_cmd(c)).collect();
                bytes.extend(encode_cmd(&["PING", &tag]));
                if let Err(e) = exchange(
                    &mut rng,
                    [&mut direct_conn, &mut proxied],
                    &bytes,
                    tag.as_bytes(),
                ) {
                    panic!("step {i} ({cmds:?}): {e}");
                }
            }
        }
    }
    if let Err(e) = quit_both([&mut direct_conn, &mut proxied]) {
        panic!("{e}");
    }
    assert_every_reply_was_expected(&twin.proxy);
    twin.assert_no_secret_in_logs();
}

#[test]
fn a_transaction_that_publishes_to_its_own_resp3_subscription_keeps_replies_in_step() {
    // Redis 7.0 writes the message into the middle of EXEC's array.
    scripted(&[
        Step::Send(&[&["HELLO", "3"], &["SUBSCRIBE", "a"]]),
        Step::Send(&[
            &["MULTI"],
            &["SET", "k", "v"],
            &["PUBLISH", "a", "m"],
            &["GET", "k"],
            &["EXEC"],
        ]),
        // ... and after a SUBSCRIBE of the same transaction, after the array's elements.
        Step::Send(&[
            &["MULTI"],
            &["SUBSCRIBE", "b", "c"],
            &["PUBLISH", "b", "m"],
            &["EXEC"],
        ]),
        Step::Send(&[&["PUBLISH", "c", "after"], &["GET", "k"]]),
    ]);
}

#[test]
fn a_command_that_failed_inside_a_transaction_is_not_replayed_after_a_move() {
    scripted(&[
        Step::Send(&[&["SELECT", "2"], &["SET", "k", "db2"]]),
        // Refused when EXEC runs them: the db stays 2, the name unset, nothing subscribed.
        Step::Send(&[
            &["MULTI"],
            &["SELECT", "99"],
            &["CLIENT", "SETNAME", "has space"],
            &["SSUBSCRIBE", "s"],
            &["GET", "k"],
            &["EXEC"],
        ]),
        Step::Kill,
        Step::Send(&[&["GET", "k"], &["CLIENT", "GETNAME"], &["HELLO", "3"]]),
        Step::Kill,
        Step::Send(&[&["GET", "k"], &["DBSIZE"]]),
    ]);
}

#[test]
fn pattern_subscriptions_are_replayed_in_the_order_they_were_made() {
    // Redis 7.0 keeps a connection's patterns in a list: PUNSUBSCRIBE answers in the order of
    // subscription (the comparison of `scripted` ignores that order, so this test reads it).
    let password = random_token(24);
    let direct = RedisServer::start(RedisOptions::new());
    let behind = RedisServer::start_with_user("app", &password);
    let config = ProxyConfig::plain(&behind)
        .credentials(Some("app"), "env:TEST_UPSTREAM_PASSWORD")
        .to_toml();
    let proxy = Proxy::start(&config, &[("TEST_UPSTREAM_PASSWORD", &password)]);
    let mut unsubscribed = Vec::new();
    for addr in [direct.addr(), proxy.client_addr()] {
        let mut conn = RespConn::connect(addr);
        conn.send_cmd(&["PSUBSCRIBE", "z*"]);
        conn.send_cmd(&["PSUBSCRIBE", "a*", "m*"]);
        conn.read_replies(3);
        if addr == proxy.client_addr() {
            behind.kill_connections_of("app");
        }
        conn.send_cmd(&["PUNSUBSCRIBE"]);
        unsubscribed.push(conn.read_replies(3));
    }
    let patterns = |frames: &[Frame]| -> Vec<String> {
        frames
            .iter()
            .map(|f| f.as_array().unwrap()[1].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        patterns(&unsubscribed[0]),
        ["z*", "a*", "m*"],
        "Redis itself"
    );
    assert_eq!(
        unsubscribed[1], unsubscribed[0],
        "through rotaproxy, after a move"
    );
}

#[test]
fn a_watch_redis_refused_is_not_lost_and_one_it_kept_is() {
    scripted(&[
        // On a RESP2 subscribed connection Redis refuses WATCH (and MULTI, EXEC): nothing is
        // armed, so after a lost connection the next transaction runs.
        Step::Send(&[&["SUBSCRIBE", "c"], &["WATCH", "k"], &["UNSUBSCRIBE"]]),
        Step::Kill,
        Step::Send(&[&["MULTI"], &["SET", "k", "1"], &["EXEC"]]),
        // ... and refuses UNWATCH: the WATCH stays armed, and when its connection is lost the
        // next EXEC fails as if the key had changed, which it did.
        Step::Send(&[
            &["WATCH", "k"],
            &["SUBSCRIBE", "c"],
            &["UNWATCH"],
            &["UNSUBSCRIBE"],
        ]),
        Step::Outside(&["SET", "k", "2"]),
        Step::Kill,
        Step::Send(&[&["MULTI"], &["SET", "k", "3"], &["EXEC"], &["GET", "k"]]),
    ]);
}

#[test]
fn client_reply_off_and_skip_silence_replies_but_not_pub_sub_as_on_redis() {
    scripted(&[
        // Confirmations and messages come whatever the reply mode (Redis 7.0.15 and later).
        Step::Send(&[
            &["HELLO", "3"],
            &["CLIENT", "REPLY", "OFF"],
            &["SUBSCRIBE", "a", "b"],
            &["GET", "k"],
            &["UNSUBSCRIBE", "b"],
            &["PUBLISH", "a", "to itself"],
            &["CLIENT", "REPLY", "ON"],
        ]),
        Step::Outside(&["PUBLISH", "a", "m"]),
        // A message that comes while OFF is in force.
        Step::SendQuietly(
            &[&["CLIENT", "REPLY", "OFF"], &["PUBLISH", "a", "while off"]],
            1,
        ),
        Step::Send(&[&["CLIENT", "REPLY", "ON"]]),
        // The invalidation a muted write causes comes before ON's +OK.
        Step::Send(&[&["CLIENT", "TRACKING", "ON"], &["GET", "k"]]),
        Step::Send(&[
            &["CLIENT", "REPLY", "OFF"],
            &["SET", "k", "v"],
            &["CLIENT", "REPLY", "ON"],
            // (A tracking client that moves loses the invalidations of keys it read before.)
            &["CLIENT", "TRACKING", "OFF"],
        ]),
        Step::Send(&[
            &["CLIENT", "REPLY", "SKIP"],
            &["SSUBSCRIBE", "s"],
            &["CLIENT", "REPLY", "SKIP"],
            &["PING"],
            &["GET", "k"],
        ]),
        Step::Kill,
        // (The reply shows the subscriptions replayed: the message cannot come before them.)
        Step::Send(&[&["GET", "k"]]),
        Step::Outside(&["SPUBLISH", "s", "after the move"]),
        // RESET turns OFF off, and answers; a SKIP before it silences that answer.
        Step::Send(&[&["CLIENT", "REPLY", "OFF"], &["RESET"], &["GET", "k"]]),
        Step::Send(&[&["CLIENT", "REPLY", "SKIP"], &["RESET"], &["GET", "k"]]),
    ]);
}

#[test]
fn client_reply_is_refused_in_a_resp2_subscription_as_on_redis() {
    scripted(&[
        // Pipelined behind the SUBSCRIBE: refused, so the PING is answered.
        Step::Send(&[&["SUBSCRIBE", "c"], &["CLIENT", "REPLY", "OFF"], &["PING"]]),
        Step::Outside(&["PUBLISH", "c", "m"]),
        // With the subscription confirmed: refused too, after the message sent before it.
        Step::Send(&[&["CLIENT", "REPLY", "SKIP"], &["PING", "x"]]),
        Step::Send(&[
            &["UNSUBSCRIBE"],
            &["CLIENT", "REPLY", "SKIP"],
            &["PING", "y"],
        ]),
    ]);
}

#[test]
fn commands_after_a_hello_are_taken_under_the_protocol_it_set() {
    scripted(&[
        Step::Send(&[
            &["SELECT", "2"],
            &["SET", "k", "db2"],
            &["SELECT", "0"],
            &["SET", "k", "db0"],
        ]),
        // Under RESP3 a subscribed connection takes MULTI: the SELECT is only queued, and
        // discarded.
        Step::Send(&[
            &["HELLO", "3"],
            &["SUBSCRIBE", "a"],
            &["MULTI"],
            &["SELECT", "2"],
            &["DISCARD"],
        ]),
        Step::Kill,
        Step::Send(&[&["GET", "k"], &["RESET"]]),
        // The same with the HELLO run by EXEC (its reply mixes RESP2 and RESP3).
        Step::Send(&[
            &["MULTI"],
            &["GET", "nothing"],
            &["HELLO", "3"],
            &["EXEC"],
            &["SUBSCRIBE", "a"],
            &["MULTI"],
            &["SELECT", "2"],
            &["DISCARD"],
        ]),
        Step::Kill,
        Step::Send(&[&["GET", "k"]]),
    ]);
}

#[test]
fn commands_redis_refuses_at_once_inside_multi_take_no_place_in_exec() {
    // A nested MULTI and a WATCH inside MULTI are answered at once and not queued: what the
    // transaction did is read from EXEC's array without them.
    scripted(&[
        Step::Send(&[&["SELECT", "2"], &["SET", "k", "db2"], &["SELECT", "0"]]),
        Step::Send(&[
            &["MULTI"],
            &["MULTI"],
            &["WATCH", "k"],
            &["SSUBSCRIBE", "s"],
            &["SELECT", "99"],
            &["SELECT", "2"],
            &["EXEC"],
        ]),
        Step::Kill,
        Step::Send(&[&["GET", "k"]]),
        Step::Outside(&["SPUBLISH", "s", "m"]),
        Step::Send(&[&["SUNSUBSCRIBE"], &["GET", "k"]]),
    ]);
}

#[test]
fn a_failure_after_a_subscribe_in_a_transaction_is_read_where_redis_writes_it() {
    // Redis counts SUBSCRIBE a b once in EXEC's array but writes two confirmations, so the
    // SSUBSCRIBE's error (Redis refuses it inside a transaction) comes one element later.
    scripted(&[
        Step::Send(&[
            &["MULTI"],
            &["SUBSCRIBE", "a", "b"],
            &["SSUBSCRIBE", "s"],
            &["GET", "k"],
            &["EXEC"],
        ]),
        Step::Kill,
        // After the move only what Redis really subscribed is replayed.
        Step::Send(&[&["PING"]]),
        Step::Outside(&["SPUBLISH", "s", "m"]),
        Step::Send(&[&["SUNSUBSCRIBE"], &["UNSUBSCRIBE"]]),
        // Past the array's end: the SELECT's error comes after the second confirmation.
        Step::Send(&[&["SELECT", "2"], &["SET", "k", "db2"]]),
        Step::Send(&[
            &["MULTI"],
            &["SUBSCRIBE", "a", "b"],
            &["SUBSCRIBE", "c", "d"],
            &["SELECT", "99"],
            &["EXEC"],
        ]),
        Step::Kill,
        Step::Send(&[&["PING"]]),
        Step::Outside(&["PUBLISH", "d", "m"]),
        Step::Send(&[&["UNSUBSCRIBE"], &["GET", "k"]]),
        // A subscribe that starts past the array announces its confirmations there.
        Step::Send(&[
            &["MULTI"],
            &["SUBSCRIBE", "a", "b"],
            &["SUBSCRIBE", "c", "d"],
            &["SUBSCRIBE", "e", "f"],
            &["EXEC"],
        ]),
        Step::Send(&[&["UNSUBSCRIBE"]]),
        // A subscribe that fails past the array writes one frame, not one per channel.
        Step::Send(&[
            &["MULTI"],
            &["SUBSCRIBE", "a", "b"],
            &["SUBSCRIBE", "c", "d"],
            &["SSUBSCRIBE", "x", "y"],
            &["GET", "k"],
            &["EXEC"],
        ]),
        Step::Send(&[&["UNSUBSCRIBE"]]),
    ]);
}

#[test]
fn commands_pipelined_after_quit_are_not_run() {
    let twin = TlsTwin::start();
    let mut direct = RespConn::connect(twin.direct.addr());
    let mut proxied = twin.twin().connect_to_proxy();
    let pipeline: Vec<u8> = [
        &["SET", "k", "before"][..],
        &["QUIT"],
        &["SET", "k", "after"],
    ]
    .iter()
    .flat_map(|c| encode_cmd(c))
    .collect();
    direct.send_raw(&pipeline);
    proxied.send_raw(&pipeline);
    let want = direct.expect_closed(Duration::from_secs(10));
    let got = proxied.expect_closed(Duration::from_secs(10));
    assert_eq!(got, want);
    assert_eq!(
        twin.behind.admin_cmd(&["GET", "k"]),
        twin.direct.admin_cmd(&["GET", "k"])
    );
}

#[test]
fn commands_redis_refuses_for_their_argument_count_change_nothing() {
    scripted(&[
        // Neither arms a WATCH nor leaves one: after a lost connection the first transaction
        // runs (an armed WATCH would make the proxy answer nil), the second does not (the key
        // changed, and on the lost connection the proxy cannot know otherwise).
        Step::Send(&[&["WATCH"]]),
        Step::Kill,
        Step::Send(&[&["MULTI"], &["SET", "k", "1"], &["EXEC"]]),
        Step::Send(&[&["WATCH", "k"], &["UNWATCH", "x"]]),
        Step::Outside(&["SET", "k", "changed"]),
        Step::Kill,
        Step::Send(&[&["MULTI"], &["SET", "k", "2"], &["EXEC"]]),
        // Neither opens nor ends a transaction, and inside one both abort it.
        Step::Send(&[&["MULTI", "x"], &["SET", "k", "3"], &["EXEC"]]),
        Step::Send(&[&["MULTI"], &["EXEC", "x"], &["SET", "k", "4"], &["EXEC"]]),
        Step::Send(&[&["MULTI"], &["DISCARD", "x"], &["GET", "k"], &["DISCARD"]]),
        // Resets nothing: the db and the name stay, also after a move.
        Step::Send(&[
            &["SELECT", "2"],
            &["CLIENT", "SETNAME", "kept"],
            &["RESET", "x"],
        ]),
        Step::Kill,
        Step::Send(&[
            &["CLIENT", "GETNAME"],
            &["SET", "db2", "x"],
            &["GET", "db2"],
        ]),
        Step::Send(&[&["SELECT", "0"], &["GET", "db2"]]),
    ]);
}

#[test]
fn auth_and_hello_are_refused_or_queued_as_on_redis() {
    scripted(&[
        Step::Send(&[
            &["AUTH"],
            &["AUTH", "a", "b", "c"],
            &["AUTH", "default", "anything"],
            &["HELLO", "03"],
            &["HELLO", "3", "AUTH", "default"],
            &["HELLO", "3", "AUTH", "default", "x", "BAD"],
            &["HELLO", "2", "SETNAME"],
        ]),
        // Inside MULTI Redis queues AUTH and HELLO and runs them in EXEC.
        Step::Send(&[
            &["MULTI"],
            &["AUTH", "default", "anything"],
            &["HELLO", "2", "AUTH", "default", "x"],
            &["HELLO", "4"],
            &["EXEC"],
        ]),
        // ... but refuses an AUTH without arguments at once, and aborts the transaction.
        Step::Send(&[&["MULTI"], &["AUTH"], &["SET", "k", "1"], &["EXEC"]]),
        Step::Send(&[&["GET", "k"]]),
        // A subscribed RESP2 connection refuses both, whatever their arguments.
        Step::Send(&[
            &["SUBSCRIBE", "c"],
            &["AUTH", "default", "anything"],
            &["AUTH", "a", "b", "c"],
            &["AUTH"],
            &["HELLO", "3", "AUTH", "default", "x"],
            &["UNSUBSCRIBE"],
        ]),
    ]);
}

#[test]
fn answers_the_proxy_makes_come_after_the_invalidations_redis_writes_before_them() {
    // Redis writes the invalidation of a key the connection tracks right after the reply of
    // the write that changed it; the proxy's own answer to what follows must not overtake it.
    scripted(&[
        Step::Send(&[&["HELLO", "3"], &["CLIENT", "TRACKING", "ON"]]),
        Step::Send(&[&["GET", "k"]]),
        Step::Send(&[&["SET", "k", "1"], &["AUTH", "default", "anything"]]),
        Step::Send(&[&["GET", "k"]]),
        Step::Send(&[
            &["SET", "k", "2"],
            &["HELLO", "3", "AUTH", "default", "x", "BAD"],
        ]),
        Step::Send(&[&["GET", "k"]]),
        Step::Send(&[&["SET", "k", "3"], &["AUTH", "a", "b", "c"]]),
        // A message the connection published to itself, likewise.
        Step::Send(&[&["SUBSCRIBE", "c"]]),
        Step::Send(&[&["PUBLISH", "c", "m"], &["AUTH", "default", "anything"]]),
    ]);
}
