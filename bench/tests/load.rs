//! The load harness against its own upstream, as real processes: the
//! open loop's coordinated-omission correction shows a one-off stall that
//! the uncorrected service time and a closed loop hide; errors are counted
//! by kind; the JSON and .hgrm outputs are written.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
};

struct Upstream {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pilotfish-bench upstream` on an OS-chosen port, with `args`.
fn upstream(args: &[&str]) -> Upstream {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pilotfish-bench"))
        .args(["upstream", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "HTTP/1.1 upstream on 127.0.0.1:PORT; Ctrl-C to stop"
    let addr = line
        .split(" on ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    Upstream { child, addr }
}

fn load(target: SocketAddr, args: &[&str], json: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pilotfish-bench"))
        .args(["load", &target.to_string(), "--threads", "1", "--json"])
        .arg(json)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

fn us(v: &serde_json::Value, which: &str, p: &str) -> u64 {
    v[which][p]
        .as_u64()
        .unwrap_or_else(|| panic!("{which}.{p} in {v}"))
}

#[test]
fn open_loop_corrects_for_a_stall_that_closed_loop_hides() {
    let dir = std::env::temp_dir().join(format!("pf-bench-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Request 400 (counted over the whole run, warm-up included) stalls
    // 400 ms: at 500 req/s that is 0.8 s in, inside the measured window.
    let stall = ["--stall-request", "400", "--stall", "400ms"];
    let up = upstream(&stall);
    let hgrm = dir.join("open.hgrm");
    let open = load(
        up.addr,
        &[
            "--rate",
            "500",
            "--connections",
            "1",
            "--duration",
            "2s",
            "--warmup",
            "300ms",
            "--hgrm",
            hgrm.to_str().unwrap(),
        ],
        &dir.join("open.json"),
    );
    assert_eq!(open["errors"], serde_json::json!({}), "{open}");
    let requests = open["requests"].as_u64().unwrap();
    assert!(
        (900..=1000).contains(&requests),
        "{requests} of ~1000 scheduled"
    );
    // ~200 requests were due during the 400 ms stall: far more than 1% of
    // samples, so the corrected p99 is well into the stall...
    assert!(us(&open, "latency_us", "p99") >= 200_000, "{open}");
    // ...while the uncorrected service time saw one slow request in ~1000.
    assert!(us(&open, "service_us", "p99") < 100_000, "{open}");
    assert!(us(&open, "service_us", "p100") >= 390_000, "{open}");
    let rows = std::fs::read_to_string(&hgrm).unwrap();
    assert!(rows.contains("#[Max"), "{rows}");
    drop(up);

    // The same stall under a closed loop: the loop waits it out and then
    // carries on, so only the one request shows it.
    let up = upstream(&stall);
    let closed = load(
        up.addr,
        &[
            "--connections",
            "1",
            "--duration",
            "1500ms",
            "--warmup",
            "1ms",
        ],
        &dir.join("closed.json"),
    );
    assert!(us(&closed, "latency_us", "p99") < 100_000, "{closed}");
    assert!(us(&closed, "latency_us", "p100") >= 390_000, "{closed}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn errors_are_counted_by_kind() {
    let dir = std::env::temp_dir().join(format!("pf-bench-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let up = upstream(&["--status", "503"]);
    let r = load(
        up.addr,
        &[
            "--connections",
            "2",
            "--duration",
            "300ms",
            "--warmup",
            "1ms",
        ],
        &dir.join("e.json"),
    );
    assert_eq!(r["requests"], 0, "{r}");
    assert!(r["errors"]["status_5xx"].as_u64().unwrap() > 0, "{r}");
    let up = upstream(&["--fault", "close-mid-body", "--body-size", "1000"]);
    let r = load(
        up.addr,
        &[
            "--connections",
            "1",
            "--duration",
            "300ms",
            "--warmup",
            "1ms",
        ],
        &dir.join("f.json"),
    );
    assert!(r["errors"]["closed"].as_u64().unwrap() > 0, "{r}");
    std::fs::remove_dir_all(dir).unwrap();
}
