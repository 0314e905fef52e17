//! The report: a markdown file with one table per scenario and an SVG bar
//! chart of hello throughput and p99 per system.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

use super::process::command;
use super::stats::{Runs, count, latency};
use super::systems::Kind;
use super::{Bench, Outcome, big, burst, cold, density, events, http, outbound};

/// Every scenario's results.
pub struct Results {
    /// Scenario 1.
    pub http: http::Results,
    /// Scenario 2.
    pub cold: cold::Results,
    /// Scenario 3.
    pub density: Outcome<density::Figures>,
    /// Scenario 4.
    pub burst: burst::Results,
    /// Scenario 5.
    pub events: Outcome<events::Figures>,
    /// Scenario 6.
    pub outbound: Outcome<http::Figures>,
    /// Scenario 7.
    pub big: big::Results,
}

impl Results {
    /// How many measurements failed (skipped ones do not count).
    fn failures(&self) -> usize {
        let rows = self
            .http
            .rows
            .iter()
            .map(|(_, o)| o.failed())
            .chain(self.cold.process_start.iter().map(|(_, o)| o.failed()))
            .chain(self.burst.rows.iter().map(|(_, o)| o.failed()))
            .chain([
                self.cold.mayfly.failed(),
                self.density.failed(),
                self.events.failed(),
                self.outbound.failed(),
            ]);
        rows.filter(|failed| *failed).count() + self.big.failures()
    }
}

/// Writes `<dir>/<name>.md` and `<dir>/<name>.svg`; returns how many
/// measurements failed.
pub fn write(bench: &Bench, results: &Results, dir: &Path, name: &str) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let md = dir.join(format!("{name}.md"));
    std::fs::write(&md, markdown(bench, results, name))
        .with_context(|| format!("cannot write {}", md.display()))?;
    let svg = dir.join(format!("{name}.svg"));
    std::fs::write(&svg, chart(&results.http))
        .with_context(|| format!("cannot write {}", svg.display()))?;
    Ok(results.failures())
}

fn markdown(bench: &Bench, results: &Results, name: &str) -> String {
    let profile = &bench.profile;
    let mut out = String::new();
    let kind = if profile.smoke {
        "smoke run (`cargo xtask bench --smoke`: debug build, seconds-long runs; the figures \
         only show that the harness works)"
    } else {
        "full run (`cargo xtask bench`)"
    };
    let _ = write!(
        out,
        "# Mayfly benchmark: {kind}\n\n\
         Every system ran on this machine in one run of the harness (xtask/src/bench.rs), one \
         after the other, with the same load generators; figures are comparable within this \
         file, not across machines. Chart: [{name}.svg]({name}.svg).\n\n\
         {}\n\
         | system | version |\n|---|---|\n",
        machine()
    );
    for system in &bench.systems {
        let version = match &system.binary {
            Ok(_) => system.version.as_str(),
            Err(why) => why.as_str(),
        };
        let _ = writeln!(out, "| {} | {version} |", system.kind.label());
    }
    let _ = writeln!(out, "| wrk | {} |\n", wrk_version());
    out.push_str(&results.http.markdown(
        profile.runs,
        profile.run.as_secs(),
        profile.warmup.as_secs(),
    ));
    out.push('\n');
    out.push_str(&results.cold.markdown(profile.cold_runs));
    out.push('\n');
    out.push_str(&density::markdown(&results.density, profile.runs));
    out.push('\n');
    out.push_str(
        &results
            .burst
            .markdown(profile.burst_clients, profile.burst_rounds),
    );
    out.push('\n');
    out.push_str(&events::markdown(
        &results.events,
        profile.events,
        profile.event_samples,
        profile.runs,
    ));
    out.push('\n');
    out.push_str(&outbound::markdown(
        &results.outbound,
        profile.runs,
        profile.run.as_secs(),
    ));
    out.push('\n');
    out.push_str(
        &results
            .big
            .markdown(profile.runs, profile.run.as_secs(), profile.cold_runs),
    );
    out
}

/// The machine's description: date, cores, CPU model, kernel, memory.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown", |(_, model)| model.trim());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|kb| kb.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
        .map_or("unknown".into(), |kb| {
            format!("{:.1} GiB", kb / 1024.0 / 1024.0)
        });
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!(
        "| machine | |\n|---|---|\n\
         | date | {} |\n| cores (`nproc`) | {cores} |\n| CPU | {model} |\n\
         | kernel | {} |\n| memory | {memory} |\n",
        today(),
        kernel.trim()
    )
}

fn wrk_version() -> String {
    // `wrk -v` prints its version line and the usage, and exits with 1.
    command("wrk").arg("-v").output().map_or_else(
        |_| "unknown".into(),
        |out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            text.lines()
                .next()
                .and_then(|line| line.split(" [").next())
                .unwrap_or("unknown")
                .trim()
                .to_string()
        },
    )
}

/// Today's date and time (UTC), such as "2026-11-23 22:40 UTC".
fn today() -> String {
    let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) else {
        return "unknown".into();
    };
    let seconds = now.as_secs();
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    let minutes = seconds % 86_400 / 60;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        minutes / 60,
        minutes % 60
    )
}

/// Calendar date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`), to avoid a date crate for one line of the report.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A system's bar colour, the same in every chart whoever is skipped.
fn colour(kind: Kind) -> &'static str {
    match kind {
        Kind::Mayfly => "#d9480f",
        Kind::Wasmtime => "#1c7ed6",
        Kind::Workerd => "#5c940d",
        Kind::BareHyper => "#868e96",
    }
}

/// A two-panel bar chart: hello req/s and p99 per system (medians, with a
/// min–max whisker). Plain SVG with a generic font family: no script, no
/// external font or stylesheet.
fn chart(http: &http::Results) -> String {
    let bars: Vec<(Kind, &http::Figures)> = http
        .rows
        .iter()
        .filter_map(|(kind, outcome)| Some((*kind, outcome.measured()?)))
        .collect();
    let (width, height) = (720.0, 320.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n"
    );
    panel(
        &mut svg,
        20.0,
        "hello req/s (higher is better)",
        &bars,
        |f| &f.rps,
        count,
    );
    panel(
        &mut svg,
        370.0,
        "hello p99 latency (lower is better)",
        &bars,
        |f| &f.p99,
        latency,
    );
    if bars.is_empty() {
        svg.push_str(
            "<text x=\"360\" y=\"160\" text-anchor=\"middle\">no system measured</text>\n",
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// One panel of the chart, 330 px wide from `left`.
fn panel(
    svg: &mut String,
    left: f64,
    title: &str,
    bars: &[(Kind, &http::Figures)],
    figure: fn(&http::Figures) -> &Runs,
    unit: fn(f64) -> String,
) {
    let (top, plot_height, bottom) = (50.0, 200.0, 250.0);
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"28\" text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\">{title}</text>",
        left + 165.0
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{bottom}\" x2=\"{}\" y2=\"{bottom}\" stroke=\"#333\"/>",
        left + 330.0
    );
    let highest = bars
        .iter()
        .filter_map(|(_, f)| figure(f).range().map(|(_, max)| max))
        .fold(0.0, f64::max);
    if highest <= 0.0 {
        return;
    }
    let slot = 330.0 / bars.len() as f64;
    let bar_width = (slot * 0.6).min(70.0);
    let y = |value: f64| bottom - value / highest * plot_height;
    for (i, (kind, figures)) in bars.iter().enumerate() {
        let runs = figure(figures);
        let (Some(median), Some((min, max))) = (runs.median(), runs.range()) else {
            continue;
        };
        let centre = left + slot * (i as f64 + 0.5);
        let colour = colour(*kind);
        let _ = writeln!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bar_width:.1}\" height=\"{:.1}\" fill=\"{colour}\"/>",
            centre - bar_width / 2.0,
            y(median),
            bottom - y(median)
        );
        // The whisker: min to max over the runs.
        let _ = writeln!(
            svg,
            "<line x1=\"{centre:.1}\" y1=\"{:.1}\" x2=\"{centre:.1}\" y2=\"{:.1}\" stroke=\"#222\" stroke-width=\"1.5\"/>",
            y(min),
            y(max)
        );
        let _ = writeln!(
            svg,
            "<text x=\"{centre:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            (y(max) - 6.0).max(top - 8.0),
            escape(&unit(median))
        );
        let _ = writeln!(
            svg,
            "<text x=\"{centre:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            bottom + 18.0,
            escape(kind.label())
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\" font-size=\"11\">median of the runs; whisker: min–max</text>",
        left + 165.0,
        bottom + 50.0
    );
}

/// XML-escapes text for the chart.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
    }
}
