//! Admission control: how many invocations run at once, per function and on
//! the node, and the short bounded queue in front of those limits.
//!
//! Every request takes a [`Permit`] before its guest runs and gives it back
//! when the guest is done. A function may run up to its `max_concurrency`;
//! its first `reserved_concurrency` slots (and their memory) are its own,
//! the rest come from the node's shared capacity and memory budget. Of
//! those shared slots and that shared memory, a function that did not ask
//! for a `max_concurrency` of its own may hold only its burst share
//! ([`SlotLimits::burst_percent`], by default a quarter): one function
//! flooding the node with slow requests leaves the rest to the others. Over
//! a limit, a request waits in the function's queue (at most `max_queued`,
//! for at most `queue_timeout`) and is then refused: the caller answers
//! `429`.
//!
//! One mutex guards all counters: it is held for a few hundred nanoseconds
//! per acquire and release and never across guest code. Granting a freed
//! slot needs the node-wide view (a slot freed by one function may be the
//! one another is waiting for), which per-function locks would split.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A function's admission limits, from its deployed configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLimits {
    /// Most invocations running at once.
    pub max_concurrency: u32,
    /// Slots kept for this function alone.
    pub reserved: u32,
    /// Memory one invocation may use (its configured limit), in bytes.
    pub memory_bytes: u64,
    /// Requests that may wait for a slot.
    pub max_queued: u32,
    /// Most of the node's shared (unreserved) slots, and of its shared
    /// memory, this function may hold at once, in percent. Always at least
    /// one invocation; 100 lets it take all of them.
    pub burst_percent: u32,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Throttled {
    /// The function is at its limit and its queue is full (or it has none).
    #[error("the function is at its concurrency limit and its queue is full")]
    QueueFull,
    /// The request waited in the queue for the whole queue timeout.
    #[error("no slot became free within the queue timeout")]
    QueueTimeout,
    /// The function was deleted while the request waited.
    #[error("the function was deleted")]
    Gone,
}

/// Node-wide capacity and every function's share of it.
pub struct Admission {
    state: Mutex<State>,
}

struct State {
    functions: HashMap<Arc<str>, Slots>,
    /// Functions with at least one waiter, so a release looks at these only.
    queued: HashSet<Arc<str>>,
    max_concurrency: u32,
    memory_budget: u64,
    /// Shared (unreserved) slots and memory in use.
    shared_in_use: u32,
    shared_memory_in_use: u64,
    /// Every function's reserved slots and memory, summed.
    reserved_total: u32,
    reserved_memory_total: u64,
    next_ticket: u64,
}

struct Slots {
    limits: SlotLimits,
    running: u32,
    reserved_in_use: u32,
    queue: VecDeque<Waiter>,
    /// Deleted while invocations were still running: removed when the last
    /// one ends.
    deleted: bool,
}

struct Waiter {
    ticket: u64,
    grant: oneshot::Sender<Grant>,
}

/// Which kind of slot an invocation holds.
#[derive(Debug, Clone, Copy)]
struct Grant {
    /// A shared slot (and shared memory) rather than a reserved one.
    shared: bool,
    memory: u64,
}

/// One admitted invocation; its slot is given back when dropped.
pub struct Permit {
    admission: Arc<Admission>,
    function: Arc<str>,
    grant: Grant,
    /// How long the request waited in the queue.
    pub waited: Duration,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(&self.function, self.grant);
    }
}

/// Admission counters of one function, for status and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlotUsage {
    /// Invocations running.
    pub running: u32,
    /// Requests waiting in the queue.
    pub queued: u32,
}

impl Admission {
    /// A node that runs at most `max_concurrency` invocations at once whose
    /// configured memory adds up to at most `memory_budget` bytes.
    pub fn new(max_concurrency: u32, memory_budget: u64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                functions: HashMap::new(),
                queued: HashSet::new(),
                max_concurrency,
                memory_budget,
                shared_in_use: 0,
                shared_memory_in_use: 0,
                reserved_total: 0,
                reserved_memory_total: 0,
                next_ticket: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update below leaves the counters consistent before it can
        // panic (none of them does), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets (or changes) a function's limits; refused when its reservation
    /// does not fit in what the node has left.
    pub fn configure(&self, function: &str, limits: SlotLimits) -> Result<(), String> {
        let mut state = self.lock();
        let (old_reserved, old_memory) = state
            .functions
            .get(function)
            .filter(|slots| !slots.deleted)
            .map_or((0, 0), |slots| {
                (slots.limits.reserved, reserved_memory(&slots.limits))
            });
        let reserved_total = state.reserved_total - old_reserved + limits.reserved;
        let reserved_memory_total =
            state.reserved_memory_total - old_memory + reserved_memory(&limits);
        if reserved_total > state.max_concurrency {
            return Err(format!(
                "reserved_concurrency {} does not fit: the node runs {} invocations at once and {} \
                 are already reserved by other functions",
                limits.reserved,
                state.max_concurrency,
                state.reserved_total - old_reserved
            ));
        }
        if reserved_memory_total > state.memory_budget {
            return Err(format!(
                "reserved_concurrency {} × {} MB does not fit in the node's memory budget of {} MB \
                 ({} MB already reserved by other functions)",
                limits.reserved,
                limits.memory_bytes >> 20,
                state.memory_budget >> 20,
                (state.reserved_memory_total - old_memory) >> 20
            ));
        }
        state.reserved_total = reserved_total;
        state.reserved_memory_total = reserved_memory_total;
        let slots = state
            .functions
            .entry(Arc::from(function))
            .or_insert_with(|| Slots {
                limits,
                running: 0,
                reserved_in_use: 0,
                queue: VecDeque::new(),
                deleted: false,
            });
        slots.limits = limits;
        slots.deleted = false;
        // A raised limit may let waiters in.
        state.dispatch();
        Ok(())
    }

    /// Forgets a deleted function: its reservation returns to the node and
    /// its waiters are refused.
    pub fn remove(&self, function: &str) {
        let mut state = self.lock();
        let Some(slots) = state.functions.get_mut(function) else {
            return;
        };
        let (reserved, memory) = (slots.limits.reserved, reserved_memory(&slots.limits));
        // Dropping the senders wakes the waiters with `Gone`.
        slots.queue.clear();
        slots.deleted = true;
        let idle = slots.running == 0;
        state.reserved_total -= reserved;
        state.reserved_memory_total -= memory;
        state.queued.remove(function);
        if idle {
            state.functions.remove(function);
        }
        state.dispatch();
    }

    /// Admits one invocation of `function`: at once if a slot is free,
    /// otherwise after waiting in its queue for at most `queue_timeout`.
    pub async fn acquire(
        self: &Arc<Self>,
        function: &Arc<str>,
        queue_timeout: Duration,
    ) -> Result<Permit, Throttled> {
        let waiting = {
            let mut state = self.lock();
            let ticket = state.next_ticket;
            let Some(slots) = state.functions.get(function) else {
                return Err(Throttled::Gone);
            };
            // Nobody jumps the queue: with waiters, a new request waits too.
            if slots.queue.is_empty()
                && let Some(grant) = state.try_grant(function)
            {
                return Ok(self.permit(function, grant, Duration::ZERO));
            }
            let Some(slots) = state.functions.get_mut(function) else {
                return Err(Throttled::Gone);
            };
            if slots.queue.len() >= slots.limits.max_queued as usize || queue_timeout.is_zero() {
                return Err(Throttled::QueueFull);
            }
            let (grant, waiting) = oneshot::channel();
            slots.queue.push_back(Waiter { ticket, grant });
            state.next_ticket += 1;
            state.queued.insert(function.clone());
            Waiting {
                admission: self,
                function,
                ticket,
                receiver: waiting,
                since: Instant::now(),
            }
        };
        waiting.wait(queue_timeout).await
    }

    fn permit(self: &Arc<Self>, function: &Arc<str>, grant: Grant, waited: Duration) -> Permit {
        Permit {
            admission: self.clone(),
            function: function.clone(),
            grant,
            waited,
        }
    }

    fn release(&self, function: &str, grant: Grant) {
        let mut state = self.lock();
        state.give_back(function, grant);
        if !state.queued.is_empty() {
            state.dispatch();
        }
    }

    /// Running and queued invocations of `function`.
    pub fn usage(&self, function: &str) -> SlotUsage {
        let state = self.lock();
        state
            .functions
            .get(function)
            .map_or(SlotUsage::default(), |slots| SlotUsage {
                running: slots.running,
                queued: slots.queue.len() as u32,
            })
    }

    /// Memory promised to running invocations (their configured limits),
    /// in bytes: reserved slots in use plus shared ones.
    pub fn memory_in_use(&self) -> u64 {
        let state = self.lock();
        let reserved: u64 = state
            .functions
            .values()
            .map(|slots| u64::from(slots.reserved_in_use) * slots.limits.memory_bytes)
            .sum();
        reserved + state.shared_memory_in_use
    }

    /// The node's memory budget, in bytes.
    pub fn memory_budget(&self) -> u64 {
        self.lock().memory_budget
    }
}

fn reserved_memory(limits: &SlotLimits) -> u64 {
    u64::from(limits.reserved) * limits.memory_bytes
}

impl State {
    /// Takes a slot for `function` if its limits and the node allow.
    fn try_grant(&mut self, function: &str) -> Option<Grant> {
        let shared_capacity = self.max_concurrency - self.reserved_total;
        let shared_memory = self.memory_budget - self.reserved_memory_total;
        let within_share = self.within_share(self.functions.get(function)?);
        let slots = self.functions.get_mut(function)?;
        if slots.deleted || slots.running >= slots.limits.max_concurrency {
            return None;
        }
        let memory = slots.limits.memory_bytes;
        let grant = if slots.reserved_in_use < slots.limits.reserved {
            slots.reserved_in_use += 1;
            Grant {
                shared: false,
                memory,
            }
        } else if self.shared_in_use < shared_capacity
            && self.shared_memory_in_use + memory <= shared_memory
            && within_share
        {
            self.shared_in_use += 1;
            self.shared_memory_in_use += memory;
            Grant {
                shared: true,
                memory,
            }
        } else {
            return None;
        };
        slots.running += 1;
        Some(grant)
    }

    fn give_back(&mut self, function: &str, grant: Grant) {
        if grant.shared {
            self.shared_in_use -= 1;
            self.shared_memory_in_use -= grant.memory;
        }
        let Some(slots) = self.functions.get_mut(function) else {
            return;
        };
        slots.running -= 1;
        if !grant.shared {
            slots.reserved_in_use -= 1;
        }
        if slots.deleted && slots.running == 0 {
            self.functions.remove(function);
        }
    }

    /// Hands free slots to waiters, oldest first, as long as one can take
    /// a slot. A waiter that gave up (its receiver is gone) is skipped and
    /// its slot given back.
    fn dispatch(&mut self) {
        loop {
            let mut best: Option<(u64, Arc<str>)> = None;
            for function in &self.queued {
                let Some(slots) = self.functions.get(function) else {
                    continue;
                };
                let Some(head) = slots.queue.front() else {
                    continue;
                };
                if best
                    .as_ref()
                    .is_none_or(|(ticket, _)| head.ticket < *ticket)
                    && self.can_grant(slots)
                {
                    best = Some((head.ticket, function.clone()));
                }
            }
            let Some((_, function)) = best else {
                return;
            };
            let Some(grant) = self.try_grant(&function) else {
                return;
            };
            let Some(slots) = self.functions.get_mut(&function) else {
                return;
            };
            let waiter = slots.queue.pop_front();
            if slots.queue.is_empty() {
                self.queued.remove(&function);
            }
            let delivered = waiter.is_some_and(|waiter| waiter.grant.send(grant).is_ok());
            if !delivered {
                self.give_back(&function, grant);
            }
        }
    }

    fn can_grant(&self, slots: &Slots) -> bool {
        if slots.deleted || slots.running >= slots.limits.max_concurrency {
            return false;
        }
        slots.reserved_in_use < slots.limits.reserved
            || (self.shared_in_use < self.max_concurrency - self.reserved_total
                && self.shared_memory_in_use + slots.limits.memory_bytes
                    <= self.memory_budget - self.reserved_memory_total
                && self.within_share(slots))
    }

    /// Whether one more shared slot keeps the function within its burst
    /// share of the shared slots and memory. Its first shared invocation
    /// always is, so a share smaller than one invocation still serves.
    fn within_share(&self, slots: &Slots) -> bool {
        let percent = u64::from(slots.limits.burst_percent);
        let shared_running = u64::from(slots.running.saturating_sub(slots.reserved_in_use));
        if percent >= 100 || shared_running == 0 {
            return true;
        }
        let shared_capacity = u64::from(self.max_concurrency.saturating_sub(self.reserved_total));
        let slot_share = (shared_capacity * percent / 100).max(1);
        let shared_memory = u128::from(
            self.memory_budget
                .saturating_sub(self.reserved_memory_total),
        );
        let memory_share = shared_memory * u128::from(percent) / 100;
        let memory_after = u128::from(shared_running + 1) * u128::from(slots.limits.memory_bytes);
        shared_running < slot_share && memory_after <= memory_share
    }
}

/// A request in a function's queue.
struct Waiting<'a> {
    admission: &'a Arc<Admission>,
    function: &'a Arc<str>,
    ticket: u64,
    receiver: oneshot::Receiver<Grant>,
    since: Instant,
}

impl Waiting<'_> {
    async fn wait(mut self, timeout: Duration) -> Result<Permit, Throttled> {
        let granted = tokio::time::timeout(timeout, &mut self.receiver).await;
        match granted {
            Ok(Ok(grant)) => Ok(self.granted(grant)),
            Ok(Err(_)) => Err(Throttled::Gone),
            Err(_) => {
                // Closing first means no grant can arrive after this check:
                // one sent in the meantime is taken, never lost.
                self.receiver.close();
                if let Ok(grant) = self.receiver.try_recv() {
                    return Ok(self.granted(grant));
                }
                let mut state = self.admission.lock();
                if let Some(slots) = state.functions.get_mut(self.function) {
                    slots.queue.retain(|waiter| waiter.ticket != self.ticket);
                    if slots.queue.is_empty() {
                        state.queued.remove(self.function);
                    }
                }
                Err(Throttled::QueueTimeout)
            }
        }
    }

    fn granted(&self, grant: Grant) -> Permit {
        self.admission
            .permit(self.function, grant, self.since.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn limits(max: u32, reserved: u32, queued: u32) -> SlotLimits {
        SlotLimits {
            max_concurrency: max,
            reserved,
            memory_bytes: 128 * MB,
            max_queued: queued,
            burst_percent: 100,
        }
    }

    fn shared(percent: u32) -> SlotLimits {
        SlotLimits {
            burst_percent: percent,
            ..limits(1000, 0, 0)
        }
    }

    fn name(text: &str) -> Arc<str> {
        Arc::from(text)
    }

    /// Starts a request that has to queue, and returns once it is queued.
    async fn queue_one(
        admission: &Arc<Admission>,
        function: &Arc<str>,
    ) -> tokio::task::JoinHandle<Result<Permit, Throttled>> {
        let queued_before = admission.usage(function).queued;
        let waiter = {
            let (admission, function) = (admission.clone(), function.clone());
            tokio::spawn(async move { admission.acquire(&function, Duration::from_secs(30)).await })
        };
        while admission.usage(function).queued == queued_before {
            tokio::task::yield_now().await;
        }
        waiter
    }

    #[tokio::test]
    async fn excess_over_the_function_limit_is_refused_without_a_queue() {
        let admission = Admission::new(100, 1 << 40);
        admission.configure("f", limits(3, 0, 0)).unwrap();
        let f = name("f");
        let mut permits = Vec::new();
        for _ in 0..3 {
            permits.push(admission.acquire(&f, Duration::from_secs(1)).await.unwrap());
        }
        let refused = admission.acquire(&f, Duration::from_secs(1)).await;
        assert_eq!(refused.err(), Some(Throttled::QueueFull));
        drop(permits.pop());
        assert!(admission.acquire(&f, Duration::ZERO).await.is_ok());
    }

    #[tokio::test]
    async fn a_queued_request_gets_the_next_free_slot() {
        let admission = Admission::new(100, 1 << 40);
        admission.configure("f", limits(1, 0, 5)).unwrap();
        let f = name("f");
        let first = admission.acquire(&f, Duration::ZERO).await.unwrap();
        let waiter = queue_one(&admission, &f).await;
        drop(first);
        let second = waiter.await.unwrap().unwrap();
        assert_eq!(admission.usage("f").running, 1);
        drop(second);
        assert_eq!(admission.usage("f").running, 0);
    }

    #[tokio::test]
    async fn a_queued_request_times_out_and_leaves_the_queue() {
        let admission = Admission::new(100, 1 << 40);
        admission.configure("f", limits(1, 0, 5)).unwrap();
        let f = name("f");
        let _running = admission.acquire(&f, Duration::ZERO).await.unwrap();
        let refused = admission.acquire(&f, Duration::from_millis(50)).await;
        assert_eq!(refused.err(), Some(Throttled::QueueTimeout));
        assert_eq!(admission.usage("f").queued, 0);
    }

    #[tokio::test]
    async fn reserved_slots_stay_free_for_their_function() {
        // Node of 4: g reserves 2, so f can take only the 2 shared ones.
        let admission = Admission::new(4, 1 << 40);
        admission.configure("f", limits(100, 0, 0)).unwrap();
        admission.configure("g", limits(100, 2, 0)).unwrap();
        let (f, g) = (name("f"), name("g"));
        let _f1 = admission.acquire(&f, Duration::ZERO).await.unwrap();
        let _f2 = admission.acquire(&f, Duration::ZERO).await.unwrap();
        assert!(admission.acquire(&f, Duration::ZERO).await.is_err());
        let _g1 = admission.acquire(&g, Duration::ZERO).await.unwrap();
        let _g2 = admission.acquire(&g, Duration::ZERO).await.unwrap();
        // g's reservation is used up and the shared slots are f's now.
        assert!(admission.acquire(&g, Duration::ZERO).await.is_err());
    }

    #[test]
    fn a_reservation_over_the_node_is_refused() {
        let admission = Admission::new(10, 1 << 40);
        admission.configure("f", limits(100, 8, 0)).unwrap();
        let error = admission.configure("g", limits(100, 3, 0)).unwrap_err();
        assert!(error.contains("8 are already reserved"), "{error}");
        // Changing f's own reservation does not count its old one twice.
        admission.configure("f", limits(100, 10, 0)).unwrap();
    }

    #[tokio::test]
    async fn the_memory_budget_bounds_concurrency() {
        // 512 MB of budget, 128 MB per invocation: four at once.
        let admission = Admission::new(100, 512 * MB);
        admission.configure("f", limits(100, 0, 0)).unwrap();
        let f = name("f");
        let mut permits = Vec::new();
        for _ in 0..4 {
            permits.push(admission.acquire(&f, Duration::ZERO).await.unwrap());
        }
        assert!(admission.acquire(&f, Duration::ZERO).await.is_err());
        assert_eq!(admission.memory_in_use(), 512 * MB);
    }

    #[tokio::test]
    async fn a_function_takes_at_most_its_burst_share_of_shared_slots() {
        // Node of 20, 4 reserved by r: 16 shared, a quarter is 4.
        let admission = Admission::new(20, 1 << 40);
        admission.configure("f", shared(25)).unwrap();
        admission.configure("g", shared(25)).unwrap();
        admission.configure("r", limits(10, 4, 0)).unwrap();
        let (f, g) = (name("f"), name("g"));
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(admission.acquire(&f, Duration::ZERO).await.unwrap());
        }
        assert_eq!(
            admission.acquire(&f, Duration::ZERO).await.err(),
            Some(Throttled::QueueFull)
        );
        // The flood leaves the others their room.
        for _ in 0..4 {
            held.push(admission.acquire(&g, Duration::ZERO).await.unwrap());
        }
        // A waiter of f gets a slot only when f's own share frees up.
        let admission2 = Admission::new(20, 1 << 40);
        let mut queued = shared(25);
        queued.max_queued = 5;
        admission2.configure("f", queued).unwrap();
        admission2.configure("g", shared(100)).unwrap();
        let mut fs = Vec::new();
        for _ in 0..5 {
            fs.push(admission2.acquire(&f, Duration::ZERO).await.unwrap());
        }
        let waiter = queue_one(&admission2, &f).await;
        let g1 = admission2.acquire(&g, Duration::ZERO).await.unwrap();
        drop(g1);
        assert_eq!(admission2.usage("f").queued, 1, "f went over its share");
        drop(fs.pop());
        assert!(waiter.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn the_burst_share_bounds_shared_memory_but_always_allows_one() {
        // 1024 MB of budget, 128 MB each: a quarter is two invocations.
        let admission = Admission::new(1000, 1024 * MB);
        admission.configure("f", shared(25)).unwrap();
        let f = name("f");
        let _one = admission.acquire(&f, Duration::ZERO).await.unwrap();
        let _two = admission.acquire(&f, Duration::ZERO).await.unwrap();
        assert!(admission.acquire(&f, Duration::ZERO).await.is_err());
        // A share smaller than one invocation still runs one.
        let admission = Admission::new(1000, 256 * MB);
        admission.configure("f", shared(10)).unwrap();
        let _one = admission.acquire(&f, Duration::ZERO).await.unwrap();
        assert!(admission.acquire(&f, Duration::ZERO).await.is_err());
    }

    #[tokio::test]
    async fn deleting_a_function_refuses_its_waiters_and_keeps_counts_right() {
        let admission = Admission::new(100, 1 << 40);
        admission.configure("f", limits(1, 1, 5)).unwrap();
        let f = name("f");
        let running = admission.acquire(&f, Duration::ZERO).await.unwrap();
        let waiter = queue_one(&admission, &f).await;
        admission.remove("f");
        assert_eq!(waiter.await.unwrap().err(), Some(Throttled::Gone));
        drop(running);
        // Redeployed: a fresh start, with the reservation available again.
        admission.configure("f", limits(1, 100, 0)).unwrap();
        assert!(admission.acquire(&f, Duration::ZERO).await.is_ok());
    }
}
