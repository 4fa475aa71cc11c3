//! L4 proxying end to end: real sockets on 127.0.0.1, the proxy in-process,
//! every test under both the epoll and the io_uring driver.

mod support;

use std::{
    io::{Read, Write},
    net::Shutdown,
    thread,
    time::{Duration, Instant},
};

use support::*;

#[test]
fn echo_through_the_proxy_with_one_and_two_workers_many_connections() {
    let upstream = echo_server();
    for driver in drivers() {
        for workers in [1, 2] {
            let mut cfg = L4Config::new(driver, vec![upstream]);
            cfg.workers = workers;
            let (proxy, addr) = cfg.start();
            let clients: Vec<_> = (0..64u64)
                .map(|i| {
                    thread::spawn(move || {
                        let data = pattern(i, 1000 + (i as usize) * 997);
                        let back = echo_round_trip(addr, &data);
                        assert_eq!(back.len(), data.len(), "client {i}: length");
                        assert!(back == data, "client {i}: bytes differ");
                    })
                })
                .collect();
            for c in clients {
                c.join().expect("client thread");
            }
            let stats = proxy.stats();
            assert_eq!(stats.workers.len(), workers);
            assert_eq!(stats.total.connections_accepted, 64, "{driver} x{workers}");
            let expected: u64 = (0..64u64).map(|i| 1000 + i * 997).sum();
            eventually("byte counters settle", || {
                let t = proxy.stats().total;
                t.bytes_downstream_to_upstream == expected
                    && t.bytes_upstream_to_downstream == expected
                    && t.connections_active == 0
            });
            for w in &stats.workers {
                assert_eq!(w.driver.to_string(), driver, "worker reports its driver");
            }
            assert_eq!(stats.total.task_panics, 0);
            proxy.shutdown();
        }
    }
}

#[test]
fn ten_megabytes_each_way_intact_with_buffered_copy_and_splice() {
    let upstream = echo_server();
    let data = pattern(42, 10 * 1024 * 1024);
    let sum = checksum(&data);
    for driver in drivers() {
        for copy in ["buffered", "splice", "splice_io_uring", "auto"] {
            let mut cfg = L4Config::new(driver, vec![upstream]);
            cfg.copy = copy;
            let (proxy, addr) = cfg.start();
            let back = echo_round_trip(addr, &data);
            assert_eq!(back.len(), data.len(), "{driver}/{copy}: length");
            assert_eq!(checksum(&back), sum, "{driver}/{copy}: checksum");
            eventually("counters see every byte", || {
                let t = proxy.stats().total;
                t.bytes_downstream_to_upstream == data.len() as u64
                    && t.bytes_upstream_to_downstream == data.len() as u64
            });
            proxy.shutdown();
        }
    }
}

/// Client sends FIN first: the upstream sees EOF, and its reply written
/// after that still reaches the client.
#[test]
fn half_close_from_the_client_side_keeps_the_reply_flowing() {
    let upstream = serve(|mut s| {
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        let reply = format!("got {} bytes after your FIN", got.len());
        s.write_all(reply.as_bytes()).unwrap();
    });
    for driver in drivers() {
        for copy in ["buffered", "splice", "splice_io_uring"] {
            let (proxy, addr) = L4Config {
                copy,
                ..L4Config::new(driver, vec![upstream])
            }
            .start();
            let mut c = connect(addr);
            c.write_all(b"hello").unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut reply = String::new();
            c.read_to_string(&mut reply).unwrap();
            assert_eq!(reply, "got 5 bytes after your FIN", "{driver}/{copy}");
            proxy.shutdown();
        }
    }
}

/// Upstream sends FIN first: the client sees EOF, and what it sends after
/// that still reaches the upstream.
#[test]
fn half_close_from_the_upstream_side_keeps_the_request_flowing() {
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let upstream = serve(move |mut s| {
        s.write_all(b"banner").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        seen_tx.send(got).unwrap();
    });
    for driver in drivers() {
        for copy in ["buffered", "splice", "splice_io_uring"] {
            let (proxy, addr) = L4Config {
                copy,
                ..L4Config::new(driver, vec![upstream])
            }
            .start();
            let mut c = connect(addr);
            let mut banner = Vec::new();
            c.read_to_end(&mut banner).unwrap();
            assert_eq!(
                banner, b"banner",
                "{driver}/{copy}: EOF arrives after the banner"
            );
            c.write_all(b"late request").unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let got = seen_rx.recv_timeout(IO_DEADLINE).unwrap();
            assert_eq!(got, b"late request", "{driver}/{copy}");
            proxy.shutdown();
        }
    }
}

#[test]
fn refused_endpoint_is_skipped_and_counted() {
    let live = echo_server();
    let dead = closed_port();
    for driver in drivers() {
        let mut cfg = L4Config::new(driver, vec![dead, live]);
        cfg.connect_attempts = 2;
        let (proxy, addr) = cfg.start();
        for i in 0..10u64 {
            let data = pattern(i, 100);
            assert_eq!(echo_round_trip(addr, &data), data, "{driver}: request {i}");
        }
        let t = proxy.stats().total;
        // Round robin alternates, so about half the connections tried `dead` first.
        assert!(t.connect_failures >= 4, "{driver}: {t:?}");
        assert_eq!(t.connections_unrouted, 0, "{driver}");
        proxy.shutdown();
    }
}

#[test]
fn all_endpoints_refusing_closes_the_client_promptly() {
    let dead = [closed_port(), closed_port()];
    for driver in drivers() {
        let (proxy, addr) = L4Config::new(driver, dead.to_vec()).start();
        let mut c = connect(addr);
        let mut buf = [0u8; 16];
        // Closed without a byte: EOF (0) or a reset, never data, never a hang.
        match c.read(&mut buf) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("{driver}: got {n} bytes from nowhere"),
        }
        let t = proxy.stats().total;
        assert_eq!(
            t.connect_failures, 3,
            "{driver}: three attempts, all refused"
        );
        assert_eq!(t.connections_unrouted, 1, "{driver}");
        proxy.shutdown();
    }
}

/// A cluster with no endpoints (a control plane scaled it to zero): each
/// client is closed at once, counted, and the worker goes on serving.
#[test]
fn a_cluster_without_endpoints_closes_each_client() {
    for driver in drivers() {
        let (proxy, addr) = L4Config::new(driver, Vec::new()).start();
        for _ in 0..3 {
            let mut c = connect(addr);
            let mut buf = [0u8; 16];
            match c.read(&mut buf) {
                Ok(0) | Err(_) => {}
                Ok(n) => panic!("{driver}: got {n} bytes from nowhere"),
            }
        }
        let t = proxy.stats().total;
        assert_eq!(t.connect_failures, 3, "{driver}: one per client");
        assert_eq!(t.connections_unrouted, 3, "{driver}");
        proxy.shutdown();
    }
}

/// An endpoint whose accept queue is full drops SYNs: connects time out.
#[test]
fn connect_timeout_closes_the_client_within_the_attempts_budget() {
    let hole = blackhole();
    let target = hole.addr;
    for driver in drivers() {
        let mut cfg = L4Config::new(driver, vec![target]);
        cfg.connect_timeout = "200ms";
        cfg.connect_attempts = 2;
        let (proxy, addr) = cfg.start();
        let started = Instant::now();
        let mut c = connect(addr);
        let mut buf = [0u8; 16];
        // EINTR is not the proxy closing (seen here: a blocking read with
        // a timeout woken without a signal); read again.
        let r = loop {
            match c.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        assert!(matches!(r, Ok(0) | Err(_)), "{driver}: {r:?}");
        let waited = started.elapsed();
        // A liveness bound, not a benchmark: two 200 ms attempts, then close.
        assert!(
            waited < Duration::from_secs(5),
            "{driver}: client waited {waited:?}"
        );
        let t = proxy.stats().total;
        assert_eq!(t.connect_timeouts, 2, "{driver}: {t:?}");
        assert_eq!(t.connections_unrouted, 1, "{driver}");
        proxy.shutdown();
    }
}

#[test]
fn idle_timeout_closes_an_idle_pair() {
    let (closed_tx, closed_rx) = std::sync::mpsc::channel();
    let upstream = serve(move |mut s| {
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        s.write_all(&buf[..n]).unwrap();
        // Then idle; the proxy must close us.
        let rest = s.read(&mut buf);
        closed_tx.send(matches!(rest, Ok(0) | Err(_))).unwrap();
    });
    for driver in drivers() {
        let mut cfg = L4Config::new(driver, vec![upstream]);
        cfg.idle_timeout = "200ms";
        let (proxy, addr) = cfg.start();
        let mut c = connect(addr);
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        let mut rest = [0u8; 1];
        assert!(
            matches!(c.read(&mut rest), Ok(0) | Err(_)),
            "{driver}: client side closed"
        );
        assert!(
            closed_rx.recv_timeout(IO_DEADLINE).unwrap(),
            "{driver}: upstream side closed"
        );
        assert_eq!(proxy.stats().total.idle_timeouts, 1, "{driver}");
        proxy.shutdown();
    }
}

#[test]
fn drain_stops_accepting_but_lets_open_connections_finish() {
    let upstream = echo_server();
    for driver in drivers() {
        let (proxy, addr) = L4Config::new(driver, vec![upstream]).start();
        let mut open = connect(addr);
        open.write_all(b"before").unwrap();
        let mut buf = [0u8; 6];
        open.read_exact(&mut buf).unwrap();
        proxy.drain();
        eventually("listener closed", || {
            std::net::TcpStream::connect(addr).is_err()
        });
        open.write_all(b"after!").unwrap();
        open.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"after!", "{driver}: the open connection still works");
        drop(open);
        let exited = proxy.exited();
        assert!(
            exited.recv_timeout(IO_DEADLINE).is_err(),
            "{driver}: workers exit once the last connection closes"
        );
        proxy.join();
    }
}

/// Keeps the blackhole helper honest: a bound, never-accepting listener.
#[test]
fn closed_port_refuses() {
    let addr = closed_port();
    assert!(std::net::TcpStream::connect(addr).is_err());
}
