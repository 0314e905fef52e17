//! Wall-clock time as the stores record it, and the [`Clock`] the
//! scheduler reads and waits on, so its tests can drive time by hand.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A wall clock in milliseconds since the Unix epoch that can be waited on.
pub(crate) trait Clock: Send + Sync {
    /// Now, in ms since the Unix epoch.
    fn now_ms(&self) -> i64;
    /// Returns once this clock reads `deadline_ms` or later (a caller may
    /// also give up earlier, when something else wakes it).
    fn sleep_until(&self, deadline_ms: i64) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The system's clock.
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }

    fn sleep_until(&self, deadline_ms: i64) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let wait = u64::try_from(deadline_ms.saturating_sub(now_ms())).unwrap_or(0);
        Box::pin(tokio::time::sleep(Duration::from_millis(wait)))
    }
}

/// A clock that moves only when a test sets it.
#[cfg(test)]
pub(crate) struct ManualClock {
    now: std::sync::atomic::AtomicI64,
    moved: tokio::sync::Notify,
}

#[cfg(test)]
impl ManualClock {
    /// A clock reading `now_ms`.
    pub(crate) fn new(now_ms: i64) -> Self {
        Self {
            now: std::sync::atomic::AtomicI64::new(now_ms),
            moved: tokio::sync::Notify::new(),
        }
    }

    /// Sets the time (forwards or back) and wakes every sleeper to look.
    pub(crate) fn set(&self, now_ms: i64) {
        self.now.store(now_ms, std::sync::atomic::Ordering::SeqCst);
        self.moved.notify_waiters();
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn sleep_until(&self, deadline_ms: i64) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            loop {
                let moved = self.moved.notified();
                let mut moved = std::pin::pin!(moved);
                // Registered before the check, so a `set` in between wakes it.
                moved.as_mut().enable();
                if self.now_ms() >= deadline_ms {
                    return;
                }
                moved.await;
            }
        })
    }
}
