//! Endpoint pickers. Pure: no I/O; the clock and the RNG are passed in, so
//! every picker is tested by replaying a seed. Each worker owns its own
//! picker state (no sharing between cores).

pub mod ewma;
pub mod hash;
pub mod p2c;
pub mod rng;
pub mod round_robin;

pub use rng::Rng;
pub use round_robin::RoundRobin;
