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
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

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

/// Delivers alerts per `[alert]`, in order, from a task of its own (so
/// a slow receiver never holds up the stream); cheap to clone.
#[derive(Clone)]
pub struct Alerter {
    task_id: Arc<str>,
    config: Arc<AlertConfig>,
    /// To the delivery task; `None` when no action is configured.
    queue: Option<mpsc::UnboundedSender<Queued>>,
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
        let mut alerter = Alerter { task_id: task_id.into(), config: Arc::new(config.clone()), queue: None };
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
            let _ = queue.send(Queued::Alert(alert));
        }
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

/// A parsed `http://` or `https://` URL.
#[derive(Debug, PartialEq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

pub fn parse_url(url: &str) -> Result<Url, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err("must start with http:// or https://".into());
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err("user information in the URL is not supported".into());
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
            None if after.is_empty() => default_port,
            None => return Err("bad host".into()),
        };
        (host.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| format!("bad port {p:?}"))?),
            None => (authority.to_owned(), default_port),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    Ok(Url { tls, host, port, path: path.to_owned() })
}

/// CA bundles tried for https when `ca_file` is not set.
const SYSTEM_CA_FILES: &[&str] =
    &["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem", "/etc/ssl/ca-bundle.pem"];

fn tls_connector(ca_file: &str) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let path = if ca_file.is_empty() {
        SYSTEM_CA_FILES
            .iter()
            .find(|p| std::path::Path::new(p).exists())
            .ok_or("https needs alert.ca_file: no system CA bundle found")?
            .to_string()
    } else {
        ca_file.to_owned()
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&path).map_err(|e| format!("CA file {path}: {e}"))? {
        let cert = cert.map_err(|e| format!("CA file {path}: {e}"))?;
        // A system bundle may hold certificates rustls refuses; skip them.
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(format!("CA file {path}: no usable certificate in it"));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// POSTs `json` to `url`; any 2xx answer is success.
async fn post(url: &str, ca_file: &str, json: &str) -> Result<(), String> {
    let url = parse_url(url)?;
    let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port)).await.map_err(|e| format!("connect: {e}"))?;
    let host_header = if url.host.contains(':') { format!("[{}]:{}", url.host, url.port) } else { format!("{}:{}", url.host, url.port) };
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: decant\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        url.path,
        json.len()
    );
    let status = if url.tls {
        let name = rustls::pki_types::ServerName::try_from(url.host.clone()).map_err(|e| format!("host {}: {e}", url.host))?;
        let stream = tls_connector(ca_file)?.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
        exchange(stream, &request).await?
    } else {
        exchange(tcp, &request).await?
    };
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("the server answered {status}"))
    }
}

/// Sends `request` and reads the answer's status code.
async fn exchange<S: AsyncReadExt + AsyncWrite + Unpin>(mut stream: S, request: &str) -> Result<u16, String> {
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    stream.flush().await.map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 8192 {
        match stream.read(&mut chunk).await.map_err(|e| format!("read the answer: {e}"))? {
            0 => break,
            n => head.extend_from_slice(&chunk[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("");
    line.split_whitespace()
        .nth(1)
        .filter(|_| line.starts_with("HTTP/"))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {line:?}"))
}

/// `t` as RFC 3339 UTC, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
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
    fn urls_and_time() {
        assert_eq!(
            parse_url("http://127.0.0.1:8080/hook?a=1").unwrap(),
            Url { tls: false, host: "127.0.0.1".into(), port: 8080, path: "/hook?a=1".into() }
        );
        assert_eq!(
            parse_url("https://alerts.example").unwrap(),
            Url { tls: true, host: "alerts.example".into(), port: 443, path: "/".into() }
        );
        assert_eq!(parse_url("http://[::1]:9/x").unwrap(), Url { tls: false, host: "::1".into(), port: 9, path: "/x".into() });
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("http://:80/").is_err());
        assert!(parse_url("http://h:port/").is_err());
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_709_210_096)), "2024-02-29T12:34:56Z");
    }
}
