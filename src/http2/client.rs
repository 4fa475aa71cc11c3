//! HTTP/2 towards an endpoint: a few multiplexed connections per
//! endpoint per worker, each driven by its own task.
//!
//! What must hold: a request takes a stream on a connection that has a
//! free slot under the peer's `MAX_CONCURRENT_STREAMS`; a second
//! connection is opened only when every one is full, and never more than
//! [`CONNECTIONS_PER_ENDPOINT_MAX`]; past that, requests queue inside h2
//! on the least loaded one (bounded by the cluster's breakers and the
//! request timeout). A connection that failed or got GOAWAY is dropped
//! from the set at the next checkout; one idle past the pool's idle
//! timeout is closed by dropping its handle (h2 then ends it).

use std::{
    cell::{Cell, RefCell},
    rc::Rc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;

use super::io::PollIo;
use crate::{tls::stream::Stream, worker::gate::Trigger};

/// Connections per endpoint per worker. One carries up to the peer's
/// stream limit (100 for most servers, [`super::MAX_CONCURRENT_STREAMS`]
/// for Pilotfish); more are opened only when it is full. Bounded so that a
/// burst cannot open a connection per request.
pub const CONNECTIONS_PER_ENDPOINT_MAX: usize = 4;

/// One h2 connection: the handle that opens streams, how many this worker
/// has open on it, whether its driver task ended.
#[derive(Debug)]
struct Conn {
    send: SendRequest<Bytes>,
    streams: Rc<Cell<usize>>,
    closed: Rc<Cell<bool>>,
    idle_since: Cell<Instant>,
}

/// An endpoint's h2 connections on one worker.
#[derive(Debug, Default)]
pub struct H2Conns {
    conns: RefCell<Vec<Conn>>,
    /// A connect in flight: fired when it ends (either way). Requests that
    /// find no free stream wait for it instead of each opening their own
    /// (a burst at start would otherwise open a connection per request).
    connecting: RefCell<Option<Trigger>>,
}

/// Held by the task that connects; wakes the waiters when dropped.
#[derive(Debug)]
pub struct Connecting<'a> {
    conns: &'a H2Conns,
    done: Trigger,
}

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        self.done.fire();
        *self.conns.connecting.borrow_mut() = None;
    }
}

/// A stream slot on a connection: released when dropped.
#[derive(Debug)]
pub struct Lease {
    pub send: SendRequest<Bytes>,
    streams: Rc<Cell<usize>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.streams.set(self.streams.get().saturating_sub(1));
    }
}

impl H2Conns {
    /// A stream slot on a live connection with room, else (when the set
    /// is at its cap) on the least loaded one; None: connect a new one.
    pub fn checkout(&self) -> Option<Lease> {
        let mut conns = self.conns.borrow_mut();
        conns.retain(|c| !c.closed.get());
        let free = conns
            .iter()
            .find(|c| c.streams.get() < c.send.current_max_send_streams().max(1));
        let pick = match free {
            Some(c) => c,
            None if conns.len() < CONNECTIONS_PER_ENDPOINT_MAX => return None,
            None => conns.iter().min_by_key(|c| c.streams.get())?,
        };
        Some(Self::lease(pick))
    }

    /// A connect in flight to wait for, if any.
    pub fn in_flight(&self) -> Option<Trigger> {
        self.connecting.borrow().clone()
    }

    /// Marks a connect in flight until the guard is dropped.
    pub fn start_connect(&self) -> Connecting<'_> {
        let done = Trigger::default();
        *self.connecting.borrow_mut() = Some(done.clone());
        Connecting { conns: self, done }
    }

    fn lease(c: &Conn) -> Lease {
        c.streams.set(c.streams.get() + 1);
        c.idle_since.set(Instant::now());
        Lease {
            send: c.send.clone(),
            streams: Rc::clone(&c.streams),
        }
    }

    /// Adds a new connection (driven by a task spawned here) and leases a
    /// stream on it.
    pub fn add(&self, send: SendRequest<Bytes>, closed: Rc<Cell<bool>>) -> Lease {
        let conn = Conn {
            send,
            streams: Rc::new(Cell::new(0)),
            closed,
            idle_since: Cell::new(Instant::now()),
        };
        let lease = Self::lease(&conn);
        self.conns.borrow_mut().push(conn);
        lease
    }

    /// Closes connections with no stream that idled past `timeout`.
    pub fn expire(&self, now: Instant, timeout: Duration) {
        self.conns.borrow_mut().retain(|c| {
            !c.closed.get()
                && (c.streams.get() > 0 || now.duration_since(c.idle_since.get()) < timeout)
        });
    }

    pub fn len(&self) -> usize {
        self.conns.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs the HTTP/2 handshake on `stream` and spawns the task that drives
/// the connection; the flag it returns turns true when that task ends.
pub async fn handshake(
    stream: Stream,
    settings: &crate::config::http::H2Settings,
    token: crate::upstream::ConnToken,
) -> Result<(SendRequest<Bytes>, Rc<Cell<bool>>), h2::Error> {
    let io = PollIo::new(stream, Vec::new());
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_header_list_size(super::HEADER_LIST_BYTES_MAX)
        .max_send_buffer_size(super::SEND_BUFFER_BYTES_MAX)
        .enable_push(false);
    let (send, conn) = builder.handshake::<_, Bytes>(io).await?;
    let closed = Rc::new(Cell::new(false));
    let done = Rc::clone(&closed);
    monoio::spawn(async move {
        // Counted open in its cluster until the connection ends.
        let _token = token;
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream h2 connection ended");
        }
        done.set(true);
    });
    Ok((send, closed))
}
