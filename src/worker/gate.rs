//! Two tiny single-thread synchronisation primitives for a worker's tasks.
//!
//! [`Trigger`]: fires once, wakes every waiter (drain). [`Slots`]: a counting
//! limit on concurrent connections, with a register of the idle ones so
//! that, at the limit, the longest-idle connection can be asked to close
//! for a new one ([`Slots::evict_oldest_idle`]).
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

/// Share of the connection cap (percent) from which HTTP/1.1 responses
/// close their connections: with 10% of the cap left there is room to
/// turn clients over before the next stage (evicting idle connections,
/// then 503 `overload`) is reached.
pub const KEEP_ALIVE_OFF_PERCENT: usize = 90;

/// A limit on concurrently held slots (connections per worker).
#[derive(Debug)]
pub struct Slots {
    max: Cell<usize>,
    used: Cell<usize>,
    waiters: Waiters,
    /// Connections waiting for a client's next request (or first byte).
    /// A slab: registering and leaving are O(1) with no allocation in the
    /// steady state (every request does both); finding the longest idle
    /// is a scan, done only at the connection cap.
    idle: RefCell<slab::Slab<IdleState>>,
    /// Orders registrations: the smallest `since` is the longest idle.
    next_idle: Cell<u64>,
    /// The process's memory overload stage, as last told (0 to 3).
    pressure: Cell<u8>,
}

#[derive(Debug)]
struct IdleState {
    since: u64,
    evicted: bool,
    waker: Option<Waker>,
}

/// One connection's place in the idle register, from when it started
/// waiting for a request until it gets one (or is dropped).
#[derive(Debug)]
pub struct Idle<'a> {
    slots: &'a Slots,
    key: usize,
}

impl Idle<'_> {
    /// Completes when the worker needs this connection's slot for a new
    /// one: the connection should close.
    pub fn evicted(&self) -> Evicted<'_> {
        Evicted { idle: self }
    }
}

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        self.slots.idle.borrow_mut().remove(self.key);
    }
}

/// The future of [`Idle::evicted`].
#[derive(Debug)]
pub struct Evicted<'a> {
    idle: &'a Idle<'a>,
}

impl Future for Evicted<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut idle = self.idle.slots.idle.borrow_mut();
        let Some(state) = idle.get_mut(self.idle.key) else {
            return Poll::Pending;
        };
        if state.evicted {
            return Poll::Ready(());
        }
        if !state
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
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
            idle: RefCell::default(),
            next_idle: Cell::new(0),
            pressure: Cell::new(0),
        })
    }

    /// Takes a slot if one is free.
    pub fn try_acquire(self: &Rc<Self>) -> Option<Slot> {
        if self.used.get() >= self.max.get() {
            return None;
        }
        self.used.set(self.used.get() + 1);
        Some(Slot {
            slots: Rc::clone(self),
        })
    }

    /// Registers a connection as idle until the returned value is dropped.
    pub fn register_idle(&self) -> Idle<'_> {
        let since = self.next_idle.get();
        self.next_idle.set(since + 1);
        let key = self.idle.borrow_mut().insert(IdleState {
            since,
            evicted: false,
            waker: None,
        });
        Idle { slots: self, key }
    }

    /// Asks the longest-idle connection not yet asked to close. Returns
    /// whether there was one; its slot frees once its task has run.
    pub fn evict_oldest_idle(&self) -> bool {
        let mut idle = self.idle.borrow_mut();
        let Some(state) = idle
            .iter_mut()
            .map(|(_, s)| s)
            .filter(|s| !s.evicted)
            .min_by_key(|s| s.since)
        else {
            return false;
        };
        state.evicted = true;
        if let Some(w) = state.waker.take() {
            w.wake();
        }
        true
    }

    /// Connections registered as idle now.
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().len()
    }

    pub fn used(&self) -> usize {
        self.used.get()
    }

    /// Whether the worker is near its connection cap
    /// ([`KEEP_ALIVE_OFF_PERCENT`] of it or more): the first overload
    /// stage, where responses stop keeping their connections alive so
    /// that slots come free before anyone is refused.
    pub fn crowded(&self) -> bool {
        // The headroom is the part of the cap above the threshold, rounded
        // down: under a cap of 10 there is none, and the stage is skipped
        // (with two connections "near the cap" is the cap itself).
        let max = self.max.get();
        let headroom = max * (100 - KEEP_ALIVE_OFF_PERCENT) / 100;
        headroom > 0 && self.used.get() + headroom >= max
    }

    /// The memory overload stage (see [`crate::lifecycle::overload`]).
    pub fn pressure(&self) -> u8 {
        self.pressure.get()
    }

    pub fn set_pressure(&self, stage: u8) {
        if self.pressure.replace(stage) != stage {
            self.waiters.wake_all();
        }
    }

    /// Completes once the memory stage is below the one that stops accepting.
    pub async fn accepting(&self) {
        self.until(|s| s.pressure.get() < crate::lifecycle::overload::STAGE_STOP_ACCEPT)
            .await;
    }

    /// Completes once the memory stage stops accepting.
    pub async fn overloaded(&self) {
        self.until(|s| s.pressure.get() >= crate::lifecycle::overload::STAGE_STOP_ACCEPT)
            .await;
    }

    /// Changes the limit (a config swap); connections over a lowered limit
    /// keep their slots; new ones are admitted only under it.
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
    fn the_longest_idle_connection_is_evicted_first() {
        block_on(async {
            let slots = Slots::new(3);
            let held: Vec<Slot> = (0..3).map(|_| slots.try_acquire().unwrap()).collect();
            assert!(slots.try_acquire().is_none());
            assert!(!slots.evict_oldest_idle(), "nobody idle: nothing to evict");
            let mut tasks = Vec::new();
            for (i, slot) in held.into_iter().enumerate() {
                let s = Rc::clone(&slots);
                tasks.push(monoio::spawn(async move {
                    let _slot = slot;
                    let idle = s.register_idle();
                    idle.evicted().await;
                    i
                }));
                // Registered in order: 0 is the longest idle.
                monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            assert_eq!(slots.idle_count(), 3);
            assert!(slots.evict_oldest_idle());
            let first = tasks.remove(0).await;
            assert_eq!(first, 0);
            let slot = slots.acquire().await;
            assert_eq!(slots.used(), 3);
            assert_eq!(slots.idle_count(), 2, "the evicted one left the register");
            drop(slot);
            for t in tasks {
                assert!(slots.evict_oldest_idle());
                t.await;
            }
            assert_eq!((slots.used(), slots.idle_count()), (0, 0));
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
