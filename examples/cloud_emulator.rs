//! The Redis Cloud REST API emulator of the tests, as a program, for `scripts/demo --cloud`.
//!
//! It starts its own `redis-server` (loopback; plain TCP, and TLS requiring a client
//! certificate from the database's `clientTlsCertificates` list, as Redis Cloud does with TLS
//! client authentication), the emulator in front of it, two ACL users `app-a` and `app-b` with
//! random passwords, and writes into DIR: `account-key`, `secret-key`, `app-a-password` (mode
//! 0600), the CA of the server's certificate (`pki/ca.pem`), a first self-signed client
//! certificate the list holds (`client/tls.crt`, `client/tls.key`), and `emulator.env`
//! (REDIS_PORT, REDIS_TLS_PORT, API_ROOT, SUBSCRIPTION_ID, DATABASE_ID). It runs until
//! SIGINT/SIGTERM, then stops the redis-server it started.
//!
//! ```text
//! cargo run --example cloud_emulator -- DIR
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use support::cloud::CloudEmulator;
use support::{Certs, RedisOptions, RedisServer, RedisTls, random_token};

fn main() {
    let Some(dir) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: cloud_emulator DIR");
        std::process::exit(2);
    };
    std::fs::create_dir_all(&dir).expect("create DIR");
    let certs = Certs::generate(&dir.join("pki"));
    // Ten minutes left: the demo's proxy replaces it as soon as it starts.
    let first_client =
        certs.self_signed_client_expiring_in("first-client", time::Duration::minutes(10));
    let redis = RedisServer::start(RedisOptions::new().tls(RedisTls {
        cert: certs.server.cert.clone(),
        key: certs.server.key.clone(),
        ca: first_client.cert.clone(),
        require_client_cert: true,
    }));
    let emulator = CloudEmulator::start(&redis);
    let first_pem = std::fs::read_to_string(&first_client.cert).expect("read the client cert");
    emulator.set_client_certificates(&[first_pem]);
    let client_dir = dir.join("client");
    std::fs::create_dir_all(&client_dir).expect("create DIR/client");
    std::fs::copy(&first_client.cert, client_dir.join("tls.crt")).expect("copy the client cert");
    std::fs::copy(&first_client.key, client_dir.join("tls.key")).expect("copy the client key");
    let app_a = random_token(32);
    emulator.create_acl_user("app-a", "demo-role", &app_a);
    emulator.create_acl_user("app-b", "demo-role", &random_token(32));
    emulator.write_key_files(&dir);
    let password_file = dir.join("app-a-password");
    std::fs::write(&password_file, &app_a).expect("write password");
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod password");
    std::fs::write(
        dir.join("emulator.env"),
        format!(
            "REDIS_PORT={}\nREDIS_TLS_PORT={}\nAPI_ROOT={}\nSUBSCRIPTION_ID={}\nDATABASE_ID={}\n",
            redis.port(),
            redis.tls_port(),
            emulator.base_url(),
            emulator.subscription_id(),
            emulator.database_id(),
        ),
    )
    .expect("write emulator.env");
    eprintln!(
        "cloud emulator on {} in front of redis-server on 127.0.0.1:{} (TLS {})",
        emulator.base_url(),
        redis.port(),
        redis.tls_port()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    });
    drop(emulator);
    drop(redis);
}
