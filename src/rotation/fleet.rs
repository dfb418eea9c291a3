//! A fleet of proxies sharing one rotating credential: the sidecars of one service's replicas.
//!
//! They must not rotate independently (with `alternating-users`, one proxy would scramble the
//! user another one is using). So the fleet keeps what a single proxy keeps in its state file
//! in the upstream Redis itself, under one hash tag:
//!
//! - `{prefix}:state` — the rotation state, sealed with AES-256-GCM under the fleet's key (the
//!   store's user can read it, but only a member can open it);
//! - `{prefix}:lease` — `<instance> <token>`, with a time to live: who rotates. A member takes
//!   it when it is free, with a new token from `{prefix}:fence`, and renews it while alive;
//! - `{prefix}:members` — what every member last reported (the shared generation it follows
//!   and how many connections it still has on an older one), stamped with the server's clock;
//! - `{prefix}:requests` — rotation requests a follower's admin API passed on to the rotator,
//!   and `{prefix}:answer:<request>` the id of the rotation that serves each.
//!
//! Writes of the state are fenced: a script writes only while the lease still holds the
//! writer's own token, so a rotator that lost its lease (a long pause, a partition) cannot
//! overwrite what its successor did. Every step persists before it takes effect, so a deposed
//! rotator stops at its next step.
//!
//! The fleet reads and writes with a user of its own, which it never rotates: a replica that
//! starts after many rotations needs it to learn the credential of now.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use redis_protocol::resp2::types::OwnedFrame;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::secret::random_hex;
use super::state::{RotationState, SCHEMA_VERSION};
use super::store::StoreError;
use crate::config::{FleetConfig, SecretError, TimeoutsConfig};
use crate::credentials::{Credential, Generation, Generations};
use crate::metrics::Metrics;
use crate::secrets::FollowedSecret;
use crate::upstream::connector::{self, ConnectError, UpstreamConn};

/// Marks a sealed state and the format it is in.
const SEALED_MAGIC: &[u8] = b"rpf1";

/// Takes the lease when it is free, or renews it when `ARGV[3]` is what it holds. Returns
/// `{held, holder}`.
const LEASE_SCRIPT: &str = r"
local held = redis.call('GET', KEYS[1])
if not held then
  local token = redis.call('INCR', KEYS[2])
  local value = ARGV[1] .. ' ' .. token
  redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
  return {1, value}
end
if held == ARGV[3] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, held}
end
return {0, held}
";

/// Writes the state only while the lease holds the writer's value.
const FENCED_SET_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
";

/// Gives the lease up, if it is still the caller's.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// A member's report, stamped with the server's clock (members' clocks may disagree).
const REPORT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now .. ' ' .. ARGV[2])
return now
";

/// Every report, and the server's clock to judge their age by.
const MEMBERS_SCRIPT: &str = r"
local t = redis.call('TIME')
return {t[1] * 1000 + math.floor(t[2] / 1000), redis.call('HGETALL', KEYS[1])}
";

/// How long a passed-on rotation request waits for a rotator before it is dropped (and how
/// long its answer is kept).
const REQUEST_TTL_MS: &str = "600000";
/// How often a follower looks for the answer to a request it passed on.
const ANSWER_POLL: Duration = Duration::from_millis(100);

/// The fleet's keys, all under one hash tag so the scripts may use them together on a sharded
/// database.
#[derive(Debug, Clone)]
struct Keys {
    state: String,
    lease: String,
    fence: String,
    members: String,
    requests: String,
    prefix: String,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        let key = |name: &str| format!("{{{prefix}}}:{name}");
        Keys {
            state: key("state"),
            lease: key("lease"),
            fence: key("fence"),
            members: key("members"),
            requests: key("requests"),
            prefix: prefix.to_string(),
        }
    }

    fn answer(&self, request: &str) -> String {
        format!("{{{}}}:answer:{request}", self.prefix)
    }
}

/// What a member tells the others.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberReport {
    /// The shared generation whose credential the member uses (0: none yet).
    pub generation: u64,
    /// Its upstream connections still on an older generation.
    pub previous_connections: i64,
    pub leader: bool,
    /// Random per process: two live processes reporting under one instance name differ here
    /// (see [`Fleet::members`]).
    #[serde(default)]
    pub incarnation: String,
}

/// A member as the last read of `{prefix}:members` showed it.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub instance: String,
    #[serde(flatten)]
    pub report: MemberReport,
    /// How long ago it reported, by the server's clock.
    pub reported_ms_ago: u64,
}

/// A rotation request passed on by a follower.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PassedRequest {
    /// Names the answer: the rotator writes the id of the rotation it started (or found
    /// running) under `{prefix}:answer:<id>`.
    pub id: String,
    pub urgent: bool,
    pub from: String,
}

/// One member's handle on the fleet's shared keys.
pub struct Fleet {
    config: FleetConfig,
    instance: String,
    keys: Keys,
    /// Seals the state (and opens it).
    cipher: LessSafeKey,
    /// Also open it, during a change of the fleet's key (`extra_keys`).
    extra_ciphers: Vec<LessSafeKey>,
    store_user: Option<String>,
    store_password: Mutex<FollowedSecret>,
    /// Where the store connection goes: the generation of the first start until the proxy's
    /// generations exist, then always the current one (a renewed CA or endpoint included).
    first: Arc<Generation>,
    generations: Mutex<Option<Arc<Generations>>>,
    timeouts: TimeoutsConfig,
    metrics: Metrics,
    conn: tokio::sync::Mutex<Option<UpstreamConn>>,
    /// The lease value while this member holds it (it leads exactly then).
    lease: Mutex<Option<String>>,
    /// Stopping: never takes the lease again.
    retired: AtomicBool,
    /// Stopped: reports no more.
    left: AtomicBool,
    /// This process among the members (see [`MemberReport::incarnation`]).
    incarnation: String,
    /// The server's time of this member's last report (0: none yet).
    reported_at: AtomicU64,
    /// Another process reports under this instance name (logged once).
    clash: AtomicBool,
    /// The shared generation this member's credential comes from.
    synced: AtomicU64,
    /// Who held the lease at the last look, and the members then (for status).
    view: Mutex<(Option<String>, Vec<Member>)>,
}

/// Why the fleet's key cannot be used. Never carries the key.
#[derive(Debug, thiserror::Error)]
pub enum FleetKeyError {
    #[error(transparent)]
    Read(#[from] SecretError),
    #[error(
        "rotation.fleet.key and extra_keys must each be 32 bytes in base64 (`openssl rand -base64 32`), {0}"
    )]
    Shape(&'static str),
}

impl Fleet {
    /// Reads the fleet key and the store password now (either missing is an error at start).
    pub fn new(
        config: &FleetConfig,
        first: &Generation,
        timeouts: &TimeoutsConfig,
        metrics: &Metrics,
    ) -> Result<Fleet, FleetKeyError> {
        let cipher = read_key(&config.key)?;
        let extra_ciphers = config
            .extra_keys
            .iter()
            .map(read_key)
            .collect::<Result<_, _>>()?;
        let store_password =
            FollowedSecret::read_now("rotation.fleet password", config.password.clone())?;
        let instance = config.instance.clone().unwrap_or_else(default_instance);
        Ok(Fleet {
            keys: Keys::new(&config.key_prefix),
            config: config.clone(),
            instance,
            cipher,
            extra_ciphers,
            store_user: config.username.clone(),
            store_password: Mutex::new(store_password),
            first: Arc::new(first.with_credential(first.id, first.credential.clone())),
            generations: Mutex::new(None),
            timeouts: timeouts.clone(),
            metrics: metrics.clone(),
            conn: tokio::sync::Mutex::new(None),
            lease: Mutex::new(None),
            retired: AtomicBool::new(false),
            left: AtomicBool::new(false),
            incarnation: random_hex(6),
            reported_at: AtomicU64::new(0),
            clash: AtomicBool::new(false),
            synced: AtomicU64::new(0),
            view: Mutex::new((None, Vec::new())),
        })
    }

    /// From now on the store connection follows the proxy's current generation.
    pub fn attach(&self, generations: Arc<Generations>) {
        *self.generations.lock().expect("not poisoned") = Some(generations);
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    pub fn is_leader(&self) -> bool {
        self.lease.lock().expect("not poisoned").is_some()
    }

    /// Notes the shared generation whose credential this member now uses.
    pub fn set_synced(&self, generation: u64) {
        self.synced.store(generation, Ordering::Release);
    }

    pub fn synced(&self) -> u64 {
        self.synced.load(Ordering::Acquire)
    }

    pub fn describe(&self) -> String {
        format!(
            "fleet {} (upstream Redis, instance {})",
            self.keys.state, self.instance
        )
    }

    /// The fleet as this member last saw it, for `/v1/status`.
    pub fn status(&self) -> serde_json::Value {
        let (holder, members) = self.view.lock().expect("not poisoned").clone();
        serde_json::json!({
            "instance": self.instance,
            "role": if self.is_leader() { "leader" } else { "follower" },
            "leader": holder.as_deref().map(instance_of),
            "synced_generation": self.synced(),
            "members": members,
        })
    }

    // ---- the lease ------------------------------------------------------------------------

    /// Takes the lease if it is free, or renews it if this member holds it. True while this
    /// member leads. A lost lease is given up here: writes of the state fail from then on.
    pub async fn seek_lease(&self) -> Result<bool, StoreError> {
        if self.retired.load(Ordering::Acquire) {
            return Ok(false);
        }
        let mine = self.lease.lock().expect("not poisoned").clone();
        let ttl = self.config.lease_ttl.as_millis().to_string();
        let reply = self
            .command(&[
                b"EVAL",
                LEASE_SCRIPT.as_bytes(),
                b"2",
                self.keys.lease.as_bytes(),
                self.keys.fence.as_bytes(),
                self.instance.as_bytes(),
                ttl.as_bytes(),
                mine.as_deref().unwrap_or("").as_bytes(),
            ])
            .await?;
        let (held, holder) = match reply {
            OwnedFrame::Array(items) => match items.as_slice() {
                [OwnedFrame::Integer(held), OwnedFrame::BulkString(holder)] => {
                    (*held == 1, String::from_utf8_lossy(holder).into_owned())
                }
                _ => return Err(self.unexpected("the lease script")),
            },
            other => return Err(self.reply_error("the lease script", other)),
        };
        *self.lease.lock().expect("not poisoned") = held.then(|| holder.clone());
        self.view.lock().expect("not poisoned").0 = Some(holder);
        Ok(held)
    }

    /// Gives the lease up for good (at a stop), so another member need not wait for it to
    /// expire.
    pub async fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        let Some(mine) = self.lease.lock().expect("not poisoned").take() else {
            return;
        };
        let _ = self
            .command(&[
                b"EVAL",
                RELEASE_SCRIPT.as_bytes(),
                b"1",
                self.keys.lease.as_bytes(),
                mine.as_bytes(),
            ])
            .await;
    }

    /// Takes this member off the list at exit, so that a rotation does not wait for it to be
    /// given up as silent (`member_timeout`).
    pub async fn leave(&self) {
        self.left.store(true, Ordering::Release);
        let _ = self
            .command(&[
                b"HDEL",
                self.keys.members.as_bytes(),
                self.instance.as_bytes(),
            ])
            .await;
    }

    /// Forgets the lease without telling the store (it was found lost).
    pub fn drop_lease(&self) {
        *self.lease.lock().expect("not poisoned") = None;
    }

    // ---- the state ------------------------------------------------------------------------

    pub async fn load(&self) -> Result<Option<RotationState>, StoreError> {
        let sealed = match self.command(&[b"GET", self.keys.state.as_bytes()]).await? {
            OwnedFrame::Null => return Ok(None),
            OwnedFrame::BulkString(b) => b,
            other => return Err(self.reply_error("GET of the state", other)),
        };
        let json = self.open(sealed)?;
        let state: RotationState = serde_json::from_slice(&json).map_err(|e| {
            self.corrupt(format!(
                "its JSON does not read (line {} column {})",
                e.line(),
                e.column()
            ))
        })?;
        if state.version != SCHEMA_VERSION {
            return Err(self.corrupt(format!(
                "schema version {} (this proxy reads {SCHEMA_VERSION})",
                state.version
            )));
        }
        Ok(Some(state))
    }

    /// Writes the state, only while this member holds the lease.
    pub async fn save(&self, state: &RotationState) -> Result<(), StoreError> {
        let Some(mine) = self.lease.lock().expect("not poisoned").clone() else {
            return Err(StoreError::Fenced);
        };
        let json = serde_json::to_vec(state).expect("the state always serializes");
        let sealed = self.seal(json);
        let write: &[&[u8]] = &[
            b"EVAL",
            FENCED_SET_SCRIPT.as_bytes(),
            b"2",
            self.keys.lease.as_bytes(),
            self.keys.state.as_bytes(),
            mine.as_bytes(),
            &sealed,
        ];
        let wanted = self.config.replicas;
        if wanted == 0 {
            let reply = self.command(write).await?;
            return self.fenced_write_done(reply);
        }
        // WAIT counts the writes of its own connection: it goes in the same write.
        let (wanted_text, timeout_ms) = (
            wanted.to_string(),
            self.config.replica_timeout.as_millis().to_string(),
        );
        let wait: &[&[u8]] = &[b"WAIT", wanted_text.as_bytes(), timeout_ms.as_bytes()];
        let mut replies = self
            .pipeline(&[write, wait], self.config.replica_timeout)
            .await?
            .into_iter();
        let (Some(written), Some(waited)) = (replies.next(), replies.next()) else {
            return Err(self.unexpected("the fenced write and WAIT"));
        };
        self.fenced_write_done(written)?;
        match waited {
            OwnedFrame::Integer(n) if n >= i64::from(wanted) => Ok(()),
            OwnedFrame::Integer(n) => Err(self.failure(format!(
                "the state reached {n} of {wanted} replicas within {}",
                humantime::format_duration(self.config.replica_timeout)
            ))),
            other => Err(self.reply_error("WAIT", other)),
        }
    }

    fn fenced_write_done(&self, reply: OwnedFrame) -> Result<(), StoreError> {
        match reply {
            OwnedFrame::Integer(1) => Ok(()),
            OwnedFrame::Integer(_) => {
                self.drop_lease();
                Err(StoreError::Fenced)
            }
            other => Err(self.reply_error("the fenced write", other)),
        }
    }

    fn seal(&self, mut plain: Vec<u8>) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random source works");
        self.cipher
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.config.key_prefix.as_bytes()),
                &mut plain,
            )
            .expect("AES-GCM seals any state of this size");
        let mut out = Vec::with_capacity(SEALED_MAGIC.len() + NONCE_LEN + plain.len());
        out.extend_from_slice(SEALED_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&plain);
        out
    }

    fn open(&self, sealed: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let Some(rest) = sealed.strip_prefix(SEALED_MAGIC) else {
            return Err(self.corrupt("it is not a sealed rotaproxy state".into()));
        };
        if rest.len() < NONCE_LEN {
            return Err(self.corrupt("it is cut short".into()));
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("NONCE_LEN bytes");
        for cipher in std::iter::once(&self.cipher).chain(&self.extra_ciphers) {
            let mut plain = body.to_vec();
            if let Ok(opened) = cipher.open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.config.key_prefix.as_bytes()),
                &mut plain,
            ) {
                let len = opened.len();
                plain.truncate(len);
                return Ok(plain);
            }
        }
        Err(self.corrupt(
            "it does not open with rotation.fleet.key or extra_keys (another fleet's key, or altered)"
                .into(),
        ))
    }

    // ---- members ----------------------------------------------------------------------------

    /// Reports this member: the shared generation it uses, its connections still on an older
    /// one, and whether it leads.
    pub async fn report(&self, previous_connections: i64) -> Result<(), StoreError> {
        if self.left.load(Ordering::Acquire) {
            return Ok(());
        }
        let report = MemberReport {
            generation: self.synced(),
            previous_connections,
            leader: self.is_leader(),
            incarnation: self.incarnation.clone(),
        };
        let json = serde_json::to_vec(&report).expect("a report always serializes");
        match self
            .command(&[
                b"EVAL",
                REPORT_SCRIPT.as_bytes(),
                b"1",
                self.keys.members.as_bytes(),
                self.instance.as_bytes(),
                &json,
            ])
            .await?
        {
            OwnedFrame::Integer(at) => {
                self.reported_at.store(at.max(0) as u64, Ordering::Release);
                Ok(())
            }
            other => Err(self.reply_error("the report", other)),
        }
    }

    /// Every member's last report, and drops those silent for longer than `member_timeout`
    /// (the rotator does, so the list does not grow with every replica ever started).
    pub async fn members(&self) -> Result<Vec<Member>, StoreError> {
        let reply = self
            .command(&[
                b"EVAL",
                MEMBERS_SCRIPT.as_bytes(),
                b"1",
                self.keys.members.as_bytes(),
            ])
            .await?;
        let OwnedFrame::Array(items) = reply else {
            return Err(self.reply_error("the members script", reply));
        };
        let [OwnedFrame::Integer(now), OwnedFrame::Array(fields)] = items.as_slice() else {
            return Err(self.unexpected("the members script"));
        };
        let timeout = self.config.member_timeout.as_millis() as u64;
        let mut members = Vec::new();
        let mut gone = Vec::new();
        for pair in fields.chunks(2) {
            let [OwnedFrame::BulkString(name), OwnedFrame::BulkString(value)] = pair else {
                continue;
            };
            let instance = String::from_utf8_lossy(name).into_owned();
            let value = String::from_utf8_lossy(value);
            let Some((at, json)) = value.split_once(' ') else {
                continue;
            };
            let (Ok(at), Ok(report)) = (at.parse::<u64>(), serde_json::from_str(json)) else {
                continue;
            };
            if instance == self.instance {
                self.look_for_a_clash(&report, at);
            }
            let ago = (*now as u64).saturating_sub(at);
            if ago > timeout {
                gone.push(instance);
                continue;
            }
            members.push(Member {
                instance,
                report,
                reported_ms_ago: ago,
            });
        }
        members.sort_by(|a, b| a.instance.cmp(&b.instance));
        if self.is_leader() && !gone.is_empty() {
            let mut args: Vec<&[u8]> = vec![b"HDEL", self.keys.members.as_bytes()];
            args.extend(gone.iter().map(|g| g.as_bytes()));
            let _ = self.command(&args).await;
            for instance in &gone {
                tracing::info!(
                    target: "rotaproxy::audit",
                    event = "fleet.member_gone",
                    instance = %instance,
                    "a fleet member stopped reporting; rotations no longer wait for it"
                );
            }
        }
        self.view.lock().expect("not poisoned").1 = members.clone();
        Ok(members)
    }

    /// Another process reporting under this member's name since its own last report (two
    /// replicas given one `instance`) would make each hide the other from the rotator's gate:
    /// said loudly, once. (A report left by this name's previous process is older than this
    /// process's first one.)
    fn look_for_a_clash(&self, report: &MemberReport, at: u64) {
        let own_last = self.reported_at.load(Ordering::Acquire);
        if own_last == 0 || at <= own_last || report.incarnation == self.incarnation {
            return;
        }
        metrics::counter!("rotaproxy_fleet_instance_clashes_total").increment(1);
        if !self.clash.swap(true, Ordering::AcqRel) {
            tracing::error!(
                target: "rotaproxy::audit",
                event = "fleet.instance_clash",
                instance = %self.instance,
                "another process reports under this fleet instance name: give every member its own rotation.fleet.instance"
            );
        }
    }

    /// Members other than this one that still use an older shared generation than
    /// `generation`, or still hold connections of an older one.
    pub async fn lagging(&self, generation: u64) -> Result<Vec<String>, StoreError> {
        Ok(self
            .members()
            .await?
            .into_iter()
            .filter(|m| m.instance != self.instance)
            .filter(|m| m.report.generation < generation || m.report.previous_connections > 0)
            .map(|m| m.instance)
            .collect())
    }

    // ---- requests passed on -----------------------------------------------------------------

    /// Passes a rotation request on to the rotator. Returns the request (its id names the
    /// answer, see [`Fleet::answer`]).
    pub async fn pass_request(&self, urgent: bool) -> Result<PassedRequest, StoreError> {
        let request = PassedRequest {
            id: random_hex(8),
            urgent,
            from: self.instance.clone(),
        };
        let json = serde_json::to_vec(&request).expect("a request always serializes");
        match self
            .command(&[b"RPUSH", self.keys.requests.as_bytes(), &json])
            .await?
        {
            OwnedFrame::Integer(_) => {}
            other => return Err(self.reply_error("RPUSH of the request", other)),
        }
        let _ = self
            .command(&[
                b"PEXPIRE",
                self.keys.requests.as_bytes(),
                REQUEST_TTL_MS.as_bytes(),
            ])
            .await;
        Ok(request)
    }

    /// The rotator's answer to a passed-on request: the id of the rotation that serves it.
    pub async fn answer(&self, request: &str, rotation: &str) -> Result<(), StoreError> {
        let key = self.keys.answer(request);
        match self
            .command(&[
                b"SET",
                key.as_bytes(),
                rotation.as_bytes(),
                b"PX",
                REQUEST_TTL_MS.as_bytes(),
            ])
            .await?
        {
            OwnedFrame::SimpleString(_) => Ok(()),
            other => Err(self.reply_error("SET of the answer", other)),
        }
    }

    /// Waits (at most `within`) for the rotator to answer request `request`.
    pub async fn wait_for_answer(
        &self,
        request: &str,
        within: Duration,
    ) -> Result<Option<String>, StoreError> {
        let key = self.keys.answer(request);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.command(&[b"GET", key.as_bytes()]).await? {
                OwnedFrame::BulkString(id) => {
                    return Ok(Some(String::from_utf8_lossy(&id).into_owned()));
                }
                OwnedFrame::Null => {}
                other => return Err(self.reply_error("GET of the answer", other)),
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(ANSWER_POLL).await;
        }
    }

    /// The requests passed on since the last call (the rotator takes them).
    pub async fn take_requests(&self) -> Result<Vec<PassedRequest>, StoreError> {
        let reply = self
            .command(&[b"LPOP", self.keys.requests.as_bytes(), b"100"])
            .await?;
        match reply {
            OwnedFrame::Null => Ok(Vec::new()),
            OwnedFrame::Array(items) => Ok(items
                .into_iter()
                .filter_map(|item| match item {
                    OwnedFrame::BulkString(b) => serde_json::from_slice(&b).ok(),
                    _ => None,
                })
                .collect()),
            other => Err(self.reply_error("LPOP of the requests", other)),
        }
    }

    /// The instance that held the lease at the last look.
    pub fn leader_instance(&self) -> Option<String> {
        self.view
            .lock()
            .expect("not poisoned")
            .0
            .as_deref()
            .map(|h| instance_of(h).to_string())
    }

    // ---- the store connection ---------------------------------------------------------------

    /// Runs one command on the store connection (see [`Fleet::pipeline`]).
    async fn command(&self, args: &[&[u8]]) -> Result<OwnedFrame, StoreError> {
        let mut replies = self.pipeline(&[args], Duration::ZERO).await?;
        replies
            .pop()
            .ok_or_else(|| self.unexpected("a command of the store"))
    }

    /// Runs commands in one write on the store connection, opening it first if needed; a
    /// connection that failed is replaced once. `extra` is added to the time they may take (a
    /// `WAIT`'s own timeout).
    async fn pipeline(
        &self,
        commands: &[&[&[u8]]],
        extra: Duration,
    ) -> Result<Vec<OwnedFrame>, StoreError> {
        let mut conn = self.conn.lock().await;
        let mut fresh = false;
        loop {
            if conn.is_none() {
                *conn = Some(self.connect().await?);
                fresh = true;
            }
            let open = conn.as_mut().expect("just opened");
            match connector::run_pipeline(open, commands, self.timeouts.auth + extra).await {
                Ok(replies) => return Ok(replies),
                Err(err) => {
                    *conn = None;
                    if fresh {
                        return Err(self.unreachable(&err));
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<UpstreamConn, StoreError> {
        let password = self
            .store_password
            .lock()
            .expect("not poisoned")
            .current(false)
            .map_err(|e| self.refused(e.to_string()))?;
        let credential = Credential {
            username: self.store_user.clone(),
            password: Some(password),
        };
        let template = match &*self.generations.lock().expect("not poisoned") {
            Some(generations) => generations.current(),
            None => self.first.clone(),
        };
        // Id 0: the store's connections belong to no generation of the proxy's credential.
        let generation = Arc::new(template.with_credential(0, credential));
        connector::connect(&generation, &self.timeouts, &self.metrics)
            .await
            .map_err(|e| self.unreachable(&e))
    }

    fn unreachable(&self, err: &ConnectError) -> StoreError {
        let message = format!("the store connection failed: {err}");
        if matches!(err, ConnectError::Auth { .. }) {
            return self.refused(message);
        }
        self.failure(message)
    }

    fn refused(&self, message: String) -> StoreError {
        metrics::counter!("rotaproxy_fleet_store_errors_total").increment(1);
        StoreError::FleetRefused {
            keys: self.keys.state.clone(),
            message,
        }
    }

    fn failure(&self, message: String) -> StoreError {
        metrics::counter!("rotaproxy_fleet_store_errors_total").increment(1);
        StoreError::Fleet {
            keys: self.keys.state.clone(),
            message,
        }
    }

    fn corrupt(&self, message: String) -> StoreError {
        StoreError::FleetCorrupt {
            key: self.keys.state.clone(),
            message,
        }
    }

    fn unexpected(&self, what: &str) -> StoreError {
        self.failure(format!("{what} answered in an unexpected shape"))
    }

    /// An error reply names no secret here (the state travels sealed), so it is shown whole:
    /// a `NOPERM` says which command the store's user lacks.
    fn reply_error(&self, what: &str, reply: OwnedFrame) -> StoreError {
        match reply {
            OwnedFrame::Error(e) => self.refused(format!("{what} was refused: {e}")),
            _ => self.unexpected(what),
        }
    }
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("instance", &self.instance)
            .field("keys", &self.keys)
            .field("key", &"<redacted>")
            .field("leader", &self.is_leader())
            .finish()
    }
}

/// An AES-256-GCM key from 32 bytes in base64.
fn read_key(reference: &crate::config::SecretRef) -> Result<LessSafeKey, FleetKeyError> {
    let key = reference.resolve()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key.expose_secret().trim())
        .map_err(|_| FleetKeyError::Shape("and this is not base64"))?;
    if bytes.len() != 32 {
        return Err(FleetKeyError::Shape("and this is another length"));
    }
    Ok(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &bytes).expect("32 bytes is an AES-256 key"),
    ))
}

/// The instance part of a lease value (`<instance> <token>`).
fn instance_of(holder: &str) -> &str {
    holder
        .rsplit_once(' ')
        .map_or(holder, |(instance, _)| instance)
}

/// The host name (a pod's name in Kubernetes) and the process id.
fn default_instance() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "rotaproxy".into());
    format!("{host}-{}", std::process::id())
}

/// How long the rotator waits between two looks at the members while it drains.
pub const MEMBER_CHECK_EVERY: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let keys = Keys::new("rotaproxy:fleet:orders");
        for key in [
            &keys.state,
            &keys.lease,
            &keys.fence,
            &keys.members,
            &keys.requests,
        ] {
            assert!(key.starts_with("{rotaproxy:fleet:orders}:"), "{key}");
        }
    }

    #[test]
    fn instance_of_a_lease_value() {
        assert_eq!(instance_of("pod-7 42"), "pod-7");
        assert_eq!(instance_of("odd"), "odd");
    }
}
