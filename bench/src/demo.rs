//! The mesh demo: upstream ← inbound sidecar ← outbound sidecar ← load.
//!
//! Container A → Proxy A → Proxy B → Container B, all on loopback: an echo
//! upstream plays service B, two real `pilotfish` processes play the two
//! sidecars, and the load generator plays service A. The same load runs
//! direct and through the mesh; the report shows both and the difference.

use std::{
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::Duration,
};

use crate::{pingpong, plot, sidecar::Sidecar, upstream};

struct Plan {
    connections: usize,
    warmup: Duration,
    measure: Duration,
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

    let app = upstream::http("127.0.0.1:0".parse()?)?;
    println!("service B (HTTP upstream)     {app}");
    let inbound = Sidecar::start(
        &binary,
        "sidecar-b-inbound",
        out,
        &config(out, "inbound", "service-b", app),
    )?;
    let inbound_addr = inbound.listener("inbound")?;
    println!(
        "sidecar B (inbound listener)  {inbound_addr}  pid {}",
        inbound.pid()
    );
    let outbound = Sidecar::start(
        &binary,
        "sidecar-a-outbound",
        out,
        &config(out, "outbound", "sidecar-b", inbound_addr),
    )?;
    let outbound_addr = outbound.listener("outbound")?;
    println!(
        "sidecar A (outbound listener) {outbound_addr}  pid {}",
        outbound.pid()
    );
    println!(
        "\nload: {} connections, HTTP/1.1 GET keep-alive, closed loop; warm-up {:?}, then {:?} each, direct then mesh\n",
        plan.connections, plan.warmup, plan.measure
    );

    let measure = |target| -> anyhow::Result<pingpong::Outcome> {
        pingpong::run(target, plan.connections, plan.warmup, &stop)?;
        // The sidecars' histograms count the measured window only.
        for name in ["sidecar-a-outbound", "sidecar-b-inbound"] {
            let _ = pilotfish::admin::client::request(
                &out.join(format!("{name}.sock")),
                "GET",
                "/histograms?reset=true",
            );
        }
        pingpong::run(target, plan.connections, plan.measure, &stop)
    };
    let direct = measure(app)?;
    let mesh = measure(outbound_addr)?;
    if stop.load(Ordering::Relaxed) {
        anyhow::bail!("interrupted; sidecars stopped");
    }
    anyhow::ensure!(
        mesh.requests > 0 && direct.requests > 0,
        "no request completed"
    );

    let mut report = String::from("Client-observed round trip (service A's view)\n");
    report += &pingpong::table(&[("direct", &direct), ("through mesh", &mesh)]);
    report += "\nLatency the mesh added (two sidecar hops, µs)\n";
    for p in [50.0, 90.0, 99.0, 99.9] {
        let d = direct.histogram.value_at_quantile(p / 100.0) as i64;
        let m = mesh.histogram.value_at_quantile(p / 100.0) as i64;
        report += &format!("  p{p:<6} {:>8}\n", m - d);
    }
    report += "\nEach sidecar's own histograms, from its admin socket (µs; through-mesh window)\n";
    for name in ["sidecar-a-outbound", "sidecar-b-inbound"] {
        let socket = out.join(format!("{name}.sock"));
        let (status, body) =
            pilotfish::admin::client::request(&socket, "GET", "/histograms?format=json")?;
        anyhow::ensure!(status == 200, "{name}: admin answered {status}: {body}");
        let table = pilotfish::admin::client::histogram_table(&body).map_err(anyhow::Error::msg)?;
        report += &format!("{name} ({}):\n{table}", socket.display());
    }
    let svg = plot::percentile_svg(
        "Pilotfish mesh demo: round-trip latency by percentile",
        &[
            ("direct", &direct.histogram),
            ("through mesh", &mesh.histogram),
        ],
    );
    let svg_path = out.join("latency.svg");
    std::fs::write(&svg_path, svg)?;
    std::fs::write(out.join("report.txt"), &report)?;
    print!("{report}");
    println!(
        "\nplot: {}\nreport: {}\nsidecar logs: {}/sidecar-*.log",
        svg_path.display(),
        out.join("report.txt").display(),
        out.display()
    );
    drop((outbound, inbound));
    Ok(())
}

fn config(out: &Path, listener: &str, cluster: &str, endpoint: std::net::SocketAddr) -> String {
    let name = if listener == "inbound" {
        "sidecar-b-inbound"
    } else {
        "sidecar-a-outbound"
    };
    let socket = out.join(format!("{name}.sock"));
    let socket = socket.display();
    format!(
        r#"# written by pilotfish-bench demo
workers = 1
drain_timeout = "1s"
[admin]
socket = "{socket}"
[[listeners]]
name = "{listener}"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "{cluster}"
[[clusters]]
name = "{cluster}"
endpoints = ["{endpoint}"]
"#
    )
}
