//! The Redis Cloud REST API emulator of the tests, as a program, for `scripts/demo --cloud`.
//!
//! It starts its own `redis-server` (plain TCP, loopback), the emulator in front of it, two ACL
//! users `app-a` and `app-b` with random passwords, and writes into DIR: `account-key`,
//! `secret-key`, `app-a-password` (mode 0600) and `emulator.env` (REDIS_PORT, API_ROOT). It runs
//! until SIGINT/SIGTERM, then stops the redis-server it started.
//!
//! ```text
//! cargo run --example cloud_emulator -- DIR
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use support::cloud::CloudEmulator;
use support::{RedisOptions, RedisServer, random_token};

fn main() {
    let Some(dir) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: cloud_emulator DIR");
        std::process::exit(2);
    };
    std::fs::create_dir_all(&dir).expect("create DIR");
    let redis = RedisServer::start(RedisOptions::new());
    let emulator = CloudEmulator::start(&redis);
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
            "REDIS_PORT={}\nAPI_ROOT={}\n",
            redis.port(),
            emulator.base_url()
        ),
    )
    .expect("write emulator.env");
    eprintln!(
        "cloud emulator on {} in front of redis-server on 127.0.0.1:{}",
        emulator.base_url(),
        redis.port()
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
