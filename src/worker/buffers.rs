//! A worker's pool of copy buffers, reused across connections.
//!
//! Also the timers that bound an upstream response's reads, which go with
//! those buffers ([`crate::http::inbound::within`]).
//!
//! What must hold: every buffer handed out has capacity
//! [`COPY_BUFFER_BYTES`]; at most [`COPY_BUFFER_POOL_MAX`] idle buffers
//! (and as many timers) are kept, so a burst of connections does not pin
//! memory forever.

use std::{cell::RefCell, future::Future, pin::Pin};

use crate::{
    config::limits::{COPY_BUFFER_BYTES, COPY_BUFFER_POOL_MAX},
    http::inbound::Inbound,
    http1::head::Spare,
};

#[derive(Debug, Default)]
pub struct BufferPool {
    idle: RefCell<Vec<Vec<u8>>>,
    /// Timers of read buffers given back: an upstream exchange borrows a
    /// buffer for one response, and making its timer anew each time would
    /// cost an allocation and a wheel insert and removal per request.
    timers: RefCell<Vec<Pin<Box<monoio::time::Sleep>>>>,
}

impl BufferPool {
    /// An empty buffer with [`COPY_BUFFER_BYTES`] of capacity.
    pub fn take(&self) -> Vec<u8> {
        self.idle
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(COPY_BUFFER_BYTES))
    }

    /// Returns a buffer for reuse (dropped if the pool is full).
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() != COPY_BUFFER_BYTES {
            return;
        }
        buf.clear();
        let mut idle = self.idle.borrow_mut();
        if idle.len() < COPY_BUFFER_POOL_MAX {
            idle.push(buf);
        }
    }

    /// A read buffer from the pool, with a pooled timer if there is one.
    pub fn take_inbound(&self) -> Inbound {
        Inbound::with_timer(self.take(), self.timers.borrow_mut().pop())
    }

    /// Returns a read buffer and its timer for reuse.
    pub fn give_inbound(&self, inbound: Inbound) {
        let (buf, timer) = inbound.into_parts();
        self.give(buf);
        let mut timers = self.timers.borrow_mut();
        if let Some(mut t) = timer.filter(|_| timers.len() < COPY_BUFFER_POOL_MAX) {
            // A timer keeps the waker it was last polled with, and a waker
            // keeps its task's allocation: polled once with a waker that
            // does nothing, the pooled timer pins no finished task.
            let _ = t
                .as_mut()
                .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
            timers.push(t);
        }
    }

    pub fn idle_count(&self) -> usize {
        self.idle.borrow().len()
    }
}

/// Bytes a head buffer starts with: a typical response or request head.
pub const HEAD_BUFFER_BYTES: usize = 1024;
/// Idle head buffers a worker keeps: enough for the heads being written at
/// once on a busy core; a burst beyond this allocates and frees.
pub const HEAD_BUFFER_POOL_MAX: usize = 256;
/// A head buffer that grew past this (a huge head) is freed, not pooled.
pub const HEAD_BUFFER_KEEP_MAX: usize = 64 * 1024;

/// A worker's small buffers for writing heads, lent per write: a
/// connection holds one only while it writes, so 10k idle keep-alive
/// connections hold none.
#[derive(Debug, Default)]
pub struct HeadBuffers {
    idle: RefCell<Vec<Vec<u8>>>,
    /// Buffers of parsed response heads, lent per exchange: parsing into
    /// them saves two allocations and two frees per response.
    parsed: RefCell<Vec<Spare>>,
}

/// Idle parsed-head buffers a worker keeps (each at most a few KiB, see
/// [`crate::http1::head::Head::into_spare`]): as many as exchanges run at once on a busy core.
pub const PARSED_HEAD_POOL_MAX: usize = 256;

impl HeadBuffers {
    /// An empty buffer.
    pub fn take(&self) -> Vec<u8> {
        self.idle
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(HEAD_BUFFER_BYTES))
    }

    /// Returns a buffer (dropped if the pool is full, or it is empty or
    /// oversized).
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() < HEAD_BUFFER_BYTES || buf.capacity() > HEAD_BUFFER_KEEP_MAX {
            return;
        }
        buf.clear();
        let mut idle = self.idle.borrow_mut();
        if idle.len() < HEAD_BUFFER_POOL_MAX {
            idle.push(buf);
        }
    }

    /// Empty buffers to parse a head into (none if the pool is empty).
    pub fn take_parsed(&self) -> Spare {
        self.parsed.borrow_mut().pop().unwrap_or_default()
    }

    /// Returns a parser's spare buffers (a spare is bounded already; one
    /// that holds none, or one past a full pool, is dropped).
    pub fn give_parsed(&self, spare: Spare) {
        let mut parsed = self.parsed.borrow_mut();
        if parsed.len() < PARSED_HEAD_POOL_MAX && spare.holds_buffers() {
            parsed.push(spare);
        }
    }
}

/// A request parser whose spare head goes back to the worker's pool when
/// it is dropped, wherever its connection's burst of requests ends.
pub struct PooledParser<'a> {
    parser: crate::http1::RequestParser,
    heads: &'a HeadBuffers,
}

impl<'a> PooledParser<'a> {
    pub fn new(limits: crate::http1::HeadLimits, heads: &'a HeadBuffers) -> Self {
        let mut parser = crate::http1::RequestParser::new(limits);
        parser.spare = heads.take_parsed();
        Self { parser, heads }
    }
}

impl std::ops::Deref for PooledParser<'_> {
    type Target = crate::http1::RequestParser;
    fn deref(&self) -> &Self::Target {
        &self.parser
    }
}

impl std::ops::DerefMut for PooledParser<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.parser
    }
}

impl Drop for PooledParser<'_> {
    fn drop(&mut self) {
        self.heads
            .give_parsed(std::mem::take(&mut self.parser.spare));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_buffers_are_lent_and_bounded() {
        let pool = HeadBuffers::default();
        let mut a = pool.take();
        a.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take();
        assert!(b.is_empty() && b.as_ptr() == ptr, "cleared and reused");
        pool.give(Vec::with_capacity(HEAD_BUFFER_KEEP_MAX + 1));
        pool.give(Vec::new());
        assert_eq!(
            pool.idle.borrow().len(),
            0,
            "oversized and empty are not pooled"
        );
    }

    #[test]
    fn reuses_and_bounds() {
        let pool = BufferPool::default();
        let a = pool.take();
        let ptr = a.as_ptr();
        pool.give(a);
        let again = pool.take();
        assert_eq!(again.as_ptr(), ptr, "a returned buffer is reused");
        for _ in 0..COPY_BUFFER_POOL_MAX + 10 {
            pool.give(Vec::with_capacity(COPY_BUFFER_BYTES));
        }
        assert_eq!(pool.idle_count(), COPY_BUFFER_POOL_MAX);
        pool.give(Vec::with_capacity(10));
        assert_eq!(
            pool.idle_count(),
            COPY_BUFFER_POOL_MAX,
            "odd sizes are not pooled"
        );
    }
}
