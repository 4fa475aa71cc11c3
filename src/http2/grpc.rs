//! gRPC over the proxy: recognising a gRPC request, its deadline
//! (`grpc-timeout`), and answering it with a gRPC error rather than an
//! HTTP error page.
//!
//! What must hold: a gRPC client never gets a generated HTML or text 503:
//! every answer the proxy makes to a gRPC request is HTTP 200 with
//! `grpc-status` and `grpc-message` in a trailers-only response, the code
//! mapped from the HTTP status as gRPC's "HTTP to gRPC status code
//! mapping" table says. A deadline the caller sent is honoured (capped by
//! the route's timeout) and passed on reduced by the time already spent.

use std::time::Duration;

/// gRPC status codes the proxy uses or retries on.
pub const CANCELLED: u32 = 1;
pub const UNKNOWN: u32 = 2;
pub const DEADLINE_EXCEEDED: u32 = 4;
pub const PERMISSION_DENIED: u32 = 7;
pub const RESOURCE_EXHAUSTED: u32 = 8;
pub const UNIMPLEMENTED: u32 = 12;
pub const INTERNAL: u32 = 13;
pub const UNAVAILABLE: u32 = 14;
pub const UNAUTHENTICATED: u32 = 16;

/// The code of a retry condition named in a route's `retry.on`.
pub fn retryable_code(name: &str) -> Option<u32> {
    match name {
        "cancelled" => Some(CANCELLED),
        "deadline_exceeded" => Some(DEADLINE_EXCEEDED),
        "resource_exhausted" => Some(RESOURCE_EXHAUSTED),
        "unavailable" => Some(UNAVAILABLE),
        _ => None,
    }
}

/// Whether a request is gRPC: its content type is `application/grpc`
/// (alone or with a `+proto`-style suffix or parameters).
pub fn is_grpc(content_type: Option<&[u8]>) -> bool {
    content_type.is_some_and(|ct| {
        ct.len() >= 16
            && ct[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(ct.get(16), None | Some(b'+' | b';'))
    })
}

/// The gRPC code for an HTTP status, per gRPC's HTTP-to-status table.
pub fn code_for_http(status: u16) -> u32 {
    match status {
        400 => INTERNAL,
        401 => UNAUTHENTICATED,
        403 => PERMISSION_DENIED,
        404 => UNIMPLEMENTED,
        429 | 502 | 503 | 504 => UNAVAILABLE,
        _ => UNKNOWN,
    }
}

/// The longest `grpc-timeout` value: at most 8 digits (gRPC's wire spec).
const TIMEOUT_DIGITS_MAX: usize = 8;

/// Parses a `grpc-timeout` value (`1-8 digits` then a unit: H M S m u n).
/// None for a malformed value (which is then ignored, as gRPC servers do).
pub fn parse_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > TIMEOUT_DIGITS_MAX {
        return None;
    }
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 8 digits: fits a u64 without overflow below.
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats `d` as a `grpc-timeout` value in the finest unit that fits in
/// 8 digits, rounded up (the deadline passed on never undercuts what is
/// left).
pub fn format_timeout(d: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in units {
        let n = nanos.div_ceil(per);
        if n <= MAX {
            return format!("{n}{unit}");
        }
    }
    format!("{MAX}H")
}

/// Percent-encodes a `grpc-message` (gRPC's spec: bytes outside
/// printable ASCII, and `%`, are written as `%XX`).
pub fn encode_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert!(is_grpc(Some(b"application/grpc")));
        assert!(is_grpc(Some(b"application/grpc+proto")));
        assert!(is_grpc(Some(b"Application/GRPC;charset=utf-8")));
        assert!(!is_grpc(Some(b"application/grpc-web")));
        assert!(!is_grpc(Some(b"application/json")));
        assert!(!is_grpc(None));
    }

    #[test]
    fn timeouts_parse_and_format() {
        assert_eq!(parse_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_timeout(b"123456789m"), None, "9 digits");
        assert_eq!(parse_timeout(b"m"), None);
        assert_eq!(parse_timeout(b"10x"), None);
        assert_eq!(parse_timeout(b"-1S"), None);
        assert_eq!(format_timeout(Duration::from_millis(100)), "100000u");
        assert_eq!(format_timeout(Duration::from_nanos(1500)), "1500n");
        assert_eq!(format_timeout(Duration::from_secs(30)), "30000000u");
        assert_eq!(format_timeout(Duration::from_secs(3600)), "3600000m");
        for d in [1u64, 999, 1_000_000, 123_456_789_000, 7_200_000_000_000] {
            let d = Duration::from_nanos(d);
            let back = parse_timeout(format_timeout(d).as_bytes()).unwrap();
            assert!(back >= d, "{d:?} -> {back:?}");
        }
    }

    #[test]
    fn http_status_mapping_follows_the_grpc_table() {
        assert_eq!(code_for_http(503), UNAVAILABLE);
        assert_eq!(code_for_http(504), UNAVAILABLE);
        assert_eq!(code_for_http(404), UNIMPLEMENTED);
        assert_eq!(code_for_http(403), PERMISSION_DENIED);
        assert_eq!(code_for_http(400), INTERNAL);
        assert_eq!(code_for_http(500), UNKNOWN);
        assert_eq!(retryable_code("unavailable"), Some(UNAVAILABLE));
        assert_eq!(retryable_code("503"), None);
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("no route: 100%"), "no route: 100%25");
        assert_eq!(encode_message("é\n"), "%C3%A9%0A");
    }
}
