//! Progressive delivery: an automatic canary judges itself.
//!
//! While an alias has a canary with a [`CanaryPolicy`], every invocation of
//! either side is recorded here (wall time, and for the canary whether it
//! failed). Once the canary has run `requests` times it is promoted if its
//! error rate and p99 stayed within bounds; it is rolled back as soon as
//! its errors exceed what the whole window allows, without waiting for the
//! rest. The verdict goes to `Deployments`, which moves the alias under its
//! change lock and records the move with the figures that decided it.
//!
//! The window lives in memory: a restarted node judges the canary afresh.
//!
//! The judge counts distinct invocations. A request the client tagged with a
//! correlation id (`x-mayfly-client-request-id`) keeps its version on a
//! retry, so anyone can replay one id that lands on the canary as often as
//! they like; such replays still run and are billed, but only the first
//! invocation per client id on each side counts towards the verdict.
//! Otherwise 50 replays of one canary-bound id would promote a canary, and a
//! few slow replays would roll back a healthy one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use mayfly_runtime::{InvocationReport, Outcome};
use mayfly_store::{CanaryPolicy, WEIGHT_SCALE_BP};
use tokio::sync::mpsc;

/// Fewest invocations of the alias's own version that make a baseline p99
/// for a policy without `max_p99_ms`; with fewer, latency is not judged.
const MIN_BASELINE_SAMPLES: usize = 20;

/// Baseline rule for a policy without `max_p99_ms`: the canary's p99 may be
/// at most this many times the stable version's...
const BASELINE_FACTOR: u64 = 2;

/// ...plus this slack, so a sub-millisecond function is not judged on noise.
const BASELINE_SLACK_US: u64 = 10_000;

/// What a rollout decided, for `Deployments` to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The rollout that reached it: applied only while that rollout is the
    /// alias's current one (not after the user re-set the canary).
    pub rollout_id: u64,
    /// Function name.
    pub function: String,
    /// The alias the canary is on.
    pub alias: String,
    /// The alias's own version when the rollout started.
    pub stable_version: u64,
    /// The canary version.
    pub canary_version: u64,
    /// Promote (the canary takes all traffic) or roll back (it takes none).
    pub promote: bool,
    /// The figures that decided it, for the history and the logs.
    pub detail: String,
}

/// Invocations seen since the rollout started.
#[derive(Default)]
struct Window {
    /// Wall time of each finished canary invocation, in microseconds.
    canary_wall_us: Vec<u64>,
    /// How many of them failed.
    canary_errors: u32,
    /// Wall times of the stable version's latest invocations (a ring).
    stable_wall_us: Vec<u64>,
    /// Invocations of the stable version seen, for the ring's position.
    stable_seen: usize,
    /// Canary invocations started (finished ones included).
    canary_started: u64,
    /// Once the window is full: how many had started by then. Promotion
    /// waits until all of those finished, so a slow failure (a hang that
    /// ends in a timeout) is judged before, not after, the verdict.
    settle_at: Option<u64>,
    /// Client ids (hashed) of the canary invocations judged so far: at most
    /// the window's worth plus those running when it filled.
    canary_clients: HashSet<u64>,
    /// Client ids (hashed) of the stable invocations judged lately, oldest
    /// first, as many as the stable ring holds: an id whose sample left the
    /// ring may count again.
    stable_clients: HashSet<u64>,
    stable_client_order: VecDeque<u64>,
}

/// One automatic canary being judged.
pub struct Rollout {
    id: u64,
    function: String,
    alias: String,
    stable_version: u64,
    canary_version: u64,
    policy: CanaryPolicy,
    window: Mutex<Window>,
    decided: AtomicBool,
    verdicts: mpsc::UnboundedSender<Verdict>,
    /// Keyed hashing of client ids, so the sets hold 8 bytes per id and a
    /// client cannot craft ids that collide.
    client_ids: RandomState,
}

/// How far a rollout has got, for the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Progress {
    /// Canary invocations judged so far.
    pub requests: usize,
    /// How many of them failed.
    pub errors: u32,
    /// Whether a verdict has been reached.
    pub decided: bool,
}

impl Rollout {
    /// Records one finished invocation of the canary (`canary`) or of the
    /// alias's own version, and sends the verdict once it is reached.
    /// Invocations the node ended at shutdown are not the version's doing
    /// and are not counted.
    pub fn record(&self, canary: bool, report: &InvocationReport) {
        if report.outcome == Outcome::Killed || self.decided.load(Ordering::Relaxed) {
            return;
        }
        let wall_us = u64::try_from(report.wall.as_micros()).unwrap_or(u64::MAX);
        let verdict = {
            let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
            if canary {
                window.canary_wall_us.push(wall_us);
                if failed(report) {
                    window.canary_errors += 1;
                }
                match judge(&self.policy, &window) {
                    Some((true, detail)) => {
                        let finished = window.canary_wall_us.len() as u64;
                        let started = window.canary_started.max(finished);
                        let needed = *window.settle_at.get_or_insert(started);
                        (finished >= needed).then_some((true, detail))
                    }
                    other => other,
                }
            } else {
                // Keep as many of the stable version's latest as the window
                // judges, so its p99 covers the same stretch of time.
                let capacity = self.stable_capacity();
                let at = window.stable_seen % capacity;
                if window.stable_wall_us.len() < capacity {
                    window.stable_wall_us.push(wall_us);
                } else {
                    window.stable_wall_us[at] = wall_us;
                }
                window.stable_seen += 1;
                None
            }
        };
        if let Some((promote, detail)) = verdict {
            // One verdict per rollout, however many invocations race here.
            if self.decided.swap(true, Ordering::AcqRel) {
                return;
            }
            let _ = self.verdicts.send(Verdict {
                rollout_id: self.id,
                function: self.function.clone(),
                alias: self.alias.clone(),
                stable_version: self.stable_version,
                canary_version: self.canary_version,
                promote,
                detail,
            });
        }
    }

    /// Whether an invocation the client tagged with `client_id` may be
    /// judged: only the first one per id (and side) does, so replaying an id
    /// cannot steer the verdict. Call it before [`Rollout::started`], and
    /// leave a `false` invocation out of the rollout altogether.
    pub fn first_sight(&self, canary: bool, client_id: &str) -> bool {
        if self.decided.load(Ordering::Relaxed) {
            return false;
        }
        let key = self.client_ids.hash_one(client_id);
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if canary {
            return window.canary_clients.insert(key);
        }
        if !window.stable_clients.insert(key) {
            return false;
        }
        window.stable_client_order.push_back(key);
        if window.stable_client_order.len() > self.stable_capacity()
            && let Some(oldest) = window.stable_client_order.pop_front()
        {
            window.stable_clients.remove(&oldest);
        }
        true
    }

    /// How many of the stable version's latest invocations are kept.
    fn stable_capacity(&self) -> usize {
        self.policy.requests.max(100) as usize
    }

    /// Notes that an invocation of the canary (`canary`) started.
    pub fn started(&self, canary: bool) {
        if canary && !self.decided.load(Ordering::Relaxed) {
            self.window
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .canary_started += 1;
        }
    }

    /// How far it has got.
    pub fn progress(&self) -> Progress {
        let window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        Progress {
            requests: window.canary_wall_us.len(),
            errors: window.canary_errors,
            decided: self.decided.load(Ordering::Relaxed),
        }
    }

    /// Lets the rollout reach a verdict again: the last one could not be
    /// applied (the move failed), so the next invocation re-judges it.
    fn reopen(&self) {
        self.decided.store(false, Ordering::Release);
    }

    fn matches(&self, stable_version: u64, canary_version: u64, policy: &CanaryPolicy) -> bool {
        self.stable_version == stable_version
            && self.canary_version == canary_version
            && self.policy == *policy
    }
}

/// An error, for a canary: a trap, timeout, out-of-memory or 5xx. A 4xx
/// (a body over the limit included) is the client's doing, and so is a
/// client that went away before the response was done (`client_closed`):
/// impatient clients must not roll back a healthy canary. Such an
/// invocation still counts as a request, with its wall time, so a canary
/// slow enough to drive clients away shows in the p99.
fn failed(report: &InvocationReport) -> bool {
    if report.outcome == Outcome::ClientClosed {
        return false;
    }
    match report.status {
        Some(status) if (400..500).contains(&status) => false,
        Some(status) => report.outcome != Outcome::Ok || status >= 500,
        None => true,
    }
}

/// The 99th percentile (nearest rank) of `samples`, in microseconds.
fn p99(samples: &[u64]) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (sorted.len() * 99).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

fn ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

/// The verdict the window supports, if any: `(promote, detail)`.
fn judge(policy: &CanaryPolicy, window: &Window) -> Option<(bool, String)> {
    let seen = window.canary_wall_us.len();
    let errors = window.canary_errors;
    let allowed =
        u64::from(policy.requests) * u64::from(policy.max_error_bp) / u64::from(WEIGHT_SCALE_BP);
    let max_percent = f64::from(policy.max_error_bp) / 100.0;
    if u64::from(errors) > allowed {
        return Some((
            false,
            format!(
                "{errors} errors in {seen} requests: more than the {allowed} that {max_percent}% \
                 of {} allows",
                policy.requests
            ),
        ));
    }
    if seen < policy.requests as usize {
        return None;
    }
    let canary_p99 = p99(&window.canary_wall_us).unwrap_or(0);
    let errors_text = format!(
        "{errors} errors in {seen} requests ({:.2}% <= {max_percent}%)",
        f64::from(errors) * 100.0 / seen as f64
    );
    let limit = match policy.max_p99_ms {
        Some(max) => Some((u64::from(max) * 1000, format!("the limit {max} ms"))),
        None if window.stable_wall_us.len() >= MIN_BASELINE_SAMPLES => {
            let baseline = p99(&window.stable_wall_us).unwrap_or(0);
            Some((
                baseline * BASELINE_FACTOR + BASELINE_SLACK_US,
                format!(
                    "{BASELINE_FACTOR} x the stable version's p99 {} + {}",
                    ms(baseline),
                    ms(BASELINE_SLACK_US)
                ),
            ))
        }
        None => None,
    };
    Some(match limit {
        Some((limit_us, limit_text)) if canary_p99 > limit_us => (
            false,
            format!(
                "p99 {} over {limit_text} = {}; {errors_text}",
                ms(canary_p99),
                ms(limit_us)
            ),
        ),
        Some((limit_us, limit_text)) => (
            true,
            format!(
                "{errors_text}; p99 {} within {limit_text} = {}",
                ms(canary_p99),
                ms(limit_us)
            ),
        ),
        None => (
            true,
            format!(
                "{errors_text}; p99 {} (not judged: the stable version served fewer than \
                 {MIN_BASELINE_SAMPLES} requests meanwhile)",
                ms(canary_p99)
            ),
        ),
    })
}

/// The node's automatic canaries, by function and alias.
pub struct Rollouts {
    next_id: AtomicU64,
    active: Mutex<HashMap<(String, String), Arc<Rollout>>>,
    verdicts: mpsc::UnboundedSender<Verdict>,
}

impl Rollouts {
    /// An empty set, and the receiving end of its verdicts.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<Verdict>) {
        let (verdicts, receiver) = mpsc::unbounded_channel();
        let rollouts = Self {
            next_id: AtomicU64::new(1),
            active: Mutex::default(),
            verdicts,
        };
        (rollouts, receiver)
    }

    /// The rollout of `alias` of `function` for this canary: the running
    /// one if the alias still has the same versions and policy and it has
    /// not decided (so a catalog rebuild keeps its window), else a new one
    /// (so re-setting a canary whose verdict was refused judges it again).
    pub fn rollout(
        &self,
        function: &str,
        alias: &str,
        stable_version: u64,
        canary_version: u64,
        policy: CanaryPolicy,
    ) -> Arc<Rollout> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let key = (function.to_string(), alias.to_string());
        if let Some(running) = active.get(&key)
            && running.matches(stable_version, canary_version, &policy)
            && !running.decided.load(Ordering::Acquire)
        {
            return running.clone();
        }
        let rollout = Arc::new(Rollout {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            function: function.to_string(),
            alias: alias.to_string(),
            stable_version,
            canary_version,
            policy,
            window: Mutex::default(),
            decided: AtomicBool::new(false),
            verdicts: self.verdicts.clone(),
            client_ids: RandomState::new(),
        });
        active.insert(key, rollout.clone());
        rollout
    }

    /// Forgets the rollouts of `function` except those on `keep` aliases.
    pub fn retain(&self, function: &str, keep: &[&str]) {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        active.retain(|(name, alias), _| name != function || keep.contains(&alias.as_str()));
    }

    /// Whether rollout `id` is still the one judging `alias` of `function`.
    pub fn is_current(&self, function: &str, alias: &str, id: u64) -> bool {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        active
            .get(&(function.to_string(), alias.to_string()))
            .is_some_and(|rollout| rollout.id == id)
    }

    /// Re-opens rollout `id` of `alias` of `function` after its verdict
    /// could not be applied, so its next invocation judges it again.
    pub fn reopen(&self, function: &str, alias: &str, id: u64) {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rollout) = active.get(&(function.to_string(), alias.to_string()))
            && rollout.id == id
        {
            rollout.reopen();
        }
    }

    /// How far the rollout on `alias` of `function` has got, if it has one.
    pub fn progress(&self, function: &str, alias: &str) -> Option<Progress> {
        let active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        active
            .get(&(function.to_string(), alias.to_string()))
            .map(|rollout| rollout.progress())
    }
}

/// One invocation's link to the rollout judging its version.
#[derive(Clone)]
pub struct Observed {
    /// The rollout.
    pub rollout: Arc<Rollout>,
    /// Whether the invocation ran the canary (else the alias's version).
    pub canary: bool,
}

impl Observed {
    /// Records the finished invocation.
    pub fn record(&self, report: &InvocationReport) {
        self.rollout.record(self.canary, report);
    }

    /// Notes that the invocation started.
    pub fn started(&self) {
        self.rollout.started(self.canary);
    }

    /// Whether the invocation, which the client tagged with `client_id`,
    /// may be judged (see [`Rollout::first_sight`]).
    pub fn first_sight(&self, client_id: &str) -> bool {
        self.rollout.first_sight(self.canary, client_id)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn report(wall_ms: u64, outcome: Outcome, status: u16) -> InvocationReport {
        InvocationReport {
            started_at: SystemTime::now(),
            wall: Duration::from_millis(wall_ms),
            instantiate: Duration::ZERO,
            cpu: Duration::ZERO,
            peak_memory_bytes: 0,
            outcome,
            status: Some(status),
        }
    }

    fn policy(requests: u32, max_error_bp: u32, max_p99_ms: Option<u32>) -> CanaryPolicy {
        CanaryPolicy {
            requests,
            max_error_bp,
            max_p99_ms,
        }
    }

    fn judged(policy: CanaryPolicy) -> (Rollouts, mpsc::UnboundedReceiver<Verdict>, Arc<Rollout>) {
        let (rollouts, verdicts) = Rollouts::new();
        let rollout = rollouts.rollout("f", "live", 1, 2, policy);
        (rollouts, verdicts, rollout)
    }

    #[test]
    fn a_healthy_canary_is_promoted_after_its_window_and_only_once() {
        let (_rollouts, mut verdicts, rollout) = judged(policy(100, 100, Some(50)));
        for i in 0..99 {
            // One error in 100 is within 1%; 4xx is the client's doing.
            let status = if i == 5 {
                500
            } else if i == 6 {
                404
            } else {
                200
            };
            rollout.record(true, &report(3, Outcome::Ok, status));
        }
        assert!(verdicts.try_recv().is_err(), "judged before the window");
        rollout.record(true, &report(3, Outcome::Ok, 200));
        let verdict = verdicts.try_recv().unwrap();
        assert!(verdict.promote, "{}", verdict.detail);
        assert_eq!((verdict.stable_version, verdict.canary_version), (1, 2));
        assert!(
            verdict.detail.contains("1 errors in 100"),
            "{}",
            verdict.detail
        );
        rollout.record(true, &report(3, Outcome::Ok, 200));
        assert!(verdicts.try_recv().is_err(), "a second verdict");
        assert!(rollout.progress().decided);
    }

    #[test]
    fn errors_beyond_the_budget_roll_back_without_waiting_for_the_window() {
        let (_rollouts, mut verdicts, rollout) = judged(policy(200, 100, None));
        rollout.record(true, &report(1, Outcome::Error, 500));
        rollout.record(true, &report(1, Outcome::Timeout, 504));
        assert!(
            verdicts.try_recv().is_err(),
            "2 errors of 200 are within 1%"
        );
        rollout.record(true, &report(1, Outcome::Ok, 503));
        let verdict = verdicts.try_recv().unwrap();
        assert!(!verdict.promote);
        assert!(
            verdict.detail.contains("3 errors in 3 requests"),
            "{}",
            verdict.detail
        );
        // Killed at shutdown: not counted.
        let (_rollouts, mut verdicts, rollout) = rollout_zero();
        rollout.record(true, &report(1, Outcome::Killed, 500));
        assert!(verdicts.try_recv().is_err());
        assert_eq!(rollout.progress().requests, 0);
    }

    fn rollout_zero() -> (Rollouts, mpsc::UnboundedReceiver<Verdict>, Arc<Rollout>) {
        judged(policy(10, 0, None))
    }

    #[test]
    fn a_slow_canary_is_rolled_back_against_a_limit_or_the_baseline() {
        let (_rollouts, mut verdicts, rollout) = judged(policy(50, 100, Some(20)));
        for _ in 0..50 {
            rollout.record(true, &report(30, Outcome::Ok, 200));
        }
        let verdict = verdicts.try_recv().unwrap();
        assert!(!verdict.promote);
        assert!(
            verdict.detail.contains("p99 30.0 ms over the limit 20 ms"),
            "{}",
            verdict.detail
        );

        // Baseline: stable at 5 ms allows 2 x 5 + 10 = 20 ms.
        let (_rollouts, mut verdicts, rollout) = judged(policy(50, 100, None));
        for _ in 0..100 {
            rollout.record(false, &report(5, Outcome::Ok, 200));
        }
        for _ in 0..50 {
            rollout.record(true, &report(19, Outcome::Ok, 200));
        }
        assert!(verdicts.try_recv().unwrap().promote);
        let (_rollouts, mut verdicts, rollout) = judged(policy(50, 100, None));
        for _ in 0..100 {
            rollout.record(false, &report(5, Outcome::Ok, 200));
        }
        for _ in 0..50 {
            rollout.record(true, &report(25, Outcome::Ok, 200));
        }
        let verdict = verdicts.try_recv().unwrap();
        assert!(!verdict.promote, "{}", verdict.detail);
    }

    #[test]
    fn a_rebuild_keeps_the_window_and_a_new_canary_starts_afresh() {
        let (rollouts, _verdicts) = Rollouts::new();
        let p = policy(10, 0, None);
        let first = rollouts.rollout("f", "live", 1, 2, p);
        first.record(true, &report(1, Outcome::Ok, 200));
        let again = rollouts.rollout("f", "live", 1, 2, p);
        assert!(Arc::ptr_eq(&first, &again));
        assert!(rollouts.is_current("f", "live", first.id));
        // A decided rollout (say its move was refused) is not reused: the
        // same canary set again is judged afresh.
        first.decided.store(true, Ordering::Release);
        let fresh = rollouts.rollout("f", "live", 1, 2, p);
        assert!(!Arc::ptr_eq(&first, &fresh));
        assert!(!rollouts.is_current("f", "live", first.id));
        let other = rollouts.rollout("f", "live", 1, 3, p);
        assert_eq!(other.progress().requests, 0);
        assert_eq!(rollouts.progress("f", "live").unwrap().requests, 0);
        rollouts.retain("f", &[]);
        assert!(rollouts.progress("f", "live").is_none());
    }

    #[test]
    fn promotion_waits_for_the_invocations_started_before_the_window_filled() {
        let (_rollouts, mut verdicts, rollout) = judged(policy(100, 0, None));
        for _ in 0..101 {
            rollout.started(true);
        }
        for _ in 0..100 {
            rollout.record(true, &report(2, Outcome::Ok, 200));
        }
        assert!(
            verdicts.try_recv().is_err(),
            "promoted with one still running"
        );
        // The straggler hangs until its timeout: that is a failure.
        rollout.record(true, &report(30_000, Outcome::Timeout, 504));
        let verdict = verdicts.try_recv().unwrap();
        assert!(!verdict.promote, "{}", verdict.detail);
    }

    #[test]
    fn client_errors_are_not_the_canarys() {
        let (_rollouts, mut verdicts, rollout) = judged(policy(3, 0, None));
        rollout.record(true, &report(1, Outcome::Error, 413));
        rollout.record(true, &report(1, Outcome::Ok, 404));
        rollout.record(true, &report(1, Outcome::Ok, 200));
        assert!(verdicts.try_recv().unwrap().promote);
    }

    #[test]
    fn clients_that_leave_are_not_the_canarys_errors() {
        let (_rollouts, mut verdicts, rollout) = judged(policy(3, 0, None));
        // Gone before the head (no status) and while the body flowed.
        let gone = InvocationReport {
            status: None,
            ..report(1, Outcome::ClientClosed, 200)
        };
        rollout.record(true, &gone);
        rollout.record(true, &report(1, Outcome::ClientClosed, 200));
        rollout.record(true, &report(1, Outcome::Ok, 200));
        let verdict = verdicts.try_recv().unwrap();
        assert!(verdict.promote, "{}", verdict.detail);
        assert!(
            verdict.detail.contains("0 errors in 3"),
            "{}",
            verdict.detail
        );
    }

    #[test]
    fn replays_of_one_client_id_count_once() {
        // 50 replays of one canary-bound id do not fill a window of 20...
        let (_rollouts, mut verdicts, rollout) = judged(policy(20, 0, Some(50)));
        for _ in 0..50 {
            if rollout.first_sight(true, "replayed") {
                rollout.started(true);
                rollout.record(true, &report(1, Outcome::Ok, 200));
            }
        }
        assert!(verdicts.try_recv().is_err(), "promoted by replays");
        assert_eq!(rollout.progress().requests, 1);
        // ...nor do 8 slow ones roll a window of 5 back; distinct ids count.
        let (_rollouts, mut verdicts, rollout) = judged(policy(5, 0, Some(50)));
        for _ in 0..8 {
            if rollout.first_sight(true, "slow") {
                rollout.record(true, &report(900, Outcome::Ok, 200));
            }
        }
        assert!(verdicts.try_recv().is_err(), "rolled back by replays");
        for i in 0..4 {
            assert!(rollout.first_sight(true, &format!("fresh-{i}")));
            rollout.record(true, &report(1, Outcome::Ok, 200));
        }
        assert_eq!(rollout.progress().requests, 5);
        assert!(verdicts.try_recv().is_ok());
        // Decided: nothing is judged any more.
        assert!(!rollout.first_sight(true, "late"));
    }

    #[test]
    fn a_stable_client_id_counts_again_once_its_sample_left_the_ring() {
        let (_rollouts, _verdicts, rollout) = judged(policy(10, 0, None));
        assert!(rollout.first_sight(false, "a"));
        assert!(!rollout.first_sight(false, "a"));
        // The stable ring keeps 100: after 100 other ids, `a` is forgotten.
        for i in 0..100 {
            assert!(rollout.first_sight(false, &format!("other-{i}")));
        }
        assert!(rollout.first_sight(false, "a"));
        let window = rollout.window.lock().unwrap();
        assert_eq!(window.stable_client_order.len(), 100);
        assert_eq!(window.stable_clients.len(), 100);
    }

    #[test]
    fn p99_is_the_nearest_rank() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(p99(&samples), Some(99));
        assert_eq!(p99(&[7]), Some(7));
        assert_eq!(p99(&[]), None);
        let samples: Vec<u64> = (1..=1000).collect();
        assert_eq!(p99(&samples), Some(990));
    }
}
