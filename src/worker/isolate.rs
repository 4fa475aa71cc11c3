//! Runs each connection in a task whose panic cannot take the worker down.
//!
//! monoio does not catch panics in spawned tasks: one would unwind through
//! the runtime and kill every connection on the core. Each connection future
//! is wrapped in `catch_unwind`; a panic drops that connection's sockets
//! (closing them), is counted and logged, and the worker carries on.

use std::{future::Future, panic::AssertUnwindSafe, rc::Rc};

use futures_util::FutureExt;

use crate::metrics::{self, Counters};

/// Spawns `conn` on the current worker, isolating panics.
pub fn spawn_connection<F>(counters: Rc<Counters>, conn_id: u64, conn: F)
where
    F: Future<Output = ()> + 'static,
{
    // Boxed before it is wrapped: a connection's future is several KiB,
    // and moving it into the wrapper and then into the task copied all of
    // it twice per connection.
    let conn = Box::pin(conn);
    monoio::spawn(async move {
        // AssertUnwindSafe: after a panic we only drop the future (closing
        // its sockets) and bump a counter; no state it touched is reused
        // except worker counters, which stay valid (plain integers).
        if let Err(panic) = AssertUnwindSafe(conn).catch_unwind().await {
            metrics::add(&counters.task_panics, 1);
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            tracing::error!(conn_id, panic = %what, "connection task panicked; connection closed, worker continues");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::gate::Trigger;

    #[test]
    fn a_panicking_connection_is_counted_and_the_worker_keeps_running() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let counters = Rc::new(Counters::default());
        rt.block_on({
            let counters = Rc::clone(&counters);
            async move {
                spawn_connection(Rc::clone(&counters), 1, async { panic!("injected") });
                let finished = Trigger::default();
                let f = finished.clone();
                spawn_connection(Rc::clone(&counters), 2, async move {
                    monoio::time::sleep(std::time::Duration::from_millis(1)).await;
                    f.fire();
                });
                // Completes only if the runtime survived the panic and kept
                // running other tasks; a hang here fails the test by timeout.
                finished.wait().await;
            }
        });
        assert_eq!(counters.task_panics.get(), 1);
    }
}
