//! Summaries of repeated measurements and their formatting for the report.

use std::time::Duration;

/// The values one figure took over the runs of a scenario.
#[derive(Debug, Clone, Default)]
pub struct Runs(Vec<f64>);

impl Runs {
    /// Adds one run's value.
    pub fn push(&mut self, value: f64) {
        self.0.push(value);
    }

    /// How many runs there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut sorted = self.0.clone();
        sorted.sort_by(f64::total_cmp);
        sorted
    }

    /// The median run (the mean of the two middle ones for an even count).
    pub fn median(&self) -> Option<f64> {
        let sorted = self.sorted();
        let n = sorted.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(sorted[n / 2]),
            _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
        }
    }

    /// The smallest and the largest run.
    pub fn range(&self) -> Option<(f64, f64)> {
        let sorted = self.sorted();
        Some((*sorted.first()?, *sorted.last()?))
    }

    /// "median (min–max)" with each value formatted by `unit`; a single
    /// run shows just its value.
    pub fn show(&self, unit: fn(f64) -> String) -> String {
        match (self.median(), self.range()) {
            (Some(median), Some((min, max))) if self.len() > 1 => {
                format!("{} ({}–{})", unit(median), unit(min), unit(max))
            }
            (Some(median), _) => unit(median),
            _ => "–".into(),
        }
    }
}

/// The `q` quantile (0..=1) of `values` by the nearest-rank method.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (sorted.len() as f64 * q).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

/// Microseconds of a duration, as a float.
pub fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// A latency given in microseconds: µs below 1 ms, ms with a precision
/// that keeps three significant digits or so, s from 10 s.
pub fn latency(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else if us < 1_000_000.0 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// A count or a rate, with thousands separators and no decimals.
pub fn count(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut grouped = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if value < 0.0 {
        format!("-{grouped}")
    } else {
        grouped
    }
}

/// A size in bytes, in MiB.
pub fn mib(bytes: f64) -> String {
    if bytes < 10.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", bytes / 1024.0 / 1024.0)
    } else {
        format!("{:.0} MiB", bytes / 1024.0 / 1024.0)
    }
}

/// A ratio, such as "2.31×".
pub fn ratio(value: f64) -> String {
    format!("{value:.2}×")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range_of_runs() {
        let mut runs = Runs::default();
        for value in [3.0, 1.0, 2.0] {
            runs.push(value);
        }
        assert_eq!(runs.median(), Some(2.0));
        assert_eq!(runs.range(), Some((1.0, 3.0)));
        assert_eq!(runs.show(count), "2 (1–3)");
    }

    #[test]
    fn nearest_rank_quantiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), 50.0);
        assert_eq!(quantile(&values, 0.99), 99.0);
        assert_eq!(quantile(&values, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn formats() {
        assert_eq!(count(1234567.4), "1,234,567");
        assert_eq!(count(999.0), "999");
        assert_eq!(latency(250.0), "250 µs");
        assert_eq!(latency(8_600.0), "8.60 ms");
        assert_eq!(latency(120_000.0), "120.0 ms");
    }
}
