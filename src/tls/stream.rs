//! The connection type every proxy path uses: a plain TCP socket or a TLS
//! session on one, and the handshakes that make the latter.
//!
//! The handshake is our own loop (not monoio-rustls's) so that it has a
//! deadline, keeps rustls's error for the counters, and hands us the
//! session before any application byte is read: the peer's identity and
//! ALPN come from it. The session is then wrapped by monoio-rustls for the
//! data phase, which also makes it splittable for the L4 copy.
//!
//! What must hold: no byte read from the socket during the handshake is
//! lost (every byte is fed to rustls before the session is handed over);
//! a failed handshake sends rustls's alert when it has one, then closes;
//! every failure has a short reason ([`super::verify::reason`], or
//! `timeout`, `eof`, `io`).
//!
//! Memory per TLS connection is bounded: the wrapper's read and write
//! buffers (16 KiB each, monoio-io-wrapper), rustls's received-plaintext
//! limit (16 KiB) and its send buffer (each write is flushed before the
//! next, so it holds one record), plus [`HANDSHAKE_READ_BYTES`] during the
//! handshake.

use std::{
    future::Future,
    ops::{Deref, DerefMut},
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use futures_util::future::Either;
use monoio::{
    buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut},
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Split},
    net::TcpStream,
    BufResult,
};
use monoio_rustls::{ClientTlsStream, ServerTlsStream};
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection};

use super::identity::SpiffeId;

/// Bytes read from the socket per handshake read. A ClientHello is a few
/// hundred bytes; a certificate flight a few KiB, taken in several reads.
/// Smaller than rustls's 16 KiB received-plaintext limit, so whatever
/// application data rides in the last read always fits into the session.
const HANDSHAKE_READ_BYTES: usize = 4096;

/// A client or upstream connection.
pub enum Stream {
    Plain(TcpStream),
    /// We terminated TLS (inbound listener); the socket's descriptor is
    /// kept for the pool's liveness peek (the wrapper does not lend it).
    Server(Box<ServerTlsStream<TcpStream>>, RawFd),
    /// We originated TLS (cluster with `tls`).
    Client(Box<ClientTlsStream<TcpStream>>, RawFd),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stream::Plain(_) => "Stream::Plain",
            Stream::Server(..) => "Stream::Server",
            Stream::Client(..) => "Stream::Client",
        })
    }
}

impl Stream {
    /// The descriptor of the TCP socket under the session; valid while
    /// `self` lives.
    pub fn raw_fd(&self) -> RawFd {
        match self {
            Stream::Plain(s) => s.as_raw_fd(),
            Stream::Server(_, fd) | Stream::Client(_, fd) => *fd,
        }
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }
}

// SAFETY: `Split` promises that the read half and the write half may be
// used at the same time. TcpStream is Split; monoio-rustls declares its
// streams Split (its read path does not write while split); `Stream` is
// only a tag over those, adding no shared state of its own.
#[allow(unsafe_code)]
unsafe impl Split for Stream {}

// Dispatch without a state machine of our own: each call returns the
// chosen stream's future (an `Either`), so a plain read or write is the
// socket's own future plus one match per poll. The TLS arms' futures are
// boxed: they are several times the size of a socket read's, and an enum
// future is as large as its largest arm. As async fns with inline TLS
// arms this layer cost +950 instructions per plaintext HTTP request
// (callgrind, 14,991 before TLS); this way +390 (15,381). The TLS path
// pays one small allocation per call, next to the record's crypto.
type Dispatch<P, S, C> = Either<P, Either<Pin<Box<S>>, Pin<Box<C>>>>;

/// The future of `$method($arg)` on whichever stream `$self` is.
macro_rules! dispatch {
    ($self:ident.$method:ident($($arg:ident)?)) => {{
        let d: Dispatch<_, _, _> = match $self {
            Stream::Plain(s) => Either::Left(s.$method($($arg)?)),
            Stream::Server(s, _) => Either::Right(Either::Left(Box::pin(s.$method($($arg)?)))),
            Stream::Client(s, _) => Either::Right(Either::Right(Box::pin(s.$method($($arg)?)))),
        };
        d
    }};
}

impl AsyncReadRent for Stream {
    #[inline]
    fn read<T: IoBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        dispatch!(self.read(buf))
    }

    fn readv<T: IoVecBufMut>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        dispatch!(self.readv(buf))
    }
}

impl AsyncWriteRent for Stream {
    #[inline]
    fn write<T: IoBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        dispatch!(self.write(buf))
    }

    fn writev<T: IoVecBuf>(&mut self, buf: T) -> impl Future<Output = BufResult<usize, T>> {
        dispatch!(self.writev(buf))
    }

    fn flush(&mut self) -> impl Future<Output = std::io::Result<()>> {
        dispatch!(self.flush())
    }

    fn shutdown(&mut self) -> impl Future<Output = std::io::Result<()>> {
        dispatch!(self.shutdown())
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("handshake not finished within {0:?}")]
    Timeout(Duration),
    #[error("peer closed the connection during the handshake")]
    Eof,
    #[error("I/O during the handshake: {0}")]
    Io(#[from] std::io::Error),
}

impl HandshakeError {
    /// A short, stable reason for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Tls(e) => super::verify::reason(e),
            HandshakeError::Timeout(_) => "timeout",
            HandshakeError::Eof => "eof",
            HandshakeError::Io(_) => "io",
        }
    }
}

/// What a finished inbound handshake tells about the caller.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The caller's SPIFFE ID (None when no client certificate was asked
    /// for or given).
    pub identity: Option<SpiffeId>,
    /// Whether the session was resumed (no certificate exchanged).
    pub resumed: bool,
    /// Whether ALPN chose `h2`.
    pub h2: bool,
    /// Whether ALPN chose `http/1.1`. (Neither: no ALPN, which is how
    /// sidecars originate opaque TCP, see `l4::connect`.)
    pub http1: bool,
}

/// Terminates TLS on an accepted connection.
pub async fn accept(
    mut io: TcpStream,
    config: Arc<ServerConfig>,
    timeout: Duration,
) -> Result<(Stream, Peer), HandshakeError> {
    let mut conn = ServerConnection::new(config)?;
    with_deadline(timeout, handshake(&mut io, &mut conn)).await?;
    let peer = Peer {
        identity: peer_identity(conn.peer_certificates()),
        resumed: matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed)),
        h2: conn.alpn_protocol() == Some(b"h2"),
        http1: conn.alpn_protocol() == Some(b"http/1.1"),
    };
    let fd = io.as_raw_fd();
    let stream = Stream::Server(Box::new(ServerTlsStream::new(io, conn)), fd);
    Ok((stream, peer))
}

/// Originates TLS on a connected socket; the config's verifier checks the
/// server's identity. Ok((stream, resumed, ALPN chose h2)).
pub async fn connect(
    mut io: TcpStream,
    config: Arc<ClientConfig>,
    sni: rustls::pki_types::ServerName<'static>,
    timeout: Duration,
) -> Result<(Stream, bool, bool), HandshakeError> {
    let mut conn = ClientConnection::new(config, sni)?;
    with_deadline(timeout, handshake(&mut io, &mut conn)).await?;
    let resumed = matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    let h2 = conn.alpn_protocol() == Some(b"h2");
    let fd = io.as_raw_fd();
    let stream = Stream::Client(Box::new(ClientTlsStream::new(io, conn)), fd);
    Ok((stream, resumed, h2))
}

async fn with_deadline<F>(timeout: Duration, f: F) -> Result<(), HandshakeError>
where
    F: std::future::Future<Output = Result<(), HandshakeError>>,
{
    match monoio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout(timeout)),
    }
}

/// The leaf's SPIFFE ID. The verifier already checked that the leaf is an
/// SVID, so a parse failure here cannot happen for a verified peer.
fn peer_identity(certs: Option<&[rustls::pki_types::CertificateDer<'static>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    super::svid::uri_san(leaf)
}

/// Runs the handshake to completion: write what rustls wants to send,
/// read and feed what the peer sends, until the session is established.
async fn handshake<C, S>(io: &mut TcpStream, conn: &mut C) -> Result<(), HandshakeError>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>>,
{
    let mut out: Vec<u8> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(HANDSHAKE_READ_BYTES);
    loop {
        while conn.wants_write() {
            conn.write_tls(&mut out)?;
        }
        if !out.is_empty() {
            let (written, back) = io.write_all(out).await;
            written?;
            out = back;
            out.clear();
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        let (read, back) = io.read(buf).await;
        buf = back;
        if read? == 0 {
            return Err(HandshakeError::Eof);
        }
        let mut rest: &[u8] = &buf;
        while !rest.is_empty() {
            conn.read_tls(&mut rest)?;
            if let Err(e) = conn.process_new_packets() {
                // Tell the peer why, when rustls queued an alert.
                while conn.wants_write() {
                    if conn.write_tls(&mut out).is_err() {
                        break;
                    }
                }
                if !out.is_empty() {
                    let _ = io.write_all(out).await;
                }
                return Err(HandshakeError::Tls(e));
            }
        }
        buf.clear();
    }
}
