//! The Redis Cloud REST client (`rotaproxy::cloud`) against the emulator and a real Redis:
//! password changes end to end, failing and slow tasks, the API's quirks (404 polls, error as a
//! string, 429), an API key rotated mid-run, and no secret in the logs.

mod support;

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::SecretString;

use rotaproxy::cloud::{
    CloudApiConfig, CloudClient, CloudError, DatabaseKind, DatabaseRef, TaskStatus,
};
use rotaproxy::config::SecretRef;
use support::cloud::{CloudEmulator, KeyFiles};
use support::*;

/// Everything one test needs. Field order = drop order: the client and emulator go first.
struct Env {
    client: CloudClient,
    emu: CloudEmulator,
    keys: KeyFiles,
    _redis: RedisServer,
    _dir: tempfile::TempDir,
}

fn test_config(emu: &CloudEmulator, keys: &KeyFiles) -> CloudApiConfig {
    let mut c = CloudApiConfig::new(
        SecretRef::File(keys.account.clone()),
        SecretRef::File(keys.secret.clone()),
    );
    c.api_root = emu.base_url();
    c.retry_base = Duration::from_millis(10);
    c.retry_max = Duration::from_millis(80);
    c.task_poll_interval = Duration::from_millis(10);
    c.task_timeout = Duration::from_secs(20);
    c.request_timeout = Duration::from_secs(10);
    c
}

fn env_with(adjust: impl FnOnce(&mut CloudApiConfig)) -> Env {
    let redis = RedisServer::start(RedisOptions::new());
    let emu = CloudEmulator::start(&redis);
    emu.set_task_delay(Duration::from_millis(10));
    emu.set_user_active_lag(Duration::from_millis(20));
    let dir = temp_dir();
    let keys = emu.write_key_files(dir.path());
    let mut config = test_config(&emu, &keys);
    adjust(&mut config);
    let client = CloudClient::new(config).expect("client");
    Env {
        client,
        emu,
        keys,
        _redis: redis,
        _dir: dir,
    }
}

fn env() -> Env {
    env_with(|_| {})
}

fn secret(s: &str) -> SecretString {
    SecretString::from(s.to_string())
}

fn pro(e: &Env) -> DatabaseRef {
    DatabaseRef {
        kind: DatabaseKind::Pro,
        subscription_id: e.emu.subscription_id(),
        database_id: e.emu.database_id(),
    }
}

fn essentials(e: &Env) -> DatabaseRef {
    DatabaseRef {
        kind: DatabaseKind::Essentials,
        subscription_id: e.emu.fixed_subscription_id(),
        database_id: e.emu.fixed_database_id(),
    }
}

/// Replaces a file the way a Kubernetes secret volume or `mv` does: new inode, atomic.
fn replace_file(path: &std::path::Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{content}\n")).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn acl_user_password_change_end_to_end() {
    let e = env();
    let id = e.emu.create_acl_user("app-a", "app-role", "app-a-pass-1");
    let user = e.client.find_acl_user("app-a").await.unwrap();
    assert_eq!(user.id, id);
    assert_eq!(user.role, "app-role");
    assert_eq!(user.status, "active");
    assert_eq!(
        e.client.find_acl_user(&id.to_string()).await.unwrap().name,
        "app-a"
    );

    let task = e
        .client
        .set_acl_user_password(id, &secret("app-a-pass-2"))
        .await
        .unwrap();
    let done = e.client.wait_task(&task).await.unwrap();
    assert_eq!(done.status, TaskStatus::Completed);
    assert_eq!(done.resource_id, Some(id));
    let user = e.client.wait_user_active(id).await.unwrap();
    assert_eq!(user.status, "active");
    assert!(e.emu.redis_accepts("app-a", "app-a-pass-2"));
    assert!(!e.emu.redis_accepts("app-a", "app-a-pass-1"));

    // The convenience that does all three steps.
    let user = e
        .client
        .apply_acl_user_password(id, &secret("app-a-pass-3"))
        .await
        .unwrap();
    assert_eq!(user.status, "active");
    assert!(e.emu.redis_accepts("app-a", "app-a-pass-3"));
}

#[tokio::test]
async fn create_second_user_with_the_same_role() {
    let e = env();
    e.emu.create_acl_user("app-a", "app-role", "app-a-pass-1");
    let role = e.client.find_acl_user("app-a").await.unwrap().role;
    let task = e
        .client
        .create_acl_user("app-b", &role, &secret("app-b-pass-1"))
        .await
        .unwrap();
    let id = e
        .client
        .wait_task(&task)
        .await
        .unwrap()
        .resource_id
        .unwrap();
    let user = e.client.wait_user_active(id).await.unwrap();
    assert_eq!(
        (user.name.as_str(), user.role.as_str()),
        ("app-b", "app-role")
    );
    assert!(e.emu.redis_accepts("app-b", "app-b-pass-1"));
    let err = e.client.find_acl_user("no-such-user").await.unwrap_err();
    assert!(matches!(err, CloudError::AclUserNotFound { .. }), "{err}");
}

#[tokio::test]
async fn default_user_password_change_pro() {
    let e = env();
    let old = e.emu.default_password();
    let task = e
        .client
        .set_database_password(&pro(&e), &secret("pro-new-1"))
        .await
        .unwrap();
    e.client.wait_task(&task).await.unwrap();
    assert!(e.emu.redis_accepts("default", "pro-new-1"));
    assert!(!e.emu.redis_accepts("default", &old));
    let put = e
        .emu
        .requests()
        .into_iter()
        .find(|r| r.method == "PUT")
        .unwrap();
    assert_eq!(put.path, pro(&e).path());
}

#[tokio::test]
async fn default_user_password_change_essentials() {
    let e = env();
    let old = e.emu.default_password();
    let task = e
        .client
        .set_database_password(&essentials(&e), &secret("ess-new-1"))
        .await
        .unwrap();
    let done = e.client.wait_task(&task).await.unwrap();
    assert_eq!(
        done.command_type.as_deref(),
        Some("fixedDatabaseUpdateRequest")
    );
    assert!(e.emu.redis_accepts("default", "ess-new-1"));
    assert!(!e.emu.redis_accepts("default", &old));
}

#[tokio::test]
async fn failing_task_surfaces_the_error_code() {
    let e = env();
    let old = e.emu.default_password();
    let code = "NOT_ALLOWED_TO_UPDATE_A_DATABASE_PASSWORD_WHEN_DEFAULT_USER_IS_DISABLED";
    e.emu.fail_next_task(code);
    let task = e
        .client
        .set_database_password(&pro(&e), &secret("never-applied-1"))
        .await
        .unwrap();
    let err = e.client.wait_task(&task).await.unwrap_err();
    assert_eq!(err.task_error_code(), Some(code), "{err}");
    assert_eq!(err.reason(), "task_failed");
    assert!(err.to_string().contains(code), "{err}");
    assert!(
        e.emu.redis_accepts("default", &old),
        "CURRENT keeps working"
    );

    // A real policy failure: the server's limit, not ours.
    let too_long = "L".repeat(50);
    let task = e
        .client
        .set_database_password(&pro(&e), &secret(&too_long))
        .await
        .unwrap();
    let err = e.client.wait_task(&task).await.unwrap_err();
    assert_eq!(err.task_error_code(), Some("DATABASE_PASSWORD_IS_TOO_LONG"));
    assert!(!err.to_string().contains(&too_long));
    assert!(!err.is_transient());
}

#[tokio::test]
async fn slow_task_waited_with_a_deadline() {
    let e = env();
    let id = e.emu.create_acl_user("slowpoke", "r", "slowpoke-pass-1");
    e.emu.slow_next_task(Duration::from_secs(30));
    let task = e
        .client
        .set_acl_user_password(id, &secret("slowpoke-pass-2"))
        .await
        .unwrap();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(400);
    let err = e.client.wait_task_until(&task, deadline).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    match &err {
        CloudError::TaskTimeout {
            task_id,
            last_status,
        } => {
            assert_eq!(task_id, &task);
            assert!(
                last_status == "processing-in-progress" || last_status == "received",
                "{last_status}"
            );
        }
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(err.is_transient());
    // The same task id can be waited on again: it is still running.
    assert_eventually(Duration::from_secs(10), "task in progress", || {
        e.emu.tasks().last().unwrap().status == "processing-in-progress"
    });
    let state = e.client.task(&task).await.unwrap().unwrap();
    assert_eq!(state.status, TaskStatus::InProgress);
    assert!(e.emu.redis_accepts("slowpoke", "slowpoke-pass-1"));
    assert_eq!(
        e.client.find_acl_user("slowpoke").await.unwrap().status,
        "pending"
    );
}

#[tokio::test]
async fn task_404s_are_tolerated() {
    let e = env_with(|c| c.task_not_found_polls = 4);
    e.emu.task_404_polls(3);
    let task = e
        .client
        .set_database_password(&pro(&e), &secret("after-404-1"))
        .await
        .unwrap();
    e.client.wait_task(&task).await.unwrap();
    assert!(e.emu.redis_accepts("default", "after-404-1"));
    let not_found = e
        .emu
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/v1/tasks/") && r.status == 404)
        .count();
    assert_eq!(not_found, 3);

    // Beyond the tolerance, the task counts as unknown.
    e.emu.task_404_polls(100);
    let task = e
        .client
        .set_database_password(&pro(&e), &secret("after-404-2"))
        .await
        .unwrap();
    let err = e.client.wait_task(&task).await.unwrap_err();
    assert!(
        matches!(err, CloudError::TaskUnknown { polls: 5, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn task_error_as_string_is_decoded() {
    let e = env();
    e.emu.error_as_string(true);
    let id = e.emu.create_acl_user("stringy", "r", "stringy-pass-1");
    let task = e
        .client
        .set_acl_user_password(id, &secret("short"))
        .await
        .unwrap();
    let err = e.client.wait_task(&task).await.unwrap_err();
    assert_eq!(err.task_error_code(), Some("ACL_USER_PASSWORD_NOT_VALID"));
    let raw = e
        .emu
        .requests()
        .into_iter()
        .rfind(|r| r.path.starts_with("/v1/tasks/"))
        .unwrap();
    assert!(
        raw.response_body
            .contains("\"error\":\"ACL_USER_PASSWORD_NOT_VALID\""),
        "{}",
        raw.response_body
    );
}

#[tokio::test]
async fn busy_429_and_5xx_are_retried() {
    let e = env();
    e.emu.force_429(3);
    let task = e
        .client
        .set_database_password(&pro(&e), &secret("busy-new-1"))
        .await
        .unwrap();
    e.client.wait_task(&task).await.unwrap();
    let statuses: Vec<u16> = e.emu.requests().iter().map(|r| r.status).collect();
    assert_eq!(&statuses[..4], [429, 429, 429, 200]);
    assert!(e.emu.redis_accepts("default", "busy-new-1"));

    e.emu.force_status(503, 2);
    e.client.list_acl_users().await.unwrap();

    // A POST is retried on 429 (nothing was done) but not on a 5xx (something may have been).
    e.emu.clear_requests();
    e.emu.force_status(503, 1);
    let err = e
        .client
        .create_acl_user("maybe", "r", &secret("maybe-pass-1"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CloudError::Server {
                status: 503,
                attempts: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(e.emu.requests().len(), 1);
}

#[tokio::test]
async fn busy_beyond_the_attempts_is_an_error() {
    let e = env_with(|c| c.max_attempts = 3);
    e.emu.force_429(10);
    let err = e.client.list_acl_users().await.unwrap_err();
    assert!(matches!(err, CloudError::Busy { attempts: 3, .. }), "{err}");
    assert!(err.is_transient());
    assert_eq!(e.emu.requests().len(), 3);
}

#[tokio::test]
async fn api_key_rotated_mid_run() {
    let e = env();
    e.client.list_acl_users().await.unwrap();
    // The operator creates a second key, drops it into the file, deletes the old one.
    let old = e.emu.secret_key().to_string();
    let new = random_token(40);
    e.emu.add_api_key(e.emu.account_key(), &new);
    replace_file(&e.keys.secret, &new);
    e.emu.revoke_secret_key(&old);
    let task = e
        .client
        .set_database_password(&pro(&e), &secret("after-rotation-1"))
        .await
        .unwrap();
    e.client.wait_task(&task).await.unwrap();
    assert!(e.emu.redis_accepts("default", "after-rotation-1"));
    // The change was seen before any request used the revoked key.
    assert!(e.emu.requests().iter().all(|r| r.status != 401));
}

#[tokio::test]
async fn key_file_changed_unnoticed_is_reread_on_401() {
    let e = env();
    e.client.list_acl_users().await.unwrap();
    // Same length, same inode, mtime put back: nothing tells the change but the 401.
    let old = e.emu.secret_key().to_string();
    let new = random_token(old.len());
    let mtime = std::fs::metadata(&e.keys.secret)
        .unwrap()
        .modified()
        .unwrap();
    e.emu.add_api_key(e.emu.account_key(), &new);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&e.keys.secret)
            .unwrap();
        f.write_all(format!("{new}\n").as_bytes()).unwrap();
        f.set_modified(mtime).unwrap();
    }
    e.emu.revoke_secret_key(&old);
    e.client.list_acl_users().await.unwrap();
    let statuses: Vec<u16> = e.emu.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 401, 200]);
}

#[tokio::test]
async fn rejected_key_is_a_clear_error_without_the_key() {
    let e = env();
    e.emu.revoke_secret_key(e.emu.secret_key());
    let err = e.client.list_acl_users().await.unwrap_err();
    assert!(
        matches!(err, CloudError::KeyRejected { status: 401 }),
        "{err}"
    );
    let text = err.to_string();
    assert_eq!(
        text,
        "API key rejected (HTTP 401) — was it rotated? check the key file / the key's IP allow-list"
    );
    assert!(!format!("{err:?}").contains(e.emu.secret_key()));
    assert_eq!(err.reason(), "key_rejected");

    let e = env();
    e.emu.deny_source_ip(true);
    let err = e.client.list_acl_users().await.unwrap_err();
    assert!(
        matches!(err, CloudError::KeyRejected { status: 403 }),
        "{err}"
    );
    assert!(err.to_string().contains("IP allow-list"));
}

#[tokio::test]
async fn unreachable_api_fails_after_the_attempts() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = temp_dir();
    let account = dir.path().join("a");
    let secret_file = dir.path().join("s");
    std::fs::write(&account, "acct\n").unwrap();
    std::fs::write(&secret_file, "sec\n").unwrap();
    let mut c = CloudApiConfig::new(SecretRef::File(account), SecretRef::File(secret_file));
    c.api_root = format!("http://127.0.0.1:{port}");
    c.retry_base = Duration::from_millis(5);
    c.retry_max = Duration::from_millis(20);
    c.max_attempts = 3;
    let client = CloudClient::new(c).unwrap();
    let err = client.list_acl_users().await.unwrap_err();
    assert!(
        matches!(err, CloudError::Unreachable { attempts: 3, .. }),
        "{err}"
    );
    assert!(err.is_transient());
}

#[tokio::test]
async fn missing_key_file_is_reported_by_reference() {
    let dir = temp_dir();
    let missing = dir.path().join("no-such-key");
    let mut c = CloudApiConfig::new(
        SecretRef::File(missing.clone()),
        SecretRef::File(missing.clone()),
    );
    c.api_root = "http://127.0.0.1:9".into();
    let client = CloudClient::new(c).unwrap();
    let err = client.list_acl_users().await.unwrap_err();
    assert_eq!(err.reason(), "key_source");
    assert!(err.to_string().contains("no-such-key"), "{err}");
}

#[tokio::test]
async fn metrics_count_requests_and_time_tasks() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let e = env();
    e.emu.force_429(1);
    let task = e
        .client
        .set_database_password(&pro(&e), &secret("metrics-1"))
        .await
        .unwrap();
    e.client.wait_task(&task).await.unwrap();
    let text = handle.render();
    assert!(
        text.contains("rotaproxy_cloud_api_requests_total{code=\"429\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("rotaproxy_cloud_api_requests_total{code=\"200\"}"),
        "{text}"
    );
    assert!(
        text.contains("rotaproxy_cloud_task_seconds_count{outcome=\"completed\"} 1"),
        "{text}"
    );
    assert!(!text.contains("metrics-1"));
}

/// A writer for the tracing subscriber that keeps everything in memory.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_key_or_password_in_tracing_output() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // tracing caches each callsite's interest process-wide, and while only one dispatcher is
    // registered it asks the *registering thread's* dispatcher: a callsite first hit by a parallel
    // test (no subscriber) would then stay disabled here. A second registered dispatcher makes
    // tracing consult all of them.
    let _second = tracing::Dispatch::new(tracing_subscriber::registry());
    let _guard = tracing::subscriber::set_default(subscriber);

    let e = env();
    let mut secrets = vec![
        e.emu.account_key().to_string(),
        e.emu.secret_key().to_string(),
    ];
    let id = e.emu.create_acl_user("quiet", "r", "quiet-pass-0");
    // A password change with retries, a failing task, a slow one, a key rotation, a rejection.
    e.emu.force_429(2);
    e.emu.task_404_polls(1);
    let pw1 = format!("quiet-{}", random_token(20));
    secrets.push(pw1.clone());
    e.client
        .apply_acl_user_password(id, &secret(&pw1))
        .await
        .unwrap();
    let pw2 = format!("quiet-{}", random_token(20));
    secrets.push(pw2.clone());
    e.emu.fail_next_task("ACL_USER_PASSWORD_NOT_VALID");
    let task = e
        .client
        .set_acl_user_password(id, &secret(&pw2))
        .await
        .unwrap();
    let err = e.client.wait_task(&task).await.unwrap_err();
    tracing::info!(error = %err, debug = ?err, "test: failed task");
    let pw3 = format!("q{}", random_token(60));
    secrets.push(pw3.clone());
    let task = e
        .client
        .set_database_password(&pro(&e), &secret(&pw3))
        .await
        .unwrap();
    let err = e.client.wait_task(&task).await.unwrap_err();
    tracing::info!(error = %err, debug = ?err, "test: too long");
    let new_key = random_token(40);
    secrets.push(new_key.clone());
    e.emu.add_api_key(e.emu.account_key(), &new_key);
    replace_file(&e.keys.secret, &new_key);
    e.emu.revoke_secret_key(e.emu.secret_key());
    e.client.list_acl_users().await.unwrap();
    e.emu.revoke_secret_key(&new_key);
    let err = e.client.list_acl_users().await.unwrap_err();
    tracing::info!(error = %err, debug = ?err, client = ?e.client, "test: rejected");
    // GET of a database carries `security.password`: fetched through the client's path too.
    secrets.push(e.emu.default_password());
    drop(e);

    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("Redis Cloud API key rejected (HTTP 401)"),
        "{text}"
    );
    assert!(text.contains("key changed; using the new one"), "{text}");
    assert!(text.contains("HTTP 429"), "{text}");
    if std::env::var_os("ROTAPROXY_SHOW_LOG").is_some() {
        eprintln!("{text}");
    }
    for s in &secrets {
        assert!(
            !text.contains(s.as_str()),
            "a secret leaked into the logs:\n{text}"
        );
    }
}
