//! What the bench tests share: the workspace's `pilotfish` binary and the
//! check for the peer tools they drive.
#![allow(dead_code)] // each test file uses a different subset

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

/// The `pilotfish` binary of this workspace's build (built by
/// `cargo test --workspace`, which the README's test command runs).
pub fn pilotfish_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap(); // target/<profile>/deps/..
    let bin = dir.join("pilotfish");
    assert!(
        bin.exists(),
        "{} missing: run `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// Whether `tool` is installed. Outside CI a missing tool skips the test
/// that asked (it says so); under CI (CI=true) it fails it.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} must be installed in CI"
        );
        eprintln!("{tool} not installed: skipping (install it to run this test)");
    }
    found
}
