//! curl as the client and nginx as a real upstream (Debian packages), with
//! the real pilotfish binary in between. `.ci/run` installs both; where
//! they are missing outside CI the tests say so and pass, and under CI
//! (CI=true) a missing peer fails the test.

mod support;

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use support::{http_client::*, *};

struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    fn start() -> Self {
        let dir = temp_dir("nginx");
        let www = dir.join("www");
        std::fs::create_dir_all(www.join("dav")).unwrap();
        std::fs::write(www.join("hello.txt"), "hello from nginx\n").unwrap();
        std::fs::create_dir_all(www.join("admin")).unwrap();
        std::fs::create_dir_all(www.join("public")).unwrap();
        std::fs::write(www.join("admin/secret.txt"), "SECRET\n").unwrap();
        std::fs::write(www.join("public/hello.txt"), "public\n").unwrap();
        // A 1 GiB sparse file for the streaming test.
        std::fs::File::create(www.join("big.bin"))
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        // A port from the OS, released for nginx to bind (a brief race
        // another process could only win by binding the same port).
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let conf = format!(
            r#"user root;
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000;
    server {{
        listen {addr};
        root {www};
        location /dav/ {{
            dav_methods PUT DELETE;
            create_full_put_path on;
            client_max_body_size 0;
        }}
        location = /sink {{
            client_max_body_size 0;
            return 200 "sunk\n";
        }}
        location /uri/ {{
            return 200 "$request_uri\n";
        }}
    }}
}}
"#,
            dir = dir.display(),
            www = www.display(),
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .args(["-p", dir.to_str().unwrap(), "-c", "nginx.conf"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        eventually("nginx listens", || {
            std::net::TcpStream::connect(addr).is_ok()
        });
        Self { child, addr, dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers too (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn proxy_config(upstream: SocketAddr) -> String {
    http_config(
        "auto",
        "cluster = \"nginx\"",
        &cluster("nginx", &[upstream], ""),
    )
    .replace("name = \"web\"", "name = \"app-out\"")
}

const H2_RAW: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/h2_raw.py");

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn curl_through_pilotfish_to_nginx() {
    if !have("nginx") || !have("curl") {
        return;
    }
    let nginx = Nginx::start();
    let mut proxy = ChildProxy::spawn(&proxy_config(nginx.addr));
    let addr = proxy.wait_ready();
    let base = format!("http://{addr}");

    // GET, HEAD.
    let (ok, body, err) = curl(&[&format!("{base}/hello.txt")]);
    assert!(ok, "{err}");
    assert_eq!(body, "hello from nginx\n");
    let (ok, head, _) = curl(&["-I", &format!("{base}/hello.txt")]);
    assert!(
        ok && head.to_ascii_lowercase().contains("content-length: 17"),
        "{head}"
    );

    // 304 on a conditional GET (nginx wants the exact Last-Modified).
    let last_modified = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("Last-Modified: ")
                .or_else(|| l.strip_prefix("last-modified: "))
        })
        .expect("nginx sends Last-Modified")
        .trim()
        .to_string();
    let (_, code, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("If-Modified-Since: {last_modified}"),
        &format!("{base}/hello.txt"),
    ]);
    assert_eq!(code, "304");

    // POST with Content-Length.
    let (ok, body, err) = curl(&["--data-binary", "name=value", &format!("{base}/sink")]);
    assert!(ok && body == "sunk\n", "{err}");

    // PUT with a chunked body (stdin, no length), read back through the proxy.
    let dir = temp_dir("curl");
    let payload = pattern(5, 300_000);
    let file = dir.join("payload.bin");
    std::fs::write(&file, &payload).unwrap();
    let put = Command::new("curl")
        .args([
            "-sS",
            "-H",
            "Transfer-Encoding: chunked",
            "-T",
            "-",
            &format!("{base}/dav/chunked.bin"),
        ])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let back = Command::new("curl")
        .args(["-sS", &format!("{base}/dav/chunked.bin")])
        .output()
        .unwrap();
    assert_eq!(
        checksum(&back.stdout),
        checksum(&payload),
        "chunked PUT round trip"
    );

    // PUT of a file: curl sends Expect: 100-continue and waits for the 100.
    let (ok, _, err) = curl(&[
        "-v",
        "-T",
        file.to_str().unwrap(),
        &format!("{base}/dav/expect.bin"),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("Expect: 100-continue") && err.contains("HTTP/1.1 100 Continue"),
        "{err}"
    );
    let back = Command::new("curl")
        .args(["-sS", &format!("{base}/dav/expect.bin")])
        .output()
        .unwrap();
    assert_eq!(back.stdout.len(), payload.len());

    // Pipelining (curl no longer pipelines: a raw client does).
    let mut c = Conn::open(addr);
    c.send(b"GET /hello.txt HTTP/1.1\r\nHost: a\r\n\r\nHEAD /hello.txt HTTP/1.1\r\nHost: a\r\n\r\nGET /missing HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(c.read(false).unwrap().text(), "hello from nginx\n");
    assert_eq!(c.read(true).unwrap().status, 200);
    assert_eq!(c.read(false).unwrap().status, 404);

    let _ = std::fs::remove_dir_all(dir);
    proxy.signal(15);
    assert!(proxy
        .wait_exit(Duration::from_secs(15))
        .is_some_and(|s| s.success()));
}

#[test]
fn one_gigabyte_each_way_with_bounded_proxy_memory() {
    if !have("nginx") || !have("curl") {
        return;
    }
    let nginx = Nginx::start();
    let mut proxy = ChildProxy::spawn(&proxy_config(nginx.addr));
    let addr = proxy.wait_ready();
    let pid = proxy.child.id();
    // Download 1 GiB.
    let (ok, size, err) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &format!("http://{addr}/big.bin"),
    ]);
    assert!(ok, "{err}");
    assert_eq!(size, (1u64 << 30).to_string());
    // Upload 1 GiB, chunked from a pipe.
    let upload = Command::new("sh")
        .args(["-c", &format!("head -c 1073741824 /dev/zero | curl -sS --max-time 120 -H 'Transfer-Encoding: chunked' -T - http://{addr}/sink")])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&upload.stdout),
        "sunk\n",
        "{}",
        String::from_utf8_lossy(&upload.stderr)
    );
    let peak = peak_rss_kib(pid);
    // Bodies stream through fixed buffers: the peak stays far below 1 GiB.
    assert!(peak < 64 * 1024, "proxy peak RSS {peak} KiB");
    eprintln!("proxy peak RSS after 2 GiB streamed: {peak} KiB");
    proxy.signal(15);
    assert!(proxy.wait_exit(Duration::from_secs(15)).is_some());
}

/// Issue 11 item 1 (the class of Envoy's CVE-2019-9901): a route that
/// guards `/admin/` must not be bypassed by another spelling of the path
/// that nginx, behind the proxy, resolves to the same file. Every vector
/// either takes the guarded route or is refused with 400 `bad_path`;
/// none reaches nginx's `/admin/secret.txt` through the catch-all.
#[test]
fn path_spellings_cannot_bypass_a_route_to_nginx() {
    if !have("nginx") {
        return;
    }
    let nginx = Nginx::start();
    // The guarded route goes to an upstream that always says 403.
    let guard = support::http_upstream::HttpUpstream::always(403);
    let config = http_config(
        "auto",
        "cluster = \"nginx\"\n[[listeners.routes]]\nname = \"admin\"\npath_prefix = \"/admin/\"\ncluster = \"guard\"",
        &format!(
            "{}{}",
            cluster("nginx", &[nginx.addr], ""),
            cluster("guard", &[guard.addr], "")
        ),
    )
    .replace("name = \"web\"", "name = \"app-out\"");
    let mut proxy = ChildProxy::spawn(&config);
    let addr = proxy.wait_ready();
    // (target, expected): "guard" = the guarded route answered; 400 =
    // refused by the proxy; 200/404 = nginx answered without the secret.
    let vectors: &[(&str, &str)] = &[
        ("/admin/secret.txt", "guard"),
        ("/public/../admin/secret.txt", "guard"),
        ("/public/%2e%2e/admin/secret.txt", "guard"),
        ("/public/%2E%2E/admin/secret.txt", "guard"),
        ("/public/.%2e/admin/secret.txt", "guard"),
        ("/%61dmin/secret.txt", "guard"),
        ("/%61%64%6d%69%6e/secret.txt", "guard"),
        ("//admin/secret.txt", "guard"),
        ("/admin//secret.txt", "guard"),
        ("/./admin/secret.txt", "guard"),
        ("/public/./../admin/./secret.txt", "guard"),
        ("/../admin/secret.txt", "guard"),
        ("/public/..%2fadmin/secret.txt", "400"),
        ("/public/..%2Fadmin/secret.txt", "400"),
        ("/admin%2fsecret.txt", "400"),
        ("/public/..%5cadmin/secret.txt", "400"),
        ("/public/%2e%2e%2fadmin/secret.txt", "400"),
        ("/admin/secret.txt%", "400"),
        ("/admin/%zz", "400"),
        ("/%2561dmin/secret.txt", "404"),
        ("/public/hello.txt", "200"),
        ("/public/./hello.txt", "200"),
        ("/admin/../public/hello.txt", "200"),
        ("/public/hello.txt?a=/../admin/", "200"),
        ("http://localhost/public/../admin/secret.txt", "guard"),
    ];
    for (target, want) in vectors {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let r = one(addr, raw.as_bytes());
        let body = r.text();
        assert!(
            !body.contains("SECRET"),
            "{target}: reached the secret: {body}"
        );
        match *want {
            "guard" => assert_eq!(r.status, 403, "{target}: {body}"),
            "400" => {
                assert_eq!(r.status, 400, "{target}: {body}");
                assert_eq!(r.header("x-pilotfish-error"), Some("bad_path"), "{target}");
            }
            code => assert_eq!(r.status.to_string(), code, "{target}: {body}"),
        }
    }
    proxy.signal(15);
    assert!(proxy.wait_exit(Duration::from_secs(15)).is_some());
}

/// The HTTP/2 listener side with real peers: curl with prior knowledge
/// (h2c) and with ALPN over TLS on the same ports as HTTP/1.1, h2 streams
/// in parallel on one connection each answered with its own body, and
/// h2load with many streams per connection; nginx (HTTP/1.1) behind.
#[test]
fn curl_and_h2load_over_http2_through_pilotfish_to_nginx() {
    if !have("nginx") || !have("curl") || !have("h2load") {
        return;
    }
    let nginx = Nginx::start();
    let data = pattern(7, 4 << 20);
    std::fs::write(nginx.dir.join("www/4m.bin"), &data).unwrap();
    let ca = support::pki::new_ca("curl CA");
    let tls_dir = temp_dir("h2-tls");
    support::pki::leaf(&ca, support::pki::ORDERS, |_| {}).write(&tls_dir, &ca.pem);
    let toml = format!(
        "{}{}[[listeners]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"nginx\"\ntls = {{ require_client_cert = false }}\n",
        proxy_config(nginx.addr),
        support::pki::tls_table(&tls_dir),
    );
    let (proxy, addr) = start_toml(&toml, "app-out");
    let tls = proxy.listener_addr("tls").unwrap();
    let base = format!("http://{addr}");
    let h2c = ["--http2-prior-knowledge", "-w", "\n%{http_version}"];

    let (ok, out, err) = curl(&[&h2c[..], &[&format!("{base}/hello.txt")]].concat());
    assert!(ok, "{err}");
    assert_eq!(out, "hello from nginx\n\n2", "h2c GET");
    let (ok, out, err) = curl(&[&h2c[..], &["-I", &format!("{base}/hello.txt")]].concat());
    assert!(ok && out.starts_with("HTTP/2 200"), "{out}{err}");
    assert!(
        out.contains("content-length: 17"),
        "HEAD keeps the length: {out}"
    );
    let (ok, out, err) = curl(
        &[
            &h2c[..],
            &["--data-binary", "name=value", &format!("{base}/sink")],
        ]
        .concat(),
    );
    assert!(ok && out == "sunk\n\n2", "{out}{err}");
    // An upload without a length (h2 DATA until END_STREAM) goes up
    // chunked, and comes back intact.
    let file = temp_dir("h2-put").join("up.bin");
    std::fs::write(&file, &data[..300_000]).unwrap();
    let put = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cat {} | curl -sS --max-time 60 --http2-prior-knowledge -T - {base}/dav/h2.bin -o /dev/null -w '%{{http_code}}'",
            file.display()
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&put.stdout), "201");
    let back = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            &format!("{base}/dav/h2.bin"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        back.stdout.len(),
        300_000,
        "{}",
        String::from_utf8_lossy(&back.stdout)
    );
    assert!(back.stdout == data[..300_000], "PUT then GET over h2");
    // A 4 MiB body through the windows.
    let big = Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", &format!("{base}/4m.bin")])
        .output()
        .unwrap();
    assert_eq!(big.stdout.len(), data.len());
    assert!(big.stdout == data, "4 MiB over h2 arrives intact");

    // 500 streams on one connection, up to 90 at once: each gets its
    // own answer (curl 7.88's -Z fails with prior knowledge, against any
    // server, so a raw h2 client does this).
    if have_py("h2") {
        let out = Command::new("timeout")
            .args(["60", "python3", H2_RAW, "mux", &addr.to_string(), "500"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.trim(), r#"{"ok": 500, "done": 500}"#, "{text}");
    }

    // TLS: ALPN picks h2 or HTTP/1.1 on the same port.
    let url = format!("https://{tls}/hello.txt");
    let (ok, out, err) = curl(&["-k", "--http2", "-w", "\n%{http_version}", &url]);
    assert!(ok && out == "hello from nginx\n\n2", "{out}{err}");
    let (ok, out, err) = curl(&["-k", "--http1.1", "-w", "\n%{http_version}", &url]);
    assert!(ok && out == "hello from nginx\n\n1.1", "{out}{err}");

    // h2load: many streams per connection, every one answered.
    let load = Command::new("h2load")
        .args([
            "-n",
            "20000",
            "-c",
            "8",
            "-m",
            "32",
            &format!("{base}/hello.txt"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&load.stdout);
    assert!(
        text.contains("20000 succeeded, 0 failed, 0 errored, 0 timeout"),
        "{text}"
    );
    assert!(text.contains("status codes: 20000 2xx"), "{text}");
    let stats = proxy.stats().total.http;
    assert!(stats.h2_connections >= 8 + 2, "{stats:?}");
    assert_eq!(stats.h2_connection_errors, 0, "{stats:?}");
    proxy.shutdown();
}

/// Current resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Each HTTP/2 abuse class from a raw-frame client against the real
/// binary: the connection ends (GOAWAY, or at once after the client
/// stops), the proxy's memory stays bounded, and a well-behaved client
/// served right after is unaffected.
#[test]
fn http2_floods_end_the_connection_and_spare_other_clients() {
    if !have("nginx") || !have_py("h2") {
        return;
    }
    let nginx = Nginx::start();
    let mut proxy = ChildProxy::spawn(&proxy_config(nginx.addr));
    let addr = proxy.wait_ready();
    let pid = proxy.child.id();
    let before = rss_kib(pid);
    for kind in [
        "rapid_reset",
        "continuation",
        "hpack_bomb",
        "empty_data",
        "ping",
        "settings",
        "window_update",
    ] {
        let out = Command::new("timeout")
            .args(["60", "python3", H2_RAW, "flood", &addr.to_string(), kind])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let r: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!(
                "{kind}: {e}: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(r["closed"], true, "{kind}: the connection ends: {r}");
        eprintln!("{kind}: {r}");
        // Frame-level abuse is answered with GOAWAY; control-frame floods
        // (PING, SETTINGS, WINDOW_UPDATE) are answered one at a time at
        // the pace the client reads, so they end when the client stops.
        if ["rapid_reset", "continuation", "hpack_bomb", "empty_data"].contains(&kind) {
            assert_eq!(r["goaway"], "ENHANCE_YOUR_CALM", "{kind}: {r}");
        }
        let ok = Command::new("timeout")
            .args(["30", "python3", H2_RAW, "mux", &addr.to_string(), "50"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&ok.stdout);
        assert_eq!(
            text.trim(),
            r#"{"ok": 50, "done": 50}"#,
            "after {kind}: {text}"
        );
    }
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB over the floods");
    proxy.signal(15);
    proxy.wait_exit(Duration::from_secs(10));
}
