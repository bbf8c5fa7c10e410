//! Busy-polling a session's short waits instead of sleeping through them
//! (`listen.busy_poll`).
//!
//! One client's query crosses the proxy twice, and each crossing used to
//! wake a sleeping thread: the proxy parked in `epoll_wait` while the
//! server worked, and again while the client read the answer and sent the
//! next query. Waking a parked thread is what a proxy adds to a query at
//! low load, more than any of its own work: on a virtual machine whose
//! idle CPUs halt (this project's machines: the `haltpoll` cpuidle driver
//! with polling off), a halted vCPU takes tens of microseconds to wake.
//! pgbench `-S -c 1` on one: 163 µs a query direct, 119 µs with a
//! low-priority busy loop keeping both CPUs awake.
//!
//! So, while the proxy has nothing else running, a session that waits
//! polls its sockets for up to the budget before it parks: it yields to
//! the runtime between polls, and tokio polls the reactor without blocking
//! (`epoll_wait` with a zero timeout) before running a task that yielded.
//! Other tasks run between the polls, so a spinning session delays no one;
//! and the spin stops as soon as another unit of work starts anywhere in
//! the proxy, so under load, when the CPU is PostgreSQL's, nothing spins.
//! The cost is the CPU burned while spinning: up to a core while one client
//! works back to back, nothing while clients are idle or the proxy is busy.
//! Go's scheduler spins the same way before parking; tokio does not.

use std::future::Future;
use std::task::Poll;
use std::time::{Duration, Instant};

/// How a wait ended, for `tidepool_busy_poll_waits_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spin {
    /// No spin: busy polling is off, other work was running, or what was
    /// awaited had already come.
    Skipped,
    /// What was awaited came while spinning: no thread was parked.
    Caught,
    /// The budget ran out, or other work started: parked as usual.
    Parked,
}

/// Polls `fut` without parking for up to `budget`, while `may_spin()`
/// holds, then awaits it as usual.
pub async fn wait<F: Future>(
    fut: F,
    budget: Duration,
    may_spin: impl Fn() -> bool,
) -> (F::Output, Spin) {
    let mut fut = std::pin::pin!(fut);
    if budget.is_zero() || !may_spin() {
        return (fut.await, Spin::Skipped);
    }
    if let Poll::Ready(out) = futures_util::poll!(fut.as_mut()) {
        return (out, Spin::Skipped);
    }
    let deadline = Instant::now() + budget;
    while may_spin() && Instant::now() < deadline {
        tokio::task::yield_now().await;
        if let Poll::Ready(out) = futures_util::poll!(fut.as_mut()) {
            return (out, Spin::Caught);
        }
    }
    (fut.await, Spin::Parked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Ready once `flag` is set; registers no waker, so only a spin (which
    /// polls again unasked) can see it: a parked task would never wake.
    fn unwoken(flag: Arc<AtomicBool>) -> impl Future<Output = ()> {
        std::future::poll_fn(move |_| {
            if flag.load(Ordering::Relaxed) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Sets `flag` after yielding a few times: other tasks run while a
    /// session spins.
    fn set_soon(flag: &Arc<AtomicBool>) {
        let flag = flag.clone();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            flag.store(true, Ordering::Relaxed);
        });
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_spin_sees_what_comes_while_other_tasks_run() {
        let flag = Arc::new(AtomicBool::new(false));
        set_soon(&flag);
        let spun = wait(unwoken(flag), Duration::from_secs(60), || true);
        let ((), spin) = tokio::time::timeout(Duration::from_secs(10), spun)
            .await
            .expect("seen while spinning");
        assert_eq!(spin, Spin::Caught);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn no_budget_or_other_work_means_a_plain_wait() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move { tx.send(7) });
        let (got, spin) = wait(rx, Duration::ZERO, || true).await;
        assert_eq!((got.unwrap(), spin), (7, Spin::Skipped));

        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move { tx.send(8) });
        let (got, spin) = wait(rx, Duration::from_secs(60), || false).await;
        assert_eq!((got.unwrap(), spin), (8, Spin::Skipped));

        let (got, spin) = wait(async { 9 }, Duration::from_secs(60), || true).await;
        assert_eq!((got, spin), (9, Spin::Skipped));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_spent_budget_or_new_work_parks() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(())
        });
        let (got, spin) = wait(rx, Duration::from_micros(1), || true).await;
        assert_eq!((got.unwrap(), spin), ((), Spin::Parked));

        // Work starting elsewhere ends the spin at once, budget or not.
        let other_work = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let started = other_work.clone();
        tokio::spawn(async move {
            started.store(true, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(())
        });
        let may_spin = || !other_work.load(Ordering::Relaxed);
        let (got, spin) = wait(rx, Duration::from_secs(60), may_spin).await;
        assert_eq!((got.unwrap(), spin), ((), Spin::Parked));
    }
}
