//! The hybrid-histogram keep-alive policy of Shahrad et al., "Serverless in
//! the Wild: Characterizing and Optimizing the Serverless Workload at a
//! Large Cloud Provider" (USENIX ATC 2020), section 4.
//!
//! Per function it keeps a histogram of idle times: the time from the end of
//! one invocation to the start of the next. After every invocation it picks
//! one of three ways to set the [`Windows`]:
//!
//! 1. **Forecast.** Most idle times fell beyond the histogram's range (the
//!    function runs every few hours or less often): predict the next idle
//!    time from the recent long ones and be loaded only around it, as long
//!    as the prediction works (the last long idle time fell inside the band
//!    predicted for it).
//! 2. **Histogram.** Enough idle times landed in the histogram and they
//!    cluster (high coefficient of variation of the bin counts): stay
//!    unloaded until just before the 5th percentile and loaded until just
//!    after the 99th. A function idle for 5 minutes between calls is
//!    unloaded for 4.5 minutes after each call, then loaded up to 6.6
//!    minutes.
//! 3. **Fallback.** Otherwise there is no pattern to use (too few idle times,
//!    or spread flat over the range): behave like a fixed keep-alive.
//!
//! The paper uses ARIMA for the forecast; this crate uses an exponentially
//! weighted mean, which needs one number of state and is good enough for the
//! timer-like functions it can help. Long idle times without a period (a
//! function called a few times a day at random) cannot be forecast by any
//! method; a band around a guess would keep them loaded for an hour or more
//! per call for nothing, hence the check that the last prediction hit.

use std::time::Duration;

use crate::policy::{FunctionKeepAlive, KeepAlivePolicy, Windows, humanize};

/// The hybrid-histogram policy: node-wide configuration, from which every
/// function gets its own histogram (see the module documentation).
///
/// The defaults follow the paper where it gives a value; the rest were
/// chosen with the simulator (`mayfly simulate`) on the Azure sample and on
/// synthetic Azure-like traces for several seeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HybridHistogram {
    /// Width of one histogram bin. Default 1 minute, as in the paper: fine
    /// enough for the windows to hug a periodic function, coarse enough that
    /// timer jitter of a few seconds spreads over one or two bins.
    pub bin_width: Duration,
    /// Idle times from zero up to this are counted in the histogram; longer
    /// ones are out of bounds. Default 4 hours, as in the paper: covers
    /// nearly all idle times of the functions invoked often enough for
    /// keep-alive to matter, in 240 bins (under 1 KiB per function).
    pub range: Duration,
    /// Percentile of the idle times (0–100) before which the function is
    /// unloaded. Default 5, as in the paper.
    pub head_percentile: f64,
    /// Percentile of the idle times (0–100) after which the function is
    /// unloaded again. Default 99, as in the paper.
    pub tail_percentile: f64,
    /// Safety margin, as a fraction: pre-warm at the head bin's lower edge
    /// less this share, stay loaded to the tail bin's upper edge plus this
    /// share. Default 0.10, as in the paper.
    pub margin: f64,
    /// Fewest in-range idle times before the histogram is trusted. Default
    /// 10: with fewer, the 5th and 99th percentiles are just the smallest and
    /// largest sample, and one odd idle time would set the windows.
    pub min_samples: u32,
    /// Least coefficient of variation (CV) of the bin counts for the
    /// histogram to count as a pattern (see `coefficient_of_variation`).
    /// Default 3. Idle times spread evenly over `k` of the 240 bins have a
    /// CV of `sqrt(240 / k − 1)`, so 3 means they are concentrated in about
    /// 24 one-minute bins or fewer. A Poisson function (exponential idle
    /// times, mean `m` minutes) has CV² ≈ 120 / m − 1, so it counts as a
    /// pattern only with a mean idle time under 12 minutes: past that its
    /// 99th percentile keeps it loaded for an hour or more after every call,
    /// several times what the fixed 10 minutes cost, and the fallback is the
    /// better trade. In the simulator (a synthetic Azure-like day of 10,000
    /// functions, seeds 1–3, against the fixed 10 minutes) 2 cut cold
    /// starts by 45–46% with 2.8–3.6% less memory; 2.5 by 40–42% with
    /// 5.4–6.0% less; 3 by 35–37% with 7.4–7.9% less; 4 by only 26–28%. In
    /// an earlier, burstier synthetic mix (no steady functions, 30% Poisson,
    /// 40% bursty) 2 wasted 1.3–1.9% more memory than the baseline and 2.5
    /// saved only 1.2–1.5%: 3 keeps its margin whatever the mix.
    pub cv_threshold: f64,
    /// Keep-alive when there is no pattern (pre-warm 0). Default 10
    /// minutes, the fixed baseline's value. The paper falls back to the
    /// histogram's range (4 hours): in the simulator (synthetic Azure-like
    /// day, seeds 1–3) that cuts the cold starts by 72–73% instead of
    /// 35–37% but wastes 1.49–1.50 times the baseline's memory, since every
    /// rarely-called function stays loaded for hours after each call,
    /// mostly for nothing. With 10 minutes the policy behaves as the
    /// baseline on a function without a pattern, and the memory saved on
    /// functions with one pays for their warm starts.
    pub fallback_keep_alive: Duration,
    /// The share of idle times that must be out of bounds (above `range`)
    /// for the forecast to be used instead of the histogram. Default 0.5:
    /// most idle times are long, so the histogram has little to go on.
    pub oob_share: f64,
    /// Fewest out-of-bounds idle times before forecasting. Default 2, the
    /// least that can show a hit: one long idle time could be a pause
    /// rather than a period.
    pub min_oob_samples: u32,
    /// Weight of the newest out-of-bounds idle time in the forecast (an
    /// exponentially weighted mean). Default 0.5: follows a changed period
    /// within two or three invocations while smoothing jitter.
    pub forecast_weight: f64,
    /// Margin around the forecast, as a fraction: pre-warm at the forecast
    /// less this share, stay loaded to the forecast plus this share; an
    /// idle time inside that band counts as a hit. Default 0.10, as for the
    /// histogram: ±36 minutes around a 6-hour period, ample for a timer and
    /// room for a job that drifts. In a simulated week (3,000 functions)
    /// 0.15 cost 0.6% more memory than 0.10 for 42 fewer cold starts out of
    /// 145,000; 0.05 saved 0.5% more, but only because the synthetic
    /// timers are punctual. (The forecast as a whole saved 2,200 cold
    /// starts there for 0.8% more memory.)
    pub forecast_margin: f64,
}

impl Default for HybridHistogram {
    fn default() -> Self {
        Self {
            bin_width: Duration::from_secs(60),
            range: Duration::from_secs(4 * 3600),
            head_percentile: 5.0,
            tail_percentile: 99.0,
            margin: 0.10,
            min_samples: 10,
            cv_threshold: 3.0,
            fallback_keep_alive: Duration::from_secs(600),
            oob_share: 0.5,
            min_oob_samples: 2,
            forecast_weight: 0.5,
            forecast_margin: 0.10,
        }
    }
}

impl HybridHistogram {
    /// The default policy scaled to bins of `bin_width` instead of a
    /// minute: the range stays 240 bins and the fallback keep-alive 10 bins.
    /// For functions that cycle in seconds, and for end-to-end tests of
    /// pre-warming that cannot wait for minutes.
    pub fn with_bin_width(bin_width: Duration) -> Self {
        let default = Self::default();
        let bins = u32::try_from(default.bins()).unwrap_or(u32::MAX);
        Self {
            bin_width,
            range: bin_width.saturating_mul(bins),
            fallback_keep_alive: bin_width.saturating_mul(10),
            ..default
        }
    }

    /// Number of bins: the range in whole bins, at least one.
    fn bins(&self) -> usize {
        let width = self.bin_width.as_nanos().max(1);
        usize::try_from(self.range.as_nanos().div_ceil(width))
            .unwrap_or(usize::MAX)
            .max(1)
    }

    /// The fallback windows: loaded from the end of the invocation.
    fn fallback(&self) -> Windows {
        Windows {
            prewarm: Duration::ZERO,
            keep_alive: self.fallback_keep_alive,
        }
    }
}

impl KeepAlivePolicy for HybridHistogram {
    fn name(&self) -> String {
        let default = Self::default();
        if self.bin_width != default.bin_width {
            format!("hybrid-{}", humanize(self.bin_width))
        } else if self.fallback_keep_alive == default.fallback_keep_alive {
            "hybrid".to_owned()
        } else {
            format!("hybrid-fallback-{}", humanize(self.fallback_keep_alive))
        }
    }

    fn resolution(&self) -> Duration {
        self.bin_width
    }

    fn new_function(&self) -> Box<dyn FunctionKeepAlive> {
        Box::new(HybridFunction {
            config: *self,
            counts: vec![0; self.bins()].into_boxed_slice(),
            in_range: 0,
            sum_of_squares: 0,
            out_of_range: 0,
            forecast: None,
            forecast_hit: false,
            windows: self.fallback(),
        })
    }
}

/// One function's idle-time histogram and the windows it last implied.
///
/// The only allocation is the bins, once per function; `record_idle`
/// recomputes the windows with one scan of them and `windows` returns the
/// cached result.
#[derive(Debug)]
struct HybridFunction {
    config: HybridHistogram,
    /// Idle times per bin: `counts[i]` holds those in
    /// `[i * bin_width, (i + 1) * bin_width)`.
    counts: Box<[u32]>,
    /// Sum of `counts`.
    in_range: u32,
    /// Sum of the squared counts, kept up to date so that the coefficient
    /// of variation costs no scan.
    sum_of_squares: u64,
    /// Idle times at or beyond the range.
    out_of_range: u32,
    /// Exponentially weighted mean of the out-of-range idle times.
    forecast: Option<Duration>,
    /// Whether the last out-of-range idle time fell inside the band of the
    /// forecast made before it.
    forecast_hit: bool,
    windows: Windows,
}

impl FunctionKeepAlive for HybridFunction {
    fn record_idle(&mut self, idle: Duration) {
        let bin = idle.as_nanos() / self.config.bin_width.as_nanos().max(1);
        match usize::try_from(bin)
            .ok()
            .filter(|&bin| bin < self.counts.len())
        {
            Some(bin) => {
                let count = &mut self.counts[bin];
                // (c + 1)² − c² = 2c + 1
                self.sum_of_squares += 2 * u64::from(*count) + 1;
                *count = count.saturating_add(1);
                self.in_range = self.in_range.saturating_add(1);
            }
            None => {
                self.out_of_range = self.out_of_range.saturating_add(1);
                let weight = self.config.forecast_weight.clamp(0.0, 1.0);
                self.forecast_hit = self
                    .forecast
                    .is_some_and(|forecast| self.forecast_band(forecast).is_warm_after(idle));
                self.forecast = Some(match self.forecast {
                    None => idle,
                    Some(previous) => idle.mul_f64(weight) + previous.mul_f64(1.0 - weight),
                });
            }
        }
        self.windows = self.compute_windows();
    }

    fn windows(&self) -> Windows {
        self.windows
    }
}

impl HybridFunction {
    fn compute_windows(&self) -> Windows {
        let config = &self.config;
        let total = u64::from(self.in_range) + u64::from(self.out_of_range);
        let mostly_out_of_range = self.out_of_range >= config.min_oob_samples
            && f64::from(self.out_of_range) > config.oob_share * total as f64;
        if mostly_out_of_range
            && self.forecast_hit
            && let Some(forecast) = self.forecast
        {
            return self.forecast_band(forecast);
        }
        if self.in_range >= config.min_samples.max(1)
            && self.coefficient_of_variation() >= config.cv_threshold
        {
            let head = self.percentile_bin(config.head_percentile);
            let tail = self.percentile_bin(config.tail_percentile);
            let margin = config.margin.clamp(0.0, 1.0);
            let prewarm = scaled(config.bin_width * head, 1.0 - margin);
            let end = scaled(config.bin_width * (tail + 1), 1.0 + margin);
            return Windows {
                prewarm,
                keep_alive: end.saturating_sub(prewarm),
            };
        }
        config.fallback()
    }

    /// Loaded from `forecast` less the forecast margin to `forecast` plus it.
    fn forecast_band(&self, forecast: Duration) -> Windows {
        let margin = self.config.forecast_margin.clamp(0.0, 1.0);
        let prewarm = scaled(forecast, 1.0 - margin);
        let end = scaled(forecast, 1.0 + margin);
        Windows {
            prewarm,
            keep_alive: end.saturating_sub(prewarm),
        }
    }

    /// Coefficient of variation (standard deviation over mean) of the bin
    /// counts: 0 when the idle times are spread evenly over every bin,
    /// `sqrt(bins − 1)` when they all fall in one.
    ///
    /// Computed from the chance that two idle times drawn from the
    /// histogram fall in the same bin, `Σ c(c − 1) / (n(n − 1))`, rather
    /// than from the counts themselves: with few samples every idle time
    /// sits alone in its bin and the raw counts look like tall spikes (ten
    /// samples scattered at random have a raw CV near 5), whereas this
    /// estimate of the underlying distribution's CV stays near 0 for them
    /// and near the raw value for a real spike.
    fn coefficient_of_variation(&self) -> f64 {
        let n = f64::from(self.in_range);
        if n < 2.0 {
            return 0.0;
        }
        let bins = self.counts.len() as f64;
        let same_bin = (self.sum_of_squares as f64 - n) / (n * (n - 1.0));
        // For bin shares p: CV² = bins × Σp² − 1, and Σp² is the chance
        // that two idle times share a bin.
        (bins * same_bin - 1.0).max(0.0).sqrt()
    }

    /// The bin holding the `percentile`-th idle time: the first bin at
    /// which the running count reaches `ceil(percentile% × n)` (at least 1).
    fn percentile_bin(&self, percentile: f64) -> u32 {
        let n = f64::from(self.in_range);
        let rank = (percentile.clamp(0.0, 100.0) / 100.0 * n).ceil().max(1.0) as u64;
        let mut running = 0u64;
        for (bin, &count) in self.counts.iter().enumerate() {
            running += u64::from(count);
            if running >= rank {
                return u32::try_from(bin).unwrap_or(u32::MAX);
            }
        }
        u32::try_from(self.counts.len().saturating_sub(1)).unwrap_or(u32::MAX)
    }
}

/// `duration × factor`, rounded to the millisecond so that the windows are
/// free of floating-point noise (`360 s × 1.1` is exactly 396 s).
fn scaled(duration: Duration, factor: f64) -> Duration {
    let millis = (duration.as_millis() as f64 * factor).round();
    // `as` saturates: negative or NaN become 0, huge values u64::MAX.
    Duration::from_millis(millis as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn function_after(idles: impl IntoIterator<Item = Duration>) -> Box<dyn FunctionKeepAlive> {
        let mut function = HybridHistogram::default().new_function();
        for idle in idles {
            function.record_idle(idle);
        }
        function
    }

    #[test]
    fn a_new_function_gets_the_fallback() {
        let windows = HybridHistogram::default().new_function().windows();
        assert_eq!(windows.prewarm, Duration::ZERO);
        assert_eq!(windows.keep_alive, 10 * MINUTE);
    }

    #[test]
    fn a_periodic_function_is_loaded_just_around_its_period() {
        let windows = function_after(std::iter::repeat_n(5 * MINUTE, 20)).windows();
        // Bin 5 is [5 min, 6 min): pre-warm 0.9 × 5 min, loaded to 1.1 × 6 min.
        assert_eq!(windows.prewarm, Duration::from_secs(270));
        assert_eq!(
            windows.prewarm + windows.keep_alive,
            Duration::from_secs(396)
        );
        assert!(windows.is_warm_after(5 * MINUTE));
        assert!(windows.is_warm_after(5 * MINUTE - Duration::from_secs(20)));
        assert!(!windows.is_warm_after(MINUTE));
        assert!(!windows.is_warm_after(7 * MINUTE));
        // Kept warm 126 s per period instead of the whole 5 minutes.
        assert_eq!(windows.loaded_within(5 * MINUTE), Duration::from_secs(30));
    }

    #[test]
    fn jitter_across_a_bin_edge_widens_the_windows() {
        // A function that runs ~1 s every 5 minutes sees idle times just
        // below 5 minutes: bin 4, occasionally bin 5.
        let idles = (0..30).map(|i| Duration::from_secs(if i % 10 == 0 { 301 } else { 299 }));
        let windows = function_after(idles).windows();
        assert_eq!(windows.prewarm, Duration::from_secs(216)); // 0.9 × 4 min
        assert_eq!(
            windows.prewarm + windows.keep_alive,
            Duration::from_secs(396) // 1.1 × 6 min
        );
        assert!(windows.is_warm_after(Duration::from_secs(299)));
    }

    #[test]
    fn few_samples_fall_back() {
        let windows = function_after(std::iter::repeat_n(5 * MINUTE, 9)).windows();
        assert_eq!(windows, HybridHistogram::default().fallback());
        let windows = function_after(std::iter::repeat_n(5 * MINUTE, 10)).windows();
        assert_eq!(windows.prewarm, Duration::from_secs(270));
    }

    #[test]
    fn a_flat_histogram_falls_back() {
        // One idle time in each of the 240 bins, twice: CV 0.
        let idles = (0..480).map(|i| MINUTE * (i % 240) + Duration::from_secs(30));
        let function = function_after(idles);
        assert_eq!(function.windows(), HybridHistogram::default().fallback());
        // Spread over 100 bins: CV = sqrt(240 / 100 − 1) ≈ 1.2, still flat.
        let function = function_after((0..300).map(|i| MINUTE * (i % 100)));
        assert_eq!(function.windows(), HybridHistogram::default().fallback());
        // Over 12 bins: CV ≈ sqrt(240 / 12 − 1) ≈ 4.4, a pattern.
        let function = function_after((0..300).map(|i| MINUTE * (i % 12)));
        assert_eq!(function.windows().prewarm, Duration::ZERO);
        assert_eq!(
            function.windows().keep_alive,
            Duration::from_secs(12 * 66) // 1.1 × 12 min
        );
        // Twenty idle times, each in a bin of its own, 7 minutes apart: the
        // raw counts look like spikes (CV 3.3), but no two idle times share
        // a minute, so there is no evidence of a pattern.
        let function = function_after((0..20).map(|i| MINUTE * (7 * i)));
        assert_eq!(function.windows(), HybridHistogram::default().fallback());
    }

    #[test]
    fn long_idle_times_are_forecast() {
        let six_hours = Duration::from_secs(6 * 3600);
        // One out-of-range idle time is not enough.
        let function = function_after([six_hours]);
        assert_eq!(function.windows(), HybridHistogram::default().fallback());
        let windows = function_after([six_hours, six_hours]).windows();
        assert_eq!(windows.prewarm, Duration::from_secs(19_440)); // 0.9 × 6 h
        assert_eq!(
            windows.prewarm + windows.keep_alive,
            Duration::from_secs(23_760) // 1.1 × 6 h
        );
        assert!(windows.is_warm_after(six_hours));
        assert!(!windows.is_warm_after(Duration::from_secs(3600)));
        // 8 h is outside the band predicted for 6 h: no forecast until one
        // hits again.
        let eight_hours = Duration::from_secs(8 * 3600);
        let seven_hours = Duration::from_secs(7 * 3600);
        let mut function = function_after([six_hours, six_hours, eight_hours]);
        assert_eq!(function.windows(), HybridHistogram::default().fallback());
        // The forecast followed: 0.5 × 8 h + 0.5 × 6 h = 7 h, and 7 h hits.
        function.record_idle(seven_hours);
        assert_eq!(function.windows().prewarm, Duration::from_secs(22_680)); // 0.9 × 7 h
        // Mostly short idle times: the histogram wins.
        let mut idles = vec![5 * MINUTE; 10];
        idles.extend([six_hours; 3]);
        let windows = function_after(idles).windows();
        assert_eq!(windows.prewarm, Duration::from_secs(270));
    }

    #[test]
    fn the_name_says_a_non_default_fallback() {
        assert_eq!(HybridHistogram::default().name(), "hybrid");
        let four_hours = HybridHistogram {
            fallback_keep_alive: Duration::from_secs(4 * 3600),
            ..HybridHistogram::default()
        };
        assert_eq!(four_hours.name(), "hybrid-fallback-4h");
    }
}
