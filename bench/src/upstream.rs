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
