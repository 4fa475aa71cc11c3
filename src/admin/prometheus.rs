//! The Prometheus text exposition format (version 0.0.4): counters per
//! core; the golden metrics by mesh labels, summed over cores; the exact
//! latency histograms merged over cores, one family per measurement, in
//! seconds (base units, as `promtool check metrics` wants), with
//! p50/p90/p99/p99.9 as summaries.

use std::fmt::Write;

use crate::{
    metrics::{golden, histograms, ErrorReason, Snapshot},
    worker::{HistogramReport, WorkerReport},
};

/// Bucket bounds in µs (served in seconds): 50 µs to 10 s, about three
/// per decade.
const BUCKETS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

type Field = (&'static str, &'static str, fn(&Snapshot) -> u64);

/// (name, help, value) for every per-core counter.
const COUNTERS: &[Field] = &[
    (
        "connections_accepted_total",
        "Client connections accepted.",
        |s| s.connections_accepted,
    ),
    (
        "connections_unrouted_total",
        "Client connections closed because no upstream accepted.",
        |s| s.connections_unrouted,
    ),
    (
        "bytes_downstream_to_upstream_total",
        "L4 bytes copied client to upstream.",
        |s| s.bytes_downstream_to_upstream,
    ),
    (
        "bytes_upstream_to_downstream_total",
        "L4 bytes copied upstream to client.",
        |s| s.bytes_upstream_to_downstream,
    ),
    (
        "connect_failures_total",
        "Failed upstream connect attempts (L4).",
        |s| s.connect_failures,
    ),
    (
        "connect_timeouts_total",
        "Upstream connect attempts that timed out (L4).",
        |s| s.connect_timeouts,
    ),
    (
        "idle_timeouts_total",
        "Connections closed by the idle timeout.",
        |s| s.idle_timeouts,
    ),
    (
        "drain_cut_total",
        "Connections cut when the drain timeout ran out.",
        |s| s.drain_cut,
    ),
    (
        "accept_errors_total",
        "Accept errors (such as fd exhaustion).",
        |s| s.accept_errors,
    ),
    (
        "task_panics_total",
        "Connection tasks that panicked; the worker kept serving.",
        |s| s.task_panics,
    ),
    (
        "access_log_lines_total",
        "Access log lines handed to the writer.",
        |s| s.access_log_lines,
    ),
    (
        "access_log_dropped_total",
        "Access log lines dropped because the writer fell behind.",
        |s| s.access_log_dropped,
    ),
    (
        "trace_spans_total",
        "Spans recorded by sampled requests.",
        |s| s.trace_spans,
    ),
    (
        "trace_spans_dropped_total",
        "Spans dropped because the exporter's queue was full (core=\"exporter\": not delivered to the collector).",
        |s| s.trace_spans_dropped,
    ),
    ("http_requests_total", "HTTP requests received.", |s| {
        s.http.requests
    }),
    ("http_retries_total", "HTTP request retries.", |s| {
        s.http.retries
    }),
    (
        "http_retries_over_budget_total",
        "Retries refused by the retry budget.",
        |s| s.http.retries_over_budget,
    ),
    (
        "http_upstream_connects_total",
        "New upstream HTTP connections.",
        |s| s.http.upstream_connects,
    ),
    (
        "http_pool_reuses_total",
        "Requests sent on a pooled upstream connection.",
        |s| s.http.pool_reuses,
    ),
    (
        "http_ejections_total",
        "Endpoints ejected by outlier detection.",
        |s| s.http.ejections,
    ),
    (
        "http_health_checks_ok_total",
        "Active health checks passed.",
        |s| s.http.health_checks_ok,
    ),
    (
        "http_health_checks_failed_total",
        "Active health checks failed.",
        |s| s.http.health_checks_failed,
    ),
    (
        "http_responses_cut_total",
        "Responses cut off midway.",
        |s| s.http.responses_cut,
    ),
    (
        "http_paths_normalized_total",
        "Requests whose path was rewritten to its normal form before routing.",
        |s| s.http.paths_normalized,
    ),
    (
        "http2_connections_total",
        "HTTP/2 client connections served (h2c prior knowledge or ALPN h2).",
        |s| s.http.h2_connections,
    ),
    (
        "http2_streams_total",
        "HTTP/2 streams (requests) accepted from clients.",
        |s| s.http.h2_streams,
    ),
    (
        "http2_connection_errors_total",
        "HTTP/2 client connections ended by a protocol error or an abuse limit (GOAWAY sent).",
        |s| s.http.h2_connection_errors,
    ),
    (
        "http2_enhance_your_calm_total",
        "HTTP/2 client connections ended with GOAWAY ENHANCE_YOUR_CALM by an abuse limit (rapid reset, CONTINUATION or empty-frame flood, header list).",
        |s| s.http.h2_enhance_your_calm,
    ),
    (
        "http2_premature_reset_closes_total",
        "HTTP/2 client connections closed because the client reset most of its streams before their response was complete.",
        |s| s.http.h2_premature_reset_closes,
    ),
    (
        "http_faults_delayed_total",
        "Requests delayed by a route's fault injection.",
        |s| s.http.faults_delayed,
    ),
    (
        "http_faults_aborted_total",
        "Requests answered by a route's fault injection instead of forwarded.",
        |s| s.http.faults_aborted,
    ),
    (
        "http_retries_over_breaker_total",
        "Retries not attempted: the cluster's max_retries circuit breaker was at its cap.",
        |s| s.http.retries_over_breaker,
    ),
    (
        "http_early_responses_total",
        "Responses that arrived before the request body was sent in full.",
        |s| s.http.early_responses,
    ),
    (
        "connections_evicted_idle_total",
        "Idle keep-alive connections closed at the connection cap to admit a new one.",
        |s| s.connections_evicted_idle,
    ),
    (
        "connections_parked_total",
        "Times a quiet keep-alive connection gave back its buffers to wait for readiness alone.",
        |s| s.connections_parked,
    ),
    (
        "connections_carried_total",
        "Keep-alive connections moved to a newer config generation that kept their listener (not closed).",
        |s| s.connections_carried,
    ),
    (
        "connections_refused_overload_total",
        "Connections refused at the connection cap (no idle connection to close).",
        |s| s.connections_refused_overload,
    ),
    (
        "overload_keep_alive_off_total",
        "Responses that closed their connection because the worker was near its connection cap or the process near its memory ceiling.",
        |s| s.overload_keep_alive_off,
    ),
    (
        "overload_accept_paused_total",
        "Times an accept loop paused at the last memory overload stage (new connections wait in the kernel backlog).",
        |s| s.overload_accept_paused,
    ),
];

/// What the process knows outside the workers' counters.
#[derive(Debug, Default)]
pub struct Extra<'a> {
    pub tls: Option<&'a crate::control::TlsStatus>,
    /// Access log lines the writer thread could not write (a full disk,
    /// a removed directory), shown with the cores' dropped lines under
    /// `core="writer"`.
    pub access_log_lost: u64,
    /// Spans the exporter could not deliver (shown under
    /// `core="exporter"`), and spans it delivered.
    pub spans_failed: u64,
    pub spans_exported: u64,
    /// The admin TCP listener's refusals.
    pub admin_refusals: Option<&'a super::Refusals>,
    /// Golden metrics per core (a `core` label) instead of summed.
    pub per_core: bool,
    /// The memory overload stage and the figures behind it.
    pub overload: crate::lifecycle::overload::Report,
    /// The control-plane client, when `[xds]` configures one.
    pub xds: Option<crate::xds::Report>,
}

fn xds_families(out: &mut String, x: &crate::xds::Report) {
    family(
        out,
        "xds_connected",
        "gauge",
        "1 while the ADS stream to the management server is open.",
    );
    let _ = writeln!(out, "pilotfish_xds_connected {}", u8::from(x.connected));
    family(
        out,
        "xds_connects_total",
        "counter",
        "ADS streams opened since start.",
    );
    let _ = writeln!(out, "pilotfish_xds_connects_total {}", x.connects);
    family(
        out,
        "xds_updates_total",
        "counter",
        "Pushes from the control plane by resource type, accepted (ACK) or rejected (NACK).",
    );
    for (kind, t) in &x.types {
        let _ = writeln!(
            out,
            "pilotfish_xds_updates_total{{type=\"{kind}\",result=\"accepted\"}} {}",
            t.accepted
        );
        let _ = writeln!(
            out,
            "pilotfish_xds_updates_total{{type=\"{kind}\",result=\"rejected\"}} {}",
            t.rejected
        );
    }
    family(
        out,
        "xds_resources",
        "gauge",
        "Resources of each type from the control plane in the running config.",
    );
    for (kind, t) in &x.types {
        let _ = writeln!(
            out,
            "pilotfish_xds_resources{{type=\"{kind}\"}} {}",
            t.resources
        );
    }
    if let Some(s) = x.seconds_since_update {
        family(
            out,
            "xds_seconds_since_update",
            "gauge",
            "Seconds since the control plane's last accepted push.",
        );
        let _ = writeln!(out, "pilotfish_xds_seconds_since_update {s:.3}");
    }
}

fn admin_refusals(out: &mut String, refusals: &super::Refusals) {
    use std::sync::atomic::Ordering;
    family(
        out,
        "admin_tcp_refused_total",
        "counter",
        "Admin TCP requests refused: a protected endpoint without a token configured, or a missing or wrong token.",
    );
    for (reason, n) in [
        ("not_served", &refusals.not_served),
        ("bad_token", &refusals.bad_token),
    ] {
        let _ = writeln!(
            out,
            "pilotfish_admin_tcp_refused_total{{reason=\"{reason}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(
        out,
        "# HELP pilotfish_{name} {help}\n# TYPE pilotfish_{name} {kind}"
    );
}

/// Escapes a label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(reports: &[WorkerReport], hist: &[HistogramReport], extra: &Extra<'_>) -> String {
    let tls = extra.tls;
    let mut out = String::with_capacity(16 * 1024);
    family(
        &mut out,
        "connections_active",
        "gauge",
        "Client connections open now.",
    );
    for r in reports {
        let _ = writeln!(
            out,
            "pilotfish_connections_active{{core=\"{}\"}} {}",
            r.worker, r.counters.connections_active
        );
    }
    for (name, help, get) in COUNTERS {
        family(&mut out, name, "counter", help);
        for r in reports {
            let _ = writeln!(
                out,
                "pilotfish_{name}{{core=\"{}\"}} {}",
                r.worker,
                get(&r.counters)
            );
        }
        if *name == "access_log_dropped_total" {
            let _ = writeln!(
                out,
                "pilotfish_{name}{{core=\"writer\"}} {}",
                extra.access_log_lost
            );
        }
        if *name == "trace_spans_dropped_total" {
            let _ = writeln!(
                out,
                "pilotfish_{name}{{core=\"exporter\"}} {}",
                extra.spans_failed
            );
        }
    }
    family(
        &mut out,
        "trace_spans_exported_total",
        "counter",
        "Spans the collector accepted.",
    );
    let _ = writeln!(
        out,
        "pilotfish_trace_spans_exported_total {}",
        extra.spans_exported
    );
    if let Some(refusals) = extra.admin_refusals {
        admin_refusals(&mut out, refusals);
    }
    for (name, help, value) in [
        (
            "overload_stage",
            "Memory overload stage: 0 none, 1 keep-alive off, 2 new requests refused, 3 not accepting.",
            u64::from(extra.overload.stage),
        ),
        (
            "memory_used_bytes",
            "Resident memory at the last overload sample (0 without [overload] memory_max_mib).",
            extra.overload.memory_used_bytes,
        ),
        (
            "memory_max_bytes",
            "The [overload] memory ceiling (0: none).",
            extra.overload.memory_max_bytes,
        ),
    ] {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "pilotfish_{name} {value}");
    }
    family(
        &mut out,
        "http_responses_total",
        "counter",
        "HTTP responses sent to clients, by status class.",
    );
    for r in reports {
        for (i, n) in r.counters.http.responses_by_class.iter().enumerate() {
            let _ = writeln!(
                out,
                "pilotfish_http_responses_total{{core=\"{}\",class=\"{}xx\"}} {n}",
                r.worker,
                i + 1
            );
        }
    }
    family(
        &mut out,
        "http_grpc_responses_total",
        "counter",
        "gRPC responses sent to clients, by grpc-status (upstream's or the proxy's).",
    );
    for r in reports {
        for (code, n) in r.counters.http.grpc_responses.iter().enumerate() {
            let _ = writeln!(
                out,
                "pilotfish_http_grpc_responses_total{{core=\"{}\",grpc_status=\"{code}\"}} {n}",
                r.worker,
            );
        }
    }
    family(
        &mut out,
        "http_generated_responses_total",
        "counter",
        "Responses the proxy generated, by reason and who caused it (downstream, upstream, internal).",
    );
    for r in reports {
        for reason in ErrorReason::ALL {
            let _ = writeln!(
                out,
                "pilotfish_http_generated_responses_total{{core=\"{}\",reason=\"{}\",blame=\"{}\",status=\"{}\"}} {}",
                r.worker,
                reason.name(),
                reason.blame().name(),
                reason.status(),
                r.counters.http.generated(reason)
            );
        }
    }
    family(
        &mut out,
        "worker_driver",
        "gauge",
        "The I/O driver each worker runs (1 = this one).",
    );
    for r in reports {
        let _ = writeln!(
            out,
            "pilotfish_worker_driver{{core=\"{}\",driver=\"{}\"}} 1",
            r.worker, r.driver
        );
    }
    for (name, help, get) in crate::intercept::FIELDS {
        let name = format!("intercept_{name}_total");
        family(&mut out, &name, "counter", help);
        for r in reports {
            let _ = writeln!(
                out,
                "pilotfish_{name}{{core=\"{}\"}} {}",
                r.worker,
                get(&r.counters.intercept)
            );
        }
    }
    tls_families(&mut out, reports, tls);
    if let Some(x) = &extra.xds {
        xds_families(&mut out, x);
    }
    golden_families(&mut out, reports, extra.per_core);
    latency(&mut out, hist);
    out
}

/// The golden metrics: summed over cores, or per core on request.
fn golden_families(out: &mut String, reports: &[WorkerReport], per_core: bool) {
    let parts: Vec<(Option<usize>, golden::Snapshot)> = if per_core {
        reports
            .iter()
            .map(|r| (Some(r.worker), golden::merge([&r.golden])))
            .collect()
    } else {
        vec![(None, golden::merge(reports.iter().map(|r| &r.golden)))]
    };
    let labels = |core: Option<usize>, l: &golden::Labels| {
        let core = core.map_or(String::new(), |c| format!("core=\"{c}\","));
        format!(
            "{core}direction=\"{}\",listener=\"{}\",route=\"{}\",cluster=\"{}\",tls=\"{}\",peer_identity=\"{}\"",
            l.direction.name(),
            label(&l.listener),
            label(l.route.as_deref().unwrap_or("")),
            label(l.cluster.as_deref().unwrap_or("")),
            l.tls,
            label(l.peer.as_deref().unwrap_or("")),
        )
    };
    family(
        out,
        "requests_total",
        "counter",
        "HTTP requests that ended, each once, by direction, listener, route, cluster, TLS and peer identity.",
    );
    for (core, s) in &parts {
        for (l, h) in &s.http {
            let _ = writeln!(
                out,
                "pilotfish_requests_total{{{}}} {}",
                labels(*core, l),
                h.requests
            );
        }
    }
    family(
        out,
        "responses_total",
        "counter",
        "HTTP responses by the request's labels, status code (0: none sent) and gRPC status.",
    );
    for (core, s) in &parts {
        for (l, h) in &s.http {
            let l = labels(*core, l);
            for (code, grpc, n) in &h.responses {
                let grpc = grpc.map_or(String::new(), |g| g.to_string());
                let _ = writeln!(
                    out,
                    "pilotfish_responses_total{{{l},code=\"{code}\",grpc_status=\"{grpc}\"}} {n}"
                );
            }
        }
    }
    family(
        out,
        "request_duration_seconds",
        "histogram",
        "HTTP request duration, head received to response sent, by the request's labels.",
    );
    for (core, s) in &parts {
        for (l, h) in &s.http {
            let l = labels(*core, l);
            let mut running = 0;
            for (le, n) in golden::BUCKETS_US.iter().zip(h.buckets) {
                running += n;
                let _ = writeln!(
                    out,
                    "pilotfish_request_duration_seconds_bucket{{{l},le=\"{}\"}} {running}",
                    seconds(*le)
                );
            }
            let _ = writeln!(
                out,
                "pilotfish_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}",
                h.requests
            );
            let _ = writeln!(
                out,
                "pilotfish_request_duration_seconds_sum{{{l}}} {}",
                seconds(h.duration_us_sum)
            );
            let _ = writeln!(
                out,
                "pilotfish_request_duration_seconds_count{{{l}}} {}",
                h.requests
            );
        }
    }
    for (name, help, get) in [
        (
            "tcp_connections_total",
            "TCP connections relayed as bytes (L4 listeners, opaque intercepted connections) that closed, by labels.",
            (|t: &golden::Tcp| t.connections) as fn(&golden::Tcp) -> u64,
        ),
        (
            "tcp_received_bytes_total",
            "Bytes received from clients on relayed TCP connections, by labels.",
            |t| t.bytes_received,
        ),
        (
            "tcp_sent_bytes_total",
            "Bytes sent to clients on relayed TCP connections, by labels.",
            |t| t.bytes_sent,
        ),
    ] {
        family(out, name, "counter", help);
        for (core, s) in &parts {
            for (l, t) in &s.tcp {
                let _ = writeln!(out, "pilotfish_{name}{{{}}} {}", labels(*core, l), get(t));
            }
        }
    }
}

/// µs as seconds, exactly (no float rounding): `1500` → `0.0015`.
fn seconds(us: u64) -> String {
    let (s, frac) = (us / 1_000_000, us % 1_000_000);
    if frac == 0 {
        return s.to_string();
    }
    let frac = format!("{frac:06}");
    format!("{s}.{}", frac.trim_end_matches('0'))
}

/// Handshakes, failures by reason, authorization decisions by caller, and
/// the certificate in use.
fn tls_families(
    out: &mut String,
    reports: &[WorkerReport],
    tls: Option<&crate::control::TlsStatus>,
) {
    family(
        out,
        "tls_handshakes_total",
        "counter",
        "Completed TLS handshakes by side and kind (full or resumed).",
    );
    for r in reports {
        let t = &r.counters.tls;
        for (side, kind, n) in [
            ("inbound", "full", t.handshakes_inbound),
            ("inbound", "resumed", t.handshakes_inbound_resumed),
            ("outbound", "full", t.handshakes_outbound),
            ("outbound", "resumed", t.handshakes_outbound_resumed),
        ] {
            let _ = writeln!(
                out,
                "pilotfish_tls_handshakes_total{{core=\"{}\",side=\"{side}\",kind=\"{kind}\"}} {n}",
                r.worker
            );
        }
    }
    family(
        out,
        "tls_handshake_failures_total",
        "counter",
        "Failed TLS handshakes by side and reason.",
    );
    for r in reports {
        for f in &r.counters.tls.handshake_failures {
            let _ = writeln!(
                out,
                "pilotfish_tls_handshake_failures_total{{core=\"{}\",side=\"{}\",reason=\"{}\"}} {}",
                r.worker,
                f.side.name(),
                f.reason,
                f.count
            );
        }
    }
    family(
        out,
        "authorization_total",
        "counter",
        "Authorization decisions by listener, caller identity and decision.",
    );
    for r in reports {
        for d in &r.counters.tls.authorization {
            let _ = writeln!(
                out,
                "pilotfish_authorization_total{{core=\"{}\",listener=\"{}\",identity=\"{}\",decision=\"{}\"}} {}",
                r.worker,
                label(&d.listener),
                label(&d.identity),
                if d.allowed { "allow" } else { "deny" },
                d.count
            );
        }
    }
    let Some(t) = tls else {
        return;
    };
    family(
        out,
        "tls_certificate_expiry_seconds",
        "gauge",
        "Seconds until the certificate new handshakes present expires (source: files, or xds when a control plane pushed it).",
    );
    let _ = writeln!(
        out,
        "pilotfish_tls_certificate_expiry_seconds{{identity=\"{}\",serial=\"{}\",source=\"{}\"}} {}",
        label(&t.identity),
        label(&t.serial),
        t.source,
        t.seconds_to_expiry
    );
    family(
        out,
        "tls_material_reloads_total",
        "counter",
        "TLS material loads after start, and failed attempts.",
    );
    let _ = writeln!(
        out,
        "pilotfish_tls_material_reloads_total{{result=\"ok\"}} {}",
        t.reloads
    );
    let _ = writeln!(
        out,
        "pilotfish_tls_material_reloads_total{{result=\"failed\"}} {}",
        t.reload_failures
    );
}

/// The family an exact histogram is served in: one measurement per family
/// (a routed request is in its listener's family and its route's, never
/// twice in one), in seconds.
fn latency_family(k: &histograms::Key) -> (&'static str, &'static str) {
    use histograms::Metric;
    match (k.metric, &k.route) {
        (Metric::RequestTotal, None) => (
            "listener_request_duration_seconds",
            "HTTP requests per listener, head received to response sent, merged over cores.",
        ),
        (Metric::RequestTotal, Some(_)) => (
            "route_request_duration_seconds",
            "HTTP requests per route, head received to response sent, merged over cores.",
        ),
        (Metric::UpstreamConnect, _) => (
            "upstream_connect_duration_seconds",
            "New upstream connections per cluster, connect started to established, merged over cores.",
        ),
        (Metric::UpstreamFirstByte, _) => (
            "upstream_first_byte_duration_seconds",
            "Request sent upstream to response head received, per cluster, merged over cores.",
        ),
        (Metric::ConnectionDuration, _) => (
            "tcp_connection_duration_seconds",
            "Relayed TCP connections, accepted to both sides closed, merged over cores.",
        ),
        (Metric::ProtocolDetect, _) => (
            "protocol_detect_duration_seconds",
            "Intercepted connections, accepted to protocol decided, merged over cores.",
        ),
    }
}

/// The exact (HDR) histograms as Prometheus histograms and, for people
/// reading the text, summaries of p50/p90/p99/p99.9.
fn latency(out: &mut String, hist: &[HistogramReport]) {
    let merged = histograms::merge_by_key(hist, None, |_| true);
    let mut families: std::collections::BTreeMap<_, Vec<_>> = Default::default();
    for (k, h) in &merged {
        families.entry(latency_family(k)).or_default().push((k, h));
    }
    let labels = |k: &histograms::Key| {
        let mut l = Vec::new();
        for (name, v) in [
            ("listener", &k.listener),
            ("route", &k.route),
            ("cluster", &k.cluster),
        ] {
            if let Some(v) = v {
                l.push(format!("{name}=\"{}\"", label(v)));
            }
        }
        l.join(",")
    };
    for ((name, help), series) in &families {
        family(out, name, "histogram", help);
        for (k, h) in series {
            let l = labels(k);
            let sep = if l.is_empty() { "" } else { "," };
            // One pass over the recorded values, not one per bucket: this
            // runs on the admin thread, which may share a core with a worker.
            let mut per_bucket = [0u64; BUCKETS_US.len()];
            for v in h.iter_recorded() {
                let first = BUCKETS_US.partition_point(|&le| le < v.value_iterated_to());
                if let Some(c) = per_bucket.get_mut(first) {
                    *c += v.count_at_value();
                }
            }
            let mut running = 0;
            for (le, n) in BUCKETS_US.iter().zip(per_bucket) {
                running += n;
                let _ = writeln!(
                    out,
                    "pilotfish_{name}_bucket{{{l}{sep}le=\"{}\"}} {running}",
                    seconds(*le)
                );
            }
            let _ = writeln!(
                out,
                "pilotfish_{name}_bucket{{{l}{sep}le=\"+Inf\"}} {}",
                h.len()
            );
            let sum_us = (h.mean() * h.len() as f64).round() as u64;
            let _ = writeln!(out, "pilotfish_{name}_sum{{{l}}} {}", seconds(sum_us));
            let _ = writeln!(out, "pilotfish_{name}_count{{{l}}} {}", h.len());
        }
        let quantiles = format!("{}_quantiles_seconds", name.trim_end_matches("_seconds"));
        family(
            out,
            &quantiles,
            "summary",
            &format!("{help} Percentiles of the exact histogram."),
        );
        for (k, h) in series {
            let l = labels(k);
            let sep = if l.is_empty() { "" } else { "," };
            for q in [0.5, 0.9, 0.99, 0.999] {
                let _ = writeln!(
                    out,
                    "pilotfish_{quantiles}{{{l}{sep}quantile=\"{q}\"}} {}",
                    seconds(h.value_at_quantile(q))
                );
            }
            let sum_us = (h.mean() * h.len() as f64).round() as u64;
            let _ = writeln!(out, "pilotfish_{quantiles}_sum{{{l}}} {}", seconds(sum_us));
            let _ = writeln!(out, "pilotfish_{quantiles}_count{{{l}}} {}", h.len());
        }
    }
}
