//! A value that changes rarely (the topology's epoch, "shutting down") and
//! that every session waits on in its event loop.
//!
//! The loop's select polls every branch each time the session wakes, about
//! 20 times a TPC-B transaction. A tokio `watch` takes its waiter list's
//! mutex on each of those polls (with coop budgeting around it: ~450
//! instructions); a `Listener` registers its task in an `AtomicWaker`,
//! which only compares wakers, and reads one atomic.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;

use futures_util::task::AtomicWaker;

pub struct Bell {
    value: AtomicU64,
    listeners: Mutex<Listeners>,
}

#[derive(Default)]
struct Listeners {
    wakers: Vec<Weak<AtomicWaker>>,
    /// The list is swept of dropped listeners when it reaches this length.
    sweep_at: usize,
}

impl Bell {
    pub fn new(value: u64) -> Arc<Bell> {
        Arc::new(Bell {
            value: AtomicU64::new(value),
            listeners: Default::default(),
        })
    }

    pub fn value(&self) -> u64 {
        self.value.load(Ordering::Acquire)
    }

    /// Sets the value and, if it changed, wakes every listener.
    pub fn ring(&self, value: u64) {
        if self.value.swap(value, Ordering::AcqRel) == value {
            return;
        }
        let listeners = self.listeners.lock().expect("not poisoned");
        for waker in listeners.wakers.iter().filter_map(Weak::upgrade) {
            waker.wake();
        }
    }

    pub fn listen(self: &Arc<Bell>) -> Listener {
        let waker = Arc::new(AtomicWaker::new());
        let mut listeners = self.listeners.lock().expect("not poisoned");
        if listeners.wakers.len() >= listeners.sweep_at {
            listeners.wakers.retain(|w| w.strong_count() > 0);
            listeners.sweep_at = (2 * listeners.wakers.len()).max(64);
        }
        listeners.wakers.push(Arc::downgrade(&waker));
        Listener {
            heard: self.value(),
            waker,
            bell: self.clone(),
        }
    }
}

/// One task's ear for a bell.
pub struct Listener {
    heard: u64,
    waker: Arc<AtomicWaker>,
    bell: Arc<Bell>,
}

impl Listener {
    pub fn value(&self) -> u64 {
        self.bell.value()
    }

    /// Resolves when the value differs from the last one this listener heard
    /// (the one at `listen`, at first).
    pub fn changed(&mut self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            // Registered before the value is read: a ring in between wakes us.
            self.waker.register(cx.waker());
            let now = self.bell.value();
            if now == self.heard {
                return Poll::Pending;
            }
            self.heard = now;
            Poll::Ready(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn quiet(listener: &mut Listener) -> bool {
        tokio::time::timeout(Duration::from_millis(20), listener.changed())
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_change_wakes_each_listener_once() {
        let bell = Bell::new(1);
        let mut listener = bell.listen();
        drop(bell.listen());
        assert!(quiet(&mut listener).await, "nothing happened yet");
        bell.ring(1);
        assert!(quiet(&mut listener).await, "the same value is no change");
        let waiting = tokio::spawn(async move {
            listener.changed().await;
            listener
        });
        tokio::task::yield_now().await;
        bell.ring(2);
        let mut listener = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(listener.value(), 2);
        assert!(quiet(&mut listener).await, "heard once");
    }

    #[test]
    fn dropped_listeners_are_swept() {
        let bell = Bell::new(0);
        let kept: Vec<Listener> = (0..10).map(|_| bell.listen()).collect();
        for _ in 0..1000 {
            drop(bell.listen());
        }
        let held = bell.listeners.lock().unwrap().wakers.len();
        assert!(
            held < 100,
            "{held} wakers held for {} listeners",
            kept.len()
        );
    }
}
