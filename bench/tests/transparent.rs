//! `pilotfish-bench demo --transparent --quick`: two pods in network
//! namespaces the demo makes, the app in pod A dials pod B's address, the
//! sidecars (real processes, uid 1337, behind real redirect rules) carry
//! it over mTLS. Needs root, iproute2, nftables and setpriv: outside CI a
//! machine without them skips (and says so); under CI=true it fails.

mod common;

use std::process::Command;

use common::{have, pilotfish_binary};

fn capable() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root {
        assert!(
            std::env::var("CI").is_err(),
            "demo --transparent needs root under CI"
        );
        eprintln!("skipped: demo --transparent needs root");
        return false;
    }
    ["ip", "nft", "setpriv"].iter().all(|t| have(t))
}

fn bench() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pilotfish-bench"));
    c.env_remove("CARGO");
    c
}

#[test]
fn the_transparent_demo_meshes_two_pods_and_cleans_up() {
    if !capable() {
        return;
    }
    let out = std::env::temp_dir().join(format!("pilotfish-transparent-{}", std::process::id()));
    let child = bench()
        .args(["demo", "--transparent", "--quick", "--out"])
        .arg(&out)
        .arg("--pilotfish")
        .arg(pilotfish_binary())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let run = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "demo failed:\n{stdout}\n{stderr}");

    // The app's plain call to B's address got B's answer.
    assert!(
        stdout.contains("(no proxy configured in the app): HTTP/1.1 200 OK, \"hello world\""),
        "{stdout}"
    );
    // Every window completed requests, none failed: 2 tables x 3 columns.
    let errors: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("requests (errors)"))
        .collect();
    assert_eq!(errors.len(), 2, "{stdout}");
    for line in errors {
        assert_eq!(line.matches("(0)").count(), 3, "{line}");
    }
    // Sidecar A detected HTTP/1.1 on intercepted connections and routed
    // them; sidecar B accepted mTLS on its intercepted inbound port.
    let counters = |name: &str| -> String {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no counters for {name}:\n{stdout}"))
            .to_string()
    };
    let count = |line: &str, field: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{field}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let a = counters("sidecar-a");
    let b = counters("sidecar-b");
    assert!(count(&a, "detected_http1") > 0, "{a}");
    assert!(count(&a, "outbound_routed") > 0, "{a}");
    assert_eq!(count(&a, "loops"), 0, "{a}");
    assert!(count(&b, "inbound_mtls") >= 1, "{b}");
    assert_eq!(count(&b, "inbound_plaintext_refused"), 0, "{b}");
    // The detection histogram came from sidecar A's admin socket.
    let detect = stdout
        .lines()
        .find(|l| l.starts_with("protocol detection at sidecar A"))
        .unwrap_or_else(|| panic!("no detection line:\n{stdout}"));
    assert!(!detect.contains(": 0 connections"), "{detect}");
    assert!(
        stdout.contains("between the sidecars: mTLS, h2 by ALPN"),
        "{stdout}"
    );
    for expected in ["transparent mesh", "explicit-port mesh", "over explicit"] {
        assert!(stdout.contains(expected), "no {expected:?}:\n{stdout}");
    }
    assert!(out.join("latency.svg").exists());
    // Golden metrics: sidecar B counted the transparent mesh's requests
    // inbound, by the caller's SPIFFE ID, all answered 200.
    let golden = stdout
        .lines()
        .find(|l| {
            l.contains("sidecar-b: inbound listener=inbound cluster=service-b tls=true peer=spiffe://demo.mesh/ns/default/sa/service-a ")
        })
        .unwrap_or_else(|| panic!("no golden series for A at B:\n{stdout}"));
    assert!(!golden.contains("requests=0"), "{golden}");
    assert!(golden.contains(" 200×"), "{golden}");

    // Nothing left behind: the namespaces (and with them veths and rules)
    // are gone, and so are the sidecars' admin sockets.
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(!netns.contains(&format!("-{pid}")), "left: {netns}");
    let sockets: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".sock"))
        .collect();
    assert!(sockets.is_empty(), "admin sockets left: {sockets:?}");
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn without_root_the_transparent_demo_says_what_it_needs() {
    if !capable() {
        return;
    }
    // As nobody: refused before anything is made.
    let run = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_pilotfish-bench"))
        .args(["demo", "--transparent", "--quick", "--out", "/nonexistent"])
        .arg("--pilotfish")
        .arg(pilotfish_binary())
        .env_remove("CARGO")
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("demo --transparent needs root"), "{stderr}");
}
