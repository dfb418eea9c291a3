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

use inotify::{Inotify, WatchMask};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// After a change event, how long the directories must stay quiet before the files are read:
/// a tool replacing a certificate and its key writes two files, and reading between the two
/// would see a certificate with the wrong key.
const SETTLE: Duration = Duration::from_millis(150);
/// Longest the settling waits when events never stop coming.
const SETTLE_MAX: Duration = Duration::from_secs(2);

/// What happens in a watched directory that may change a file in it: written, created, deleted,
/// renamed in or out (a symlink swapped, a temporary file renamed over the old one), its mode
/// changed; and the directory itself going away.
const CHANGES: WatchMask = WatchMask::MODIFY
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF);

/// Change events in the directories of some files, plus a polling tick.
///
/// The events come from one inotify descriptor read on the runtime's own thread, not from a
/// watcher thread (as the `notify` crate runs one for each directory): a process with a second
/// thread pays for it on every system call (the kernel counts references to each file it is
/// handed, which a single-threaded process skips) and on every allocation (glibc's arena
/// locks). Side by side with a TLS upstream, whose CA file is watched, the thread cost 0.6-1.1%
/// of the CPU per request (benches/README.md).
pub struct FileWatch {
    /// None when the directories cannot be watched: the poll alone finds changes.
    events: Option<AsyncFd<Inotify>>,
    poll: tokio::time::Interval,
}

impl FileWatch {
    /// Watches the directories holding `files`; `what` names them in the log line written when
    /// a directory cannot be watched (the poll still covers it). Called on the runtime.
    pub fn new(files: &[&Path], poll_every: Duration, what: &str) -> FileWatch {
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
        let mut poll = tokio::time::interval(poll_every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        FileWatch {
            events: watch_directories(&dirs, what),
            poll,
        }
    }

    /// Waits for the next reason to look at the files: a change event (once the directories
    /// have settled) or the poll. The first call returns at once.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.poll.tick() => {}
            () = changed(&mut self.events) => self.settle().await,
        }
    }

    async fn settle(&mut self) {
        let until = tokio::time::Instant::now() + SETTLE_MAX;
        loop {
            let quiet = tokio::time::sleep(SETTLE);
            tokio::select! {
                _ = quiet => return,
                _ = tokio::time::sleep_until(until) => return,
                () = changed(&mut self.events) => {}
            }
        }
    }
}

/// One inotify descriptor watching `dirs`, registered with the runtime. None (polling only) if
/// none of them can be watched.
fn watch_directories(dirs: &[PathBuf], what: &str) -> Option<AsyncFd<Inotify>> {
    if dirs.is_empty() {
        return None;
    }
    let inotify = Inotify::init()
        .inspect_err(|e| tracing::warn!(what, error = %e, "cannot watch for changes; polling only"))
        .ok()?;
    let mut watching = 0;
    for dir in dirs {
        match inotify.watches().add(dir, CHANGES) {
            Ok(_) => watching += 1,
            Err(e) => {
                tracing::warn!(what, dir = %dir.display(), error = %e, "cannot watch for changes; polling only");
            }
        }
    }
    if watching == 0 {
        return None;
    }
    // (Registering needs the runtime; `FileWatch::new` has one, as its interval does.)
    // SAFETY: `Inotify` owns its descriptor (shared only with the `Watches` handles dropped
    // above) and closes it when dropped, so the descriptor stays open, and the same, for as
    // long as the `AsyncFd` owns it.
    unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }
        .inspect_err(|e| tracing::warn!(what, error = %e, "cannot watch for changes; polling only"))
        .ok()
}

/// Completes once change events have come, having taken those waiting; never without events.
/// Cancel-safe: events are taken only in the step that completes.
async fn changed(events: &mut Option<AsyncFd<Inotify>>) {
    let Some(fd) = events else {
        return std::future::pending().await;
    };
    let failed = loop {
        let mut ready = match fd.readable_mut().await {
            Ok(ready) => ready,
            Err(e) => break e,
        };
        // Every event counts the same, so one buffer's worth says enough; any left wake the
        // next wait at once. (4 KiB holds at least one event with the longest name.)
        let mut buf = [0u8; 4096];
        match ready.try_io(|inotify| inotify.get_mut().read_events(&mut buf).map(|_| ())) {
            Ok(Ok(())) => return,
            Ok(Err(e)) => break e,
            Err(_would_block) => continue,
        }
    };
    tracing::warn!(error = %failed, "cannot read file change events any more; polling only");
    *events = None;
    std::future::pending().await
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

    /// Long enough that a wait ended by the poll would fail the tests below.
    const NO_POLL: Duration = Duration::from_secs(3600);
    /// Bound for a wait that events must end.
    const EVENT_WITHIN: Duration = Duration::from_secs(30);

    /// A Kubernetes secret volume: the files are symlinks through `..data`, and an update
    /// swaps that symlink to a new directory; the watched files themselves are never written.
    #[tokio::test]
    async fn a_secret_volume_swapping_its_data_link_ends_the_wait() {
        let dir = tempfile::tempdir().expect("temp dir");
        let volume = dir.path();
        let version = |n: u32, contents: &str| {
            let at = volume.join(format!("..2026_12_02_{n}"));
            std::fs::create_dir(&at).unwrap();
            std::fs::write(at.join("password"), contents).unwrap();
            at
        };
        let v1 = version(1, "one");
        std::os::unix::fs::symlink(&v1, volume.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/password", volume.join("password")).unwrap();
        let password = volume.join("password");
        let mut watch = FileWatch::new(&[&password], NO_POLL, "test files");
        watch.next().await;

        let v2 = version(2, "two");
        std::os::unix::fs::symlink(&v2, volume.join("..data_tmp")).unwrap();
        std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
        tokio::time::timeout(EVENT_WITHIN, watch.next())
            .await
            .expect("the swap was seen");
        assert_eq!(std::fs::read_to_string(&password).unwrap(), "two");
    }

    #[tokio::test]
    async fn a_directory_that_cannot_be_watched_is_still_polled() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("not-yet").join("tls.crt");
        let mut watch = FileWatch::new(&[&missing], Duration::from_millis(20), "test files");
        assert!(watch.events.is_none());
        for _ in 0..3 {
            tokio::time::timeout(EVENT_WITHIN, watch.next())
                .await
                .expect("the poll ends each wait");
        }
    }

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
        let mut watch = FileWatch::new(&[&file], NO_POLL, "test file");
        watch.next().await; // the poll's first tick
        let tmp = dir.path().join(".cert.pem.tmp");
        std::fs::write(&tmp, "new").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        tokio::time::timeout(EVENT_WITHIN, watch.next())
            .await
            .expect("the rename was seen long before the hourly poll");
        // Written in place, too.
        std::fs::write(&file, "newer").unwrap();
        tokio::time::timeout(EVENT_WITHIN, watch.next())
            .await
            .expect("the write was seen long before the hourly poll");
    }
}
