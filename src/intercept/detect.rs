//! Protocol detection on an intercepted connection's first bytes: a TLS
//! ClientHello (with its SNI and ALPN), the HTTP/2 preface, an HTTP/1.x
//! request line, or else opaque TCP.
//!
//! What must hold: sans-io and total: any bytes give an answer or
//! [`Detected::NeedMore`], never a panic; at most [`DETECT_BYTES_MAX`] bytes
//! are ever looked at, and with that many a verdict is always given (the
//! caller never waits for more than the bound).

/// Bytes detection looks at. A ClientHello carrying post-quantum key
/// shares is 1.2 to 1.8 KB, and its SNI may come after them; an HTTP/1.x
/// request line longer than this is treated as opaque bytes (still
/// forwarded, just without the HTTP pipeline).
pub const DETECT_BYTES_MAX: usize = 4096;

/// Longest HTTP method token taken as one (the longest registered is
/// 17 bytes: "VERSION-CONTROL"... "BASELINE-CONTROL" is 16).
const METHOD_BYTES_MAX: usize = 20;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    /// A TLS ClientHello; SNI and ALPN when they were within the bound.
    Tls {
        sni: Option<String>,
        alpn: Vec<Vec<u8>>,
    },
    /// The HTTP/2 preface (prior knowledge, h2c).
    Http2,
    /// An HTTP/1.0 or HTTP/1.1 request line.
    Http1,
    /// Anything else.
    Opaque,
    /// Too few bytes to tell yet.
    NeedMore,
}

/// Classifies the first bytes of a connection.
pub fn detect(bytes: &[u8]) -> Detected {
    let bytes = &bytes[..bytes.len().min(DETECT_BYTES_MAX)];
    let full = bytes.len() == DETECT_BYTES_MAX;
    if bytes.is_empty() {
        return Detected::NeedMore;
    }
    if bytes[0] == 0x16 {
        return tls(bytes, full);
    }
    let preface_part = bytes.len().min(H2_PREFACE.len());
    if bytes[..preface_part] == H2_PREFACE[..preface_part] {
        return if preface_part == H2_PREFACE.len() {
            Detected::Http2
        } else {
            Detected::NeedMore
        };
    }
    http1(bytes, full)
}

/// `METHOD SP target SP HTTP/1.x CRLF`, checked loosely: detection only
/// picks the path; the HTTP parser decides what the request really is
/// (and answers 400 to a malformed one).
fn http1(bytes: &[u8], full: bool) -> Detected {
    let method = bytes
        .iter()
        .take_while(|b| b.is_ascii_uppercase() || **b == b'-' || **b == b'_')
        .count();
    if method == bytes.len() {
        return if method <= METHOD_BYTES_MAX && !full {
            Detected::NeedMore
        } else {
            Detected::Opaque
        };
    }
    if method == 0 || method > METHOD_BYTES_MAX || bytes[method] != b' ' {
        return Detected::Opaque;
    }
    let Some(eol) = bytes.iter().position(|b| *b == b'\n') else {
        // The target is visible ASCII; anything else is not HTTP.
        let plausible = bytes[method + 1..]
            .iter()
            .all(|b| b.is_ascii_graphic() || *b == b' ' || *b == b'\r');
        return if plausible && !full {
            Detected::NeedMore
        } else {
            Detected::Opaque
        };
    };
    let line = &bytes[..eol];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
        Detected::Http1
    } else {
        Detected::Opaque
    }
}

/// A TLS record holding a ClientHello (RFC 8446 §4.1.2); SNI (RFC 6066
/// §3) and ALPN (RFC 7301) read from its extensions when the whole hello
/// is within the bound.
fn tls(bytes: &[u8], full: bool) -> Detected {
    if bytes.len() < 6 {
        // Record header (type, version, length) and the handshake type.
        return if bytes.len() >= 2 && bytes[1] != 0x03 {
            Detected::Opaque
        } else {
            Detected::NeedMore
        };
    }
    if bytes[1] != 0x03 || bytes[5] != 0x01 {
        return Detected::Opaque;
    }
    let record_len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    let have = &bytes[5..];
    if have.len() < record_len.min(DETECT_BYTES_MAX - 5) && !full {
        return Detected::NeedMore;
    }
    let hello = &have[..have.len().min(record_len)];
    let (sni, alpn) = hello_extensions(hello).unwrap_or_default();
    Detected::Tls { sni, alpn }
}

/// Reads SNI and ALPN from a handshake message; None when it is cut short
/// or malformed (the connection is still TLS; routing just cannot use
/// them).
fn hello_extensions(hs: &[u8]) -> Option<(Option<String>, Vec<Vec<u8>>)> {
    let mut r = Reader(hs);
    r.take(4)?; // msg_type, length
    r.take(2 + 32)?; // legacy_version, random
    let session = r.u8()?;
    r.take(usize::from(session))?;
    let suites = r.u16()?;
    r.take(usize::from(suites))?;
    let compression = r.u8()?;
    r.take(usize::from(compression))?;
    let ext_len = r.u16()?;
    let mut exts = Reader(r.take(usize::from(ext_len))?);
    let (mut sni, mut alpn) = (None, Vec::new());
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let len = exts.u16()?;
        let mut body = Reader(exts.take(usize::from(len))?);
        match kind {
            0 => {
                let n = usize::from(body.u16()?);
                let mut list = Reader(body.take(n)?);
                while !list.0.is_empty() {
                    let name_type = list.u8()?;
                    let n = usize::from(list.u16()?);
                    let name = list.take(n)?;
                    if name_type == 0 && sni.is_none() {
                        // Normalized before anything routes on it: one
                        // spelling per name (case, a trailing dot).
                        sni = std::str::from_utf8(name)
                            .ok()
                            .map(|s| s.trim_end_matches('.').to_ascii_lowercase());
                    }
                }
            }
            16 => {
                let n = usize::from(body.u16()?);
                let mut list = Reader(body.take(n)?);
                while !list.0.is_empty() {
                    let len = list.u8()?;
                    alpn.push(list.take(usize::from(len))?.to_vec());
                }
            }
            _ => {}
        }
    }
    Some((sni, alpn))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls writes it, with SNI and ALPN.
    fn client_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn tls_client_hello_gives_sni_and_alpn() {
        let hello = client_hello("Payments.Default.svc.", &[b"h2", b"http/1.1"]);
        assert_eq!(
            detect(&hello),
            Detected::Tls {
                sni: Some("payments.default.svc".into()),
                alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            }
        );
        // Every cut short of the whole record asks for more.
        for cut in 1..hello.len() {
            assert_eq!(detect(&hello[..cut]), Detected::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn h2_preface_and_its_prefixes() {
        assert_eq!(detect(H2_PREFACE), Detected::Http2);
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(detect(&more), Detected::Http2);
        // "PRI" alone could still be an HTTP/1 method; either way, wait.
        for cut in 1..H2_PREFACE.len() {
            assert_eq!(detect(&H2_PREFACE[..cut]), Detected::NeedMore);
        }
    }

    #[test]
    fn http1_request_lines() {
        assert_eq!(
            detect(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Detected::Http1
        );
        assert_eq!(detect(b"POST /x?y=1 HTTP/1.0\r\n"), Detected::Http1);
        assert_eq!(detect(b"GET / HTTP/1.1\n"), Detected::Http1);
        assert_eq!(detect(b"GET /partial"), Detected::NeedMore);
        assert_eq!(detect(b"GE"), Detected::NeedMore);
        assert_eq!(detect(b"GET / HTTP/2.0\r\n"), Detected::Opaque);
        assert_eq!(detect(b"get / HTTP/1.1\r\n"), Detected::Opaque);
    }

    #[test]
    fn anything_else_is_opaque() {
        assert_eq!(detect(b"\x00\x01binary"), Detected::Opaque);
        assert_eq!(detect(b"SSH-2.0-OpenSSH_9.2\r\n"), Detected::Opaque);
        assert_eq!(detect(b"hello\n"), Detected::Opaque);
        assert_eq!(detect(b"\x16\x01\x00"), Detected::Opaque);
        // A request line that never ends within the bound.
        let mut long = b"GET /".to_vec();
        long.resize(DETECT_BYTES_MAX + 10, b'a');
        assert_eq!(detect(&long), Detected::Opaque);
        // An endless token too.
        assert_eq!(detect(&[b'A'; DETECT_BYTES_MAX]), Detected::Opaque);
    }

    #[test]
    fn never_panics_on_cut_or_garbled_hellos() {
        let hello = client_hello("a.b", &[b"h2"]);
        for i in 5..hello.len() {
            let mut bad = hello.clone();
            bad[i] ^= 0xff;
            let _ = detect(&bad);
        }
    }
}
