//! What a deploy shows while it runs: the upload (a bar of bytes sent, on a
//! terminal) and then the node's compile (a spinner), both on stderr so that
//! stdout stays the result; off a terminal, one plain line per phase. A
//! 20 MB component (Python, JavaScript) takes tens of seconds to compile,
//! which looked like a hang with nothing shown.

use std::io::IsTerminal as _;
use std::path::Path;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

/// How often a spinner turns.
pub const SPIN: Duration = Duration::from_millis(100);

/// A spinner turning beside `message` and the time elapsed, until it is
/// finished (`mayfly dev`'s deploys, and the compile phase here).
pub fn spinner(message: String) -> ProgressBar {
    let spinner = ProgressBar::new_spinner().with_message(message);
    spinner.set_style(spinner_style());
    spinner.enable_steady_tick(SPIN);
    spinner
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {elapsed}")
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// One function's deploy as shown to a person; cleared from the terminal
/// when dropped, however the deploy ended.
pub struct DeployProgress {
    name: String,
    shown: Shown,
    compiling: bool,
}

enum Shown {
    /// On a terminal: a bar while uploading, then a spinner.
    Bar(ProgressBar),
    /// Elsewhere (a file, a pipe, CI): a line per phase.
    Lines,
}

impl DeployProgress {
    /// Starts showing the upload of `component`, `bytes` long, as the
    /// function `name`.
    pub fn start(name: &str, component: &Path, bytes: u64) -> Self {
        let file = component.file_name().map_or_else(
            || component.display().to_string(),
            |file| file.to_string_lossy().into_owned(),
        );
        let shown = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(bytes).with_message(format!("{name}: uploading {file}"));
            bar.set_style(bar_style());
            Shown::Bar(bar)
        } else {
            eprintln!("{name}: uploading {file} ({})…", HumanBytes(bytes));
            Shown::Lines
        };
        Self {
            name: name.to_string(),
            shown,
            compiling: false,
        }
    }

    /// `sent` of the request's `total` bytes are on their way. Once all
    /// are, the node is checking and compiling the component: nothing is
    /// left to count, so a spinner shows it is still at work.
    pub fn sent(&mut self, sent: u64, total: u64) {
        if self.compiling {
            return;
        }
        if let Shown::Bar(bar) = &self.shown {
            bar.set_length(total);
            bar.set_position(sent);
        }
        if sent < total {
            return;
        }
        self.compiling = true;
        match &self.shown {
            Shown::Bar(bar) => {
                bar.set_style(spinner_style());
                bar.set_message(format!("{}: compiling", self.name));
                bar.reset_elapsed();
                bar.enable_steady_tick(SPIN);
            }
            // The node may have it compiled already; the result says so.
            Shown::Lines => eprintln!("{}: uploaded, compiling…", self.name),
        }
    }
}

impl Drop for DeployProgress {
    fn drop(&mut self) {
        if let Shown::Bar(bar) = &self.shown {
            bar.finish_and_clear();
        }
    }
}

/// How the node got a deploy's code ready, from its answer: `compiled in
/// 12.4 s`, or `already compiled` when it had the artifact cached.
pub fn compile_note(outcome: &serde_json::Value) -> String {
    if outcome["compiled"] != serde_json::Value::Bool(true) {
        return "already compiled".to_string();
    }
    match outcome["compile_ms"].as_u64() {
        Some(ms) => format!("compiled in {:.1} s", ms as f64 / 1000.0),
        // A node from before `compile_ms`.
        None => "compiled".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::compile_note;

    #[test]
    fn the_compile_note_says_how_long_or_that_it_was_cached() {
        let compiled = json!({"compiled": true, "compile_ms": 12_430});
        assert_eq!(compile_note(&compiled), "compiled in 12.4 s");
        let cached = json!({"compiled": false, "compile_ms": 0});
        assert_eq!(compile_note(&cached), "already compiled");
        assert_eq!(compile_note(&json!({"compiled": true})), "compiled");
    }
}
