//! The README's first command, in its short form: the mesh demo runs end to
//! end with real sidecar processes and writes its report and plot.

mod common;

use std::process::Command;

use common::pilotfish_binary;

#[test]
fn demo_quick_runs_the_mesh_and_reports() {
    let out = std::env::temp_dir().join(format!("pilotfish-demo-test-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_pilotfish-bench"))
        .args(["demo", "--quick", "--out"])
        .arg(&out)
        .arg("--pilotfish")
        .arg(pilotfish_binary())
        .env_remove("CARGO")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "direct",
        "through mesh",
        "through mTLS mesh",
        "p99",
        "Latency added",
        "mTLS pair vs plaintext pair",
        "latency.svg",
    ] {
        assert!(
            stdout.contains(expected),
            "report lacks {expected:?}:\n{stdout}"
        );
    }
    let svg = std::fs::read_to_string(out.join("latency.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 4);
    // Through every mesh path, every request got an answer.
    let errors_line = stdout
        .lines()
        .find(|l| l.starts_with("requests (errors)"))
        .unwrap();
    assert_eq!(errors_line.matches("(0)").count(), 4, "{errors_line}");
    // The mTLS pair talked h2 between the sidecars, and the report says so.
    let between = stdout
        .lines()
        .find(|l| l.starts_with("between the sidecars (mTLS): h2 by ALPN"))
        .unwrap_or_else(|| panic!("no h2 line:\n{stdout}"));
    assert!(!between.contains(" 0 requests"), "{between}");
    assert!(between.contains("on 1 connection(s)"), "{between}");
    assert!(
        stdout.contains("mTLS pair, h2 vs HTTP/1.1 between the sidecars"),
        "{stdout}"
    );
    // The mTLS pair handshook (A originated, B accepted) and nothing failed.
    for side in ["originated, 0 failed", "accepted, 0 failed"] {
        let line = stdout
            .lines()
            .find(|l| l.contains(side))
            .unwrap_or_else(|| panic!("no handshake line with {side:?}:\n{stdout}"));
        let full: u64 = line
            .split(": ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(full >= 1, "{line}");
    }
    // The sidecars were stopped gracefully: their admin sockets are gone
    // (and so are the processes), as the README says.
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sock"))
        .collect();
    assert!(left.is_empty(), "admin sockets left behind: {left:?}");
    std::fs::remove_dir_all(out).unwrap();
}

/// Issue 11 item 15: without `--out`, the demo writes into the target
/// directory the binary was built in, whatever the working directory.
#[test]
fn demo_output_goes_to_the_target_dir_from_any_directory() {
    let cwd = std::env::temp_dir().join(format!("pilotfish-demo-cwd-{}", std::process::id()));
    std::fs::create_dir_all(&cwd).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_pilotfish-bench"))
        .args(["demo", "--quick", "--pilotfish"])
        .arg(pilotfish_binary())
        .current_dir(&cwd)
        .env_remove("CARGO")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        !cwd.join("target").exists(),
        "wrote under the working directory"
    );
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_pilotfish-bench"));
    let expected = exe.parent().unwrap().parent().unwrap().join("demo");
    assert!(
        expected.join("report.txt").exists(),
        "{}",
        expected.display()
    );
    std::fs::remove_dir_all(cwd).unwrap();
}

/// The "find the fault" scenario: one of service B's two instances fails
/// and is slow at random; the report's tap and trace tables must each
/// blame that instance (the run fails otherwise), and the golden metrics
/// must show the failures.
#[test]
fn find_the_fault_points_at_the_faulty_instance() {
    let out = std::env::temp_dir().join(format!("pilotfish-fault-test-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_pilotfish-bench"))
        .args(["demo", "--find-the-fault", "--quick", "--out"])
        .arg(&out)
        .arg("--pilotfish")
        .arg(pilotfish_binary())
        .env_remove("CARGO")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "demo failed:\n{stdout}\n{stderr}");
    let faulty = stdout
        .lines()
        .find(|l| l.starts_with("service B instance 2"))
        .and_then(|l| l.split_whitespace().nth(4))
        .unwrap_or_else(|| panic!("no faulty instance line:\n{stdout}"))
        .to_string();
    assert!(
        stdout.contains(&format!("All four point at {faulty}")),
        "{stdout}"
    );
    // Each table has a row for the faulty instance with errors, and one
    // for the healthy instance without.
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("127.0.0.1:") && l.contains('%'))
        .collect();
    assert_eq!(rows.len(), 4, "{stdout}");
    for row in rows {
        let errors = row.split_whitespace().nth(2).unwrap();
        assert_eq!(
            row.trim_start().starts_with(&faulty),
            errors != "0.0%",
            "{row}"
        );
    }
    assert!(
        stdout.contains("503×"),
        "golden metrics show the 503s:\n{stdout}"
    );
    assert!(out.join("fault-report.txt").exists());
}
