//! The example configs in config/ stay valid: each parses with `Config::load` and passes
//! `rotaproxy check-config`; config/full.toml shows exactly the defaults; a bad config is refused
//! with the offending key named; the alert rules in config/prometheus-alerts.yml name only
//! metrics the proxy exports.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use rotaproxy::config::Config;
use support::{repo_root, run_rotaproxy, temp_dir};

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
    let out = run_rotaproxy(&[Path::new("check-config"), path], &[]);
    (out.ok, out.stdout, out.stderr)
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

    // So is a password written into the upstream URL, as client libraries take them; and a
    // database number there is refused with what to do instead.
    for (url, says) in [
        (
            "redis://app:hunter2-in-url@127.0.0.1:6379",
            "`redis://***@127.0.0.1:6379` must not carry credentials",
        ),
        (
            "rediss://:hunter2-in-url@db.example:6380/0",
            "`rediss://***@db.example:6380/0` must not carry credentials",
        ),
        ("redis://127.0.0.1:6379/2", "SELECT"),
    ] {
        let path = dir.path().join("url.toml");
        std::fs::write(&path, format!("[upstream]\nurl = \"{url}\"\n")).unwrap();
        let (ok, stdout, stderr) = check_config(&path);
        assert!(!ok, "{url} accepted:\n{stdout}");
        assert!(
            stderr.contains("upstream.url") && stderr.contains(says),
            "{stderr}"
        );
        assert!(
            !stderr.contains("hunter2") && !stdout.contains("hunter2"),
            "{stderr}"
        );
    }
}

/// Every `"rotaproxy_..."` metric name written in the proxy's source.
fn exported_metric_names() -> std::collections::BTreeSet<String> {
    fn walk(dir: &Path, names: &mut std::collections::BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, names);
            } else if path.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for piece in text.split("\"rotaproxy_").skip(1) {
                    if let Some((name, _)) = piece.split_once('"') {
                        names.insert(format!("rotaproxy_{name}"));
                    }
                }
            }
        }
    }
    let mut names = std::collections::BTreeSet::new();
    walk(&repo_root().join("src"), &mut names);
    names
}

/// The metric names in a PromQL expression (histograms' series suffixes taken off).
fn metrics_in(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    for piece in expr.split("rotaproxy_").skip(1) {
        let name: String = piece
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name)
            .to_string();
        found.push(format!("rotaproxy_{name}"));
    }
    found
}

/// config/prometheus-alerts.yml is a Prometheus rule file (read with PyYAML from `.deps`,
/// which `scripts/test` installs) whose rules name only metrics the proxy exports.
#[test]
fn the_alert_rules_name_only_metrics_the_proxy_exports() {
    let root = repo_root();
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(root.join("config/prometheus-alerts.yml"))
        .env("PYTHONPATH", root.join(".deps/python"))
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "the rules do not read as YAML (or PyYAML is missing: run scripts/test): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let exported = exported_metric_names();
    assert!(exported.contains("rotaproxy_rotation_preflight_ok"));
    let mut alerts = Vec::new();
    for group in doc["groups"].as_array().expect("groups") {
        assert!(group["name"].is_string(), "{group}");
        for rule in group["rules"].as_array().expect("rules") {
            let alert = rule["alert"].as_str().expect("an alert name");
            let expr = rule["expr"].as_str().expect("an expression");
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{alert}: no summary"
            );
            assert!(
                ["critical", "warning", "info"]
                    .contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
                "{alert}: no severity"
            );
            let used = metrics_in(expr);
            assert!(!used.is_empty(), "{alert} names no rotaproxy metric");
            for name in used {
                assert!(
                    exported.contains(&name),
                    "{alert} uses {name}, which the proxy does not export"
                );
            }
            alerts.push(alert.to_string());
        }
    }
    let count = alerts.len();
    alerts.sort();
    alerts.dedup();
    assert_eq!(alerts.len(), count, "alert names repeat");
    assert!(count >= 10, "only {count} rules");
}
