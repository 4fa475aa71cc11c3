//! The mesh demo: upstream ← inbound sidecar ← outbound sidecar ← load.
//!
//! Container A → Proxy A → Proxy B → Container B, all on loopback: an echo
//! upstream plays service B, two real `pilotfish` processes play the two
//! sidecars, and the load generator plays service A. The sidecars carry
//! two paths: plaintext, and mutual TLS with SPIFFE identities from a
//! development CA made by `pilotfish ca` (B admits only A's identity). The
//! same load runs direct, through the plaintext pair and through the mTLS
//! pair; the report shows each, what the mesh added, what mTLS added, and
//! the handshakes both sidecars counted.

use std::{
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::Duration,
};

use anyhow::Context;

use crate::{pingpong, plot, sidecar::Sidecar, upstream};

struct Plan {
    connections: usize,
    warmup: Duration,
    measure: Duration,
}

/// `<target dir>/demo`: next to the profile directory this binary runs
/// from (`target/release/pilotfish-bench` → `target/demo`), so the output
/// lands in the workspace's target directory from any working directory.
pub fn default_out() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("demo")))
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("demo")
        })
}

pub fn run(quick: bool, out: &Path, binary: Option<PathBuf>) -> anyhow::Result<()> {
    let plan = if quick {
        Plan {
            connections: 4,
            warmup: Duration::from_millis(200),
            measure: Duration::from_secs(1),
        }
    } else {
        Plan {
            connections: 16,
            warmup: Duration::from_secs(1),
            measure: Duration::from_secs(10),
        }
    };
    let stop = pingpong::stop_on_ctrl_c()?;
    let binary = crate::sidecar::locate_binary(binary)?;
    std::fs::create_dir_all(out)?;

    let pki = issue_identities(&binary, out)?;
    let app = upstream::http("127.0.0.1:0".parse()?)?;
    println!("service B (HTTP upstream)     {app}");
    let inbound = Sidecar::start(&binary, "sidecar-b-inbound", out, &inbound_config(out, app))?;
    let (inbound_addr, inbound_mtls) = (
        inbound.listener("inbound")?,
        inbound.listener("inbound-mtls")?,
    );
    println!(
        "sidecar B (inbound)           {inbound_addr} plaintext, {inbound_mtls} mTLS as {SERVICE_B}  pid {}",
        inbound.pid()
    );
    let outbound = Sidecar::start(
        &binary,
        "sidecar-a-outbound",
        out,
        &outbound_config(out, inbound_addr, inbound_mtls),
    )?;
    let (outbound_addr, outbound_mtls, outbound_mtls_h1) = (
        outbound.listener("outbound")?,
        outbound.listener("outbound-mtls")?,
        outbound.listener("outbound-mtls-h1")?,
    );
    println!(
        "sidecar A (outbound)          {outbound_addr} plaintext, {outbound_mtls} mTLS (h2 between the sidecars), {outbound_mtls_h1} mTLS (HTTP/1.1 between) as {SERVICE_A}  pid {}",
        outbound.pid()
    );
    println!(
        "identities: {} (development CA: `pilotfish ca`)",
        pki.display()
    );
    println!(
        "\nload: {} connections, HTTP/1.1 GET keep-alive, closed loop; warm-up {:?}, then {:?} each: direct, plaintext mesh, mTLS mesh with HTTP/1.1 and with h2 between the sidecars\n",
        plan.connections, plan.warmup, plan.measure
    );

    let pids = [outbound.pid(), inbound.pid()];
    let measure = |target| -> anyhow::Result<pingpong::Outcome> {
        pingpong::run(target, plan.connections, plan.warmup, &stop)?;
        // The sidecars' histograms count the measured window only.
        for name in ["sidecar-a-outbound", "sidecar-b-inbound"] {
            let _ = pilotfish::admin::client::request(
                &out.join(format!("{name}.sock")),
                "POST",
                "/histograms?reset=true",
            );
        }
        pingpong::run(target, plan.connections, plan.measure, &stop)
    };
    // CPU seconds both sidecars spent, per request, over one window.
    let cpu = |f: &dyn Fn() -> anyhow::Result<pingpong::Outcome>| {
        let ticks = || -> u64 {
            pids.iter()
                .map(|p| {
                    let (u, s) = crate::compare::cpu_ticks(*p);
                    u + s
                })
                .sum()
        };
        let before = ticks();
        let o = f()?;
        let used = (ticks() - before) as f64 / 100.0;
        let per_request_us = used * 1e6 / o.requests.max(1) as f64;
        anyhow::Ok((o, per_request_us))
    };
    let direct = measure(app)?;
    let mesh = measure(outbound_addr)?;
    let (mtls_h1, cpu_h1) = cpu(&|| measure(outbound_mtls_h1))?;
    let (mtls, cpu_h2) = cpu(&|| measure(outbound_mtls))?;
    if stop.load(Ordering::Relaxed) {
        anyhow::bail!("interrupted; sidecars stopped");
    }
    anyhow::ensure!(
        mesh.requests > 0 && direct.requests > 0 && mtls.requests > 0,
        "no request completed"
    );

    let mut report = String::from("Client-observed round trip (service A's view)\n");
    report += &pingpong::table(&[
        ("direct", &direct),
        ("through mesh", &mesh),
        ("mTLS, HTTP/1.1 between", &mtls_h1),
        ("through mTLS mesh (h2)", &mtls),
    ]);
    report += "\nLatency added (µs): by the mesh (two sidecar hops), and by mTLS on top of it\n";
    report += "  percentile      mesh   mTLS\n";
    for p in [50.0, 90.0, 99.0, 99.9] {
        let at = |o: &pingpong::Outcome| o.histogram.value_at_quantile(p / 100.0) as i64;
        report += &format!(
            "  p{p:<6} {:>14} {:>6}\n",
            at(&mesh) - at(&direct),
            at(&mtls) - at(&mesh)
        );
    }
    report += &format!(
        "mTLS pair vs plaintext pair (keep-alive): {:.0} vs {:.0} req/s ({:.2}x)\n",
        mtls.rate(),
        mesh.rate(),
        mtls.rate() / mesh.rate()
    );
    let b_stats = {
        let socket = out.join("sidecar-b-inbound.sock");
        let (_, body) = pilotfish::admin::client::request(&socket, "GET", "/stats")?;
        serde_json::from_str::<serde_json::Value>(&body)?
    };
    let h2 = &b_stats["total"]["http"];
    report += &format!(
        "between the sidecars (mTLS): h2 by ALPN, {} requests multiplexed on {} connection(s) (sidecar B's /stats); the app on both sides speaks HTTP/1.1\n",
        h2["h2_streams"].as_u64().unwrap_or(0),
        h2["h2_connections"].as_u64().unwrap_or(0),
    );
    report += &format!(
        "mTLS pair, h2 vs HTTP/1.1 between the sidecars: {:.0} vs {:.0} req/s ({:.2}x); sidecar CPU {:.1} vs {:.1} µs/request ({:.2}x)\n",
        mtls.rate(),
        mtls_h1.rate(),
        mtls.rate() / mtls_h1.rate(),
        cpu_h2,
        cpu_h1,
        cpu_h2 / cpu_h1,
    );
    report += "\nmTLS handshakes (from each sidecar's /stats)\n";
    for name in ["sidecar-a-outbound", "sidecar-b-inbound"] {
        let socket = out.join(format!("{name}.sock"));
        let (status, body) = pilotfish::admin::client::request(&socket, "GET", "/stats")?;
        anyhow::ensure!(status == 200, "{name}: admin answered {status}: {body}");
        let stats: serde_json::Value = serde_json::from_str(&body)?;
        let t = &stats["total"]["tls"];
        let n = |k: &str| t[k].as_u64().unwrap_or(0);
        let failures: u64 = t["handshake_failures"]
            .as_array()
            .map_or(0, |a| a.iter().filter_map(|f| f["count"].as_u64()).sum());
        report += &format!(
            "  {name}: {} full + {} resumed {}, {failures} failed; certificate {} expires in {} s\n",
            n(if name.contains("outbound") { "handshakes_outbound" } else { "handshakes_inbound" }),
            n(if name.contains("outbound") { "handshakes_outbound_resumed" } else { "handshakes_inbound_resumed" }),
            if name.contains("outbound") { "originated" } else { "accepted" },
            stats["tls"]["identity"].as_str().unwrap_or("?"),
            stats["tls"]["seconds_to_expiry"].as_i64().unwrap_or(0),
        );
    }
    report +=
        "\nEach sidecar's own histograms, from its admin socket (µs; the last, mTLS, window)\n";
    let sockets: Vec<(&str, PathBuf)> = ["sidecar-a-outbound", "sidecar-b-inbound"]
        .into_iter()
        .map(|name| (name, out.join(format!("{name}.sock"))))
        .collect();
    report += &histogram_tables(&sockets)?;
    report += &golden_table(&sockets)?;
    finish(
        out,
        "Pilotfish mesh demo: round-trip latency by percentile",
        &[
            ("direct", &direct.histogram),
            ("through mesh", &mesh.histogram),
            ("mTLS, HTTP/1.1 between", &mtls_h1.histogram),
            ("through mTLS mesh (h2)", &mtls.histogram),
        ],
        &report,
    )?;
    drop((outbound, inbound));
    Ok(())
}

/// Each sidecar's histograms as tables, pulled from its admin socket.
pub(crate) fn histogram_tables(sidecars: &[(&str, PathBuf)]) -> anyhow::Result<String> {
    let mut report = String::new();
    for (name, socket) in sidecars {
        let (status, body) =
            pilotfish::admin::client::request(socket, "GET", "/histograms?format=json")?;
        anyhow::ensure!(status == 200, "{name}: admin answered {status}: {body}");
        let table = pilotfish::admin::client::histogram_table(&body).map_err(anyhow::Error::msg)?;
        report += &format!("{name} ({}):\n{table}", socket.display());
    }
    Ok(report)
}

/// Who called whom: each sidecar's golden series (`GET /golden`), with
/// requests and responses by code.
pub(crate) fn golden_table(sidecars: &[(&str, PathBuf)]) -> anyhow::Result<String> {
    let mut report = String::from(
        "\nGolden metrics from each sidecar's admin socket (GET /golden; the whole run)\n",
    );
    for (name, socket) in sidecars {
        let (status, body) = pilotfish::admin::client::request(socket, "GET", "/golden")?;
        anyhow::ensure!(status == 200, "{name}: admin answered {status}: {body}");
        let golden: pilotfish::metrics::golden::Snapshot = serde_json::from_str(&body)?;
        for (l, h) in &golden.http {
            let codes: Vec<String> = h
                .responses
                .iter()
                .map(|(code, _, n)| format!("{code}×{n}"))
                .collect();
            // Estimated from the duration buckets, as histogram_quantile does.
            let q = |q: f64| {
                pilotfish::admin::top::quantile(&h.buckets, q)
                    .map_or("-".to_string(), |d| format!("{} µs", d.as_micros()))
            };
            report += &format!(
                "  {name}: {} listener={} cluster={} tls={} peer={} requests={} codes {} p50≈{} p99≈{}\n",
                l.direction.name(),
                l.listener,
                l.cluster.as_deref().unwrap_or("-"),
                l.tls,
                l.peer.as_deref().unwrap_or("-"),
                h.requests,
                codes.join(" "),
                q(0.5),
                q(0.99),
            );
        }
    }
    Ok(report)
}

/// Writes the plot and the report to `out` and prints the report.
pub(crate) fn finish(
    out: &Path,
    title: &str,
    series: &[(&str, &hdrhistogram::Histogram<u64>)],
    report: &str,
) -> anyhow::Result<()> {
    let svg_path = out.join("latency.svg");
    std::fs::write(&svg_path, plot::percentile_svg(title, series))?;
    std::fs::write(out.join("report.txt"), report)?;
    print!("{report}");
    println!(
        "\nplot: {}\nreport: {}\nsidecar logs: {}/sidecar-*.log",
        svg_path.display(),
        out.join("report.txt").display(),
        out.display()
    );
    Ok(())
}

/// The workload identities of the demo's two services.
pub(crate) const SERVICE_A: &str = "spiffe://demo.mesh/ns/default/sa/service-a";
pub(crate) const SERVICE_B: &str = "spiffe://demo.mesh/ns/default/sa/service-b";

/// Makes a development CA and one SVID per sidecar with the real
/// `pilotfish ca` commands, as a user trying the mesh would.
pub(crate) fn issue_identities(binary: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let pki = out.join("pki");
    let _ = std::fs::remove_dir_all(&pki);
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let o = std::process::Command::new(binary).args(args).output()?;
        anyhow::ensure!(
            o.status.success(),
            "pilotfish {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(())
    };
    let ca = pki.join("ca");
    let ca = ca.to_str().context("non-UTF-8 path")?;
    run(&["ca", "init", ca])?;
    for (id, dir) in [(SERVICE_A, "service-a"), (SERVICE_B, "service-b")] {
        let d = pki.join(dir);
        let d = d.to_str().context("non-UTF-8 path")?;
        run(&["ca", "issue", "--ca", ca, "--spiffe-id", id, "--out", d])?;
    }
    Ok(pki)
}

pub(crate) fn header(out: &Path, name: &str, service: &str) -> String {
    let socket = out.join(format!("{name}.sock"));
    let tls = out.join("pki").join(service);
    format!(
        r#"# written by pilotfish-bench demo
workers = 1
drain_timeout = "1s"
[admin]
socket = "{socket}"
[tls]
cert = "{tls}/cert.pem"
key = "{tls}/key.pem"
trust_bundle = "{tls}/ca.pem"
"#,
        socket = socket.display(),
        tls = tls.display(),
    )
}

/// Sidecar B: plaintext and mTLS listeners in front of service B; the mTLS
/// one admits service A only.
fn inbound_config(out: &Path, app: std::net::SocketAddr) -> String {
    header(out, "sidecar-b-inbound", "service-b")
        + &format!(
            r#"[[listeners]]
name = "inbound"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "service-b"
[[listeners]]
name = "inbound-mtls"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "service-b"
tls = {{ require_client_cert = true }}
authorize = ["{SERVICE_A}"]
[[clusters]]
name = "service-b"
endpoints = ["{app}"]
"#
        )
}

/// Sidecar A: one outbound listener per path to sidecar B.
fn outbound_config(out: &Path, plain: std::net::SocketAddr, mtls: std::net::SocketAddr) -> String {
    header(out, "sidecar-a-outbound", "service-a")
        + &format!(
            r#"[[listeners]]
name = "outbound"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "sidecar-b"
[[listeners]]
name = "outbound-mtls"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "sidecar-b-mtls"
[[listeners]]
name = "outbound-mtls-h1"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "sidecar-b-mtls-h1"
[[clusters]]
name = "sidecar-b"
endpoints = ["{plain}"]
[[clusters]]
name = "sidecar-b-mtls"
endpoints = ["{mtls}"]
tls = {{ server_identity = "{SERVICE_B}" }}
# protocol = "auto" (the default): ALPN picks h2 between two Pilotfish
# sidecars, so the app's HTTP/1.1 requests ride one multiplexed connection.
[[clusters]]
name = "sidecar-b-mtls-h1"
endpoints = ["{mtls}"]
tls = {{ server_identity = "{SERVICE_B}" }}
protocol = "http1"
"#
        )
}
