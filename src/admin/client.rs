//! The `pilotfish admin` side: one HTTP/1.1 request over the admin Unix
//! socket, and human tables for what comes back.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

/// Answers larger than this are refused (a full /metrics is far smaller).
const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Sends `METHOD path` and returns (status, body).
pub fn request(socket: &Path, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    request_with_body(socket, method, path, b"")
}

/// Sends `METHOD path` with `body` and returns (status, body).
pub fn request_with_body(
    socket: &Path,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    // A config swap waits for every worker to prepare and commit.
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.take(RESPONSE_BYTES_MAX as u64).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("malformed admin response"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status in admin response"))?;
    Ok((status, body.to_string()))
}

/// A percentile table from `/histograms` JSON.
/// One entry of `/histograms?format=json`: its `want` percentile in µs
/// (0 when absent).
pub fn percentile_us(h: &serde_json::Value, want: f64) -> u64 {
    h["percentiles_us"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|pair| pair[0].as_f64() == Some(want))
        .and_then(|pair| pair[1].as_u64())
        .unwrap_or(0)
}

pub fn histogram_table(json: &str) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mut out = format!(
        "{:<40}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}\n",
        "histogram (µs)", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    for h in v.as_array().into_iter().flatten() {
        let key = &h["key"];
        let mut name = key["metric"].as_str().unwrap_or("?").to_string();
        for part in ["listener", "route", "cluster"] {
            if let Some(x) = key[part].as_str() {
                name += &format!(" {part}={x}");
            }
        }
        let p = |want: f64| percentile_us(h, want);
        out += &format!(
            "{:<40}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}\n",
            name,
            h["count"].as_u64().unwrap_or(0),
            p(50.0),
            p(90.0),
            p(99.0),
            p(99.9),
            h["max_us"].as_u64().unwrap_or(0)
        );
    }
    Ok(out)
}

/// A compact per-core table from `/stats` JSON.
pub fn stats_table(json: &str) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mut out = format!(
        "{:<8}{:>10}{:>6}{:>10}{:>12}{:>12}{:>10}{:>10}{:>8}\n",
        "core", "driver", "gen", "active", "accepted", "http req", "retries", "5xx", "panics"
    );
    // serde_json's Display ignores width: make strings first.
    let n = |x: &serde_json::Value| x.to_string();
    let row = |label: &str, w: &serde_json::Value, driver: &str, generation: &str| {
        format!(
            "{:<8}{:>10}{:>6}{:>10}{:>12}{:>12}{:>10}{:>10}{:>8}\n",
            label,
            driver,
            generation,
            n(&w["connections_active"]),
            n(&w["connections_accepted"]),
            n(&w["http"]["requests"]),
            n(&w["http"]["retries"]),
            n(&w["http"]["responses_by_class"][4]),
            n(&w["task_panics"])
        )
    };
    for w in v["workers"].as_array().into_iter().flatten() {
        out += &row(
            &n(&w["worker"]),
            &w["counters"],
            w["driver"].as_str().unwrap_or("?"),
            &n(&w["generation"]),
        );
    }
    out += &row("total", &v["total"], "", "");
    if let Some(cert) = v.get("tls") {
        let t = &v["total"]["tls"];
        let failed: u64 = t["handshake_failures"]
            .as_array()
            .map_or(0, |a| a.iter().filter_map(|f| f["count"].as_u64()).sum());
        out += &format!(
            "tls: {} serial {} expires in {} s; handshakes in {} (+{} resumed), out {} (+{} resumed), {failed} failed\n",
            cert["identity"].as_str().unwrap_or("?"),
            cert["serial"].as_str().unwrap_or("?"),
            n(&cert["seconds_to_expiry"]),
            n(&t["handshakes_inbound"]),
            n(&t["handshakes_inbound_resumed"]),
            n(&t["handshakes_outbound"]),
            n(&t["handshakes_outbound_resumed"]),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_table_columns_line_up() {
        let json = r#"{"total":{"connections_active":1,"connections_accepted":12345,"task_panics":0,"http":{"requests":99,"retries":0,"responses_by_class":[0,99,0,0,3]}},
            "workers":[{"worker":0,"driver":"io_uring","generation":2,"counters":{"connections_active":1,"connections_accepted":12345,"task_panics":0,"http":{"requests":99,"retries":0,"responses_by_class":[0,99,0,0,3]}}}]}"#;
        let table = stats_table(json).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines.iter().all(|l| l.len() == lines[0].len()), "{table}");
        assert!(lines[1].contains("  io_uring     2"), "{table}");
        assert!(lines[1].ends_with("       0"), "{table}");
    }
}
