//! Errors that name the user's flags rather than the admin API's fields.
//!
//! Bounds the CLI can know (they are the platform's own constants, not
//! copies) are checked by clap value parsers, so a bad `--timeout` is
//! refused naming `--timeout` before anything is built or uploaded. Bounds
//! only the node knows (its largest instance, its concurrency) and values
//! only it can judge (a time relative to its clock) are the node's to
//! refuse; its answer names its API fields, quoted, and a verb renames
//! them to its flags with [`naming_flags`].

use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

use crate::client::ApiError;

/// A clap value parser of a whole number from `min` to `max` (no upper
/// bound when `max` is `None`), whose refusal says the range.
pub(crate) fn number_in<T>(
    min: T,
    max: Option<T>,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + Display + Copy + Send + Sync + 'static,
{
    move |text| {
        let range = match max {
            Some(max) => format!("give {min} to {max}"),
            None => format!("give at least {min}"),
        };
        let value: T = text
            .trim()
            .parse()
            .map_err(|_| format!("not a whole number: {range}"))?;
        if value < min || max.is_some_and(|max| value > max) {
            return Err(range);
        }
        Ok(value)
    }
}

/// A clap value parser of a duration (`30s`, `500ms`, `1m`) from `min` to
/// `max`, whose refusal says the range as durations too.
pub(crate) fn duration_in(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |text| {
        let range = format!(
            "give {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        );
        let value = humantime::parse_duration(text.trim())
            .map_err(|_| format!("not a duration like 30s or 500ms: {range}"))?;
        if value < min || value > max {
            return Err(range);
        }
        Ok(value)
    }
}

/// Milliseconds as a [`Duration`], for the platform's `*_MS` bounds.
pub(crate) const fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// `error` with the API field names in `names` replaced by the flags the
/// user gave (`("memory_mb", "--memory")`), if it is the admin API's
/// refusal; any other error as it is. The API quotes the fields it names
/// in backticks, and only quoted names are replaced, so a word in a
/// message is never mistaken for a field.
pub(crate) fn naming_flags(error: anyhow::Error, names: &[(&str, &str)]) -> anyhow::Error {
    match error.downcast::<ApiError>() {
        Ok(api) => {
            let message = names.iter().fold(api.message, |message, (field, flag)| {
                message.replace(&format!("`{field}`"), &format!("`{flag}`"))
            });
            ApiError { message, ..api }.into()
        }
        Err(other) => other,
    }
}

/// The deploy's API fields that only the node can bound (memory up to its
/// largest instance, concurrency up to its own), as `mayfly deploy` flags.
/// The timeouts are not here: the CLI checks them whole, and the API
/// states them in milliseconds where the flags take durations.
pub(crate) const DEPLOY_FLAGS: &[(&str, &str)] = &[
    ("memory_mb", "--memory"),
    ("max_request_bytes", "--max-request-bytes"),
    ("max_response_bytes", "--max-response-bytes"),
    ("max_log_bytes", "--max-log-bytes"),
    ("max_concurrency", "--max-concurrency"),
    ("reserved_concurrency", "--reserved-concurrency"),
    ("max_queued", "--max-queued"),
];

/// The usage API's parameters as `mayfly usage` flags.
pub(crate) const USAGE_FLAGS: &[(&str, &str)] =
    &[("from", "--since"), ("to", "--until"), ("group_by", "--by")];

/// An automatic canary's API fields as `mayfly alias set` flags.
pub(crate) const CANARY_FLAGS: &[(&str, &str)] = &[
    ("auto.requests", "--auto-requests"),
    ("auto.max_error_percent", "--max-error-rate"),
    ("auto.max_p99_ms", "--max-p99"),
];

/// A trigger's and a delivery's API fields as `mayfly trigger add` and
/// `mayfly invoke --async` flags.
pub(crate) const DELIVERY_FLAGS: &[(&str, &str)] = &[
    ("batch_size", "--batch-size"),
    ("max_concurrency", "--max-concurrency"),
    ("max_attempts", "--max-attempts"),
    ("backoff_ms", "--backoff"),
];

/// An asynchronous invoke's API parameters as `mayfly invoke --async` flags.
pub(crate) const INVOKE_ASYNC_FLAGS: &[(&str, &str)] = &[
    ("max_attempts", "--max-attempts"),
    ("backoff_ms", "--backoff"),
    ("path", "--path"),
];

/// A queue receive's API parameters as `mayfly queue receive` flags.
pub(crate) const RECEIVE_FLAGS: &[(&str, &str)] =
    &[("max", "--max"), ("visibility", "--visibility")];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_durations_out_of_range_are_refused_with_the_range() {
        let memory = number_in(1u32, None);
        assert_eq!(memory("128"), Ok(128));
        assert_eq!(memory("0"), Err("give at least 1".to_string()));
        assert!(memory("lots").unwrap_err().contains("not a whole number"));
        let queued = number_in(0u32, Some(10_000));
        assert_eq!(queued("10001"), Err("give 0 to 10000".to_string()));
        let timeout = duration_in(ms(1), ms(15 * 60 * 1000));
        assert_eq!(timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(timeout("16m"), Err("give 1ms to 15m".to_string()));
        assert_eq!(timeout("0s"), Err("give 1ms to 15m".to_string()));
        assert!(timeout("soon").unwrap_err().contains("like 30s"));
    }

    #[test]
    fn the_apis_quoted_fields_become_flags() {
        let api = ApiError {
            status: 400,
            code: Some("bad_request".into()),
            message: "`reserved_concurrency` is 9: give at most `max_concurrency` (4)".into(),
        };
        let error = naming_flags(api.into(), DEPLOY_FLAGS);
        let api = error.downcast_ref::<ApiError>().unwrap();
        assert_eq!(
            api.message,
            "`--reserved-concurrency` is 9: give at most `--max-concurrency` (4)"
        );
        assert_eq!(
            (api.status, api.code.as_deref()),
            (400, Some("bad_request"))
        );
        // Unquoted words stay; other errors pass through.
        let api = ApiError {
            status: 400,
            code: None,
            message: "`to` is `x`: not before to".into(),
        };
        let error = naming_flags(api.into(), USAGE_FLAGS);
        assert_eq!(
            error.downcast_ref::<ApiError>().unwrap().message,
            "`--until` is `x`: not before to"
        );
        let other = naming_flags(anyhow::anyhow!("`from`"), USAGE_FLAGS);
        assert_eq!(other.to_string(), "`from`");
    }
}
