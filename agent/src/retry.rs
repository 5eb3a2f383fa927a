//! How long to keep trying: every error is classified as fatal (bad
//! configuration or input, retrying cannot help), a lost connection
//! (retried for `retry.connection_minutes`) or other (retried for
//! `retry.other_minutes`), with exponential backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    Fatal,
    Connection,
    Other,
}

pub struct Retry {
    connection_window: Duration,
    other_window: Duration,
    /// When the current run of failures started.
    failing_since: Option<Instant>,
    backoff: Duration,
    /// Woken when work succeeds after a run of failures.
    recovered: Arc<Notify>,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Retry {
    pub fn new(connection_window: Duration, other_window: Duration) -> Self {
        Retry { connection_window, other_window, failing_since: None, backoff: FIRST_BACKOFF, recovered: Arc::new(Notify::new()) }
    }

    /// Work succeeded: the next failure starts a new run.
    pub fn succeeded(&mut self) {
        if self.failing_since.take().is_some() {
            self.recovered.notify_one();
        }
        self.backoff = FIRST_BACKOFF;
    }

    /// After a failure: `Some(wait)` to retry after waiting, `None` to give up.
    pub fn failed(&mut self, class: ErrorClass) -> Option<Duration> {
        let window = match class {
            ErrorClass::Fatal => return None,
            ErrorClass::Connection => self.connection_window,
            ErrorClass::Other => self.other_window,
        };
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= window {
            return None;
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Some(wait)
    }

    /// How much of the retry window of `class` is left in the current run
    /// of failures.
    pub fn window_left(&self, class: ErrorClass) -> Duration {
        let window = match class {
            ErrorClass::Fatal => Duration::ZERO,
            ErrorClass::Connection => self.connection_window,
            ErrorClass::Other => self.other_window,
        };
        window.saturating_sub(self.failing_for())
    }

    /// Notified (one permit) each time work succeeds after failures.
    pub fn recovered(&self) -> Arc<Notify> {
        self.recovered.clone()
    }

    pub fn failing_for(&self) -> Duration {
        self.failing_since.map(|s| s.elapsed()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_backoff() {
        let mut r = Retry::new(Duration::from_secs(3600), Duration::ZERO);
        assert_eq!(r.failed(ErrorClass::Fatal), None);
        assert_eq!(r.failed(ErrorClass::Connection), Some(FIRST_BACKOFF));
        assert_eq!(r.failed(ErrorClass::Connection), Some(FIRST_BACKOFF * 2));
        assert_eq!(r.failed(ErrorClass::Other), None, "the other window (zero) is over");
        let recovered = r.recovered();
        r.succeeded();
        // Work succeeding after failures leaves one notice; again, none.
        let notified = |n: &Notify| {
            let waiter = n.notified();
            tokio::pin!(waiter);
            waiter.as_mut().enable()
        };
        assert!(notified(&recovered));
        r.succeeded();
        assert!(!notified(&recovered));
        assert_eq!(r.failed(ErrorClass::Connection), Some(FIRST_BACKOFF));
        for _ in 0..20 {
            assert!(r.failed(ErrorClass::Connection).unwrap() <= MAX_BACKOFF);
        }
    }
}
