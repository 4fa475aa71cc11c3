//! Two tiny single-thread synchronisation primitives for a worker's tasks.
//!
//! [`Trigger`]: fires once, wakes every waiter (drain). [`Slots`]: a counting
//! limit on concurrent connections that parks the accept loop when full.
//! Both are `Rc`/`Cell` based: they never cross threads, so no atomics.

use std::{
    cell::{Cell, RefCell},
    future::Future,
    rc::Rc,
    task::{Context, Poll, Waker},
};

/// Fires once; every current and future waiter then completes.
#[derive(Debug, Default, Clone)]
pub struct Trigger {
    inner: Rc<TriggerInner>,
}

#[derive(Debug, Default)]
struct TriggerInner {
    fired: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl Trigger {
    pub fn fire(&self) {
        if !self.inner.fired.replace(true) {
            for waker in self.inner.waiters.take() {
                waker.wake();
            }
        }
    }

    pub fn is_fired(&self) -> bool {
        self.inner.fired.get()
    }

    /// Completes once [`Trigger::fire`] has been called.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx: &mut Context<'_>| {
            if self.inner.fired.get() {
                return Poll::Ready(());
            }
            register(&self.inner.waiters, cx);
            Poll::Pending
        })
    }
}

/// A limit on concurrently held slots (connections per worker).
#[derive(Debug)]
pub struct Slots {
    max: Cell<usize>,
    used: Cell<usize>,
    waiters: RefCell<Vec<Waker>>,
}

/// One held slot; released on drop, even if the holding task panicked.
#[derive(Debug)]
pub struct Slot {
    slots: Rc<Slots>,
}

impl Slots {
    pub fn new(max: usize) -> Rc<Self> {
        Rc::new(Self {
            max: Cell::new(max),
            used: Cell::new(0),
            waiters: RefCell::default(),
        })
    }

    pub fn used(&self) -> usize {
        self.used.get()
    }

    /// Changes the limit (a config swap); connections over a lowered limit
    /// keep their slots, new ones wait until the count is under it.
    pub fn set_max(&self, max: usize) {
        self.max.set(max);
        for waker in self.waiters.take() {
            waker.wake();
        }
    }

    /// Waits until a slot is free, then takes it.
    pub async fn acquire(self: &Rc<Self>) -> Slot {
        std::future::poll_fn(|cx| {
            if self.used.get() < self.max.get() {
                return Poll::Ready(());
            }
            register(&self.waiters, cx);
            Poll::Pending
        })
        .await;
        self.used.set(self.used.get() + 1);
        Slot {
            slots: Rc::clone(self),
        }
    }

    /// Completes when no slot is held.
    pub fn idle(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.used.get() == 0 {
                return Poll::Ready(());
            }
            register(&self.waiters, cx);
            Poll::Pending
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let slots = &self.slots;
        slots.used.set(slots.used.get() - 1);
        // Few waiters (one accept loop per listener, plus drain): wake all.
        for waker in slots.waiters.take() {
            waker.wake();
        }
    }
}

/// Adds a waker unless an equivalent one is already registered, so a task
/// polled repeatedly does not grow the list.
fn register(waiters: &RefCell<Vec<Waker>>, cx: &Context<'_>) {
    let mut waiters = waiters.borrow_mut();
    if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
        waiters.push(cx.waker().clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn trigger_wakes_waiters() {
        block_on(async {
            let t = Trigger::default();
            let t2 = t.clone();
            let waiter = monoio::spawn(async move { t2.wait().await });
            monoio::spawn(async move { t.fire() });
            waiter.await;
        });
    }

    #[test]
    fn slots_bound_concurrency_and_release_on_drop() {
        block_on(async {
            let slots = Slots::new(2);
            let a = slots.acquire().await;
            let _b = slots.acquire().await;
            assert_eq!(slots.used(), 2);
            let s2 = Rc::clone(&slots);
            let third = monoio::spawn(async move { s2.acquire().await });
            drop(a);
            let _c = third.await;
            assert_eq!(slots.used(), 2);
        });
    }
}
