//! A year of schedules in seconds (issue 14): the controller's own schedule step
//! (`blockwise_engine::schedule::step`, which `serve/schedules.rs` calls on every reconcile) and
//! its TTL garbage collection, driven over 365 virtual days with controller restarts (its memory
//! lost, down for minutes to days) and clock jumps (hours passing at once), and judged.
//!
//! The world: schedules (generated crons, retention rules, ttls), backups that take minutes or —
//! sometimes — longer than the schedule's interval, a controller that looks at a schedule at its
//! next run, when one of its backups ends and when it starts, and collects garbage hourly. The
//! judges read the world's record of starts, ends and deletions, with an independent retention
//! (periods counted from the epoch by plain division; months by walking the calendar) — never the
//! step's own decisions:
//! - **Y1** no burst: between two starts of a schedule lies a due time.
//! - **Y2** never two at once: a schedule's backup starts only after its previous one ended.
//! - **Y3** nothing missed: after each start, the next start is at the first instant the controller
//!   was up at or after both the next due time and the end of that backup.
//! - **Y4** retention deletes only ended backups its rules do not keep, and at the end every ended
//!   backup left is kept by the rules over what is left.
//! - **Y5** nothing expired (start + ttl, the judge's own sum) survives a garbage-collection
//!   pass; **C5** (was Y6) nothing unexpired or running is deleted by one — the GC reads the
//!   expiration the controller's `expiration_ms` computed, as it reads `status.expiration`.
//! - **Y7** a skip is reported only when a due time came while the schedule's backup ran.
//! - **C1** retention counts only usable backups (Completed, PartiallyFailed): it never deletes a
//!   running backup, nor the newest usable one, nor a failed one that no usable backup
//!   supersedes. Runs fail — alone (a Fail-mode hook, at a per-seed rate) and in streaks (store
//!   outages of hours to days) — so `keepLast: N` meets N failures in a row.
//!
//! The controller's caches are modelled where they lag: right after a start, the created
//! Backup's watch event makes a look within a second, which may still read the status from
//! before the patch (`lastBackup` is stored to whole seconds, as are Backups' creation times).

use std::collections::{BTreeMap, BTreeSet};

use blockwise_engine::schedule::{
    collectable, expiration_ms, step, Cron, Outcome, Retention, ScheduleView, ScheduledBackup,
};

use crate::check::Violation;
use crate::rng::{mix64, Rng};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;
/// 2026-01-01T00:00:00Z.
const START: i64 = 1_767_225_600_000;
const YEAR: i64 = 365 * DAY;
const GC_INTERVAL: i64 = HOUR;

const CRONS: &[&str] = &[
    "@every 1h",
    "@every 6h",
    "*/30 * * * *",
    "0 */4 * * *",
    "15 3 * * *",
    "0 2 * * 1-5",
    "@weekly",
    "@daily",
    "CRON_TZ=+05:30 0 1 * * *",
    "CRON_TZ=America/New_York 30 1 * * *",
    "CRON_TZ=Europe/Berlin 30 2 * * *",
    "0 0 1 * *",
];

#[derive(Debug, Clone)]
struct Sched {
    name: String,
    spec: &'static str,
    cron: Cron,
    retention: Retention,
    ttl: i64,
    /// `status.lastBackup` (persistent; whole seconds, as RFC 3339 stores it).
    status_last: Option<i64>,
    /// The value before the last patch, and when the patch reaches the controller's cache: a
    /// look before then reads the old value (a stale cache, as after the controller's own write).
    status_before: Option<i64>,
    status_cached_at: i64,
}

#[derive(Debug, Clone)]
struct Bk {
    started: i64,
    ends: i64,
    /// `status.expiration` as the controller computes it (`expiration_ms`); the judges use
    /// `started + ttl`, their own.
    expires: i64,
    ttl: i64,
    deleted: Option<i64>,
    /// It ends Completed or PartiallyFailed (else Failed: a store outage, a Fail-mode hook).
    usable: bool,
}

/// What a year of schedules did.
#[derive(Debug, Clone, Default)]
pub struct YearReport {
    /// Broken invariants.
    pub violations: Vec<Violation>,
    /// Backups started.
    pub runs: u64,
    /// Due runs skipped while a backup ran.
    pub skipped: u64,
    /// Looks at a schedule right after it started a backup (the created Backup's watch event),
    /// while the cache may not show the status patch yet.
    pub early_looks: u64,
    /// Controller restarts.
    pub restarts: u32,
    /// Clock jumps.
    pub jumps: u32,
    /// Backups deleted by retention.
    pub retention_deleted: u64,
    /// Backups deleted by the garbage collector.
    pub expired: u64,
    /// Backups that ended Failed (no archive).
    pub failed: u64,
    /// Retention looks that saw failed runs newer than the newest usable backup (a failure
    /// streak that `keepLast` must not let push the good backups out).
    pub failure_streak_looks: u64,
}

/// The judge's own period of a time for a rule (0 hour, 1 day, 2 ISO week, 3 month).
fn judge_period(ms: i64, offset_min: i32, rule: usize) -> i64 {
    let local = ms + i64::from(offset_min) * MINUTE;
    let day = local.div_euclid(DAY);
    match rule {
        0 => local.div_euclid(HOUR),
        1 => day,
        // 1970-01-01 was a Thursday: Monday-based weeks start 3 days before it.
        2 => (day + 3).div_euclid(7),
        _ => {
            // Walk the calendar from 1970.
            let (mut y, mut d) = (1970i64, day);
            loop {
                let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
                let len = if leap { 366 } else { 365 };
                if d < len {
                    let months = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
                    let mut m = 0;
                    while d >= months[m] {
                        d -= months[m];
                        m += 1;
                    }
                    return y * 12 + m as i64;
                }
                d -= len;
                y += 1;
            }
        }
    }
}

/// The judge's retention: the names kept of `set` (name, start).
/// `offset_min_at` is the zone's offset at an instant (the tz database's, for an IANA zone).
fn judge_keep(set: &[(String, i64)], r: &Retention, offset_min_at: impl Fn(i64) -> i32) -> BTreeSet<String> {
    let mut sorted = set.to_vec();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let mut keep: BTreeSet<String> =
        sorted.iter().take(r.keep_last.unwrap_or(0) as usize).map(|(n, _)| n.clone()).collect();
    for (rule, n) in [r.keep_hourly, r.keep_daily, r.keep_weekly, r.keep_monthly].into_iter().enumerate() {
        let n = n.unwrap_or(0) as usize;
        let mut periods = Vec::new();
        for (name, t) in &sorted {
            let p = judge_period(*t, offset_min_at(*t), rule);
            if periods.len() < n && !periods.contains(&p) {
                periods.push(p);
                keep.insert(name.clone());
            }
        }
    }
    keep
}

/// The newest usable backup of `set` (name, start, usable), by start then name.
fn judge_newest_usable(set: &[(String, i64, bool)]) -> Option<&(String, i64, bool)> {
    set.iter().filter(|b| b.2).max_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)))
}

/// Runs one seed's year.
pub fn simulate_year(seed: u64) -> YearReport {
    let mut rng = Rng::new(mix64(seed ^ 0x7ea2));
    let mut report = YearReport::default();
    let v = |inv: &'static str, detail: String| Violation { invariant: inv, detail };
    let count = 1 + rng.below(3) as usize;
    let mut scheds: Vec<Sched> = Vec::new();
    for i in 0..count {
        {
            let spec = *rng.pick(CRONS).unwrap_or(&"@daily");
            let opt = |rng: &mut Rng, hi: u64| rng.chance(0.5).then(|| rng.range(1, hi) as u32);
            let retention = Retention {
                keep_last: opt(&mut rng, 6),
                keep_hourly: if rng.chance(0.2) { Some(rng.range(1, 12) as u32) } else { None },
                keep_daily: opt(&mut rng, 10),
                keep_weekly: opt(&mut rng, 6),
                keep_monthly: opt(&mut rng, 12),
            };
            let ttl = *rng.pick(&[HOUR, 30 * HOUR, 7 * DAY, 30 * DAY, 720 * HOUR]).unwrap_or(&(720 * HOUR));
            let cron = match Cron::parse(spec) {
                Ok(c) => c,
                Err(e) => {
                    report.violations.push(v("R1", format!("a generated schedule does not parse: {e}")));
                    return report;
                }
            };
            scheds.push(Sched {
                name: format!("s{i}"),
                spec,
                cron,
                retention,
                ttl,
                status_last: None,
                status_before: None,
                status_cached_at: i64::MIN,
            });
        }
    }
    // Store outages: days on which every run of the affected schedules fails (a failure streak),
    // beside single failed runs (a Fail-mode hook) at `fail_chance`.
    let mut outages: Vec<(i64, i64)> = Vec::new();
    let mut t = START;
    loop {
        t += rng.range(5, 60) as i64 * DAY;
        if t >= START + YEAR {
            break;
        }
        let len = rng.range(2, 72) as i64 * HOUR;
        outages.push((t, t + len));
        t += len;
    }
    let fail_chance = *rng.pick(&[0.0, 0.05, 0.2, 0.5]).unwrap_or(&0.05);
    // Downtimes and jumps: gaps in which the controller does nothing.
    let mut gaps: Vec<(i64, i64, bool)> = Vec::new(); // (from, to, is_restart)
    let mut t = START;
    loop {
        t += rng.range(1, 60) as i64 * DAY / 2;
        if t >= START + YEAR {
            break;
        }
        let restart = rng.chance(0.6);
        let len = if restart { rng.range(1, 48 * 60) as i64 * MINUTE } else { rng.range(1, 6 * 60) as i64 * MINUTE };
        gaps.push((t, t + len, restart));
        t += len;
    }
    // A gap that starts at an instant takes it: the controller is down (or the clock jumped) then.
    let first_up = |x: i64| gaps.iter().find(|(a, b, _)| x >= *a && x < *b).map_or(x, |(_, b, _)| *b);
    let mut backups: BTreeMap<String, Bk> = BTreeMap::new();
    // Indexes: the backups not deleted, per schedule; the ends still to come.
    let mut live: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    let mut pending_ends: BTreeSet<(i64, usize)> = BTreeSet::new();
    let mut last_look: BTreeMap<usize, i64> = BTreeMap::new();
    let mut remembered: BTreeMap<usize, (i64, String)> = BTreeMap::new();
    let mut next_look: BTreeMap<usize, i64> = (0..scheds.len()).map(|i| (i, START)).collect();
    let mut last_gc = START;
    // The last pass that ran (a gap's end schedules one at once, without running it).
    let mut gc_done = i64::MIN;
    let mut now = START;
    let mut gap_i = 0;
    let mut starts: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut skips: Vec<(usize, i64)> = Vec::new();
    let mut early_looks: BTreeMap<usize, std::collections::VecDeque<i64>> = BTreeMap::new();
    while now < START + YEAR {
        // The next event: a look, a backup end, a GC pass, a gap.
        let look_t = next_look.values().copied().min().unwrap_or(i64::MAX);
        let end_t = pending_ends.first().map_or(i64::MAX, |(t, _)| *t);
        let gc_t = last_gc + GC_INTERVAL;
        let gap_t = gaps.get(gap_i).map_or(i64::MAX, |g| g.0);
        let t = look_t.min(end_t).min(gc_t).min(gap_t).max(now);
        now = t;
        if t == gap_t {
            let (_, to, restart) = gaps[gap_i];
            gap_i += 1;
            now = to;
            if restart {
                report.restarts += 1;
                remembered.clear();
                early_looks.clear();
            } else {
                report.jumps += 1;
            }
            // A (re)started or jumped controller looks at everything at once.
            for l in next_look.values_mut() {
                *l = now;
            }
            last_gc = now - GC_INTERVAL;
            // Backups that ended during the gap are seen at the looks that follow.
            while pending_ends.first().is_some_and(|(e, _)| *e <= now) {
                pending_ends.pop_first();
            }
            continue;
        }
        // Backups that ended by now: their schedules are looked at (their Backup changed).
        while let Some(&(e, i)) = pending_ends.first() {
            if e > t {
                break;
            }
            pending_ends.pop_first();
            next_look.insert(i, t);
        }
        if t == gc_t {
            last_gc = t;
            gc_done = t;
            for (i, names) in live.iter_mut() {
                let gone: Vec<String> = names
                    .iter()
                    .filter(|n| {
                        let b = &backups[*n];
                        collectable(b.ends <= t, Some(b.expires), t)
                    })
                    .cloned()
                    .collect();
                for name in gone {
                    let Some(b) = backups.get_mut(&name) else { continue };
                    if b.started + b.ttl > t || b.ends > t {
                        report.violations.push(v(
                            "C5",
                            format!("{name} (schedule s{i}) deleted by the GC at {t} before it expired or ended"),
                        ));
                    }
                    b.deleted = Some(t);
                    names.remove(&name);
                    report.expired += 1;
                }
            }
        }
        let due: Vec<usize> = next_look.iter().filter(|(_, l)| **l <= t).map(|(i, _)| *i).collect();
        for i in due {
            let s = &scheds[i];
            last_look.insert(i, t);
            let seen: Vec<ScheduledBackup> = live
                .get(&i)
                .into_iter()
                .flatten()
                .map(|n| {
                    let b = &backups[n];
                    ScheduledBackup {
                        name: n.clone(),
                        // Its creationTimestamp: whole seconds.
                        started_ms: b.started - b.started.rem_euclid(1000),
                        outcome: match (b.ends <= t, b.usable) {
                            (false, _) => Outcome::Running,
                            (true, true) => Outcome::Usable,
                            (true, false) => Outcome::Unusable,
                        },
                    }
                })
                .collect();
            let status_seen = if t >= s.status_cached_at { s.status_last } else { s.status_before };
            let view = ScheduleView {
                name: &s.name,
                cron: &s.cron,
                retention: &s.retention,
                paused: false,
                created_ms: START,
                status_last_ms: status_seen,
                remembered: remembered.get(&i).cloned(),
                backups: &seen,
                now_ms: t,
            };
            let plan = step(&view);
            if plan.forget_remembered {
                remembered.remove(&i);
            }
            if plan.skipped {
                report.skipped += 1;
                skips.push((i, t));
            }
            // Retention deletions, judged against the set the step saw, from the world's record of
            // which runs ended and how.
            let set: Vec<(String, i64, bool)> = live
                .get(&i)
                .into_iter()
                .flatten()
                .filter(|n| backups[*n].ends <= t)
                .map(|n| (n.clone(), backups[n].started - backups[n].started.rem_euclid(1000), backups[n].usable))
                .collect();
            let usable: Vec<(String, i64)> = set.iter().filter(|b| b.2).map(|b| (b.0.clone(), b.1)).collect();
            let keep = judge_keep(&usable, &s.retention, |t| s.cron.offset_min_at(t));
            let newest = judge_newest_usable(&set).cloned();
            if set.iter().any(|b| !b.2 && newest.as_ref().is_none_or(|n| b.1 > n.1)) && s.retention.is_set() {
                report.failure_streak_looks += 1;
            }
            for victim in &plan.delete {
                let Some(b) = set.iter().find(|b| &b.0 == victim) else {
                    report
                        .violations
                        .push(v("C1", format!("schedule {} ({}) deleted {victim}, which still ran", s.name, s.spec)));
                    continue;
                };
                if newest.as_ref().is_some_and(|n| &n.0 == victim) {
                    report.violations.push(v(
                        "C1",
                        format!("schedule {} ({}) deleted {victim}, its newest usable backup", s.name, s.spec),
                    ));
                } else if b.2 && keep.contains(victim) {
                    report.violations.push(v(
                        "Y4",
                        format!("schedule {} ({}) deleted {victim}, which its rules keep", s.name, s.spec),
                    ));
                } else if !b.2 && newest.as_ref().is_none_or(|n| b.1 > n.1) {
                    report.violations.push(v(
                        "C1",
                        format!(
                            "schedule {} ({}) deleted the failed {victim}, which no usable backup supersedes",
                            s.name, s.spec
                        ),
                    ));
                }
                if let Some(b) = backups.get_mut(victim) {
                    b.deleted = Some(t);
                    report.retention_deleted += 1;
                }
                if let Some(l) = live.get_mut(&i) {
                    l.remove(victim);
                }
            }
            if let Some(name) = plan.start {
                if !backups.contains_key(&name) {
                    let long = rng.chance(0.03);
                    let dur = if long { rng.range(1, 30) as i64 * HOUR } else { rng.range(1, 20) as i64 * MINUTE };
                    let outage = outages.iter().any(|(a, b)| t + dur >= *a && t + dur < *b);
                    let usable = !outage && !rng.chance(fail_chance);
                    report.failed += u64::from(!usable);
                    backups.insert(
                        name.clone(),
                        Bk {
                            started: t,
                            ends: t + dur,
                            expires: expiration_ms(t as u64, s.ttl as u64) as i64,
                            ttl: s.ttl,
                            deleted: None,
                            usable,
                        },
                    );
                    live.entry(i).or_default().insert(name.clone());
                    pending_ends.insert((t + dur, i));
                    starts.entry(i).or_default().push(name.clone());
                    report.runs += 1;
                }
                remembered.insert(i, (t, name));
                let sc = &mut scheds[i];
                sc.status_before = sc.status_last;
                sc.status_last = Some(t - t.rem_euclid(1000));
                // The patch reaches the cache within two seconds; the created Backup's watch
                // events (its creation, its first status changes) make looks within one and a
                // half — often before the patch is seen.
                sc.status_cached_at = t + rng.range(1, 2000) as i64;
                let mut early: Vec<i64> = (0..3).map(|_| t + rng.range(1, 1500) as i64).collect();
                early.sort_unstable();
                report.early_looks += early.len() as u64;
                early_looks.insert(i, early.into());
            }
            let next = match early_looks.get_mut(&i).and_then(std::collections::VecDeque::pop_front) {
                Some(x) => x,
                None => plan.next_run_ms.unwrap_or(t + DAY).max(t + 1),
            };
            next_look.insert(i, next);
        }
    }
    // Y1–Y3 over each schedule's starts.
    for (i, names) in &starts {
        let s = &scheds[*i];
        for w in names.windows(2) {
            let (a, b) = (&backups[&w[0]], &backups[&w[1]]);
            let due = s.cron.next_after(a.started).unwrap_or(i64::MAX);
            if b.started < due {
                report.violations.push(v(
                    "Y1",
                    format!("{} ({}): {} started with no due time since {}", s.name, s.spec, w[1], w[0]),
                ));
            }
            if b.started < a.ends {
                report
                    .violations
                    .push(v("Y2", format!("{} ({}): {} started while {} ran", s.name, s.spec, w[1], w[0])));
            }
            let expect = first_up(due.max(a.ends));
            if b.started != expect {
                report.violations.push(v(
                    "Y3",
                    format!(
                        "{} ({}): after {}, the next start was {} ({}), expected {expect}",
                        s.name, s.spec, w[0], w[1], b.started
                    ),
                ));
            }
        }
    }
    // Y7: a skip is reported only when a due time came while the schedule's last backup ran.
    for (i, t) in &skips {
        let s = &scheds[*i];
        let mine = starts.get(i).map_or(&[][..], Vec::as_slice);
        // Starts are in time order: the last one at or before the skip.
        let at = mine.partition_point(|n| backups[n].started <= *t);
        let prev = at.checked_sub(1).map(|k| &backups[&mine[k]]);
        let ok = prev.is_some_and(|b| b.ends > *t && s.cron.next_after(b.started).is_some_and(|d| d <= *t));
        if !ok {
            report.violations.push(v(
                "Y7",
                format!(
                    "{} ({}): a run was reported skipped at {t} with no due time while a backup ran",
                    s.name, s.spec
                ),
            ));
        }
    }
    // Y4 at the end; Y5 for the last GC pass.
    for (i, s) in scheds.iter().enumerate() {
        // What the schedule's last look saw: not the backup that look started.
        let looked = last_look.get(&i).copied().unwrap_or(i64::MIN);
        // Only backups that had ended by then count (a running one is not counted by the rules).
        let left: Vec<(String, i64, bool)> = live
            .get(&i)
            .into_iter()
            .flatten()
            .filter(|n| backups[*n].started < looked && backups[*n].ends <= looked)
            .map(|n| (n.clone(), backups[n].started - backups[n].started.rem_euclid(1000), backups[n].usable))
            .collect();
        if s.retention.is_set() {
            let usable: Vec<(String, i64)> = left.iter().filter(|b| b.2).map(|b| (b.0.clone(), b.1)).collect();
            let keep = judge_keep(&usable, &s.retention, |t| s.cron.offset_min_at(t));
            let newest = judge_newest_usable(&left).cloned();
            for (n, started, ok) in &left {
                let kept = if *ok { keep.contains(n) } else { newest.as_ref().is_none_or(|x| *started > x.1) };
                if !kept {
                    report.violations.push(v(
                        "Y4",
                        format!("{} ({}): {n} survives though its rules do not keep it", s.name, s.spec),
                    ));
                }
            }
        }
    }
    for (n, b) in &backups {
        let expiry = b.started + b.ttl;
        if b.deleted.is_none() && b.ends <= gc_done && expiry <= gc_done {
            report.violations.push(v("Y5", format!("{n} expired at {expiry} and survived the GC pass at {gc_done}")));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_judges_retention_agrees_on_a_hand_made_case() {
        // Two backups on one day, one the next: daily 2 keeps the newest of each day.
        let set =
            vec![("a".to_string(), START + HOUR), ("b".to_string(), START + 2 * HOUR), ("c".to_string(), START + DAY)];
        let r = Retention { keep_daily: Some(2), ..Retention::default() };
        assert_eq!(judge_keep(&set, &r, |_| 0), BTreeSet::from(["b".to_string(), "c".to_string()]));
        assert_eq!(judge_period(START, 0, 3), 2026 * 12);
        assert_eq!(judge_period(START + 31 * DAY, 0, 3), 2026 * 12 + 1);
    }
}
