//! Policies from their command-line spelling.

use std::time::Duration;

use crate::hybrid::HybridHistogram;
use crate::policy::{FixedKeepAlive, KeepAlivePolicy};

/// What is wrong with a policy's spelling.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Nothing was given.
    #[error(
        "empty keep-alive policy: give `hybrid`, `fixed`, `fixed:<duration>` or a duration such as `10m`"
    )]
    Empty,
    /// A `fixed:` policy whose duration does not parse.
    #[error(
        "bad keep-alive duration `{text}` ({source}): give a duration such as `10m`, `90s` or `500ms`"
    )]
    BadDuration {
        /// The duration as given.
        text: String,
        /// Why it does not parse.
        source: humantime::DurationError,
    },
    /// `hybrid:0s`: a histogram needs bins of some width.
    #[error("`hybrid:<bin width>` needs a bin width above zero, such as `hybrid:1s`")]
    ZeroBin,
    /// Neither a policy name nor a duration.
    #[error(
        "unknown keep-alive policy `{text}`: give `hybrid`, `hybrid:<bin width>`, `fixed` (10 minutes), `fixed:<duration>` or a duration such as `10m`"
    )]
    Unknown {
        /// The policy as given.
        text: String,
    },
}

/// Parses a keep-alive policy:
///
/// - `hybrid`: [`HybridHistogram::default()`];
/// - `hybrid:<bin width>`: [`HybridHistogram::with_bin_width`] (`hybrid:1s`);
/// - `fixed`: [`FixedKeepAlive`] for 10 minutes;
/// - `fixed:<duration>` or just `<duration>` (`10m`, `90s`, `500ms`, `1h
///   30m`): [`FixedKeepAlive`] for that long.
pub fn parse_policy(text: &str) -> Result<Box<dyn KeepAlivePolicy>, PolicyError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(PolicyError::Empty);
    }
    if text.eq_ignore_ascii_case("hybrid") {
        return Ok(Box::new(HybridHistogram::default()));
    }
    if let Some(bin) = text.strip_prefix("hybrid:") {
        let bin_width = duration(bin.trim())?;
        if bin_width.is_zero() {
            return Err(PolicyError::ZeroBin);
        }
        return Ok(Box::new(HybridHistogram::with_bin_width(bin_width)));
    }
    if text.eq_ignore_ascii_case("fixed") {
        return Ok(Box::new(FixedKeepAlive::default()));
    }
    if let Some(duration) = text.strip_prefix("fixed:") {
        return fixed(duration.trim());
    }
    // A bare word that starts like a number is meant as a duration: report
    // why it does not parse rather than calling it an unknown policy.
    if text.starts_with(|c: char| c.is_ascii_digit()) {
        return fixed(text);
    }
    Err(PolicyError::Unknown {
        text: text.to_owned(),
    })
}

fn fixed(text: &str) -> Result<Box<dyn KeepAlivePolicy>, PolicyError> {
    Ok(Box::new(FixedKeepAlive {
        keep_alive: duration(text)?,
    }))
}

fn duration(text: &str) -> Result<Duration, PolicyError> {
    humantime::parse_duration(text).map_err(|source| PolicyError::BadDuration {
        text: text.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> String {
        parse_policy(text).unwrap().name()
    }

    #[test]
    fn hybrid_takes_a_bin_width() {
        assert_eq!(name("hybrid:1s"), "hybrid-1s");
        assert_eq!(
            parse_policy("hybrid:1s").unwrap().resolution(),
            Duration::from_secs(1)
        );
        assert!(matches!(
            parse_policy("hybrid:0s"),
            Err(PolicyError::ZeroBin)
        ));
        assert!(matches!(
            parse_policy("hybrid:soon"),
            Err(PolicyError::BadDuration { .. })
        ));
    }

    #[test]
    fn accepts_names_and_durations() {
        assert_eq!(name("hybrid"), "hybrid");
        assert_eq!(name("fixed"), "fixed-10m");
        assert_eq!(name("10m"), "fixed-10m");
        assert_eq!(name("2s"), "fixed-2s");
        assert_eq!(name("500ms"), "fixed-500ms");
        assert_eq!(name("fixed:1h"), "fixed-1h");
        assert_eq!(name(" fixed: 90s "), "fixed-90s");
        assert_eq!(name("1h 30m"), "fixed-90m");
        let windows = parse_policy("20m").unwrap().new_function().windows();
        assert_eq!(windows.keep_alive, Duration::from_secs(1200));
    }

    #[test]
    fn rejects_what_is_not_a_policy() {
        let error = parse_policy("").err().unwrap();
        assert!(matches!(error, PolicyError::Empty), "{error}");
        let error = parse_policy("lru").err().unwrap();
        assert!(matches!(error, PolicyError::Unknown { .. }), "{error}");
        assert!(error.to_string().contains("`lru`"), "{error}");
        assert!(error.to_string().contains("`hybrid`"), "{error}");
        let error = parse_policy("10 parsecs").err().unwrap();
        assert!(matches!(error, PolicyError::BadDuration { .. }), "{error}");
        assert!(error.to_string().contains("`10 parsecs`"), "{error}");
        let error = parse_policy("fixed:soon").err().unwrap();
        assert!(matches!(error, PolicyError::BadDuration { .. }), "{error}");
        assert!(error.to_string().contains("`10m`"), "{error}");
    }
}
