//! Endpoint pickers. Pure: no I/O, no clock; each worker owns its own.

pub mod round_robin;

pub use round_robin::RoundRobin;
