//! Attack defended: a control plane (or whoever speaks for it) pushing a
//! resource built to break the sidecar: any bytes as a Cluster, Listener,
//! RouteConfiguration or ClusterLoadAssignment. Decoding, translation and
//! validation must never panic; a resource that translates must compose
//! into a config that validates or is refused with an error, never
//! anything in between.
#![no_main]

use envoy_types::pb::envoy::config::{
    cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
    route::v3::RouteConfiguration,
};
use libfuzzer_sys::fuzz_target;
use pilotfish::{
    config::compose::{compose, Dynamic},
    xds::translate,
};
use prost::Message;

const BASE: &str = "workers = 1\n[admin]\nsocket = \"/tmp/fuzz.sock\"\n";

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let mut dynamic = Dynamic::default();
    match kind % 4 {
        0 => {
            let Ok(c) = Cluster::decode(bytes) else { return };
            let Ok(out) = translate::cluster(&c) else { return };
            dynamic.clusters.push(out.table);
        }
        1 => {
            let Ok(l) = Listener::decode(bytes) else { return };
            let Ok(out) = translate::listener(&l) else { return };
            let mut t = out.table;
            if out.rds_name.is_some() {
                t.insert("routes".into(), toml::Value::Array(Vec::new()));
            }
            dynamic.listeners.push(t);
        }
        2 => {
            let Ok(rc) = RouteConfiguration::decode(bytes) else { return };
            let Ok(routes) = translate::routes(&rc, "") else { return };
            let mut t = toml::Table::new();
            t.insert("name".into(), "l".into());
            t.insert("bind".into(), "127.0.0.1:0".into());
            t.insert("protocol".into(), "http".into());
            t.insert("routes".into(), toml::Value::Array(routes));
            dynamic.listeners.push(t);
        }
        _ => {
            let Ok(la) = ClusterLoadAssignment::decode(bytes) else { return };
            let Ok(list) = translate::endpoints(&la, "", false) else { return };
            let mut t = toml::Table::new();
            t.insert("name".into(), "c".into());
            t.insert("endpoints".into(), toml::Value::Array(list));
            dynamic.clusters.push(t);
        }
    }
    let _ = compose(std::path::Path::new("fuzz.toml"), BASE, &dynamic);
});
