//! Following renewed TLS material without a restart: the upstream client certificate, its key
//! and the CA bundle, and the listener's own certificate.
//!
//! Certificates are rotated outside the proxy (cert-manager, a secrets agent, an operator with
//! a new CA bundle): rotaproxy watches the files ([`crate::watch`]) and follows. On Redis Cloud
//! the proxy can also make its own ([`crate::rotation::client_cert`]), which writes them
//! through [`UpstreamTlsFiles::install`] and from there takes the same path.
//!
//! The upstream server's certificate is only observed: [`note_upstream_server_certificate`]
//! keeps its expiry and summary for operators.
//!
//! - **Upstream.** New files are used only once they are proven: they must load (a certificate
//!   with the key that belongs to it; a half-written pair is waited out), and a fresh connection
//!   made with them must be accepted by the server, TLS handshake and AUTH. Then they become a
//!   new generation, and sessions move to connections made with them at their next safe point,
//!   exactly as after a password rotation (never by re-AUTH in place: that would keep the old
//!   certificate). Files the server refuses are retried at every poll, and counted and logged
//!   once per content, never applied: a client certificate from a CA the server does not trust
//!   yet changes nothing until the server trusts it.
//! - **Listener.** A renewed certificate serves the next client handshake; connections already
//!   open keep theirs.
//!
//! With rotation configured, the rotation task applies upstream changes between rotations, so a
//! generation never mixes up a credential and TLS material (see [`RotationHandle::change_tls`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, gauge};
use serde_json::json;

use crate::config::{ListenerTlsConfig, TimeoutsConfig};
use crate::credentials::Generations;
use crate::files::write_durably;
use crate::metrics::Metrics;
use crate::rotation::RotationHandle;
use crate::tls::{self, CertSummary, ListenerTls, UpstreamTls};
use crate::upstream::connector;
use crate::upstream::pool::Pool;
use crate::watch::{FileWatch, contents_digest, first_unreadable};

pub fn describe_metrics() {
    describe_counter!(
        "rotaproxy_tls_reloads_total",
        "Changed TLS files looked at, by side (upstream, listener) and result (applied, or refused: unusable or not accepted by the server)"
    );
    describe_gauge!(
        "rotaproxy_tls_reload_pending",
        "1 while the TLS files on disk differ from the ones in use because they were refused, by side"
    );
    describe_gauge!(
        "rotaproxy_tls_certificate_expiry_timestamp_seconds",
        "notAfter of the certificate in use (Unix seconds), by side: upstream (the client certificate), listener, upstream_server (as the server last presented it)"
    );
}

/// Which TLS material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client certificate, key and CA bundle used towards the upstream.
    Upstream,
    /// The certificate the client listener presents.
    Listener,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Upstream => "upstream",
            Side::Listener => "listener",
        }
    }
}

/// What `/v1/status` shows about TLS material: the certificates in use and the last reload.
#[derive(Default)]
pub struct TlsStatus {
    sides: Mutex<[SideStatus; 2]>,
}

#[derive(Default, Clone)]
struct SideStatus {
    configured: bool,
    certificate: Option<CertSummary>,
    pending: bool,
    last_reload: Option<serde_json::Value>,
}

impl TlsStatus {
    fn with<R>(&self, side: Side, f: impl FnOnce(&mut SideStatus) -> R) -> R {
        let mut sides = self.sides.lock().expect("not poisoned");
        f(&mut sides[side as usize])
    }

    /// Records the certificate in use at start-up.
    pub fn started(&self, side: Side, certificate: Option<CertSummary>) {
        set_expiry_gauge(side, certificate.as_ref());
        self.with(side, |s| {
            s.configured = true;
            s.certificate = certificate;
        });
    }

    /// New files are in use: the audit event, metrics and status.
    fn applied(&self, side: Side, certificate: Option<CertSummary>, generation: Option<u64>) {
        let what = match side {
            Side::Upstream => {
                "new upstream TLS files in use; sessions move to them at their next safe point"
            }
            Side::Listener => "new listener certificate in use for new client connections",
        };
        tracing::info!(
            target: "rotaproxy::audit",
            event = "tls.reloaded",
            side = side.as_str(),
            generation,
            certificate_subject = certificate.as_ref().map_or("", |c| c.subject.as_str()),
            certificate_serial = certificate.as_ref().map_or("", |c| c.serial.as_str()),
            certificate_not_after = certificate.as_ref().map_or(0, |c| c.not_after),
            "{what}"
        );
        set_expiry_gauge(side, certificate.as_ref());
        gauge!("rotaproxy_tls_reload_pending", "side" => side.as_str()).set(0.0);
        counter!("rotaproxy_tls_reloads_total", "side" => side.as_str(), "result" => "applied")
            .increment(1);
        self.with(side, |s| {
            s.certificate = certificate;
            s.pending = false;
            s.last_reload = Some(json!({
                "at": crate::rotation::state::now_unix(),
                "result": "applied",
                "generation": generation,
            }));
        });
    }

    /// Changed files cannot be used: the audit event (the caller says it once per content and
    /// reason), metrics and status.
    fn refused(&self, side: Side, reason: &str) {
        tracing::warn!(
            target: "rotaproxy::audit",
            event = "tls.refused",
            side = side.as_str(),
            error = %reason,
            "the {} TLS files changed but cannot be used; keeping the ones in use and trying again at every change and poll",
            side.as_str()
        );
        gauge!("rotaproxy_tls_reload_pending", "side" => side.as_str()).set(1.0);
        counter!("rotaproxy_tls_reloads_total", "side" => side.as_str(), "result" => "refused")
            .increment(1);
        self.with(side, |s| {
            s.pending = true;
            s.last_reload = Some(json!({
                "at": crate::rotation::state::now_unix(),
                "result": "refused",
                "error": reason,
            }));
        });
    }

    /// The files are back to the ones in use: nothing is pending any more.
    fn settled(&self, side: Side) {
        gauge!("rotaproxy_tls_reload_pending", "side" => side.as_str()).set(0.0);
        self.with(side, |s| s.pending = false);
    }

    /// The `tls` object of `/v1/status`: one entry per configured side.
    pub fn to_json(&self) -> serde_json::Value {
        let sides = self.sides.lock().expect("not poisoned").clone();
        let mut doc = serde_json::Map::new();
        if let Some((_, server)) = &*UPSTREAM_SERVER_CERT.lock().expect("not poisoned") {
            doc.insert("upstream_server".into(), json!({ "certificate": server }));
        }
        for (side, s) in [Side::Upstream, Side::Listener].into_iter().zip(sides) {
            if s.configured {
                doc.insert(
                    side.as_str().to_string(),
                    json!({
                        "certificate": s.certificate,
                        "reload_pending": s.pending,
                        "last_reload": s.last_reload,
                    }),
                );
            }
        }
        serde_json::Value::Object(doc)
    }
}

/// The upstream server's certificate as last seen in a handshake (its DER, to notice a
/// change without parsing every time).
static UPSTREAM_SERVER_CERT: Mutex<Option<(Vec<u8>, Option<CertSummary>)>> = Mutex::new(None);

/// Records the certificate the upstream server presented in a handshake: its expiry as
/// `rotaproxy_tls_certificate_expiry_timestamp_seconds{side="upstream_server"}`, its summary in
/// status, and a log line when it changes (a server certificate renewed, or a new CA).
pub fn note_upstream_server_certificate(der: &[u8]) {
    let mut seen = UPSTREAM_SERVER_CERT.lock().expect("not poisoned");
    if seen.as_ref().is_some_and(|(last, _)| last == der) {
        return;
    }
    let summary = CertSummary::of(&rustls::pki_types::CertificateDer::from(der));
    if let Some(cert) = &summary {
        gauge!("rotaproxy_tls_certificate_expiry_timestamp_seconds", "side" => "upstream_server")
            .set(cert.not_after as f64);
        tracing::info!(
            subject = %cert.subject,
            issuer = %cert.issuer,
            serial = %cert.serial,
            not_after = cert.not_after,
            "upstream server certificate"
        );
    }
    *seen = Some((der.to_vec(), summary));
}

fn set_expiry_gauge(side: Side, certificate: Option<&CertSummary>) {
    if let Some(cert) = certificate {
        gauge!("rotaproxy_tls_certificate_expiry_timestamp_seconds", "side" => side.as_str())
            .set(cert.not_after as f64);
    }
}

/// How a proven set of upstream TLS material becomes the current generation.
pub enum Publisher {
    /// No rotation configured: nothing else publishes generations.
    Direct {
        generations: Arc<Generations>,
        pool: Pool,
    },
    /// The rotation task applies it between rotations.
    Rotation(RotationHandle),
}

impl Publisher {
    /// Publishes a generation with `config` and returns its id.
    async fn publish(&self, config: Arc<rustls::ClientConfig>) -> Result<u64, String> {
        match self {
            Publisher::Direct { generations, pool } => {
                let current = generations.current();
                let published = generations.publish(current.with_tls(current.id + 1, config));
                pool.purge_old_generations();
                Ok(published.id)
            }
            Publisher::Rotation(rotation) => rotation.change_tls(config).await,
        }
    }
}

/// The upstream TLS files and what is known about them: shared by the task that follows them
/// and by the client-certificate rotation, which installs new ones
/// ([`UpstreamTlsFiles::install`]).
pub struct UpstreamTlsFiles {
    tls: UpstreamTls,
    poll_interval: Duration,
    generations: Arc<Generations>,
    publisher: Publisher,
    timeouts: TimeoutsConfig,
    metrics: Metrics,
    status: Arc<TlsStatus>,
    /// Held while the files are looked at or replaced, so the follower never reads a pair the
    /// rotation is halfway through writing.
    book: tokio::sync::Mutex<Book>,
}

/// Everything the upstream follower needs.
pub struct UpstreamFilesParts {
    pub tls: UpstreamTls,
    /// Digest of the files the first generation was built from (read before building it, so
    /// a change made meanwhile is not missed).
    pub loaded: Option<u64>,
    pub poll_interval: Duration,
    pub generations: Arc<Generations>,
    pub publisher: Publisher,
    pub timeouts: TimeoutsConfig,
    pub metrics: Metrics,
    pub status: Arc<TlsStatus>,
}

impl UpstreamTlsFiles {
    pub fn new(parts: UpstreamFilesParts) -> Arc<UpstreamTlsFiles> {
        Arc::new(UpstreamTlsFiles {
            tls: parts.tls,
            poll_interval: parts.poll_interval,
            generations: parts.generations,
            publisher: parts.publisher,
            timeouts: parts.timeouts,
            metrics: parts.metrics,
            status: parts.status,
            book: tokio::sync::Mutex::new(Book::new(parts.loaded)),
        })
    }

    fn paths(&self) -> Vec<PathBuf> {
        self.tls
            .files()
            .into_iter()
            .map(Path::to_path_buf)
            .collect()
    }

    /// The client certificate and key files, if there are any.
    pub fn client_cert_paths(&self) -> Option<(&Path, &Path)> {
        self.tls
            .client_cert
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()))
    }

    /// The client certificate as it is on disk now.
    pub fn client_cert_summary(&self) -> Option<CertSummary> {
        self.tls.client_cert_summary()
    }

    /// Follows the files until the process ends. Does nothing without files to follow.
    pub async fn follow(self: Arc<Self>) {
        let files = self.paths();
        if files.is_empty() {
            return;
        }
        let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        let mut watch = FileWatch::new(&paths, self.poll_interval, "upstream TLS files");
        loop {
            watch.next().await;
            let mut book = self.book.lock().await;
            let Some(digest) = book.changed(Side::Upstream, &paths, &self.status) else {
                continue;
            };
            match self.try_apply().await {
                Ok(generation) => self.applied(&mut book, digest, generation),
                Err(reason) => book.refused(Side::Upstream, digest, &reason, &self.status),
            }
        }
    }

    /// Replaces the client certificate and key files with `cert_pem` and `key_pem` (each
    /// written aside, fsynced and renamed over the old one; the key with mode 0600) and puts
    /// them in use as [`Self::follow`] would: proven with a fresh connection, then published.
    /// Returns the new generation's id. A pair that is refused is taken back: the old files
    /// are written again, so a restart never starts with a certificate the server refused.
    pub async fn install(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<u64, String> {
        let Some((cert, key)) = self.client_cert_paths() else {
            return Err("upstream.client_cert and client_key are not set".into());
        };
        let mut book = self.book.lock().await;
        let read =
            |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let (old_cert, old_key) = (read(cert)?, read(key)?);
        let write = |cert_pem: &[u8], key_pem: &[u8]| {
            write_durably(key, key_pem, 0o600)
                .and_then(|()| write_durably(cert, cert_pem, 0o644))
                .map_err(|e| format!("cannot write the client certificate files: {e}"))
        };
        write(cert_pem, key_pem)?;
        let files = self.paths();
        let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        let digest = contents_digest(&paths)
            .ok_or_else(|| "cannot read back the client certificate files".to_string())?;
        match self.try_apply().await {
            Ok(generation) => {
                self.applied(&mut book, digest, generation);
                Ok(generation)
            }
            Err(reason) => {
                write(&old_cert, &old_key)?;
                Err(reason)
            }
        }
    }

    fn applied(&self, book: &mut Book, digest: u64, generation: u64) {
        self.status.applied(
            Side::Upstream,
            self.tls.client_cert_summary(),
            Some(generation),
        );
        book.applied(digest);
    }

    /// Loads the files, proves them with a fresh connection, and publishes them.
    async fn try_apply(&self) -> Result<u64, String> {
        let config = tls::upstream_client_config(&self.tls).map_err(|e| e.to_string())?;
        // Id 0: a probe of material that is not published (see `Generation::live_connections`).
        let candidate = Arc::new(self.generations.current().with_tls(0, config.clone()));
        connector::probe(&candidate, &self.timeouts, &self.metrics)
            .await
            .map_err(|e| format!("a connection made with them was refused: {e}"))?;
        self.publisher.publish(config).await
    }
}

/// Follows the listener's certificate, key and client CA file (if any) until the process ends.
/// They are applied together, or not at all.
pub async fn follow_listener(
    parts: ListenerTls,
    files: ListenerTlsConfig,
    loaded: Option<u64>,
    status: Arc<TlsStatus>,
) {
    let paths = files.files();
    let mut watch = FileWatch::new(&paths, files.poll_interval, "listener TLS files");
    let mut book = Book::new(loaded);
    loop {
        watch.next().await;
        let Some(digest) = book.changed(Side::Listener, &paths, &status) else {
            continue;
        };
        let loaded = tls::load_listener_cert(&files.cert, &files.key).and_then(|certified| {
            let client_ca = match (&files.client_ca, &parts.client_ca) {
                (Some(path), Some(_)) => Some(tls::load_client_ca(
                    path,
                    files.requires_client_certificates(),
                )?),
                _ => None,
            };
            Ok((certified, client_ca))
        });
        match loaded {
            Ok((certified, client_ca)) => {
                parts.cert.replace(certified);
                if let (Some(verifier), Some(in_use)) = (client_ca, &parts.client_ca) {
                    in_use.replace(verifier);
                }
                status.applied(Side::Listener, parts.cert.summary(), None);
                book.applied(digest);
            }
            Err(err) => book.refused(Side::Listener, digest, &err.to_string(), &status),
        }
    }
}

/// Which contents of a side's files are in use, and which were refused for what reason (so a
/// refusal is logged and counted once, not at every poll).
struct Book {
    in_use: Option<u64>,
    refused: Option<(u64, String)>,
    /// Whether the files' being unreadable was logged (once, until they are readable again).
    unreadable_logged: bool,
}

impl Book {
    fn new(in_use: Option<u64>) -> Book {
        Book {
            in_use,
            refused: None,
            unreadable_logged: false,
        }
    }

    fn applied(&mut self, digest: u64) {
        self.in_use = Some(digest);
        self.refused = None;
    }

    /// After a wake-up: the digest of contents to try, or None when there is nothing to do
    /// (the files hold what is in use, or cannot be read: a replacement under way, a volume
    /// being remounted, which is waited out and said once).
    fn changed(&mut self, side: Side, paths: &[&Path], status: &TlsStatus) -> Option<u64> {
        let Some(digest) = contents_digest(paths) else {
            if !self.unreadable_logged {
                self.unreadable_logged = true;
                tracing::warn!(
                    side = side.as_str(),
                    error = first_unreadable(paths).as_deref().unwrap_or("unknown"),
                    "cannot read the TLS files; keeping the ones in use until they are back"
                );
            }
            return None;
        };
        self.unreadable_logged = false;
        if Some(digest) == self.in_use {
            if self.refused.take().is_some() {
                status.settled(side);
            }
            return None;
        }
        Some(digest)
    }

    /// Records a refusal, and reports it when it is news (other contents, or another reason).
    fn refused(&mut self, side: Side, digest: u64, reason: &str, status: &TlsStatus) {
        let news = self
            .refused
            .as_ref()
            .is_none_or(|(d, r)| *d != digest || r != reason);
        self.refused = Some((digest, reason.to_string()));
        if news {
            status.refused(side, reason);
        }
    }
}
