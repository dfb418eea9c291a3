//! How a new secret is made acceptable to the server, and how the old one stops working. One
//! variant per strategy; the state machine in [`super`] is the same for all of them.
//!
//! - `acl-multi-password`: the user gets the new password next to the old one (`>new`), then
//!   loses the old one (`<old`). Needs `ACL SETUSER` (open-source Redis, Redis Software).
//! - `alternating-users`: two users with the same permissions; each rotation sets the idle one's
//!   password and moves every session to it; the previous user's password is then scrambled.
//!   The strategy that works where a user has only one password (Redis Cloud).
//! - `external`: another system changes the password; the proxy only watches the source.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use redis_protocol::resp2::types::OwnedFrame;
use secrecy::{ExposeSecret, SecretString};

use super::RotationError;
use super::preflight::{Check, Verdict};
use super::secret::generate_password;
use super::state::Slot;
use crate::cloud::{AclUserId, CloudClient, DatabaseRef, TaskId};
use crate::config::{
    RotationBackend, RotationConfig, RotationStrategy, SecretError, SecretRef, TimeoutsConfig,
};
use crate::credentials::{Credential, Generation, Generations};
use crate::metrics::Metrics;
use crate::upstream::connector::{self, UpstreamConn};

/// Runs the proxy's own commands against the server (ACL SETUSER, CLIENT KILL).
pub struct ServerControl {
    pub generations: Arc<Generations>,
    /// A separate administrative credential; None: the proxied user acts on itself.
    pub admin: Option<AdminCredential>,
    pub timeouts: TimeoutsConfig,
    pub metrics: Metrics,
}

/// The administrative user of `[rotation.admin]`. Its password is read at each use (a `file:`
/// one again when the file changed), so that it can be rotated too, with no restart.
pub struct AdminCredential {
    username: Option<String>,
    password: std::sync::Mutex<crate::secrets::FollowedSecret>,
}

impl AdminCredential {
    /// Reads the password now: one that cannot be read is an error at start.
    pub fn new(username: Option<String>, password: SecretRef) -> Result<Self, SecretError> {
        let password =
            crate::secrets::FollowedSecret::read_now("rotation.admin password", password)?;
        Ok(Self {
            username,
            password: std::sync::Mutex::new(password),
        })
    }

    fn current(&self) -> Result<Credential, RotationError> {
        let password = self
            .password
            .lock()
            .expect("not poisoned")
            .current(false)
            .map_err(|e| RotationError::Source(e.to_string()))?;
        Ok(Credential {
            username: self.username.clone(),
            password: Some(password),
        })
    }
}

impl ServerControl {
    /// Opens a control connection as the admin user, or as `acting` when there is none.
    async fn open(&self, acting: &Slot) -> Result<UpstreamConn, RotationError> {
        let current = self.generations.current();
        let credential = match &self.admin {
            Some(admin) => admin.current()?,
            None => credential_of(acting),
        };
        let generation = Arc::new(current.with_credential(0, credential));
        Ok(connector::connect(&generation, &self.timeouts, &self.metrics).await?)
    }

    /// `ACL SETUSER <user> <rules...>`. Removing a password that is already gone counts as done,
    /// so the step can be repeated after a crash.
    async fn acl_setuser(
        &self,
        acting: &Slot,
        user: &str,
        rules: &[&[u8]],
    ) -> Result<(), RotationError> {
        let mut conn = self.open(acting).await?;
        let mut args: Vec<&[u8]> = vec![b"ACL", b"SETUSER", user.as_bytes()];
        args.extend_from_slice(rules);
        match connector::run_command(&mut conn, &args, self.timeouts.auth).await? {
            OwnedFrame::SimpleString(_) => Ok(()),
            // Redis echoes the modifier — the password — in this error: never show its text.
            OwnedFrame::Error(e) if e.contains("does not exist") => Ok(()),
            OwnedFrame::Error(e) => Err(RotationError::Refused {
                what: format!("ACL SETUSER {user}"),
                code: error_code(&e),
            }),
            _ => Err(RotationError::Refused {
                what: format!("ACL SETUSER {user}"),
                code: "unexpected reply".into(),
            }),
        }
    }

    /// Who [`ServerControl::open`] connects as.
    fn acting_user(&self, acting: &Slot) -> String {
        match &self.admin {
            Some(admin) => admin.username.as_deref().unwrap_or("default").to_string(),
            None => acting.display_user().to_string(),
        }
    }

    /// Whether the connection's user may run `args`, which are meant to change nothing. `NOPERM`
    /// says no. Another error came after the permission check, so it says yes, unless
    /// `expected_error` is given and the error does not contain it (the server may not know
    /// the command at all): then it cannot be told.
    async fn permitted(
        &self,
        conn: &mut UpstreamConn,
        args: &[&[u8]],
        expected_error: Option<&str>,
    ) -> Result<Permission, RotationError> {
        Ok(
            match connector::run_command(conn, args, self.timeouts.auth).await? {
                OwnedFrame::Error(e) if e.starts_with("NOPERM") => Permission::No,
                OwnedFrame::Error(e) if expected_error.is_some_and(|x| !e.contains(x)) => {
                    Permission::Unknown(error_code(&e))
                }
                _ => Permission::Yes,
            },
        )
    }

    /// What `user` may do, as `ACL GETUSER` tells it, on a connection of [`ServerControl::open`].
    async fn acl_rules(
        &self,
        conn: &mut UpstreamConn,
        user: &str,
    ) -> Result<AclRules, RotationError> {
        let reply = connector::acl_getuser(conn, user, self.timeouts.auth).await?;
        Ok(AclRules::from_reply(reply))
    }

    /// Closes every connection authenticated as `user` that is not one of the proxy's own.
    async fn kill_foreign_connections(
        &self,
        acting: &Slot,
        user: &str,
    ) -> Result<u64, RotationError> {
        let mut conn = self.open(acting).await?;
        let mut killed = 0;
        for id in self.foreign_connections(&mut conn, user).await? {
            if let OwnedFrame::Integer(n) = connector::run_command(
                &mut conn,
                &[b"CLIENT", b"KILL", b"ID", id.to_string().as_bytes()],
                self.timeouts.auth,
            )
            .await?
            {
                killed += n as u64;
            }
        }
        Ok(killed)
    }

    /// The server's ids of the connections authenticated as `user` that are not the proxy's
    /// own (its pool's, its sessions', `conn` itself), from `CLIENT LIST`.
    async fn foreign_connections(
        &self,
        conn: &mut UpstreamConn,
        user: &str,
    ) -> Result<Vec<i64>, RotationError> {
        let list = match connector::client_list(conn, self.timeouts.auth).await? {
            OwnedFrame::BulkString(text) => String::from_utf8_lossy(&text).into_owned(),
            OwnedFrame::Error(e) => {
                return Err(RotationError::Refused {
                    what: "CLIENT LIST".into(),
                    code: error_code(&e),
                });
            }
            _ => String::new(),
        };
        Ok(list
            .lines()
            .filter_map(|line| {
                let field = |name: &str| {
                    line.split(' ')
                        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                };
                let id = field("id")?.parse::<i64>().ok()?;
                (field("user")? == user
                    && !connector::is_own_client(id)
                    && Some(id) != conn.client_id)
                    .then_some(id)
            })
            .collect())
    }
}

/// The first word of a Redis error (`ERR`, `NOPERM`, `WRONGPASS`): safe to log, unlike the rest.
fn error_code(error: &str) -> String {
    error.split_whitespace().next().unwrap_or("ERR").to_string()
}

/// A user's rules as `ACL GETUSER` answers them, less what a rotation itself changes: its
/// passwords (never kept, not even their hashes) and the `on`/`off`/`nopass` flags.
#[derive(Debug)]
enum AclRules {
    Found(Vec<(String, OwnedFrame)>),
    NoSuchUser,
    /// The server would not say (the error's first word, or what the reply looked like).
    Unknown(String),
}

impl AclRules {
    fn from_reply(reply: OwnedFrame) -> AclRules {
        let fields = match reply {
            OwnedFrame::Null => return AclRules::NoSuchUser,
            OwnedFrame::Error(e) => return AclRules::Unknown(error_code(&e)),
            OwnedFrame::Array(fields) if fields.len() % 2 == 0 => fields,
            _ => return AclRules::Unknown("an unexpected reply".into()),
        };
        let mut rules = Vec::new();
        let mut fields = fields.into_iter();
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            let name = match name {
                OwnedFrame::BulkString(b) | OwnedFrame::SimpleString(b) => {
                    String::from_utf8_lossy(&b).into_owned()
                }
                _ => return AclRules::Unknown("an unexpected reply".into()),
            };
            let value = match (name.as_str(), value) {
                ("passwords", _) => continue,
                ("flags", OwnedFrame::Array(flags)) => OwnedFrame::Array(
                    flags
                        .into_iter()
                        .filter(|f| {
                            !matches!(f, OwnedFrame::BulkString(b)
                                if matches!(b.as_slice(), b"on" | b"off" | b"nopass"))
                        })
                        .collect(),
                ),
                (_, value) => value,
            };
            rules.push((name, value));
        }
        AclRules::Found(rules)
    }

    /// The parts (`commands`, `keys`, ...) in which `a` and `b` differ.
    fn differences(a: &[(String, OwnedFrame)], b: &[(String, OwnedFrame)]) -> Vec<String> {
        let mut names: Vec<&String> = a.iter().chain(b).map(|(name, _)| name).collect();
        names.sort();
        names.dedup();
        let value = |rules: &[(String, OwnedFrame)], name: &str| {
            rules
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        names
            .into_iter()
            .filter(|name| value(a, name) != value(b, name))
            .cloned()
            .collect()
    }
}

/// What [`ServerControl::permitted`] found out.
enum Permission {
    Yes,
    No,
    /// An error that does not tell (its first word).
    Unknown(String),
}

/// What [`Strategy::check_successor`] found out.
#[derive(Debug, PartialEq, Eq)]
pub enum SuccessorCheck {
    /// The strategy keeps the user: nothing to compare.
    NotNeeded,
    /// The idle user may do what the active one may.
    Same,
    /// The server or the API would not say (why, safe to log).
    Unchecked(String),
}

pub fn credential_of(slot: &Slot) -> Credential {
    Credential {
        username: slot.username.clone(),
        password: Some(slot.password.clone()),
    }
}

/// Where passwords are set: on the server itself, or through the Redis Cloud REST API.
struct CloudBackend {
    client: CloudClient,
    database: Option<DatabaseRef>,
    /// ACL user ids by name, looked up once.
    user_ids: Mutex<HashMap<String, AclUserId>>,
}

pub struct Strategy {
    pub kind: RotationStrategy,
    control: ServerControl,
    cloud: Option<CloudBackend>,
    password_length: usize,
    scramble_previous: bool,
    users: Vec<String>,
    source: Option<SecretRef>,
}

impl Strategy {
    /// The Redis Cloud API client and database, with `backend = "cloud"` (shared with the
    /// client-certificate rotation, so both spend one rate budget).
    pub fn cloud(&self) -> Option<(&CloudClient, Option<DatabaseRef>)> {
        self.cloud.as_ref().map(|c| (&c.client, c.database))
    }

    pub fn new(config: &RotationConfig, control: ServerControl) -> Result<Self, RotationError> {
        let cloud = match (&config.backend, &config.cloud) {
            (RotationBackend::Cloud, Some(api)) => Some(CloudBackend {
                client: CloudClient::new(api.clone())?,
                database: config.database,
                user_ids: Mutex::new(HashMap::new()),
            }),
            _ => None,
        };
        Ok(Self {
            kind: config.strategy,
            control,
            cloud,
            password_length: config.password_length,
            scramble_previous: config.scramble_previous,
            users: config.users.clone(),
            source: config.external.as_ref().map(|e| e.password.clone()),
        })
    }

    /// Whether the server keeps a single password that PENDING replaces (the default user):
    /// the proxy then makes the overlap itself, opening new connections with whichever of
    /// CURRENT and PENDING the server accepts while the change is under way.
    pub fn replaces_in_place(&self) -> bool {
        self.kind == RotationStrategy::DefaultUser
    }

    /// The new PENDING slot, or None when there is nothing to rotate to (`external` with an
    /// unchanged source).
    pub fn make_pending(&self, current: &Slot) -> Result<Option<Slot>, RotationError> {
        match self.kind {
            RotationStrategy::AclMultiPassword | RotationStrategy::DefaultUser => {
                Ok(Some(Slot::new(
                    current.username.clone(),
                    generate_password(self.password_length)?,
                )))
            }
            RotationStrategy::AlternatingUsers => {
                let idle = self.idle_user(current).expect("alternating users");
                Ok(Some(Slot::new(
                    Some(idle.to_string()),
                    generate_password(self.password_length)?,
                )))
            }
            RotationStrategy::External => {
                let value = self.read_source()?;
                if value.expose_secret() == current.password.expose_secret() {
                    return Ok(None);
                }
                Ok(Some(Slot::new(current.username.clone(), value)))
            }
        }
    }

    /// With alternating users, the one `current` is not (validated: two different users).
    fn idle_user(&self, current: &Slot) -> Option<&str> {
        if self.kind != RotationStrategy::AlternatingUsers {
            return None;
        }
        let active = current.display_user();
        self.users.iter().map(String::as_str).find(|u| *u != active)
    }

    /// Reads the external source now.
    pub fn read_source(&self) -> Result<SecretString, RotationError> {
        let source = self.source.as_ref().ok_or_else(|| {
            RotationError::Source("no [rotation.external] source configured".into())
        })?;
        source
            .resolve()
            .map_err(|e| RotationError::Source(e.to_string()))
    }

    /// Asks the server to accept PENDING. Returns the Redis Cloud task id when the change is
    /// applied asynchronously (the caller persists it, then [`Strategy::wait`]s). Idempotent:
    /// sending the same PENDING again is harmless.
    pub async fn submit(
        &self,
        current: &Slot,
        pending: &Slot,
    ) -> Result<Option<String>, RotationError> {
        let user = pending.display_user();
        match self.kind {
            RotationStrategy::External => Ok(None),
            RotationStrategy::AclMultiPassword => {
                let pw = format!(">{}", pending.password.expose_secret());
                self.control
                    .acl_setuser(current, user, &[pw.as_bytes()])
                    .await?;
                Ok(None)
            }
            RotationStrategy::AlternatingUsers | RotationStrategy::DefaultUser => {
                self.replace_password(current, user, &pending.password)
                    .await
            }
        }
    }

    /// Waits for a submitted Redis Cloud task, and for an ACL user to be `active` again.
    pub async fn wait(&self, pending: &Slot, task: &str) -> Result<(), RotationError> {
        let Some(cloud) = &self.cloud else {
            return Ok(());
        };
        cloud.client.wait_task(&TaskId(task.to_string())).await?;
        if self.kind == RotationStrategy::AlternatingUsers {
            let id = self.user_id(cloud, pending.display_user()).await?;
            cloud.client.wait_user_active(id).await?;
        }
        Ok(())
    }

    /// Makes `password` the user's only password: `ACL SETUSER u resetpass >pw on`, or the REST
    /// API (the default user's through the database, others as ACL users).
    async fn replace_password(
        &self,
        acting: &Slot,
        user: &str,
        password: &SecretString,
    ) -> Result<Option<String>, RotationError> {
        match &self.cloud {
            None => {
                let pw = format!(">{}", password.expose_secret());
                self.control
                    .acl_setuser(acting, user, &[b"resetpass", pw.as_bytes(), b"on"])
                    .await?;
                Ok(None)
            }
            Some(cloud) if user == "default" => {
                let db = cloud.database.as_ref().ok_or_else(|| {
                    RotationError::Source(
                        "[rotation.database] is needed for the default user".into(),
                    )
                })?;
                Ok(Some(
                    cloud.client.set_database_password(db, password).await?.0,
                ))
            }
            Some(cloud) => {
                let id = self.user_id(cloud, user).await?;
                Ok(Some(
                    cloud.client.set_acl_user_password(id, password).await?.0,
                ))
            }
        }
    }

    /// [`Strategy::replace_password`] and, through the API, the wait for it to land.
    async fn replace_password_now(
        &self,
        acting: &Slot,
        user: &str,
        password: &SecretString,
    ) -> Result<(), RotationError> {
        if let Some(task) = self.replace_password(acting, user, password).await? {
            let slot = Slot::new(Some(user.to_string()), password.clone());
            self.wait(&slot, &task).await?;
        }
        Ok(())
    }

    async fn user_id(&self, cloud: &CloudBackend, name: &str) -> Result<AclUserId, RotationError> {
        if let Some(id) = cloud.user_ids.lock().expect("not poisoned").get(name) {
            return Ok(*id);
        }
        let user = cloud.client.find_acl_user(name).await?;
        cloud
            .user_ids
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), user.id);
        Ok(user.id)
    }

    /// Takes PENDING back after a failed test, so no unknown secret stays valid.
    pub async fn discard(&self, current: &Slot, pending: &Slot) -> Result<(), RotationError> {
        match self.kind {
            RotationStrategy::AclMultiPassword => {
                let pw = format!("<{}", pending.password.expose_secret());
                self.control
                    .acl_setuser(current, pending.display_user(), &[pw.as_bytes()])
                    .await
            }
            RotationStrategy::AlternatingUsers => {
                self.scramble(current, pending.display_user()).await
            }
            // The one password may already be PENDING: put CURRENT back.
            RotationStrategy::DefaultUser => {
                self.replace_password_now(pending, current.display_user(), &current.password)
                    .await
            }
            RotationStrategy::External => Ok(()),
        }
    }

    /// Makes PREVIOUS stop working; `urgent` also closes every other connection still
    /// authenticated with the old identity (a password change alone leaves them open).
    /// Returns how many connections that closed.
    pub async fn revoke(
        &self,
        current: &Slot,
        previous: &Slot,
        urgent: bool,
    ) -> Result<u64, RotationError> {
        match self.kind {
            RotationStrategy::AclMultiPassword => {
                let pw = format!("<{}", previous.password.expose_secret());
                self.control
                    .acl_setuser(current, previous.display_user(), &[pw.as_bytes()])
                    .await?;
            }
            RotationStrategy::AlternatingUsers => {
                if self.scramble_previous || urgent {
                    self.scramble(current, previous.display_user()).await?;
                }
            }
            // Replaced, not added: the old password stopped working when the new one landed.
            RotationStrategy::DefaultUser | RotationStrategy::External => {}
        }
        if urgent && self.kind != RotationStrategy::External {
            return self
                .control
                .kill_foreign_connections(current, previous.display_user())
                .await;
        }
        Ok(0)
    }

    /// Sets a user's only password to a random value nobody stores.
    async fn scramble(&self, acting: &Slot, user: &str) -> Result<(), RotationError> {
        let random = generate_password(64)?;
        self.replace_password_now(acting, user, &random).await
    }

    /// With alternating users, makes sure the idle user may do what the active one may before
    /// a rotation starts: it would otherwise move every session to a user whose commands are
    /// refused (a user that does not exist would even be created by `ACL SETUSER`, with no
    /// permissions at all). On the server it compares both users' `ACL GETUSER` (which needs
    /// `acl|getuser`; without it the check is skipped, and said so); through the API, their
    /// roles.
    pub async fn check_successor(&self, current: &Slot) -> Result<SuccessorCheck, RotationError> {
        let Some(idle) = self.idle_user(current) else {
            return Ok(SuccessorCheck::NotNeeded);
        };
        let active = current.display_user();
        let refuse = |why: String| Err(RotationError::Successor(why));
        if let Some(cloud) = &self.cloud {
            if active == "default" || idle == "default" {
                return Ok(SuccessorCheck::Unchecked(
                    "the default user has no role to compare".into(),
                ));
            }
            let active_user = cloud.client.find_acl_user(active).await?;
            let idle_user = match cloud.client.find_acl_user(idle).await {
                Ok(user) => user,
                Err(crate::cloud::CloudError::AclUserNotFound { .. }) => {
                    return refuse(format!(
                        "ACL user {idle} does not exist (`rotaproxy cloud setup-alternating` creates it with {active}'s role)"
                    ));
                }
                Err(e) => return Err(e.into()),
            };
            if active_user.role != idle_user.role {
                return refuse(format!(
                    "{idle} has role \"{}\" and {active} role \"{}\": give both users the same role",
                    idle_user.role, active_user.role
                ));
            }
            return Ok(SuccessorCheck::Same);
        }
        let mut conn = self.control.open(current).await?;
        let active_rules = self.control.acl_rules(&mut conn, active).await?;
        let idle_rules = self.control.acl_rules(&mut conn, idle).await?;
        match (active_rules, idle_rules) {
            (_, AclRules::NoSuchUser) => refuse(format!(
                "user {idle} does not exist (ACL SETUSER would create it with no permissions): create it with {active}'s rules"
            )),
            (AclRules::Found(a), AclRules::Found(b)) => {
                let differ = AclRules::differences(&a, &b);
                if differ.is_empty() {
                    Ok(SuccessorCheck::Same)
                } else {
                    refuse(format!(
                        "{idle} may not do what {active} may ({} differ): give both users the same rules",
                        differ.join(", ")
                    ))
                }
            }
            (AclRules::Unknown(why), _) | (_, AclRules::Unknown(why)) => Ok(
                SuccessorCheck::Unchecked(format!("ACL GETUSER answered {why}")),
            ),
            (AclRules::NoSuchUser, _) => Ok(SuccessorCheck::Unchecked(format!(
                "ACL GETUSER knows no user {active}"
            ))),
        }
    }

    /// The checks of a preflight (see [`super::preflight`]) that depend on the strategy and
    /// the backend, for a rotation away from `current`. Nothing on the server changes: an
    /// `ACL SETUSER` with a rule that does not exist is refused before anything is applied
    /// (or with `NOPERM`, before it is read), and `CLIENT KILL ID 0` closes nothing.
    pub async fn preflight(&self, current: &Slot) -> Vec<Check> {
        let mut checks = Vec::new();
        if self.kind == RotationStrategy::External {
            checks.push(match self.read_source() {
                Ok(_) => Check::ok("source", "readable"),
                Err(e) => Check::failed("source", e.to_string()),
            });
            return checks;
        }
        // The database: the default user's password and the client certificate list are set
        // on it (alternating users are looked up below).
        if let Some(cloud) = &self.cloud {
            match &cloud.database {
                Some(db) => checks.push(match cloud.client.database_status(db).await {
                    Ok(status) => Check::ok("cloud_api", format!("database status {status}")),
                    Err(e) => Check::failed("cloud_api", e.to_string()),
                }),
                None if self.kind == RotationStrategy::DefaultUser => {
                    checks.push(Check::failed("cloud_api", "[rotation.database] is not set"))
                }
                None => {}
            }
        }
        if self.kind == RotationStrategy::AlternatingUsers {
            checks.push(match self.check_successor(current).await {
                Ok(SuccessorCheck::Unchecked(why)) => Check::unchecked("users_match", why),
                Ok(_) => Check::ok("users_match", self.users.join(" and ")),
                Err(e) => Check::failed("users_match", e.to_string()),
            });
        }
        // Urgent rotations close the old identity's other connections, through the server
        // in every backend; and without the API, the server sets the passwords too.
        let acting = self.control.acting_user(current);
        let mut conn = match self.control.open(current).await {
            Ok(conn) => {
                checks.push(Check::ok("control_connection", format!("as {acting}")));
                conn
            }
            Err(e) => {
                checks.push(Check::failed("control_connection", e.to_string()));
                return checks;
            }
        };
        if self.cloud.is_none() {
            match self.acl_setuser_check(&mut conn, current, &acting).await {
                Ok(check) => checks.push(check),
                Err(e) => {
                    checks.push(Check::failed("acl_setuser", e.to_string()));
                    return checks;
                }
            }
        }
        let kill = match self.client_kill_check(&mut conn, &acting).await {
            Ok(check) => check,
            Err(e) => {
                checks.push(Check::failed("client_kill", e.to_string()));
                return checks;
            }
        };
        let may_list = kill.result == Verdict::Ok;
        checks.push(kill);
        if may_list && let Some(idle) = self.idle_user(current) {
            checks.push(self.idle_user_check(&mut conn, idle).await);
        }
        checks
    }

    /// The preflight's `acl_setuser`: may the acting user run `ACL SETUSER` on the users a
    /// rotation changes? Each gets a rule that does not exist.
    async fn acl_setuser_check(
        &self,
        conn: &mut UpstreamConn,
        current: &Slot,
        acting: &str,
    ) -> Result<Check, RotationError> {
        let users: Vec<&str> = match self.kind {
            RotationStrategy::AlternatingUsers => self.users.iter().map(String::as_str).collect(),
            RotationStrategy::DefaultUser => vec!["default"],
            _ => vec![current.display_user()],
        };
        let mut refused = Vec::new();
        let mut unknown = None;
        for user in &users {
            let probe: [&[u8]; 4] = [
                b"ACL",
                b"SETUSER",
                user.as_bytes(),
                b"rotaproxy-preflight-no-such-rule",
            ];
            match self
                .control
                .permitted(conn, &probe, Some("ACL SETUSER modifier"))
                .await?
            {
                Permission::Yes => {}
                Permission::No => refused.push(*user),
                Permission::Unknown(code) => unknown = Some(code),
            }
        }
        Ok(match (refused.is_empty(), unknown) {
            (false, _) => Check::failed(
                "acl_setuser",
                format!(
                    "{acting} may not run ACL SETUSER on {} (NOPERM)",
                    refused.join(", ")
                ),
            ),
            (true, Some(code)) => Check::unchecked(
                "acl_setuser",
                format!("ACL SETUSER with a rule that does not exist answered {code}"),
            ),
            (true, None) => Check::ok("acl_setuser", format!("on {}", users.join(", "))),
        })
    }

    /// The preflight's `client_kill`: may the acting user run what an urgent rotation runs to
    /// close the old identity's other connections (`CLIENT KILL ID 0` closes nothing)?
    async fn client_kill_check(
        &self,
        conn: &mut UpstreamConn,
        acting: &str,
    ) -> Result<Check, RotationError> {
        let mut refused = Vec::new();
        for (name, probe) in [
            ("CLIENT LIST", [&b"CLIENT"[..], b"LIST", b"ID", b"0"]),
            ("CLIENT KILL", [&b"CLIENT"[..], b"KILL", b"ID", b"0"]),
        ] {
            if let Permission::No = self.control.permitted(conn, &probe, None).await? {
                refused.push(name);
            }
        }
        Ok(if refused.is_empty() {
            Check::ok(
                "client_kill",
                "urgent rotations can close the old identity's connections",
            )
        } else {
            Check::failed(
                "client_kill",
                format!(
                    "{acting} may not run {} (NOPERM): an urgent rotation could not close the old identity's other connections",
                    refused.join(" or ")
                ),
            )
        })
    }

    /// The preflight's `idle_user_unused`: the idle user is the proxy's alone, since whatever
    /// else uses it cannot reconnect once the next rotation sets its password.
    async fn idle_user_check(&self, conn: &mut UpstreamConn, idle: &str) -> Check {
        match self.control.foreign_connections(conn, idle).await {
            Ok(ids) if ids.is_empty() => Check::ok(
                "idle_user_unused",
                format!("no other connection is authenticated as {idle}"),
            ),
            Ok(ids) => Check::failed(
                "idle_user_unused",
                format!(
                    "{} connection(s) authenticated as {idle} are not this proxy's: whatever holds them cannot reconnect once the next rotation sets {idle}'s password",
                    ids.len()
                ),
            ),
            Err(e) => Check::unchecked("idle_user_unused", e.to_string()),
        }
    }

    /// A generation for testing `slot` on a fresh connection.
    pub fn probe_generation(&self, slot: &Slot) -> Arc<Generation> {
        Arc::new(
            self.control
                .generations
                .current()
                .with_credential(0, credential_of(slot)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> OwnedFrame {
        OwnedFrame::BulkString(s.as_bytes().to_vec())
    }

    /// `ACL GETUSER` as Redis 7.0 answers it.
    fn getuser(flags: &[&str], commands: &str) -> OwnedFrame {
        OwnedFrame::Array(vec![
            bulk("flags"),
            OwnedFrame::Array(flags.iter().map(|f| bulk(f)).collect()),
            bulk("passwords"),
            OwnedFrame::Array(vec![bulk("2d7116...")]),
            bulk("commands"),
            bulk(commands),
            bulk("keys"),
            bulk("~*"),
            bulk("channels"),
            bulk("&*"),
            bulk("selectors"),
            OwnedFrame::Array(vec![]),
        ])
    }

    fn rules(reply: OwnedFrame) -> Vec<(String, OwnedFrame)> {
        match AclRules::from_reply(reply) {
            AclRules::Found(rules) => rules,
            other => panic!("not read: {other:?}"),
        }
    }

    #[test]
    fn acl_rules_leave_out_passwords_and_what_a_rotation_switches() {
        let a = rules(getuser(&["on"], "+@all"));
        let b = rules(getuser(&["off", "nopass"], "+@all"));
        assert!(AclRules::differences(&a, &b).is_empty());
        assert!(a.iter().all(|(name, _)| name != "passwords"));

        let c = rules(getuser(&["on", "skip-sanitize-payload"], "+@read"));
        assert_eq!(AclRules::differences(&a, &c), ["commands", "flags"]);
    }

    #[test]
    fn acl_rules_that_cannot_be_read_say_why_without_the_message() {
        assert!(matches!(
            AclRules::from_reply(OwnedFrame::Null),
            AclRules::NoSuchUser
        ));
        match AclRules::from_reply(OwnedFrame::Error(
            "NOPERM this user has no permissions to run the 'acl|getuser' command".into(),
        )) {
            AclRules::Unknown(why) => assert_eq!(why, "NOPERM"),
            other => panic!("{other:?}"),
        }
        for odd in [
            OwnedFrame::Integer(1),
            OwnedFrame::Array(vec![bulk("flags")]),
            OwnedFrame::Array(vec![OwnedFrame::Integer(1), bulk("x")]),
        ] {
            assert!(matches!(AclRules::from_reply(odd), AclRules::Unknown(_)));
        }
    }
}
