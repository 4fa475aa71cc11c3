//! A raw HTTP/1.1 client for tests: writes exactly the bytes a test gives
//! and reads one response at a time, framing it by the response's own
//! headers (independent of the proxy's codec).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
};

use super::IO_DEADLINE;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// A chunked body's trailer fields (names lowercased).
    pub trailers: Vec<(String, String)>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub struct Conn {
    pub writer: TcpStream,
    pub reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Self {
        let s = TcpStream::connect_timeout(&addr, IO_DEADLINE).unwrap();
        s.set_read_timeout(Some(IO_DEADLINE)).unwrap();
        Self {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
        }
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.writer.write_all(raw).unwrap();
    }

    /// Reads one response; `head_request` for answers to HEAD (no body).
    /// None if the connection closed first.
    pub fn read(&mut self, head_request: bool) -> Option<Response> {
        let mut head = Vec::new();
        loop {
            let before = head.len();
            if self.reader.read_until(b'\n', &mut head).ok()? == 0 {
                return None;
            }
            if head[before..] == *b"\r\n" {
                break;
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut res = httparse::Response::new(&mut headers);
        res.parse(&head).ok()?;
        let status = res.code?;
        let headers: Vec<(String, String)> = res
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut trailers = Vec::new();
        let body = if head_request || status < 200 || status == 204 || status == 304 {
            Vec::new()
        } else if get("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
            let mut body = Vec::new();
            loop {
                let mut line = String::new();
                self.reader.read_line(&mut line).ok()?;
                let size = usize::from_str_radix(line.trim_end(), 16).ok()?;
                if size == 0 {
                    // The trailer section, up to its empty line.
                    loop {
                        let mut field = String::new();
                        self.reader.read_line(&mut field).ok()?;
                        let field = field.trim_end();
                        if field.is_empty() {
                            break;
                        }
                        let (name, value) = field.split_once(':')?;
                        trailers.push((name.to_ascii_lowercase(), value.trim().to_string()));
                    }
                    break;
                }
                let mut chunk = vec![0u8; size + 2];
                self.reader.read_exact(&mut chunk).ok()?;
                body.extend_from_slice(&chunk[..size]);
            }
            body
        } else if let Some(n) = get("content-length") {
            let mut body = vec![0u8; n.parse().ok()?];
            self.reader.read_exact(&mut body).ok()?;
            body
        } else {
            let mut body = Vec::new();
            self.reader.read_to_end(&mut body).ok()?;
            body
        };
        Some(Response {
            status,
            headers,
            body,
            trailers,
        })
    }

    /// Whether the server closed the connection (EOF on the next read).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        loop {
            match self.reader.read(&mut b) {
                // Not an answer from the peer: ask again.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return matches!(r, Ok(0) | Err(_)),
            }
        }
    }
}

/// One request on a fresh connection.
pub fn one(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut c = Conn::open(addr);
    c.send(raw);
    c.read(raw.starts_with(b"HEAD ")).expect("a response")
}

/// `GET path` with Host, on a fresh connection.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    one(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
    )
}
