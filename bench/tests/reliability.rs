//! `reliability --quick`: every staying-up scenario against the real
//! binary. The command itself fails when any request of the measured
//! traffic failed without a generated status (a reset, a timeout, a
//! refused connect outside the drain); here we also check that every
//! scenario produced its row, with requests in it.

mod common;

use std::process::Command;

use common::pilotfish_binary;

#[test]
fn reliability_quick_loses_no_request() {
    let out = std::env::temp_dir().join(format!("pf-reliability-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_pilotfish-bench"))
        .args(["reliability", "--quick", "--pilotfish"])
        .arg(pilotfish_binary())
        .arg("--out")
        .arg(&out)
        .env_remove("CARGO")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "reliability failed:\n{stdout}\n{stderr}"
    );
    for scenario in [
        "baseline (no fault)",
        "config swap every 1 s",
        "SIGHUP reload every 1 s",
        "drain (SIGTERM) halfway",
        "in-place upgrade (SIGUSR2)",
        "upstream endpoint SIGKILLed, restarted",
        "slowloris conns beside it",
        "idle keep-alive conns beside it",
        "header flood",
        "body flood",
        "h2 floods",
    ] {
        let row: Vec<&str> = stdout
            .lines()
            .find(|l| l.contains(scenario))
            .unwrap_or_else(|| panic!("no row for {scenario}:\n{stdout}\n{stderr}"))
            .split('|')
            .map(str::trim)
            .collect();
        // | scenario | load | sent | succeeded | generated | otherwise | ...
        let sent: u64 = row[3].parse().unwrap();
        assert!(sent > 0, "{scenario}: nothing sent: {row:?}");
    }
    // The header flood's own requests are all refused with a generated 431.
    let flood: Vec<&str> = stdout
        .lines()
        .find(|l| l.contains("the flood itself: header flood"))
        .unwrap()
        .split('|')
        .map(str::trim)
        .collect();
    assert_eq!(flood[3], flood[5], "every flood request refused: {flood:?}");
    let _ = std::fs::remove_dir_all(&out);
}
