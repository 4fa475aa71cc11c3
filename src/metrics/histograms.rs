//! Per-worker HDR latency histograms, copied out on request and merged
//! by whoever asked.
//!
//! What must hold: recording is a plain increment on the worker's own
//! histogram (no locks, no atomics); the range is bounded (1 µs to one
//! hour) so a wild value saturates at the top instead of failing; a
//! snapshot is a copy, so a scrape costs a worker only the time to clone
//! its histograms.
//!
//! Memory. A series costs nothing until its first record, then grows
//! with the largest value it has seen (hdrhistogram's auto-resize, up to
//! the one-hour bound): at 3 significant digits ~64 KiB for values up to
//! 100 ms, ~188 KiB at most; at 2 digits ~7 KiB and ~25 KiB. Listener
//! series keep 3 digits (0.1%); route and cluster series, of which a
//! config may have thousands, keep 2 (1%) — [`SIGFIG_DETAIL`]. Configs are
//! bounded to [`crate::config::limits::HISTOGRAM_SERIES_MAX`] series, so
//! the worst case per worker is 256 listeners × 188 KiB + 4,096 × 25 KiB
//! ≈ 147 MiB, reached only if every series records an hour-long value;
//! a config with 1,000 routes whose latencies stay under a second needs
//! ~13 MiB per worker for them.

use std::{cell::RefCell, rc::Rc, time::Duration};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::config::{Config, ListenerKind};

/// Lowest recordable latency, µs.
pub const LOW_US: u64 = 1;
/// Highest recordable latency, µs (one hour: long L4 connections).
pub const HIGH_US: u64 = 3_600_000_000;
/// Significant digits kept: 0.1% relative error at every magnitude.
pub const SIGFIG: u8 = 3;
/// Significant digits of route and cluster series: 1% relative error, a
/// tenth of the memory of [`SIGFIG`].
pub const SIGFIG_DETAIL: u8 = 2;

/// What a histogram measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// HTTP: request head received → response fully sent.
    RequestTotal,
    /// New upstream connection: connect started → established.
    UpstreamConnect,
    /// Request sent upstream → response head received.
    UpstreamFirstByte,
    /// L4: accepted → both sides closed.
    ConnectionDuration,
    /// Intercepted connection: accepted → protocol decided (original
    /// destination read, loop check, first bytes peeked and classified;
    /// includes the wait for the caller's first bytes).
    ProtocolDetect,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::RequestTotal => "request_total",
            Metric::UpstreamConnect => "upstream_connect",
            Metric::UpstreamFirstByte => "upstream_first_byte",
            Metric::ConnectionDuration => "connection_duration",
            Metric::ProtocolDetect => "protocol_detect",
        }
    }
}

/// Where a histogram belongs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Key {
    pub listener: Option<String>,
    pub route: Option<String>,
    pub cluster: Option<String>,
    pub metric: Metric,
}

impl std::fmt::Display for Key {
    /// `listener=web route=api metric=request_total`, as the query asks.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, v) in [
            ("listener", &self.listener),
            ("route", &self.route),
            ("cluster", &self.cluster),
        ] {
            if let Some(v) = v {
                write!(f, "{name}={v} ")?;
            }
        }
        write!(f, "metric={}", self.metric.name())
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(LOW_US, HIGH_US, SIGFIG).expect("static bounds are valid")
}

/// One series: allocated at its first record, sized by what it records.
#[derive(Debug)]
pub struct Series {
    sigfig: u8,
    h: Option<Histogram<u64>>,
}

impl Series {
    fn new(sigfig: u8) -> Self {
        Self { sigfig, h: None }
    }

    fn record(&mut self, us: u64) {
        let sigfig = self.sigfig;
        let h = self.h.get_or_insert_with(|| {
            // Auto-resizing from the smallest range: it grows (to at most
            // HIGH_US, by the caller's clamp) only as far as needed.
            let mut h = Histogram::new(sigfig).expect("static precision is valid");
            h.auto(true);
            h
        });
        // In range by the caller's clamp, and auto-resizing: cannot fail.
        let _ = h.record(us);
    }

    /// Bytes held (for tests and the memory note above).
    pub fn bytes(&self) -> usize {
        self.h
            .as_ref()
            .map_or(0, |h| h.distinct_values() * std::mem::size_of::<u64>())
    }
}

/// One recordable histogram, shared by every config generation that names
/// the same listener, route or cluster.
pub type Cell = Rc<RefCell<Series>>;

/// Records `d` into `h`, saturating outside the bounded range.
pub fn record(h: &Cell, d: Duration) {
    let us = (d.as_micros() as u64).clamp(LOW_US, HIGH_US);
    h.borrow_mut().record(us);
}

/// Every histogram a worker has, by key, across config generations: a
/// listener kept over a config swap keeps its histogram, and one removed
/// keeps what it recorded (counts never go backwards for a scraper).
///
/// Bounded: a key is added only when a config names it, and configs are
/// bounded in listeners, routes and clusters; [`Store::prune`] (after every
/// swap) drops the histograms no live generation records into any more, so
/// a long series of swaps that rename things cannot accumulate them (each
/// is ~220 KB).
#[derive(Debug, Default)]
pub struct Store {
    /// In the order first named (what `/histograms` lists).
    cells: RefCell<Vec<(Key, Cell)>>,
    /// Where each key is in `cells`: a control plane's thousand clusters
    /// made a linear search the largest cost of a swap.
    index: RefCell<std::collections::HashMap<Key, usize>>,
}

impl Store {
    /// The histogram for `key`, created empty the first time.
    pub fn cell(&self, key: Key) -> Cell {
        let mut cells = self.cells.borrow_mut();
        let mut index = self.index.borrow_mut();
        if let Some(&i) = index.get(&key) {
            return Rc::clone(&cells[i].1);
        }
        let sigfig = if key.route.is_some() || key.cluster.is_some() {
            SIGFIG_DETAIL
        } else {
            SIGFIG
        };
        let c = Rc::new(RefCell::new(Series::new(sigfig)));
        index.insert(key.clone(), cells.len());
        cells.push((key, Rc::clone(&c)));
        c
    }

    /// The histograms for one cluster: (upstream_connect, upstream_first_byte).
    pub fn cluster(&self, name: &str) -> (Cell, Cell) {
        let key = |metric| Key {
            listener: None,
            route: None,
            cluster: Some(name.to_string()),
            metric,
        };
        (
            self.cell(key(Metric::UpstreamConnect)),
            self.cell(key(Metric::UpstreamFirstByte)),
        )
    }

    /// Copies every histogram out (the only cost a scrape puts on a worker),
    /// sparsely: only the recorded (value, count) pairs, a few hundred
    /// entries, instead of cloning each ~220 KB counts array (measured: the
    /// clones' allocation and page faults showed in the data path's p99).
    pub fn snapshot(&self) -> Vec<(Key, Sparse)> {
        self.cells
            .borrow()
            .iter()
            .map(|(k, h)| {
                (
                    k.clone(),
                    h.borrow().h.as_ref().map(sparse).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Empties every histogram (after a `reset=true` scrape).
    pub fn reset(&self) {
        for (_, h) in self.cells.borrow().iter() {
            if let Some(h) = h.borrow_mut().h.as_mut() {
                h.reset();
            }
        }
    }

    /// Drops the histograms only the store still holds: their listener,
    /// route or cluster left the config and every connection that recorded
    /// into them has ended.
    pub fn prune(&self) {
        let mut cells = self.cells.borrow_mut();
        cells.retain(|(_, h)| Rc::strong_count(h) > 1);
        let mut index = self.index.borrow_mut();
        index.clear();
        index.extend(cells.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)));
    }
}

/// One config generation's histograms, laid out by its config indices so
/// the data path records without a lookup.
#[derive(Debug)]
pub struct Histograms {
    /// Per listener: request_total (http) or connection_duration (tcp).
    listeners: Vec<Cell>,
    /// Per (listener, route): request_total.
    routes: Vec<Vec<Cell>>,
    /// Per listener, for intercept listeners only: protocol_detect, and
    /// connection_duration of the connections relayed as bytes (their
    /// HTTP requests go to request_total; one family, one measurement).
    intercept: Vec<Option<(Cell, Cell)>>,
}

impl Histograms {
    pub fn new(store: &Store, config: &Config) -> Self {
        let key = |listener: &str, route: Option<&str>, metric| Key {
            listener: Some(listener.to_string()),
            route: route.map(str::to_string),
            cluster: None,
            metric,
        };
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let metric = match l.kind {
                    ListenerKind::Http(_) => Metric::RequestTotal,
                    ListenerKind::Tcp { .. } => Metric::ConnectionDuration,
                };
                store.cell(key(&l.name, None, metric))
            })
            .collect();
        let routes = config
            .listeners
            .iter()
            .map(|l| match &l.kind {
                ListenerKind::Http(h) => h
                    .routes
                    .iter()
                    .map(|r| store.cell(key(&l.name, Some(&r.name), Metric::RequestTotal)))
                    .collect(),
                ListenerKind::Tcp { .. } => Vec::new(),
            })
            .collect();
        let intercept = config
            .listeners
            .iter()
            .map(|l| {
                l.direction.map(|_| {
                    (
                        store.cell(key(&l.name, None, Metric::ProtocolDetect)),
                        store.cell(key(&l.name, None, Metric::ConnectionDuration)),
                    )
                })
            })
            .collect();
        Self {
            listeners,
            routes,
            intercept,
        }
    }

    /// A finished HTTP request (or L4 connection) on `listener`.
    pub fn listener(&self, listener: usize, d: Duration) {
        record(&self.listeners[listener], d);
    }

    pub fn route(&self, listener: usize, route: usize, d: Duration) {
        record(&self.routes[listener][route], d);
    }

    /// An intercepted connection on `listener` whose protocol took `d` to
    /// decide.
    pub fn detect(&self, listener: usize, d: Duration) {
        if let Some((cell, _)) = &self.intercept[listener] {
            record(cell, d);
        }
    }

    /// An intercepted connection on `listener` relayed as bytes, closed.
    pub fn relayed(&self, listener: usize, d: Duration) {
        if let Some((_, cell)) = &self.intercept[listener] {
            record(cell, d);
        }
    }
}

/// A histogram as its recorded (value, count) pairs.
pub type Sparse = Vec<(u64, u64)>;

fn sparse(h: &Histogram<u64>) -> Sparse {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Rebuilds a histogram from its sparse form.
pub fn from_sparse(s: &Sparse) -> Histogram<u64> {
    let mut h = new_histogram();
    for &(value, count) in s {
        // Values came from a histogram with the same bounds.
        let _ = h.record_n(value, count);
    }
    h
}

/// One histogram per key over all `reports` (or only worker `core`), in
/// first-seen key order, for keys that pass `wanted`.
pub fn merge_by_key(
    reports: &[crate::worker::HistogramReport],
    core: Option<usize>,
    wanted: impl Fn(&Key) -> bool,
) -> Vec<(Key, Histogram<u64>)> {
    let mut keys: Vec<&Key> = Vec::new();
    for r in reports {
        for (k, _) in &r.histograms {
            if wanted(k) && !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    keys.into_iter()
        .map(|k| {
            let parts = reports
                .iter()
                .filter(|r| core.is_none_or(|c| c == r.worker))
                .flat_map(|r| {
                    r.histograms
                        .iter()
                        .filter(|(rk, _)| rk == k)
                        .map(|(_, h)| h)
                });
            let mut total = new_histogram();
            for part in parts {
                for &(value, count) in part {
                    // Same bounds everywhere: recording cannot fail.
                    let _ = total.record_n(value, count);
                }
            }
            (k.clone(), total)
        })
        .collect()
}

/// Merges histograms (any number, any workers) into one.
pub fn merge<'a>(parts: impl IntoIterator<Item = &'a Histogram<u64>>) -> Histogram<u64> {
    let mut total = new_histogram();
    for h in parts {
        // Same bounds everywhere, so addition cannot fail.
        let _ = total.add(h);
    }
    total
}

/// HdrHistogram's percentile distribution text (the `.hgrm` format that
/// wrk2 prints and HdrHistogram's plotter reads), values in milliseconds.
pub fn hgrm(h: &Histogram<u64>) -> String {
    // Values are microseconds, as everywhere else in Pilotfish (the JSON's
    // `_us` fields, the CLI's header); the unit is said in the output.
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            format!("{:>14.2}", 1.0 / (1.0 - q))
        } else {
            format!("{:>14}", "")
        };
        out += &format!(
            "{:>12.3} {:>2.12} {:>10} {}\n",
            v.value_iterated_to() as f64,
            q,
            total,
            inv
        );
    }
    // HdrHistogram's sub-bucket count: 2 × 10^digits rounded up to a power
    // of two (2048 at 3 significant digits).
    let sub_buckets = (2 * 10u64.pow(u32::from(h.sigfig()))).next_power_of_two();
    out += &format!(
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]\n#[Max     = {:>12.3}, Total count    = {:>12}]\n#[Buckets = {:>12}, SubBuckets     = {:>12}]\n#[Unit    = microseconds]\n",
        h.mean(),
        h.stdev(),
        h.max() as f64,
        h.len(),
        h.buckets(),
        sub_buckets
    );
    out
}

/// Reads `.hgrm` text back into (value µs, percentile, total count) rows.
pub fn parse_hgrm(text: &str) -> Vec<(f64, f64, u64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let value = f.next()?.parse().ok()?;
            let q = f.next()?.parse().ok()?;
            let count = f.next()?.parse().ok()?;
            Some((value, q, count))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_round_trips_the_percentiles() {
        let mut h = new_histogram();
        for v in 1..=10_000u64 {
            h.record(v * 10).unwrap();
        }
        let text = hgrm(&h);
        assert!(text.contains("#[Unit    = microseconds]"), "{text}");
        assert!(text.contains("SubBuckets     =         2048]"), "{text}");
        assert!(text.contains("Max     =   100031.000"), "max in µs: {text}");
        let rows = parse_hgrm(&text);
        assert!(rows.len() > 20);
        assert_eq!(
            rows.last().unwrap().2,
            h.len(),
            "last row counts everything"
        );
        for p in [0.5, 0.9, 0.99, 0.999] {
            let row = rows.iter().find(|r| r.1 >= p).unwrap();
            let want = h.value_at_quantile(p) as f64;
            assert!(
                (row.0 - want).abs() <= want * 0.002 + 1.0,
                "p{p}: {} vs {want}",
                row.0
            );
        }
    }

    fn c_text() -> String {
        "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ncluster = \"c\"\n[[clusters]]\nname = \"c\"\nendpoints = [\"127.0.0.1:1\"]\n".to_string()
    }

    #[test]
    fn series_cost_nothing_until_recorded_and_grow_with_their_values() {
        // One HTTP listener with 1,000 routes.
        let mut text = c_text().replace("protocol = \"tcp\"", "protocol = \"http\"");
        text = text.replace("[[clusters]]", &{
            let mut routes = String::new();
            for r in 0..1000 {
                routes += &format!(
                    "[[listeners.routes]]\nname = \"r{r}\"\npath = \"/r{r}\"\ncluster = \"c\"\n"
                );
            }
            routes + "[[clusters]]"
        });
        let c = Config::parse("t.toml", &text).unwrap();
        let store = Store::default();
        let h = Histograms::new(&store, &c);
        let held = |store: &Store| -> usize {
            store
                .cells
                .borrow()
                .iter()
                .map(|(_, c)| c.borrow().bytes())
                .sum()
        };
        assert_eq!(held(&store), 0, "1,001 series, none recorded: no memory");
        h.route(0, 7, Duration::from_millis(3));
        let route = held(&store);
        assert!(
            route > 0 && route <= 8 * 1024,
            "a 2-digit series up to 3 ms: {route} B"
        );
        h.listener(0, Duration::from_millis(100));
        let listener = held(&store) - route;
        assert!(
            listener <= 70 * 1024,
            "a 3-digit series up to 100 ms: {listener} B"
        );
        h.listener(0, Duration::from_secs(7200));
        assert!(
            held(&store) - route <= 190 * 1024,
            "the one-hour bound caps growth"
        );
    }

    #[test]
    fn configs_are_bounded_in_series() {
        let mut text = c_text().replace("protocol = \"tcp\"", "protocol = \"http\"");
        let mut routes = String::new();
        for r in 0..1024 {
            routes += &format!(
                "[[listeners.routes]]\nname = \"r{r}\"\npath = \"/r{r}\"\ncluster = \"c\"\n"
            );
        }
        let mut listeners = String::new();
        for l in 0..4 {
            listeners += &format!("[[listeners]]\nname = \"l{l}\"\nbind = \"127.0.0.1:{}\"\nprotocol = \"http\"\ncluster = \"c\"\n{routes}", 30000 + l);
        }
        text = text.replace("[[clusters]]", &(listeners + "[[clusters]]"));
        let e = Config::parse("t.toml", &text).unwrap_err().to_string();
        assert!(e.contains("latency series") && e.contains("4096"), "{e}");
    }

    #[test]
    fn out_of_range_values_saturate_and_merge_adds() {
        let c = Config::parse("t.toml", &c_text()).unwrap();
        let (sa, sb) = (Store::default(), Store::default());
        let a = Histograms::new(&sa, &c);
        let b = Histograms::new(&sb, &c);
        a.listener(0, Duration::from_secs(10_000));
        a.listener(0, Duration::ZERO);
        b.listener(0, Duration::from_millis(5));
        let snaps = [sa.snapshot(), sb.snapshot()];
        let whole: Vec<_> = snaps.iter().map(|s| from_sparse(&s[0].1)).collect();
        let merged = merge(&whole);
        assert_eq!(merged.len(), 3);
        assert_eq!(merged.max(), merged.highest_equivalent(HIGH_US));
        assert_eq!(snaps[0][0].0.metric, Metric::ConnectionDuration);
        sa.reset();
        assert!(sa.snapshot()[0].1.is_empty());
        // A second generation naming the same listener shares its histogram.
        let again = Histograms::new(&sa, &c);
        again.listener(0, Duration::from_millis(1));
        assert_eq!(sa.snapshot().len(), 1);
        assert_eq!(sa.snapshot()[0].1, vec![(1000, 1)]);
        // Renamed in a later config: the old histogram goes once no
        // generation holds it.
        let renamed = Config::parse("t.toml", &c_text().replace("\"l\"", "\"m\"")).unwrap();
        let next = Histograms::new(&sa, &renamed);
        sa.prune();
        assert_eq!(sa.snapshot().len(), 2, "the old one is still held");
        drop((a, again));
        sa.prune();
        let keys: Vec<_> = sa.snapshot().into_iter().map(|(k, _)| k.listener).collect();
        assert_eq!(keys, vec![Some("m".to_string())]);
        drop(next);
    }
}
