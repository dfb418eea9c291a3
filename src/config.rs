//! The configuration file (TOML).
//!
//! Every struct denies unknown fields so a typo is an error that names the key, every field has a
//! default that is safe for a sidecar, durations are human strings ("30s", "2m") and sizes are
//! human strings ("512MiB"). Secrets are never written inline: they are [`SecretRef`]s (`env:NAME`
//! or `file:/path`) resolved when used.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where applications connect.
    #[serde(default)]
    pub listener: ListenerConfig,
    /// The Redis database the proxy forwards to.
    pub upstream: UpstreamConfig,
    /// The credential the proxy authenticates upstream with.
    #[serde(default)]
    pub credentials: CredentialsConfig,
    /// Warm pool of authenticated upstream connections.
    #[serde(default)]
    pub pool: PoolConfig,
    /// Upstream connection timeouts.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Limits on client input.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Operators' HTTP listener.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Credential rotation; absent means the proxy never changes the credential.
    #[serde(default)]
    pub rotation: Option<RotationConfig>,
    /// What SIGTERM and SIGINT do.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Async runtime.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address applications connect to. Port 0 picks a free port (logged at start-up).
    #[serde(default = "default_listener_bind")]
    pub bind: SocketAddr,
    /// Most client connections served at once; further ones are refused with an error.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Serve clients over TLS instead of plain TCP.
    #[serde(default)]
    pub tls: Option<ListenerTlsConfig>,
    /// How clients authenticate to the proxy (never to Redis: upstream auth is the proxy's).
    #[serde(default)]
    pub auth: ClientAuthConfig,
    /// TCP keepalive on client connections (Redis's `tcp-keepalive`, and its default): a
    /// client whose host vanished is found and its session, with its upstream connection,
    /// closed. 0 turns it off.
    #[serde(default = "default_client_keepalive", with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// Also accept clients on this Unix socket (plain, never TLS; Redis's `unixsocket`): a
    /// stale socket file left by a crash is replaced, one another process listens on is not.
    #[serde(default)]
    pub unix_socket: Option<PathBuf>,
    /// The Unix socket's permission bits (Redis's `unixsocketperm`).
    #[serde(default = "default_unix_socket_mode")]
    pub unix_socket_mode: UnixSocketMode,
}

fn default_unix_socket_mode() -> UnixSocketMode {
    UnixSocketMode(0o660)
}

/// `listener.unix_socket_mode`: permission bits, written in octal as a string such as "660"
/// or "0660".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixSocketMode(pub u32);

impl std::str::FromStr for UnixSocketMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u32::from_str_radix(s, 8)
            .ok()
            .filter(|bits| *bits <= 0o777 && !s.starts_with(['+', '-']))
            .map(UnixSocketMode)
            .ok_or_else(|| {
                "listener.unix_socket_mode must be octal permission bits, such as 660".to_string()
            })
    }
}

impl<'de> Deserialize<'de> for UnixSocketMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            bind: default_listener_bind(),
            max_clients: default_max_clients(),
            tls: None,
            auth: ClientAuthConfig::default(),
            tcp_keepalive: default_client_keepalive(),
            unix_socket: None,
            unix_socket_mode: default_unix_socket_mode(),
        }
    }
}

fn default_client_keepalive() -> Duration {
    Duration::from_secs(300)
}

fn default_listener_bind() -> SocketAddr {
    "127.0.0.1:6380".parse().expect("valid literal")
}
fn default_max_clients() -> usize {
    10_000
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// PEM certificate chain presented to clients.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// Require a client certificate issued by one of these CAs (PEM), as Redis's
    /// `tls-auth-clients yes` with `tls-ca-cert-file`. Followed like the certificate.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: `required` (Redis's `tls-auth-clients yes`) or `optional` (`tls-auth-
    /// clients optional`: a client may present no certificate, but one it presents must come
    /// from `client_ca`; e.g. while the clients get certificates, one by one).
    /// Default `required`; refused without `client_ca`.
    #[serde(default)]
    pub client_certificates: Option<ClientCertificates>,
    /// How often the certificate and key files are re-read in case a change event was missed
    /// (changes in their directory are followed at once).
    #[serde(default = "default_tls_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
}

/// Whether a TLS listener with `client_ca` requires client certificates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertificates {
    #[default]
    Required,
    Optional,
}

fn default_tls_poll_interval() -> Duration {
    Duration::from_secs(30)
}

impl ListenerTlsConfig {
    /// Whether every client must present a certificate from `client_ca`.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_ca.is_some()
            && self.client_certificates.unwrap_or_default() == ClientCertificates::Required
    }

    /// The files the listener's TLS is read from, followed for changes.
    pub fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.cert.as_path(), self.key.as_path()];
        files.extend(self.client_ca.as_deref());
        files
    }
}

impl Default for ClientAuthConfig {
    fn default() -> Self {
        ClientAuthConfig {
            mode: ClientAuthMode::default(),
            users: Vec::new(),
            poll_interval: default_tls_poll_interval(),
        }
    }
}

/// Client authentication. `none` accepts any AUTH (applications migrating from a direct connection
/// still send their old password); `password` accepts any of the listed users, so the client-side
/// password can itself be rotated with an overlap.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    #[serde(default)]
    pub mode: ClientAuthMode,
    /// Accepted users (mode `password`). Several entries may share a username.
    #[serde(default)]
    pub users: Vec<ClientUser>,
    /// How often passwords given as `file:` are re-read in case a change event was missed
    /// (changes in their directory are followed at once).
    #[serde(default = "default_tls_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMode {
    #[default]
    None,
    Password,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientUser {
    /// Username clients send (`AUTH user pass`); `AUTH pass` means `default`.
    #[serde(default = "default_username")]
    pub username: String,
    /// Reference to the password: `env:NAME` or `file:/path`.
    pub password: SecretRef,
}

fn default_username() -> String {
    "default".to_string()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `rediss://host:port` (TLS) or `redis://host:port` (plain TCP).
    pub url: String,
    /// PEM file of trusted CA certificates; default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Name used for SNI and certificate verification; default: the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Disable certificate verification. Dangerous; logged loudly at start-up.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// PEM client certificate chain for mutual TLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// How often `ca_file`, `client_cert` and `client_key` are re-read in case a change event
    /// was missed (changes in their directories are followed at once), and how often files the
    /// server refused are tried again.
    #[serde(default = "default_tls_poll_interval", with = "humantime_serde")]
    pub tls_poll_interval: Duration,
    /// How often the server's command table and version are read again (where clients must
    /// authenticate: the proxy answers unauthenticated clients in the server's words), so that
    /// an upgrade, a module load or a restart with renamed commands behind a running proxy is
    /// followed.
    #[serde(default = "default_command_table_refresh", with = "humantime_serde")]
    pub command_table_refresh: Duration,
    /// Resume TLS sessions (tickets the server issued) when opening upstream connections: a
    /// pool refill or a drain after a rotation then skips the certificate exchange. New TLS
    /// material (a CA file, a client certificate) always starts with a full handshake.
    #[serde(default = "default_true")]
    pub tls_session_resumption: bool,
}

fn default_command_table_refresh() -> Duration {
    Duration::from_secs(300)
}

/// The upstream credential. Without a password the proxy does not authenticate upstream.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    /// ACL username; absent means the `default` user.
    #[serde(default)]
    pub username: Option<String>,
    /// Reference to the password: `env:NAME` or `file:/path`.
    #[serde(default)]
    pub password: Option<SecretRef>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Authenticated upstream connections kept ready for new clients.
    #[serde(default = "default_warm")]
    pub warm: usize,
    /// Most upstream connections open at once (in use plus idle).
    #[serde(default = "default_pool_max")]
    pub max: usize,
    /// How often idle connections are checked with PING.
    #[serde(default = "default_idle_check", with = "humantime_serde")]
    pub idle_check_interval: Duration,
    /// How long a client waits for a connection at the pool maximum before it gets an error.
    #[serde(default = "default_checkout_timeout", with = "humantime_serde")]
    pub checkout_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            warm: default_warm(),
            max: default_pool_max(),
            idle_check_interval: default_idle_check(),
            checkout_timeout: default_checkout_timeout(),
        }
    }
}

fn default_warm() -> usize {
    4
}
fn default_pool_max() -> usize {
    10_000
}
fn default_idle_check() -> Duration {
    Duration::from_secs(15)
}
fn default_checkout_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// TCP connect to the upstream.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub connect: Duration,
    /// TLS handshake with the upstream.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub tls_handshake: Duration,
    /// Upstream AUTH round trip.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub auth: Duration,
    /// TCP keepalive on upstream connections: how long a connection may be silent before the
    /// kernel probes the server (3 probes, a third of it apart). A connection that died without
    /// a word (a NAT or load balancer that forgot it, a host that vanished) is found within
    /// twice this, and its session moves to a fresh one, where an idle subscriber would
    /// otherwise wait for messages forever. Below the idle timeouts of cloud NATs and load
    /// balancers (Azure's is 4 minutes). 0 turns it off.
    #[serde(default = "default_upstream_keepalive", with = "humantime_serde")]
    pub tcp_keepalive: Duration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect: default_timeout(),
            tls_handshake: default_timeout(),
            auth: default_timeout(),
            tcp_keepalive: default_upstream_keepalive(),
        }
    }
}

fn default_upstream_keepalive() -> Duration {
    Duration::from_secs(60)
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

/// What SIGTERM and SIGINT do. A sidecar is often told to stop at the same moment as the
/// application it serves (a Kubernetes pod), while that application still has commands to
/// send on its way out: `wait_for_clients` keeps the proxy serving until they are done.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After the signal, keep serving as before (new clients included; `/readyz` answers 503)
    /// until no client is connected, for at most this long. 0 skips the wait.
    #[serde(default, with = "humantime_serde")]
    pub wait_for_clients: Duration,
    /// Then, with no new clients accepted, how long sessions have to deliver the replies they
    /// owe (each closes once it owes none) before the proxy exits anyway.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            wait_for_clients: Duration::ZERO,
            grace: default_shutdown_grace(),
        }
    }
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}

/// Limits on what one client may send. Defaults are Redis's own, so no request Redis accepts is
/// refused by the proxy. Replies are not limited: they stream through.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest bulk argument (Redis: proto-max-bulk-len, 512 MB).
    #[serde(default = "default_max_bulk_len")]
    pub max_bulk_len: ByteSize,
    /// Most arguments in one command.
    #[serde(default = "default_max_args")]
    pub max_args: u64,
    /// Longest inline command (Redis: 64 KiB).
    #[serde(default = "default_max_inline_len")]
    pub max_inline_len: ByteSize,
    /// Most client bytes the proxy holds for one client (commands it must read whole, data waiting
    /// for the upstream). Redis: client-query-buffer-limit, 1 GiB.
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: ByteSize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_bulk_len: default_max_bulk_len(),
            max_args: default_max_args(),
            max_inline_len: default_max_inline_len(),
            max_buffered_bytes: default_max_buffered_bytes(),
        }
    }
}

fn default_max_bulk_len() -> ByteSize {
    ByteSize(512 * 1024 * 1024)
}
fn default_max_args() -> u64 {
    i32::MAX as u64
}
fn default_max_inline_len() -> ByteSize {
    ByteSize(64 * 1024)
}
fn default_max_buffered_bytes() -> ByteSize {
    ByteSize(1024 * 1024 * 1024)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP listener (health, readiness, metrics, status). Loopback by default:
    /// in a pod, loopback is shared with the application.
    #[serde(default = "default_admin_bind")]
    pub bind: SocketAddr,
    /// Bearer token required by every POST endpoint: `env:NAME` or `file:/path`.
    #[serde(default)]
    pub token: Option<SecretRef>,
    /// A second listener that serves only `GET /metrics`, `/healthz` and `/readyz`: for
    /// Prometheus and the kubelet's HTTP probes on the pod's address, while status, the client
    /// list and the POST endpoints stay on `bind`.
    #[serde(default)]
    pub metrics_bind: Option<SocketAddr>,
    /// Connections each admin listener serves at once; more wait, unaccepted, until one
    /// closes. Bounds what anyone who can reach a listener can make the proxy hold.
    #[serde(default = "default_admin_max_connections")]
    pub max_connections: usize,
    /// A connection that has not sent a whole request head within this time is closed: a
    /// kept-alive one waiting for its next request, as well as one sending its head slowly.
    #[serde(default = "default_admin_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            bind: default_admin_bind(),
            token: None,
            metrics_bind: None,
            max_connections: default_admin_max_connections(),
            header_timeout: default_admin_header_timeout(),
        }
    }
}

fn default_admin_max_connections() -> usize {
    64
}

fn default_admin_header_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_admin_bind() -> SocketAddr {
    "127.0.0.1:9180".parse().expect("valid literal")
}

/// How the proxy rotates the upstream credential.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    /// `acl-multi-password`, `alternating-users` or `external`.
    pub strategy: RotationStrategy,
    /// Directory of the rotation state file (created with mode 0700; the file is 0600). A
    /// fleet member keeps no state file: the fleet's state is in the upstream Redis.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Rotate on a schedule; absent: only on `POST /v1/rotate` (or a source change, `external`).
    #[serde(default, with = "humantime_serde::option")]
    pub rotate_every: Option<Duration>,
    /// Random spread added to or taken from each scheduled time, so a fleet does not rotate in
    /// lockstep.
    #[serde(default, with = "humantime_serde")]
    pub jitter: Duration,
    /// How often the proxy checks, changing nothing, that a rotation could run (permissions,
    /// the idle user, the API, the state); also at start and on `POST /v1/rotate?dry_run=true`.
    #[serde(default = "default_preflight_interval", with = "humantime_serde")]
    pub preflight_interval: Duration,
    /// How long sessions have to move before the old secret is revoked anyway (what is still
    /// open then is counted and logged).
    #[serde(default = "default_drain_deadline", with = "humantime_serde")]
    pub drain_deadline: Duration,
    /// Drain deadline of an urgent rotation (suspected compromise).
    #[serde(default = "default_urgent_drain_deadline", with = "humantime_serde")]
    pub urgent_drain_deadline: Duration,
    /// Longest a busy session stops reading its client to create a safe point.
    #[serde(default = "default_max_pause", with = "humantime_serde")]
    pub max_pause: Duration,
    /// Length of generated passwords (8 to 128; Redis Cloud's default user needs fewer than 50).
    #[serde(default = "default_password_length")]
    pub password_length: usize,
    /// `alternating-users`: after the drain, scramble the previous user's password to a random
    /// value nobody stores.
    #[serde(default = "default_true")]
    pub scramble_previous: bool,
    /// `alternating-users`: the two users with the same permissions, used in turn.
    #[serde(default)]
    pub users: Vec<String>,
    /// The credential that runs `ACL SETUSER`; default: the proxied user itself.
    #[serde(default)]
    pub admin: Option<RotationAdminConfig>,
    /// `external`: where the new password appears.
    #[serde(default)]
    pub external: Option<ExternalSourceConfig>,
    /// How passwords are set on the server: `acl` (`ACL SETUSER`, open-source Redis and Redis
    /// Software) or `cloud` (the Redis Cloud REST API, which refuses `ACL SETUSER`).
    #[serde(default)]
    pub backend: RotationBackend,
    /// The Redis Cloud REST API (`backend = "cloud"`).
    #[serde(default)]
    pub cloud: Option<crate::cloud::CloudApiConfig>,
    /// The Redis Cloud database: whose default-user password rotates (`default-user`), and
    /// whose client certificate list the proxy keeps (`[rotation.client_certificate]`).
    #[serde(default)]
    pub database: Option<crate::cloud::DatabaseRef>,
    /// Client certificates the proxy makes and registers itself (Redis Cloud).
    #[serde(default)]
    pub client_certificate: Option<ClientCertRotationConfig>,
    /// Replicas sharing one credential: one of them rotates, the others follow (see
    /// [`FleetConfig`]). Absent: this proxy rotates alone, with its state in `state_dir`.
    #[serde(default)]
    pub fleet: Option<FleetConfig>,
}

/// `[rotation.fleet]`: a fleet of proxies (the sidecars of one service's replicas) sharing one
/// rotating credential. They keep the rotation state in the upstream Redis itself, encrypted
/// with a key only the fleet has; a lease with a fencing token there elects the one proxy that
/// rotates, the others follow its state, and the old secret is revoked only once every live
/// member has moved off it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Names the fleet's keys: `{<key_prefix>}:state`, `:lease`, `:fence`, `:members`,
    /// `:requests`, `:answer:*` (in one hash slot, so the scripts run on a sharded database
    /// too).
    pub key_prefix: String,
    /// 32 random bytes, base64 (`openssl rand -base64 32`), that encrypt the shared state.
    pub key: SecretRef,
    /// Keys that still open the state while the fleet's key changes (they never seal it).
    /// Every member: add the new key here; then make it `key` with the old one here; then
    /// drop the old one. Members at different stages can read each other's writes throughout.
    #[serde(default)]
    pub extra_keys: Vec<SecretRef>,
    /// The user the fleet reads and writes its keys as. The fleet never rotates it: a new
    /// replica needs it to learn the credential of now.
    #[serde(default)]
    pub username: Option<String>,
    /// Its password; a `file:` one is re-read when it changes.
    pub password: SecretRef,
    /// This proxy's name among the members (default: host name and process id). Must be
    /// unique in the fleet: a pod name is a good one.
    #[serde(default)]
    pub instance: Option<String>,
    /// How often a member renews or seeks the lease, reads the shared state and reports.
    #[serde(default = "default_fleet_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long the rotator's lease lasts unrenewed: after a crash, another member takes over
    /// within about this long.
    #[serde(default = "default_fleet_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// A member that has not reported for this long is taken as gone: a revoke no longer waits
    /// for it.
    #[serde(default = "default_fleet_member_timeout", with = "humantime_serde")]
    pub member_timeout: Duration,
    /// After each write of the shared state, wait (`WAIT`) until this many replicas of the
    /// database have it; fewer within `replica_timeout` is a failed write (the rotator stops,
    /// as after any store error, and the next one resumes once the write holds). 0: do not
    /// wait (a failover of the database may then lose the last write).
    #[serde(default)]
    pub replicas: u32,
    #[serde(default = "default_fleet_replica_timeout", with = "humantime_serde")]
    pub replica_timeout: Duration,
}

/// The `[rotation]` settings a `SIGHUP` applies to a running proxy: when rotations happen and
/// how long their drains may take. The rest of `[rotation]` waits for a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationTiming {
    pub rotate_every: Option<Duration>,
    pub jitter: Duration,
    pub preflight_interval: Duration,
    pub drain_deadline: Duration,
    pub urgent_drain_deadline: Duration,
}

impl RotationConfig {
    pub fn timing(&self) -> RotationTiming {
        RotationTiming {
            rotate_every: self.rotate_every,
            jitter: self.jitter,
            preflight_interval: self.preflight_interval,
            drain_deadline: self.drain_deadline,
            urgent_drain_deadline: self.urgent_drain_deadline,
        }
    }

    /// This config with `timing` in place of its own.
    pub fn with_timing(&self, timing: RotationTiming) -> RotationConfig {
        let RotationTiming {
            rotate_every,
            jitter,
            preflight_interval,
            drain_deadline,
            urgent_drain_deadline,
        } = timing;
        RotationConfig {
            rotate_every,
            jitter,
            preflight_interval,
            drain_deadline,
            urgent_drain_deadline,
            ..self.clone()
        }
    }
}

fn default_preflight_interval() -> Duration {
    Duration::from_secs(3600)
}

fn default_fleet_replica_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_fleet_poll_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_fleet_lease_ttl() -> Duration {
    Duration::from_secs(15)
}
fn default_fleet_member_timeout() -> Duration {
    Duration::from_secs(30)
}

/// `[rotation.client_certificate]`: the proxy makes its own mTLS client certificates
/// (self-signed), registers each with the database through the REST API
/// (`clientTlsCertificates`: old and new, then new only) and writes it to
/// `upstream.client_cert` / `client_key`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertRotationConfig {
    /// Lifetime of a certificate the proxy makes.
    #[serde(default = "default_cert_validity", with = "humantime_serde")]
    pub validity: Duration,
    /// A new certificate is made when the one in use has less than this left (checked at
    /// start-up and every `check_interval`), or on `POST /v1/client-certificate/rotate`.
    #[serde(default = "default_cert_renew_before", with = "humantime_serde")]
    pub renew_before: Duration,
    /// How often the remaining lifetime is checked (and a failed rotation retried).
    #[serde(default = "default_cert_check_interval", with = "humantime_serde")]
    pub check_interval: Duration,
    /// Common name of the certificates the proxy makes.
    #[serde(default = "default_cert_subject")]
    pub subject: String,
}

fn default_cert_validity() -> Duration {
    Duration::from_secs(90 * 24 * 3600)
}
fn default_cert_renew_before() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}
fn default_cert_check_interval() -> Duration {
    Duration::from_secs(3600)
}
fn default_cert_subject() -> String {
    "rotaproxy".to_string()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RotationBackend {
    #[default]
    Acl,
    Cloud,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RotationStrategy {
    AclMultiPassword,
    AlternatingUsers,
    /// The `default` user's single password is replaced; the proxy makes the overlap itself.
    DefaultUser,
    External,
}

impl RotationStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            RotationStrategy::AclMultiPassword => "acl-multi-password",
            RotationStrategy::AlternatingUsers => "alternating-users",
            RotationStrategy::DefaultUser => "default-user",
            RotationStrategy::External => "external",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationAdminConfig {
    /// A user allowed to run `ACL SETUSER` (and `CLIENT KILL` for urgent rotations).
    pub username: Option<String>,
    pub password: SecretRef,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalSourceConfig {
    /// The file another system writes the password to (`file:/path`). Its directory is watched,
    /// so a Kubernetes secret volume's symlink swap is seen.
    pub password: SecretRef,
    /// Polling fallback for file systems without change events.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a client needing a new upstream connection waits for the source to catch up
    /// after the server refused the old password (a secret volume lags about a minute).
    #[serde(default = "default_refresh_window", with = "humantime_serde")]
    pub refresh_window: Duration,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/rotaproxy")
}
fn default_drain_deadline() -> Duration {
    Duration::from_secs(60)
}
fn default_urgent_drain_deadline() -> Duration {
    Duration::from_secs(5)
}
fn default_max_pause() -> Duration {
    Duration::from_millis(250)
}
fn default_password_length() -> usize {
    32
}
fn default_true() -> bool {
    true
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_refresh_window() -> Duration {
    Duration::from_secs(90)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads. 1 runs everything on one thread (a current-thread runtime), which costs the
    /// least CPU per request for a sidecar; more spreads sessions over that many threads.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker_threads: default_worker_threads(),
        }
    }
}

fn default_worker_threads() -> usize {
    1
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `rotaproxy=debug`; `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn default_log_level() -> String {
    "info".to_string()
}

/// Where a secret lives. Only the reference is ever printed; the value is read when needed and held
/// as a [`SecretString`].
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
}

impl SecretRef {
    /// Reads the secret now. A trailing newline (as left by `echo` or most editors) is removed.
    pub fn resolve(&self) -> Result<SecretString, SecretError> {
        let raw = match self {
            SecretRef::Env(name) => {
                std::env::var(name).map_err(|_| SecretError::EnvMissing { name: name.clone() })?
            }
            SecretRef::File(path) => {
                std::fs::read_to_string(path).map_err(|source| SecretError::File {
                    path: path.clone(),
                    source,
                })?
            }
        };
        let value = raw.strip_suffix('\n').unwrap_or(&raw);
        let value = value.strip_suffix('\r').unwrap_or(value);
        if value.is_empty() {
            return Err(SecretError::Empty {
                reference: self.to_string(),
            });
        }
        Ok(SecretString::from(value.to_string()))
    }

    /// The file a file reference points at (watched for changes).
    pub fn path(&self) -> Option<&Path> {
        match self {
            SecretRef::File(p) => Some(p),
            SecretRef::Env(_) => None,
        }
    }
}

/// Why a secret could not be read. Names the reference, never the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {name} is not set")]
    EnvMissing { name: String },
    #[error("cannot read secret file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret {reference} is empty")]
    Empty { reference: String },
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env(name) => write!(f, "env:{name}"),
            SecretRef::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretRef({self})")
    }
}

impl std::str::FromStr for SecretRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(name) = s.strip_prefix("env:") {
            if name.is_empty() {
                return Err("`env:` needs a variable name".into());
            }
            Ok(SecretRef::Env(name.to_string()))
        } else if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err("`file:` needs a path".into());
            }
            Ok(SecretRef::File(PathBuf::from(path)))
        } else {
            // Never echo the value: it may be a password pasted inline by mistake.
            Err("a secret must be a reference, `env:NAME` or `file:/path` (inline secrets are not accepted)".into())
        }
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A size in bytes, written as an integer or a string such as "512MiB", "64KiB", "1GB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("`{s}` is not a size such as 512MiB"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1000,
            "KiB" | "K" => 1 << 10,
            "MB" => 1000 * 1000,
            "MiB" | "M" => 1 << 20,
            "GB" => 1000 * 1000 * 1000,
            "GiB" | "G" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` (use B, KiB, MiB, GiB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// The upstream address, parsed from `upstream.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl UpstreamUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("rediss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("redis://") {
            (false, r)
        } else {
            return Err("must start with rediss:// (TLS) or redis:// (plain)".into());
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('@') {
            return Err(
                "must not carry credentials; use [credentials] with env:/file: references".into(),
            );
        }
        // `redis://host:6379/0` and `?option=...` are common in client URLs.
        if let Some(at) = rest.find(['/', '?']) {
            return Err(format!(
                "has a path or options (`{}`): give only the host and port; clients choose \
                 their database with SELECT, and TLS and timeouts have keys of their own",
                &rest[at..]
            ));
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (h, p) = bracketed
                .split_once(']')
                .ok_or("unterminated [ in IPv6 host")?;
            (h, p.strip_prefix(':').unwrap_or(""))
        } else {
            rest.rsplit_once(':').unwrap_or((rest, ""))
        };
        if host.is_empty() {
            return Err("has no host".into());
        }
        let port = if port.is_empty() {
            6379
        } else {
            port.parse().map_err(|_| format!("bad port `{port}`"))?
        };
        Ok(UpstreamUrl {
            tls,
            host: host.to_string(),
            port,
        })
    }

    /// `url` as an error may quote it: a user and password written into it (which `parse`
    /// refuses) replaced by `***`.
    pub fn without_credentials(url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        match rest[..authority_end].rfind('@') {
            Some(at) if scheme.is_empty() => format!("***{}", &rest[at..]),
            Some(at) => format!("{scheme}://***{}", &rest[at..]),
            None => url.to_string(),
        }
    }
}

impl Config {
    /// What a SIGHUP does not apply: the parts of this configuration, named as in the file,
    /// that differ from `running`. A SIGHUP re-reads the client auth entries
    /// (`listener.auth.users`), `log.level` and the rotation's timing ([`RotationTiming`]) only;
    /// every other change waits for a restart.
    /// (Certificate and password *files* are followed as they change; what is compared here
    /// is where they are and what the file says.)
    pub fn restart_needed_for(&self, running: &Config) -> Vec<&'static str> {
        // Taken apart field by field, so that a new setting cannot be left out unnoticed.
        let Config {
            listener:
                ListenerConfig {
                    bind,
                    max_clients,
                    tls,
                    auth:
                        ClientAuthConfig {
                            mode,
                            users: _,
                            poll_interval,
                        },
                    tcp_keepalive,
                    unix_socket,
                    unix_socket_mode,
                },
            upstream,
            credentials,
            pool,
            timeouts,
            limits,
            admin,
            rotation,
            shutdown,
            runtime,
            log: LogConfig { format, level: _ },
        } = self;
        let was = running;
        [
            ("listener.bind", *bind != was.listener.bind),
            (
                "listener.max_clients",
                *max_clients != was.listener.max_clients,
            ),
            ("listener.tls", *tls != was.listener.tls),
            ("listener.auth.mode", *mode != was.listener.auth.mode),
            (
                "listener.auth.poll_interval",
                *poll_interval != was.listener.auth.poll_interval,
            ),
            (
                "listener.tcp_keepalive",
                *tcp_keepalive != was.listener.tcp_keepalive,
            ),
            (
                "listener.unix_socket",
                *unix_socket != was.listener.unix_socket
                    || *unix_socket_mode != was.listener.unix_socket_mode,
            ),
            ("upstream", *upstream != was.upstream),
            ("credentials", *credentials != was.credentials),
            ("pool", *pool != was.pool),
            ("timeouts", *timeouts != was.timeouts),
            ("limits", *limits != was.limits),
            ("admin", *admin != was.admin),
            (
                "rotation",
                match (rotation, &was.rotation) {
                    (Some(now), Some(was)) => now.with_timing(was.timing()) != *was,
                    (now, was) => now != was,
                },
            ),
            ("shutdown", *shutdown != was.shutdown),
            ("runtime", *runtime != was.runtime),
            ("log.format", *format != was.log.format),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: describe_toml_error(text, &e),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: relations between fields and value ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| ConfigError::Invalid {
            key,
            message: message.to_string(),
        };
        let url = UpstreamUrl::parse(&self.upstream.url).map_err(|m| {
            let shown = UpstreamUrl::without_credentials(&self.upstream.url);
            invalid("upstream.url", &format!("`{shown}` {m}"))
        })?;
        crate::logging::parse_filter(&self.log.level).map_err(|m| invalid("log.level", &m))?;
        for (key, keepalive) in [
            ("listener.tcp_keepalive", self.listener.tcp_keepalive),
            ("timeouts.tcp_keepalive", self.timeouts.tcp_keepalive),
        ] {
            crate::net::check_keepalive(keepalive).map_err(|m| invalid(key, m))?;
        }
        let tls_only = [
            ("upstream.ca_file", self.upstream.ca_file.is_some()),
            ("upstream.client_cert", self.upstream.client_cert.is_some()),
            ("upstream.server_name", self.upstream.server_name.is_some()),
        ];
        for (key, set) in tls_only {
            if set && !url.tls {
                return Err(invalid(
                    key,
                    "is set but upstream.url is redis:// (plain TCP)",
                ));
            }
        }
        if self.upstream.client_cert.is_some() != self.upstream.client_key.is_some() {
            return Err(invalid(
                "upstream.client_key",
                "client_cert and client_key go together",
            ));
        }
        if self.credentials.username.is_some() && self.credentials.password.is_none() {
            return Err(invalid(
                "credentials.password",
                "a username needs a password reference",
            ));
        }
        match self.listener.auth.mode {
            ClientAuthMode::None if !self.listener.auth.users.is_empty() => {
                return Err(invalid(
                    "listener.auth.users",
                    "users are listed but mode is \"none\"; set mode = \"password\"",
                ));
            }
            ClientAuthMode::Password if self.listener.auth.users.is_empty() => {
                return Err(invalid(
                    "listener.auth.users",
                    "mode \"password\" needs at least one user",
                ));
            }
            _ => {}
        }
        if self.listener.max_clients == 0 {
            return Err(invalid("listener.max_clients", "must be at least 1"));
        }
        if self.admin.metrics_bind == Some(self.admin.bind) && self.admin.bind.port() != 0 {
            return Err(invalid(
                "admin.metrics_bind",
                "must differ from admin.bind (it serves a part of what bind serves)",
            ));
        }
        if self.admin.max_connections == 0 {
            return Err(invalid("admin.max_connections", "must be at least 1"));
        }
        if self.admin.header_timeout.is_zero() {
            return Err(invalid("admin.header_timeout", "must be more than 0s"));
        }
        if self.pool.max == 0 {
            return Err(invalid("pool.max", "must be at least 1"));
        }
        if self.pool.warm > self.pool.max {
            return Err(invalid("pool.warm", "must not exceed pool.max"));
        }
        if self.pool.idle_check_interval.is_zero() {
            return Err(invalid("pool.idle_check_interval", "must be more than 0s"));
        }
        if self.upstream.tls_poll_interval.is_zero() {
            return Err(invalid(
                "upstream.tls_poll_interval",
                "must be more than 0s",
            ));
        }
        if self.upstream.command_table_refresh < Duration::from_secs(1) {
            return Err(invalid(
                "upstream.command_table_refresh",
                "must be at least 1s",
            ));
        }
        if self.listener.auth.poll_interval.is_zero() {
            return Err(invalid(
                "listener.auth.poll_interval",
                "must be more than 0s",
            ));
        }
        if self
            .listener
            .tls
            .as_ref()
            .is_some_and(|t| t.poll_interval.is_zero())
        {
            return Err(invalid(
                "listener.tls.poll_interval",
                "must be more than 0s",
            ));
        }
        if self
            .listener
            .tls
            .as_ref()
            .is_some_and(|t| t.client_certificates.is_some() && t.client_ca.is_none())
        {
            return Err(invalid(
                "listener.tls.client_certificates",
                "needs client_ca: the CAs client certificates are checked against",
            ));
        }
        if self.runtime.worker_threads == 0 {
            return Err(invalid("runtime.worker_threads", "must be at least 1"));
        }
        if self.limits.max_args == 0 {
            return Err(invalid("limits.max_args", "must be at least 1"));
        }
        if self.limits.max_inline_len.0 < 16 {
            return Err(invalid(
                "limits.max_inline_len",
                "must be at least 16 bytes",
            ));
        }
        if let Some(rotation) = &self.rotation {
            validate_rotation(self, rotation)?;
        }
        if self.limits.max_buffered_bytes.0 < self.limits.max_inline_len.0 {
            return Err(invalid(
                "limits.max_buffered_bytes",
                "must be at least limits.max_inline_len",
            ));
        }
        Ok(())
    }

    /// The parsed upstream URL (validated at load time).
    pub fn upstream_url(&self) -> UpstreamUrl {
        UpstreamUrl::parse(&self.upstream.url).expect("validated at load")
    }
}

/// A TOML error without the quoted source line or quoted values: a secret pasted inline by
/// mistake must not be echoed back into a terminal or a log.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let location = err.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        // Name the key (the text before `=` on that line), never the value.
        let line_text = text.lines().nth(line - 1).unwrap_or("");
        let key = line_text
            .split_once('=')
            .map(|(k, _)| k.trim())
            .filter(|k| {
                !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            });
        match key {
            Some(key) => format!("line {line}, column {column}, key `{key}`: "),
            None => format!("line {line}, column {column}: "),
        }
    });
    let mut message = String::new();
    let mut quoted = false;
    for c in err.message().chars() {
        if c == '"' {
            if !quoted {
                message.push_str("\"…");
            }
            quoted = !quoted;
            if !quoted {
                message.push('"');
            }
        } else if !quoted {
            message.push(c);
        }
    }
    format!(
        "{}{}",
        location.unwrap_or_default(),
        hide_number_values(message.trim())
    )
}

/// serde names a wrong number in backticks after its kind (``invalid type: integer `123` ``):
/// it may be a secret written without quotes, so it is left out. Backticked names of fields
/// and types stay.
fn hide_number_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some((before, after)) = rest.split_once('`') {
        out.push_str(before);
        let Some((quoted, after)) = after.split_once('`') else {
            out.push('`');
            out.push_str(after);
            return out;
        };
        let is_number = ["integer ", "floating point "]
            .iter()
            .any(|kind| before.ends_with(kind));
        out.push('`');
        out.push_str(if is_number { "…" } else { quoted });
        out.push('`');
        rest = after;
    }
    out.push_str(rest);
    out
}

fn validate_rotation(config: &Config, r: &RotationConfig) -> Result<(), ConfigError> {
    let invalid = |key, message: &str| ConfigError::Invalid {
        key,
        message: message.to_string(),
    };
    if !(crate::rotation::secret::MIN_LENGTH..=128).contains(&r.password_length) {
        return Err(invalid(
            "rotation.password_length",
            "must be between 8 and 128",
        ));
    }
    if let Some(every) = r.rotate_every {
        if every < Duration::from_secs(1) {
            return Err(invalid("rotation.rotate_every", "must be at least 1s"));
        }
        if r.jitter >= every {
            return Err(invalid(
                "rotation.jitter",
                "must be shorter than rotate_every",
            ));
        }
    }
    if r.drain_deadline.is_zero() || r.urgent_drain_deadline.is_zero() {
        return Err(invalid("rotation.drain_deadline", "must be more than 0s"));
    }
    match r.strategy {
        RotationStrategy::AclMultiPassword
        | RotationStrategy::AlternatingUsers
        | RotationStrategy::DefaultUser => {
            if config.credentials.password.is_none() {
                return Err(invalid(
                    "credentials.password",
                    "the first credential is needed before the proxy can rotate it",
                ));
            }
        }
        RotationStrategy::External => {
            let Some(ext) = &r.external else {
                return Err(invalid(
                    "rotation.external",
                    "strategy \"external\" needs [rotation.external] password = \"file:/path\"",
                ));
            };
            if ext.password.path().is_none() {
                return Err(invalid(
                    "rotation.external.password",
                    "must be a file: reference (it is watched for changes)",
                ));
            }
            if ext.poll_interval.is_zero() {
                return Err(invalid(
                    "rotation.external.poll_interval",
                    "must be more than 0s",
                ));
            }
        }
    }
    if let Some(cert) = &r.client_certificate {
        validate_client_cert_rotation(config, r, cert)?;
    }
    if let Some(fleet) = &r.fleet {
        validate_fleet(r, fleet)?;
    }
    if r.backend == RotationBackend::Cloud {
        if r.cloud.is_none() {
            return Err(invalid(
                "rotation.cloud",
                "backend \"cloud\" needs [rotation.cloud] with account_key and secret_key",
            ));
        }
        if r.strategy == RotationStrategy::AclMultiPassword {
            return Err(invalid(
                "rotation.strategy",
                "Redis Cloud allows one password per user: use \"alternating-users\" (recommended) or \"default-user\"",
            ));
        }
        if r.strategy == RotationStrategy::DefaultUser && r.database.is_none() {
            return Err(invalid(
                "rotation.database",
                "default-user on Redis Cloud needs [rotation.database] kind, subscription_id, database_id",
            ));
        }
    }
    if r.strategy == RotationStrategy::DefaultUser {
        if config
            .credentials
            .username
            .as_deref()
            .is_some_and(|u| u != "default")
        {
            return Err(invalid(
                "credentials.username",
                "strategy \"default-user\" rotates the default user: leave username out",
            ));
        }
        if r.password_length >= 50 {
            return Err(invalid(
                "rotation.password_length",
                "database (default-user) passwords must be shorter than 50 characters",
            ));
        }
    }
    if r.preflight_interval < Duration::from_secs(1) {
        return Err(invalid(
            "rotation.preflight_interval",
            "must be at least 1s",
        ));
    }
    if r.strategy == RotationStrategy::AlternatingUsers {
        if r.users.len() != 2 || r.users[0] == r.users[1] {
            return Err(invalid(
                "rotation.users",
                "alternating-users needs exactly two different usernames",
            ));
        }
        let active = config.credentials.username.as_deref().unwrap_or("default");
        if !r.users.iter().any(|u| u == active) {
            return Err(invalid(
                "rotation.users",
                "must include credentials.username (the user active at the first start)",
            ));
        }
    } else if !r.users.is_empty() {
        return Err(invalid(
            "rotation.users",
            "is only used by strategy \"alternating-users\"",
        ));
    }
    Ok(())
}

fn validate_fleet(r: &RotationConfig, fleet: &FleetConfig) -> Result<(), ConfigError> {
    let invalid = |key, message: &str| ConfigError::Invalid {
        key,
        message: message.to_string(),
    };
    if r.strategy == RotationStrategy::External {
        return Err(invalid(
            "rotation.fleet",
            "with strategy \"external\" every proxy follows the source on its own: leave [rotation.fleet] out",
        ));
    }
    if r.client_certificate.is_some() {
        return Err(invalid(
            "rotation.fleet",
            "[rotation.client_certificate] is not shared by a fleet yet: renew the certificate elsewhere and let every proxy follow its files",
        ));
    }
    if fleet.key_prefix.is_empty() || fleet.key_prefix.contains(['{', '}']) {
        return Err(invalid(
            "rotation.fleet.key_prefix",
            "must be a non-empty name without { or } (the proxy adds the hash tag)",
        ));
    }
    if fleet.instance.as_deref().is_some_and(|i| {
        i.is_empty() || i.len() > 200 || i.chars().any(|c| c.is_whitespace() || c.is_control())
    }) {
        return Err(invalid(
            "rotation.fleet.instance",
            "must be 1-200 characters without spaces",
        ));
    }
    if fleet.poll_interval.is_zero() {
        return Err(invalid(
            "rotation.fleet.poll_interval",
            "must be more than 0s",
        ));
    }
    if fleet.lease_ttl < fleet.poll_interval * 3 {
        return Err(invalid(
            "rotation.fleet.lease_ttl",
            "must be at least three poll_intervals, so a busy rotator renews it in time",
        ));
    }
    if fleet.replicas > 0 && fleet.replica_timeout.is_zero() {
        return Err(invalid(
            "rotation.fleet.replica_timeout",
            "must be more than 0s (0 would make WAIT block forever)",
        ));
    }
    if fleet.member_timeout < fleet.poll_interval * 3 {
        return Err(invalid(
            "rotation.fleet.member_timeout",
            "must be at least three poll_intervals, so a member is not given up between two reports",
        ));
    }
    Ok(())
}

fn validate_client_cert_rotation(
    config: &Config,
    r: &RotationConfig,
    cert: &ClientCertRotationConfig,
) -> Result<(), ConfigError> {
    let invalid = |key, message: &str| ConfigError::Invalid {
        key,
        message: message.to_string(),
    };
    let key = "rotation.client_certificate";
    if r.backend != RotationBackend::Cloud || r.database.is_none() {
        return Err(invalid(
            key,
            "needs backend = \"cloud\" and [rotation.database]: certificates are registered through the Redis Cloud API",
        ));
    }
    if config.upstream.client_cert.is_none() {
        return Err(invalid(
            key,
            "needs upstream.client_cert and client_key: the files the proxy writes its certificates to",
        ));
    }
    if cert.renew_before >= cert.validity {
        return Err(invalid(
            "rotation.client_certificate.renew_before",
            "must be shorter than validity",
        ));
    }
    if cert.check_interval.is_zero() {
        return Err(invalid(
            "rotation.client_certificate.check_interval",
            "must be more than 0s",
        ));
    }
    if cert.subject.is_empty() {
        return Err(invalid(
            "rotation.client_certificate.subject",
            "must not be empty",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[upstream]\nurl = \"redis://127.0.0.1:6379\"\n";

    #[test]
    fn minimal_config_takes_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.listener.bind, "127.0.0.1:6380".parse().unwrap());
        assert_eq!(c.admin.bind, "127.0.0.1:9180".parse().unwrap());
        assert_eq!(c.limits.max_bulk_len, ByteSize(512 << 20));
        assert_eq!(c.runtime.worker_threads, 1);
        assert!(!c.upstream_url().tls);
        assert_eq!(c.listener.tcp_keepalive, Duration::from_secs(300));
        assert_eq!(c.timeouts.tcp_keepalive, Duration::from_secs(60));
        assert_eq!(c.shutdown.wait_for_clients, Duration::ZERO);
        assert_eq!(c.shutdown.grace, Duration::from_secs(10));
    }

    #[test]
    fn unix_socket_modes_are_octal_permission_bits() {
        for (mode, bits) in [("660", 0o660), ("0600", 0o600), ("777", 0o777), ("0", 0)] {
            let text = format!("{MINIMAL}[listener]\nunix_socket_mode = \"{mode}\"\n");
            let c = Config::parse(&text).unwrap();
            assert_eq!(c.listener.unix_socket_mode, UnixSocketMode(bits), "{mode}");
        }
        for bad in ["", "rw-rw----", "1777", "0o660", "668", "-1"] {
            let text = format!("{MINIMAL}[listener]\nunix_socket_mode = \"{bad}\"\n");
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains("listener.unix_socket_mode"), "{bad}: {err}");
        }
        assert_eq!(
            Config::parse(MINIMAL).unwrap().listener.unix_socket_mode,
            UnixSocketMode(0o660)
        );
    }

    #[test]
    fn keepalive_times_the_kernel_cannot_take_are_refused_by_key() {
        for (section, key) in [
            ("listener", "listener.tcp_keepalive"),
            ("timeouts", "timeouts.tcp_keepalive"),
        ] {
            for bad in ["1500ms", "500ms", "32768s"] {
                let text = format!("{MINIMAL}[{section}]\ntcp_keepalive = \"{bad}\"\n");
                let err = Config::parse(&text).unwrap_err().to_string();
                assert!(err.contains(key), "{bad}: {err}");
            }
            for good in ["0s", "1s", "32767s", "4m"] {
                let text = format!("{MINIMAL}[{section}]\ntcp_keepalive = \"{good}\"\n");
                assert!(Config::parse(&text).is_ok(), "{key} = {good}");
            }
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse(&format!("{MINIMAL}[pool]\nwarmm = 3\n")).unwrap_err();
        assert!(err.to_string().contains("warmm"), "{err}");
    }

    #[test]
    fn inline_secret_is_refused_without_echoing_it() {
        let text = format!("{MINIMAL}[credentials]\npassword = \"hunter2-secret\"\n");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("env:NAME"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_number_where_a_secret_belongs_is_not_echoed() {
        for value in ["987654321", "98765.4321", "-98765"] {
            let text = format!("{MINIMAL}[credentials]\npassword = {value}\n");
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains("key `password`"), "{err}");
            assert!(err.contains("expected"), "{err}");
            assert!(!err.contains("98765"), "{err}");
        }
        // Names in backticks stay.
        let err = Config::parse(&format!("{MINIMAL}[pool]\nwarmm = 3\n")).unwrap_err();
        assert!(err.to_string().contains("`warmm`"), "{err}");
    }

    #[test]
    fn secret_ref_debug_shows_only_the_reference() {
        let r: SecretRef = "env:REDIS_PW".parse().unwrap();
        assert_eq!(format!("{r:?}"), "SecretRef(env:REDIS_PW)");
    }

    #[test]
    fn secret_file_trailing_newline_is_trimmed() {
        use secrecy::ExposeSecret;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        let r = SecretRef::File(p);
        assert_eq!(r.resolve().unwrap().expose_secret(), "s3cret");
    }

    /// Each setting a SIGHUP does not apply is named when it changes; the two it applies are
    /// not, and neither is a file that says the same in other words.
    #[test]
    fn a_sighup_names_every_change_it_does_not_apply() {
        let running = Config::parse(MINIMAL).unwrap();
        let cases = [
            (
                "[listener]\nbind = \"127.0.0.1:7000\"\n",
                vec!["listener.bind"],
            ),
            (
                "[listener]\nmax_clients = 5\n",
                vec!["listener.max_clients"],
            ),
            (
                "[listener.tls]\ncert = \"/c\"\nkey = \"/k\"\n",
                vec!["listener.tls"],
            ),
            (
                "[credentials]\npassword = \"env:OTHER\"\n",
                vec!["credentials"],
            ),
            ("[pool]\nwarm = 1\n", vec!["pool"]),
            ("[timeouts]\nauth = \"1s\"\n", vec!["timeouts"]),
            ("[timeouts]\ntcp_keepalive = \"30s\"\n", vec!["timeouts"]),
            (
                "[listener]\ntcp_keepalive = \"30s\"\n",
                vec!["listener.tcp_keepalive"],
            ),
            (
                "[listener]\nunix_socket = \"/run/r.sock\"\n",
                vec!["listener.unix_socket"],
            ),
            (
                "[listener]\nunix_socket_mode = \"600\"\n",
                vec!["listener.unix_socket"],
            ),
            ("[limits]\nmax_args = 10\n", vec!["limits"]),
            ("[admin]\nbind = \"127.0.0.1:7001\"\n", vec!["admin"]),
            (
                "[rotation]\nstrategy = \"external\"\n[rotation.external]\npassword = \"file:/pw\"\n",
                vec!["rotation"],
            ),
            ("[shutdown]\nwait_for_clients = \"20s\"\n", vec!["shutdown"]),
            ("[runtime]\nworker_threads = 2\n", vec!["runtime"]),
            ("[log]\nformat = \"json\"\n", vec!["log.format"]),
            (
                "[pool]\nwarm = 1\n[limits]\nmax_args = 10\n",
                vec!["pool", "limits"],
            ),
            // Applied by a SIGHUP, or no change at all.
            ("[log]\nlevel = \"debug\"\n", vec![]),
            (
                "[listener.auth]\nmode = \"password\"\n[[listener.auth.users]]\nusername = \"a\"\npassword = \"env:A\"\n",
                vec!["listener.auth.mode"],
            ),
            (
                "[listener.auth]\npoll_interval = \"9s\"\n",
                vec!["listener.auth.poll_interval"],
            ),
            ("[listener.auth]\nmode = \"none\"\n", vec![]),
            ("[pool]\nwarm = 4\n", vec![]),
        ];
        assert_eq!(running.pool.warm, 4, "the last case restates the default");
        for (extra, expected) in cases {
            let changed = Config::parse(&format!("{MINIMAL}{extra}")).unwrap();
            assert_eq!(changed.restart_needed_for(&running), expected, "{extra}");
        }
        let other_upstream = Config::parse("[upstream]\nurl = \"rediss://other:1\"\n").unwrap();
        assert_eq!(other_upstream.restart_needed_for(&running), ["upstream"]);

        // With rotation: its timing is applied by a SIGHUP, the rest is not.
        let rotating = |extra: &str| {
            Config::parse(&format!(
                "{MINIMAL}[credentials]\npassword = \"env:P\"\n[rotation]\nstrategy = \"acl-multi-password\"\n{extra}"
            ))
            .unwrap()
        };
        let running = rotating("");
        let timing = rotating(
            "rotate_every = \"1h\"\njitter = \"1m\"\npreflight_interval = \"5m\"\n\
             drain_deadline = \"9s\"\nurgent_drain_deadline = \"2s\"\n",
        );
        assert!(timing.restart_needed_for(&running).is_empty());
        assert_ne!(
            timing.rotation.as_ref().unwrap().timing(),
            running.rotation.as_ref().unwrap().timing()
        );
        for extra in ["password_length = 40\n", "max_pause = \"1s\"\n"] {
            assert_eq!(
                rotating(extra).restart_needed_for(&running),
                ["rotation"],
                "{extra}"
            );
        }
    }

    #[test]
    fn sizes_and_durations_are_human() {
        let text = format!(
            "{MINIMAL}[limits]\nmax_bulk_len = \"1GiB\"\nmax_inline_len = 70000\n[pool]\ncheckout_timeout = \"250ms\"\n"
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.limits.max_bulk_len, ByteSize(1 << 30));
        assert_eq!(c.limits.max_inline_len, ByteSize(70000));
        assert_eq!(c.pool.checkout_timeout, Duration::from_millis(250));
    }

    #[test]
    fn intervals_and_listeners_that_cannot_work_are_refused_by_key() {
        let cases = [
            (
                "[upstream]\nurl = \"rediss://h:1\"\ntls_poll_interval = \"0s\"\n".to_string(),
                "upstream.tls_poll_interval",
            ),
            (
                format!(
                    "{MINIMAL}[listener.tls]\ncert = \"/c\"\nkey = \"/k\"\npoll_interval = \"0s\"\n"
                ),
                "listener.tls.poll_interval",
            ),
            (
                format!(
                    "{MINIMAL}[rotation]\nstrategy = \"external\"\n[rotation.external]\npassword = \"file:/pw\"\npoll_interval = \"0s\"\n"
                ),
                "rotation.external.poll_interval",
            ),
            (
                format!("{MINIMAL}[listener.auth]\npoll_interval = \"0s\"\n"),
                "listener.auth.poll_interval",
            ),
            (
                "[upstream]\nurl = \"redis://h:1\"\ncommand_table_refresh = \"500ms\"\n"
                    .to_string(),
                "upstream.command_table_refresh",
            ),
            (
                format!(
                    "{MINIMAL}[credentials]\npassword = \"env:P\"\n[rotation]\nstrategy = \"acl-multi-password\"\npreflight_interval = \"0s\"\n"
                ),
                "rotation.preflight_interval",
            ),
            (
                format!(
                    "{MINIMAL}[admin]\nbind = \"127.0.0.1:9180\"\nmetrics_bind = \"127.0.0.1:9180\"\n"
                ),
                "admin.metrics_bind",
            ),
        ];
        for (text, key) in cases {
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let text = "[upstream]\nurl = \"rediss://h:1\"\ntls_poll_interval = \"2s\"\n";
        let c = Config::parse(text).unwrap();
        assert_eq!(c.upstream.tls_poll_interval, Duration::from_secs(2));
    }

    #[test]
    fn client_certificate_rotation_needs_the_cloud_and_the_files() {
        let cloud = "[rotation]\nstrategy = \"default-user\"\nbackend = \"cloud\"\n\
                     [rotation.cloud]\naccount_key = \"env:A\"\nsecret_key = \"env:S\"\n\
                     [rotation.database]\nkind = \"pro\"\nsubscription_id = 1\ndatabase_id = 2\n";
        let upstream = "[upstream]\nurl = \"rediss://h:1\"\nclient_cert = \"/c\"\nclient_key = \"/k\"\n\
                        [credentials]\npassword = \"env:P\"\n";
        let ok = format!(
            "{upstream}{cloud}[rotation.client_certificate]\nvalidity = \"30d\"\nrenew_before = \"10d\"\n"
        );
        let c = Config::parse(&ok).unwrap();
        let cert = c.rotation.unwrap().client_certificate.unwrap();
        assert_eq!(cert.validity, Duration::from_secs(30 * 86_400));
        assert_eq!(cert.subject, "rotaproxy");

        let cases = [
            // No files to write to.
            (
                format!(
                    "[upstream]\nurl = \"rediss://h:1\"\n[credentials]\npassword = \"env:P\"\n{cloud}[rotation.client_certificate]\n"
                ),
                "rotation.client_certificate",
            ),
            // Renewing before more than the whole lifetime.
            (
                format!(
                    "{upstream}{cloud}[rotation.client_certificate]\nvalidity = \"10d\"\nrenew_before = \"10d\"\n"
                ),
                "rotation.client_certificate.renew_before",
            ),
            // Not the cloud backend.
            (
                format!(
                    "{upstream}[rotation]\nstrategy = \"acl-multi-password\"\n[rotation.client_certificate]\n"
                ),
                "rotation.client_certificate",
            ),
        ];
        for (text, key) in cases {
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn url_forms() {
        let u = UpstreamUrl::parse("rediss://db.example.com:12000").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (true, "db.example.com", 12000)
        );
        let u = UpstreamUrl::parse("redis://[::1]:7000").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "::1", 7000));
        assert!(UpstreamUrl::parse("redis://u:pw@host:1").is_err());
        let err = UpstreamUrl::parse("redis://host:6379/3").unwrap_err();
        assert!(err.contains("`/3`") && err.contains("SELECT"), "{err}");
        assert!(UpstreamUrl::parse("rediss://host:6380?ssl_cert_reqs=none").is_err());
        assert_eq!(
            UpstreamUrl::without_credentials("redis://u:s3cret@host:1/0"),
            "redis://***@host:1/0"
        );
        assert_eq!(
            UpstreamUrl::without_credentials("rediss://:p@ss@host:1"),
            "rediss://***@host:1"
        );
        assert_eq!(
            UpstreamUrl::without_credentials("rediss://host:1"),
            "rediss://host:1"
        );
        assert!(UpstreamUrl::parse("http://host").is_err());
    }

    #[test]
    fn cross_field_errors_name_the_key() {
        let text = "[upstream]\nurl = \"redis://h:1\"\nca_file = \"/x\"\n";
        let err = Config::parse(text).unwrap_err().to_string();
        assert!(err.contains("upstream.ca_file"), "{err}");
        let text = format!("{MINIMAL}[listener.auth]\nmode = \"password\"\n");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("listener.auth.users"), "{err}");
    }
}
