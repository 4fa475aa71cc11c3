//! HTTP/2 on a listener, in-process, both drivers: generated answers over
//! h2, and a drain that lets in-flight streams finish (graceful GOAWAY)
//! while the connection takes no new ones. curl is the h2 client.
#![allow(clippy::disallowed_methods)] // test threads may sleep

mod support;

use std::{
    io::{Read, Write},
    process::Command,
    thread,
    time::Duration,
};

use support::*;

/// An HTTP/1.1 upstream that answers each request after `delay`.
fn slow_upstream(delay: Duration) -> std::net::SocketAddr {
    serve(move |mut s| {
        let mut buf = vec![0u8; 8192];
        let mut seen = Vec::new();
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                seen.drain(..end + 4);
                thread::sleep(delay);
                let body = "slow\n";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if s.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
        }
    })
}

fn curl_h2(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--http2-prior-knowledge"])
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn generated_answers_over_h2_say_why() {
    if !have("curl") {
        return;
    }
    for driver in drivers() {
        let up = slow_upstream(Duration::ZERO);
        let toml = http_config(
            driver,
            "[[listeners.routes]]\nname = \"only\"\npath_prefix = \"/only\"\ncluster = \"up\"",
            &cluster("up", &[up], ""),
        );
        let (proxy, addr) = start_toml(&toml, "web");
        let (out, err) = curl_h2(&["-i", &format!("http://{addr}/elsewhere")]);
        assert!(out.starts_with("HTTP/2 404"), "{driver}: {out}{err}");
        assert!(
            out.contains("x-pilotfish-error: no_route"),
            "{driver}: {out}"
        );
        assert!(
            out.contains("no route matches this request"),
            "{driver}: {out}"
        );
        let (out, _) = curl_h2(&["-i", &format!("http://{addr}/only/x")]);
        assert!(
            out.starts_with("HTTP/2 200") && out.ends_with("slow\n"),
            "{driver}: {out}"
        );
        // gRPC callers get a gRPC error, not a 404 page.
        let (out, err) = curl_h2(&[
            "-i",
            "-H",
            "content-type: application/grpc",
            "--data-binary",
            "",
            &format!("http://{addr}/pkg.Svc/Method"),
        ]);
        assert!(out.starts_with("HTTP/2 200"), "{driver}: {out}{err}");
        assert!(
            out.contains("grpc-status: 12"),
            "{driver}: UNIMPLEMENTED: {out}"
        );
        assert!(
            out.contains("grpc-message: no route matches this request"),
            "{driver}: {out}"
        );
        proxy.shutdown();
    }
}

#[test]
fn a_drain_lets_open_h2_streams_finish() {
    if !have("nghttp") {
        return;
    }
    for driver in drivers() {
        let up = slow_upstream(Duration::from_millis(800));
        let toml = http_config(driver, "cluster = \"up\"", &cluster("up", &[up], ""));
        let (proxy, addr) = start_toml(&toml, "web");
        // Three streams on one connection (nghttp multiplexes its URIs),
        // all in flight when the drain starts: each is answered.
        let urls: Vec<String> = (1..=3).map(|i| format!("http://{addr}/s{i}")).collect();
        let client = thread::spawn(move || {
            Command::new("timeout")
                .args(["30", "nghttp"])
                .args(&urls)
                .output()
                .unwrap()
        });
        eventually("three streams in flight on one connection", || {
            let http = proxy.stats().total.http;
            http.h2_streams >= 3 && http.h2_connections == 1
        });
        proxy.drain();
        let out = client.join().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "slow\nslow\nslow\n",
            "{driver}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{driver}");
        proxy.shutdown();
    }
}

/// Envoy's premature-reset rule: a client that keeps cancelling streams
/// after they went upstream gets GOAWAY ENHANCE_YOUR_CALM, counted.
#[test]
fn a_client_that_resets_most_streams_after_they_went_upstream_is_cut_off() {
    if !have_py("h2") {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/h2_raw.py");
    for driver in drivers() {
        let up = slow_upstream(Duration::from_secs(2));
        let toml = http_config(driver, "cluster = \"up\"", &cluster("up", &[up], ""));
        let (proxy, addr) = start_toml(&toml, "web");
        let out = Command::new("timeout")
            .args([
                "60",
                "python3",
                script,
                "flood",
                &addr.to_string(),
                "premature_reset",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(r#""closed": true"#) && text.contains("ENHANCE_YOUR_CALM"),
            "{driver}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let http = proxy.stats().total.http;
        assert_eq!(http.h2_premature_reset_closes, 1, "{driver}: {http:?}");
        proxy.shutdown();
    }
}

/// An upstream that answers an upload before reading it (a 413): the h2
/// client gets that answer, and its stream ends cleanly: the rest of the
/// body is read and discarded (bounded) instead of the stream being reset
/// under a client that is still sending, which curl reports as an error.
#[test]
fn an_early_answer_to_an_h2_upload_reaches_the_client_whole() {
    if !have("curl") {
        return;
    }
    let upstream = serve(|mut s| {
        if read_head_raw(&mut s).is_empty() {
            return;
        }
        let _ = s.write_all(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\n\r\nbig\n");
        // Never reads the body.
        thread::sleep(Duration::from_secs(5));
    });
    let file = temp_dir("h2-early").join("up.bin");
    // More than curl sends at once (its first burst is one 64 KiB flow
    // control window), so the body cannot all be in before the answer,
    // however the machine schedules the two: with 64 KiB at 64K/s, curl
    // could send it all in its first burst, the proxy then forwarded all
    // of it into the upstream's socket buffer, and under load the body
    // was sometimes "sent" before the answer was read (seen in CI).
    std::fs::write(&file, vec![b'x'; 256 * 1024]).unwrap();
    for driver in drivers() {
        let (proxy, addr) = start_to(driver, upstream);
        let stats = || proxy.stats().total.http;
        // The rest comes over about a second, within the proxy's
        // lingering time (2 s), which reads and discards it.
        let (out, err) = curl_h2(&[
            "--limit-rate",
            "192K",
            "--data-binary",
            &format!("@{}", file.display()),
            "-w",
            "%{http_code}",
            &format!("http://{addr}/upload"),
        ]);
        assert_eq!(out, "big\n413", "{driver}: {err}");
        assert!(err.is_empty(), "{driver}: {err}");
        assert_eq!(stats().early_responses, 1, "{driver}: answered early");
        proxy.shutdown();
    }
}

/// Interim responses from an HTTP/1.1 upstream reach an h2 client (103
/// Early Hints, as HEADERS before the final ones), on both drivers.
#[test]
fn an_early_hints_response_reaches_an_h2_client() {
    if !have("curl") {
        return;
    }
    let upstream = serve(|mut s| {
        if read_head_raw(&mut s).is_empty() {
            return;
        }
        let _ = s.write_all(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n",
        );
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
    });
    for driver in drivers() {
        let (proxy, addr) = start_to(driver, upstream);
        let (out, err) = curl_h2(&["-i", &format!("http://{addr}/page")]);
        let out = out.to_ascii_lowercase();
        let early = out
            .find("http/2 103")
            .unwrap_or_else(|| panic!("{driver}: {out}{err}"));
        let last = out
            .find("http/2 200")
            .unwrap_or_else(|| panic!("{driver}: {out}{err}"));
        assert!(early < last, "{driver}: {out}");
        assert!(
            out.contains("link: </style.css>; rel=preload"),
            "{driver}: {out}"
        );
        assert!(out.ends_with("ok\n"), "{driver}: {out}");
        proxy.shutdown();
    }
}
