//! A migration task's orchestration: which phases run, and in which
//! process. This is the only module that knows the whole order:
//!
//! ```text
//! precheck → schema (pre-data) → full copy → schema (post-data) → incremental stream
//! ```
//!
//! Each role runs the precheck of the sides it reaches before anything
//! else, and refuses to start on an error: the agent checks the source,
//! the applier the destination, `migrate` both and the one against the
//! other.
//!
//! The phases themselves live below, and none of them imports this module:
//! `migrate` drives the phases before the stream from the source side,
//! `stream` is the incremental phase on the source side, `applier` does
//! the destination's part of each, and `transport` carries the calls
//! between the two sides. The roles:
//!
//! - `decant agent` ([`run_agent`]): the source side, talking to an applier
//!   elsewhere;
//! - `decant applier` ([`run_applier`]): the destination side, serving
//!   agents;
//! - `decant migrate` ([`run_migrate`]): both in one process, the applier on
//!   a loopback port with a one-time token.

use std::sync::Arc;

use decant_proto::grpc::{FiringAlert, HealthReport};
use tokio::sync::watch;

use crate::alert::{Alerter, FailureEpisode, Kind, State};
use crate::applier::ApplyError;
use crate::config::Config;
use crate::connect::{ConnInfo, ConnInfoError, ProcessEnv};
use crate::metrics::Metrics;
use crate::migrate::{self, MigrateError};
use crate::precheck::{self, PrecheckError, Sides};
use crate::retry::{ErrorClass, Retry};
use crate::stream::{self, SessionError};
use crate::throttle::{LiveLimits, SharedPace, Side};
use crate::transport::client::StreamError;
use crate::transport::{server, TransportError, TransportSettings};

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("source connection string: {0}")]
    SourceConnInfo(ConnInfoError),
    #[error("destination connection string: {0}")]
    DestinationConnInfo(ConnInfoError),
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("applier.listen {0:?}: {1}")]
    Listen(String, String),
    #[error("destination: {0}")]
    Destination(#[from] ApplyError),
    #[error("{0}")]
    Migrate(#[from] MigrateError),
    #[error("{0}")]
    Stream(#[from] SessionError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Precheck(#[from] PrecheckError),
    /// The precheck found errors: every one, with its fix.
    #[error("{0}")]
    Refused(String),
}

impl TaskError {
    /// The applier refused the task because it was cut over: its end, not
    /// a failure.
    fn is_cut_over(&self) -> bool {
        let status = match self {
            TaskError::Stream(SessionError::Applier(StreamError::Status(s))) => s,
            TaskError::Migrate(MigrateError::Applier(StreamError::Status(s))) => s,
            _ => return false,
        };
        crate::transport::is_cut_over(status)
    }

    fn class(&self) -> ErrorClass {
        match self {
            TaskError::Migrate(e) => e.class(),
            TaskError::Stream(e) => e.class(),
            _ => ErrorClass::Fatal,
        }
    }
}

/// `decant agent`: runs the task's phases on the source side until
/// `shutdown` turns true, retrying per the policy.
pub async fn run_agent(
    config: Config,
    metrics: Arc<Metrics>,
    limits: LiveLimits,
    shutdown: watch::Receiver<bool>,
) -> Result<(), TaskError> {
    let source = ConnInfo::parse(&config.source.dsn, &ProcessEnv).map_err(TaskError::SourceConnInfo)?;
    let transport = TransportSettings::from_config(&config)?;
    transport.check_client(&config.agent.applier_url)?;
    let alerter = Alerter::start(&config.task_id, &config.alert);
    let result = match check_or_alert(&config, Sides::Source, &alerter).await {
        Ok(()) => drive(&config, source, &transport, metrics, limits, alerter, shutdown).await,
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        report_health(&config, &transport, "failed", e, None).await;
    }
    result
}

/// Tells the applier (for `decant status`) that the task is retrying or
/// failed, and why.
async fn report_health(config: &Config, transport: &TransportSettings, state: &str, error: &TaskError, left: Option<std::time::Duration>) {
    let report = HealthReport {
        task_id: config.task_id.clone(),
        state: state.to_owned(),
        reason: crate::error::report(error),
        retry_seconds_left: left.map_or(0, |l| l.as_secs()),
        ..Default::default()
    };
    crate::transport::client::report(&config.agent.applier_url, transport, report).await;
}

/// Keeps the applier told (for `decant status`) of the copy's throttle in
/// force and the alerts firing: at start, on each change, and every 30 s
/// (an applier that restarted, or was not reachable, learns them then).
async fn report_controls(
    config: Config,
    transport: TransportSettings,
    mut limits: LiveLimits,
    mut firing: watch::Receiver<Vec<crate::alert::Firing>>,
) {
    loop {
        let l = *limits.borrow_and_update();
        let alerts = firing
            .borrow_and_update()
            .iter()
            .map(|f| FiringAlert { kind: f.kind.name().to_owned(), message: f.message.clone(), since: f.since.clone() })
            .collect();
        let report = HealthReport {
            task_id: config.task_id.clone(),
            has_controls: true,
            copy_max_rows_per_second: l.copy_max_rows_per_second,
            copy_max_mb_per_second: l.copy_max_mb_per_second,
            copy_max_source_queries_per_second: l.copy_max_source_queries_per_second,
            alerts,
            ..Default::default()
        };
        crate::transport::client::report(&config.agent.applier_url, &transport, report).await;
        tokio::select! {
            Ok(()) = limits.changed() => {}
            Ok(()) = firing.changed() => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
        }
    }
}

/// [`check`], alerting when the task cannot start.
async fn check_or_alert(config: &Config, sides: Sides, alerter: &Alerter) -> Result<(), TaskError> {
    let result = check(config, sides).await;
    if let Err(e) = &result {
        alerter.notify(Kind::Failure, State::Firing, format!("the agent cannot start: {}", crate::error::report(e)), 0.0, 0.0);
        alerter.flush().await;
    }
    result
}

/// Runs the precheck of `sides` and logs its warnings; an error refuses
/// the task.
async fn check(config: &Config, sides: Sides) -> Result<(), TaskError> {
    let report = precheck::run(config, sides).await?;
    report.log();
    match report.refusal() {
        Some(refusal) => Err(TaskError::Refused(refusal)),
        None => Ok(()),
    }
}

/// The source side of a task, checked: its phases through the applier at
/// `config.agent.applier_url`.
async fn drive(
    config: &Config,
    source: ConnInfo,
    transport: &TransportSettings,
    metrics: Arc<Metrics>,
    limits: LiveLimits,
    alerter: Alerter,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), TaskError> {
    let lag_watch = alerter.watch_lag(metrics.clone());
    let controls = tokio::spawn(report_controls(config.clone(), transport.clone(), limits.clone(), alerter.firing()));
    // One pace for the whole process: a session retried goes on at the
    // same rate.
    let pace = SharedPace::new(Side::Copy, limits);
    let result = drive_sessions(config, &source, transport, &metrics, &pace, &alerter, &mut shutdown).await;
    controls.abort();
    if let Some(watch) = lag_watch {
        watch.abort();
    }
    alerter.flush().await;
    result
}

/// Notifies what work succeeding after failures resolves.
fn resolve(alerter: &Alerter, episode: &mut FailureEpisode) {
    for kind in episode.succeeded() {
        alerter.notify(kind, State::Resolved, "the agent works again".into(), 0.0, 0.0);
    }
}

/// The session loop of [`drive`], with its retries and alerts.
async fn drive_sessions(
    config: &Config,
    source: &ConnInfo,
    transport: &TransportSettings,
    metrics: &Arc<Metrics>,
    pace: &SharedPace,
    alerter: &Alerter,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), TaskError> {
    let mut episode = FailureEpisode::default();
    let mut retry = Retry::new(config.connection_retry(), config.other_retry());
    let recovered = retry.recovered();
    tracing::info!(task = %config.task_id, source = %source, slot = %config.source.slot, applier = %config.agent.applier_url, "agent starting");
    // Until the first session streams, a connection that cannot be made ends
    // the agent with its error: at start that is almost always
    // configuration (and a service manager restarts the agent anyway).
    // Once streaming, lost connections are retried for the connection time.
    let mut streamed_once = false;
    // Schema and full copy first, when the task has them.
    let mut migrated = !config.migrate.has_phases_before_stream();
    loop {
        // Read again for every session: tables created on the source since
        // are claimed with the rest. Failing to read it fails the session.
        let claim = migrate::claim::claim(config, source).await;
        let claim = match claim {
            Ok(claim) if migrated => migrate::claim::record(config, transport, claim.clone()).await.map(|()| claim),
            claim => claim,
        };
        let result = match claim {
            Err(e) => Err(TaskError::Migrate(e)),
            Ok(_) if migrated => {
                let mut session = stream::Session::new(config, metrics);
                // The stream succeeding again resolves the failure alerts.
                let result = {
                    let run = session.run(source, transport, &mut retry, shutdown);
                    tokio::pin!(run);
                    loop {
                        tokio::select! {
                            result = &mut run => break result.map_err(TaskError::Stream),
                            _ = recovered.notified() => resolve(alerter, &mut episode),
                        }
                    }
                };
                streamed_once |= session.streaming;
                result
            }
            Ok(claim) => {
                // A stop request ends the phase at once: every step is its own
                // destination transaction, so one cut short is simply redone.
                let mut stop = shutdown.clone();
                let driven = tokio::select! {
                    r = migrate::drive(config, source, &claim, transport, metrics, pace, shutdown, &mut streamed_once) => r,
                    _ = stop.changed() => Ok(false),
                };
                match driven {
                    Ok(true) if !*shutdown.borrow() => {
                        migrated = true;
                        retry.succeeded();
                        resolve(alerter, &mut episode);
                        continue;
                    }
                    Ok(_) => return Ok(()),
                    Err(e) => Err(TaskError::Migrate(e)),
                }
            }
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_cut_over() => {
                tracing::info!(reason = %crate::error::report(&e), "the task was cut over; the agent stops");
                return Ok(());
            }
            Err(e) => {
                metrics.errors.inc();
                let report = crate::error::report(&e);
                if let Some(kind) = episode.failed() {
                    let message = format!("an agent session failed: {report}");
                    alerter.notify(kind, State::Firing, message, retry.failing_for().as_secs_f64(), 0.0);
                }
                let class = match e.class() {
                    ErrorClass::Connection if !streamed_once => ErrorClass::Fatal,
                    class => class,
                };
                match retry.failed(class) {
                    Some(wait) => {
                        metrics.retries.inc();
                        tracing::warn!(error = %report, retry_in_ms = wait.as_millis() as u64, failing_for_s = retry.failing_for().as_secs(), "agent session failed; retrying");
                        report_health(config, transport, "retrying", &e, Some(retry.window_left(class))).await;
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = shutdown.changed() => return Ok(()),
                        }
                    }
                    None => {
                        if class != ErrorClass::Fatal {
                            let failing_for = retry.failing_for();
                            tracing::error!(error = %report, failing_for_s = failing_for.as_secs(), "agent gives up: retry time exhausted");
                            if let Some(kind) = episode.exhausted() {
                                let message = format!("the agent gives up after {} s of retries: {report}", failing_for.as_secs());
                                alerter.notify(kind, State::Firing, message, failing_for.as_secs_f64(), 0.0);
                            }
                        }
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// `decant applier`: serves the task's destination until `shutdown` turns
/// true.
pub async fn run_applier(
    config: Config,
    metrics: Arc<Metrics>,
    limits: LiveLimits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), TaskError> {
    let destination = ConnInfo::parse(&config.destination.dsn, &ProcessEnv).map_err(TaskError::DestinationConnInfo)?;
    let listen: std::net::SocketAddr = config
        .applier
        .listen
        .parse()
        .map_err(|e: std::net::AddrParseError| TaskError::Listen(config.applier.listen.clone(), e.to_string()))?;
    let transport = TransportSettings::from_config(&config)?;
    transport.check_server(&config.applier.listen)?;
    check(&config, Sides::Destination).await?;
    tracing::info!(task = %config.task_id, destination = %destination, "applier starting");
    let service = crate::applier::Service::open(&config, destination, metrics, limits).await?;
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| TaskError::Listen(config.applier.listen.clone(), e.to_string()))?;
    server::serve(listener, server::Service::new(service), &transport, async move {
        let _ = shutdown.changed().await;
    })
    .await?;
    Ok(())
}

/// `decant migrate`: the applier served in this process on a loopback
/// port with a one-time token, and the agent driving the task through it.
pub async fn run_migrate(
    mut config: Config,
    metrics: Arc<Metrics>,
    limits: LiveLimits,
    shutdown: watch::Receiver<bool>,
) -> Result<(), TaskError> {
    let source = ConnInfo::parse(&config.source.dsn, &ProcessEnv).map_err(TaskError::SourceConnInfo)?;
    let destination = ConnInfo::parse(&config.destination.dsn, &ProcessEnv).map_err(TaskError::DestinationConnInfo)?;
    // Before the applier opens the destination, which creates its schema.
    let alerter = Alerter::start(&config.task_id, &config.alert);
    check_or_alert(&config, Sides::Both, &alerter).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    config.agent.applier_url = format!("http://127.0.0.1:{port}");
    config.transport = crate::config::Transport { token: one_time_token()?, ..Default::default() };
    let mut transport = TransportSettings::from_config(&config)?;
    let service = server::Service::new(crate::applier::Service::open(&config, destination, metrics.clone(), limits.clone()).await?);
    transport.in_process = Some(Arc::new(service.clone()));
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn({
        let transport = transport.clone();
        async move {
            server::serve(listener, service, &transport, async {
                let _ = server_stopped.await;
            })
            .await
        }
    });
    let result = drive(&config, source, &transport, metrics, limits, alerter, shutdown).await;
    if let Err(e) = &result {
        report_health(&config, &transport, "failed", e, None).await;
    }
    let _ = stop_server.send(());
    let _ = server.await;
    result
}

fn one_time_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 24];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
