//! How the verbs print what the admin API answers: times, JSON values as
//! table cells, tables, and records as aligned fields.

use std::time::{Duration, UNIX_EPOCH};

use comfy_table::{CellAlignment, ContentArrangement, presets};
use serde_json::Value;

use crate::client::{ApiError, Unauthorized};

/// Spaces between two columns, as `kubectl get` and `docker ps` leave.
const COLUMN_GAP: u16 = 3;

/// A table as `kubectl get` and `docker ps` print theirs: a header row of
/// upper-case names, then one line per row, columns apart by three spaces,
/// no borders and no colour, so it reads the same on a terminal, in a file
/// and through `grep`/`awk`. Every column is as wide as its widest cell
/// (header included; widths count displayed characters, not bytes), and
/// nothing is wrapped or cut to fit a terminal: a long cell makes a long
/// line rather than a broken one. Lines carry no trailing spaces, and a
/// cell's line breaks become spaces: one row is one line.
pub(crate) struct Table {
    table: comfy_table::Table,
    columns: usize,
}

impl Table {
    /// A table with these column headers, every column aligned left.
    pub(crate) fn new<I, S>(headers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let headers: Vec<String> = headers.into_iter().map(Into::into).collect();
        let columns = headers.len();
        let mut table = comfy_table::Table::new();
        table
            .load_style(presets::NOTHING)
            // Disabled: no wrapping to the terminal's width, which would
            // split one row over several lines.
            .set_content_arrangement(ContentArrangement::Disabled)
            .set_header(headers);
        for column in table.column_iter_mut() {
            // The gap is the right padding of every column but the last;
            // nothing on the left, so a line starts with its first cell.
            column.set_padding((0, COLUMN_GAP));
        }
        if let Some(last) = table.column_iter_mut().last() {
            last.set_padding((0, 0));
        }
        Self { table, columns }
    }

    /// Aligns the columns with these headers to the right, header included
    /// (for numbers, so that their digits line up).
    pub(crate) fn right(mut self, headers: &[&str]) -> Self {
        let wanted: Vec<usize> = self
            .table
            .header()
            .map(|header| {
                header
                    .cell_iter()
                    .enumerate()
                    .filter(|(_, cell)| headers.contains(&cell.content().as_str()))
                    .map(|(index, _)| index)
                    .collect()
            })
            .unwrap_or_default();
        debug_assert_eq!(wanted.len(), headers.len(), "unknown column in {headers:?}");
        for index in wanted {
            if let Some(column) = self.table.column_mut(index) {
                column.set_cell_alignment(CellAlignment::Right);
            }
        }
        self
    }

    /// Adds a row: one cell per column, in order.
    pub(crate) fn row<I, S>(&mut self, cells: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let cells: Vec<String> = cells
            .into_iter()
            .map(|cell| cell.into().replace(['\n', '\r'], " "))
            .collect();
        debug_assert_eq!(cells.len(), self.columns, "a row of {cells:?}");
        self.table.add_row(cells);
        self
    }

    /// The table as text, one line per row (header first), each ending in
    /// a newline.
    pub(crate) fn render(&self) -> String {
        self.table
            .lines()
            .map(|line| format!("{}\n", line.trim_end()))
            .collect()
    }

    /// Prints the table on stdout.
    pub(crate) fn print(&self) {
        print!("{}", self.render());
    }
}

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

/// A failed verb's error as `--json` prints it on stderr:
/// `{"error": {"message": …, "status": 409, "code": "conflict"}}`.
/// `message` is the whole chain of causes, as the text form says it but
/// without the `(HTTP …)` note; `status` is there only when the admin API
/// answered, and `code` only when its answer named one.
pub(crate) fn error_json(error: &anyhow::Error) -> Value {
    let mut status = None;
    let mut code = None;
    let mut parts = Vec::new();
    for cause in error.chain() {
        if let Some(api) = cause.downcast_ref::<ApiError>() {
            status = status.or(Some(api.status));
            code = code.or_else(|| api.code.clone());
            parts.push(if api.message.is_empty() {
                api.to_string()
            } else {
                api.message.clone()
            });
        } else if let Some(refused) = cause.downcast_ref::<Unauthorized>() {
            status = status.or(Some(401));
            parts.push(refused.advice().to_string());
        } else {
            parts.push(cause.to_string());
        }
    }
    let mut body = serde_json::json!({"message": parts.join(": ")});
    if let Some(status) = status {
        body["status"] = status.into();
    }
    if let Some(code) = code {
        body["code"] = code.into();
    }
    serde_json::json!({"error": body})
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
    let pairs: Vec<(String, String)> = map
        .iter()
        .map(|(name, value)| match name.strip_suffix("_ms") {
            Some(label) => (label.replace('_', " "), time(value)),
            None => (name.replace('_', " "), text(value)),
        })
        .collect();
    print!("{}", aligned_fields(&pairs));
}

/// `name: value` lines with the values in one column: after the longest
/// name (a fixed width would push a longer name's value out of line).
pub(crate) fn aligned_fields(pairs: &[(String, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(name, _)| name.chars().count() + 1)
        .max()
        .unwrap_or(0);
    pairs
        .iter()
        .map(|(name, value)| format!("{:<width$} {value}\n", format!("{name}:")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_headers_line_up_with_cells_of_any_width() {
        let mut table = Table::new(["NAME", "VERSION", "ROUTES"]).right(&["VERSION"]);
        table
            .row(["a", "7", "/a"])
            .row(["a-much-longer-name", "12345678", ""])
            .row(["é-ü", "1", "/x,\n/y"]);
        let text = table.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "NAME                  VERSION   ROUTES",
                "a                           7   /a",
                "a-much-longer-name   12345678",
                "é-ü                         1   /x, /y",
            ],
            "{text}"
        );
        // Each header starts where its left-aligned cells start, and ends
        // where its right-aligned cells end (counted in characters).
        let column = |line: &str, text: &str| line.find(text).map(|at| line[..at].chars().count());
        assert_eq!(column(lines[0], "ROUTES"), column(lines[1], "/a"));
        assert_eq!(column(lines[0], "ROUTES"), column(lines[3], "/x"));
        let end = |line: &str, text: &str| column(line, text).map(|at| at + text.len());
        assert_eq!(end(lines[0], "VERSION"), end(lines[2], "12345678"));
        assert_eq!(end(lines[0], "VERSION"), end(lines[1], "7"));
        assert!(text.lines().all(|line| line == line.trim_end()), "{text:?}");
    }

    #[test]
    fn field_values_line_up_after_the_longest_name() {
        let pairs = [
            ("id".to_string(), "7".to_string()),
            ("first attempt".to_string(), "x".to_string()),
        ];
        assert_eq!(
            aligned_fields(&pairs),
            "id:            7\nfirst attempt: x\n"
        );
    }

    #[test]
    fn json_errors_carry_the_status_and_code_of_the_api() {
        let api = ApiError {
            status: 409,
            code: Some("conflict".into()),
            message: "route `/a` is taken".into(),
        };
        let error = anyhow::Error::from(api).context("cannot deploy f");
        assert_eq!(
            error_json(&error),
            serde_json::json!({"error": {
                "message": "cannot deploy f: route `/a` is taken",
                "status": 409,
                "code": "conflict",
            }})
        );
        // The text form keeps the status note.
        assert_eq!(
            format!("{error:#}"),
            "cannot deploy f: route `/a` is taken (HTTP 409 Conflict)"
        );
        // An error of the CLI's own has a message alone.
        let local = anyhow::anyhow!("cannot read f.wasm");
        assert_eq!(
            error_json(&local),
            serde_json::json!({"error": {"message": "cannot read f.wasm"}})
        );
    }

    #[test]
    fn long_errors_are_cut_to_one_line() {
        assert_eq!(one_line("a\nb", 10), "a b");
        assert_eq!(one_line("abcdef", 4), "abc…");
    }
}
