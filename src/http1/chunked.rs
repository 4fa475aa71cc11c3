//! The chunked transfer coding (RFC 9112 §7.1): a strict streaming decoder
//! and the few bytes the encoder needs.
//!
//! What must hold: a chunk size is 1 to 16 hex digits, nothing else (no
//! sign, no `0x`, no spaces except before an extension); extensions follow
//! the grammar and are bounded; chunk data is followed by exactly CRLF;
//! trailers are well-formed field lines, bounded, and kept (raw, at most
//! [`HTTP1_TRAILER_BYTES_MAX`]) for the next hop, which forwards the
//! end-to-end ones and never the connection-specific or framing ones.
//! Data is reported as ranges of the caller's buffer: the decoder never
//! copies it.

use std::ops::Range;

use crate::config::limits::{
    HTTP1_CHUNK_LINE_BYTES_MAX, HTTP1_CHUNK_SIZE_DIGITS_MAX, HTTP1_TRAILER_BYTES_MAX,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size")]
    Size,
    #[error("chunk size overflows")]
    Overflow,
    #[error("invalid chunk extension")]
    Extension,
    #[error("chunk line too long")]
    LineTooLong,
    #[error("missing CRLF after chunk data")]
    MissingCrlf,
    #[error("invalid trailer field")]
    Trailer,
    #[error("trailer section too large")]
    TrailerTooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    SizeWs,
    ExtName { started: bool },
    ExtAfterName,
    ExtValStart,
    ExtValToken,
    Quoted,
    QuotedEscape,
    ExtAfterVal,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerLineStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// What one call to [`ChunkedDecoder::decode`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Input bytes used (framing and data); the rest is not ours yet.
    pub consumed: usize,
    /// Chunk data inside `input[..consumed]`, at most one run per call.
    pub data: Option<Range<usize>>,
    /// The last chunk and the trailer section have been read.
    pub done: bool,
}

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    digits: usize,
    line_bytes: usize,
    trailer_bytes: usize,
    /// The trailer field lines as they came (`name: value\r\n` each,
    /// validated by the state machine), without the final empty line.
    /// Empty, and unallocated, for the usual body without trailers.
    trailers: Vec<u8>,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: State::Size,
            size: 0,
            digits: 0,
            line_bytes: 0,
            trailer_bytes: 0,
            trailers: Vec::new(),
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The trailer section read so far (complete once [`Self::is_done`]):
    /// raw field lines, each ending in CRLF.
    pub fn trailers(&self) -> &[u8] {
        &self.trailers
    }

    /// Takes the trailer section (see [`Self::trailers`]).
    pub fn take_trailers(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.trailers)
    }

    /// Decodes from `input` until it yields data, finishes, or runs out.
    pub fn decode(&mut self, input: &[u8]) -> Result<Decoded, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                let n = (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                return Ok(Decoded {
                    consumed: i + n,
                    data: Some(i..i + n),
                    done: false,
                });
            }
            if self.state == State::Done {
                break;
            }
            self.step(input[i])?;
            i += 1;
        }
        Ok(Decoded {
            consumed: i,
            data: None,
            done: self.state == State::Done,
        })
    }

    fn line_byte(&mut self) -> Result<(), ChunkError> {
        self.line_bytes += 1;
        if self.line_bytes > HTTP1_CHUNK_LINE_BYTES_MAX {
            return Err(ChunkError::LineTooLong);
        }
        Ok(())
    }

    fn trailer_byte(&mut self) -> Result<(), ChunkError> {
        self.trailer_bytes += 1;
        if self.trailer_bytes > HTTP1_TRAILER_BYTES_MAX {
            return Err(ChunkError::TrailerTooLarge);
        }
        Ok(())
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        use State::*;
        match self.state {
            Size
            | SizeWs
            | ExtName { .. }
            | ExtAfterName
            | ExtValStart
            | ExtValToken
            | Quoted
            | QuotedEscape
            | ExtAfterVal => self.line_byte()?,
            TrailerLineStart if b == b'\r' => self.trailer_byte()?,
            TrailerLineStart | TrailerName | TrailerValue | TrailerLf => {
                self.trailer_byte()?;
                // Bounded by the check just made.
                self.trailers.push(b);
            }
            EndLf => self.trailer_byte()?,
            _ => {}
        }
        self.state = match (self.state, b) {
            (Size, _) if b.is_ascii_hexdigit() => {
                self.digits += 1;
                if self.digits > HTTP1_CHUNK_SIZE_DIGITS_MAX {
                    return Err(ChunkError::Overflow);
                }
                let d = u64::from((b as char).to_digit(16).unwrap_or(0));
                self.size = self
                    .size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(d))
                    .ok_or(ChunkError::Overflow)?;
                Size
            }
            (Size, _) if self.digits == 0 => return Err(ChunkError::Size),
            (Size, b'\r') => SizeLf,
            (Size, b';') => ExtName { started: false },
            (Size | SizeWs, _) if is_ws(b) => SizeWs,
            (SizeWs, b';') => ExtName { started: false },
            (Size | SizeWs, _) => return Err(ChunkError::Size),

            (ExtName { started: false }, _) if is_ws(b) => ExtName { started: false },
            (ExtName { .. }, _) if is_tchar(b) => ExtName { started: true },
            (ExtName { started: true }, b'\r') => SizeLf,
            (ExtName { started: true }, b';') => ExtName { started: false },
            (ExtName { started: true }, b'=') => ExtValStart,
            (ExtName { started: true }, _) if is_ws(b) => ExtAfterName,
            (ExtAfterName, _) if is_ws(b) => ExtAfterName,
            (ExtAfterName, b'=') => ExtValStart,
            (ExtAfterName, b';') => ExtName { started: false },
            (ExtAfterName, b'\r') => SizeLf,
            (ExtValStart, _) if is_ws(b) => ExtValStart,
            (ExtValStart, b'"') => Quoted,
            (ExtValStart | ExtValToken, _) if is_tchar(b) => ExtValToken,
            (ExtValToken | ExtAfterVal, b'\r') => SizeLf,
            (ExtValToken | ExtAfterVal, b';') => ExtName { started: false },
            (ExtValToken | ExtAfterVal, _) if is_ws(b) => ExtAfterVal,
            (Quoted, b'"') => ExtAfterVal,
            (Quoted, b'\\') => QuotedEscape,
            (Quoted, _) if b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80 => Quoted,
            (QuotedEscape, _) if b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80 => Quoted,
            (
                ExtName { .. }
                | ExtAfterName
                | ExtValStart
                | ExtValToken
                | Quoted
                | QuotedEscape
                | ExtAfterVal,
                _,
            ) => return Err(ChunkError::Extension),

            (SizeLf, b'\n') => {
                self.line_bytes = 0;
                self.digits = 0;
                if self.size == 0 {
                    TrailerLineStart
                } else {
                    Data
                }
            }
            (SizeLf, _) => return Err(ChunkError::Size),

            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Size,
            (DataCr | DataLf, _) => return Err(ChunkError::MissingCrlf),

            (TrailerLineStart, b'\r') => EndLf,
            (TrailerLineStart | TrailerName, _) if is_tchar(b) => TrailerName,
            (TrailerName, b':') => TrailerValue,
            (TrailerLineStart | TrailerName, _) => return Err(ChunkError::Trailer),
            (TrailerValue, b'\r') => TrailerLf,
            (TrailerValue, _) if b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80 => {
                TrailerValue
            }
            (TrailerValue, _) => return Err(ChunkError::Trailer),
            (TrailerLf, b'\n') => TrailerLineStart,
            (TrailerLf, _) => return Err(ChunkError::Trailer),
            (EndLf, b'\n') => Done,
            (EndLf, _) => return Err(ChunkError::Trailer),

            (Data | Done, _) => unreachable!("handled by decode"),
        };
        Ok(())
    }
}

/// The last chunk and an empty trailer section.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The fields of a raw trailer section (as [`ChunkedDecoder::trailers`]
/// keeps it): name and value, the value without surrounding whitespace.
pub fn trailer_fields(raw: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    raw.split(|&b| b == b'\n').filter_map(|line| {
        let line = line.strip_suffix(b"\r")?;
        let colon = line.iter().position(|&b| b == b':')?;
        Some((&line[..colon], line[colon + 1..].trim_ascii()))
    })
}

/// Whether a trailer field may go on to the next hop: not one about this
/// connection or the message's framing (RFC 9110 §6.5.1, RFC 9112 §7.1.2),
/// which would mean something else, or nothing, there.
pub fn forwardable_trailer(name: &[u8]) -> bool {
    const NOT: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"content-length",
        b"host",
    ];
    !NOT.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Which trailer fields go on to the next hop.
#[derive(Debug, Clone, Copy)]
pub enum Trailers<'a> {
    /// A response's: all but the framing and connection fields
    /// ([`forwardable_trailer`]).
    Response,
    /// A request's: also not the fields this proxy writes in the header
    /// section for the upstream to trust (the caller's verified identity
    /// under `identity_header`, the forwarding fields). A client must not
    /// be able to add its own in a trailer: an application that merges
    /// trailers into headers would believe it.
    Request { identity_header: &'a str },
}

impl Trailers<'_> {
    pub fn allows(&self, name: &[u8]) -> bool {
        const OURS: [&[u8]; 3] = [b"x-forwarded-for", b"x-forwarded-proto", b"forwarded"];
        forwardable_trailer(name)
            && match self {
                Trailers::Response => true,
                Trailers::Request { identity_header } => {
                    !name.eq_ignore_ascii_case(identity_header.as_bytes())
                        && !OURS.iter().any(|n| n.eq_ignore_ascii_case(name))
                }
            }
    }
}

/// Appends the last chunk with the fields of `raw` that `policy` allows as
/// its trailer section (just [`LAST_CHUNK`] when there are none).
pub fn write_last_chunk(raw: &[u8], policy: Trailers<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailer_fields(raw).filter(|(n, _)| policy.allows(n)) {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}
/// What follows each chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";

/// Appends a chunk-size line for `len` bytes of data.
pub fn write_chunk_size(len: usize, out: &mut Vec<u8>) {
    use std::io::Write;
    let _ = write!(out, "{len:x}\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a whole body fed in one piece; returns the data or the error.
    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let r = d.decode(&input[pos..])?;
            if let Some(range) = r.data {
                out.extend_from_slice(&input[pos + range.start..pos + range.end]);
            }
            pos += r.consumed;
            if r.done {
                return Ok((out, pos));
            }
            if r.consumed == 0 {
                return Err(ChunkError::Size); // stuck: incomplete input
            }
        }
    }

    /// Feeds one byte at a time, as the slowest peer would.
    fn decode_bytewise(input: &[u8]) -> Result<Option<Vec<u8>>, ChunkError> {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        for &b in input {
            let one = [b];
            let r = d.decode(&one)?;
            if r.data.is_some() {
                out.push(b);
            }
            if r.done {
                return Ok(Some(out));
            }
        }
        Ok(None)
    }

    #[test]
    fn valid_bodies_decode_whole_and_bytewise() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
            (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
            (b"000005\r\nhello\r\n0000\r\n\r\n", b"hello"),
            (b"5;name=value\r\nhello\r\n0\r\n\r\n", b"hello"),
            (b"5 ; a ; b = \"q\\\"x\"\r\nhello\r\n0\r\n\r\n", b"hello"),
            (
                b"5\r\nhello\r\n0\r\nExpires: never\r\nX: y\r\n\r\n",
                b"hello",
            ),
            (b"0\r\n\r\n", b""),
        ];
        for (input, want) in cases {
            let (got, used) = decode_all(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(&got, want, "{input:?}");
            assert_eq!(used, input.len());
            assert_eq!(decode_bytewise(input).unwrap().as_deref(), Some(*want));
        }
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let input = b"5;x=1\r\nhello\r\n0\r\nT: v\r\n\r\n";
        for cut in 0..input.len() {
            let mut d = ChunkedDecoder::default();
            let mut pos = 0;
            let part = &input[..cut];
            loop {
                let r = d.decode(&part[pos..]).unwrap();
                assert!(!r.done, "prefix {cut} reported done");
                pos += r.consumed;
                if r.consumed == 0 || pos == part.len() {
                    break;
                }
            }
        }
    }

    #[test]
    fn attacks_are_rejected() {
        let cases: &[(&[u8], ChunkError)] = &[
            (b"\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"-5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"+5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"0x5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5 \r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b" 5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"10000000000000000\r\n", ChunkError::Overflow),
            (b"00000000000000005\r\n", ChunkError::Overflow),
            (b"5;\r\nhello\r\n0\r\n\r\n", ChunkError::Extension),
            (b"5;a=\r\nhello\r\n0\r\n\r\n", ChunkError::Extension),
            (b"5;a=\"x\r\nhello\r\n0\r\n\r\n", ChunkError::Extension),
            (b"5;a\x00\r\nhello\r\n0\r\n\r\n", ChunkError::Extension),
            (b"5;a\nhello\r\n0\r\n\r\n", ChunkError::Extension),
            (b"5\r\nhelloX\r\n0\r\n\r\n", ChunkError::MissingCrlf),
            (b"5\r\nhello\n0\r\n\r\n", ChunkError::MissingCrlf),
            (b"5\r\nhello\r\r\n0\r\n\r\n", ChunkError::MissingCrlf),
            (b"0\r\n X: folded\r\n\r\n", ChunkError::Trailer),
            (b"0\r\nX : y\r\n\r\n", ChunkError::Trailer),
            (b"0\r\nX: a\x00b\r\n\r\n", ChunkError::Trailer),
            (b"0\r\nX: y\n\r\n", ChunkError::Trailer),
            (b"0\r\n\n", ChunkError::Trailer),
        ];
        for (input, want) in cases {
            assert_eq!(decode_all(input).err(), Some(*want), "{input:?}");
            assert_eq!(
                decode_bytewise(input).err(),
                Some(*want),
                "bytewise {input:?}"
            );
        }
    }

    #[test]
    fn long_extensions_and_trailers_are_bounded() {
        let mut line = b"1;".to_vec();
        line.extend(std::iter::repeat_n(b'a', HTTP1_CHUNK_LINE_BYTES_MAX));
        line.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        assert_eq!(decode_all(&line).err(), Some(ChunkError::LineTooLong));
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..HTTP1_TRAILER_BYTES_MAX / 8 + 1 {
            trailers.extend_from_slice(b"X: 1234\r\n");
        }
        trailers.extend_from_slice(b"\r\n");
        assert_eq!(
            decode_all(&trailers).err(),
            Some(ChunkError::TrailerTooLarge)
        );
    }

    #[test]
    fn trailers_are_kept_and_only_end_to_end_ones_go_on() {
        let input = b"3\r\nabc\r\n0\r\nX-Sum: 9f  \r\nConnection: close\r\ngrpc-status:0\r\n\r\n";
        // Whole, then a byte at a time: the same section either way.
        for step in [input.len(), 1] {
            let mut d = ChunkedDecoder::default();
            for piece in input.chunks(step) {
                let mut at = 0;
                while at < piece.len() {
                    at += d.decode(&piece[at..]).unwrap().consumed;
                }
            }
            assert!(d.is_done());
            assert_eq!(
                d.trailers(),
                b"X-Sum: 9f  \r\nConnection: close\r\ngrpc-status:0\r\n"
            );
            let mut out = Vec::new();
            write_last_chunk(d.trailers(), Trailers::Response, &mut out);
            assert_eq!(out, b"0\r\nX-Sum: 9f\r\ngrpc-status: 0\r\n\r\n");
        }
        // None: the plain last chunk, and nothing was allocated for them.
        let input = b"1\r\na\r\n0\r\n\r\n";
        let (mut d, mut at) = (ChunkedDecoder::default(), 0);
        while !d.is_done() {
            at += d.decode(&input[at..]).unwrap().consumed;
        }
        assert_eq!((at, d.trailers.capacity()), (input.len(), 0));
        let mut out = Vec::new();
        write_last_chunk(b"", Trailers::Response, &mut out);
        assert_eq!(out, LAST_CHUNK);
        // A request's trailers cannot carry what the proxy vouches for.
        let raw = b"X-Caller: spiffe://forged\r\nX-Forwarded-For: 1.2.3.4\r\nX-Sum: 1\r\n";
        let mut out = Vec::new();
        let policy = Trailers::Request {
            identity_header: "x-caller",
        };
        write_last_chunk(raw, policy, &mut out);
        assert_eq!(out, b"0\r\nX-Sum: 1\r\n\r\n");
    }

    #[test]
    fn bytes_after_the_body_are_left_for_the_next_message() {
        let input = b"1\r\na\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        let (data, used) = decode_all(input).unwrap();
        assert_eq!(data, b"a");
        assert_eq!(&input[used..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn chunk_size_lines_are_lower_hex() {
        let mut out = Vec::new();
        write_chunk_size(255, &mut out);
        assert_eq!(out, b"ff\r\n");
    }
}
