//! HTTP/2, with the upstream `h2` crate: listeners serve it beside
//! HTTP/1.1 on the same port ([`server`]), clusters speak it to their
//! endpoints ([`client`]), both over [`io`], the bridge that lets h2
//! drive monoio's completion-based streams (plain or TLS) on either
//! driver. Requests go through the version-independent pipeline
//! (`crate::http::pipeline`); [`headers`] translates heads across
//! versions and [`grpc`] answers gRPC callers in gRPC.
//!
//! The limits below bound what one connection may cost; each is also a
//! defence against a known HTTP/2 abuse (RFC 9113 §10.5, and the 2023
//! rapid-reset and 2024 CONTINUATION-flood classes, which h2 0.4.20
//! itself counters with the limits set here).

pub mod client;
pub mod grpc;
pub mod headers;
pub mod io;
pub mod server;

/// The client connection preface (RFC 9113 §3.4) as far as an HTTP/1.1
/// parser gets before it refuses it: what a plaintext listener looks for
/// to switch to h2 (prior knowledge, "h2c").
pub const PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// Streams a client may have open on one connection, advertised in
/// SETTINGS (h2 advertises no limit by default). 100 is what RFC 9113
/// §6.5.2 recommends as the least, and what nginx and Envoy use; each
/// open stream holds at most [`STREAM_WINDOW_BYTES`] of unread body.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// The most streams a listener may let a client open at once: each one
/// can hold a stream window of unread body and a task.
pub const MAX_CONCURRENT_STREAMS_MAX: u32 = 1000;

/// Flow-control window per stream: the most body bytes the peer may
/// send on one stream before we forward them (back-pressure then goes
/// through the window, not through buffering in the proxy). 256 KiB keeps
/// a single stream near line rate on loopback-class RTTs.
pub const STREAM_WINDOW_BYTES: u32 = 256 * 1024;

/// Bounds for `h2_stream_window`: RFC 9113's initial window (64 KiB - 1)
/// at least, 16 MiB at most (memory a single stream may make us hold).
pub const STREAM_WINDOW_BYTES_MIN: u32 = 65_535;
pub const STREAM_WINDOW_BYTES_MAX: u32 = 16 * 1024 * 1024;

/// Flow-control window for the whole connection: bounds unread body
/// bytes across all streams (the memory one connection can make us hold).
pub const CONNECTION_WINDOW_BYTES: u32 = 1024 * 1024;
/// The most `h2_connection_window` may be set to.
pub const CONNECTION_WINDOW_BYTES_MAX: u32 = 64 * 1024 * 1024;

/// Largest header list (HPACK-decoded) a peer may send; h2's default is
/// 16 MiB. The HTTP/1.1 listeners' head limit (64 KiB) is the same kind
/// of bound; an HPACK bomb stops here.
pub const HEADER_LIST_BYTES_MAX: u32 = 64 * 1024;

/// Bytes h2 may buffer per stream for sending before it pushes back
/// (h2's default is 400 KiB); we only send what the peer's window allows.
pub const SEND_BUFFER_BYTES_MAX: usize = 64 * 1024;

/// Streams a client may reset before we accept them (rapid reset, 2023):
/// past this many pending, h2 answers with GOAWAY ENHANCE_YOUR_CALM.
pub const PENDING_ACCEPT_RESETS_MAX: usize = 20;

/// Streams we may reset because the peer broke the protocol on them,
/// per connection, before h2 closes it with GOAWAY ENHANCE_YOUR_CALM.
pub const LOCAL_ERROR_RESETS_MAX: usize = 256;

/// Envoy's premature-reset rule (2023): once a connection has finished
/// this many streams, it is closed (GOAWAY ENHANCE_YOUR_CALM) when the
/// client reset more than half of them before their response was
/// complete. h2's own rapid-reset limit only sees streams reset before we
/// accepted them; this one sees streams that already went upstream.
pub const PREMATURE_RESETS_STREAMS_MIN: u64 = 100;
