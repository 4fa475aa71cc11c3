//! An HTTP/1.1 client as the pipeline's [`Downstream`]: its request body
//! decoded from the connection, the response written back as HTTP/1.1
//! (used when the upstream speaks h2).
//!
//! What must hold: the response's framing is ours: Content-Length when
//! the upstream gave one, else chunked for HTTP/1.1 clients and
//! close-delimited for HTTP/1.0 ones; the connection is kept only when
//! the client asked for it, the request body was read in full, and the
//! worker's generation is not retiring. Trailers go both ways on a
//! chunked body: the client's trailer section becomes the request's
//! trailers, and an upstream's trailers end a chunked response (they are
//! dropped only where the framing has no room for them: a Content-Length
//! or close-delimited body).

use std::{io, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::{
    body::{BodyError, Side},
    inbound::write_all_within,
    pipeline::{BodyKind, Downstream, H1Body},
    Client,
};
use crate::{
    http1::{
        chunked::{write_chunk_size, CHUNK_END},
        write::OutBody,
        RequestBody, RequestHead, ResponseBody, Version,
    },
    worker::Worker,
};

pub struct H1Down<'a> {
    pub worker: &'a Worker,
    pub client: &'a mut Client,
    body: H1Body,
    limit: Option<u64>,
    body_done: bool,
    http11: bool,
    head: bool,
    wants_keep_alive: bool,
    /// The client sent `Expect: 100-continue` and has not had its `100`
    /// yet: it gets one when its body is first wanted and none of it came
    /// yet (as nginx does), so it never waits on an upstream that would
    /// not send one.
    expects_continue: bool,
    out: OutBody,
    /// Decided when the head was written.
    pub keep_alive: bool,
    idle: Duration,
}

impl<'a> H1Down<'a> {
    pub fn new(
        worker: &'a Worker,
        client: &'a mut Client,
        req: &RequestHead,
        limit: Option<u64>,
        idle: Duration,
    ) -> Self {
        let (kind, body_done) = match req.body {
            RequestBody::Empty | RequestBody::Length(0) => (ResponseBody::None, true),
            RequestBody::Length(n) => (ResponseBody::Length(n), false),
            RequestBody::Chunked => (ResponseBody::Chunked, false),
        };
        Self {
            worker,
            client,
            body: H1Body::new(kind, Side::Downstream),
            limit,
            body_done,
            http11: req.version == Version::Http11,
            head: req.is_head(),
            wants_keep_alive: req.hop.keep_alive,
            expects_continue: req.hop.expect_continue,
            out: OutBody::None,
            keep_alive: false,
            idle,
        }
    }

    async fn write(&mut self, out: Vec<u8>) -> io::Result<()> {
        let client = &mut *self.client;
        let (r, buf) =
            write_all_within(&mut client.writes, &mut client.stream, out, self.idle).await;
        self.worker.heads.give(buf);
        r
    }
}

impl Downstream for H1Down<'_> {
    fn take_h2_body(&mut self) -> Option<h2::RecvStream> {
        None
    }

    async fn body_chunk(&mut self, idle: Duration) -> Result<Option<Bytes>, BodyError> {
        // A client that sent body bytes with its head is not waiting for
        // the 100 (RFC 9110 §10.1.1 lets the server omit it then).
        if self.expects_continue && !self.client.inbound.is_empty() {
            self.expects_continue = false;
        }
        if self.expects_continue && !self.body_done {
            let sent = self
                .interim(StatusCode::CONTINUE, HeaderMap::new())
                .await
                .map_err(|e| BodyError::Io(Side::Downstream, e))?;
            if sent {
                self.worker.counters.http.response(100);
            }
        }
        let client = &mut *self.client;
        let piece = self
            .body
            .next(&mut client.inbound, &mut client.stream, idle, self.limit)
            .await?;
        if piece.is_none() {
            self.body_done = true;
        }
        Ok(piece)
    }

    fn release(&mut self, _n: usize) {}

    async fn request_trailers(&mut self, _idle: Duration) -> Result<Option<HeaderMap>, BodyError> {
        Ok(self.body.trailers())
    }

    async fn interim(&mut self, status: StatusCode, headers: HeaderMap) -> io::Result<bool> {
        // HTTP/1.0 has no interim responses.
        if !self.http11 || (status == StatusCode::CONTINUE && !self.expects_continue) {
            return Ok(false);
        }
        if status == StatusCode::CONTINUE {
            self.expects_continue = false;
        }
        let mut out = self.worker.heads.take();
        crate::http2::headers::response_to_h1(status, &headers, OutBody::None, true, &mut out);
        self.write(out).await.map(|()| true)
    }

    async fn respond(
        &mut self,
        status: StatusCode,
        headers: HeaderMap,
        body: BodyKind,
    ) -> io::Result<()> {
        self.out = match body {
            _ if self.head => OutBody::None,
            BodyKind::Empty => OutBody::None,
            BodyKind::Length(n) => OutBody::Length(n),
            BodyKind::Streamed if self.http11 => OutBody::Chunked,
            BodyKind::Streamed => OutBody::Close,
        };
        self.keep_alive = self.wants_keep_alive
            && self.body_done
            && self.out != OutBody::Close
            && self.worker.keep_alive_ok();
        let mut out = self.worker.heads.take();
        crate::http2::headers::response_to_h1(
            status,
            &headers,
            self.out,
            self.keep_alive,
            &mut out,
        );
        self.write(out).await
    }

    async fn data(&mut self, data: Bytes) -> io::Result<()> {
        let mut out = self.worker.heads.take();
        match self.out {
            OutBody::None => {
                self.worker.heads.give(out);
                return Ok(());
            }
            OutBody::Chunked => {
                write_chunk_size(data.len(), &mut out);
                out.extend_from_slice(&data);
                out.extend_from_slice(CHUNK_END);
            }
            OutBody::Length(_) | OutBody::Close => out.extend_from_slice(&data),
        }
        self.write(out).await
    }

    async fn finish(&mut self, trailers: Option<HeaderMap>) -> io::Result<()> {
        if self.out != OutBody::Chunked {
            return Ok(());
        }
        let mut out = self.worker.heads.take();
        let policy = crate::http1::chunked::Trailers::Response;
        crate::http2::headers::write_last_chunk(trailers.as_ref(), policy, &mut out);
        self.write(out).await
    }

    async fn cancelled(&mut self) -> h2::Reason {
        std::future::pending().await
    }

    fn reset(&mut self, _reason: h2::Reason) {
        // The caller closes the connection on a cut response.
        self.keep_alive = false;
    }

    fn note(&mut self) -> &mut super::Note {
        &mut self.client.note
    }
}

/// Forwards an HTTP/1.1 client's request through the pipeline (its
/// cluster speaks h2); says what the client connection does next.
pub async fn forward(
    worker: &Worker,
    http: &crate::config::http::HttpListener,
    route: Option<&crate::config::http::Route>,
    cluster_index: usize,
    client: &mut Client,
    req: &RequestHead,
    idle: Duration,
) -> Result<super::Next, super::exchange::Failure> {
    use crate::http2::{grpc, headers};
    let (method, uri, h) =
        headers::request_from_h1(req, "http").map_err(|e| super::exchange::Failure::Generated {
            reason: crate::metrics::ErrorReason::BadRequest,
            detail: e.to_string(),
            close: true,
        })?;
    let body = match req.body {
        RequestBody::Empty | RequestBody::Length(0) => BodyKind::Empty,
        RequestBody::Length(n) => BodyKind::Length(n),
        RequestBody::Chunked => BodyKind::Streamed,
    };
    let request = super::pipeline::Request {
        grpc: grpc::is_grpc(req.head.get("content-type")),
        grpc_timeout: req.head.get("grpc-timeout").and_then(grpc::parse_timeout),
        method,
        uri,
        headers: h,
        body,
    };
    // Copied: the downstream borrows the client for the whole exchange.
    let ip = client.ip.clone();
    let identity = client.identity.clone();
    let origin = super::pipeline::Origin {
        client_ip: &ip,
        tls: client.stream.is_tls(),
        identity: identity.as_ref().map(|i| i.as_str()),
    };
    let mut down = H1Down::new(worker, client, req, http.body_bytes_max, idle);
    super::pipeline::forward(
        worker,
        http,
        route,
        cluster_index,
        &origin,
        request,
        &mut down,
        idle,
    )
    .await?;
    Ok(if down.keep_alive {
        super::Next::KeepAlive
    } else {
        super::Next::Close
    })
}
