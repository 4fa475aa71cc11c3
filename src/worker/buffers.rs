//! A worker's pool of copy buffers, reused across connections.
//!
//! What must hold: every buffer handed out has capacity
//! [`COPY_BUFFER_BYTES`]; at most [`COPY_BUFFER_POOL_MAX`] idle buffers are
//! kept, so a burst of connections does not pin memory forever.

use std::cell::RefCell;

use crate::config::limits::{COPY_BUFFER_BYTES, COPY_BUFFER_POOL_MAX};

#[derive(Debug, Default)]
pub struct BufferPool {
    idle: RefCell<Vec<Vec<u8>>>,
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

    pub fn idle_count(&self) -> usize {
        self.idle.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
