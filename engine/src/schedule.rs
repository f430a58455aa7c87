//! Schedules and retention, the time logic (issue 14, first part): pure functions of an injected
//! time — no clock is read here — so the controller and the simulator's year-long runs use the same
//! rules.
//!
//! - [`Cron`]: Velero's schedule syntax — five fields (minute hour day-of-month month
//!   day-of-week, with `*`, lists, ranges, `/steps` and month and day names), the descriptors
//!   `@yearly`/`@annually`, `@monthly`, `@weekly`, `@daily`/`@midnight`, `@hourly` and
//!   `@every <duration>`, an optional `CRON_TZ=<zone>` (or `TZ=`) prefix. Zones: `UTC`, fixed
//!   offsets (`+02:00`, `UTC-05:30`) and IANA names (`Europe/Berlin`, from the tz database bundled
//!   into the binary — nothing is read at run time, so the same schedule decides the same
//!   everywhere). Across daylight-saving changes a local time that does not exist (the hour
//!   skipped in spring) is due at the same wall-clock distance after the change (`02:30` → `03:30`),
//!   and a local time that occurs twice (the hour repeated in autumn) is due once, at its first
//!   occurrence — RFC 5545's (and Temporal's "compatible") reading of local times.
//!   Day-of-month and day-of-week combine as cron's do: when both are restricted, a day matching
//!   either is due.
//! - [`Cron::next_after`]: the first due instant strictly after a time.
//! - [`decide`]: on each look at a schedule, whether to start a backup now — **exactly one** when
//!   one or more due times passed since the last run (Velero's rule after downtime: never a
//!   burst), none while the previous backup still runs (skipped, reported) — and when to look next.
//! - [`retain`]: which backups of a schedule the rules keep (`keepLast`, `keepHourly`,
//!   `keepDaily`, `keepWeekly`, `keepMonthly`, K8up's and restic's meaning: for each of the last
//!   N periods that has a backup, its newest), in the schedule's zone.

use std::collections::BTreeSet;

/// Milliseconds per minute, hour, day.
const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;
/// How far [`Cron::next_after`] looks before it gives up (a spec like `0 0 30 2 *` never fires).
const SEARCH_DAYS_MAX: i64 = 366 * 8;

/// A schedule that does not parse, with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid schedule {spec:?}: {reason}")]
pub struct CronError {
    /// The schedule as given.
    pub spec: String,
    /// What is wrong.
    pub reason: String,
}

/// A parsed schedule; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    kind: Kind,
    zone: Zone,
}

/// The zone a schedule's fields are read in.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Zone {
    /// A fixed offset from UTC, in minutes.
    Fixed(i32),
    /// An IANA zone.
    Named(jiff::tz::TimeZone),
}

impl Zone {
    /// The offset from UTC at instant `ms`, in minutes.
    fn offset_min_at(&self, ms: i64) -> i32 {
        match self {
            Zone::Fixed(m) => *m,
            Zone::Named(tz) => match jiff::Timestamp::from_millisecond(ms) {
                Ok(t) => tz.to_offset(t).seconds() / 60,
                Err(_) => 0,
            },
        }
    }

    /// The instant a local wall time is due at (see the module docs), `None` outside jiff's range.
    fn instant_of(&self, local_ms: i64) -> Option<i64> {
        match self {
            Zone::Fixed(m) => Some(local_ms - i64::from(*m) * MINUTE_MS),
            Zone::Named(tz) => {
                let c = civil(local_ms, 0);
                let dt = jiff::civil::DateTime::new(
                    i16::try_from(c.year).ok()?,
                    c.month as i8,
                    c.day as i8,
                    c.hour as i8,
                    c.minute as i8,
                    0,
                    0,
                )
                .ok()?;
                // Compatible: a gap's time moves forward by the gap, a fold's is its earlier one.
                let t = tz.to_ambiguous_timestamp(dt).compatible().ok()?;
                Some(t.as_millisecond())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Fields { minutes: u64, hours: u32, doms: u32, months: u16, dows: u8, dom_star: bool, dow_star: bool },
    Every { ms: u64 },
}

/// A civil date and time (in some zone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    /// Year.
    pub year: i64,
    /// 1–12.
    pub month: u32,
    /// 1–31.
    pub day: u32,
    /// 0–23.
    pub hour: u32,
    /// 0–59.
    pub minute: u32,
    /// 0 (Sunday) – 6.
    pub weekday: u32,
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day number (Hinnant's `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The civil time of `ms` (since the epoch) at `offset_min` from UTC.
pub fn civil(ms: i64, offset_min: i32) -> Civil {
    let local = ms + i64::from(offset_min) * MINUTE_MS;
    let days = local.div_euclid(DAY_MS);
    let rem = local.rem_euclid(DAY_MS);
    let (year, month, day) = civil_from_days(days);
    Civil {
        year,
        month,
        day,
        hour: (rem / HOUR_MS) as u32,
        minute: ((rem % HOUR_MS) / MINUTE_MS) as u32,
        weekday: (days + 4).rem_euclid(7) as u32,
    }
}

const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// Parses one cron field into a bit set of the values in `lo..=hi`.
fn field(text: &str, lo: u32, hi: u32, names: &[&str], what: &str) -> Result<(u64, bool), String> {
    let value = |s: &str| -> Result<u32, String> {
        let l = s.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == l) {
            return Ok(i as u32 + lo);
        }
        let v: u32 = s.parse().map_err(|_| format!("{what} {s:?} is not a number"))?;
        // Day-of-week 7 is Sunday, as in cron.
        let v = if what == "day-of-week" && v == 7 { 0 } else { v };
        if v < lo || v > hi {
            return Err(format!("{what} {v} is outside {lo}-{hi}"));
        }
        Ok(v)
    };
    let mut bits = 0u64;
    let star = text == "*" || text == "?";
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s.parse().map_err(|_| format!("{what} step {s:?} is not a number"))?;
                if step == 0 {
                    return Err(format!("{what} step 0"));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (a, b) = if range == "*" || range == "?" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let a = value(range)?;
            (a, if part.contains('/') { hi } else { a })
        };
        if a > b {
            return Err(format!("{what} range {range:?} runs backwards"));
        }
        let mut v = a;
        while v <= b {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, star))
}

/// Parses a zone: `UTC`, `Z`, an offset `+HH:MM` / `-HHMM` / `UTC+HH[:MM]`, or an IANA name.
fn zone(z: &str) -> Result<Zone, String> {
    let rest = z.strip_prefix("UTC").or_else(|| z.strip_prefix("GMT")).unwrap_or(z);
    if rest.is_empty() || rest == "Z" {
        return Ok(Zone::Fixed(0));
    }
    let (sign, digits) = match rest.as_bytes().first() {
        Some(b'+') => (1, &rest[1..]),
        Some(b'-') => (-1, &rest[1..]),
        _ => {
            return match jiff::tz::TimeZoneDatabase::bundled().get(z) {
                Ok(tz) => Ok(Zone::Named(tz)),
                Err(_) => Err(format!(
                    "time zone {z:?} is not an IANA zone name (such as Europe/Berlin), UTC or an offset such as +02:00"
                )),
            }
        }
    };
    let digits: String = digits.chars().filter(|c| *c != ':').collect();
    let (h, m) = match digits.len() {
        1 | 2 => (digits.parse::<i32>().ok(), Some(0)),
        3 | 4 => {
            let (h, m) = digits.split_at(digits.len() - 2);
            (h.parse().ok(), m.parse().ok())
        }
        _ => (None, None),
    };
    match (h, m) {
        (Some(h), Some(m)) if h <= 14 && m < 60 => Ok(Zone::Fixed(sign * (h * 60 + m))),
        _ => Err(format!("time zone offset {z:?} is not ±HH:MM")),
    }
}

impl Cron {
    /// Parses a schedule (see the module docs).
    pub fn parse(spec: &str) -> Result<Cron, CronError> {
        let err = |reason: String| CronError { spec: spec.to_string(), reason };
        let mut text = spec.trim();
        let mut tz = Zone::Fixed(0);
        if let Some(rest) = text.strip_prefix("CRON_TZ=").or_else(|| text.strip_prefix("TZ=")) {
            let (z, after) =
                rest.split_once(char::is_whitespace).ok_or_else(|| err("nothing after the time zone".into()))?;
            tz = zone(z).map_err(err)?;
            text = after.trim();
        }
        let fields = match text {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            t if t.starts_with("@every ") => {
                let d = t["@every ".len()..].trim();
                let ms = crate::hooks::parse_go_duration_ms(d)
                    .ok_or_else(|| err(format!("@every {d:?}: not a duration such as 10s, 6h or 1h30m")))?;
                if ms < 1000 {
                    return Err(err(format!("@every {d}: the interval must be at least 1s")));
                }
                return Ok(Cron { kind: Kind::Every { ms }, zone: tz });
            }
            t if t.starts_with('@') => return Err(err(format!("unknown descriptor {t:?}"))),
            t => t,
        };
        let parts: Vec<&str> = fields.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(err(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), found {}",
                parts.len()
            )));
        }
        let (minutes, _) = field(parts[0], 0, 59, &[], "minute").map_err(err)?;
        let (hours, _) = field(parts[1], 0, 23, &[], "hour").map_err(err)?;
        let (doms, dom_star) = field(parts[2], 1, 31, &[], "day-of-month").map_err(err)?;
        let (months, _) = field(parts[3], 1, 12, &MONTHS, "month").map_err(err)?;
        let (dows, dow_star) = field(parts[4], 0, 7, &DAYS, "day-of-week").map_err(err)?;
        // Day-of-week 7 is Sunday.
        let dows = (dows | (dows >> 7)) & 0x7f;
        Ok(Cron {
            kind: Kind::Fields {
                minutes,
                hours: hours as u32,
                doms: doms as u32,
                months: months as u16,
                dows: dows as u8,
                dom_star,
                dow_star,
            },
            zone: tz,
        })
    }

    /// The zone's offset from UTC at instant `ms`, in minutes (retention's periods are local).
    pub fn offset_min_at(&self, ms: i64) -> i32 {
        self.zone.offset_min_at(ms)
    }

    /// The first due instant strictly after `after_ms` (for `@every`: counted from `after_ms`, the
    /// last run or the schedule's creation); `None` when the fields never match (`0 0 30 2 *`).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let (minutes, hours, doms, months, dows, dom_star, dow_star) = match self.kind {
            // `ms` is at most `DURATION_MS_MAX` (about 292 years): no wrap, and saturating anyway.
            Kind::Every { ms } => return Some(after_ms.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX))),
            Kind::Fields { minutes, hours, doms, months, dows, dom_star, dow_star } => {
                (minutes, hours, doms, months, dows, dom_star, dow_star)
            }
        };
        let off = i64::from(self.zone.offset_min_at(after_ms)) * MINUTE_MS;
        // Local minutes since the epoch, starting at the minute after `after_ms`.
        let mut local = (after_ms + off).div_euclid(MINUTE_MS) * MINUTE_MS + MINUTE_MS;
        let limit = local + SEARCH_DAYS_MAX * DAY_MS;
        while local < limit {
            let c = civil(local, 0);
            let day_start = local - local.rem_euclid(DAY_MS);
            if months & (1 << c.month) == 0 {
                // The first day of the next month.
                let (y, m) = if c.month == 12 { (c.year + 1, 1) } else { (c.year, c.month + 1) };
                local = days_from_civil(y, m, 1) * DAY_MS;
                continue;
            }
            let dom_ok = doms & (1 << c.day) != 0;
            let dow_ok = dows & (1 << c.weekday) != 0;
            let day_ok = if dom_star || dow_star { dom_ok && dow_ok } else { dom_ok || dow_ok };
            if !day_ok {
                local = day_start + DAY_MS;
                continue;
            }
            if hours & (1 << c.hour) == 0 {
                local = local - local.rem_euclid(HOUR_MS) + HOUR_MS;
                continue;
            }
            if minutes & (1 << c.minute) == 0 {
                local += MINUTE_MS;
                continue;
            }
            // A due local time; in a zone with changes it may lie in a fold before `after_ms`.
            match self.zone.instant_of(local) {
                Some(t) if t > after_ms => return Some(t),
                Some(_) => local += MINUTE_MS,
                None => return None,
            }
        }
        None
    }
}

/// What to do with a schedule now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Start a backup now.
    pub run: bool,
    /// A due time passed while the previous backup still ran: skipped (reported).
    pub skipped: bool,
    /// When the schedule is next due (look again then).
    pub next_run_ms: Option<i64>,
}

/// Decides for a schedule at `now_ms`: `last_ms` is when its last backup was started (or, before
/// the first, when the schedule was created), `running` whether that backup still runs, `paused`
/// whether the schedule is paused. One or more due times in `(last_ms, now_ms]` give exactly one
/// run now (never a burst after downtime), unless the previous backup still runs or the schedule
/// is paused.
pub fn decide(cron: &Cron, last_ms: i64, now_ms: i64, running: bool, paused: bool) -> Decision {
    let due = cron.next_after(last_ms).is_some_and(|t| t <= now_ms);
    let run = due && !running && !paused;
    let from = if run { now_ms } else { last_ms.max(now_ms) };
    let next = match cron.kind {
        // `@every`: the next interval counts from this run (or from the last one).
        Kind::Every { .. } if !run && !due => cron.next_after(last_ms),
        _ => cron.next_after(from),
    };
    Decision { run, skipped: due && running && !paused, next_run_ms: next }
}

/// How long a run this process started counts as running while the cache does not show it (the
/// caches lag behind the process's own writes by well under a second).
pub const REMEMBERED_GRACE_MS: i64 = 60_000;

/// Where a Backup of a schedule stands, for retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not in a terminal phase (new, queued, running, finalizing): never deleted by retention.
    Running,
    /// Ended `Completed` or `PartiallyFailed`: an archive a restore can use; what the rules count.
    Usable,
    /// Ended `Failed` or `FailedValidation`: no archive to restore. Never counted by the rules;
    /// deleted once a newer usable backup exists (superseded), kept before that as the record of
    /// why the runs fail (its TTL still collects it).
    Unusable,
}

impl Outcome {
    /// The outcome of a Backup in `phase` (Velero's phase names).
    pub fn of_phase(phase: &str) -> Outcome {
        match phase {
            "Completed" | "PartiallyFailed" => Outcome::Usable,
            "Failed" | "FailedValidation" => Outcome::Unusable,
            _ => Outcome::Running,
        }
    }
}

/// One Backup of a schedule, as the controller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledBackup {
    /// Its name.
    pub name: String,
    /// When the schedule started it: its creation (whole seconds from the API server).
    pub started_ms: i64,
    /// Whether it runs, ended usable or ended unusable.
    pub outcome: Outcome,
}

impl ScheduledBackup {
    /// Whether it reached a terminal phase.
    pub fn ended(&self) -> bool {
        self.outcome != Outcome::Running
    }
}

/// What one look at a schedule knows.
#[derive(Debug, Clone)]
pub struct ScheduleView<'a> {
    /// The schedule's name (its backups are named after it).
    pub name: &'a str,
    /// Its cron.
    pub cron: &'a Cron,
    /// Its retention rules.
    pub retention: &'a Retention,
    /// Paused.
    pub paused: bool,
    /// When the schedule was created.
    pub created_ms: i64,
    /// `status.lastBackup`, as stored.
    pub status_last_ms: Option<i64>,
    /// The last backup this process started for it (when, name): caches can lag behind it.
    pub remembered: Option<(i64, String)>,
    /// Its backups (not being deleted), as cached.
    pub backups: &'a [ScheduledBackup],
    /// Now.
    pub now_ms: i64,
}

/// What one look at a schedule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleStep {
    /// Start this backup now.
    pub start: Option<String>,
    /// A due run was skipped (the previous backup still runs).
    pub skipped: bool,
    /// When it is next due (none while paused).
    pub next_run_ms: Option<i64>,
    /// Backups retention deletes: usable ones its rules do not keep, and unusable ones older than
    /// the newest usable backup (see [`retention_victims`]).
    pub delete: Vec<String>,
    /// The remembered run is in the backups seen, or older than [`REMEMBERED_GRACE_MS`]: the
    /// caller forgets it (the cache knows it, or it is gone; its deletion must not look like a run
    /// still to appear).
    pub forget_remembered: bool,
}

/// One look at a schedule — the controller's reconcile and the simulator's year-long runs both
/// call it: running is any backup not ended, or the remembered one not yet seen; the last run is
/// the latest of the stored status, the remembered run, the newest backup seen and the
/// schedule's creation (a cache may show the Backup the controller made before the status patch
/// it made with it); [`decide`]; then [`retention_victims`] over the backups seen.
pub fn step(v: &ScheduleView<'_>) -> ScheduleStep {
    let seen = |n: &String| v.backups.iter().any(|b| &b.name == n);
    // A run this process started and the cache does not show yet is running — for a short while:
    // after that, its absence means it is gone (collected, deleted), not late.
    let unseen_recent =
        v.remembered.as_ref().is_some_and(|(t, n)| !seen(n) && v.now_ms.saturating_sub(*t) < REMEMBERED_GRACE_MS);
    let running = v.backups.iter().any(|b| !b.ended()) || unseen_recent;
    // The last run: the status says it, unless the cache holding the status is older than a
    // Backup it shows (the controller's own patch not seen yet), or than the run remembered.
    let mut newest_seen = v.backups.iter().map(|b| b.started_ms).max().unwrap_or(i64::MIN);
    if crate::mutation::active(crate::mutation::Mutation::ScheduleTrustsStaleStatus) {
        newest_seen = i64::MIN;
    }
    let mut last_ms = (v.status_last_ms.unwrap_or(v.created_ms))
        .max(v.remembered.as_ref().map_or(i64::MIN, |(t, _)| *t))
        .max(newest_seen);
    if crate::mutation::active(crate::mutation::Mutation::ScheduleForgetsLastRun) {
        last_ms = v.created_ms;
    }
    let d = decide(v.cron, last_ms, v.now_ms, running, v.paused);
    let delete = retention_victims(v.backups, v.retention, v.cron);
    ScheduleStep {
        start: d.run.then(|| backup_name(v.name, v.now_ms)),
        skipped: d.skipped,
        next_run_ms: d.next_run_ms.filter(|_| !v.paused),
        delete,
        forget_remembered: v.remembered.is_some() && !unseen_recent,
    }
}

/// The backups of a schedule that its retention deletes (sorted by name; none when no rule is set):
/// - the rules ([`retain`]) count **usable** backups only — a failed run is no backup to keep, so
///   N failed runs in a row never push the last good backup out of `keepLast: N`, and a running
///   one does not count before it has ended usable;
/// - the newest usable backup is always kept, whatever the rules say;
/// - a running backup is never deleted;
/// - an unusable backup is deleted once a newer usable one exists; before that it stays (the
///   record of why the runs fail) until its TTL.
pub fn retention_victims(backups: &[ScheduledBackup], retention: &Retention, cron: &Cron) -> Vec<String> {
    if !retention.is_set() {
        return Vec::new();
    }
    let counts_all = crate::mutation::active(crate::mutation::Mutation::RetentionCountsUnusable);
    let counted: Vec<(String, i64)> = backups
        .iter()
        .filter(|b| counts_all || b.outcome == Outcome::Usable)
        .map(|b| (b.name.clone(), b.started_ms))
        .collect();
    let mut keep = retain(&counted, retention, cron);
    let newest_usable = backups
        .iter()
        .filter(|b| b.outcome == Outcome::Usable)
        .max_by(|a, b| a.started_ms.cmp(&b.started_ms).then_with(|| a.name.cmp(&b.name)));
    if let Some(n) = newest_usable.filter(|_| !counts_all) {
        keep.insert(n.name.clone());
    }
    let superseded =
        |b: &ScheduledBackup| newest_usable.is_some_and(|n| (b.started_ms, &b.name) < (n.started_ms, &n.name));
    let mut delete: Vec<String> = backups
        .iter()
        .filter(|b| match b.outcome {
            Outcome::Running => false,
            Outcome::Usable => !keep.contains(&b.name),
            Outcome::Unusable if counts_all => !keep.contains(&b.name),
            Outcome::Unusable => superseded(b),
        })
        .map(|b| b.name.clone())
        .collect();
    delete.sort();
    delete
}

/// A Backup's `status.expiration`: its start (the request, as Velero's is the backup's start) plus
/// its TTL — never its completion — saturating, so no TTL wraps into the past.
pub fn expiration_ms(start_ms: u64, ttl_ms: u64) -> u64 {
    start_ms.saturating_add(ttl_ms)
}

/// Whether the garbage collector deletes a backup now: it has ended and its expiration (start +
/// ttl) has passed. The controller's collector and the simulator's year both ask this.
pub fn collectable(ended: bool, expiration_ms: Option<i64>, now_ms: i64) -> bool {
    ended && expiration_ms.is_some_and(|e| e <= now_ms)
}

/// Retention rules (K8up's names); `None` or 0: the rule keeps nothing by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// The newest N backups.
    pub keep_last: Option<u32>,
    /// The newest backup of each of the last N hours that have one.
    pub keep_hourly: Option<u32>,
    /// … days.
    pub keep_daily: Option<u32>,
    /// … ISO weeks (Monday to Sunday).
    pub keep_weekly: Option<u32>,
    /// … months.
    pub keep_monthly: Option<u32>,
}

impl Retention {
    /// Whether any rule is set (else retention leaves expiry to each backup's TTL).
    pub fn is_set(&self) -> bool {
        [self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly]
            .iter()
            .any(|k| k.is_some_and(|n| n > 0))
    }
}

/// The period a backup falls in, for one rule.
fn period(ms: i64, offset_min: i32, rule: usize) -> i64 {
    let c = civil(ms, offset_min);
    let days = days_from_civil(c.year, c.month, c.day);
    match rule {
        0 => days * 24 + i64::from(c.hour),
        1 => days,
        // ISO week: Monday-based.
        2 => (days - i64::from((c.weekday + 6) % 7)).div_euclid(7),
        _ => c.year * 12 + i64::from(c.month),
    }
}

/// The names of the backups `retention` keeps, of `backups` (name, start time); the rules' union.
/// Newest first within each rule; ties broken by name so the choice is deterministic.
pub fn retain(backups: &[(String, i64)], retention: &Retention, cron: &Cron) -> BTreeSet<String> {
    let mut sorted: Vec<&(String, i64)> = backups.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let mut keep = BTreeSet::new();
    if let Some(n) = retention.keep_last {
        let n = if crate::mutation::active(crate::mutation::Mutation::RetentionKeepsOneTooFew) {
            n.saturating_sub(1)
        } else {
            n
        };
        keep.extend(sorted.iter().take(n as usize).map(|(name, _)| name.clone()));
    }
    let rules = [retention.keep_hourly, retention.keep_daily, retention.keep_weekly, retention.keep_monthly];
    for (rule, n) in rules.iter().enumerate() {
        let Some(n) = n.filter(|n| *n > 0) else { continue };
        let mut seen = BTreeSet::new();
        for (name, t) in &sorted {
            if seen.len() as u32 >= n {
                break;
            }
            if seen.insert(period(*t, cron.offset_min_at(*t), rule)) {
                keep.insert(name.clone());
            }
        }
    }
    keep
}

/// Milliseconds since the epoch of an RFC 3339 UTC timestamp as the controller writes them
/// (`2026-12-02T12:33:15Z`, optionally with fractional seconds); `None` for anything else.
pub fn parse_utc_timestamp(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, mo, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, mi, sec) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let ms_frac = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(3).collect();
        if !frac.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        format!("{digits:0<3}").parse::<i64>().ok()?
    };
    Some(days_from_civil(y, mo as u32, day as u32) * DAY_MS + h * HOUR_MS + mi * MINUTE_MS + sec * 1000 + ms_frac)
}

/// The name of a scheduled backup started at `ms`: `<schedule>-<UTC yyyymmddhhmmss>`, as Velero
/// names them.
pub fn backup_name(schedule: &str, ms: i64) -> String {
    let c = civil(ms, 0);
    let secs = ms.div_euclid(1000).rem_euclid(60);
    format!("{schedule}-{:04}{:02}{:02}{:02}{:02}{secs:02}", c.year, c.month, c.day, c.hour, c.minute)
}

/// When the controller started `backup`, a Backup of `schedule`, on the controller's own clock:
/// the instant its name carries ([`backup_name`]), to the second. `None` for a name of another
/// form. The step compares it with `now_ms` and `lastBackup`, both on that clock — not with the
/// API server's `creationTimestamp`, which a skewed clock puts minutes or hours away.
pub fn started_ms_of_name(schedule: &str, backup: &str) -> Option<i64> {
    let t = backup.strip_prefix(schedule)?.strip_prefix('-')?;
    if t.len() != 14 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    parse_utc_timestamp(&format!("{}-{}-{}T{}:{}:{}Z", &t[..4], &t[4..6], &t[6..8], &t[8..10], &t[10..12], &t[12..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scheduled_backup_names_its_start_on_the_controllers_clock() {
        let ms = at(2026, 12, 5, 3, 0) + 7_250;
        assert_eq!(started_ms_of_name("nightly", &backup_name("nightly", ms)), Some(ms - 250));
        assert_eq!(started_ms_of_name("nightly", "nightly-2026120503000"), None, "13 digits");
        assert_eq!(started_ms_of_name("nightly", "other-20261205030000"), None);
        assert_eq!(started_ms_of_name("nightly", "nightly-2026120503000x"), None);
        // Why it matters: a step that took the API server's creationTimestamp, two minutes ahead
        // of the controller's clock, would find a 5-minute schedule not due when it is.
        let cron = Cron::parse("@every 5m").unwrap();
        let (last, now) = (at(2026, 12, 5, 3, 0), at(2026, 12, 5, 3, 5));
        let view = |started_ms| {
            let backups = vec![ScheduledBackup { name: backup_name("s", last), started_ms, outcome: Outcome::Usable }];
            step(&ScheduleView {
                name: "s",
                cron: &cron,
                retention: &Retention::default(),
                paused: false,
                created_ms: last - 3_600_000,
                status_last_ms: Some(last),
                remembered: None,
                backups: &backups,
                now_ms: now,
            })
        };
        assert!(view(started_ms_of_name("s", &backup_name("s", last)).unwrap()).start.is_some());
        assert!(view(last + 120_000).start.is_none(), "the skewed creationTimestamp delays the run");
    }

    /// Milliseconds of a UTC civil time.
    fn at(y: i64, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
        days_from_civil(y, mo, d) * DAY_MS + i64::from(h) * HOUR_MS + i64::from(mi) * MINUTE_MS
    }

    #[test]
    fn civil_dates_round_trip_and_know_their_weekday() {
        for z in [-800_000, -1, 0, 1, 18_000, 19_000, 60_000, 2_000_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil(at(2026, 12, 2, 11, 31), 0).weekday, 3, "2026-12-02 is a Wednesday");
        assert_eq!(
            civil(at(2024, 2, 29, 0, 0), 0),
            Civil { year: 2024, month: 2, day: 29, hour: 0, minute: 0, weekday: 4 }
        );
        assert_eq!(civil(at(2026, 1, 1, 0, 30), -60).day, 31, "an hour behind UTC it is still December 31");
    }

    #[test]
    fn fields_descriptors_and_zones() {
        let next = |s: &str, t: i64| Cron::parse(s).unwrap().next_after(t).unwrap();
        let t = at(2026, 12, 2, 11, 31);
        assert_eq!(next("*/15 * * * *", t), at(2026, 12, 2, 11, 45));
        assert_eq!(next("0 3 * * *", t), at(2026, 12, 3, 3, 0));
        assert_eq!(next("@daily", t), at(2026, 12, 3, 0, 0));
        assert_eq!(next("@hourly", t), at(2026, 12, 2, 12, 0));
        assert_eq!(next("@weekly", t), at(2026, 12, 6, 0, 0), "the next Sunday");
        assert_eq!(next("@monthly", t), at(2027, 1, 1, 0, 0));
        assert_eq!(next("@yearly", t), at(2027, 1, 1, 0, 0));
        assert_eq!(next("30 2 * * mon-fri", t), at(2026, 12, 3, 2, 30));
        assert_eq!(next("0 0 29 feb *", t), at(2028, 2, 29, 0, 0));
        assert_eq!(next("0 0 * * 7", t), at(2026, 12, 6, 0, 0), "7 is Sunday");
        // Both day fields restricted: either matches (the 13th, or a Friday).
        assert_eq!(next("0 0 13 * 5", t), at(2026, 12, 4, 0, 0));
        // Strictly after: a due time equal to `after` is not due again.
        assert_eq!(next("0 3 * * *", at(2026, 12, 3, 3, 0)), at(2026, 12, 4, 3, 0));
        // 03:00 at +02:00 is 01:00 UTC.
        assert_eq!(next("CRON_TZ=+02:00 0 3 * * *", t), at(2026, 12, 3, 1, 0));
        assert_eq!(next("TZ=UTC-05:30 0 0 * * *", t), at(2026, 12, 3, 5, 30), "local midnight is 05:30 UTC");
        assert_eq!(next("@every 6h", t), t + 6 * HOUR_MS);
        assert_eq!(Cron::parse("0 0 30 2 *").unwrap().next_after(t), None);
    }

    /// `next_after` against a minute-by-minute scan that reads the fields directly.
    #[test]
    fn next_after_agrees_with_a_minute_by_minute_scan() {
        let specs = [
            ("*/7 1-3 * * *", vec![7u32, 14], vec![1, 2, 3], None, None, None),
            ("5 0 1,15 * *", vec![5], vec![0], Some(vec![1, 15]), None, None),
            ("0 12 * * sat,sun", vec![0], vec![12], None, None, Some(vec![0, 6])),
            ("30 6 10 * 1", vec![30], vec![6], Some(vec![10]), None, Some(vec![1])),
            ("0 0 * 3 *", vec![0], vec![0], None, Some(vec![3]), None),
        ];
        for (spec, mins, hours, doms, months, dows) in specs {
            let cron = Cron::parse(spec).unwrap();
            let matches = |t: i64| {
                let c = civil(t, 0);
                let min_ok =
                    if spec.starts_with("*/7") { c.minute.is_multiple_of(7) } else { mins.contains(&c.minute) };
                let dom_ok = doms.as_ref().is_none_or(|d| d.contains(&c.day));
                let dow_ok = dows.as_ref().is_none_or(|d| d.contains(&c.weekday));
                let day_ok = if doms.is_some() && dows.is_some() { dom_ok || dow_ok } else { dom_ok && dow_ok };
                min_ok && hours.contains(&c.hour) && months.as_ref().is_none_or(|m| m.contains(&c.month)) && day_ok
            };
            for start in [at(2026, 12, 2, 11, 31), at(2027, 2, 27, 23, 59), at(2028, 12, 31, 12, 0)] {
                let mut t = start - start.rem_euclid(MINUTE_MS) + MINUTE_MS;
                while !matches(t) {
                    t += MINUTE_MS;
                }
                assert_eq!(cron.next_after(start), Some(t), "{spec} after {start}");
            }
        }
    }

    #[test]
    fn bad_schedules_name_what_is_wrong() {
        for (spec, says) in [
            ("* * * *", "expected 5 fields"),
            ("61 * * * *", "minute 61 is outside 0-59"),
            ("* * * foo *", "month \"foo\""),
            ("*/0 * * * *", "step 0"),
            ("5-1 * * * *", "runs backwards"),
            ("@often", "unknown descriptor"),
            ("@every 10ms", "at least 1s"),
            ("@every soon", "@every"),
            ("CRON_TZ=Mars/Olympus_Mons 0 3 * * *", "not an IANA zone name"),
            ("CRON_TZ=+25:00 0 3 * * *", "not ±HH:MM"),
        ] {
            let e = Cron::parse(spec).unwrap_err().to_string();
            assert!(e.contains(says), "{spec}: {e}");
        }
    }

    #[test]
    fn missed_runs_give_one_backup_never_a_burst_and_a_running_one_skips() {
        let cron = Cron::parse("0 * * * *").unwrap();
        let last = at(2026, 12, 1, 0, 0);
        // Down for a day: 24 due times passed, one run now.
        let now = at(2026, 12, 2, 0, 30);
        let d = decide(&cron, last, now, false, false);
        assert_eq!(d, Decision { run: true, skipped: false, next_run_ms: Some(at(2026, 12, 2, 1, 0)) });
        // Right after that run, nothing is due until the next hour.
        assert!(!decide(&cron, now, now + MINUTE_MS, false, false).run);
        // The previous backup still runs: skipped, reported.
        let d = decide(&cron, last, now, true, false);
        assert!(!d.run && d.skipped);
        // Paused: nothing, and nothing skipped.
        let d = decide(&cron, last, now, false, true);
        assert!(!d.run && !d.skipped);
        // Not yet due.
        let d = decide(&cron, last, last + 30 * MINUTE_MS, false, false);
        assert_eq!(d, Decision { run: false, skipped: false, next_run_ms: Some(at(2026, 12, 1, 1, 0)) });
        // @every counts from the last run.
        let every = Cron::parse("@every 10s").unwrap();
        assert!(!decide(&every, 0, 9_999, false, false).run);
        let d = decide(&every, 0, 35_000, false, false);
        assert_eq!((d.run, d.next_run_ms), (true, Some(45_000)));
    }

    #[test]
    fn retention_keeps_the_newest_of_each_period_and_the_rules_union() {
        // One backup every 6 hours for 40 days, from 2026-01-01.
        let start = at(2026, 1, 1, 0, 0);
        let backups: Vec<(String, i64)> =
            (0..160).map(|i| (backup_name("s", start + i * 6 * HOUR_MS), start + i * 6 * HOUR_MS)).collect();
        let utc = Cron::parse("@daily").unwrap();
        let keep = |r: Retention| retain(&backups, &r, &utc);
        let last3 = keep(Retention { keep_last: Some(3), ..Retention::default() });
        assert_eq!(last3.len(), 3);
        assert!(last3.contains(&backups[159].0) && last3.contains(&backups[157].0));
        // Daily 7: the 18:00 backup of each of the last 7 days.
        let daily = keep(Retention { keep_daily: Some(7), ..Retention::default() });
        assert_eq!(daily.len(), 7);
        assert!(daily.iter().all(|n| n.ends_with("180000")), "{daily:?}");
        // Weekly 2: the newest of this ISO week and of the one before.
        let weekly = keep(Retention { keep_weekly: Some(2), ..Retention::default() });
        assert_eq!(weekly.len(), 2);
        assert!(weekly.contains(&backups[159].0));
        assert!(weekly.contains("s-20260208180000"), "Sunday Feb 8 ends the week before: {weekly:?}");
        // Monthly 12 with only two months of backups: the newest of each.
        let monthly = keep(Retention { keep_monthly: Some(12), ..Retention::default() });
        assert_eq!(monthly, BTreeSet::from(["s-20260131180000".to_string(), backups[159].0.clone()]));
        // The union of rules.
        let both = keep(Retention { keep_last: Some(3), keep_daily: Some(7), ..Retention::default() });
        assert_eq!(both, last3.union(&daily).cloned().collect());
        assert!(keep(Retention::default()).is_empty() && !Retention::default().is_set());
        // In a zone two hours ahead, 22:00 UTC is already the next day.
        let late = vec![("a".to_string(), at(2026, 3, 1, 21, 0)), ("b".to_string(), at(2026, 3, 1, 23, 0))];
        let r = Retention { keep_daily: Some(2), ..Retention::default() };
        assert_eq!(retain(&late, &r, &utc).len(), 1);
        assert_eq!(retain(&late, &r, &Cron::parse("CRON_TZ=+02:00 @daily").unwrap()).len(), 2);
        // In Europe/Berlin, 23:30 UTC is the next day in summer (+2) and in winter (+1).
        let berlin = Cron::parse("CRON_TZ=Europe/Berlin @daily").unwrap();
        let pair = |y, m, d| vec![("a".to_string(), at(y, m, d, 22, 10)), ("b".to_string(), at(y, m, d, 23, 30))];
        assert_eq!(retain(&pair(2026, 7, 1), &r, &berlin).len(), 1, "summer: both on the next day");
        assert_eq!(retain(&pair(2026, 12, 1), &r, &berlin).len(), 2, "winter: 23:10 and 00:30");
    }

    /// Issue 21, defect 1: failed and running backups are not counted by the rules.
    #[test]
    fn retention_counts_only_usable_backups_and_keeps_the_newest_one() {
        let utc = Cron::parse("@hourly").unwrap();
        let b = |i: i64, outcome| ScheduledBackup { name: format!("s-{i:02}"), started_ms: i * HOUR_MS, outcome };
        let last = |n| Retention { keep_last: Some(n), ..Retention::default() };
        // keepLast 2: two good backups, then three failed runs in a row: both good ones stay, the
        // failures stay too (nothing newer is usable).
        let set = [
            b(1, Outcome::Usable),
            b(2, Outcome::Usable),
            b(3, Outcome::Unusable),
            b(4, Outcome::Unusable),
            b(5, Outcome::Unusable),
        ];
        assert_eq!(retention_victims(&set, &last(2), &utc), Vec::<String>::new());
        // keepLast 1: the last Completed backup stays while the next one runs.
        let set = [b(1, Outcome::Usable), b(2, Outcome::Usable), b(3, Outcome::Running)];
        assert_eq!(retention_victims(&set, &last(1), &utc), vec!["s-01".to_string()]);
        // A usable run after failures: the failures before it are superseded, the older good one
        // beyond keepLast goes, a failure after it stays.
        let set = [
            b(1, Outcome::Usable),
            b(2, Outcome::Unusable),
            b(3, Outcome::Usable),
            b(4, Outcome::Unusable),
            b(5, Outcome::Running),
        ];
        assert_eq!(retention_victims(&set, &last(1), &utc), vec!["s-01".to_string(), "s-02".to_string()]);
        // Period rules too: daily 1 over usable backups only keeps the newest usable one, even
        // when a later failure is in the same day.
        let daily = Retention { keep_daily: Some(1), ..Retention::default() };
        let set = [b(1, Outcome::Usable), b(2, Outcome::Usable), b(3, Outcome::Unusable)];
        assert_eq!(retention_victims(&set, &daily, &utc), vec!["s-01".to_string()]);
        // No rule: retention deletes nothing (the TTL decides).
        assert!(retention_victims(&set, &Retention::default(), &utc).is_empty());
        assert_eq!(Outcome::of_phase("PartiallyFailed"), Outcome::Usable);
        assert_eq!(Outcome::of_phase("FailedValidation"), Outcome::Unusable);
        assert_eq!(Outcome::of_phase("WaitingForSnapshots"), Outcome::Running);
    }

    #[test]
    fn iana_zones_follow_daylight_saving_time() {
        let next = |s: &str, t: i64| Cron::parse(s).unwrap().next_after(t).unwrap();
        // 03:00 in Berlin: 02:00 UTC in winter, 01:00 UTC in summer.
        assert_eq!(next("CRON_TZ=Europe/Berlin 0 3 * * *", at(2026, 12, 2, 12, 0)), at(2026, 12, 3, 2, 0));
        assert_eq!(next("CRON_TZ=Europe/Berlin 0 3 * * *", at(2026, 7, 2, 12, 0)), at(2026, 7, 3, 1, 0));
        assert_eq!(next("TZ=Asia/Kolkata 0 0 * * *", at(2026, 12, 2, 12, 0)), at(2026, 12, 2, 18, 30));
        // New York springs forward on 2027-03-14 at 02:00 (EST, -5) to 03:00 (EDT, -4): 02:30 does
        // not exist that day and is due an hour of wall clock later, 03:30 EDT.
        let ny_230 = "CRON_TZ=America/New_York 30 2 * * *";
        assert_eq!(next(ny_230, at(2027, 3, 13, 12, 0)), at(2027, 3, 14, 7, 30));
        assert_eq!(next(ny_230, at(2027, 3, 14, 7, 30)), at(2027, 3, 15, 6, 30), "then 02:30 EDT again");
        // Hourly across the gap: 01:00 EST, then 03:00 EDT (the 02:00 that never was), 04:00 EDT.
        let hourly = "CRON_TZ=America/New_York 0 * * * *";
        assert_eq!(next(hourly, at(2027, 3, 14, 6, 0)), at(2027, 3, 14, 7, 0));
        assert_eq!(next(hourly, at(2027, 3, 14, 7, 0)), at(2027, 3, 14, 8, 0));
        // Falls back on 2026-11-01 at 02:00 EDT to 01:00 EST: 01:30 happens twice, due once, first.
        let ny_130 = "CRON_TZ=America/New_York 30 1 * * *";
        assert_eq!(next(ny_130, at(2026, 10, 31, 12, 0)), at(2026, 11, 1, 5, 30));
        assert_eq!(next(ny_130, at(2026, 11, 1, 5, 30)), at(2026, 11, 2, 6, 30), "not again at 06:30 UTC");
        let half = "CRON_TZ=America/New_York 30 * * * *";
        assert_eq!(next(half, at(2026, 11, 1, 5, 30)), at(2026, 11, 1, 7, 30), "02:30 EST follows the first 01:30");
        // From inside the repeated hour (01:10 EST, the second time): nothing until 02:30 EST.
        assert_eq!(next(half, at(2026, 11, 1, 6, 10)), at(2026, 11, 1, 7, 30));
    }

    #[test]
    fn utc_timestamps_parse_back() {
        assert_eq!(parse_utc_timestamp("2026-12-02T03:00:07Z"), Some(at(2026, 12, 2, 3, 0) + 7_000));
        assert_eq!(parse_utc_timestamp("2026-12-02T03:00:07.25Z"), Some(at(2026, 12, 2, 3, 0) + 7_250));
        for bad in ["2026-12-02T03:00:07", "2026-13-02T03:00:07Z", "yesterday", "2026-12-02T03:00:07.x5Z", ""] {
            assert_eq!(parse_utc_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn scheduled_backups_are_named_by_their_utc_start() {
        assert_eq!(backup_name("nightly", at(2026, 12, 2, 3, 0) + 7_000), "nightly-20261202030007");
    }
}
