//! Two tiny single-thread synchronisation primitives for a worker's tasks.
//!
//! [`Trigger`]: fires once, wakes every waiter (drain). [`Slots`]: a counting
//! limit on concurrent connections that parks the accept loop when full.
//! Both are `Rc`/`Cell` based: they never cross threads, so no atomics.

use std::{
    cell::{Cell, RefCell},
    future::Future,
    pin::Pin,
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
    waiters: Waiters,
}

impl Trigger {
    pub fn fire(&self) {
        if !self.inner.fired.replace(true) {
            self.inner.waiters.wake_all();
        }
    }

    pub fn is_fired(&self) -> bool {
        self.inner.fired.get()
    }

    /// Completes once [`Trigger::fire`] has been called. Dropping the
    /// future unregisters it, so a connection that waited on the drain and
    /// ended for another reason leaves nothing behind.
    pub fn wait(&self) -> Wait<'_> {
        Wait {
            trigger: self,
            key: None,
        }
    }
}

/// The future of [`Trigger::wait`].
#[derive(Debug)]
pub struct Wait<'a> {
    trigger: &'a Trigger,
    key: Option<Key>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inner = &self.trigger.inner;
        if inner.fired.get() {
            return Poll::Ready(());
        }
        let mut key = self.key;
        inner.waiters.register(&mut key, cx.waker());
        self.key = key;
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        self.trigger.inner.waiters.remove(self.key);
    }
}

/// A limit on concurrently held slots (connections per worker).
#[derive(Debug)]
pub struct Slots {
    max: Cell<usize>,
    used: Cell<usize>,
    waiters: Waiters,
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
            waiters: Waiters::default(),
        })
    }

    pub fn used(&self) -> usize {
        self.used.get()
    }

    /// Changes the limit (a config swap); connections over a lowered limit
    /// keep their slots, new ones wait until the count is under it.
    pub fn set_max(&self, max: usize) {
        self.max.set(max);
        self.waiters.wake_all();
    }

    /// Waits until a slot is free, then takes it.
    pub async fn acquire(self: &Rc<Self>) -> Slot {
        self.until(|s| s.used.get() < s.max.get()).await;
        self.used.set(self.used.get() + 1);
        Slot {
            slots: Rc::clone(self),
        }
    }

    /// Completes when no slot is held.
    pub async fn idle(&self) {
        self.until(|s| s.used.get() == 0).await;
    }

    fn until(&self, ready: fn(&Slots) -> bool) -> Until<'_> {
        Until {
            slots: self,
            ready,
            key: None,
        }
    }
}

/// Waits until `ready(slots)`; unregisters on drop.
struct Until<'a> {
    slots: &'a Slots,
    ready: fn(&Slots) -> bool,
    key: Option<Key>,
}

impl Future for Until<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if (self.ready)(self.slots) {
            return Poll::Ready(());
        }
        let mut key = self.key;
        self.slots.waiters.register(&mut key, cx.waker());
        self.key = key;
        Poll::Pending
    }
}

impl Drop for Until<'_> {
    fn drop(&mut self) {
        self.slots.waiters.remove(self.key);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let slots = &self.slots;
        slots.used.set(slots.used.get() - 1);
        // Few waiters (one accept loop per listener, plus drain): wake all.
        slots.waiters.wake_all();
    }
}

/// Where a waiter's waker sits: (epoch, index).
type Key = (u64, usize);

/// Registered wakers, O(1) to add, replace and remove.
///
/// Every waiting future owns a key and removes its waker when dropped, so
/// the list holds exactly the futures still waiting: many connections may
/// wait on the drain trigger, and each that ends for another reason must
/// not leave a waker (which keeps its whole task allocated) behind. Waking
/// all starts a new epoch, so keys from before are recognised as stale.
#[derive(Debug, Default)]
struct Waiters {
    slots: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<usize>>,
    epoch: Cell<u64>,
}

impl Waiters {
    fn register(&self, key: &mut Option<Key>, waker: &Waker) {
        let mut slots = self.slots.borrow_mut();
        if let Some((epoch, i)) = *key {
            if epoch == self.epoch.get() {
                if let Some(slot) = slots.get_mut(i) {
                    if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
                        *slot = Some(waker.clone());
                    }
                    return;
                }
            }
        }
        let i = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                slots.push(None);
                slots.len() - 1
            }
        };
        slots[i] = Some(waker.clone());
        *key = Some((self.epoch.get(), i));
    }

    fn remove(&self, key: Option<Key>) {
        let Some((epoch, i)) = key else { return };
        if epoch != self.epoch.get() {
            return;
        }
        if let Some(slot) = self.slots.borrow_mut().get_mut(i) {
            if slot.take().is_some() {
                self.free.borrow_mut().push(i);
            }
        }
    }

    fn wake_all(&self) {
        self.epoch.set(self.epoch.get() + 1);
        self.free.borrow_mut().clear();
        let slots = self.slots.take();
        for waker in slots.into_iter().flatten() {
            waker.wake();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.borrow().iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
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
    fn a_dropped_wait_leaves_no_waker_behind() {
        block_on(async {
            let t = Trigger::default();
            for _ in 0..100 {
                // A connection waits on the drain, then ends another way.
                let t2 = t.clone();
                let task = monoio::spawn(async move {
                    monoio::select! {
                        _ = t2.wait() => false,
                        _ = monoio::time::sleep(std::time::Duration::from_millis(1)) => true,
                    }
                });
                assert!(task.await);
            }
            assert_eq!(t.inner.waiters.len(), 0, "no waker kept per ended waiter");
            let t2 = t.clone();
            let waiter = monoio::spawn(async move { t2.wait().await });
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            assert_eq!(t.inner.waiters.len(), 1);
            t.fire();
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
