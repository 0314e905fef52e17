//! Fair sharing of the CPU between functions, so that CPU-bound guests of one
//! function cannot starve the requests of others.
//!
//! Every invocation starts in the **foreground**: its task runs on the node's
//! main async runtime, beside the gateway and the admin API, with no extra hop.
//! Nearly every request finishes there within its first slice (a hello
//! request runs ~20 µs). A guest still running when its first slice ends
//! (the epoch deadline fires, see [`FIRST_SLICE_TICKS`]) has shown that it
//! is CPU-bound, and moves to the **guest pool**: a runtime of its own whose
//! threads run at a lower OS priority, so the main runtime's threads (accept,
//! parse, route, short guests) get the CPU as soon as they wake. On the
//! pool, a guest runs only while it holds a *turn*: there are as many turns
//! as pool threads, and a guest gives its turn back at the end of every poll
//! (each poll lasts at most one epoch tick, because the guest yields at every
//! tick). Waiting guests are queued per function and turns go round-robin
//! over the functions with waiters, so 64 spinning invocations of one
//! function get the same share of the pool as one invocation of another.
//!
//! Without the split, all guests ran on the main runtime: 2 spinning guests
//! raised a neighbour's hello p50 from 1.8 to 211 ms (its tasks and the
//! runtime's I/O driver waited behind 5 ms guest slices), 64 raised it 330×.
//!
//! Written here rather than taken from a crate: no async runtime offers
//! per-key fair admission to polls, and it is ~150 lines over a mutex.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;

use crate::labels::RequestLabels;

/// How often the epoch advances. A running guest yields to the async runtime
/// at every tick, so this bounds how long one guest can hold a worker thread
/// before others get a turn, and it is the granularity of timeouts.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Epoch ticks a guest may run in the foreground before it moves to the
/// guest pool. The deadline counts from the current epoch, so the first
/// slice lasts between one and two ticks; one tick alone could end after a
/// few microseconds, when a request starts just before a tick.
///
/// Ticks count whether the guest runs or waits in an async host call, so a
/// guest that waits out its slice on an outbound request moves too. Keeping
/// such guests in the foreground until they had been busy for a slice was
/// tried and measured (2026-12-05): the outbound scenario of `cargo xtask
/// bench` did no better (13.2k and 15.9k req/s, against 16.4k-22.3k with
/// this simpler rule; its runs vary that much on a 2-core machine). Waits
/// for an inference are the exception ([`FirstSlice`]).
pub(crate) const FIRST_SLICE_TICKS: u64 = 2;

/// An invocation's first slice in the foreground: when it began and how
/// long the guest has since waited for inferences.
///
/// Waiting for an inference does not count. The inference runs on an
/// inference thread of its own, at the pool's priority and under the node's
/// inference permits, so the guest holds nothing of the main runtime while
/// it waits; counted, it sent every classification whose inference outlasted
/// the slice to the pool for its last few hundred microseconds of work, two
/// more thread wake-ups that often landed on the core running the other
/// inference. Not counting it, `wrk` posting a PNG to the classify guest
/// (two alternating runs each, 2 cores) went from 11.9-12.2 to 10.2-10.4
/// voluntary context switches per request at concurrency 1 and 131/128 to
/// 140/133 req/s; at concurrency 2 from 228/215 to 234/246 req/s.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FirstSlice {
    started: Instant,
    /// Time spent waiting for inferences since `started`.
    pub(crate) awaited_inference: Duration,
}

impl FirstSlice {
    /// A slice starting now.
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
            awaited_inference: Duration::ZERO,
        }
    }

    /// Whether the guest has used up its slice, asked when its epoch deadline
    /// passes. A guest that awaited no inference has (the deadline is the
    /// slice); one that did has if it ran a tick besides its waits.
    pub(crate) fn spent(&self) -> bool {
        self.awaited_inference.is_zero()
            || self
                .started
                .elapsed()
                .saturating_sub(self.awaited_inference)
                >= EPOCH_TICK
    }
}

/// How much lower than the node's other threads the guest pool's threads
/// run (a `nice` increment). At 10 the kernel gives a runnable pool thread
/// about a tenth of the weight of a main-runtime thread, so a request that
/// arrives while every core runs guests is parsed and routed at once.
pub(crate) const POOL_NICENESS: i32 = 10;

/// An invocation's whole run (guest, response head, report), boxed so that it
/// can move from the main runtime to the guest pool between two polls.
pub(crate) type GuestTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The guest pool: a runtime for CPU-bound guests and the turns that share it.
pub(crate) struct GuestPool {
    /// Always `Some` until dropped; taken in `drop` to shut it down without
    /// blocking (a runtime may not be dropped inside another's context).
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    turns: Arc<Turns>,
}

impl GuestPool {
    /// A pool of `threads` threads (at least one) and as many turns.
    pub(crate) fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("mayfly-guest")
            .on_thread_start(lower_thread_priority)
            // Busy guest threads rarely park, and parking is when a worker
            // polls for I/O and timers; check them more often than the
            // default (every 61 polls of ~1 tick each) so that the timers and
            // outbound I/O of guests on the pool do not lag.
            .event_interval(8)
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Some(runtime),
            handle,
            turns: Arc::new(Turns::new(threads)),
        })
    }

    /// Runs `task` on the current runtime until its guest uses up its first
    /// slice (`slice_spent` is set by the epoch callback), then on the pool.
    pub(crate) fn spawn(
        &self,
        task: GuestTask,
        labels: Arc<RequestLabels>,
        slice_spent: Arc<AtomicBool>,
    ) {
        tokio::spawn(Foreground {
            task: Some(task),
            labels,
            slice_spent,
            pool: self.handle.clone(),
            turns: self.turns.clone(),
        });
    }
}

impl Drop for GuestPool {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Lowers the calling thread's scheduling priority (Linux: `nice` is per
/// thread). Failure only costs fairness, so it is logged, not fatal.
pub(crate) fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread; no memory is shared.
        #[expect(unsafe_code, reason = "no safe wrapper sets one thread's nice value")]
        let result = unsafe {
            libc::setpriority(
                libc::PRIO_PROCESS,
                libc::gettid() as libc::id_t,
                POOL_NICENESS,
            )
        };
        if result != 0 {
            tracing::debug!(
                "cannot lower the guest pool thread's priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// An invocation in the foreground: polled on the main runtime until done,
/// or until its first slice is spent, when it moves to the pool.
struct Foreground {
    task: Option<GuestTask>,
    labels: Arc<RequestLabels>,
    slice_spent: Arc<AtomicBool>,
    pool: tokio::runtime::Handle,
    turns: Arc<Turns>,
}

impl Future for Foreground {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(task) = self.task.as_mut() else {
            return Poll::Ready(());
        };
        if task.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if self.slice_spent.load(Ordering::Acquire)
            && let Some(task) = self.task.take()
        {
            let function: Arc<str> = Arc::from(self.labels.function.as_str());
            self.pool
                .spawn(Fair::new(task, function, self.turns.clone()));
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// An invocation on the pool: each poll needs a turn.
///
/// The guest's future is polled with a waker of our own: being woken (by a
/// timer, I/O, or the guest's own yield at an epoch tick) puts the
/// invocation in its function's queue at once, and the task itself is woken
/// only when the queue grants it a turn. Queueing at wake time rather than at
/// the next poll is what makes the round robin fair: a guest that yields at
/// the end of its slice is back in line before its turn is handed on.
struct Fair {
    task: GuestTask,
    entry: Arc<Entry>,
    /// Wakes `entry`; handed to the guest's future.
    waker: Waker,
}

impl Fair {
    fn new(task: GuestTask, function: Arc<str>, turns: Arc<Turns>) -> Self {
        let entry = Arc::new(Entry {
            function,
            turns,
            task_waker: AtomicWaker::new(),
            state: AtomicU8::new(IDLE),
        });
        let waker = Waker::from(entry.clone());
        // A new invocation is ready to run: it joins the queue.
        waker.wake_by_ref();
        Self { task, entry, waker }
    }
}

impl Future for Fair {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        this.entry.task_waker.register(cx.waker());
        if !this.entry.turns.start_turn(&this.entry) {
            // Polled without a turn (a spurious wake-up): keep waiting.
            return Poll::Pending;
        }
        // Gives the turn back even if the poll unwinds.
        let _turn = HeldTurn(&this.entry);
        this.task
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

impl Drop for Fair {
    fn drop(&mut self) {
        self.entry.turns.cancel(&self.entry);
    }
}

/// A turn held for one poll.
struct HeldTurn<'a>(&'a Entry);

impl Drop for HeldTurn<'_> {
    fn drop(&mut self) {
        self.0.turns.end_poll(self.0);
        self.0.turns.give_back();
    }
}

/// Neither running nor waiting: the guest waits on something else.
const IDLE: u8 = 0;
/// Ready to run, in its function's queue.
const QUEUED: u8 = 1;
/// Given a turn, not yet polled.
const GRANTED: u8 = 2;
/// Being polled, holding a turn.
const RUNNING: u8 = 3;
/// Dropped: skipped if still queued.
const GONE: u8 = 4;

/// One invocation on the pool, as the turn queue sees it. `state` changes
/// only under the [`Turns`] lock.
struct Entry {
    function: Arc<str>,
    turns: Arc<Turns>,
    task_waker: AtomicWaker,
    state: AtomicU8,
}

impl Wake for Entry {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.turns.ready(self);
    }
}

/// The turns of the pool and the invocations waiting for one.
struct Turns {
    state: Mutex<TurnState>,
}

#[derive(Default)]
struct TurnState {
    /// Turns nobody holds. Never above zero while anyone waits.
    free: usize,
    /// Functions with waiters, in the order they get their next turn.
    ring: VecDeque<Arc<str>>,
    /// Each function's waiters, oldest first.
    waiting: HashMap<Arc<str>, VecDeque<Arc<Entry>>>,
}

impl Turns {
    fn new(turns: usize) -> Self {
        Self {
            state: Mutex::new(TurnState {
                free: turns,
                ..TurnState::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TurnState> {
        // Held for a few queue operations, never across guest code; the
        // state stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `entry` is ready to run: it takes a free turn, or joins the back of
    /// its function's queue. Waking an entry that already waits, holds a
    /// turn or is gone changes nothing, except that a running entry queues
    /// again for its next poll.
    fn ready(&self, entry: &Arc<Entry>) {
        let granted = {
            let mut state = self.lock();
            match entry.state.load(Ordering::Relaxed) {
                IDLE | RUNNING if state.free > 0 => {
                    state.free -= 1;
                    entry.state.store(GRANTED, Ordering::Relaxed);
                    true
                }
                IDLE | RUNNING => {
                    state.push(entry.clone());
                    entry.state.store(QUEUED, Ordering::Relaxed);
                    false
                }
                _ => false,
            }
        };
        if granted {
            entry.task_waker.wake();
        }
    }

    /// Whether `entry` holds a turn it may poll with now.
    fn start_turn(&self, entry: &Entry) -> bool {
        let _state = self.lock();
        let granted = entry.state.load(Ordering::Relaxed) == GRANTED;
        if granted {
            entry.state.store(RUNNING, Ordering::Relaxed);
        }
        granted
    }

    /// Hands a turn to the next waiter, round-robin over functions, or
    /// frees it if nobody waits. An entry still `RUNNING` after its poll
    /// was not woken during it and goes idle.
    fn give_back(&self) {
        let next = {
            let mut state = self.lock();
            loop {
                match state.next_waiter() {
                    Some(entry) if entry.state.load(Ordering::Relaxed) != QUEUED => continue,
                    Some(entry) => {
                        entry.state.store(GRANTED, Ordering::Relaxed);
                        break Some(entry);
                    }
                    None => {
                        state.free += 1;
                        break None;
                    }
                }
            }
        };
        if let Some(entry) = next {
            entry.task_waker.wake();
        }
    }

    /// Marks the end of `entry`'s poll: unless it queued again meanwhile,
    /// it is idle until woken.
    fn end_poll(&self, entry: &Entry) {
        let _state = self.lock();
        if entry.state.load(Ordering::Relaxed) == RUNNING {
            entry.state.store(IDLE, Ordering::Relaxed);
        }
    }

    /// A pool invocation was dropped (it ended, timed out, or the node is
    /// stopping): it leaves the queue, and a turn granted to it passes on.
    fn cancel(&self, entry: &Entry) {
        let granted = {
            let _state = self.lock();
            let previous = entry.state.swap(GONE, Ordering::Relaxed);
            previous == GRANTED
        };
        if granted {
            self.give_back();
        }
    }
}

impl TurnState {
    fn push(&mut self, entry: Arc<Entry>) {
        let queue = self.waiting.entry(entry.function.clone()).or_default();
        if queue.is_empty() {
            self.ring.push_back(entry.function.clone());
        }
        queue.push_back(entry);
    }

    fn next_waiter(&mut self) -> Option<Arc<Entry>> {
        let function = self.ring.pop_front()?;
        let queue = self.waiting.get_mut(&function)?;
        let entry = queue.pop_front();
        if queue.is_empty() {
            self.waiting.remove(&function);
        } else {
            self.ring.push_back(function);
        }
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn waiting_for_inferences_does_not_spend_the_first_slice() {
        let tick = EPOCH_TICK;
        // No inference: the deadline is the slice.
        assert!(FirstSlice::new().spent());
        // Two ticks since it began, all of them waiting for an inference.
        let waited = FirstSlice {
            started: Instant::now() - 2 * tick,
            awaited_inference: 2 * tick,
        };
        assert!(!waited.spent());
        // An inference, then a tick of its own work.
        let busy = FirstSlice {
            started: Instant::now() - 3 * tick,
            awaited_inference: tick,
        };
        assert!(busy.spent());
    }

    /// Yields once, waking itself at once, as a guest does at an epoch tick.
    struct YieldNow(bool);

    impl Future for YieldNow {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// A task that needs `polls` polls and counts them in `done`.
    fn busy(polls: usize, done: Arc<AtomicUsize>) -> GuestTask {
        Box::pin(async move {
            for _ in 0..polls {
                YieldNow(false).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    }

    fn entry(function: &str, turns: &Arc<Turns>) -> Arc<Entry> {
        Arc::new(Entry {
            function: function.into(),
            turns: turns.clone(),
            task_waker: AtomicWaker::new(),
            state: AtomicU8::new(IDLE),
        })
    }

    fn state(entry: &Entry) -> u8 {
        entry.state.load(Ordering::Relaxed)
    }

    #[test]
    fn turns_go_round_robin_over_functions_not_invocations() {
        let turns = Arc::new(Turns::new(1));
        let holder = entry("a", &turns);
        turns.ready(&holder);
        assert_eq!(state(&holder), GRANTED, "a free turn");
        assert!(turns.start_turn(&holder));
        let a: Vec<_> = (0..5).map(|_| entry("a", &turns)).collect();
        a.iter().for_each(|e| turns.ready(e));
        let b = entry("b", &turns);
        turns.ready(&b);
        assert!(a.iter().chain([&b]).all(|e| state(e) == QUEUED));
        // The holder gives back: the first of `a`'s waiters, then `b`, then
        // the rest of `a`, although five of `a` queued before `b`.
        turns.end_poll(&holder);
        turns.give_back();
        assert_eq!(state(&a[0]), GRANTED);
        assert_eq!(state(&b), QUEUED);
        turns.give_back();
        assert_eq!(state(&b), GRANTED);
        assert_eq!(state(&a[1]), QUEUED);
        // A cancelled waiter is skipped; a granted-then-cancelled turn passes on.
        turns.cancel(&a[1]);
        turns.give_back();
        assert_eq!(state(&a[2]), GRANTED);
        turns.cancel(&a[2]);
        assert_eq!(state(&a[3]), GRANTED);
        // Waking an entry that waits or holds a turn changes nothing.
        turns.ready(&a[3]);
        turns.ready(&a[4]);
        assert_eq!((state(&a[3]), state(&a[4])), (GRANTED, QUEUED));
        turns.give_back();
        assert_eq!(state(&a[4]), GRANTED);
        turns.give_back();
        assert_eq!(turns.lock().free, 1, "every turn is free again");
        assert!(turns.lock().waiting.is_empty() && turns.lock().ring.is_empty());
    }

    #[test]
    fn a_function_with_one_invocation_keeps_pace_with_one_with_many() {
        let pool = GuestPool::new(1).unwrap();
        let main = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let labels = RequestLabels::for_test;
        let (many, one) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let many_at_end = Arc::new(AtomicUsize::new(0));
        let waiting = |function: &str| {
            let state = pool.turns.lock();
            state.waiting.get(function).map_or(0, VecDeque::len)
        };
        main.block_on(async {
            let poll_until = async |what: &str, done: &dyn Fn() -> bool| {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while !done() {
                    assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            // A gate holds the pool's only turn (and thread) until every
            // task below waits in its queue, so the order in which they
            // reach the pool (which depends on thread timing) cannot matter.
            let (open_gate, gate) = std::sync::mpsc::channel::<()>();
            let gate_held = Arc::new(AtomicBool::new(false));
            let held = gate_held.clone();
            pool.spawn(
                Box::pin(async move {
                    // The first poll runs in the foreground; block on the pool.
                    YieldNow(false).await;
                    held.store(true, Ordering::Release);
                    let _ = gate.recv();
                }),
                labels("gate"),
                Arc::new(AtomicBool::new(true)),
            );
            poll_until("the gate holds the turn", &|| {
                gate_held.load(Ordering::Acquire)
            })
            .await;
            // Every task counts as CPU-bound from its first poll.
            for _ in 0..20 {
                pool.spawn(
                    busy(1000, many.clone()),
                    labels("many"),
                    Arc::new(AtomicBool::new(true)),
                );
            }
            let (one_done, many_then) = (one.clone(), many_at_end.clone());
            let mut one_task = busy(500, one_done);
            let many_now = many.clone();
            pool.spawn(
                Box::pin(async move {
                    one_task.as_mut().await;
                    many_then.store(many_now.load(Ordering::Relaxed), Ordering::Relaxed);
                }),
                labels("one"),
                Arc::new(AtomicBool::new(true)),
            );
            poll_until("every task waits for a turn", &|| {
                waiting("many") == 20 && waiting("one") == 1
            })
            .await;
            let _ = open_gate.send(());
            poll_until("one finishes", &|| one.load(Ordering::Relaxed) >= 500).await;
        });
        // With one turn shared round-robin, "one" finished its 500 polls
        // while the 20 "many" tasks together got about as many, not 20x.
        assert_eq!(one.load(Ordering::Relaxed), 500);
        let many = many_at_end.load(Ordering::Relaxed);
        assert!(many <= 600, "the busy function got {many} polls to 500");
    }
}
