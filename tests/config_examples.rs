//! The example configs in config/ stay valid: each parses with `Config::load` and passes
//! `rotaproxy check-config`; config/full.toml shows exactly the defaults; a bad config is refused
//! with the offending key named.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use rotaproxy::config::Config;
use support::{proxy_bin, repo_root, temp_dir};

fn example_files() -> Vec<PathBuf> {
    let dir = repo_root().join("config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

fn check_config(path: &Path) -> (bool, String, String) {
    let out = Command::new(proxy_bin())
        .arg("check-config")
        .arg(path)
        .env_remove("RUST_LOG")
        .output()
        .expect("run rotaproxy check-config");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_example_loads_and_passes_check_config() {
    let files = example_files();
    for name in [
        "minimal.toml",
        "redis-cloud.toml",
        "redis-cloud-mtls.toml",
        "mtls.toml",
        "full.toml",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(name)),
            "config/{name} is missing"
        );
    }
    for f in &files {
        if let Err(e) = Config::load(f) {
            panic!("{}: {e}", f.display());
        }
        let (ok, stdout, stderr) = check_config(f);
        assert!(
            ok,
            "check-config {} failed:\n{stdout}\n{stderr}",
            f.display()
        );
    }
}

#[test]
fn full_example_shows_the_defaults() {
    let full = Config::load(&repo_root().join("config/full.toml")).unwrap();
    let defaults =
        Config::parse(&format!("[upstream]\nurl = \"{}\"\n", full.upstream.url)).unwrap();
    assert_eq!(
        format!("{full:#?}"),
        format!("{defaults:#?}"),
        "config/full.toml must show every key with its default value (optional keys commented out)"
    );
}

#[test]
fn bad_configs_are_refused_naming_the_key() {
    let dir = temp_dir();
    let cases = [
        (
            "unknown key",
            "[upstream]\nurl = \"redis://127.0.0.1:6379\"\n[pool]\nwarmm = 3\n",
            "warmm",
        ),
        (
            "TLS-only key on a plain URL",
            "[upstream]\nurl = \"redis://127.0.0.1:6379\"\nca_file = \"/x/ca.pem\"\n",
            "upstream.ca_file",
        ),
        (
            "bad URL scheme",
            "[upstream]\nurl = \"http://127.0.0.1:6379\"\n",
            "upstream.url",
        ),
        (
            // tracing would drop the bad directive silently and log at its default level.
            "log filter with an unknown level",
            "[upstream]\nurl = \"redis://127.0.0.1:6379\"\n[log]\nlevel = \"info,rotaproxy=verbose\"\n",
            "log.level",
        ),
    ];
    for (what, text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let (ok, stdout, stderr) = check_config(&path);
        assert!(!ok, "{what}: check-config accepted it:\n{stdout}");
        assert!(
            stderr.contains(key),
            "{what}: the error should name {key:?}:\n{stderr}"
        );
    }

    // An inline secret is refused without being echoed.
    let path = dir.path().join("inline.toml");
    std::fs::write(
        &path,
        "[upstream]\nurl = \"redis://127.0.0.1:6379\"\n[credentials]\npassword = \"hunter2-inline-secret\"\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = check_config(&path);
    assert!(!ok, "inline secret accepted:\n{stdout}");
    assert!(stderr.contains("password"), "{stderr}");
    assert!(!stderr.contains("hunter2") && !stdout.contains("hunter2"));
}
