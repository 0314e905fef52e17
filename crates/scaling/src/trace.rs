//! Invocation traces: what the simulator replays.
//!
//! [`read_azure2021`] reads the Azure Functions 2021 invocation trace
//! (Microsoft, Azure Public Dataset); [`crate::synthetic`] generates traces
//! with the published statistics of the full Azure traces.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

/// One invocation, as times since the trace's origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invocation {
    /// When it started.
    pub start: Duration,
    /// When it ended (at or after `start`).
    pub end: Duration,
}

/// One function's invocations, sorted by start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionTrace {
    /// Identifies the function within its trace.
    pub id: String,
    /// The invocations in start order; the simulator relies on the order.
    pub invocations: Vec<Invocation>,
}

impl FunctionTrace {
    /// The latest end of any invocation (zero without invocations).
    pub fn last_end(&self) -> Duration {
        self.invocations
            .iter()
            .map(|invocation| invocation.end)
            .max()
            .unwrap_or_default()
    }
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The file is empty: not even a header.
    #[error("the trace is empty: expected the header `{AZURE2021_HEADER}`")]
    Empty,
    /// The first line is not the Azure 2021 header.
    #[error(
        "line 1: the header is `{found}`, expected `{AZURE2021_HEADER}` (the Azure Functions 2021 trace format)"
    )]
    WrongHeader {
        /// The first line as found.
        found: String,
    },
    /// A row is wrong; `line` counts from 1, the header being line 1.
    #[error("line {line}: {problem}")]
    Row {
        /// The line number in the file.
        line: usize,
        /// What is wrong with it.
        problem: RowProblem,
    },
}

/// What is wrong with one row of a trace.
#[derive(Debug, thiserror::Error)]
pub enum RowProblem {
    /// Fewer than four columns.
    #[error("missing column `{column}`: expected `{AZURE2021_HEADER}`")]
    MissingColumn {
        /// The first missing column.
        column: &'static str,
    },
    /// More than four columns.
    #[error("{found} columns, expected 4: `{AZURE2021_HEADER}`")]
    ExtraColumns {
        /// How many columns the row has.
        found: usize,
    },
    /// A time column that is not a finite number of seconds.
    #[error("`{column}` is `{value}`, expected a number of seconds such as `12.5`")]
    NotANumber {
        /// The column.
        column: &'static str,
        /// Its value as found.
        value: String,
    },
    /// A negative time or duration.
    #[error("`{column}` is negative ({value}); times and durations are seconds ≥ 0")]
    Negative {
        /// The column.
        column: &'static str,
        /// Its value.
        value: f64,
    },
}

/// The header of the Azure Functions 2021 invocation trace.
pub const AZURE2021_HEADER: &str = "app,func,end_timestamp,duration";

const COLUMNS: [&str; 4] = ["app", "func", "end_timestamp", "duration"];

/// Reads an Azure Functions 2021 trace file; see [`read_azure2021`].
pub fn read_azure2021_file(path: &Path) -> Result<Vec<FunctionTrace>, TraceError> {
    let file = std::fs::File::open(path)?;
    read_azure2021(std::io::BufReader::new(file))
}

/// Reads the Azure Functions 2021 invocation trace format: a header
/// `app,func,end_timestamp,duration`, then one row per invocation with the
/// hashed app and function ids, the end time in seconds since the trace
/// start and the duration in seconds. The start is `end − duration`,
/// clamped at 0.
///
/// Returns one [`FunctionTrace`] per (app, func), with id `app/func`,
/// sorted by id. Blank lines are skipped.
///
/// The rows are parsed by hand: the format is four unquoted columns (hex
/// hashes and decimal numbers), so a CSV library would add a dependency
/// without handling anything more, and by hand the errors can name the
/// line and column.
pub fn read_azure2021(reader: impl BufRead) -> Result<Vec<FunctionTrace>, TraceError> {
    let mut lines = reader.lines();
    let header = lines.next().ok_or(TraceError::Empty)??;
    let header = header.trim().trim_start_matches('\u{feff}');
    if header != AZURE2021_HEADER {
        return Err(TraceError::WrongHeader {
            found: header.to_owned(),
        });
    }
    let mut functions: HashMap<String, Vec<Invocation>> = HashMap::new();
    for (index, line) in lines.enumerate() {
        let line_number = index + 2;
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (id, invocation) = parse_row(line).map_err(|problem| TraceError::Row {
            line: line_number,
            problem,
        })?;
        functions.entry(id).or_default().push(invocation);
    }
    let mut traces: Vec<FunctionTrace> = functions
        .into_iter()
        .map(|(id, mut invocations)| {
            invocations.sort_by_key(|invocation| invocation.start);
            FunctionTrace { id, invocations }
        })
        .collect();
    traces.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(traces)
}

fn parse_row(line: &str) -> Result<(String, Invocation), RowProblem> {
    let mut fields = line.split(',');
    let mut next = |column: &'static str| {
        fields
            .next()
            .map(str::trim)
            .filter(|field| !field.is_empty())
            .ok_or(RowProblem::MissingColumn { column })
    };
    let app = next(COLUMNS[0])?;
    let func = next(COLUMNS[1])?;
    let end = seconds(COLUMNS[2], next(COLUMNS[2])?)?;
    let duration = seconds(COLUMNS[3], next(COLUMNS[3])?)?;
    let extra = fields.count();
    if extra > 0 {
        return Err(RowProblem::ExtraColumns { found: 4 + extra });
    }
    let invocation = Invocation {
        start: end.saturating_sub(duration),
        end,
    };
    Ok((format!("{app}/{func}"), invocation))
}

fn seconds(column: &'static str, text: &str) -> Result<Duration, RowProblem> {
    let not_a_number = || RowProblem::NotANumber {
        column,
        value: text.to_owned(),
    };
    let value: f64 = text.parse().map_err(|_| not_a_number())?;
    if value < 0.0 {
        return Err(RowProblem::Negative { column, value });
    }
    // Rejects NaN and infinity, and values too large for a Duration.
    Duration::try_from_secs_f64(value).map_err(|_| not_a_number())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Vec<FunctionTrace>, TraceError> {
        read_azure2021(text.as_bytes())
    }

    #[test]
    fn reads_the_azure_sample() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/Azure2021_200.csv");
        let traces = read_azure2021_file(&path).unwrap();
        assert_eq!(traces.len(), 31);
        let invocations: usize = traces.iter().map(|t| t.invocations.len()).sum();
        assert_eq!(invocations, 199);
        for trace in &traces {
            assert!(trace.invocations.is_sorted_by_key(|i| i.start));
            assert!(trace.invocations.iter().all(|i| i.start <= i.end));
        }
        let end = traces.iter().map(FunctionTrace::last_end).max().unwrap();
        assert_eq!(end.as_secs(), 1260);
    }

    #[test]
    fn groups_by_app_and_function_and_sorts_by_start() {
        let traces = read(
            "app,func,end_timestamp,duration\n\
             a,f,10.5,0.5\n\
             a,g,3,1\n\
             a,f,4,5\n\
             \n\
             b,f,7,2\r\n",
        )
        .unwrap();
        let ids: Vec<&str> = traces.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["a/f", "a/g", "b/f"]);
        let secs = |s: f64| Duration::from_secs_f64(s);
        assert_eq!(
            traces[0].invocations,
            [
                // Started before the trace: clamped to 0.
                Invocation {
                    start: Duration::ZERO,
                    end: secs(4.0)
                },
                Invocation {
                    start: secs(10.0),
                    end: secs(10.5)
                },
            ]
        );
    }

    #[test]
    fn errors_name_the_line_and_the_problem() {
        let header = "app,func,end_timestamp,duration\n";
        let cases = [
            ("a,f,1\n", 2, "missing column `duration`"),
            ("a,f,1,1\na,f,1,\n", 3, "missing column `duration`"),
            ("a,f,1,1\n\na,f,x,1\n", 4, "`end_timestamp` is `x`"),
            ("a,f,1,NaN\n", 2, "`duration` is `NaN`"),
            ("a,f,1,-2\n", 2, "`duration` is negative"),
            ("a,f,1,2,3\n", 2, "5 columns, expected 4"),
        ];
        for (rows, line, problem) in cases {
            let error = read(&format!("{header}{rows}")).err().unwrap();
            let message = error.to_string();
            assert!(
                matches!(error, TraceError::Row { line: l, .. } if l == line),
                "{rows:?}: {message}"
            );
            assert!(message.starts_with(&format!("line {line}: ")), "{message}");
            assert!(message.contains(problem), "{message}");
        }
        let error = read("func,app,end,duration\na,f,1,1\n").err().unwrap();
        assert!(matches!(error, TraceError::WrongHeader { .. }), "{error}");
        assert!(error.to_string().contains(AZURE2021_HEADER), "{error}");
        assert!(matches!(read("").err().unwrap(), TraceError::Empty));
    }
}
