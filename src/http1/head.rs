//! Request and response heads: parsed once, validated, framing decided.
//!
//! What must hold (RFC 9112 §6, §11): a head is accepted only if its body
//! length is unambiguous. Content-Length with Transfer-Encoding, several
//! Content-Length fields, a Content-Length that is not plain digits, a
//! Transfer-Encoding whose final coding is not chunked, any
//! Transfer-Encoding on HTTP/1.0, obs-fold, bare CR/LF, whitespace before a
//! colon and control bytes are all rejected. A head keeps its raw bytes and
//! the ranges of each field inside them: nothing is copied per field.

use std::ops::Range;

use smallvec::SmallVec;

use super::scan::{HeadScanner, ScanError};
use crate::config::limits::HTTP1_HEADERS_MAX;

/// Limits applied while parsing a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HeadLimits {
    pub head_bytes: usize,
    pub headers: usize,
    pub uri_bytes: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        use crate::config::limits::*;
        Self {
            head_bytes: HTTP1_HEAD_BYTES_DEFAULT,
            headers: HTTP1_HEADERS_DEFAULT,
            uri_bytes: HTTP1_URI_BYTES_DEFAULT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// Why a head was refused. Each maps to a status and a short reason that
/// goes into the `x-pilotfish-error` header and the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("head larger than the limit")]
    HeadTooLarge,
    #[error("more header fields than the limit")]
    TooManyHeaders,
    #[error("request-target longer than the limit")]
    UriTooLong,
    #[error("bare LF line ending")]
    BareLf,
    #[error("bare CR in head")]
    BareCr,
    #[error("obsolete line folding")]
    ObsFold,
    #[error("too many empty lines before the request line")]
    LeadingEmptyLines,
    #[error("malformed head: {0}")]
    Syntax(&'static str),
    #[error("unsupported HTTP version")]
    Version,
    #[error("ambiguous framing: {0}")]
    Framing(&'static str),
    #[error("transfer coding other than chunked")]
    UnsupportedCoding,
    #[error("invalid Host: {0}")]
    Host(&'static str),
    /// Not a parse error: the head was not completed in time (408).
    #[error("request head not completed in time")]
    TimedOut,
}

impl HeadError {
    /// The status to answer a client with for a bad request head.
    pub fn request_status(self) -> u16 {
        match self {
            HeadError::HeadTooLarge | HeadError::TooManyHeaders => 431,
            HeadError::UriTooLong => 414,
            HeadError::Version => 505,
            HeadError::UnsupportedCoding => 501,
            HeadError::TimedOut => 408,
            _ => 400,
        }
    }

    /// A stable token for headers, logs and metric labels.
    pub fn reason(self) -> &'static str {
        match self {
            HeadError::HeadTooLarge => "head_too_large",
            HeadError::TooManyHeaders => "too_many_headers",
            HeadError::UriTooLong => "uri_too_long",
            HeadError::BareLf => "bare_lf",
            HeadError::BareCr => "bare_cr",
            HeadError::ObsFold => "obs_fold",
            HeadError::LeadingEmptyLines => "leading_empty_lines",
            HeadError::Syntax(_) => "bad_syntax",
            HeadError::Version => "unsupported_version",
            HeadError::Framing(_) => "ambiguous_framing",
            HeadError::UnsupportedCoding => "unsupported_transfer_coding",
            HeadError::Host(_) => "bad_host",
            HeadError::TimedOut => "request_timeout",
        }
    }
}

impl From<ScanError> for HeadError {
    fn from(e: ScanError) -> Self {
        match e {
            ScanError::BareLf => HeadError::BareLf,
            ScanError::BareCr => HeadError::BareCr,
            ScanError::ObsFold => HeadError::ObsFold,
            ScanError::LeadingEmptyLines => HeadError::LeadingEmptyLines,
        }
    }
}

/// A few ranges into a head's bytes; inline up to two, so the common
/// head (one Host, one Connection token) allocates nothing for them.
pub type Ranges = SmallVec<[Range<usize>; 2]>;

/// One field line, as ranges into [`Head::bytes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Range<usize>,
    pub value: Range<usize>,
}

/// A head's raw bytes and where each field sits in them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Head {
    pub bytes: Vec<u8>,
    pub fields: Vec<Field>,
}

/// A recycled head whose buffers grew past these is freed rather than kept
/// for the next parse: a spare is for the typical head (a few hundred
/// bytes, a dozen fields), not for the rare huge one, which would stay
/// resident for the life of the connection.
const SPARE_HEAD_BYTES_MAX: usize = 4 * 1024;
const SPARE_HEAD_FIELDS_MAX: usize = 32;

/// A finished head's buffers, kept by a parser to parse its next head
/// into (see [`Head::into_spare`]).
#[derive(Debug, Clone, Default)]
pub struct Spare(Head);

impl Spare {
    /// Keeps `head`'s buffers instead, unless they are oversized.
    pub fn recycle(&mut self, head: Head) {
        if let Some(spare) = head.into_spare() {
            self.0 = spare;
        }
    }

    /// The buffers kept (empty if none), leaving none.
    pub fn take(&mut self) -> Head {
        std::mem::take(&mut self.0)
    }

    /// Whether it keeps any buffer worth pooling.
    pub fn holds_buffers(&self) -> bool {
        self.0.bytes.capacity() > 0 || self.0.fields.capacity() > 0
    }
}

impl Head {
    /// This head's buffers, emptied, to parse the next head into (no
    /// allocation while they are large enough); None when they grew past
    /// what a spare keeps.
    pub fn into_spare(mut self) -> Option<Head> {
        if self.bytes.capacity() > SPARE_HEAD_BYTES_MAX
            || self.fields.capacity() > SPARE_HEAD_FIELDS_MAX
        {
            return None;
        }
        self.bytes.clear();
        self.fields.clear();
        Some(self)
    }

    /// Fills this (spare) head with `bytes` and the fields httparse found
    /// in them.
    fn fill(&mut self, bytes: &[u8], headers: &[httparse::Header<'_>]) {
        self.bytes.clear();
        self.bytes.extend_from_slice(bytes);
        self.fields.clear();
        self.fields.extend(headers.iter().map(|h| Field {
            name: offset(bytes, h.name.as_bytes()),
            value: offset(bytes, h.value),
        }));
    }

    pub fn name(&self, f: &Field) -> &[u8] {
        &self.bytes[f.name.clone()]
    }

    pub fn value(&self, f: &Field) -> &[u8] {
        &self.bytes[f.value.clone()]
    }

    /// Every (name, value) in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter().map(|f| (self.name(f), self.value(f)))
    }

    /// Values of every field called `name` (case-insensitive).
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|f| self.name(f).eq_ignore_ascii_case(name.as_bytes()))
            .map(|f| self.value(f))
    }
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    Empty,
    Length(u64),
    Chunked,
}

/// How a response's body is framed, given the request it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    /// HEAD responses, 1xx, 204, 304.
    None,
    Length(u64),
    Chunked,
    /// No length: the body ends when the upstream closes.
    UntilClose,
    /// 101 to an upgrade, 2xx to CONNECT: bytes both ways from here on.
    Tunnel,
}

/// What the Connection and related fields ask of this hop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hop {
    pub keep_alive: bool,
    /// `Connection: upgrade` with an `Upgrade` field.
    pub upgrade: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// Field names listed in Connection (hop-by-hop; not forwarded).
    pub listed: Ranges,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub head: Head,
    pub method: Range<usize>,
    pub target: Range<usize>,
    pub version: Version,
    pub body: RequestBody,
    /// Transfer codings applied under `chunked` (gzip, ...), kept when
    /// the body is re-chunked on the way out.
    pub codings: Ranges,
    pub hop: Hop,
    /// The Host field's value (HTTP/1.1 requires exactly one).
    pub host: Option<Range<usize>>,
    /// The authority of an absolute-form target (RFC 9112 §3.2.2): it is
    /// the request's authority, whatever Host says (a conflicting Host is
    /// refused at parse).
    pub target_authority: Option<Range<usize>>,
    /// The origin-form target to route on and forward (path and query),
    /// when it is not the raw target: an absolute-form target rewritten,
    /// or a path [`RequestHead::normalize_path`] changed. None: the raw
    /// target is already that (the common case; no allocation).
    pub origin: Option<Box<[u8]>>,
}

impl RequestHead {
    pub fn method(&self) -> &[u8] {
        &self.head.bytes[self.method.clone()]
    }

    pub fn target(&self) -> &[u8] {
        &self.head.bytes[self.target.clone()]
    }

    pub fn host(&self) -> Option<&[u8]> {
        self.host.clone().map(|r| &self.head.bytes[r])
    }

    pub fn is_head(&self) -> bool {
        self.method() == b"HEAD"
    }

    pub fn is_connect(&self) -> bool {
        self.method() == b"CONNECT"
    }

    /// The target to route on and forward: origin-form (normalized once
    /// [`RequestHead::normalize_path`] ran), or the raw authority-form
    /// (CONNECT) or asterisk-form (OPTIONS) target.
    pub fn origin_target(&self) -> &[u8] {
        self.origin.as_deref().unwrap_or_else(|| self.target())
    }

    /// The path of [`RequestHead::origin_target`], without the query.
    pub fn path(&self) -> &[u8] {
        let t = self.origin_target();
        t.split(|&b| b == b'?').next().unwrap_or(t)
    }

    /// The request's authority: an absolute-form target's, else Host.
    pub fn authority(&self) -> Option<&[u8]> {
        self.target_authority
            .clone()
            .or_else(|| self.host.clone())
            .map(|r| &self.head.bytes[r])
    }

    /// Normalizes the path (see [`crate::route::path`]) so that routing,
    /// authorization and the upstream see one spelling; the query is kept
    /// as sent. Returns whether the path changed. Not for CONNECT or `*`.
    pub fn normalize_path(
        &mut self,
        opts: crate::route::path::PathOptions,
    ) -> Result<bool, crate::route::path::PathError> {
        let target = self.origin_target();
        if target.first() != Some(&b'/') {
            return Ok(false);
        }
        let split = target.iter().position(|&b| b == b'?');
        let (path, query) = target.split_at(split.unwrap_or(target.len()));
        let Some(mut normal) = crate::route::path::normalize(path, opts)? else {
            return Ok(false);
        };
        normal.extend_from_slice(query);
        self.origin = Some(normal.into_boxed_slice());
        Ok(true)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub head: Head,
    pub status: u16,
    pub reason: Range<usize>,
    pub version: Version,
    pub body: ResponseBody,
    /// Transfer codings applied under `chunked`, as for requests.
    pub codings: Ranges,
    pub hop: Hop,
}

impl ResponseHead {
    pub fn reason(&self) -> &[u8] {
        &self.head.bytes[self.reason.clone()]
    }

    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

pub(super) fn strip_scheme(t: &[u8]) -> Option<&[u8]> {
    for scheme in [&b"http://"[..], b"https://"] {
        if t.len() >= scheme.len() && t[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Some(&t[scheme.len()..]);
        }
    }
    None
}

fn offset(base: &[u8], part: &[u8]) -> Range<usize> {
    // Address arithmetic only (no dereference). httparse hands back
    // sub-slices of `base`, except a reason phrase with obs-text, which
    // it replaces by a static "": that, or anything else outside `base`,
    // becomes an empty range (found by the response_head fuzzer).
    let start = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize);
    match start {
        Some(start) if start + part.len() <= base.len() => start..start + part.len(),
        _ => 0..0,
    }
}

/// What the request was, as far as response framing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Head,
    Connect,
    Other,
}

impl RequestKind {
    pub fn of(req: &RequestHead) -> Self {
        if req.is_head() {
            RequestKind::Head
        } else if req.is_connect() {
            RequestKind::Connect
        } else {
            RequestKind::Other
        }
    }
}

/// Incremental response-head parser for one upstream exchange.
#[derive(Debug, Clone)]
pub struct ResponseParser {
    scanner: HeadScanner,
    limits: HeadLimits,
    /// Buffers of a finished head, parsed into next.
    pub spare: Spare,
}

impl ResponseParser {
    pub fn new(limits: HeadLimits) -> Self {
        Self {
            scanner: HeadScanner::new(),
            limits,
            spare: Spare::default(),
        }
    }

    /// Like [`RequestParser::parse`], for a response to a `request`.
    pub fn parse(
        &mut self,
        buf: &[u8],
        request: RequestKind,
    ) -> Result<Option<(ResponseHead, usize)>, HeadError> {
        let Some((start, end)) = self.scanner.scan(buf)? else {
            if buf.len() > self.limits.head_bytes {
                return Err(HeadError::HeadTooLarge);
            }
            return Ok(None);
        };
        self.scanner = HeadScanner::new();
        if start != 0 {
            return Err(HeadError::Syntax("empty line before the status line"));
        }
        if end > self.limits.head_bytes {
            return Err(HeadError::HeadTooLarge);
        }
        let into = self.spare.take();
        let head = parse_response(&buf[..end], &self.limits, request, into)?;
        Ok(Some((head, end)))
    }
}

fn parse_response(
    bytes: &[u8],
    limits: &HeadLimits,
    request: RequestKind,
    mut head: Head,
) -> Result<ResponseHead, HeadError> {
    // Uninitialised slots: initialising 256 headers (8 KiB) per parse
    // cost more than parsing a typical head.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; HTTP1_HEADERS_MAX];
    let slots = &mut slots[..limits.headers.min(HTTP1_HEADERS_MAX)];
    let mut res = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, bytes, slots)
    {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Syntax("incomplete head")),
        Err(e) => return Err(httparse_error(e)),
    }
    let version = match res.version {
        Some(0) => Version::Http10,
        Some(1) => Version::Http11,
        _ => return Err(HeadError::Version),
    };
    let status = res.code.unwrap_or_default();
    if !(100..=599).contains(&status) {
        return Err(HeadError::Syntax("status code out of range"));
    }
    let reason = offset(bytes, res.reason.unwrap_or_default().as_bytes());
    head.fill(bytes, res.headers);
    let semantics = Semantics::read(&head)?;
    let (body, codings) = semantics.response_body(status, request, version, &head)?;
    let hop = semantics.hop(version, &head);
    Ok(ResponseHead {
        head,
        status,
        reason,
        version,
        body,
        codings,
        hop,
    })
}

/// Incremental request-head parser for one connection.
#[derive(Debug, Clone)]
pub struct RequestParser {
    scanner: HeadScanner,
    limits: HeadLimits,
    /// Buffers of a finished head, parsed into next.
    pub spare: Spare,
}

impl RequestParser {
    pub fn new(limits: HeadLimits) -> Self {
        Self {
            scanner: HeadScanner::new(),
            limits,
            spare: Spare::default(),
        }
    }

    /// Feeds the buffered input (always from the same start). Returns the
    /// head and the bytes it used once complete; then the parser is reset
    /// for the next request on the connection.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
        let Some((start, end)) = self.scanner.scan(buf)? else {
            if !self.scanner.past_first_line() && buf.len() > self.limits.uri_bytes + 64 {
                return Err(HeadError::UriTooLong);
            }
            if buf.len() > self.limits.head_bytes {
                return Err(HeadError::HeadTooLarge);
            }
            return Ok(None);
        };
        self.scanner = HeadScanner::new();
        if end - start > self.limits.head_bytes {
            return Err(HeadError::HeadTooLarge);
        }
        let into = self.spare.take();
        let head = parse_request(&buf[start..end], &self.limits, into)?;
        Ok(Some((head, end)))
    }
}

fn parse_request(
    bytes: &[u8],
    limits: &HeadLimits,
    mut head: Head,
) -> Result<RequestHead, HeadError> {
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; HTTP1_HEADERS_MAX];
    let slots = &mut slots[..limits.headers.min(HTTP1_HEADERS_MAX)];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(bytes, slots) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Syntax("incomplete head")),
        Err(e) => return Err(httparse_error(e)),
    }
    let version = match req.version {
        Some(0) => Version::Http10,
        Some(1) => Version::Http11,
        _ => return Err(HeadError::Version),
    };
    let method = offset(bytes, req.method.unwrap_or_default().as_bytes());
    let target_str = req.path.unwrap_or_default();
    if target_str.len() > limits.uri_bytes {
        return Err(HeadError::UriTooLong);
    }
    let target = offset(bytes, target_str.as_bytes());
    let method_bytes = &bytes[method.clone()];
    check_target(method_bytes, &bytes[target.clone()])?;
    head.fill(bytes, req.headers);
    let semantics = Semantics::read(&head)?;
    let host = match (version, semantics.hosts.as_slice()) {
        (_, []) if version == Version::Http11 => return Err(HeadError::Host("missing")),
        (_, []) => None,
        (_, [one]) => {
            check_host(&head.bytes[one.clone()])?;
            Some(one.clone())
        }
        _ => return Err(HeadError::Host("more than one Host field")),
    };
    let (target_authority, origin) = absolute_form(&head.bytes, target.clone())?;
    if let (Some(a), Some(h)) = (&target_authority, &host) {
        let scheme_port = if head.bytes[target.clone()][..5].eq_ignore_ascii_case(b"https") {
            443
        } else {
            80
        };
        if !same_authority(&head.bytes[a.clone()], &head.bytes[h.clone()], scheme_port) {
            return Err(HeadError::Host(
                "Host differs from the absolute-form target's authority",
            ));
        }
    }
    let (body, codings) = semantics.request_body(version, &head)?;
    let hop = semantics.hop(version, &head);
    Ok(RequestHead {
        method,
        target,
        version,
        body,
        codings,
        hop,
        host,
        target_authority,
        origin,
        head,
    })
}

/// An absolute-form target's authority range and origin-form target.
type AbsoluteForm = (Option<Range<usize>>, Option<Box<[u8]>>);

/// For an absolute-form target (`http://a:80/p?q`): the authority's range
/// and the origin-form target (`/p?q`, `/` when the path is empty). Other
/// forms: (None, None). An empty or invalid authority is refused.
fn absolute_form(bytes: &[u8], target: Range<usize>) -> Result<AbsoluteForm, HeadError> {
    let t = &bytes[target.clone()];
    let Some(rest) = strip_scheme(t) else {
        return Ok((None, None));
    };
    let start = target.start + (t.len() - rest.len());
    let len = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    let authority = &rest[..len];
    if authority.is_empty() || check_host(authority).is_err() {
        return Err(HeadError::Syntax(
            "invalid authority in absolute-form target",
        ));
    }
    let tail = &rest[len..];
    let origin: Box<[u8]> = if tail.first() == Some(&b'/') {
        tail.into()
    } else {
        [b"/", tail].concat().into_boxed_slice()
    };
    Ok((Some(start..start + len), Some(origin)))
}

/// Whether two authorities name the same host and port, the port defaulting
/// to the scheme's (`a` and `A:80` are the same for http).
fn same_authority(a: &[u8], b: &[u8], default_port: u16) -> bool {
    let split = |v: &[u8]| -> (Vec<u8>, Option<u16>) {
        let host = crate::route::host_without_port(v);
        let port = &v[host.len()..];
        let port = match port.strip_prefix(b":") {
            None | Some(b"") => Some(default_port),
            Some(p) => std::str::from_utf8(p).ok().and_then(|p| p.parse().ok()),
        };
        (host.to_ascii_lowercase(), port)
    };
    let (a, b) = (split(a), split(b));
    a.1.is_some() && a == b
}

fn httparse_error(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        httparse::Error::Version => HeadError::Version,
        httparse::Error::HeaderName => HeadError::Syntax("invalid field name"),
        httparse::Error::HeaderValue => HeadError::Syntax("invalid field value"),
        httparse::Error::NewLine => HeadError::BareLf,
        httparse::Error::Status => HeadError::Syntax("invalid status"),
        httparse::Error::Token => HeadError::Syntax("invalid method or target"),
    }
}

/// RFC 9112 §3.2: origin-form, absolute-form, authority-form (CONNECT
/// only), asterisk-form (OPTIONS only).
fn check_target(method: &[u8], target: &[u8]) -> Result<(), HeadError> {
    let ok = match target.first() {
        _ if method == b"CONNECT" => {
            !target.is_empty() && !target.contains(&b'/') && target.contains(&b':')
        }
        Some(b'/') => true,
        Some(b'*') => target == b"*" && method == b"OPTIONS",
        Some(_) => strip_scheme(target).is_some_and(|rest| !rest.is_empty()),
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(HeadError::Syntax("invalid request-target form"))
    }
}

/// A Host value is `host[:port]` with no whitespace or path characters.
pub(super) fn check_host(v: &[u8]) -> Result<(), HeadError> {
    let ok = v
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(HeadError::Host("invalid characters"))
    }
}

/// The framing-relevant fields of one head, gathered in one pass.
#[derive(Debug, Default)]
struct Semantics {
    content_lengths: Ranges,
    /// Each transfer coding named, in order, over all TE fields.
    codings: Ranges,
    has_te: bool,
    hosts: Ranges,
    connection: Ranges,
    has_upgrade_field: bool,
    expect_continue: bool,
}

impl Semantics {
    fn read(head: &Head) -> Result<Self, HeadError> {
        let mut s = Semantics::default();
        for f in &head.fields {
            let name = head.name(f);
            let value = head.value(f);
            let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
            // Length first: this runs for every field of every message.
            match name.len() {
                14 if is(b"content-length") => s.content_lengths.push(f.value.clone()),
                17 if is(b"transfer-encoding") => {
                    s.has_te = true;
                    s.codings.extend(list_items(value, f.value.start));
                }
                4 if is(b"host") => s.hosts.push(f.value.clone()),
                10 if is(b"connection") => s.connection.extend(list_items(value, f.value.start)),
                7 if is(b"upgrade") => s.has_upgrade_field = true,
                6 if is(b"expect") => {
                    s.expect_continue |= value.eq_ignore_ascii_case(b"100-continue")
                }
                _ => {}
            }
        }
        Ok(s)
    }

    /// The single valid Content-Length, if any.
    fn content_length(&self, head: &Head) -> Result<Option<u64>, HeadError> {
        match self.content_lengths.as_slice() {
            [] => Ok(None),
            [one] => parse_length(&head.bytes[one.clone()]).map(Some),
            _ => Err(HeadError::Framing("several Content-Length fields")),
        }
    }

    /// Checks that Transfer-Encoding ends in exactly one `chunked`, with
    /// only registered codings before it; returns those inner codings
    /// (their names, kept when the body is re-chunked). Parameters on a
    /// coding (`chunked;x`) are ignored: we re-frame, so no peer after us
    /// ever sees them.
    fn chunked(&self, head: &Head) -> Result<Ranges, HeadError> {
        let names: Ranges = self
            .codings
            .iter()
            .map(|r| coding_name(&head.bytes, r.clone()))
            .collect();
        let Some((last, inner)) = names.split_last() else {
            return Err(HeadError::Framing("empty Transfer-Encoding"));
        };
        if !head.bytes[last.clone()].eq_ignore_ascii_case(b"chunked") {
            return Err(HeadError::Framing("final transfer coding is not chunked"));
        }
        let mut kept = Ranges::new();
        for coding in inner {
            let c = &head.bytes[coding.clone()];
            // `identity` (RFC 2616) changes nothing; accepted and dropped.
            if c.eq_ignore_ascii_case(b"identity") {
                continue;
            }
            if c.eq_ignore_ascii_case(b"chunked") {
                return Err(HeadError::Framing("chunked applied more than once"));
            }
            // RFC 9110 §8.4.1 registry; anything else: 501.
            let known = [
                &b"gzip"[..],
                b"x-gzip",
                b"deflate",
                b"compress",
                b"x-compress",
            ];
            if !known.iter().any(|k| c.eq_ignore_ascii_case(k)) {
                return Err(HeadError::UnsupportedCoding);
            }
            kept.push(coding.clone());
        }
        Ok(kept)
    }

    /// RFC 9112 §6.3 for requests: chunked, a length, or no body; and
    /// the codings applied under chunked.
    fn request_body(
        &self,
        version: Version,
        head: &Head,
    ) -> Result<(RequestBody, Ranges), HeadError> {
        if self.has_te {
            self.check_te_alone(version)?;
            let inner = self.chunked(head)?;
            return Ok((RequestBody::Chunked, inner));
        }
        let body = match self.content_length(head)? {
            None => RequestBody::Empty,
            Some(n) => RequestBody::Length(n),
        };
        Ok((body, Ranges::new()))
    }

    fn check_te_alone(&self, version: Version) -> Result<(), HeadError> {
        if version == Version::Http10 {
            return Err(HeadError::Framing("Transfer-Encoding in HTTP/1.0"));
        }
        if !self.content_lengths.is_empty() {
            return Err(HeadError::Framing("Content-Length with Transfer-Encoding"));
        }
        Ok(())
    }

    /// RFC 9112 §6.3 for responses. Where the RFC lets a recipient guess
    /// (TE with CL, TE on 1.0, several lengths), we refuse: the caller
    /// answers 502 instead of forwarding something a peer could read twice.
    fn response_body(
        &self,
        status: u16,
        request: RequestKind,
        version: Version,
        head: &Head,
    ) -> Result<(ResponseBody, Ranges), HeadError> {
        if request == RequestKind::Connect && (200..300).contains(&status) {
            return Ok((ResponseBody::Tunnel, Ranges::new()));
        }
        if status == 101 {
            return Ok((ResponseBody::Tunnel, Ranges::new()));
        }
        if (100..200).contains(&status)
            || status == 204
            || status == 304
            || request == RequestKind::Head
        {
            // No body whatever the fields say; still refuse contradictions.
            if self.has_te {
                self.check_te_alone(version)?;
            }
            self.content_length(head)?;
            return Ok((ResponseBody::None, Ranges::new()));
        }
        if self.has_te {
            self.check_te_alone(version)?;
            let inner = self.chunked(head)?;
            return Ok((ResponseBody::Chunked, inner));
        }
        let body = match self.content_length(head)? {
            Some(n) => ResponseBody::Length(n),
            None => ResponseBody::UntilClose,
        };
        Ok((body, Ranges::new()))
    }

    fn hop(&self, version: Version, head: &Head) -> Hop {
        let has = |token: &[u8]| {
            self.connection
                .iter()
                .any(|r| head.bytes[r.clone()].eq_ignore_ascii_case(token))
        };
        let keep_alive = match version {
            Version::Http11 => !has(b"close"),
            Version::Http10 => has(b"keep-alive") && !has(b"close"),
        };
        Hop {
            keep_alive,
            upgrade: has(b"upgrade") && self.has_upgrade_field,
            expect_continue: self.expect_continue && version == Version::Http11,
            listed: self.connection.clone(),
        }
    }
}

/// Splits a comma-separated list value into trimmed, non-empty items,
/// as ranges offset by `base`.
fn list_items(value: &[u8], base: usize) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut pos = 0;
    value.split(|&b| b == b',').filter_map(move |item| {
        let start = pos;
        pos += item.len() + 1;
        let lead = item
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
        let trail = item[lead..]
            .iter()
            .rev()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
        let len = item.len() - lead - trail;
        (len > 0).then(|| base + start + lead..base + start + lead + len)
    })
}

/// The name part of a transfer-coding list item (before any `;`), trimmed.
fn coding_name(bytes: &[u8], item: Range<usize>) -> Range<usize> {
    let text = &bytes[item.clone()];
    let end = text.iter().position(|&b| b == b';').unwrap_or(text.len());
    let trimmed = text[..end]
        .iter()
        .rev()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count();
    item.start..item.start + end - trimmed
}

/// Content-Length = 1*DIGIT, nothing else (no sign, space, list, hex).
fn parse_length(v: &[u8]) -> Result<u64, HeadError> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return Err(HeadError::Framing("Content-Length is not a plain number"));
    }
    v.iter()
        .try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or(HeadError::Framing("Content-Length overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(input: &[u8]) -> Result<RequestHead, HeadError> {
        let mut p = RequestParser::new(HeadLimits::default());
        match p.parse(input)? {
            Some((head, used)) => {
                assert_eq!(used, input.len(), "test inputs are exactly one head");
                Ok(head)
            }
            None => Err(HeadError::Syntax("incomplete (test)")),
        }
    }

    fn res(input: &[u8], kind: RequestKind) -> Result<ResponseHead, HeadError> {
        let mut p = ResponseParser::new(HeadLimits::default());
        match p.parse(input, kind)? {
            Some((head, _)) => Ok(head),
            None => Err(HeadError::Syntax("incomplete (test)")),
        }
    }

    /// A recycled head's buffers are parsed into again, hold nothing of
    /// the previous head, and are not kept once oversized.
    #[test]
    fn recycled_heads_are_reused_whole_and_bounded() {
        let mut p = RequestParser::new(HeadLimits::default());
        let first = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nX-Old: 1\r\n\r\n";
        let (head, _) = p.parse(first).unwrap().unwrap();
        let bytes = head.head.bytes.as_ptr();
        p.spare.recycle(head.head);
        let second = b"GET /b HTTP/1.1\r\nHost: b\r\n\r\n";
        let (head, _) = p.parse(second).unwrap().unwrap();
        assert_eq!(head.head.bytes.as_ptr(), bytes, "the same buffer, reused");
        assert_eq!(head.head.bytes, second.to_vec());
        assert_eq!(head.head.fields.len(), 1, "no field of the first head");
        assert_eq!(head.head.get("host"), Some(&b"b"[..]));
        assert_eq!(head.body, RequestBody::Empty);
        assert_eq!(head.target(), b"/b");
        // A head that grew past the spare's bound is freed, not kept.
        let mut big = head.head;
        big.bytes.reserve(SPARE_HEAD_BYTES_MAX + 1);
        p.spare.recycle(big);
        let (head, _) = p.parse(second).unwrap().unwrap();
        assert!(
            head.head.bytes.capacity() <= SPARE_HEAD_BYTES_MAX,
            "oversized: not reused"
        );
        // Responses too, through a parser made with a spare.
        let mut r = ResponseParser::new(HeadLimits::default());
        let a = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nX-B: 2\r\n\r\n";
        let (resp, _) = r.parse(a, RequestKind::Other).unwrap().unwrap();
        let fields = resp.head.fields.as_ptr();
        r.spare.recycle(resp.head);
        let b = b"HTTP/1.1 204 No Content\r\n\r\n";
        let (resp, _) = r.parse(b, RequestKind::Other).unwrap().unwrap();
        assert_eq!((resp.status, resp.body), (204, ResponseBody::None));
        assert!(resp.head.fields.is_empty());
        r.spare.recycle(resp.head);
        let spare = r.spare.take();
        assert_eq!(spare.fields.as_ptr(), fields, "handed on for the pool");
        assert!(spare.bytes.is_empty() && spare.fields.is_empty());
    }

    #[test]
    fn request_framing_table() {
        use RequestBody::*;
        let ok: &[(&[u8], RequestBody)] = &[
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Empty),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
                Length(5),
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length: 0\r\n\r\n",
                Length(0),
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                Chunked,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: CHUNKED\r\n\r\n",
                Chunked,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Chunked,
            ),
            (b"POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\n", Length(3)),
            (b"GET http://a/x?y HTTP/1.1\r\nHost: a\r\n\r\n", Empty),
            (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", Empty),
            (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", Empty),
        ];
        for (input, want) in ok {
            let r =
                req(input).unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(input)));
            assert_eq!(r.body, *want, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn request_attacks_table() {
        use HeadError::*;
        let bad: &[(&[u8], HeadError)] = &[
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", Framing("Content-Length with Transfer-Encoding")),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", Framing("several Content-Length fields")),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", Framing("several Content-Length fields")),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n", Framing("Content-Length is not a plain number")),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", Framing("Content-Length is not a plain number")),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n", Framing("Content-Length is not a plain number")),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\n\r\n", Framing("Content-Length is not a plain number")),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", Framing("Content-Length overflows")),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", Framing("final transfer coding is not chunked")),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", Framing("final transfer coding is not chunked")),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: br, chunked\r\n\r\n", UnsupportedCoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ;chunked\r\n\r\n", Framing("final transfer coding is not chunked")),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", Framing("chunked applied more than once")),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", Framing("final transfer coding is not chunked")),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", Framing("Transfer-Encoding in HTTP/1.0")),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", ObsFold),
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", BareLf),
            (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", BareCr),
            (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", Syntax("invalid field name")),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", Syntax("invalid field value")),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", Syntax("invalid field value")),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX\x01Y: b\r\n\r\n", Syntax("invalid field name")),
            (b"GET / HTTP/1.1\r\n\r\n", Host("missing")),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", Host("more than one Host field")),
            (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", Host("invalid characters")),
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", Version),
            (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", Syntax("invalid method or target")),
            (b"GET x HTTP/1.1\r\nHost: a\r\n\r\n", Syntax("invalid request-target form")),
            (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", Syntax("invalid request-target form")),
        ];
        for (input, want) in bad {
            assert_eq!(
                req(input).err(),
                Some(*want),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn absolute_form_authority_wins_and_must_agree_with_host() {
        let r =
            req(b"GET http://A.example:80/x/../y?q=1 HTTP/1.1\r\nHost: a.example\r\n\r\n").unwrap();
        assert_eq!(r.authority(), Some(&b"A.example:80"[..]));
        assert_eq!(r.origin_target(), b"/x/../y?q=1");
        let r = req(b"GET https://a:443 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(r.origin_target(), b"/");
        let r = req(b"GET http://a/p HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!((r.authority(), r.path()), (Some(&b"a"[..]), &b"/p"[..]));
        for bad in [
            &b"GET http://a/x HTTP/1.1\r\nHost: b\r\n\r\n"[..],
            b"GET http://a:8080/x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET https://a/x HTTP/1.1\r\nHost: a:80\r\n\r\n",
        ] {
            assert_eq!(
                req(bad).err(),
                Some(HeadError::Host(
                    "Host differs from the absolute-form target's authority"
                )),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            req(b"GET http://u@a/x HTTP/1.1\r\nHost: a\r\n\r\n"),
            Err(HeadError::Syntax(_))
        ));
    }

    #[test]
    fn normalize_path_keeps_the_query_and_rewrites_only_when_needed() {
        let opts = crate::route::path::PathOptions::default();
        let mut r = req(b"GET /a/./b?x=/../y HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(r.normalize_path(opts), Ok(true));
        assert_eq!(r.origin_target(), b"/a/b?x=/../y");
        assert_eq!(r.path(), b"/a/b");
        let mut r = req(b"GET /a/b HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(r.normalize_path(opts), Ok(false));
        assert!(r.origin.is_none());
        let mut r = req(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n").unwrap();
        assert_eq!(r.normalize_path(opts), Ok(false));
    }

    #[test]
    fn request_limits_give_431_and_414() {
        let limits = HeadLimits {
            head_bytes: 256,
            headers: 4,
            uri_bytes: 64,
        };
        let mut many = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for i in 0..5 {
            many.extend_from_slice(format!("X{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let e = RequestParser::new(limits).parse(&many).unwrap_err();
        assert_eq!((e, e.request_status()), (HeadError::TooManyHeaders, 431));
        let big = [b"GET / HTTP/1.1\r\nHost: a\r\nX: ".as_slice(), &[b'y'; 300]].concat();
        let e = RequestParser::new(limits).parse(&big).unwrap_err();
        assert_eq!((e, e.request_status()), (HeadError::HeadTooLarge, 431));
        let long = [b"GET /".as_slice(), &[b'a'; 200]].concat();
        let e = RequestParser::new(limits).parse(&long).unwrap_err();
        assert_eq!((e, e.request_status()), (HeadError::UriTooLong, 414));
    }

    #[test]
    fn every_prefix_is_incomplete_then_the_same_head() {
        let m = b"POST /p?q HTTP/1.1\r\nHost: example\r\nContent-Length: 3\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\n\r\n";
        let whole = req(m).unwrap();
        let mut incremental = RequestParser::new(HeadLimits::default());
        for cut in 0..m.len() {
            assert_eq!(
                RequestParser::new(HeadLimits::default()).parse(&m[..cut]),
                Ok(None),
                "prefix {cut}"
            );
            assert_eq!(incremental.parse(&m[..cut]), Ok(None), "incremental {cut}");
        }
        let (again, used) = incremental.parse(m).unwrap().unwrap();
        assert_eq!(used, m.len());
        assert_eq!(again, whole);
        assert_eq!(whole.path(), b"/p");
        assert_eq!(whole.host(), Some(&b"example"[..]));
        assert!(whole.hop.keep_alive);
        assert_eq!(whole.hop.listed.len(), 2);
    }

    #[test]
    fn connection_semantics() {
        let r = req(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").unwrap();
        assert!(!r.hop.keep_alive);
        let r = req(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(!r.hop.keep_alive);
        let r = req(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap();
        assert!(r.hop.keep_alive);
        let r =
            req(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                .unwrap();
        assert!(r.hop.upgrade);
        let r = req(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n").unwrap();
        assert!(
            !r.hop.upgrade,
            "Upgrade without Connection: upgrade is not an upgrade"
        );
        let r =
            req(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
                .unwrap();
        assert!(r.hop.expect_continue);
    }

    #[test]
    fn response_framing_table() {
        use RequestKind::*;
        use ResponseBody::*;
        let cases: &[(&[u8], RequestKind, ResponseBody)] = &[
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Other, Length(5)),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", Other, Chunked),
            (b"HTTP/1.1 200 OK\r\n\r\n", Other, UntilClose),
            (b"HTTP/1.0 200 OK\r\n\r\n", Other, UntilClose),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Head, None),
            (b"HTTP/1.1 204 No Content\r\n\r\n", Other, None),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n", Other, None),
            (b"HTTP/1.1 100 Continue\r\n\r\n", Other, None),
            (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", Other, Tunnel),
            (b"HTTP/1.1 200 Connection established\r\n\r\n", Connect, Tunnel),
            (b"HTTP/1.1 407 Auth\r\nContent-Length: 0\r\n\r\n", Connect, Length(0)),
        ];
        for (input, kind, want) in cases {
            let r = res(input, *kind)
                .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(input)));
            assert_eq!(r.body, *want, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn response_attacks_table() {
        let bad: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.1 99 Low\r\n\r\n",
            b"HTTP/1.1 600 High\r\n\r\n",
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ];
        for input in bad {
            assert!(
                res(input, RequestKind::Other).is_err(),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
