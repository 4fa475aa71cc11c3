//! HTTP/2, with the upstream `h2` crate. So far: [`io`], the bridge that
//! lets h2 drive monoio's completion-based streams (plain or TLS) on
//! either driver. The listeners, clusters and the shared request pipeline
//! that will use it are issue 12's work still to come.

pub mod io;
