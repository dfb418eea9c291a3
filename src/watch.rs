//! Following files that other systems replace: the external credential source, TLS
//! certificates and keys renewed by cert-manager or a secrets agent.
//!
//! Watching a file itself misses the way those systems write: a Kubernetes secret volume swaps a
//! symlink in the file's directory, and most tools write a temporary file and rename it over the
//! old one. So the *directories* are watched, every event there counts as "maybe changed", and a
//! poll catches what events miss (network file systems, overlay quirks). Whoever uses a
//! [`FileWatch`] decides for itself whether anything really changed, by reading the files.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

/// After a change event, how long the directories must stay quiet before the files are read:
/// a tool replacing a certificate and its key writes two files, and reading between the two
/// would see a certificate with the wrong key.
const SETTLE: Duration = Duration::from_millis(150);
/// Longest the settling waits when events never stop coming.
const SETTLE_MAX: Duration = Duration::from_secs(2);

/// Change events in the directories of some files, plus a polling tick.
pub struct FileWatch {
    // Dropping a watcher stops its events.
    _watchers: Vec<notify::RecommendedWatcher>,
    events: mpsc::UnboundedReceiver<()>,
    poll: tokio::time::Interval,
}

impl FileWatch {
    /// Watches the directories holding `files`; `what` names them in the log line written when
    /// a directory cannot be watched (the poll still covers it).
    pub fn new(files: &[&Path], poll_every: Duration, what: &str) -> FileWatch {
        let (tx, events) = mpsc::unbounded_channel();
        let mut dirs: Vec<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent())
            .map(|d| {
                if d.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    d.to_path_buf()
                }
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        let watchers = dirs
            .iter()
            .filter_map(|dir| watch_directory(dir, tx.clone(), what))
            .collect();
        let mut poll = tokio::time::interval(poll_every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        FileWatch {
            _watchers: watchers,
            events,
            poll,
        }
    }

    /// Waits for the next reason to look at the files: a change event (once the directories
    /// have settled) or the poll. The first call returns at once.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.poll.tick() => {}
            Some(()) = self.events.recv() => self.settle().await,
        }
    }

    async fn settle(&mut self) {
        let until = tokio::time::Instant::now() + SETTLE_MAX;
        loop {
            let quiet = tokio::time::sleep(SETTLE);
            tokio::select! {
                _ = quiet => return,
                _ = tokio::time::sleep_until(until) => return,
                Some(()) = self.events.recv() => {}
            }
        }
    }
}

/// Starts watching `dir`; every event becomes a unit message. None (polling only) if the
/// platform or file system cannot watch.
fn watch_directory(
    dir: &Path,
    tx: mpsc::UnboundedSender<()>,
    what: &str,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.send(());
        }
    })
    .inspect_err(|e| tracing::warn!(what, error = %e, "cannot watch for changes; polling only"))
    .ok()?;
    match watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
        Ok(()) => Some(watcher),
        Err(e) => {
            tracing::warn!(what, dir = %dir.display(), error = %e, "cannot watch for changes; polling only");
            None
        }
    }
}

/// A digest of the files' contents, to tell whether anything changed since the last look
/// without keeping the contents (a key file's bytes are a secret). None if one cannot be read.
pub fn contents_digest(files: &[&Path]) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    for file in files {
        let bytes = std::fs::read(file).ok()?;
        hasher.write_usize(bytes.len());
        hasher.write(&bytes);
    }
    Some(hasher.finish())
}

/// The first of `files` that cannot be read now, and why (for a log line).
pub fn first_unreadable(files: &[&Path]) -> Option<String> {
    files.iter().find_map(|f| {
        std::fs::File::open(f)
            .err()
            .map(|e| format!("{}: {e}", f.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_follows_every_files_contents() {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = dir.path().join("a.pem");
        let b = dir.path().join("b.pem");
        std::fs::write(&a, "one").unwrap();
        std::fs::write(&b, "two").unwrap();
        let first = contents_digest(&[&a, &b]).expect("readable");
        assert_eq!(contents_digest(&[&a, &b]), Some(first));
        std::fs::write(&b, "three").unwrap();
        assert_ne!(contents_digest(&[&a, &b]), Some(first));
        // Moving bytes from one file to the other is a change too.
        std::fs::write(&a, "onet").unwrap();
        std::fs::write(&b, "hree").unwrap();
        let moved = contents_digest(&[&a, &b]).expect("readable");
        std::fs::write(&a, "one").unwrap();
        std::fs::write(&b, "three").unwrap();
        assert_ne!(contents_digest(&[&a, &b]), Some(moved));
        std::fs::remove_file(&a).unwrap();
        assert_eq!(contents_digest(&[&a, &b]), None);
    }

    #[tokio::test]
    async fn a_replaced_file_wakes_the_watch_before_the_poll() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("cert.pem");
        std::fs::write(&file, "old").unwrap();
        let mut watch = FileWatch::new(&[&file], Duration::from_secs(3600), "test file");
        watch.next().await; // the poll's first tick
        let tmp = dir.path().join(".cert.pem.tmp");
        std::fs::write(&tmp, "new").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .expect("the rename was seen long before the hourly poll");
    }
}
