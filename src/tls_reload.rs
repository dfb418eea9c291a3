//! Following renewed TLS material without a restart: the upstream client certificate, its key
//! and the CA bundle, and the listener's own certificate.
//!
//! Certificates are rotated outside the proxy (cert-manager, a secrets agent, an operator with
//! a new CA bundle): rotaproxy watches the files ([`crate::watch`]) and follows.
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

use crate::config::TimeoutsConfig;
use crate::credentials::Generations;
use crate::metrics::Metrics;
use crate::rotation::RotationHandle;
use crate::tls::{self, CertSummary, ListenerCert, UpstreamTls};
use crate::upstream::connector;
use crate::upstream::pool::Pool;
use crate::watch::{FileWatch, contents_digest};

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
        "notAfter of the certificate in use (Unix seconds), by side"
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

    fn applied(&self, side: Side, certificate: Option<CertSummary>, generation: Option<u64>) {
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

    fn refused(&self, side: Side, reason: &str) {
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

/// Everything the upstream follower needs.
pub struct UpstreamFollower {
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

impl UpstreamFollower {
    /// Follows the files until the process ends. Does nothing without files to follow.
    pub async fn run(self) {
        let files: Vec<PathBuf> = self
            .tls
            .files()
            .into_iter()
            .map(Path::to_path_buf)
            .collect();
        if files.is_empty() {
            return;
        }
        let mut follow = Follow::new(Side::Upstream, &files, self.loaded, self.poll_interval);
        loop {
            let Some(digest) = follow.next_change().await else {
                self.status.settled(Side::Upstream);
                continue;
            };
            match self.try_apply().await {
                Ok(generation) => {
                    let certificate = self.tls.client_cert_summary();
                    tracing::info!(
                        target: "rotaproxy::audit",
                        event = "tls.reloaded",
                        side = "upstream",
                        generation,
                        certificate_subject = certificate.as_ref().map_or("", |c| c.subject.as_str()),
                        certificate_serial = certificate.as_ref().map_or("", |c| c.serial.as_str()),
                        certificate_not_after = certificate.as_ref().map_or(0, |c| c.not_after),
                        "new upstream TLS files in use; sessions move to them at their next safe point"
                    );
                    self.status
                        .applied(Side::Upstream, certificate, Some(generation));
                    follow.applied(digest);
                }
                Err(reason) => {
                    if follow.refused(digest, &reason) {
                        tracing::warn!(
                            target: "rotaproxy::audit",
                            event = "tls.refused",
                            side = "upstream",
                            error = %reason,
                            "the upstream TLS files changed but cannot be used; keeping the ones in use and trying again at every change and poll"
                        );
                        self.status.refused(Side::Upstream, &reason);
                    }
                }
            }
        }
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

/// Follows the listener's certificate and key until the process ends.
pub async fn follow_listener(
    resolver: Arc<ListenerCert>,
    cert: PathBuf,
    key: PathBuf,
    loaded: Option<u64>,
    poll_interval: Duration,
    status: Arc<TlsStatus>,
) {
    let files = [cert.clone(), key.clone()];
    let mut follow = Follow::new(Side::Listener, &files, loaded, poll_interval);
    loop {
        let Some(digest) = follow.next_change().await else {
            status.settled(Side::Listener);
            continue;
        };
        match tls::load_listener_cert(&cert, &key) {
            Ok(certified) => {
                resolver.replace(certified);
                let certificate = resolver.summary();
                tracing::info!(
                    target: "rotaproxy::audit",
                    event = "tls.reloaded",
                    side = "listener",
                    certificate_subject = certificate.as_ref().map_or("", |c| c.subject.as_str()),
                    certificate_serial = certificate.as_ref().map_or("", |c| c.serial.as_str()),
                    certificate_not_after = certificate.as_ref().map_or(0, |c| c.not_after),
                    "new listener certificate in use for new client connections"
                );
                status.applied(Side::Listener, certificate, None);
                follow.applied(digest);
            }
            Err(err) => {
                let reason = err.to_string();
                if follow.refused(digest, &reason) {
                    tracing::warn!(
                        target: "rotaproxy::audit",
                        event = "tls.refused",
                        side = "listener",
                        error = %reason,
                        "the listener's certificate files changed but cannot be used; keeping the certificate in use"
                    );
                    status.refused(Side::Listener, &reason);
                }
            }
        }
    }
}

/// The bookkeeping both followers share: which contents are in use, and which were refused
/// for what reason (so a refusal is logged and counted once, not at every poll).
struct Follow {
    watch: FileWatch,
    files: Vec<PathBuf>,
    in_use: Option<u64>,
    refused: Option<(u64, String)>,
}

impl Follow {
    fn new(side: Side, files: &[PathBuf], in_use: Option<u64>, poll: Duration) -> Follow {
        let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        let what = match side {
            Side::Upstream => "upstream TLS files",
            Side::Listener => "listener TLS files",
        };
        Follow {
            watch: FileWatch::new(&paths, poll, what),
            files: files.to_vec(),
            in_use,
            refused: None,
        }
    }

    /// Waits for a reason to look, then returns the digest of contents to try, or None when
    /// the files hold what is in use again. Files that cannot be read (a replacement under
    /// way, a volume being remounted) are waited out.
    async fn next_change(&mut self) -> Option<u64> {
        loop {
            self.watch.next().await;
            let paths: Vec<&Path> = self.files.iter().map(PathBuf::as_path).collect();
            let Some(digest) = contents_digest(&paths) else {
                continue;
            };
            if Some(digest) == self.in_use {
                if self.refused.take().is_some() {
                    return None;
                }
                continue;
            }
            return Some(digest);
        }
    }

    fn applied(&mut self, digest: u64) {
        self.in_use = Some(digest);
        self.refused = None;
    }

    /// Records a refusal; true when it is news (other contents, or another reason).
    fn refused(&mut self, digest: u64, reason: &str) -> bool {
        let news = self
            .refused
            .as_ref()
            .is_none_or(|(d, r)| *d != digest || r != reason);
        self.refused = Some((digest, reason.to_string()));
        news
    }
}
