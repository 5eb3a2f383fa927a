//! Throttles that change while the task runs: the full copy's rows, MB
//! and source queries per second (agent side), the stream's changes and
//! MB per second (applier side).
//!
//! The limits in force travel in a [`watch`] channel: the role's SIGHUP
//! handler sends new ones, and every [`Pace`] picks them up on its next
//! step (a wait in progress ends at once). Pacing delays the next read
//! (the copy) or the next batch taken from the agent (the stream), so the
//! work waits at its source: nothing is buffered to be let out later, and
//! memory stays what it is unthrottled.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::config::Config;

const MB: u64 = 1 << 20;

/// Work not done while idle may be caught up later, but only this much of
/// it: a pace that was not busy does not burst past its limit.
const CREDIT: Duration = Duration::from_secs(1);

/// The five limits, 0 = unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub copy_max_rows_per_second: u64,
    pub copy_max_mb_per_second: u64,
    pub copy_max_source_queries_per_second: u64,
    pub apply_max_rows_per_second: u64,
    pub apply_max_mb_per_second: u64,
}

impl Limits {
    pub fn from_config(config: &Config) -> Limits {
        Limits {
            copy_max_rows_per_second: config.migrate.max_rows_per_second,
            copy_max_mb_per_second: config.migrate.max_mb_per_second,
            copy_max_source_queries_per_second: config.migrate.max_source_queries_per_second,
            apply_max_rows_per_second: config.applier.max_rows_per_second,
            apply_max_mb_per_second: config.applier.max_mb_per_second,
        }
    }

    /// (setting, value) for each limit, named as in the configuration file.
    pub fn settings(&self) -> [(&'static str, u64); 5] {
        [
            ("migrate.max_rows_per_second", self.copy_max_rows_per_second),
            ("migrate.max_mb_per_second", self.copy_max_mb_per_second),
            ("migrate.max_source_queries_per_second", self.copy_max_source_queries_per_second),
            ("applier.max_rows_per_second", self.apply_max_rows_per_second),
            ("applier.max_mb_per_second", self.apply_max_mb_per_second),
        ]
    }

    /// "setting: old -> new" for every limit that differs in `new`.
    pub fn changes(&self, new: &Limits) -> Vec<String> {
        self.settings()
            .iter()
            .zip(new.settings())
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, b)| format!("{}: {} -> {}", a.0, shown(a.1), shown(b.1)))
            .collect()
    }

    fn copy(&self) -> [u64; 3] {
        [self.copy_max_rows_per_second, self.copy_max_mb_per_second.saturating_mul(MB), self.copy_max_source_queries_per_second]
    }

    fn apply(&self) -> [u64; 3] {
        [self.apply_max_rows_per_second, self.apply_max_mb_per_second.saturating_mul(MB), 0]
    }
}

fn shown(v: u64) -> String {
    if v == 0 {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// The limits in force, as the role's reload handler updates them.
pub type LiveLimits = watch::Receiver<Limits>;

/// Limits that never change (tests, and one-shot commands).
pub fn fixed(limits: Limits) -> LiveLimits {
    let (tx, rx) = watch::channel(limits);
    // The receiver keeps the value; a closed channel never reports a change.
    drop(tx);
    rx
}

/// One limit as a virtual clock: each amount taken moves `next` on by the
/// time the limit allows for it.
#[derive(Debug, Default)]
struct Rate {
    per_second: u64,
    next: Option<Instant>,
}

impl Rate {
    /// A new limit starts afresh: the debt run up under the old one is
    /// forgiven, so a raised limit applies at once.
    fn set(&mut self, per_second: u64) {
        if self.per_second != per_second {
            self.per_second = per_second;
            self.next = None;
        }
    }

    /// Takes `amount` at `now`: returns (start, end), when the amount's
    /// time slot begins and ends.
    fn take(&mut self, amount: u64, now: Instant) -> (Instant, Instant) {
        if self.per_second == 0 || amount == 0 {
            return (now, now);
        }
        let floor = now.checked_sub(CREDIT).unwrap_or(now);
        let start = self.next.map_or(now, |n| n.max(floor));
        let end = start + Duration::from_secs_f64(amount as f64 / self.per_second as f64);
        self.next = Some(end);
        (start, end)
    }
}

/// Which limits a pace applies.
#[derive(Clone, Copy, Debug)]
pub enum Side {
    Copy,
    Apply,
}

/// Paces rows, bytes and queries to the live limits of one side.
pub struct Pace {
    side: Side,
    limits: LiveLimits,
    /// rows, bytes, queries
    rates: [Rate; 3],
}

impl Pace {
    pub fn new(side: Side, mut limits: LiveLimits) -> Pace {
        let current = *limits.borrow_and_update();
        let mut pace = Pace { side, limits, rates: Default::default() };
        pace.set(&current);
        pace
    }

    fn set(&mut self, limits: &Limits) {
        let values = match self.side {
            Side::Copy => limits.copy(),
            Side::Apply => limits.apply(),
        };
        for (rate, v) in self.rates.iter_mut().zip(values) {
            rate.set(v);
        }
    }

    /// Picks up new limits, if any were sent.
    fn refresh(&mut self) {
        if self.limits.has_changed().unwrap_or(false) {
            let current = *self.limits.borrow_and_update();
            self.set(&current);
        }
    }

    /// Counts `rows` and `bytes` just done; returns when the next may start.
    pub fn take(&mut self, rows: u64, bytes: u64) -> Instant {
        self.refresh();
        let now = Instant::now();
        self.rates[0].take(rows, now).1.max(self.rates[1].take(bytes, now).1)
    }

    /// Reserves one query; returns when it may be sent.
    pub fn query(&mut self) -> Instant {
        self.refresh();
        self.rates[2].take(1, Instant::now()).0
    }

    /// Waits until new limits arrive (forever once the sender is gone),
    /// then picks them up.
    pub async fn changed(&mut self) {
        if self.limits.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        // changed() marked the new limits seen: refresh() would skip them.
        let current = *self.limits.borrow_and_update();
        self.set(&current);
    }

    /// A receiver that reports the next change of limits.
    fn subscribe(&self) -> LiveLimits {
        self.limits.clone()
    }
}

/// A [`Pace`] shared by the copy's workers.
#[derive(Clone)]
pub struct SharedPace(Arc<Mutex<Pace>>);

impl SharedPace {
    pub fn new(side: Side, limits: LiveLimits) -> SharedPace {
        SharedPace(Arc::new(Mutex::new(Pace::new(side, limits))))
    }

    /// A pace that never waits (commands that read the source once, like
    /// verify and cutover).
    pub fn unlimited() -> SharedPace {
        SharedPace::new(Side::Copy, fixed(Limits::default()))
    }

    /// Counts rows and bytes just read; the answer says how long to wait.
    pub fn take(&self, rows: u64, bytes: u64) -> Wait {
        let mut pace = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Wait { ready: pace.take(rows, bytes), changes: pace.subscribe() }
    }

    /// Waits until one more query may be sent to the source.
    pub async fn query(&self) {
        let (ready, changes) = {
            let mut pace = self.0.lock().unwrap_or_else(|e| e.into_inner());
            (pace.query(), pace.subscribe())
        };
        wait(ready, changes).await;
    }
}

/// A wait the limits ask for.
pub struct Wait {
    ready: Instant,
    changes: LiveLimits,
}

impl Wait {
    /// Whether there is anything to wait for.
    pub fn is_needed(&self) -> bool {
        self.ready > Instant::now()
    }

    /// Waits until the pace allows the next step, or the limits change.
    pub async fn done(self) {
        wait(self.ready, self.changes).await;
    }
}

/// Sleeps until `ready`, or until the limits change (the new ones start
/// afresh, so what was waiting goes on at once).
async fn wait(ready: Instant, mut changes: LiveLimits) {
    if ready <= Instant::now() {
        return;
    }
    tokio::select! {
        _ = tokio::time::sleep_until(ready.into()) => {}
        Ok(()) = changes.changed() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_spreads_work_and_keeps_little_credit() {
        let t0 = Instant::now();
        let mut r = Rate::default();
        r.set(1000);
        assert_eq!(r.take(500, t0), (t0, t0 + Duration::from_millis(500)));
        // Taken before the first slot ended: queued behind it.
        assert_eq!(r.take(500, t0 + Duration::from_millis(100)).1, t0 + Duration::from_secs(1));
        // After ten idle seconds only one second of credit is left.
        let later = t0 + Duration::from_secs(11);
        assert_eq!(r.take(1000, later), (later - CREDIT, later));
        // A new limit forgives the debt.
        r.take(100_000, later);
        r.set(10);
        assert_eq!(r.take(10, later), (later, later + Duration::from_secs(1)));
        r.set(0);
        assert_eq!(r.take(1 << 40, later), (later, later));
    }

    #[tokio::test]
    async fn a_pace_follows_its_side_and_the_live_limits() {
        let (tx, rx) = watch::channel(Limits { copy_max_mb_per_second: 1, apply_max_rows_per_second: 10, ..Default::default() });
        let mut copy = Pace::new(Side::Copy, rx.clone());
        let mut apply = Pace::new(Side::Apply, rx);
        let now = Instant::now();
        // Copy: 2 MB at 1 MB/s; rows are not limited.
        assert!(copy.take(1_000_000, 2 * MB) >= now + Duration::from_millis(1990));
        // Apply: 20 rows at 10 rows/s; bytes are not limited.
        assert!(apply.take(20, 1 << 40) >= now + Duration::from_millis(1990));
        assert!(copy.query() <= Instant::now());
        tx.send(Limits { copy_max_source_queries_per_second: 2, ..Default::default() }).unwrap();
        let now = Instant::now();
        assert!(copy.take(1_000_000, 100 * MB) <= Instant::now(), "the raised limit applies at once");
        assert!(copy.query() <= Instant::now());
        assert!(copy.query() >= now + Duration::from_millis(490), "two queries per second");
        assert!(apply.take(1 << 40, 1 << 40) <= Instant::now());
        // A pace waiting for new limits applies them.
        tx.send(Limits { apply_max_mb_per_second: 1, ..Default::default() }).unwrap();
        apply.changed().await;
        let now = Instant::now();
        assert!(apply.take(1 << 40, MB) >= now + Duration::from_millis(990), "1 MB/s after the change");
        assert_eq!(
            Limits::default().changes(&Limits { apply_max_mb_per_second: 5, ..Default::default() }),
            vec!["applier.max_mb_per_second: unlimited -> 5".to_owned()]
        );
    }
}
