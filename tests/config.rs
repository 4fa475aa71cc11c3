//! `pilotfish check` on the example configs and on broken ones.

mod support;

use std::path::Path;

use support::*;

#[test]
fn every_example_config_is_valid() {
    // config/mtls.toml names development certificates; make them as its
    // header says (`pilotfish check` reads the files).
    let pki = Path::new("/tmp/pilotfish-mtls");
    if !pki.join("orders/cert.pem").exists() {
        use pilotfish::tls::{ca, identity::SpiffeId};
        let _ = ca::init(&pki.join("ca"));
        let id = SpiffeId::parse("spiffe://mesh.local/ns/prod/sa/orders").unwrap();
        let day = std::time::Duration::from_secs(86_400);
        ca::issue(&pki.join("ca"), &id, &pki.join("orders"), day).unwrap();
    }
    let mut checked = 0;
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (ok, stdout, stderr) = check_config(&path);
            assert!(ok, "{}: {stderr}", path.display());
            assert!(stdout.contains(": ok"), "{stdout}");
            pilotfish::Config::load(&path).unwrap();
            checked += 1;
        }
    }
    assert!(checked >= 2, "found {checked} example configs");
}

#[test]
fn check_rejects_bad_configs_naming_file_line_and_key() {
    let good = L4Config::new("epoll", vec!["127.0.0.1:9".parse().unwrap()]).toml();
    let dup_bind = format!(
        "{}\n[[listeners]]\nname = \"second\"\nbind = \"127.0.0.1:15099\"\nprotocol = \"tcp\"\ncluster = \"backend\"\n",
        good.replace("127.0.0.1:0", "127.0.0.1:15099")
    );
    // (what, text, key that must be named, text on the line that must be named)
    let cases = [
        (
            "unknown key",
            good.replace("workers = 1", "workers = 1\nworkerz = 2"),
            "workerz",
            "workerz = 2",
        ),
        (
            "missing cluster",
            good.replace("cluster = \"backend\"", "cluster = \"nope\""),
            "listeners[0].cluster",
            "cluster = \"nope\"",
        ),
        (
            "bad duration",
            good.replace("connect_timeout = \"1s\"", "connect_timeout = \"soon\""),
            "connect_timeout",
            "\"soon\"",
        ),
        (
            "duplicate bind",
            dup_bind,
            "listeners[1].bind",
            "name = \"second\"",
        ),
        (
            "sample rate over 1",
            format!("{good}\n[tracing]\ncollector = \"127.0.0.1:4318\"\nsample_rate = 1.5\n"),
            "tracing.sample_rate",
            "sample_rate = 1.5",
        ),
        (
            "collector without a port",
            format!("{good}\n[tracing]\ncollector = \"otel-collector\"\n"),
            "tracing.collector",
            "collector = \"otel-collector\"",
        ),
    ];
    let dir = temp_dir("check");
    for (what, text, key, marker) in cases {
        let path = dir.join("bad.toml");
        std::fs::write(&path, &text).unwrap();
        let (ok, _, stderr) = check_config(&path);
        assert!(!ok, "{what}: accepted");
        assert!(
            stderr.contains(&*path.to_string_lossy()),
            "{what}: names the file: {stderr}"
        );
        assert!(stderr.contains(key), "{what}: names `{key}`: {stderr}");
        // For the duplicate bind the marker is the line before the bind.
        let mut expected_line = 1 + text.lines().position(|l| l.contains(marker)).unwrap();
        if what == "duplicate bind" {
            expected_line += 1;
        }
        assert!(
            stderr.contains(&format!(":{expected_line}:")),
            "{what}: names line {expected_line}: {stderr}"
        );
    }
    let (ok, _, stderr) = check_config(&dir.join("missing.toml"));
    assert!(!ok && stderr.contains("missing.toml"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}
