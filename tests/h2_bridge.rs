//! The h2 bridge (`pilotfish::http2::io::PollIo`) under the upstream `h2`
//! crate, on both drivers, over real loopback sockets: an h2 server and an
//! h2 client, each on its own monoio runtime and thread, multiplex many
//! streams with bodies large enough to need flow control, and every
//! response is checked byte for byte against its request.

mod support;

use std::time::Duration;

use bytes::Bytes;
use pilotfish::{
    config::{DriverChoice, UringSetup},
    http2::io::PollIo,
    worker::runtime::block_on,
};

/// Streams opened at once on the one client connection.
const STREAMS: usize = 64;

fn driver_choice(name: &str) -> DriverChoice {
    match name {
        "epoll" => DriverChoice::Epoll,
        _ => DriverChoice::IoUring,
    }
}

/// The body stream `i` sends: sizes from empty to 256 KiB, so some exceed
/// the 64 KiB default windows and need WINDOW_UPDATEs both ways.
fn body_of(i: usize) -> Vec<u8> {
    let len = match i % 4 {
        0 => 0,
        1 => 100,
        2 => 70_000,
        _ => 256 * 1024,
    };
    support::pattern(i as u64, len)
}

/// Reads a whole body, releasing flow-control capacity as it goes.
async fn read_body(mut body: h2::RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        out.extend_from_slice(&chunk);
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(out)
}

/// Sends `data` on `stream` in pieces, waiting for window capacity.
async fn send_body(stream: &mut h2::SendStream<Bytes>, data: Vec<u8>) -> Result<(), h2::Error> {
    let mut data = Bytes::from(data);
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let granted = std::future::poll_fn(|cx| stream.poll_capacity(cx))
            .await
            .expect("stream open")?;
        let piece = data.split_to(granted.min(data.len()));
        stream.send_data(piece, false)?;
    }
    stream.send_data(Bytes::new(), true)
}

/// Echo server: each stream gets back its body, with the path in a header.
async fn serve(listener: monoio::net::TcpListener) {
    let (tcp, _) = listener.accept().await.unwrap();
    let mut conn = h2::server::handshake(PollIo::new(tcp, Vec::new()))
        .await
        .unwrap();
    while let Some(accepted) = conn.accept().await {
        // An I/O error once the client has gone (seen on io_uring: a
        // write or shutdown racing the peer's close) ends the connection;
        // the client checks every stream byte for byte.
        let Ok((req, mut respond)) = accepted else {
            break;
        };
        monoio::spawn(async move {
            let path = req.uri().path().to_string();
            let body = read_body(req.into_body()).await.unwrap();
            let resp = http::Response::builder()
                .status(200)
                .header("x-path", path)
                .body(())
                .unwrap();
            let mut send = respond.send_response(resp, false).unwrap();
            send_body(&mut send, body).await.unwrap();
        });
    }
}

async fn client(addr: std::net::SocketAddr) {
    let tcp = monoio::net::TcpStream::connect_addr(addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(PollIo::new(tcp, Vec::new()))
        .await
        .unwrap();
    // Resolves once every handle is dropped and every stream is done,
    // after a GOAWAY: the clean end the server waits for.
    let driver = monoio::spawn(conn);
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let mut h2 = h2.clone();
        tasks.push(monoio::spawn(async move {
            std::future::poll_fn(|cx| h2.poll_ready(cx)).await.unwrap();
            let req = http::Request::builder()
                .method("POST")
                .uri(format!("http://test/stream/{i}"))
                .body(())
                .unwrap();
            let (resp, mut send) = h2.send_request(req, false).unwrap();
            send_body(&mut send, body_of(i)).await.unwrap();
            let resp = resp.await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["x-path"], format!("/stream/{i}").as_str());
            let got = read_body(resp.into_body()).await.unwrap();
            assert_eq!(
                support::checksum(&got),
                support::checksum(&body_of(i)),
                "stream {i}: {} bytes back",
                got.len()
            );
        }));
    }
    for t in tasks {
        t.await;
    }
    drop(h2);
    driver.await.unwrap();
}

#[test]
fn h2_multiplexes_streams_with_flow_control_over_the_bridge() {
    for driver in support::drivers() {
        let choice = driver_choice(driver);
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std_listener.local_addr().unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let server = std::thread::spawn(move || {
            block_on(choice, UringSetup::CoopTaskrun, |_| async move {
                let listener = monoio::net::TcpListener::from_std(std_listener).unwrap();
                serve(listener).await;
            })
            .unwrap();
        });
        let (done_tx, done) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            block_on(choice, UringSetup::CoopTaskrun, |_| client(addr)).unwrap();
            let _ = done_tx.send(());
        });
        done.recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{driver}: the streams did not finish"));
        // The client closed cleanly: the server's connection ends too.
        let (ended_tx, ended) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = ended_tx.send(server.join().is_ok());
        });
        assert_eq!(
            ended.recv_timeout(Duration::from_secs(20)),
            Ok(true),
            "{driver}: the server saw the end of the connection"
        );
    }
}
