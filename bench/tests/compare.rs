//! `compare --quick`: Pilotfish against direct and whichever peers are
//! installed (nginx and HAProxy in CI), every scenario, results written.

mod common;

use std::process::Command;

use common::{have, pilotfish_binary};

#[test]
fn compare_quick_runs_every_scenario_and_writes_results() {
    if !(have("wrk") && have("nginx") && have("taskset")) {
        return;
    }
    let out = std::env::temp_dir().join(format!("pf-compare-test-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_pilotfish-bench"))
        .args(["compare", "--quick", "--out"])
        .arg(&out)
        .arg("--pilotfish")
        .arg(pilotfish_binary())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "compare failed:\n{stdout}\n{stderr}");
    println!("{stdout}");
    for scenario in [
        "small keep-alive",
        "16 KiB keep-alive",
        "1 MiB keep-alive",
        "connection per request",
        "L4 bulk",
        "fixed rate",
        "idle keep-alive",
    ] {
        assert!(
            stdout.contains(&format!("== {scenario}")),
            "no {scenario}:\n{stdout}"
        );
        assert!(
            stdout.contains(&format!("| {scenario} |")),
            "{scenario} not in the ratio table:\n{stdout}"
        );
    }
    // Every scenario measured Pilotfish itself (a row per scenario) and
    // direct (where direct applies).
    assert_eq!(stdout.matches("\npilotfish ").count(), 7, "{stdout}");
    assert_eq!(stdout.matches("\ndirect ").count(), 6, "{stdout}");
    // The floor in every scenario but the idle one (a CPU floor).
    assert_eq!(stdout.matches("\nfloor ").count(), 6, "{stdout}");
    assert!(stdout.contains("cost vs floor"), "{stdout}");
    let files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for ext in ["md", "json", "svg"] {
        assert!(files.iter().any(|f| f.ends_with(ext)), "{files:?}");
    }
    let json_file = files.iter().find(|f| f.ends_with("json")).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(json_file)).unwrap()).unwrap();
    assert_eq!(json["scenarios"].as_array().unwrap().len(), 7);
    if have("haproxy") {
        assert!(stdout.contains("throughput vs haproxy"), "{stdout}");
    }
    std::fs::remove_dir_all(out).unwrap();
}
