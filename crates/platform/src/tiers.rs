//! Execution tiers and keep-alive: when a function is loaded in memory and
//! when it goes back to disk.
//!
//! - *cold*: only the compiled artifact on disk (where a deploy leaves a
//!   function: idle functions cost no memory);
//! - *warm*: the artifact mapped and pre-linked ([`Function`]): a fresh
//!   instance per request;
//! - *hot*: a warm function deployed with `reuse = true` that keeps idle
//!   instances for its next requests.
//!
//! Each function's [`Activity`] feeds its invocations to the node's
//! [`KeepAlivePolicy`]; the autoscaler (a background task) applies the
//! policy's windows every tick: it unloads functions whose keep-alive ran
//! out, pre-warms those whose pre-warm time came, shrinks hot pools, and
//! evicts the least valuable warm and hot entries when the node's memory
//! budget is exceeded.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use mayfly_runtime::Function;
use mayfly_scaling::{FunctionKeepAlive, KeepAlivePolicy, Windows};

/// Where a function is between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TierName {
    /// Artifact on disk only.
    Cold,
    /// Loaded and pre-linked; a fresh instance per request.
    Warm,
    /// Loaded, with kept instances reused across requests.
    Hot,
}

impl TierName {
    /// The tier as a number (0 cold, 1 warm, 2 hot): which state of the
    /// `mayfly_function_tier` state set is on.
    pub fn gauge(self) -> i64 {
        match self {
            TierName::Cold => 0,
            TierName::Warm => 1,
            TierName::Hot => 2,
        }
    }
}

/// One deployed version's place in the tiers: its loaded function, if any.
#[derive(Default)]
pub struct Tier {
    loaded: ArcSwapOption<Function>,
    /// Serialises loading so a burst on a cold function loads it once.
    loading: tokio::sync::Mutex<()>,
}

impl Tier {
    /// The loaded function, if the version is warm or hot.
    pub fn get(&self) -> Option<Arc<Function>> {
        self.loaded.load_full()
    }

    /// The loaded function, loading it with `load` first if cold. Returns
    /// whether this call did the load (a cold start).
    pub async fn get_or_load<F, E>(&self, load: F) -> Result<(Arc<Function>, bool), E>
    where
        F: AsyncFnOnce() -> Result<Function, E>,
    {
        if let Some(function) = self.get() {
            return Ok((function, false));
        }
        let _loading = self.loading.lock().await;
        if let Some(function) = self.get() {
            return Ok((function, false));
        }
        let function = Arc::new(load().await?);
        self.loaded.store(Some(function.clone()));
        Ok((function, true))
    }

    /// Back to cold: drops the loaded function and its kept instances.
    /// Requests still running keep their own reference until they finish.
    /// Returns whether anything was loaded.
    pub fn unload(&self) -> bool {
        match self.loaded.swap(None) {
            Some(function) => {
                function.close();
                true
            }
            None => false,
        }
    }

    /// The tier the version is in now.
    pub fn name(&self) -> TierName {
        match self.get() {
            None => TierName::Cold,
            Some(function) if function.reuses_instances() => TierName::Hot,
            Some(_) => TierName::Warm,
        }
    }
}

/// Milliseconds are plenty for keep-alive decisions and fit in an atomic.
type Millis = u64;

/// A function's invocation activity, shared by all its versions: running
/// count, the end of its last invocation, and its keep-alive policy state.
pub struct Activity {
    origin: Instant,
    running: AtomicU32,
    /// When the function last became idle (ms since `origin`): the end of
    /// its last invocation, or its deploy (or the node's start) before any.
    last_end: AtomicU64,
    /// Whether an invocation has ended: only then is the time to the next
    /// one an idle time between invocations that the policy should learn.
    invoked: AtomicBool,
    /// The policy's windows from that moment: prewarm and keep-alive, in ms.
    prewarm: AtomicU64,
    keep_alive: AtomicU64,
    policy: Mutex<Box<dyn FunctionKeepAlive>>,
}

impl Activity {
    /// A function's activity under `policy`, counting time from `origin`;
    /// it starts idle as of now (just deployed or loaded), with the
    /// policy's initial windows.
    pub fn new(policy: &dyn KeepAlivePolicy, origin: Instant) -> Self {
        let state = policy.new_function();
        let windows = state.windows();
        Self {
            origin,
            running: AtomicU32::new(0),
            last_end: AtomicU64::new(millis(origin.elapsed())),
            invoked: AtomicBool::new(false),
            prewarm: AtomicU64::new(millis(windows.prewarm)),
            keep_alive: AtomicU64::new(millis(windows.keep_alive)),
            policy: Mutex::new(state),
        }
    }

    fn now(&self) -> Millis {
        millis(self.origin.elapsed())
    }

    /// An invocation starts. When the function was idle, the idle time goes
    /// to the policy (once per idle period, so a busy function rarely takes
    /// the policy's lock).
    pub fn started(&self) {
        if self.running.fetch_add(1, Ordering::AcqRel) != 0 {
            return;
        }
        if !self.invoked.load(Ordering::Acquire) {
            return;
        }
        let last_end = self.last_end.load(Ordering::Acquire);
        let idle = Duration::from_millis(self.now().saturating_sub(last_end));
        let mut policy = self.policy.lock().unwrap_or_else(|p| p.into_inner());
        policy.record_idle(idle);
        let windows = policy.windows();
        drop(policy);
        self.prewarm
            .store(millis(windows.prewarm), Ordering::Release);
        self.keep_alive
            .store(millis(windows.keep_alive), Ordering::Release);
    }

    /// An invocation ended; the last one to end starts the idle period.
    pub fn finished(&self) {
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.last_end.store(self.now(), Ordering::Release);
            self.invoked.store(true, Ordering::Release);
        }
    }

    /// Invocations running now.
    pub fn running(&self) -> u32 {
        self.running.load(Ordering::Acquire)
    }

    /// Time since the function last became idle, if it is idle.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.running() > 0 {
            return None;
        }
        let last_end = self.last_end.load(Ordering::Acquire);
        Some(Duration::from_millis(self.now().saturating_sub(last_end)))
    }

    /// The policy's windows for the current idle period.
    pub fn windows(&self) -> Windows {
        Windows {
            prewarm: Duration::from_millis(self.prewarm.load(Ordering::Acquire)),
            keep_alive: Duration::from_millis(self.keep_alive.load(Ordering::Acquire)),
        }
    }

    /// Whether the function should be loaded now (running, or idle inside
    /// its keep-alive window).
    pub fn should_be_warm(&self) -> bool {
        self.idle_for()
            .is_none_or(|idle| self.windows().is_warm_after(idle))
    }
}

fn millis(duration: Duration) -> Millis {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Counts one running invocation in its function's activity until dropped.
pub struct Running(Arc<Activity>);

impl Running {
    /// Marks an invocation of `activity` as started.
    pub fn start(activity: &Arc<Activity>) -> Self {
        activity.started();
        Self(activity.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.finished();
    }
}

/// What the autoscaler should do for one idle, loaded entry under memory
/// pressure: lower scores are evicted first.
pub fn eviction_order(idle: Duration, bytes: u64) -> std::cmp::Reverse<u128> {
    // Long idle and large entries give back the most memory for the least
    // expected loss: evict by idle time × size, largest first.
    std::cmp::Reverse(idle.as_millis().saturating_mul(u128::from(bytes.max(1))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_scaling::FixedKeepAlive;

    #[test]
    fn a_function_is_warm_within_its_keep_alive_and_cold_after() {
        let policy = FixedKeepAlive {
            keep_alive: Duration::from_millis(200),
        };
        let origin = Instant::now();
        let activity = Arc::new(Activity::new(&policy, origin));
        {
            let _running = Running::start(&activity);
            assert!(activity.should_be_warm());
            assert_eq!(activity.idle_for(), None);
        }
        assert!(activity.should_be_warm());
        std::thread::sleep(Duration::from_millis(250));
        assert!(!activity.should_be_warm());
    }

    /// Counts the idle times it is given.
    #[derive(Default)]
    struct Counting(std::sync::Arc<AtomicU32>);

    impl KeepAlivePolicy for Counting {
        fn name(&self) -> String {
            "counting".into()
        }
        fn new_function(&self) -> Box<dyn FunctionKeepAlive> {
            Box::new(Counting(self.0.clone()))
        }
        fn resolution(&self) -> Duration {
            Duration::from_secs(1)
        }
    }

    impl FunctionKeepAlive for Counting {
        fn record_idle(&mut self, _idle: Duration) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn windows(&self) -> Windows {
            Windows {
                prewarm: Duration::ZERO,
                keep_alive: Duration::from_secs(1),
            }
        }
    }

    #[test]
    fn only_gaps_between_invocations_are_idle_times() {
        let policy = Counting::default();
        let activity = Arc::new(Activity::new(&policy, Instant::now()));
        // Deploy to first call: not an idle time the policy should learn.
        drop(Running::start(&activity));
        assert_eq!(policy.0.load(Ordering::Relaxed), 0);
        // Overlapping calls: one idle period ends, once.
        let first = Running::start(&activity);
        let second = Running::start(&activity);
        drop((first, second));
        assert_eq!(policy.0.load(Ordering::Relaxed), 1);
        drop(Running::start(&activity));
        assert_eq!(policy.0.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn eviction_prefers_long_idle_large_entries() {
        let mut entries = [
            ("small-recent", Duration::from_secs(1), 1u64 << 20),
            ("large-old", Duration::from_secs(60), 64 << 20),
            ("small-old", Duration::from_secs(60), 1 << 20),
        ];
        entries.sort_by_key(|(_, idle, bytes)| eviction_order(*idle, *bytes));
        assert_eq!(entries[0].0, "large-old");
        assert_eq!(entries[2].0, "small-recent");
    }
}
