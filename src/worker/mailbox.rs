//! A worker's mailbox: control messages from other threads, and the bell
//! that wakes the worker to read them.
//!
//! What must hold: an idle worker sleeps until it has something to do (no
//! polling: a sidecar on every pod must cost nothing while no traffic
//! flows); a message is seen at once; no wake is lost, because a sender
//! queues its message before it rings, and the worker empties the queue
//! after every wake; the queue is bounded ([`MAILBOX_CAPACITY`]) and
//! ringing never blocks (the bell is a non-blocking socket pair: when its
//! buffer is full, a wake is already pending).

use std::{
    io::{self, Write},
    os::unix::net::UnixStream,
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};
use monoio::io::{AsyncReadRent, CancelableAsyncReadRent, Canceller};

use super::Command;
use crate::config::limits::{MAILBOX_CAPACITY, MAILBOX_POLL_INTERVAL};

/// Rings a worker's mailbox loop awake: one byte on a socket pair whose
/// other end the worker reads.
#[derive(Debug)]
pub struct Bell {
    tx: UnixStream,
}

impl Bell {
    /// A bell and the end the worker reads (non-blocking both).
    pub fn pair() -> io::Result<(Bell, UnixStream)> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok((Bell { tx }, rx))
    }

    /// Wakes the worker. A full socket means a wake is already pending,
    /// and a closed one that the worker is gone: neither is an error here.
    pub fn ring(&self) {
        let _ = (&self.tx).write(&[1]);
    }
}

/// The sending side of a worker's mailbox (cloned for each thread that
/// talks to the worker). Each message sent rings the bell.
#[derive(Debug, Clone)]
pub struct Mailbox {
    tx: Sender<Command>,
    bell: Arc<Bell>,
}

impl Mailbox {
    /// A mailbox ringing `bell`, and the queue the worker reads.
    pub fn new(bell: Arc<Bell>) -> (Mailbox, Receiver<Command>) {
        let (tx, rx) = crossbeam_channel::bounded(MAILBOX_CAPACITY);
        (Mailbox { tx, bell }, rx)
    }

    pub fn try_send(&self, command: Command) -> Result<(), TrySendError<Command>> {
        self.tx.try_send(command)?;
        self.bell.ring();
        Ok(())
    }

    /// Waits up to `timeout` for room in a full mailbox.
    pub fn send_timeout(
        &self,
        command: Command,
        timeout: Duration,
    ) -> Result<(), SendTimeoutError<Command>> {
        self.send_deadline(command, Instant::now() + timeout)
    }

    /// Waits until `deadline` for room in a full mailbox.
    pub fn send_deadline(
        &self,
        command: Command,
        deadline: Instant,
    ) -> Result<(), SendTimeoutError<Command>> {
        let command = match self.try_send(command) {
            Err(TrySendError::Full(command)) => command,
            Err(TrySendError::Disconnected(command)) => {
                return Err(SendTimeoutError::Disconnected(command))
            }
            Ok(()) => return Ok(()),
        };
        // Full: the worker makes room only as it reads, so make sure it
        // is awake, then wait for room.
        self.bell.ring();
        self.tx.send_deadline(command, deadline)?;
        self.bell.ring();
        Ok(())
    }
}

/// Bytes read off the bell per wake: rings that piled up are taken in one
/// read (each says only "look at the queue").
const BELL_READ_BYTES: usize = 64;

/// Sleeps until the bell rings or `wait` passes; reads the rings off.
/// On io_uring (`uring`), a read the timeout interrupts is cancelled and
/// then awaited, so a ring that raced the timeout is taken here, not by an
/// orphaned read that would leave the next wait asleep with a message
/// queued; on epoll a read happens only when polled, so dropping it took
/// nothing. A bell that fails (it cannot be closed while the worker holds
/// its lifeline) is given up for plain polling every `wait`, logged.
pub(super) async fn wait_for_bell(
    bell: &mut Option<monoio::net::UnixStream>,
    buf: &mut Vec<u8>,
    wait: Duration,
    uring: bool,
) {
    let Some(rx) = bell.as_mut() else {
        monoio::time::sleep(wait.min(MAILBOX_POLL_INTERVAL)).await;
        return;
    };
    if buf.capacity() < BELL_READ_BYTES {
        *buf = Vec::with_capacity(BELL_READ_BYTES);
    }
    buf.clear();
    let read = if uring {
        let canceller = Canceller::new();
        let read = rx.cancelable_read(std::mem::take(buf), canceller.handle());
        let mut read = std::pin::pin!(read);
        match monoio::time::timeout(wait, read.as_mut()).await {
            Ok(done) => done,
            Err(_) => {
                canceller.cancel();
                read.await
            }
        }
    } else {
        match monoio::time::timeout(wait, rx.read(std::mem::take(buf))).await {
            Ok(done) => done,
            Err(_) => return,
        }
    };
    let (result, back) = read;
    *buf = back;
    match result {
        Ok(n) if n > 0 => {}
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::CANCELED.raw_os_error()) => {}
        other => {
            tracing::warn!(result = ?other, "mailbox bell failed: polling the mailbox instead");
            *bell = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// Every send rings, a full bell neither blocks nor fails the send,
    /// and the bell's socket holds at most what its buffer takes.
    #[test]
    fn sends_ring_and_a_full_bell_does_not_block() {
        let (bell, mut rx) = Bell::pair().unwrap();
        let (mailbox, inbox) = Mailbox::new(Arc::new(bell));
        let mut buf = [0u8; 64];
        assert_eq!(
            rx.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "silent before a send"
        );
        mailbox.try_send(Command::Drain).unwrap();
        assert!(rx.read(&mut buf).unwrap() >= 1, "a send rang");
        assert!(matches!(inbox.try_recv(), Ok(Command::Drain)));
        // Ring far past the socket's buffer: never blocks.
        for _ in 0..1_000_000 {
            mailbox.bell.ring();
        }
        assert!(rx.read(&mut buf).unwrap() > 0);
        // The queue is bounded whatever the bell does.
        for _ in 0..MAILBOX_CAPACITY {
            mailbox.try_send(Command::Drain).unwrap();
        }
        assert!(matches!(
            mailbox.try_send(Command::Drain),
            Err(TrySendError::Full(_))
        ));
        assert!(mailbox
            .send_timeout(Command::Drain, Duration::from_millis(10))
            .is_err());
        // Room made while a sender waits: the send goes through, rung.
        while rx.read(&mut buf).is_ok() {}
        // A plain thread (not a worker), so it may block and sleep.
        #[allow(clippy::disallowed_methods)]
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            inbox.recv().unwrap();
            inbox
        });
        mailbox
            .send_timeout(Command::Stop, Duration::from_secs(10))
            .unwrap();
        assert!(rx.read(&mut buf).unwrap() >= 1, "a waiting send rang");
        let inbox = reader.join().unwrap();
        assert_eq!(inbox.len(), MAILBOX_CAPACITY);
    }
}
