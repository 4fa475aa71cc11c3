//! Workload identity and mutual TLS: SPIFFE IDs and allow-lists, the
//! X.509-SVID rules, rustls verifiers that apply them, TLS material from
//! files, and a development CA.
//!
//! What must hold: a peer is accepted only with a certificate that chains
//! to the trust bundle and is a valid SVID for its role, and (outbound)
//! only if it is the identity the cluster expects; identities are SPIFFE
//! URI SANs, never DNS names.
//!
//! Who owns what: `identity` (IDs and allow-lists), `svid` (the leaf
//! rules), `verify` (rustls verifiers), `material` (files → rustls
//! configs, time-bounded session cache), `stream` (the plain-or-TLS stream
//! and the handshake loop), `per_worker` (each worker's configs, rebuilt on
//! rotation), `counters` (handshakes, failures, authorization decisions),
//! `ca` (the development CA). Rotation is driven by `crate::control`.

pub mod ca;
pub mod counters;
pub mod identity;
pub mod material;
pub mod per_worker;
pub mod stream;
pub mod svid;
pub mod verify;
