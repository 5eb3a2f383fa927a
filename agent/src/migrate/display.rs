//! Full copy progress: bars on a terminal (indicatif), a log line every
//! few seconds otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decant_proto::grpc::TaskState;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::config::ProgressDisplay;

struct Totals {
    bytes_total: u64,
    ranges_total: usize,
    bytes: AtomicU64,
    rows: AtomicU64,
    ranges_done: AtomicUsize,
    started: Instant,
}

pub struct CopyProgress {
    bars: Option<(MultiProgress, ProgressBar)>,
    totals: Arc<Totals>,
    logger: Option<tokio::task::JoinHandle<()>>,
}

/// One range being copied.
pub struct RangeBar(Option<ProgressBar>);

const LOG_EVERY: Duration = Duration::from_secs(5);

impl CopyProgress {
    pub fn new(state: &TaskState, mode: ProgressDisplay) -> Self {
        let pending =
            |f: fn(&decant_proto::grpc::RangeState) -> bool| state.tables.iter().flat_map(|t| t.ranges.iter()).filter(|r| f(r)).count();
        let ranges_total = pending(|r| !r.done);
        let bytes_total: u64 = state
            .tables
            .iter()
            .map(|t| {
                let left = t.ranges.iter().filter(|r| !r.done).count() as u64;
                t.bytes * left / t.ranges.len().max(1) as u64
            })
            .sum();
        let totals = Arc::new(Totals {
            bytes_total,
            ranges_total,
            bytes: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            ranges_done: AtomicUsize::new(0),
            started: Instant::now(),
        });
        let use_bars = match mode {
            ProgressDisplay::Bars => true,
            ProgressDisplay::Log => false,
            ProgressDisplay::Auto => std::io::stderr().is_terminal(),
        };
        if use_bars {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let overall = multi.add(ProgressBar::new(bytes_total.max(1)));
            overall.set_style(
                ProgressStyle::with_template("copy {bar:40.cyan/blue} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            overall.set_message(format!("0/{ranges_total} ranges"));
            overall.enable_steady_tick(Duration::from_millis(200));
            return CopyProgress { bars: Some((multi, overall)), totals, logger: None };
        }
        let logger = {
            let totals = totals.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(LOG_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let secs = totals.started.elapsed().as_secs_f64().max(0.001);
                    let bytes = totals.bytes.load(Ordering::Relaxed);
                    tracing::info!(
                        ranges = format!("{}/{}", totals.ranges_done.load(Ordering::Relaxed), totals.ranges_total),
                        mb = bytes >> 20,
                        of_mb = totals.bytes_total >> 20,
                        rows = totals.rows.load(Ordering::Relaxed),
                        mb_per_s = format!("{:.1}", bytes as f64 / secs / 1048576.0),
                        "copy progress"
                    );
                }
            })
        };
        CopyProgress { bars: None, totals, logger: Some(logger) }
    }

    pub fn start(&self, label: &str, estimated_bytes: u64) -> RangeBar {
        let Some((multi, _)) = &self.bars else {
            tracing::debug!(table = label, "copy started");
            return RangeBar(None);
        };
        let bar = multi.add(ProgressBar::new(estimated_bytes.max(1)));
        bar.set_style(
            ProgressStyle::with_template("  {prefix:40!} {bar:30} {bytes:>10} {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(label.to_owned());
        RangeBar(Some(bar))
    }

    pub fn add(&self, bar: &RangeBar, rows: u64, bytes: u64) {
        self.totals.rows.fetch_add(rows, Ordering::Relaxed);
        self.totals.bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(b) = &bar.0 {
            b.inc(bytes);
            b.set_message(format!("{} rows", b.position()));
        }
        if let Some((_, overall)) = &self.bars {
            overall.inc(bytes);
        }
    }

    pub fn done(&self, bar: RangeBar, label: &str, rows: u64, bytes: u64) {
        let done = self.totals.ranges_done.fetch_add(1, Ordering::Relaxed) + 1;
        match (&self.bars, bar.0) {
            (Some((multi, overall)), Some(b)) => {
                b.finish_and_clear();
                multi.remove(&b);
                overall.set_message(format!("{done}/{} ranges", self.totals.ranges_total));
                let _ = multi.println(format!("  copied {label}: {rows} rows, {:.1} MB", bytes as f64 / 1048576.0));
            }
            _ => tracing::info!(table = label, rows, mb = format!("{:.1}", bytes as f64 / 1048576.0), "copied"),
        }
    }

    pub fn finish(&self) {
        let secs = self.totals.started.elapsed().as_secs_f64();
        if let Some((_, overall)) = &self.bars {
            overall.finish_and_clear();
        }
        if let Some(l) = &self.logger {
            l.abort();
        }
        let bytes = self.totals.bytes.load(Ordering::Relaxed);
        tracing::info!(
            ranges = self.totals.ranges_total,
            rows = self.totals.rows.load(Ordering::Relaxed),
            mb = format!("{:.1}", bytes as f64 / 1048576.0),
            seconds = format!("{secs:.1}"),
            "full copy done"
        );
    }

    pub fn abandon(&self) {
        if let Some((_, overall)) = &self.bars {
            overall.abandon();
        }
        if let Some(l) = &self.logger {
            l.abort();
        }
    }
}

impl Drop for CopyProgress {
    fn drop(&mut self) {
        if let Some(l) = &self.logger {
            l.abort();
        }
    }
}
