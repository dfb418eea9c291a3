//! Client certificates the proxy makes and rotates itself, on Redis Cloud.
//!
//! A Redis Cloud database with TLS client authentication trusts the certificates in its
//! `clientTlsCertificates` list, and a change to that list is a REST API task (see
//! `redis-cloud-api.md`). The proxy owns its certificate like it owns its password:
//!
//! 1. **create** — a new key pair and a self-signed certificate (ECDSA P-256, `validity`), the
//!    key written to the state directory (mode 0600) and the job to its state file *before*
//!    the API hears of it;
//! 2. **set** — `clientTlsCertificates = [old, new]`, the task id persisted, then waited for;
//! 3. **install** — the pair written over `upstream.client_cert` / `client_key`, proven with a
//!    fresh connection and published as a new generation ([`UpstreamTlsFiles::install`]; a
//!    pair the server refuses puts the old files back);
//! 4. **drain** — sessions move to connections made with the new certificate at their safe
//!    points; waits until no connection of an older generation is left (or `drain_deadline`);
//! 5. **revoke** — `clientTlsCertificates = [new]`.
//!
//! Every step is resumed after a crash from the state file. A rotation starts when the
//! certificate in use has less than `renew_before` left (checked at start-up and every
//! `check_interval`), or on `POST /v1/client-certificate/rotate`. The list on the database is
//! the proxy's: certificates other than the old and the new one are not kept.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use metrics::counter;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Notify, watch};

use super::state::now_unix;
use crate::cloud::{CloudClient, CloudError, DatabaseRef, TaskId};
use crate::config::ClientCertRotationConfig;
use crate::credentials::Generations;
use crate::files::write_durably;

use crate::tls_reload::UpstreamTlsFiles;

const JOB_FILE: &str = "client-certificate-rotation.json";
const PENDING_KEY_FILE: &str = "client-certificate-pending-key.pem";
/// Tries of a freshly registered certificate before the install step gives up for now: the
/// server may take a moment to apply a completed change.
const INSTALL_TRIES: u32 = 10;
const INSTALL_RETRY: Duration = Duration::from_millis(500);
/// Backdating of a new certificate's notBefore, for servers whose clock runs behind.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Step {
    Set,
    Install,
    Drain,
    Revoke,
}

impl Step {
    fn as_str(self) -> &'static str {
        match self {
            Step::Set => "set",
            Step::Install => "install",
            Step::Drain => "drain",
            Step::Revoke => "revoke",
        }
    }
}

/// A rotation in flight, as persisted. Certificates are public; the new key lives in its own
/// file (mode 0600) until it is installed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: String,
    step: Step,
    started_at: u64,
    trigger: String,
    old_cert: String,
    new_cert: String,
    task_id: Option<String>,
    installed_generation: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
struct Outcome {
    id: String,
    success: bool,
    finished_at: u64,
    error: Option<String>,
}

/// What the rotation needs.
pub struct ClientCertParts {
    pub config: ClientCertRotationConfig,
    /// `drain_deadline` from here, as SIGHUPs change it.
    pub timing: watch::Receiver<crate::config::RotationTiming>,
    pub state_dir: PathBuf,
    pub cloud: CloudClient,
    pub database: DatabaseRef,
    pub files: Arc<UpstreamTlsFiles>,
    pub generations: Arc<Generations>,
}

/// The client-certificate rotation task's handle (cheap to clone).
#[derive(Clone)]
pub struct ClientCertRotation {
    shared: Arc<Shared>,
}

struct Shared {
    config: ClientCertRotationConfig,
    timing: watch::Receiver<crate::config::RotationTiming>,
    state_dir: PathBuf,
    cloud: CloudClient,
    database: DatabaseRef,
    files: Arc<UpstreamTlsFiles>,
    generations: Arc<Generations>,
    job: Mutex<Option<Job>>,
    requested: AtomicBool,
    wake: Notify,
    last: Mutex<Option<Outcome>>,
    last_error: Mutex<Option<String>>,
    /// Bumped when a rotation ends or a step fails: what `POST ...?wait=true` waits for.
    settled: watch::Sender<u64>,
}

#[derive(Debug, thiserror::Error)]
enum CertError {
    #[error("Redis Cloud API: {0}")]
    Cloud(#[from] CloudError),
    #[error("{0}")]
    Other(String),
}

impl ClientCertRotation {
    /// Loads a rotation left in flight and starts the task.
    pub fn start(parts: ClientCertParts) -> anyhow::Result<ClientCertRotation> {
        let job = load_job(&parts.state_dir)?;
        let (settled, _) = watch::channel(0);
        let handle = ClientCertRotation {
            shared: Arc::new(Shared {
                config: parts.config,
                timing: parts.timing,
                state_dir: parts.state_dir,
                cloud: parts.cloud,
                database: parts.database,
                files: parts.files,
                generations: parts.generations,
                job: Mutex::new(job),
                requested: AtomicBool::new(false),
                wake: Notify::new(),
                last: Mutex::new(None),
                last_error: Mutex::new(None),
                settled,
            }),
        };
        let runner = handle.clone();
        tokio::spawn(async move { runner.run().await });
        Ok(handle)
    }

    /// Asks for a rotation now; returns the id of the one in flight, if one already is.
    pub fn request(&self) -> Option<String> {
        let running = self
            .shared
            .job
            .lock()
            .expect("not poisoned")
            .as_ref()
            .map(|j| j.id.clone());
        if running.is_none() {
            self.shared.requested.store(true, Ordering::Release);
        }
        // Also retries a rotation whose step failed, without waiting for the next check.
        self.shared.wake.notify_one();
        running
    }

    /// How many times a rotation ended or a step failed so far (see [`Self::wait_settled`]).
    pub fn settled_count(&self) -> u64 {
        *self.shared.settled.borrow()
    }

    /// Waits until a rotation ends or a step fails after `count` (from
    /// [`Self::settled_count`]), and returns the status then.
    pub async fn wait_settled(&self, count: u64) -> serde_json::Value {
        let mut rx = self.shared.settled.subscribe();
        while *rx.borrow_and_update() <= count {
            if rx.changed().await.is_err() {
                break;
            }
        }
        self.status()
    }

    /// The `client_certificate_rotation` object of `/v1/status`. Never a key.
    pub fn status(&self) -> serde_json::Value {
        let s = &self.shared;
        let job = s.job.lock().expect("not poisoned").clone();
        json!({
            "in_progress": job.map(|j| json!({
                "id": j.id,
                "step": j.step.as_str(),
                "started_at": j.started_at,
                "trigger": j.trigger,
            })),
            "last": s.last.lock().expect("not poisoned").clone(),
            "last_error": s.last_error.lock().expect("not poisoned").clone(),
            "renew_before_seconds": s.config.renew_before.as_secs(),
        })
    }

    async fn run(self) {
        let s = &self.shared;
        loop {
            let resume = s.job.lock().expect("not poisoned").is_some();
            let requested = s.requested.swap(false, Ordering::AcqRel);
            if resume {
                self.run_job().await;
            } else if requested {
                self.begin("api").await;
            } else if let Some(left) = self.lifetime_left()
                && left < s.config.renew_before
            {
                tracing::info!(
                    days_left = left.as_secs() / 86_400,
                    "the client certificate expires soon; rotating it"
                );
                self.begin("expiry").await;
            }
            if s.job.lock().expect("not poisoned").is_some()
                && s.last_error.lock().expect("not poisoned").is_none()
            {
                // Created and not failed: go on at once.
                continue;
            }
            tokio::select! {
                _ = s.wake.notified() => {}
                _ = tokio::time::sleep(s.config.check_interval) => {}
            }
        }
    }

    /// What is left of the certificate in use (None if it cannot be read).
    fn lifetime_left(&self) -> Option<Duration> {
        let summary = self.shared.files.client_cert_summary()?;
        let not_after =
            SystemTime::UNIX_EPOCH + Duration::from_secs(summary.not_after.max(0) as u64);
        Some(
            not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        )
    }

    /// Step 1, create: the key and certificate, the key on disk, then the job.
    async fn begin(&self, trigger: &str) {
        let s = &self.shared;
        *s.last_error.lock().expect("not poisoned") = None;
        let started = Instant::now();
        let id = format!("cert-{}-{}", now_unix(), super::secret::random_hex(4));
        let result = self.create(&id, trigger);
        self.audit(&id, "create", &result, started.elapsed());
        if let Err(err) = result {
            self.finish(&id, Err(err.to_string()));
        }
    }

    fn create(&self, id: &str, trigger: &str) -> Result<(), CertError> {
        let s = &self.shared;
        let (cert_path, _) = s
            .files
            .client_cert_paths()
            .ok_or_else(|| CertError::Other("no upstream.client_cert".into()))?;
        let old_cert = std::fs::read_to_string(cert_path)
            .map_err(|e| CertError::Other(format!("cannot read {}: {e}", cert_path.display())))?
            .trim()
            .to_string();
        let (new_cert, key_pem) = make_certificate(&s.config.subject, id, s.config.validity)?;
        write_durably(
            &s.state_dir.join(PENDING_KEY_FILE),
            key_pem.as_bytes(),
            0o600,
        )
        .map_err(|e| CertError::Other(format!("cannot save the new key: {e}")))?;
        let job = Job {
            id: id.to_string(),
            step: Step::Set,
            started_at: now_unix(),
            trigger: trigger.to_string(),
            old_cert,
            new_cert,
            task_id: None,
            installed_generation: None,
        };
        self.save(&job)?;
        *s.job.lock().expect("not poisoned") = Some(job);
        Ok(())
    }

    /// Runs the job in flight from its step to its end, or until a step fails (the job stays,
    /// and is resumed at the next check).
    async fn run_job(&self) {
        let s = &self.shared;
        loop {
            let Some(job) = s.job.lock().expect("not poisoned").clone() else {
                return;
            };
            fault_injection(job.step).await;
            let started = Instant::now();
            let result = self.run_step(&job).await;
            self.audit(&job.id, job.step.as_str(), &result, started.elapsed());
            match result {
                Ok(Some(next)) => {
                    *s.last_error.lock().expect("not poisoned") = None;
                    let mut next_job = s.job.lock().expect("not poisoned").clone().unwrap_or(job);
                    next_job.step = next;
                    next_job.task_id = None;
                    if let Err(err) = self.save(&next_job) {
                        *s.last_error.lock().expect("not poisoned") = Some(err.to_string());
                        return;
                    }
                    *s.job.lock().expect("not poisoned") = Some(next_job);
                }
                Ok(None) => {
                    self.finish(&job.id, Ok(()));
                    return;
                }
                Err(err) => {
                    // Kept for the next try; counted once per failure.
                    counter!("rotaproxy_client_certificate_rotations_total", "result" => "failed_step")
                        .increment(1);
                    *s.last_error.lock().expect("not poisoned") = Some(err.to_string());
                    s.settled.send_modify(|n| *n += 1);
                    return;
                }
            }
        }
    }

    /// Runs one step; the next one, or None when the rotation is over.
    async fn run_step(&self, job: &Job) -> Result<Option<Step>, CertError> {
        let s = &self.shared;
        match job.step {
            Step::Set => {
                let list = vec![job.old_cert.clone(), job.new_cert.clone()];
                self.apply_list(job, &list).await?;
                Ok(Some(Step::Install))
            }
            Step::Install => {
                let key = std::fs::read(s.state_dir.join(PENDING_KEY_FILE)).map_err(|e| {
                    CertError::Other(format!(
                        "the new key is missing from the state directory: {e}"
                    ))
                })?;
                let mut tries = 0;
                let generation = loop {
                    match s.files.install(job.new_cert.as_bytes(), &key).await {
                        Ok(generation) => break generation,
                        Err(reason) if tries + 1 < INSTALL_TRIES => {
                            tries += 1;
                            tracing::debug!(error = %reason, "new client certificate not accepted yet; trying again");
                            tokio::time::sleep(INSTALL_RETRY).await;
                        }
                        Err(reason) => return Err(CertError::Other(reason)),
                    }
                };
                let mut installed = job.clone();
                installed.installed_generation = Some(generation);
                *s.job.lock().expect("not poisoned") = Some(installed);
                let _ = std::fs::remove_file(s.state_dir.join(PENDING_KEY_FILE));
                Ok(Some(Step::Drain))
            }
            Step::Drain => {
                // After a restart every connection is newer than the job: nothing to wait for.
                if let Some(generation) = job.installed_generation {
                    self.drain(generation).await;
                }
                Ok(Some(Step::Revoke))
            }
            Step::Revoke => {
                self.apply_list(job, std::slice::from_ref(&job.new_cert))
                    .await?;
                Ok(None)
            }
        }
    }

    /// Submits the list (or waits for the task already submitted for this step).
    async fn apply_list(&self, job: &Job, list: &[String]) -> Result<(), CertError> {
        let s = &self.shared;
        let task = match &job.task_id {
            Some(task) => TaskId(task.clone()),
            None => {
                let task = s
                    .cloud
                    .set_database_client_certificates(&s.database, list)
                    .await?;
                let mut submitted = job.clone();
                submitted.task_id = Some(task.as_str().to_string());
                // The task id is on disk before it is waited for.
                self.save(&submitted)?;
                *s.job.lock().expect("not poisoned") = Some(submitted);
                task
            }
        };
        s.cloud.wait_task(&task).await?;
        Ok(())
    }

    /// Waits until no upstream connection is older than `generation`, or the drain deadline.
    async fn drain(&self, generation: u64) {
        let s = &self.shared;
        let deadline = Instant::now() + s.timing.borrow().drain_deadline;
        loop {
            let left = older_connections(&s.generations, generation);
            if left <= 0 {
                return;
            }
            if Instant::now() >= deadline {
                counter!("rotaproxy_drain_deadline_connections_total").increment(left as u64);
                tracing::warn!(
                    target: "rotaproxy::audit",
                    event = "client_certificate.drain_deadline",
                    connections_left = left,
                    "drain deadline reached with connections made with the old client certificate"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn finish(&self, id: &str, result: Result<(), String>) {
        let s = &self.shared;
        let success = result.is_ok();
        *s.job.lock().expect("not poisoned") = None;
        let _ = std::fs::remove_file(s.state_dir.join(JOB_FILE));
        let _ = std::fs::remove_file(s.state_dir.join(PENDING_KEY_FILE));
        *s.last_error.lock().expect("not poisoned") = None;
        *s.last.lock().expect("not poisoned") = Some(Outcome {
            id: id.to_string(),
            success,
            finished_at: now_unix(),
            error: result.as_ref().err().cloned(),
        });
        counter!("rotaproxy_client_certificate_rotations_total", "result" => if success { "success" } else { "failed" })
            .increment(1);
        tracing::info!(
            target: "rotaproxy::audit",
            event = "client_certificate.end",
            rotation_id = id,
            outcome = if success { "success" } else { "failed" },
            error = result.as_ref().err().map_or("", String::as_str),
            "client certificate rotation finished"
        );
        s.settled.send_modify(|n| *n += 1);
    }

    fn save(&self, job: &Job) -> Result<(), CertError> {
        let json = serde_json::to_vec_pretty(job).expect("a job always serializes");
        write_durably(&self.shared.state_dir.join(JOB_FILE), &json, 0o600)
            .map_err(|e| CertError::Other(format!("cannot save the rotation state: {e}")))
    }

    fn audit<T>(&self, id: &str, step: &str, result: &Result<T, CertError>, took: Duration) {
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        let error = result.as_ref().err().map(ToString::to_string);
        let level_warn = result.is_err();
        macro_rules! event {
            ($level:ident) => {
                tracing::$level!(
                    target: "rotaproxy::audit",
                    event = "client_certificate.step",
                    rotation_id = id,
                    step,
                    outcome,
                    duration_ms = took.as_millis() as u64,
                    error = error.as_deref().unwrap_or(""),
                    "client certificate rotation step"
                )
            };
        }
        if level_warn {
            event!(warn);
        } else {
            event!(info);
        }
    }
}

/// Repairs what a crash in the middle of the install step can leave: the two files are
/// replaced one after the other (key first), so the key may be the new one while the
/// certificate is still the old one. Run before the files are first read. Puts in the
/// certificate file whichever of the rotation's two certificates the key file belongs to.
/// Returns whether it changed anything.
pub fn repair_interrupted_install(
    state_dir: &Path,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<bool> {
    let Some(job) = load_job(state_dir)? else {
        return Ok(false);
    };
    if job.step != Step::Install || crate::tls::cert_and_key_match(cert, key) {
        return Ok(false);
    }
    for candidate in [&job.new_cert, &job.old_cert] {
        if crate::tls::cert_pem_matches_key(candidate.as_bytes(), key) {
            write_durably(cert, format!("{}\n", candidate.trim()).as_bytes(), 0o644)?;
            tracing::warn!(
                target: "rotaproxy::audit",
                event = "client_certificate.repaired",
                rotation_id = %job.id,
                "the client certificate file did not match its key after an interrupted install; put back the matching certificate"
            );
            return Ok(true);
        }
    }
    anyhow::bail!(
        "{} and {} do not belong together, and neither certificate of rotation {} matches the key",
        cert.display(),
        key.display(),
        job.id
    )
}

/// The rotation left in flight in `state_dir`, if any. A corrupt file is an error, not
/// nothing: it may be all that points at a key the API already trusts.
fn load_job(state_dir: &Path) -> anyhow::Result<Option<Job>> {
    let path = state_dir.join(JOB_FILE);
    match std::fs::read_to_string(&path) {
        // serde_json's messages name the position, never the content of a string value.
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
            anyhow::anyhow!(
                "{} is corrupt (line {} column {})",
                path.display(),
                e.line(),
                e.column()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    }
}

/// For crash tests: `ROTAPROXY_FAULT_HANG_AT_CERT_STEP=<step>` stops the rotation before that
/// step, so a test can kill the proxy there and check the restart resumes it.
async fn fault_injection(step: Step) {
    super::hang_if_asked(
        "ROTAPROXY_FAULT_HANG_AT_CERT_STEP",
        step.as_str(),
        "client certificate rotation",
    )
    .await;
}

/// Upstream connections open now whose generation is older than `generation`.
fn older_connections(generations: &Generations, generation: u64) -> i64 {
    let current = generations.current();
    let previous = generations.previous();
    let mut newer = 0;
    if current.id >= generation {
        newer += current.live_connections();
    }
    if let Some(p) = previous.filter(|p| p.id >= generation) {
        newer += p.live_connections();
    }
    crate::upstream::connector::open_connections() - newer
}

/// A self-signed client certificate for `subject` valid for `validity`, and its private key,
/// both PEM. The rotation id goes into the name as its OU: while old and new are both trusted,
/// a server looking up a self-signed certificate's issuer by name (OpenSSL, Redis) must find
/// that very certificate, not the other one of the same CN (seen: `UnknownCA` without it).
fn make_certificate(
    subject: &str,
    rotation_id: &str,
    validity: Duration,
) -> Result<(String, String), CertError> {
    let fail = |e: rcgen::Error| CertError::Other(format!("cannot make a certificate: {e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, subject);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationalUnitName, rotation_id);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + validity;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&key).map_err(fail)?;
    Ok((cert.pem().trim().to_string(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_install_cut_between_the_two_files_is_repaired_to_a_matching_pair() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let (old_cert, old_key) =
            make_certificate("p", "cert-1-aa", Duration::from_secs(86_400)).unwrap();
        let (new_cert, new_key) =
            make_certificate("p", "cert-2-bb", Duration::from_secs(86_400)).unwrap();
        let job = Job {
            id: "cert-2-bb".into(),
            step: Step::Install,
            started_at: 0,
            trigger: "api".into(),
            old_cert: old_cert.clone(),
            new_cert: new_cert.clone(),
            task_id: None,
            installed_generation: None,
        };
        std::fs::create_dir_all(&state).unwrap();
        write_durably(
            &state.join(JOB_FILE),
            &serde_json::to_vec(&job).unwrap(),
            0o600,
        )
        .unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        // The key was replaced, the certificate not yet.
        std::fs::write(&cert, &old_cert).unwrap();
        std::fs::write(&key, &new_key).unwrap();
        assert!(repair_interrupted_install(&state, &cert, &key).unwrap());
        assert_eq!(std::fs::read_to_string(&cert).unwrap().trim(), new_cert);
        // A matching pair is left alone, old or new.
        assert!(!repair_interrupted_install(&state, &cert, &key).unwrap());
        std::fs::write(&cert, &old_cert).unwrap();
        std::fs::write(&key, &old_key).unwrap();
        assert!(!repair_interrupted_install(&state, &cert, &key).unwrap());
        // A key from elsewhere is an error naming the files, not a guess.
        let (_, stranger) =
            make_certificate("p", "cert-3-cc", Duration::from_secs(86_400)).unwrap();
        std::fs::write(&key, &stranger).unwrap();
        let err = repair_interrupted_install(&state, &cert, &key)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not belong together"), "{err}");
        assert!(
            !err.contains(stranger.lines().nth(1).unwrap()),
            "no key material: {err}"
        );
        // No rotation in flight: nothing to repair.
        std::fs::remove_file(state.join(JOB_FILE)).unwrap();
        assert!(!repair_interrupted_install(&state, &cert, &key).unwrap());
    }

    #[test]
    fn a_made_certificate_is_self_signed_for_client_auth_and_pairs_with_its_key() {
        let (cert_pem, key_pem) =
            make_certificate("svc-proxy", "cert-1-ab", Duration::from_secs(90 * 86_400)).unwrap();
        use rustls::pki_types::pem::PemObject;
        let cert = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let summary = crate::tls::CertSummary::of(&cert).unwrap();
        assert!(
            summary.subject.contains("CN=svc-proxy"),
            "{}",
            summary.subject
        );
        assert!(
            summary.subject.contains("OU=cert-1-ab"),
            "{}",
            summary.subject
        );
        assert_eq!(summary.issuer, summary.subject, "self-signed");
        let left = summary.not_after - now_unix() as i64;
        assert!((89 * 86_400..=90 * 86_400).contains(&left), "{left}");
        // rustls accepts the pair as a client certificate (it checks that they belong together).
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_client_auth_cert(vec![cert], key)
            .expect("the key is the certificate's");
        let (other, _) =
            make_certificate("svc-proxy", "cert-2-cd", Duration::from_secs(3600)).unwrap();
        assert_ne!(other, cert_pem, "every certificate is new");
    }
}
