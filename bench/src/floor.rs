//! The do-nothing forwarder: the floor `compare` measures Pilotfish
//! against. Same runtime as a Pilotfish worker (monoio, io_uring with
//! Pilotfish's ring flags, built by `pilotfish::worker::runtime`, epoll
//! where io_uring is unavailable), one thread, one upstream connection per
//! client connection, and then only reads and writes: no parsing, no
//! pooling, no timeouts, no limits, no accounting. Whatever a proxy of
//! this shape must do beyond moving bytes is what Pilotfish costs above
//! this row; the kernel's loopback TCP work, which both pay, is most of it.
//!
//! Not a proxy to deploy: nothing here is bounded (it is a measuring
//! stick, started by `compare` and stopped with it). Nor a floor for a
//! connection per request: it opens an upstream connection per client
//! connection where Pilotfish reuses pooled ones.

use std::net::SocketAddr;

use monoio::{
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable},
    net::{TcpListener, TcpStream},
};
use pilotfish::{
    config::{DriverChoice, UringSetup},
    worker::runtime,
};

/// Bytes read per call in each direction of each connection: Pilotfish's
/// copy buffer size, so bulk transfers take as many calls.
const BUFFER_BYTES: usize = pilotfish::config::limits::COPY_BUFFER_BYTES;

/// Forwards every `(listen, upstream)` pair until killed.
pub fn run(routes: Vec<(SocketAddr, SocketAddr)>) -> anyhow::Result<()> {
    // Pilotfish's default ring flags (`uring_setup = "coop_taskrun"`).
    let setup = UringSetup::CoopTaskrun;
    let out = runtime::block_on(DriverChoice::Auto, setup, |driver| async move {
        let mut accepting = Vec::new();
        for (listen, upstream) in routes {
            let listener = TcpListener::bind(listen)?;
            println!("floor: {listen} -> {upstream} ({driver})");
            accepting.push(monoio::spawn(accept(listener, upstream)));
        }
        for task in accepting {
            task.await;
        }
        Ok::<(), anyhow::Error>(())
    })?;
    out
}

async fn accept(listener: TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        monoio::spawn(async move {
            let Ok(up) = TcpStream::connect_addr(upstream).await else {
                return;
            };
            let _ = (client.set_nodelay(true), up.set_nodelay(true));
            let (client_r, client_w) = client.into_split();
            let (up_r, up_w) = up.into_split();
            monoio::join!(copy(client_r, up_w), copy(up_r, client_w));
        });
    }
}

/// Reads and writes until either side ends, then shuts the writer down.
async fn copy<R: AsyncReadRent, W: AsyncWriteRent>(mut from: R, mut to: W) {
    let mut buf = Vec::with_capacity(BUFFER_BYTES);
    loop {
        let (read, b) = from.read(buf).await;
        buf = b;
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let (written, b) = to.write_all(buf).await;
                buf = b;
                if written.is_err() {
                    break;
                }
                // The next read fills from the start again.
                buf.clear();
            }
        }
    }
    let _ = to.shutdown().await;
}
