//! Responses the proxy writes itself: 400, 404, 413, 414, 431, 502, 503,
//! 504, ... Each carries a short text body and `x-pilotfish-error` naming
//! the reason, and is counted by that reason.

use std::io::Write;

use crate::metrics::ErrorReason;

/// Appends a complete generated response to `out`.
pub fn generated(reason: ErrorReason, detail: &str, close: bool, out: &mut Vec<u8>) {
    generated_with(reason.status(), reason.name(), detail, close, None, out);
}

/// A generated response with any status and reason token (fault
/// injection answers with the status the route asks for), and a
/// `retry-after` in seconds when given (rate limits).
pub fn generated_with(
    status: u16,
    name: &str,
    detail: &str,
    close: bool,
    retry_after: Option<u64>,
    out: &mut Vec<u8>,
) {
    let phrase = phrase(status);
    let body_len = format!("{status} {phrase}: {detail}\n").len();
    let _ = write!(
        out,
        "HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {body_len}\r\nx-pilotfish-error: {}\r\n",
        name,
    );
    if let Some(secs) = retry_after {
        let _ = write!(out, "retry-after: {secs}\r\n");
    }
    let _ = write!(
        out,
        "{}\r\n{status} {phrase}: {detail}\n",
        if close { "connection: close\r\n" } else { "" },
    );
}

pub fn phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_responses_parse_and_name_their_reason() {
        let mut out = Vec::new();
        generated(
            ErrorReason::UpstreamTimeout,
            "no response within 5s",
            true,
            &mut out,
        );
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut res = httparse::Response::new(&mut headers);
        let n = match res.parse(&out).unwrap() {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => panic!("partial"),
        };
        assert_eq!(res.code, Some(504));
        let get = |name: &str| res.headers.iter().find(|h| h.name == name).map(|h| h.value);
        assert_eq!(get("x-pilotfish-error"), Some(&b"upstream_timeout"[..]));
        let len: usize = std::str::from_utf8(get("content-length").unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(out.len() - n, len);
    }
}
