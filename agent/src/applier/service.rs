//! The applier as the gRPC server's [`Destination`]: each call of the
//! service mapped to the destination work that answers it, and each error
//! to the status that tells the agent whether to retry.

use std::sync::Arc;
use std::time::Duration;

use decant_proto::grpc::{Claim, CopyDone, HealthReport, Hello, MigrationPlan, SequenceValue, TaskState};
use decant_proto::Lsn;
use tonic::Status;

use super::migration::{self, MigrationError};
use super::{Applier, ApplyError, ApplySettings};
use crate::config::Config;
use crate::connect::sql::connect;
use crate::connect::ConnInfo;
use crate::metrics::Metrics;
use crate::throttle::{LiveLimits, Pace, Side};
use crate::transport::cut_over_status;
use crate::transport::server::{Acks, ApplyStream, Batches, CopyChunks, Destination};

/// The destination of one task.
pub struct Service {
    task_id: String,
    destination: ConnInfo,
    settings: ApplySettings,
    metrics: Arc<Metrics>,
    /// The stream's throttle, as the role's reload handler changes it.
    limits: LiveLimits,
    table_steps: Arc<TableSteps>,
}

/// The post-data steps of each table run as soon as its copy is done
/// ([`migration::run_table_steps`]), one table at a time, beside the copy
/// of the others; the post-data phase waits for them before it starts.
#[derive(Default)]
struct TableSteps {
    running: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
}

impl TableSteps {
    fn start(&self, destination: &ConnInfo, task_id: &str, table_id: u32) {
        let (destination, task_id, turn) = (destination.clone(), task_id.to_owned(), self.one_at_a_time.clone());
        let build = tokio::spawn(async move {
            let _turn = turn.lock().await;
            match migration::run_table_steps(&destination, &task_id, table_id).await {
                Ok((_, 0)) => {}
                Ok((table, steps)) => tracing::info!(%table, steps, "built the indexes and keys of a copied table"),
                Err(e) => tracing::warn!(
                    error = %crate::error::report(&e),
                    "building the indexes and keys of a copied table failed; the post-data phase builds them"
                ),
            }
        });
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|h| !h.is_finished());
        running.push(build);
    }

    async fn wait(&self) {
        let running = std::mem::take(&mut *self.running.lock().unwrap_or_else(|e| e.into_inner()));
        for build in running {
            let _ = build.await;
        }
    }
}

impl Service {
    /// The destination is checked once here, so a wrong password or
    /// database is reported at start instead of on the first agent
    /// connection.
    pub async fn open(config: &Config, destination: ConnInfo, metrics: Arc<Metrics>, limits: LiveLimits) -> Result<Service, ApplyError> {
        let settings = settings(config);
        drop(Applier::open(&destination, settings.clone(), metrics.clone()).await?);
        tokio::spawn(record_throttle(destination.clone(), config.task_id.clone(), limits.clone()));
        Ok(Service { task_id: config.task_id.clone(), destination, settings, metrics, limits, table_steps: Default::default() })
    }
}

/// Keeps the stream's throttle in force recorded in the destination for
/// `decant status`: at start and after each change (retried every 10 s
/// while the destination cannot be reached).
async fn record_throttle(destination: ConnInfo, task_id: String, mut limits: LiveLimits) {
    loop {
        let current = *limits.borrow_and_update();
        let apply = [current.apply_max_rows_per_second, current.apply_max_mb_per_second];
        let recorded = async {
            let (client, _conn) = connect(&destination, "decant applier", "").await.map_err(|e| crate::error::report(&e))?;
            migration::record_applier_controls(&client, &task_id, apply).await.map_err(|e| crate::error::report(&e))
        }
        .await;
        match recorded {
            Ok(()) => {
                if limits.changed().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not record the stream's throttle in the destination; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = limits.changed() => {}
                }
            }
        }
    }
}

impl Service {
    /// A task that was cut over takes no stream: whatever the agent still
    /// has to send happened after the cutover, on a source the application
    /// no longer uses. Any other task is running again from here on.
    async fn admit_stream(&self) -> Result<(), Status> {
        let client = self.session().await?;
        match migration::cut_over(&client, &self.task_id).await.map_err(|e| unavailable(&e))? {
            None => migration::record_health(&client, &self.task_id, "running", "", None).await.map_err(|e| unavailable(&e)),
            Some(c) => Err(cut_over_status(format!(
                "task {} was cut over at {} (source position {}): the applier takes no more changes for it; stop its agent",
                self.task_id, c.at, c.source_lsn
            ))),
        }
    }

    /// Records what the task takes in the destination; an overlap with
    /// another task is a precondition the agent cannot retry past.
    async fn claim(&self, claim: &Claim) -> Result<(), Status> {
        let mut client = self.session().await?;
        migration::claim(&mut client, &self.task_id, claim).await.map_err(migration_status)
    }

    async fn record_health(&self, state: &str, reason: &str, retry_seconds_left: Option<u64>) -> Result<(), Status> {
        let client = self.session().await?;
        migration::record_health(&client, &self.task_id, state, reason, retry_seconds_left).await.map_err(|e| unavailable(&e))
    }

    /// A short destination session for the service's own bookkeeping.
    async fn session(&self) -> Result<tokio_postgres::Client, Status> {
        let (client, _conn) = connect(&self.destination, "decant applier", "").await.map_err(|e| unavailable(&e))?;
        Ok(client)
    }
}

fn unavailable(e: &(dyn std::error::Error + 'static)) -> Status {
    Status::unavailable(crate::error::report(e))
}

fn settings(config: &Config) -> ApplySettings {
    let a = &config.applier;
    ApplySettings {
        task_id: config.task_id.clone(),
        group_max_transactions: a.group_max_transactions,
        group_max_bytes: a.group_max_bytes,
        group_max_delay: Duration::from_millis(a.group_max_delay_ms),
        pipeline_depth: a.pipeline_depth,
        on_conflict: a.on_conflict,
        apply_truncate: a.apply_truncate,
        operations: config.operation_rules().expect("applier.operations is checked when the configuration is loaded"),
        apply_messages: a.apply_messages,
        split_merges: a.split_merges,
        mapping: Arc::new(config.mapping().expect("migrate.map is checked when the configuration is loaded")),
        ddl: config.migrate.ddl,
        selection: Arc::new(config.selection()),
    }
}

fn apply_status(e: &ApplyError) -> Status {
    let message = crate::error::report(e);
    match e {
        ApplyError::Corrupt { .. } => Status::data_loss(message),
        _ if e.is_connection_loss() => Status::unavailable(message),
        ApplyError::MissingTable { .. }
        | ApplyError::NoIdentity { .. }
        | ApplyError::MissingRow { .. }
        | ApplyError::Mapping { .. }
        | ApplyError::NeedsOldRow { .. }
        | ApplyError::DdlStopped { .. }
        | ApplyError::DdlNotReplayable { .. } => Status::failed_precondition(message),
        ApplyError::DdlFailed { .. } => Status::failed_precondition(message),
        _ => Status::aborted(message),
    }
}

fn migration_status(e: MigrationError) -> Status {
    let message = crate::error::report(&e);
    tracing::error!(error = %message, "migration step failed");
    if e.is_connection_loss() {
        Status::unavailable(message)
    } else if e.is_precondition() {
        Status::failed_precondition(message)
    } else {
        Status::aborted(message)
    }
}

#[tonic::async_trait]
impl Destination for Service {
    type Stream = Stream;

    fn task_id(&self) -> &str {
        &self.task_id
    }

    async fn plan(&self, plan: Option<MigrationPlan>, claim: Option<Claim>, mapping: &str) -> Result<TaskState, Status> {
        if mapping != self.settings.mapping.fingerprint() {
            return Err(Status::failed_precondition(
                "the agent's migrate.map entries differ from the applier's: give both roles the same migrate.map, then restart them",
            ));
        }
        if let Some(claim) = &claim {
            self.claim(claim).await?;
        }
        let state = match plan {
            Some(plan) => migration::plan(&self.destination, &self.task_id, plan, &self.settings.mapping).await,
            None => migration::state(&self.destination, &self.task_id, &self.settings.mapping).await,
        }
        .map_err(migration_status)?;
        // An agent starts every run of the migration phases here.
        self.record_health("running", "", None).await?;
        Ok(state)
    }

    async fn report(&self, report: &HealthReport) -> Result<(), Status> {
        if report.has_controls {
            let copy = [report.copy_max_rows_per_second, report.copy_max_mb_per_second, report.copy_max_source_queries_per_second];
            let alerts: Vec<serde_json::Value> = report
                .alerts
                .iter()
                .map(|a| serde_json::json!({"kind": a.kind, "message": crate::secrets::redact(&a.message), "since": a.since}))
                .collect();
            let alerts = serde_json::Value::Array(alerts).to_string();
            let client = self.session().await?;
            migration::record_agent_controls(&client, &self.task_id, copy, &alerts).await.map_err(|e| unavailable(&e))?;
        }
        if report.state.is_empty() {
            return Ok(());
        }
        let left = (report.state == "retrying").then_some(report.retry_seconds_left);
        self.record_health(&report.state, &crate::secrets::redact(&report.reason), left).await
    }

    async fn schema(&self, section: &str, workers: usize, sequences: &[SequenceValue]) -> Result<TaskState, Status> {
        if section == "post-data" {
            self.table_steps.wait().await;
        }
        migration::run_schema(&self.destination, &self.task_id, section, workers, sequences, &self.settings.mapping)
            .await
            .map_err(migration_status)
    }

    async fn copy(&self, table_id: u32, range_id: u32, chunks: CopyChunks) -> Result<CopyDone, Status> {
        let (done, table_steps_ready) =
            migration::copy_range(&self.destination, &self.settings.mapping, &self.task_id, table_id, range_id, chunks)
                .await
                .map_err(migration_status)?;
        if table_steps_ready {
            self.table_steps.start(&self.destination, &self.task_id, table_id);
        }
        Ok(done)
    }

    async fn resnapshot(&self, lsn: Lsn) -> Result<TaskState, Status> {
        migration::resnapshot(&self.destination, &self.task_id, lsn).await.map_err(migration_status)
    }

    async fn open_stream(&self, _hello: &Hello) -> Result<Stream, Status> {
        self.admit_stream().await?;
        let applier = Applier::open(&self.destination, self.settings.clone(), self.metrics.clone()).await.map_err(|e| apply_status(&e))?;
        Ok(Stream { applier, metrics: self.metrics.clone(), pace: Pace::new(Side::Apply, self.limits.clone()) })
    }
}

/// One agent's stream applied on the destination.
pub struct Stream {
    applier: Applier,
    metrics: Arc<Metrics>,
    pace: Pace,
}

#[tonic::async_trait]
impl ApplyStream for Stream {
    fn resume_lsn(&self) -> Lsn {
        self.applier.resume_lsn()
    }

    /// Applies batches as they come; a group is committed when no input is
    /// waiting (or by the applier's own bounds), and the durable position
    /// is read back every 50 ms while commits are not yet known durable.
    /// Throttled (applier.max_rows_per_second, max_mb_per_second), it takes
    /// no batch until the pace allows: the agent's window fills and it
    /// stops reading the slot, so nothing piles up on either side.
    async fn run(&mut self, mut batches: Batches, acks: &Acks) -> Result<(), Status> {
        let applier = &mut self.applier;
        let pace = &mut self.pace;
        let mut applied_sequence = 0;
        let mut durable = applier.resume_lsn();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let commit_ended = applier.commit_ended();
        let mut paused_until: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                next = batches.recv(), if paused_until.is_none() => {
                    let Some(next) = next else { return Ok(()) };
                    let (sequence, records) = next?;
                    let changes = self.metrics.changes.get();
                    applier.apply_batch(sequence, &records).await.map_err(|e| apply_status(&e))?;
                    applied_sequence = sequence;
                    let ready = pace.take(self.metrics.changes.get() - changes, records.len() as u64);
                    if ready > std::time::Instant::now() {
                        // What was applied is committed before the pause,
                        // not held in an open transaction through it.
                        paused_until = Some(ready);
                        applier.flush().await.map_err(|e| apply_status(&e))?;
                    } else if batches.is_empty() {
                        applier.flush().await.map_err(|e| apply_status(&e))?;
                    }
                    acks.send(durable, applied_sequence);
                }
                _ = tokio::time::sleep_until(paused_until.unwrap_or_else(std::time::Instant::now).into()), if paused_until.is_some() => {
                    paused_until = None;
                }
                // New limits start afresh: the pause ends at once.
                _ = pace.changed(), if paused_until.is_some() => {
                    paused_until = None;
                }
                // A group kept open while the previous one committed is
                // committed now if no input is waiting.
                _ = commit_ended.notified() => {
                    if batches.is_empty() {
                        applier.flush().await.map_err(|e| apply_status(&e))?;
                    }
                }
                _ = tick.tick() => {
                    if applier.session_ended() {
                        return Err(Status::unavailable("the destination ended the applier's session; the agent reconnects"));
                    }
                    applier.flush().await.map_err(|e| apply_status(&e))?;
                    if applier.has_undurable_commits() {
                        let lsn = applier.durable_lsn().await.map_err(|e| apply_status(&e))?;
                        if lsn != durable {
                            durable = lsn;
                            self.metrics.applied_lsn.set(lsn.0);
                            acks.send(durable, applied_sequence);
                        }
                    }
                }
            }
        }
    }

    /// A commit in flight finishes, an open group is rolled back: the next
    /// stream then reads a position no commit will pass later.
    async fn settle(&mut self, ended: &Result<(), Status>) {
        if let Err(e) = ended {
            if !matches!(e.code(), tonic::Code::Cancelled | tonic::Code::Unknown) {
                self.metrics.errors.inc();
            }
        }
        self.applier.abort().await;
    }
}
