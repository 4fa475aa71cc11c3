//! Finding the end of a message head, strictly and incrementally.
//!
//! httparse tolerates bare LF line endings; we do not (RFC 9112 §2.2: a
//! bare CR or LF is where request smuggling hides). The scanner walks the
//! bytes once, resuming where it stopped, and rejects a bare CR, a bare LF,
//! and obs-fold (a field line starting with SP or HTAB) before httparse
//! ever sees the head.

/// Why a head was rejected by the line scanner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanError {
    BareLf,
    BareCr,
    ObsFold,
    LeadingEmptyLines,
}

/// Incremental head-end finder.
#[derive(Debug, Default, Clone)]
pub struct HeadScanner {
    /// Bytes already checked.
    scanned: usize,
    /// Start of the head proper, after tolerated leading empty lines.
    start: usize,
    /// Whether we are past the start line (so a leading SP/HT is obs-fold).
    line_index: usize,
    /// Whether the line currently being scanned is empty so far.
    at_line_start: bool,
}

/// Leading empty lines tolerated before a request line (RFC 9112 §2.2
/// allows ignoring at least one, left over from a previous body).
const LEADING_EMPTY_LINES_MAX: usize = 4;

impl HeadScanner {
    pub fn new() -> Self {
        Self {
            at_line_start: true,
            ..Self::default()
        }
    }

    /// Whether the start line has ended (its CRLF was seen).
    pub fn past_first_line(&self) -> bool {
        self.line_index > 0
    }

    /// Scans `buf` (the whole buffered input so far, same prefix as the
    /// previous call). Returns `Ok(Some((start, end)))` once the head is
    /// complete: `buf[start..end]` is the head including its final CRLFCRLF.
    ///
    /// Jumps from line ending to line ending with `memchr2` (SIMD), so the
    /// cost is per line, not per byte.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<(usize, usize)>, ScanError> {
        let mut i = self.scanned;
        while i < buf.len() {
            if self.at_line_start && self.line_index > 0 && matches!(buf[i], b' ' | b'\t') {
                return Err(ScanError::ObsFold);
            }
            let Some(found) = memchr::memchr2(b'\r', b'\n', &buf[i..]) else {
                // No line end yet: the line is non-empty if anything is here.
                self.at_line_start = false;
                i = buf.len();
                break;
            };
            let at = i + found;
            if buf[at] == b'\n' {
                return Err(ScanError::BareLf);
            }
            let Some(&next) = buf.get(at + 1) else {
                // CR at the end: wait for the next byte, rescan from the CR.
                self.at_line_start &= at == i;
                i = at;
                break;
            };
            if next != b'\n' {
                return Err(ScanError::BareCr);
            }
            let empty_line = self.at_line_start && at == i;
            if empty_line && self.line_index == 0 {
                // An empty line before the start line.
                if at / 2 >= LEADING_EMPTY_LINES_MAX {
                    return Err(ScanError::LeadingEmptyLines);
                }
                self.start = at + 2;
            } else if empty_line {
                self.scanned = at + 2;
                return Ok(Some((self.start, at + 2)));
            } else {
                self.line_index += 1;
            }
            self.at_line_start = true;
            i = at + 2;
        }
        self.scanned = i;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(input: &[u8]) -> Result<Option<(usize, usize)>, ScanError> {
        HeadScanner::new().scan(input)
    }

    #[test]
    fn finds_the_end_and_tolerates_a_leading_empty_line() {
        let m = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY";
        assert_eq!(scan_all(m), Ok(Some((0, m.len() - 4))));
        let m = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(scan_all(m), Ok(Some((2, m.len()))));
    }

    #[test]
    fn rejects_bare_line_endings_and_obs_fold() {
        assert_eq!(
            scan_all(b"GET / HTTP/1.1\nHost: a\r\n\r\n"),
            Err(ScanError::BareLf)
        );
        assert_eq!(
            scan_all(b"GET / HTTP/1.1\r\nHost: a\rX\r\n\r\n"),
            Err(ScanError::BareCr)
        );
        assert_eq!(
            scan_all(b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n"),
            Err(ScanError::ObsFold)
        );
        assert_eq!(
            scan_all(b"GET / HTTP/1.1\r\n\tA: b\r\n\r\n"),
            Err(ScanError::ObsFold)
        );
    }

    #[test]
    fn every_prefix_is_incomplete_then_the_same_answer_incrementally() {
        let m = b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n";
        for cut in 0..m.len() {
            assert_eq!(scan_all(&m[..cut]), Ok(None), "prefix {cut}");
        }
        let mut s = HeadScanner::new();
        for end in 1..=m.len() {
            let r = s.scan(&m[..end]);
            if end < m.len() {
                assert_eq!(r, Ok(None), "incremental prefix {end}");
            } else {
                assert_eq!(r, Ok(Some((0, m.len()))));
            }
        }
    }
}
