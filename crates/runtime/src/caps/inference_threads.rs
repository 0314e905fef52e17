//! The threads that run inferences: at most one per permit, the most
//! recently idle one taking the next job.
//!
//! They run at the guest pool's lower priority, for two reasons. An
//! inference is CPU-bound work a guest asked for, like a guest on the pool,
//! and at the node's normal priority it held the cores against other
//! functions' requests: during `bench/nn.sh`'s burst of 1,000
//! classifications a neighbour's hello answered at p50 0.38-0.43 ms and
//! p99 8.4-9.8 ms, against 0.12-0.18 ms and 5.1-5.2 ms at this priority
//! (two runs each), with the burst no slower. And Linux threads inherit
//! the priority of the thread that starts them: a thread started from a
//! guest on the pool kept the pool's priority for life, one started from
//! the main runtime the normal one, depending on which guest came first.
//!
//! tokio's blocking pool handed consecutive inferences to whichever of its
//! threads woke first, so a classifier at concurrency 1 ran on a different
//! thread (and often core) each time: its allocator's thread cache and the
//! core's caches were cold for the 6 MB of weights and the scratch buffers.
//! Here a job goes to the thread that finished last (a LIFO stack of idle
//! threads), as a native loop would run it. The classifier of
//! `bench/nn.sh` at concurrency 1 (on its symbolic-shape plan, before
//! plans per shape), median time inside tract per request:
//! 29.6 ms on the blocking pool against 25.3 ms native in the same run;
//! 24.7 ms here against 23.5 ms native. Written here
//! rather than taken from a crate: the pools at hand (rayon, tokio's
//! blocking pool, threadpool) do not choose the most recently idle thread.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One job for a thread, with the permit it runs under. Running it returns
/// the delivery of its result, which the thread makes once it is back
/// among the idle ones, so that the caller's next job finds it there.
type Job = (Work, OwnedSemaphorePermit);
type Work = Box<dyn FnOnce() -> Box<dyn FnOnce() + Send> + Send>;

/// A bounded set of inference threads, started on demand.
pub(crate) struct InferenceThreads {
    permits: Arc<Semaphore>,
    shared: Arc<Mutex<Idle>>,
}

/// The idle threads, the most recently idle last.
#[derive(Default)]
struct Idle {
    threads: Vec<SyncSender<Option<Job>>>,
    /// Set when the pool is dropped: a thread that finishes then ends.
    closed: bool,
}

impl InferenceThreads {
    /// A pool of at most `threads` threads (at least one), so at most that
    /// many jobs run at once; the others wait for a permit.
    pub(crate) fn new(threads: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(threads.max(1))),
            shared: Arc::default(),
        }
    }

    /// Runs `work` on an inference thread once a permit is free; returns its
    /// result and the time it ran. The permit goes with the work, so an
    /// invocation that times out while it runs still holds its share until
    /// the work ends.
    pub(crate) async fn run<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
    ) -> Result<(R, Duration), String> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| "the node is shutting down".to_string())?;
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Work = Box::new(move || {
            let start = Instant::now();
            let output = work();
            let ran = start.elapsed();
            Box::new(move || {
                let _ = done.send((output, ran));
            })
        });
        // With a permit held, a thread is idle unless every one started so
        // far is busy, and then fewer than the permits have started.
        let idle = lock(&self.shared).threads.pop();
        let thread = match idle {
            Some(thread) => thread,
            None => self.start_thread()?,
        };
        thread
            .send(Some((job, permit)))
            .map_err(|_| "the inference thread is gone".to_string())?;
        result
            .await
            .map_err(|_| "the inference thread failed (it panicked)".to_string())
    }

    fn start_thread(&self) -> Result<SyncSender<Option<Job>>, String> {
        let (sender, jobs) = sync_channel(1);
        let own = sender.clone();
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name("mayfly-nn".into())
            .spawn(move || {
                crate::fair::lower_thread_priority();
                serve(&jobs, &own, &shared)
            })
            .map_err(|e| format!("cannot start an inference thread: {e}"))?;
        Ok(sender)
    }
}

/// A thread's life: run jobs until the pool is dropped. A panicking job
/// ends the thread (its permit is released as it unwinds); the next job
/// that finds no idle thread starts another.
fn serve(jobs: &Receiver<Option<Job>>, own: &SyncSender<Option<Job>>, shared: &Mutex<Idle>) {
    while let Ok(Some((job, permit))) = jobs.recv() {
        let deliver = job();
        let closed = {
            let mut idle = lock(shared);
            if !idle.closed {
                idle.threads.push(own.clone());
            }
            idle.closed
        };
        // Back on the stack before the caller hears of the result or the
        // permit is free, so whoever runs the next job finds this thread.
        deliver();
        drop(permit);
        if closed {
            return;
        }
    }
}

fn lock(shared: &Mutex<Idle>) -> MutexGuard<'_, Idle> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for InferenceThreads {
    fn drop(&mut self) {
        let mut idle = lock(&self.shared);
        idle.closed = true;
        for thread in idle.threads.drain(..) {
            let _ = thread.send(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn consecutive_jobs_run_on_the_same_thread() {
        let threads = InferenceThreads::new(2);
        let name = || std::thread::current().id();
        let (first, _) = threads.run(name).await.unwrap();
        for _ in 0..20 {
            let (next, _) = threads.run(name).await.unwrap();
            assert_eq!(next, first);
        }
        assert_ne!(first, std::thread::current().id());
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn inferences_run_at_the_guest_pools_lower_priority() {
        fn nice() -> i32 {
            // SAFETY: reads the calling thread's nice value; no memory shared.
            #[expect(unsafe_code, reason = "no safe wrapper reads a thread's nice value")]
            unsafe {
                libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t)
            }
        }
        let threads = InferenceThreads::new(1);
        let (inside, _) = threads.run(nice).await.unwrap();
        assert!(
            inside >= crate::fair::POOL_NICENESS,
            "an inference ran at nice {inside}, the caller at {}",
            nice()
        );
    }

    #[tokio::test]
    async fn jobs_beyond_the_permits_wait_and_a_panicking_job_is_an_error() {
        let threads = Arc::new(InferenceThreads::new(2));
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let jobs: Vec<_> = (0..8)
            .map(|_| {
                let (threads, running, most) = (threads.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    threads
                        .run(move || {
                            use std::sync::atomic::Ordering::SeqCst;
                            let now = running.fetch_add(1, SeqCst) + 1;
                            most.fetch_max(now, SeqCst);
                            std::thread::sleep(Duration::from_millis(20));
                            running.fetch_sub(1, SeqCst);
                        })
                        .await
                })
            })
            .collect();
        for job in jobs {
            job.await.unwrap().unwrap();
        }
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 2);
        let panicked = threads.run(|| panic!("a backend bug")).await;
        assert!(panicked.unwrap_err().contains("panicked"));
        // The permit came back and another thread serves the next job.
        assert_eq!(threads.run(|| 7).await.unwrap().0, 7);
    }
}
