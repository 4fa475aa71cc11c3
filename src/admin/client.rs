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
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
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
        let p = |want: f64| {
            h["percentiles_us"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|pair| pair[0].as_f64() == Some(want))
                .and_then(|pair| pair[1].as_u64())
                .unwrap_or(0)
        };
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
        "{:<8}{:>8}{:>10}{:>12}{:>12}{:>10}{:>10}{:>8}\n",
        "core", "driver", "active", "accepted", "http req", "retries", "5xx", "panics"
    );
    let row = |label: &str, w: &serde_json::Value, driver: &str| {
        format!(
            "{:<8}{:>8}{:>10}{:>12}{:>12}{:>10}{:>10}{:>8}\n",
            label,
            driver,
            w["connections_active"],
            w["connections_accepted"],
            w["http"]["requests"],
            w["http"]["retries"],
            w["http"]["responses_by_class"][4],
            w["task_panics"]
        )
    };
    for w in v["workers"].as_array().into_iter().flatten() {
        out += &row(
            &w["worker"].to_string(),
            &w["counters"],
            w["driver"].as_str().unwrap_or("?"),
        );
    }
    out += &row("total", &v["total"], "");
    Ok(out)
}
