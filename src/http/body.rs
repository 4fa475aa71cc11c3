//! Moving a message body from one connection to the other, re-framed.
//!
//! Content-Length bodies are written straight from the read buffer (no
//! copy). Chunked bodies are decoded strictly and re-encoded (one copy, to
//! drop the peer's framing bytes). Close-delimited response bodies are
//! re-chunked for HTTP/1.1 clients so their connection can stay open.
//!
//! What must hold: memory per body is the two connection buffers whatever
//! the body size; every error names the side that caused it.

use std::{io, time::Duration};

use monoio::io::{AsyncReadRent, AsyncWriteRent};

use super::inbound::{write_all_timed, Inbound};
use crate::http1::chunked::{write_chunk_size, ChunkError, ChunkedDecoder, CHUNK_END, LAST_CHUNK};

/// Which peer a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
}

#[derive(Debug)]
pub enum BodyError {
    /// Reading from or writing to `side` failed (reset, timeout).
    Io(Side, io::Error),
    /// `side` closed before the body was complete.
    Truncated(Side),
    /// `side` sent bad chunked framing.
    Framing(Side, ChunkError),
    /// The request body passed the listener's limit.
    TooLarge,
}

impl BodyError {
    pub fn side(&self) -> Side {
        match self {
            BodyError::Io(s, _) | BodyError::Truncated(s) | BodyError::Framing(s, _) => *s,
            BodyError::TooLarge => Side::Downstream,
        }
    }
}

/// A request body slower than this on average (bytes per second), once
/// [`BODY_RATE_GRACE`] has passed, is cut: the idle timeout between reads
/// alone would let a client trickle a byte per interval for ever and hold
/// a connection (and an upstream one) with almost no traffic. 1 KiB/s is
/// far below any real peer of a sidecar. Response bodies are bounded by the
/// idle timeout only: a slow stream (server-sent events, long polls) is
/// slow by design.
pub const BODY_MIN_BYTES_PER_SEC: u64 = 1024;
/// How long a body may be slow before the minimum rate applies (a peer
/// may pause while it prepares the rest).
pub const BODY_RATE_GRACE: Duration = Duration::from_secs(10);

/// The average rate of one body so far.
#[derive(Debug, Default)]
pub struct Pace {
    started: Option<std::time::Instant>,
    bytes: u64,
}

impl Pace {
    /// Counts `n` bytes read; an error (timed out) when the body is slower
    /// than [`BODY_MIN_BYTES_PER_SEC`] after the grace.
    pub fn note(&mut self, n: usize) -> io::Result<()> {
        let now = std::time::Instant::now();
        let started = *self.started.get_or_insert(now);
        self.bytes += n as u64;
        let elapsed = now - started;
        if elapsed > BODY_RATE_GRACE
            && u128::from(self.bytes) * 1000
                < u128::from(BODY_MIN_BYTES_PER_SEC) * elapsed.as_millis()
        {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "body slower than {BODY_MIN_BYTES_PER_SEC} bytes/s ({} bytes in {:.1} s)",
                    self.bytes,
                    elapsed.as_secs_f64()
                ),
            ));
        }
        Ok(())
    }
}

/// One direction: where bytes come from and which side that is.
pub struct Source<'a, S> {
    pub inbound: &'a mut Inbound,
    pub stream: &'a mut S,
    pub side: Side,
    pub pace: Pace,
}

/// The most a streamed body grows a connection's read buffer to.
pub const STREAM_BUFFER_BYTES_MAX: usize = 64 * 1024;

impl<S: AsyncReadRent> Source<'_, S> {
    fn other(&self) -> Side {
        match self.side {
            Side::Downstream => Side::Upstream,
            Side::Upstream => Side::Downstream,
        }
    }

    /// Ensures unconsumed bytes are buffered; false on EOF.
    async fn more(&mut self, idle: Duration) -> Result<bool, BodyError> {
        if !self.inbound.is_empty() {
            return Ok(true);
        }
        // A body that keeps filling the buffer gets a larger one (up to
        // STREAM_BUFFER_BYTES_MAX): fewer reads for uploads, while a
        // connection that only ever sends small requests keeps a small one.
        if self.inbound.saturated() {
            let grown = (self.inbound.capacity() * 2).min(STREAM_BUFFER_BYTES_MAX);
            self.inbound.reserve_to(grown);
        }
        let cap = self.inbound.capacity();
        match self.inbound.fill(self.stream, cap, idle).await {
            Ok(0) => Ok(false),
            Ok(n) if self.side == Side::Downstream => match self.pace.note(n) {
                Ok(()) => Ok(true),
                Err(e) => Err(BodyError::Io(self.side, e)),
            },
            Ok(_) => Ok(true),
            Err(e) => Err(BodyError::Io(self.side, e)),
        }
    }
}

/// Copies exactly `len` body bytes.
pub async fn copy_length<S: AsyncReadRent, D: AsyncWriteRent>(
    src: &mut Source<'_, S>,
    dst: &mut D,
    len: u64,
    idle: Duration,
) -> Result<(), BodyError> {
    let mut left = len;
    while left > 0 {
        if !src.more(idle).await? {
            return Err(BodyError::Truncated(src.side));
        }
        let n = (src.inbound.data().len() as u64).min(left) as usize;
        src.inbound
            .write_to(dst, n, idle)
            .await
            .map_err(|e| BodyError::Io(src.other(), e))?;
        left -= n as u64;
    }
    Ok(())
}

/// Decodes a chunked body and writes it re-chunked, with the trailer
/// fields `trailers` allows; returns the data size. `limit` bounds the
/// decoded size (request bodies).
pub async fn copy_chunked<S: AsyncReadRent, D: AsyncWriteRent>(
    src: &mut Source<'_, S>,
    dst: &mut D,
    out: &mut Vec<u8>,
    (limit, trailers): (Option<u64>, crate::http1::chunked::Trailers<'_>),
    idle: Duration,
) -> Result<u64, BodyError> {
    let mut decoder = ChunkedDecoder::default();
    let mut total = 0u64;
    loop {
        if !src.more(idle).await? {
            return Err(BodyError::Truncated(src.side));
        }
        out.clear();
        // Re-frame everything buffered, then write once.
        while !src.inbound.is_empty() && !decoder.is_done() {
            let d = decoder
                .decode(src.inbound.data())
                .map_err(|e| BodyError::Framing(src.side, e))?;
            if let Some(range) = d.data {
                let data = &src.inbound.data()[range];
                total += data.len() as u64;
                if limit.is_some_and(|max| total > max) {
                    return Err(BodyError::TooLarge);
                }
                write_chunk_size(data.len(), out);
                out.extend_from_slice(data);
                out.extend_from_slice(CHUNK_END);
            }
            src.inbound.consume(d.consumed);
        }
        if decoder.is_done() {
            crate::http1::chunked::write_last_chunk(decoder.trailers(), trailers, out);
        }
        if !out.is_empty() {
            let (r, buf) = write_all_timed(dst, std::mem::take(out), idle).await;
            *out = buf;
            r.map_err(|e| BodyError::Io(src.other(), e))?;
        }
        if decoder.is_done() {
            return Ok(total);
        }
    }
}

/// Copies until `src` closes; re-chunks when `rechunk` (then ends with
/// the last chunk).
pub async fn copy_until_close<S: AsyncReadRent, D: AsyncWriteRent>(
    src: &mut Source<'_, S>,
    dst: &mut D,
    out: &mut Vec<u8>,
    rechunk: bool,
    idle: Duration,
) -> Result<(), BodyError> {
    while src.more(idle).await? {
        let n = src.inbound.data().len();
        if rechunk {
            out.clear();
            write_chunk_size(n, out);
            out.extend_from_slice(src.inbound.data());
            out.extend_from_slice(CHUNK_END);
            src.inbound.consume(n);
            let (r, buf) = write_all_timed(dst, std::mem::take(out), idle).await;
            *out = buf;
            r.map_err(|e| BodyError::Io(src.other(), e))?;
        } else {
            src.inbound
                .write_to(dst, n, idle)
                .await
                .map_err(|e| BodyError::Io(src.other(), e))?;
        }
    }
    if rechunk {
        let (r, buf) = write_all_timed(dst, LAST_CHUNK.to_vec(), idle).await;
        drop(buf);
        r.map_err(|e| BodyError::Io(src.other(), e))?;
    }
    Ok(())
}
