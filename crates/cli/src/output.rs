//! How the verbs print what the admin API answers: times, JSON values as
//! table cells, and records as aligned fields.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;

pub(crate) fn format_time(ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

/// A JSON value as text: strings without quotes, `-` for null.
pub(crate) fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

/// A time in ms since the epoch as RFC 3339, `-` when absent.
pub(crate) fn time(value: &Value) -> String {
    value.as_i64().map_or_else(|| "-".to_string(), format_time)
}

/// Text on one line, cut to `max` characters.
pub(crate) fn one_line(text: &str, max: usize) -> String {
    let line = text.replace(['\n', '\r'], " ");
    if line.chars().count() <= max {
        return line;
    }
    let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// Prints an object's fields as aligned `name: value` lines; `*_ms` fields
/// are times (ms since the epoch), shown as RFC 3339.
pub(crate) fn print_fields(fields: &Value) {
    let Some(map) = fields.as_object() else {
        println!("{fields}");
        return;
    };
    for (name, value) in map {
        let (label, value) = match name.strip_suffix("_ms") {
            Some(label) => (label, time(value)),
            None => (name.as_str(), text(value)),
        };
        println!("{:<14} {value}", format!("{}:", label.replace('_', " ")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_errors_are_cut_to_one_line() {
        assert_eq!(one_line("a\nb", 10), "a b");
        assert_eq!(one_line("abcdef", 4), "abc…");
    }
}
