//! Schedule triggers: parsing `*/5 * * * *`, `@daily` or `@every 30s`, and
//! the clock arithmetic deciding when a run is due. Pure logic: callers pass
//! times as milliseconds since the Unix epoch (UTC).

use std::time::Duration;

use chrono::{DateTime, TimeZone as _, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

const HINT: &str = "a schedule is 5 fields (minute hour day-of-month month day-of-week, UTC) \
                    like `*/5 * * * *`, or `@every 30s`";
const FIELDS: [(&str, &str); 5] = [
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31"),
    ("month", "1-12 or JAN-DEC"),
    ("day-of-week", "0-7 or SUN-SAT; 0 and 7 are Sunday"),
];
const NICKNAMES: [(&str, &str); 7] = [
    ("@hourly", "0 * * * *"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@weekly", "0 0 * * 0"),
    ("@monthly", "0 0 1 * *"),
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
];

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    text: String,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    // Boxed: a parsed pattern is a few hundred bytes.
    Cron(Box<Cron>),
    Every(Duration),
}

/// Why a schedule was refused; the message says what was wrong and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(String);

impl Schedule {
    /// Parses `*/5 * * * *` style 5-field cron (minute hour day-of-month month day-of-week, UTC),
    /// the nicknames @hourly @daily @midnight @weekly @monthly @yearly @annually,
    /// and `@every <duration>` (humantime syntax: `@every 30s`, `@every 1m30s`;
    /// at least 1 s, at most 366 days).
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let refuse = |what: &str| Err(ScheduleError(format!("{what}: {HINT}")));
        if text.len() > 256 {
            return refuse("the schedule is longer than 256 bytes");
        }
        if text.chars().any(char::is_control) {
            return refuse("the schedule contains a control character (tab, newline...)");
        }
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let (head, rest) = text.split_once(' ').unwrap_or((&text, ""));
        let kind = if text.is_empty() {
            return refuse("the schedule is empty");
        } else if head.eq_ignore_ascii_case("@every") {
            Kind::Every(parse_every(&text, rest)?)
        } else if text.starts_with('@') {
            let nickname = NICKNAMES
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(&text));
            let Some((_, pattern)) = nickname else {
                let names: Vec<&str> = NICKNAMES.iter().map(|(n, _)| *n).collect();
                return refuse(&format!(
                    "`{text}` is not a known schedule (known: {}, `@every <duration>`)",
                    names.join(" ")
                ));
            };
            Kind::Cron(Box::new(parse_cron(pattern)?))
        } else {
            Kind::Cron(Box::new(parse_cron(&text)?))
        };
        Ok(Schedule { text, kind })
    }

    /// The first slot strictly after `after_ms` (ms since the epoch), or None if there is none.
    ///
    /// Cron slots are wall-clock times (UTC). `@every d` slots lie on a fixed
    /// grid anchored at `anchor_ms`, the trigger's creation: `anchor_ms + k*d`
    /// for k >= 1. The grid never moves: neither a firing (late or not) nor a
    /// restart re-anchors it, so every node of a fleet computes the same slot
    /// times. Times before 1970 or beyond chrono's range give None.
    pub fn next_after(&self, anchor_ms: i64, after_ms: i64) -> Option<i64> {
        let after = DateTime::from_timestamp_millis(after_ms).filter(|_| after_ms >= 0)?;
        match &self.kind {
            Kind::Every(every) => {
                let every = i64::try_from(every.as_millis()).ok()?;
                // Slots strictly after `after_ms`, and never the anchor itself.
                let k = if after_ms < anchor_ms {
                    1
                } else {
                    (after_ms - anchor_ms).div_euclid(every).checked_add(1)?
                };
                let next = anchor_ms.checked_add(k.checked_mul(every)?)?;
                DateTime::from_timestamp_millis(next).map(|_| next)
            }
            // Croner drops sub-second parts and, when not inclusive, starts one
            // second later, so the result is a whole second strictly after `after`.
            Kind::Cron(cron) => cron
                .find_next_occurrence(&after, false)
                .ok()
                .map(|next| next.timestamp_millis()),
        }
    }

    /// The slot to fire at `now_ms`, if one is due: given the last slot fired
    /// (or, before the first, the trigger's creation) `last_ms`, some slot
    /// lies in `(last_ms, now_ms]`. After downtime spanning several slots it
    /// returns only the latest of them: the missed ones are skipped and one
    /// catch-up run fires (as a Kubernetes CronJob starts only the most
    /// recent missed schedule). The caller records the returned slot as the
    /// last one fired, so the next is the following slot of the schedule.
    pub fn due(&self, anchor_ms: i64, last_ms: i64, now_ms: i64) -> Option<i64> {
        let first = self
            .next_after(anchor_ms, last_ms)
            .filter(|slot| *slot <= now_ms)?;
        let latest = match &self.kind {
            Kind::Every(every) => {
                let every = i64::try_from(every.as_millis()).ok()?;
                // `first` is on the grid and <= now, so this is too.
                Some(now_ms - now_ms.checked_sub(anchor_ms)?.rem_euclid(every))
            }
            Kind::Cron(cron) => DateTime::from_timestamp_millis(now_ms)
                .and_then(|now| cron.find_previous_occurrence(&now, true).ok())
                .map(|slot| slot.timestamp_millis()),
        };
        let latest = latest.filter(|latest| (first..=now_ms).contains(latest));
        Some(latest.unwrap_or(first))
    }

    /// The text it was parsed from, normalised (trimmed, single spaces).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

fn parse_every(text: &str, duration: &str) -> Result<Duration, ScheduleError> {
    if duration.is_empty() {
        return Err(ScheduleError(
            "`@every` needs a duration, like `@every 30s`".into(),
        ));
    }
    let every = humantime::parse_duration(duration).map_err(|error| {
        ScheduleError(format!(
            "`{text}`: `{duration}` is not a duration ({error}); write e.g. `@every 30s`, \
             `@every 1m30s`"
        ))
    })?;
    if !(Duration::from_secs(1)..=Duration::from_secs(366 * 86_400)).contains(&every) {
        return Err(ScheduleError(format!(
            "`{text}`: the interval must be at least 1s and at most 366 days; \
             write e.g. `@every 30s`, `@every 1h`"
        )));
    }
    Ok(every)
}

fn parser() -> CronParser {
    // Five fields only. Croner's default `dom_and_dow(false)` is Vixie cron's
    // rule: when both day fields are restricted, a day matching either runs
    // (`0 0 1 * MON` = the 1st and every Monday). One difference: Vixie treats
    // a day field starting with `*` (as `*/2`) as unrestricted, croner only `*`.
    // Croner's extensions (L, W, #, and `+` before day-of-week for AND) are accepted.
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
}

fn parse_cron(text: &str) -> Result<Cron, ScheduleError> {
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.len() {
        5 => {}
        n @ (6 | 7) => {
            return Err(ScheduleError(format!(
                "`{text}` has {n} fields: seconds and years are not supported; {HINT}. \
                 For sub-minute intervals use `@every 10s`"
            )));
        }
        n => return Err(ScheduleError(format!("`{text}` has {n} fields: {HINT}"))),
    }
    let bad = |i: usize, why: &dyn std::fmt::Display| {
        let (name, range) = FIELDS[i];
        ScheduleError(format!(
            "`{text}`: `{}` is not a valid {name} ({range}, or a list `1,2`, range `1-5` or \
             step `*/5`, `1-30/5`): {why}",
            fields[i]
        ))
    };
    // Croner reads an empty list item (`1,`, `,`, a bare `+`) as nothing; a minute
    // matching nothing would also make the never-matches search below crawl hourly.
    let empty_item = |f: &&str| {
        f.strip_prefix('+')
            .unwrap_or(f)
            .split(',')
            .any(str::is_empty)
    };
    if let Some(i) = fields.iter().position(empty_item) {
        return Err(bad(i, &"empty list item"));
    }
    let cron = parser().parse(text).map_err(|error| {
        // Name the culprit: the first field refused on its own among `*`s.
        let culprit = (0..5).find(|&i| {
            let mut probe = ["*"; 5];
            probe[i] = fields[i];
            parser().parse(&probe.join(" ")).is_err()
        });
        match culprit {
            Some(i) => bad(i, &error),
            None => ScheduleError(format!("`{text}` is not valid ({error}): {HINT}")),
        }
    })?;
    // Without a year field a pattern repeats every 400 years (the Gregorian
    // cycle, a whole number of weeks), so if croner's search, which gives up
    // at year 5000, finds nothing in 4600-4999, there is nothing ever.
    let probe = Utc.with_ymd_and_hms(4600, 1, 1, 0, 0, 0).single();
    if probe.is_some_and(|start| cron.find_next_occurrence(&start, true).is_err()) {
        return Err(ScheduleError(format!(
            "`{text}` never matches (like 30 February): {HINT}"
        )));
    }
    Ok(cron)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `"2024-03-01 12:03:10"` (UTC) in ms since the epoch.
    fn at(text: &str) -> i64 {
        let naive = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").unwrap();
        naive.and_utc().timestamp_millis()
    }

    #[test]
    fn next_slots() {
        // 2024-03-08 is a Friday, 03-10 a Sunday, 03-11 a Monday.
        let cases = [
            ("*/5 * * * *", "2024-03-01 12:03:10", "2024-03-01 12:05:00"),
            ("*/5 * * * *", "2024-03-01 12:05:00", "2024-03-01 12:10:00"), // strictly after
            ("0 9 * * 1-5", "2024-03-08 10:00:00", "2024-03-11 09:00:00"), // skips the weekend
            ("0 0 15 * MON", "2024-03-09 00:00:00", "2024-03-11 00:00:00"), // day fields OR
            ("0 0 15 * MON", "2024-03-11 00:00:00", "2024-03-15 00:00:00"),
            ("@daily", "2024-12-31 23:59:59", "2025-01-01 00:00:00"),
            ("@MIDNIGHT", "2024-12-31 00:00:00", "2025-01-01 00:00:00"),
            ("@yearly", "2024-01-01 00:00:00", "2025-01-01 00:00:00"),
            ("@weekly", "2024-03-08 00:00:00", "2024-03-10 00:00:00"),
            ("0 0 29 2 *", "2024-03-01 00:00:00", "2028-02-29 00:00:00"),
        ];
        // Cron slots are wall-clock times: the anchor plays no part.
        let anchor = at("2024-03-01 11:59:31") + 7;
        for (text, after, expected) in cases {
            let next = Schedule::parse(text).unwrap().next_after(anchor, at(after));
            assert_eq!(next, Some(at(expected)), "{text} after {after}");
        }
        let s = Schedule::parse("  */5   *  * * * ").unwrap();
        assert_eq!(s.as_str(), "*/5 * * * *");
        // Sub-second parts count: 250 ms past a slot is after it.
        let slot = at("2024-03-01 12:05:00");
        assert_eq!(s.next_after(anchor, slot - 1), Some(slot));
        assert_eq!(s.next_after(anchor, slot + 250), Some(slot + 300_000));
    }

    #[test]
    fn every_keeps_a_grid_anchored_at_the_creation() {
        let s = Schedule::parse("@every 30s").unwrap();
        let created = at("2024-03-01 12:00:07") + 123;
        // Before the first firing `last` is the creation: slots are created + k*30s.
        assert_eq!(s.next_after(created, created), Some(created + 30_000));
        assert_eq!(s.due(created, created, created + 29_999), None);
        assert_eq!(
            s.due(created, created, created + 30_000),
            Some(created + 30_000)
        );
        // A late firing does not re-anchor: the slot, not the firing time,
        // is recorded, and the next slot is a whole interval after it.
        let fired = s.due(created, created, created + 31_500).unwrap();
        assert_eq!(fired, created + 30_000);
        assert_eq!(s.next_after(created, fired), Some(created + 60_000));
        // Wherever `after` falls, the next slot is on the grid.
        for offset in [0, 1, 29_999, 30_000, 30_001, 95_000] {
            let next = s.next_after(created, created + offset).unwrap();
            assert_eq!((next - created) % 30_000, 0, "{offset}");
            assert!(next > created + offset && next <= created + offset + 30_000);
        }
        // A time before the anchor (a clock set back) waits for the first slot.
        assert_eq!(
            s.next_after(created, created - 5_000),
            Some(created + 30_000)
        );
        assert_eq!(s.due(created, created, created - 5_000), None);
        // A record an older node wrote (its firing time, off the grid)
        // rejoins the grid.
        assert_eq!(
            s.next_after(created, created + 31_500),
            Some(created + 60_000)
        );
        let s = Schedule::parse("@every 1m30s").unwrap();
        assert_eq!(s.next_after(0, 0), Some(90_000));
    }

    #[test]
    fn after_downtime_one_catch_up_fires_for_the_latest_missed_slot() {
        let s = Schedule::parse("*/5 * * * *").unwrap();
        let created = at("2024-03-01 11:58:00");
        let last = at("2024-03-01 12:00:00");
        let now = at("2024-03-04 12:07:30");
        // Three days of slots missed: the latest one fires, once.
        let due = s.due(created, last, now);
        assert_eq!(due, Some(at("2024-03-04 12:05:00")));
        // Recorded as the last slot: nothing more until the next one.
        assert_eq!(s.due(created, due.unwrap(), now), None);
        let slot = at("2024-03-04 12:10:00");
        assert_eq!(s.due(created, due.unwrap(), slot - 1), None);
        assert_eq!(s.due(created, due.unwrap(), slot), Some(slot));
        // The same for a grid.
        let s = Schedule::parse("@every 1h").unwrap();
        let due = s.due(created, created, created + 50 * 3_600_000 + 5);
        assert_eq!(due, Some(created + 50 * 3_600_000));
        // A cron slot between whole seconds of `now` is found too.
        let s = Schedule::parse("* * * * *").unwrap();
        let minute = at("2024-03-01 12:05:00");
        assert_eq!(s.due(created, minute - 60_000, minute + 250), Some(minute));
        assert_eq!(s.due(created, minute - 3 * 60_000, minute), Some(minute));
    }

    #[test]
    fn due_boundaries() {
        let s = Schedule::parse("0 * * * *").unwrap();
        let (last, slot) = (at("2024-03-01 12:30:00"), at("2024-03-01 13:00:00"));
        let anchor = last;
        assert_eq!(s.due(anchor, last, slot - 1), None);
        assert_eq!(s.due(anchor, last, slot), Some(slot)); // slot == now: due
        assert_eq!(s.due(anchor, slot, slot + 60_000), None); // slot == last: already fired
        assert_eq!(s.due(anchor, slot, slot - 1), None); // the clock went back
    }

    #[test]
    fn out_of_range_times_give_none() {
        for text in ["* * * * *", "@every 1s"] {
            let s = Schedule::parse(text).unwrap();
            assert_eq!(s.next_after(0, -1), None);
            assert_eq!(s.next_after(0, i64::MAX - 10), None);
            assert_eq!(s.due(0, i64::MIN, i64::MAX), None);
        }
        let s = Schedule::parse("@every 1s").unwrap();
        assert_eq!(s.next_after(i64::MAX - 10, 0), None);
    }

    fn assert_refused(cases: &[(&str, &str)]) {
        for (text, expected) in cases {
            let message = Schedule::parse(text).unwrap_err().to_string();
            assert!(message.contains(expected), "{text:?}: {message}");
        }
    }

    #[test]
    fn refuses_bad_cron_naming_the_field() {
        assert_refused(&[
            ("* * * *", "`* * * *` has 4 fields: a schedule is 5 fields"),
            ("*/10 * * * * *", "6 fields: seconds and years are not"),
            ("*/10 * * * * *", "sub-minute intervals use `@every 10s`"),
            ("0 0 0 1 1 * 2030", "7 fields"),
            ("61 * * * *", "`61` is not a valid minute (0-59"),
            ("0 24 * * *", "not a valid hour"),
            ("0 0 0 * *", "not a valid day-of-month"),
            ("0 0 * 13 *", "not a valid month"),
            ("0 0 * * 8", "not a valid day-of-week"),
            ("* * * * é", "not a valid day-of-week"),
            ("5/5 * * * *", "not a valid minute"),
            ("0 1, * * *", "`1,` is not a valid hour (0-23, or a list"),
            ("0 0 30 2 *", "never matches"),
            ("0 0 31 4,6,9,11 *", "never matches"),
        ]);
    }

    #[test]
    fn refuses_bad_intervals_nicknames_and_input() {
        let long = "* ".repeat(200);
        assert_refused(&[
            ("@every 0s", "at least 1s"),
            ("@every 500ms", "at least 1s"),
            ("@every 367d", "at most 366 days"),
            ("@every", "`@every` needs a duration, like `@every 30s`"),
            ("@every soon", "`soon` is not a duration"),
            ("@bogus", "`@bogus` is not a known schedule (known: @hourly"),
            ("@daily 5", "not a known schedule"),
            ("", "the schedule is empty: a schedule is 5 fields"),
            (" \u{a0} ", "the schedule is empty"),
            ("*/5 * * * *\n", "control character"),
            ("*/5\t* * * *", "control character"),
            (&long, "longer than 256 bytes"),
        ]);
    }
}
