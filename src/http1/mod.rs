//! HTTP/1.1 as a sans-io codec: bytes in, heads and body events out, and
//! re-serialized bytes for the other side. No sockets here.
//!
//! What must hold: we decide framing ourselves (RFC 9112 §6) and refuse
//! anything ambiguous; what we forward is written by us from the parsed
//! message, never the peer's raw framing bytes.

pub mod chunked;
pub mod head;
pub mod scan;
pub mod write;

pub use head::{
    HeadError, HeadLimits, RequestBody, RequestHead, RequestKind, RequestParser, ResponseBody,
    ResponseHead, ResponseParser, Version,
};
