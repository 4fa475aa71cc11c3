//! Workload identity and mutual TLS: SPIFFE IDs and allow-lists, the
//! X.509-SVID rules, rustls verifiers that apply them, TLS material from
//! files, and a development CA.
//!
//! What must hold: a peer is accepted only with a certificate that chains
//! to the trust bundle and is a valid SVID for its role, and (outbound)
//! only if it is the identity the cluster expects; identities are SPIFFE
//! URI SANs, never DNS names.
//!
//! Status: the building blocks are here and tested with real handshakes;
//! wiring them into the listeners and upstream connections (config keys,
//! authorization, rotation) is the rest of the mTLS issue, so no config key
//! enables TLS yet (one that was accepted but not enforced would be worse
//! than none).

pub mod ca;
pub mod counters;
pub mod identity;
pub mod material;
pub mod per_worker;
pub mod stream;
pub mod svid;
pub mod verify;
