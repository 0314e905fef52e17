//! Measuring one invocation: its linear memory (limit and peak) and the time
//! its task spends running on a worker thread (its CPU time).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use wasmtime::ResourceLimiter;

/// Enforces the function's memory limit over all of an instance's linear
/// memories together with the host memory held on its behalf, and remembers
/// the peak and whether a growth was refused.
///
/// wasmtime's `StoreLimits` caps each memory on its own and keeps no peak; a
/// function's memory limit is what all its memories may use together, and
/// billing needs the peak, so this limiter is written here.
///
/// Host memory counts too: bytes the host keeps for the guest (wasi:http
/// `fields`) are charged with [`charge_host`](Self::charge_host), and
/// buffers the host builds for one call (a wasi:keyvalue `get-many` result)
/// are checked with [`fits_transient`](Self::fits_transient). Otherwise a
/// guest with a 16 MiB limit could make the node hold gigabytes.
#[derive(Debug)]
pub(crate) struct MemoryMeter {
    limit: usize,
    /// Linear memory, all memories together.
    current: usize,
    /// Host memory held for the guest (an upper bound between
    /// reconciliations, see [`set_host`](Self::set_host)).
    host: usize,
    peak: usize,
    refused: bool,
}

impl MemoryMeter {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            current: 0,
            host: 0,
            peak: 0,
            refused: false,
        }
    }

    /// Starts measuring a new invocation on a kept instance: its peak starts
    /// at what the instance already holds.
    pub(crate) fn start_invocation(&mut self, limit: usize) {
        self.limit = limit;
        self.peak = self.current.saturating_add(self.host);
        self.refused = false;
    }

    /// The function's memory limit, in bytes.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Linear and host memory together, in bytes.
    fn total(&self) -> usize {
        self.current.saturating_add(self.host)
    }

    /// Charges `bytes` of host memory kept for the guest; false (and nothing
    /// charged) if that would break the limit. The caller decides whether
    /// that ends the guest ([`refuse`](Self::refuse)).
    pub(crate) fn charge_host(&mut self, bytes: usize) -> bool {
        let total = self.total().saturating_add(bytes);
        if total > self.limit {
            return false;
        }
        self.host += bytes;
        self.peak = self.peak.max(total);
        true
    }

    /// Sets the host memory held for the guest to what was counted: charges
    /// only add up, so the host recounts what is really held when the sum
    /// reaches the limit (the guest may have dropped some of it).
    pub(crate) fn set_host(&mut self, bytes: usize) {
        self.host = bytes;
        self.peak = self.peak.max(self.total());
    }

    /// Host memory charged to the guest, in bytes.
    pub(crate) fn host(&self) -> usize {
        self.host
    }

    /// Whether a host buffer of `bytes`, held only for the length of one
    /// call, fits under the limit beside what the guest holds; if it does, it
    /// counts toward the peak.
    pub(crate) fn fits_transient(&mut self, bytes: usize) -> bool {
        let total = self.total().saturating_add(bytes);
        if total > self.limit {
            return false;
        }
        self.peak = self.peak.max(total);
        true
    }

    /// Whether growing a linear memory from `current` to `desired` bytes
    /// stays within the limit.
    pub(crate) fn growth_fits(&self, current: usize, desired: usize) -> bool {
        self.current
            .saturating_sub(current)
            .saturating_add(desired)
            .saturating_add(self.host)
            <= self.limit
    }

    /// Records that the guest was refused memory: its invocation ends `oom`.
    pub(crate) fn refuse(&mut self) {
        self.refused = true;
    }

    /// Linear memory the instance holds now, in bytes (host memory not
    /// included: this is what a kept instance keeps mapped).
    pub(crate) fn current(&self) -> usize {
        self.current
    }

    /// Most memory the invocation held at once, linear and host together, in
    /// bytes.
    pub(crate) fn peak(&self) -> usize {
        self.peak
    }

    /// Whether the guest asked for more memory than its limit allows.
    pub(crate) fn refused(&self) -> bool {
        self.refused
    }
}

impl ResourceLimiter for MemoryMeter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Called for each memory's initial size too (current = 0), so the
        // running total covers everything the instance maps.
        let linear = self.current.saturating_sub(current).saturating_add(desired);
        let total = linear.saturating_add(self.host);
        if total > self.limit || maximum.is_some_and(|max| desired > max) {
            // Growth fails inside the guest (memory.grow returns -1): the
            // guest's allocator sees out-of-memory, as on a real machine.
            self.refused = true;
            return Ok(false);
        }
        self.current = linear;
        self.peak = self.peak.max(total);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.refused = true;
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(maximum.is_none_or(|max| desired <= max))
    }
}

pin_project_lite::pin_project! {
    /// Runs a future and adds up the time spent inside its `poll`.
    ///
    /// A guest runs only while its task is polled (wasmtime fibers resume
    /// inside `poll`, and every poll is bounded by the 5 ms epoch yield), so
    /// this is the time a worker thread spent running the guest and the host
    /// calls it made, on whichever thread ran each slice. It is measured with
    /// the monotonic clock (vDSO, ~20 ns) rather than the thread CPU clock:
    /// `CLOCK_THREAD_CPUTIME_ID` is a real syscall that took a scheduler lock
    /// and cost the hello load run 3-4% of its throughput on this kind of VM.
    /// The difference is time the OS took the thread away mid-poll, which
    /// this counts and a CPU clock would not.
    pub(crate) struct CpuMetered<F> {
        #[pin]
        inner: F,
        cpu: Duration,
    }
}

impl<F> CpuMetered<F> {
    pub(crate) fn new(inner: F) -> Self {
        Self {
            inner,
            cpu: Duration::ZERO,
        }
    }

    /// CPU time spent polling the inner future so far.
    pub(crate) fn cpu(&self) -> Duration {
        self.cpu
    }
}

impl<F: Future> Future for CpuMetered<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let start = Instant::now();
        let polled = this.inner.poll(cx);
        *this.cpu += start.elapsed();
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn the_limit_covers_all_memories_together() {
        let mut meter = MemoryMeter::new(4 * MIB);
        assert!(meter.memory_growing(0, 2 * MIB, None).unwrap());
        assert!(meter.memory_growing(0, MIB, None).unwrap());
        // The first memory grows from 2 to 3 MiB: 4 MiB in all, allowed.
        assert!(meter.memory_growing(2 * MIB, 3 * MIB, None).unwrap());
        assert_eq!(meter.peak(), 4 * MIB);
        assert!(!meter.refused());
        // One more page of either memory is over the limit.
        assert!(!meter.memory_growing(MIB, MIB + 65536, None).unwrap());
        assert!(meter.refused());
        assert_eq!(meter.peak(), 4 * MIB);
    }

    #[test]
    fn host_memory_counts_against_the_limit_and_the_peak() {
        let mut meter = MemoryMeter::new(4 * MIB);
        assert!(meter.memory_growing(0, 2 * MIB, None).unwrap());
        assert!(meter.charge_host(MIB));
        assert_eq!(meter.peak(), 3 * MIB);
        // Linear growth now meets the host bytes at the limit.
        assert!(
            !meter
                .memory_growing(2 * MIB, 3 * MIB + 65536, None)
                .unwrap()
        );
        assert!(meter.refused());
        assert!(!meter.charge_host(MIB + 1));
        assert!(!meter.fits_transient(MIB + 1));
        assert!(meter.fits_transient(MIB));
        assert_eq!(meter.peak(), 4 * MIB);
        // A recount that finds the host bytes dropped frees the room.
        meter.set_host(0);
        assert!(meter.charge_host(2 * MIB));
        assert_eq!(meter.host(), 2 * MIB);
        meter.start_invocation(8 * MIB);
        assert_eq!(meter.peak(), 4 * MIB);
        assert!(!meter.refused());
    }

    #[test]
    fn a_declared_maximum_is_respected() {
        let mut meter = MemoryMeter::new(64 * MIB);
        assert!(!meter.memory_growing(0, 2 * MIB, Some(MIB)).unwrap());
    }

    #[test]
    fn cpu_time_of_a_busy_future_is_counted() {
        let busy = async {
            let mut x = 0u64;
            for i in 0..5_000_000u64 {
                x = std::hint::black_box(x.wrapping_add(i));
            }
            x
        };
        let mut metered = Box::pin(CpuMetered::new(busy));
        block_on(metered.as_mut());
        assert!(metered.cpu() > Duration::ZERO);
    }

    #[test]
    fn time_spent_waiting_is_not_counted() {
        let waiting = async { tokio::time::sleep(Duration::from_millis(100)).await };
        let mut metered = Box::pin(CpuMetered::new(waiting));
        block_on(metered.as_mut());
        assert!(
            metered.cpu() < Duration::from_millis(50),
            "{:?}",
            metered.cpu()
        );
    }

    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(future)
    }
}
