//! Alerts (`[alert]`): replication lag over a threshold, a failed session,
//! retries exhausted. Each fires once per episode and sends a resolved
//! notice when the episode ends. An alert runs a command (`sh -c`, the
//! alert as JSON on stdin and in `DECANT_ALERT_*` variables) and/or POSTs
//! the JSON to a URL (http, or https checked against `ca_file` or the
//! system's CA bundle).
//!
//! The episode logic ([`LagEpisode`], [`FailureEpisode`]) is pure; [`Alerter`]
//! delivers. A delivery that fails is logged, never fatal, and bounded by
//! [`DELIVERY_TIMEOUT`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Alert as AlertConfig;
use crate::metrics::Metrics;

/// The longest one action (the command, or the POST) may take.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Lag,
    Failure,
    RetriesExhausted,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Lag => "lag",
            Kind::Failure => "failure",
            Kind::RetriesExhausted => "retries_exhausted",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Firing,
    Resolved,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Firing => "firing",
            State::Resolved => "resolved",
        }
    }
}

/// One notice, sent as JSON.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Alert {
    pub task_id: String,
    pub kind: Kind,
    pub state: State,
    pub message: String,
    /// The measured value (lag seconds or bytes; failures: seconds failing).
    pub value: f64,
    /// The threshold it was compared with (0 for failures).
    pub threshold: f64,
    /// When it was raised, RFC 3339 UTC.
    pub at: String,
}

/// The lag episode: firing once lag has been over a threshold for
/// `for_seconds`, resolved when it is under every threshold again.
pub struct LagEpisode {
    seconds: u64,
    bytes: u64,
    hold: Duration,
    over_since: Option<Instant>,
    firing: bool,
}

/// What a lag observation changed: (state, message, value, threshold).
pub type LagChange = (State, String, f64, f64);

impl LagEpisode {
    pub fn new(config: &AlertConfig) -> LagEpisode {
        LagEpisode {
            seconds: config.lag_seconds,
            bytes: config.lag_bytes,
            hold: Duration::from_secs(config.for_seconds),
            over_since: None,
            firing: false,
        }
    }

    pub fn enabled(&self) -> bool {
        self.seconds > 0 || self.bytes > 0
    }

    /// The threshold crossed by this lag, if any: (what, value, threshold).
    fn over(&self, lag_seconds: u64, lag_bytes: u64) -> Option<(&'static str, u64, u64)> {
        if self.seconds > 0 && lag_seconds >= self.seconds {
            return Some(("seconds", lag_seconds, self.seconds));
        }
        if self.bytes > 0 && lag_bytes >= self.bytes {
            return Some(("bytes", lag_bytes, self.bytes));
        }
        None
    }

    /// One observation at `now`: `Some` when the episode starts or ends.
    pub fn observe(&mut self, now: Instant, lag_seconds: u64, lag_bytes: u64) -> Option<LagChange> {
        match self.over(lag_seconds, lag_bytes) {
            Some((what, value, threshold)) => {
                let since = *self.over_since.get_or_insert(now);
                if self.firing || now.duration_since(since) < self.hold {
                    return None;
                }
                self.firing = true;
                let message = format!("replication lag is {value} {what}, over the threshold of {threshold} {what}");
                Some((State::Firing, message, value as f64, threshold as f64))
            }
            None => {
                self.over_since = None;
                if !std::mem::take(&mut self.firing) {
                    return None;
                }
                let message = format!("replication lag is back under the thresholds ({lag_seconds} seconds, {lag_bytes} bytes)");
                Some((State::Resolved, message, lag_bytes as f64, self.bytes as f64))
            }
        }
    }
}

/// The failure episodes of the agent's session loop: a failed session
/// fires `failure` (once until a session succeeds), giving up fires
/// `retries_exhausted`; a session that succeeds resolves what fired.
#[derive(Default)]
pub struct FailureEpisode {
    failure: bool,
    exhausted: bool,
}

impl FailureEpisode {
    /// A session failed: `Some(Failure)` on the first failure of an episode.
    pub fn failed(&mut self) -> Option<Kind> {
        (!std::mem::replace(&mut self.failure, true)).then_some(Kind::Failure)
    }

    /// The retry time ran out.
    pub fn exhausted(&mut self) -> Option<Kind> {
        (!std::mem::replace(&mut self.exhausted, true)).then_some(Kind::RetriesExhausted)
    }

    /// A session succeeded: the kinds to resolve.
    pub fn succeeded(&mut self) -> Vec<Kind> {
        let mut out = Vec::new();
        if std::mem::take(&mut self.failure) {
            out.push(Kind::Failure);
        }
        if std::mem::take(&mut self.exhausted) {
            out.push(Kind::RetriesExhausted);
        }
        out
    }
}

/// An alert fired and not resolved yet, as `decant status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Firing {
    pub kind: Kind,
    pub message: String,
    /// When it fired, RFC 3339 UTC.
    pub since: String,
}

/// Delivers alerts per `[alert]`, in order, from a task of its own (so
/// a slow receiver never holds up the stream); cheap to clone.
#[derive(Clone)]
pub struct Alerter {
    task_id: Arc<str>,
    config: Arc<AlertConfig>,
    /// To the delivery task; `None` when no action is configured.
    queue: Option<mpsc::UnboundedSender<Queued>>,
    /// The alerts firing now (the agent reports them to the applier).
    firing: Arc<watch::Sender<Vec<Firing>>>,
}

enum Queued {
    Alert(Alert),
    /// Answered once every alert queued before it is delivered.
    Flush(oneshot::Sender<()>),
}

impl Alerter {
    /// Starts the delivery task when an action is configured (in a Tokio
    /// runtime).
    pub fn start(task_id: &str, config: &AlertConfig) -> Alerter {
        let mut alerter = Alerter {
            task_id: task_id.into(),
            config: Arc::new(config.clone()),
            queue: None,
            firing: Arc::new(watch::channel(Vec::new()).0),
        };
        if !config.command.is_empty() || !config.url.is_empty() {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let config = alerter.config.clone();
            tokio::spawn(async move {
                while let Some(queued) = rx.recv().await {
                    match queued {
                        Queued::Alert(alert) => deliver(&config, &alert).await,
                        Queued::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            });
            alerter.queue = Some(tx);
        }
        alerter
    }

    /// Whether any action is configured.
    pub fn active(&self) -> bool {
        self.queue.is_some()
    }

    pub fn alert(&self, kind: Kind, state: State, message: String, value: f64, threshold: f64) -> Alert {
        Alert { task_id: self.task_id.to_string(), kind, state, message, value, threshold, at: rfc3339(SystemTime::now()) }
    }

    /// Raises one alert and queues it for delivery.
    pub fn notify(&self, kind: Kind, state: State, message: String, value: f64, threshold: f64) {
        if let Some(queue) = &self.queue {
            let alert = self.alert(kind, state, message, value, threshold);
            tracing::info!(kind = kind.name(), state = state.name(), message = %alert.message, "alert");
            self.firing.send_modify(|firing| {
                firing.retain(|f| f.kind != kind);
                if state == State::Firing {
                    firing.push(Firing { kind, message: alert.message.clone(), since: alert.at.clone() });
                }
            });
            let _ = queue.send(Queued::Alert(alert));
        }
    }

    /// The alerts firing now, and each change of them.
    pub fn firing(&self) -> watch::Receiver<Vec<Firing>> {
        self.firing.subscribe()
    }

    /// Waits until every alert queued so far is delivered (or failed):
    /// before the process exits.
    pub async fn flush(&self) {
        if let Some(queue) = &self.queue {
            let (done, delivered) = oneshot::channel();
            if queue.send(Queued::Flush(done)).is_ok() {
                let _ = delivered.await;
            }
        }
    }

    /// Watches the lag gauges every second until dropped (abort the task),
    /// when a lag threshold is set and an action configured.
    pub fn watch_lag(&self, metrics: Arc<Metrics>) -> Option<tokio::task::JoinHandle<()>> {
        let mut episode = LagEpisode::new(&self.config);
        if !episode.enabled() || !self.active() {
            return None;
        }
        let alerter = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let (seconds, bytes) = (metrics.lag_seconds.get().max(0) as u64, metrics.lag_bytes.get().max(0) as u64);
                if let Some((state, message, value, threshold)) = episode.observe(Instant::now(), seconds, bytes) {
                    alerter.notify(Kind::Lag, state, message, value, threshold);
                }
            }
        }))
    }
}

/// Runs every configured action for `alert`; failures are logged.
async fn deliver(config: &AlertConfig, alert: &Alert) {
    let json = serde_json::to_string(alert).unwrap_or_default();
    if !config.command.is_empty() {
        match tokio::time::timeout(DELIVERY_TIMEOUT, run_command(&config.command, alert, &json)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, kind = alert.kind.name(), "alert command failed"),
            Err(_) => tracing::warn!(timeout_s = DELIVERY_TIMEOUT.as_secs(), "alert command timed out"),
        }
    }
    if !config.url.is_empty() {
        match tokio::time::timeout(DELIVERY_TIMEOUT, post(&config.url, &config.ca_file, &json)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, url = %config.url, "alert POST failed"),
            Err(_) => tracing::warn!(url = %config.url, timeout_s = DELIVERY_TIMEOUT.as_secs(), "alert POST timed out"),
        }
    }
}

async fn run_command(command: &str, alert: &Alert, json: &str) -> Result<(), String> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("DECANT_ALERT_KIND", alert.kind.name())
        .env("DECANT_ALERT_STATE", alert.state.name())
        .env("DECANT_TASK_ID", &alert.task_id)
        .env("DECANT_ALERT_MESSAGE", &alert.message)
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start sh: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input is not an error.
        let _ = stdin.write_all(json.as_bytes()).await;
    }
    let status = child.wait().await.map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("exited with {status}"))
    }
}

/// POSTs `json` to `url`; any 2xx answer is success. https is checked
/// against `ca_file` when set, else against the system's CA certificates.
async fn post(url: &str, ca_file: &str, json: &str) -> Result<(), String> {
    let mut client = reqwest::Client::builder().timeout(DELIVERY_TIMEOUT).user_agent("decant");
    if !ca_file.is_empty() {
        let pem = std::fs::read(ca_file).map_err(|e| format!("CA file {ca_file}: {e}"))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("CA file {ca_file}: {e}"))?;
        if certs.is_empty() {
            return Err(format!("CA file {ca_file}: no certificate in it"));
        }
        // Only the given CA: the system's are not trusted beside it.
        client = client.tls_built_in_root_certs(false);
        for cert in certs {
            client = client.add_root_certificate(cert);
        }
    }
    let client = client.build().map_err(|e| e.to_string())?;
    let answer = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(json.to_owned())
        .send()
        .await
        .map_err(|e| crate::error::report(&e))?;
    let status = answer.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the server answered {}", status.as_u16()))
    }
}

/// `t` as RFC 3339 UTC, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(lag_seconds: u64, lag_bytes: u64, for_seconds: u64) -> AlertConfig {
        AlertConfig { lag_seconds, lag_bytes, for_seconds, ..AlertConfig::default() }
    }

    #[test]
    fn lag_fires_once_per_episode_and_resolves() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut e = LagEpisode::new(&config(60, 1000, 5));
        assert!(e.enabled());
        assert_eq!(e.observe(at(0), 0, 10), None);
        assert_eq!(e.observe(at(1), 0, 2000), None, "over, but not for 5 seconds yet");
        assert_eq!(e.observe(at(3), 0, 10), None, "back under: the hold starts again");
        assert_eq!(e.observe(at(4), 0, 2000), None);
        let (state, message, value, threshold) = e.observe(at(9), 0, 3000).unwrap();
        assert_eq!((state, value, threshold), (State::Firing, 3000.0, 1000.0));
        assert!(message.contains("3000 bytes"), "{message}");
        assert_eq!(e.observe(at(10), 90, 3000), None, "once per episode");
        assert_eq!(e.observe(at(11), 0, 3000), None);
        assert_eq!(e.observe(at(12), 0, 5).unwrap().0, State::Resolved);
        assert_eq!(e.observe(at(13), 0, 5), None, "resolved once");
        // A new episode, by seconds this time.
        assert_eq!(e.observe(at(20), 61, 0), None);
        let (state, message, ..) = e.observe(at(25), 61, 0).unwrap();
        assert_eq!(state, State::Firing);
        assert!(message.contains("61 seconds"), "{message}");
        // Off by default.
        assert!(!LagEpisode::new(&AlertConfig::default()).enabled());
        // No hold: fires at once.
        let mut e = LagEpisode::new(&config(0, 1, 0));
        assert_eq!(e.observe(at(0), 0, 1).unwrap().0, State::Firing);
    }

    #[test]
    fn failures_fire_once_and_resolve_on_success() {
        let mut e = FailureEpisode::default();
        assert_eq!(e.succeeded(), vec![]);
        assert_eq!(e.failed(), Some(Kind::Failure));
        assert_eq!(e.failed(), None);
        assert_eq!(e.exhausted(), Some(Kind::RetriesExhausted));
        assert_eq!(e.exhausted(), None);
        assert_eq!(e.succeeded(), vec![Kind::Failure, Kind::RetriesExhausted]);
        assert_eq!(e.succeeded(), vec![]);
        assert_eq!(e.failed(), Some(Kind::Failure));
    }

    #[tokio::test]
    async fn firing_alerts_are_listed_until_resolved() {
        let a = Alerter::start("t1", &AlertConfig { command: "true".into(), ..AlertConfig::default() });
        let firing = a.firing();
        a.notify(Kind::Lag, State::Firing, "lag is 5 bytes".into(), 5.0, 1.0);
        a.notify(Kind::Failure, State::Firing, "a session failed".into(), 0.0, 0.0);
        let kinds: Vec<Kind> = firing.borrow().iter().map(|f| f.kind).collect();
        assert_eq!(kinds, vec![Kind::Lag, Kind::Failure]);
        a.notify(Kind::Lag, State::Resolved, "back under".into(), 0.0, 1.0);
        assert_eq!(firing.borrow().len(), 1);
        assert_eq!(firing.borrow()[0].message, "a session failed");
        a.flush().await;
    }

    #[test]
    fn alert_json() {
        let a = Alerter::start("t1", &AlertConfig::default());
        assert!(!a.active());
        let mut alert = a.alert(Kind::RetriesExhausted, State::Firing, "gave up".into(), 600.0, 0.0);
        alert.at = "2026-01-02T03:04:05Z".into();
        assert_eq!(
            serde_json::to_string(&alert).unwrap(),
            r#"{"task_id":"t1","kind":"retries_exhausted","state":"firing","message":"gave up","value":600.0,"threshold":0.0,"at":"2026-01-02T03:04:05Z"}"#
        );
    }

    #[test]
    fn time() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_210_096)), "2024-02-29T12:34:56Z");
    }
}
