//! A TCP echo upstream: a thread per connection, 64 KiB reads, half-close
//! passed on. Simple on purpose: it must never be the bottleneck in the
//! demo's request/response load, and it is not the thing being measured.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener},
    thread,
};

/// Connections the echo upstream serves at once; more wait in the backlog.
const ECHO_CONNECTIONS_MAX: usize = 4096;

/// Starts an echo server on `listen` (port 0 for any); returns its address.
pub fn echo(listen: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)?;
    let addr = listener.local_addr()?;
    let live = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    thread::Builder::new()
        .name("echo-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                if live.load(std::sync::atomic::Ordering::Relaxed) >= ECHO_CONNECTIONS_MAX {
                    continue; // dropped: closed
                }
                let live = live.clone();
                live.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                thread::spawn(move || {
                    let _ = s.set_nodelay(true);
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s.shutdown(Shutdown::Write);
                    live.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                });
            }
        })?;
    Ok(addr)
}

/// The body every demo/bench HTTP request gets.
pub const HTTP_BODY: &[u8] = b"hello world\n";

/// Starts a minimal HTTP/1.1 upstream: every request head (bodies are not
/// expected) gets `200` with [`HTTP_BODY`], keep-alive. Returns its address.
pub fn http(listen: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)?;
    let addr = listener.local_addr()?;
    thread::Builder::new()
        .name("http-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                thread::spawn(move || {
                    let _ = s.set_nodelay(true);
                    let mut response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                        HTTP_BODY.len()
                    )
                    .into_bytes();
                    response.extend_from_slice(HTTP_BODY);
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut have = 0;
                    loop {
                        // Answer every complete head in the buffer (pipelining).
                        while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n")
                        {
                            if s.write_all(&response).is_err() {
                                return;
                            }
                            buf.copy_within(end + 4..have, 0);
                            have -= end + 4;
                        }
                        if have == buf.len() {
                            return; // a head larger than 16 KiB: not ours to serve
                        }
                        match s.read(&mut buf[have..]) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => have += n,
                        }
                    }
                });
            }
        })?;
    Ok(addr)
}
