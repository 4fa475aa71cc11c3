//! `handshakes --quick`: full mTLS handshakes against Pilotfish and
//! whichever peers are installed (nginx and HAProxy in CI); every proxy
//! answers every connection, and the table has a row for each.

mod common;

use std::process::Command;

use common::{have, pilotfish_binary};

#[test]
fn handshakes_quick_measures_every_proxy_without_errors() {
    if !have("taskset") {
        return;
    }
    let run = Command::new(env!("CARGO_BIN_EXE_pilotfish-bench"))
        .args(["handshakes", "--quick", "--pilotfish"])
        .arg(pilotfish_binary())
        .env_remove("CARGO")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "handshakes failed:\n{stdout}\n{stderr}"
    );
    let mut proxies = vec!["pilotfish"];
    proxies.extend(["nginx", "haproxy"].into_iter().filter(|p| have(p)));
    for p in proxies {
        let row: Vec<&str> = stdout
            .lines()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no row for {p}:\n{stdout}"))
            .split_whitespace()
            .collect();
        let rate: f64 = row[1].parse().unwrap();
        assert!(rate > 0.0, "{p}: {row:?}");
        assert_eq!(row[4], "0", "{p} had errors: {row:?}");
    }
}
