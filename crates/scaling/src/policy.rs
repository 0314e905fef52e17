//! Keep-alive and pre-warm policies.

use std::time::Duration;

/// What a policy decided after an invocation ended: measured from that end,
/// the function is unloaded (cold) for `prewarm`, then loaded (warm) for
/// `keep_alive`, then unloaded again until the next invocation.
///
/// `prewarm == 0` means: stay loaded from the end of the invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// How long after the end of an invocation the function is loaded again.
    pub prewarm: Duration,
    /// How long it then stays loaded, waiting for the next invocation.
    pub keep_alive: Duration,
}

impl Windows {
    /// Whether the function is loaded `idle` after the end of the last
    /// invocation.
    pub fn is_warm_after(&self, idle: Duration) -> bool {
        idle >= self.prewarm && idle < self.prewarm.saturating_add(self.keep_alive)
    }

    /// How long the function is loaded within the first `idle` after the end
    /// of the last invocation: the memory-time it is kept warm (wasted
    /// unless the next invocation arrives in the window).
    pub fn loaded_within(&self, idle: Duration) -> Duration {
        let end = self.prewarm.saturating_add(self.keep_alive).min(idle);
        end.saturating_sub(self.prewarm)
    }
}

/// A node-wide keep-alive policy: makes one [`FunctionKeepAlive`] per
/// function.
pub trait KeepAlivePolicy: Send + Sync {
    /// A short name for tables and metrics, e.g. `fixed-10m` or `hybrid`.
    fn name(&self) -> String;

    /// The state of a newly deployed (or newly seen) function.
    fn new_function(&self) -> Box<dyn FunctionKeepAlive>;

    /// The finest time step of the windows this policy sets: the node
    /// applies them at least four times per step.
    fn resolution(&self) -> Duration;
}

/// One function's keep-alive state. Called by the autoscaler on every
/// invocation, so both methods must be cheap (no allocation in steady
/// state).
pub trait FunctionKeepAlive: Send + Sync {
    /// An invocation started `idle` after the previous one ended. Not called
    /// for the first invocation, nor when invocations overlap.
    fn record_idle(&mut self, idle: Duration);

    /// The windows to apply from the end of the invocation that just ended.
    fn windows(&self) -> Windows;
}

/// The baseline: stay loaded for a fixed time after every invocation, as
/// AWS Lambda and OpenWhisk do (10 minutes by default).
#[derive(Debug, Clone, Copy)]
pub struct FixedKeepAlive {
    /// How long a function stays loaded after its last invocation.
    pub keep_alive: Duration,
}

impl FixedKeepAlive {
    /// The baseline's default: 10 minutes.
    pub const DEFAULT: Duration = Duration::from_secs(600);
}

impl Default for FixedKeepAlive {
    fn default() -> Self {
        Self {
            keep_alive: Self::DEFAULT,
        }
    }
}

impl KeepAlivePolicy for FixedKeepAlive {
    fn name(&self) -> String {
        format!("fixed-{}", humanize(self.keep_alive))
    }

    fn new_function(&self) -> Box<dyn FunctionKeepAlive> {
        Box::new(*self)
    }

    fn resolution(&self) -> Duration {
        self.keep_alive
    }
}

impl FunctionKeepAlive for FixedKeepAlive {
    fn record_idle(&mut self, _idle: Duration) {}

    fn windows(&self) -> Windows {
        Windows {
            prewarm: Duration::ZERO,
            keep_alive: self.keep_alive,
        }
    }
}

/// `90s` → `90s`, `600s` → `10m`, `7200s` → `2h`: short labels for tables.
pub(crate) fn humanize(duration: Duration) -> String {
    let secs = duration.as_secs();
    if duration.subsec_nanos() != 0 || secs == 0 {
        format!("{}ms", duration.as_millis())
    } else if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn windows_are_half_open() {
        let windows = Windows {
            prewarm: secs(60),
            keep_alive: secs(30),
        };
        assert!(!windows.is_warm_after(secs(59)));
        assert!(windows.is_warm_after(secs(60)));
        assert!(windows.is_warm_after(secs(89)));
        assert!(!windows.is_warm_after(secs(90)));
        assert_eq!(windows.loaded_within(secs(59)), Duration::ZERO);
        assert_eq!(windows.loaded_within(secs(75)), secs(15));
        assert_eq!(windows.loaded_within(secs(3600)), secs(30));
    }

    #[test]
    fn fixed_keep_alive_ignores_idle_times() {
        let policy = FixedKeepAlive {
            keep_alive: secs(300),
        };
        assert_eq!(policy.name(), "fixed-5m");
        let mut function = policy.new_function();
        for idle in [secs(1), secs(299), secs(301), secs(86_400)] {
            function.record_idle(idle);
            let windows = function.windows();
            assert_eq!(windows.prewarm, Duration::ZERO);
            assert_eq!(windows.keep_alive, secs(300));
        }
        assert!(function.windows().is_warm_after(secs(299)));
        assert!(!function.windows().is_warm_after(secs(300)));
    }

    #[test]
    fn labels_are_short() {
        assert_eq!(humanize(secs(90)), "90s");
        assert_eq!(humanize(secs(600)), "10m");
        assert_eq!(humanize(secs(7200)), "2h");
        assert_eq!(humanize(Duration::from_millis(1500)), "1500ms");
    }
}
