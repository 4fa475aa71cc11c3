//! Attack defended: chunked-body desync (size overflow, signs, `0x`,
//! extensions hiding CR/LF, missing CRLF after data, oversized trailers).
//! The decoder must never panic, must give the same answer whatever way
//! the input is split across reads (a peer controls the split), and every
//! byte it reports as data must lie inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pilotfish::http1::chunked::{ChunkError, ChunkedDecoder};

/// Decodes `input` delivered in pieces of `step` bytes.
fn decode(input: &[u8], step: usize) -> Result<(Vec<u8>, Option<usize>), ChunkError> {
    let mut d = ChunkedDecoder::default();
    let mut out = Vec::new();
    let mut fed = 0; // bytes handed to the decoder so far
    let mut pos = 0; // bytes consumed
    while fed < input.len() {
        fed = (fed + step).min(input.len());
        loop {
            let avail = &input[pos..fed];
            let r = d.decode(avail)?;
            if let Some(range) = r.data {
                assert!(range.end <= avail.len());
                out.extend_from_slice(&avail[range]);
            }
            pos += r.consumed;
            if r.done {
                return Ok((out, Some(pos)));
            }
            if r.consumed == 0 || pos == fed {
                break;
            }
        }
    }
    Ok((out, None))
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, input)) = data.split_first() else { return };
    let whole = decode(input, input.len().max(1));
    let split = decode(input, usize::from(step % 16) + 1);
    assert_eq!(whole, split, "the split across reads changed the result");
});
