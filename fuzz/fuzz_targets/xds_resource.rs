//! Attack defended: a control plane (or whoever speaks for it) pushing a
//! resource built to break the sidecar: any bytes as a Cluster, Listener,
//! RouteConfiguration, ClusterLoadAssignment or Secret. Decoding,
//! translation and validation must never panic; a resource that
//! translates must compose into a config that validates or is refused
//! with an error, never anything in between; a secret's bytes must load
//! as TLS material or be refused.
#![no_main]

use envoy_types::pb::envoy::{
    config::{
        cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, listener::v3::Listener,
        route::v3::RouteConfiguration,
    },
    extensions::transport_sockets::tls::v3::Secret,
};
use libfuzzer_sys::fuzz_target;
use pilotfish::{
    config::compose::{compose, Dynamic},
    tls::material,
    xds::translate,
};
use prost::Message;

// With [tls], so pushed TLS contexts are checked all the way.
const BASE: &str = "workers = 1\n[admin]\nsocket = \"/tmp/fuzz.sock\"\n[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\ntrust_bundle = \"/ca.pem\"\n";

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let mut dynamic = Dynamic::default();
    let names = translate::SecretNames {
        certificate: "default".into(),
        trust_bundle: "ROOTCA".into(),
    };
    match kind % 5 {
        0 => {
            let Ok(c) = Cluster::decode(bytes) else { return };
            let Ok(out) = translate::cluster(&c, &names) else { return };
            dynamic.clusters.push(out.table);
        }
        1 => {
            let Ok(l) = Listener::decode(bytes) else { return };
            let Ok(out) = translate::listener(&l, &names) else { return };
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
        3 => {
            let Ok(sec) = Secret::decode(bytes) else { return };
            let Ok(out) = translate::secret(&sec) else { return };
            let part = |pem: &[u8]| material::Part {
                pem: pem.to_vec(),
                from: "fuzz".into(),
            };
            let _ = match out {
                translate::SecretOut::Certificate { chain, key } => {
                    material::Material::parse(&part(&chain), &part(&key), &part(&chain))
                }
                translate::SecretOut::TrustBundle(b) => {
                    material::Material::parse(&part(&b), &part(&b), &part(&b))
                }
            };
            return;
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
