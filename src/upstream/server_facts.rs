//! What the proxy knows of the server behind it: its command table and its version.
//!
//! The proxy answers clients that have not authenticated itself (nothing of theirs goes
//! upstream), in the words the server would use: an unknown command or a wrong argument count
//! is judged by the server's own table (see `resp::command_table`), and the `NOAUTH` text of
//! `HELLO` follows its version. Both are read from an upstream connection once one can be
//! had, and read again every `upstream.command_table_refresh`: the server behind a running
//! proxy can change (an upgrade, a failover to another version, a module loaded, a restart with
//! a renamed or disabled command).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis_protocol::resp2::types::OwnedFrame;

use super::connector::{self, UpstreamConn};
use super::pool::Pool;
use crate::resp::command_table::CommandTable;

/// First wait after a failed read; doubled after each failure, up to the refresh interval.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// How long one read may take.
const READ_WITHIN: Duration = Duration::from_secs(10);

/// The server as last read.
#[derive(Debug, PartialEq)]
pub struct ServerFacts {
    /// `None` until the server lets the proxy's user read `COMMAND`.
    pub command_table: Option<Arc<CommandTable>>,
    /// (major, minor) from `HELLO`.
    pub version: Option<(u32, u32)>,
}

/// The facts sessions read; empty until the first read.
pub type KnownServer = ArcSwapOption<ServerFacts>;

/// One reading of the server.
struct Reading {
    /// The table, or why there is none (the server's error code, or what was wrong with it).
    command_table: Result<CommandTable, String>,
    version: Option<(u32, u32)>,
}

/// Reads the server's facts now and every `every`, publishing them in `known` when they
/// change. Runs for the life of the proxy.
pub async fn follow(pool: Pool, known: Arc<KnownServer>, every: Duration) {
    let mut retry = FIRST_RETRY;
    let mut table_missing_reported = false;
    loop {
        let reading = match read(&pool).await {
            Ok(reading) => reading,
            Err(error) => {
                tracing::debug!(error, "server facts not read; trying again");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(every);
                continue;
            }
        };
        retry = FIRST_RETRY;
        let before = known.load_full();
        let command_table = match reading.command_table {
            Ok(table) => {
                table_missing_reported = false;
                Some(Arc::new(table))
            }
            Err(why) => {
                if !table_missing_reported {
                    tracing::warn!(
                        why,
                        "cannot read the server's command table: unauthenticated clients get \
                         NOAUTH for every command, also where Redis would name an unknown \
                         command or a wrong argument count (or, once a table was read, are \
                         judged by that one)"
                    );
                    table_missing_reported = true;
                }
                // The server still has the commands it had: an ACL change that took COMMAND
                // from the proxy's user says nothing about them.
                before.as_ref().and_then(|b| b.command_table.clone())
            }
        };
        let facts = ServerFacts {
            command_table,
            version: reading.version,
        };
        if before.as_deref() != Some(&facts) {
            report(before.as_deref(), &facts);
            known.store(Some(Arc::new(facts)));
        }
        tokio::time::sleep(every).await;
    }
}

/// Logs a new table or version.
fn report(before: Option<&ServerFacts>, now: &ServerFacts) {
    let Some(table) = &now.command_table else {
        return;
    };
    let version = now.version.map(|(major, minor)| format!("{major}.{minor}"));
    if before.is_some_and(|b| b.command_table.is_some()) {
        tracing::info!(
            commands = table.len(),
            version,
            "the server changed (its command table or version): unauthenticated clients are \
             answered by the new one"
        );
    } else {
        tracing::info!(
            commands = table.len(),
            version,
            "read the server's command table"
        );
    }
}

/// One reading on a pooled connection, given back afterwards.
async fn read(pool: &Pool) -> Result<Reading, String> {
    let mut conn = pool.checkout().await.map_err(|e| e.to_string())?;
    let reading = read_on(&mut conn).await;
    if reading.is_ok() {
        pool.checkin(conn);
    }
    reading
}

/// `COMMAND`, then `HELLO` without arguments (which answers the server's facts and changes
/// nothing).
async fn read_on(conn: &mut UpstreamConn) -> Result<Reading, String> {
    let table = connector::command_table(conn, READ_WITHIN)
        .await
        .map_err(|e| e.to_string())?;
    let hello = connector::run_command(conn, &[b"HELLO"], READ_WITHIN)
        .await
        .map_err(|e| e.to_string())?;
    let command_table = match table {
        OwnedFrame::Error(error) => Err(format!(
            "the server refused COMMAND ({})",
            error.split_whitespace().next().unwrap_or("ERR")
        )),
        reply => CommandTable::from_reply(&reply),
    };
    Ok(Reading {
        command_table,
        version: server_version(&hello),
    })
}

/// The `version` field of a HELLO reply (RESP2: a flat list of names and values), as
/// (major, minor).
fn server_version(hello: &OwnedFrame) -> Option<(u32, u32)> {
    let OwnedFrame::Array(fields) = hello else {
        return None;
    };
    let value = fields
        .chunks(2)
        .find(|pair| matches!(&pair[0], OwnedFrame::BulkString(name) if name == b"version"))?
        .get(1)?;
    let OwnedFrame::BulkString(version) = value else {
        return None;
    };
    let mut parts = std::str::from_utf8(version).ok()?.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> OwnedFrame {
        OwnedFrame::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn the_version_is_read_from_hello() {
        let hello = |version: &str| {
            OwnedFrame::Array(vec![
                bulk("server"),
                bulk("redis"),
                bulk("version"),
                bulk(version),
                bulk("proto"),
                OwnedFrame::Integer(2),
            ])
        };
        assert_eq!(server_version(&hello("7.0.15")), Some((7, 0)));
        assert_eq!(server_version(&hello("7.2")), Some((7, 2)));
        assert_eq!(server_version(&hello("unknown")), None);
        assert_eq!(server_version(&OwnedFrame::Null), None);
        // A name in a value's place is not taken for the field.
        let odd = OwnedFrame::Array(vec![bulk("x"), bulk("version"), bulk("7.4.0")]);
        assert_eq!(server_version(&odd), None);
    }
}
