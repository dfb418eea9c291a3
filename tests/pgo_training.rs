//! The training run of the profile-guided build (scripts/pgo-train.py, driven by
//! scripts/build-pgo). The whole build takes about half an hour, too long for every CI run, so
//! this checks the part that can break quietly as the proxy changes: the trainer starts a Redis
//! and the proxy with the benchmark configuration, sends every load through it, and requires
//! a clean exit on SIGTERM and a profile left behind. The test binary is not instrumented, so
//! the run must get all the way through the loads and then refuse it for the missing profile.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

#[test]
fn pgo_training_sends_every_load_and_refuses_a_binary_that_left_no_profile() {
    let dir = temp_dir();
    let mut child = Command::new("python3")
        .arg(repo_root().join("scripts/pgo-train.py"))
        .args(["--requests", "2000", "--profiles"])
        .arg(dir.path())
        .arg("--rotaproxy")
        .arg(env!("CARGO_BIN_EXE_rotaproxy"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs scripts/pgo-train.py");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut status = None;
    let finished = wait_until(Duration::from_secs(240), || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    if !finished {
        let _ = child.kill();
        let _ = child.wait();
    }
    let log = reader.join().expect("stderr reader");
    assert!(
        finished,
        "the training run did not end in 240 s; its log:\n{log}"
    );
    let status = status.expect("finished");

    // Every load ran through the proxy before the verdict (the plain upstream comes first).
    for load in ["-c 50 -P 1", "-c 50 -P 16", "-c 1 -P 1"] {
        let ran = log.lines().any(|line| {
            line.starts_with("[pgo-train] rotaproxy (plain upstream): set,get,")
                && line.ends_with(&format!(" with {load}"))
        });
        assert!(ran, "the load `{load}` did not run; log:\n{log}");
    }
    // It exited cleanly on SIGTERM (else the message says so), and the trainer saw that it
    // wrote nothing.
    assert!(
        !status.success() && log.contains("rotaproxy (plain) exited cleanly but left no profile"),
        "expected a refusal for the missing profile, got {status}; log:\n{log}"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "an uninstrumented binary wrote something into the profile folder"
    );
}
