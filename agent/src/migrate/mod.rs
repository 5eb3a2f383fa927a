//! The migration task's phases before the incremental stream — schema
//! (pre-data), full copy, schema (post-data) — driven from the source side
//! through the applier's gRPC service, so they run the same whether agent
//! and applier are one process (`decant migrate`) or two services.
//!
//! The consistent snapshot comes from `CREATE_REPLICATION_SLOT … LOGICAL
//! decant EXPORT_SNAPSHOT`: pg_dump and every copy worker import it while
//! the creating replication connection is held open, and the stream later
//! starts at the slot's consistent point, so the handover neither loses nor
//! repeats a change.

pub mod claim;
pub mod copy;
pub mod display;
pub mod encoding;
pub mod keys;
pub mod schema;
pub mod tables;

use std::sync::Arc;

use decant_proto::grpc::{Claim, MigrationPlan, PlanRequest, ResnapshotRequest, SchemaRequest, TaskState};
use decant_proto::{Lsn, FORMAT_VERSION};
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::{Config, MigrationType};
use crate::connect::sql::quote_literal;
use crate::connect::sql::{connect, ConnectError};
use crate::connect::ConnInfo;
use crate::metrics::Metrics;
use crate::replication::{ReplicationClient, ReplicationError};
use crate::retry::ErrorClass;
use crate::throttle::SharedPace;
use crate::transport::client::{connect as connect_applier, Client as ApplierClient, StreamError};
use crate::transport::TransportSettings;
use schema::{PgDump, SchemaError};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("source: {0}")]
    Connect(#[from] ConnectError),
    #[error("source: {0}")]
    Source(#[from] tokio_postgres::Error),
    #[error("source: {0}")]
    Replication(#[from] ReplicationError),
    #[error("{0}")]
    Applier(#[from] StreamError),
    #[error("{0}")]
    Schema(#[from] SchemaError),
    #[error("{0}")]
    Invalid(String),
    #[error("copy of {table}: {message}")]
    Copy { table: String, message: String, class: ErrorClass },
}

impl MigrateError {
    pub fn class(&self) -> ErrorClass {
        fn pg(e: &tokio_postgres::Error) -> ErrorClass {
            match e.code().map(|c| c.code()) {
                None => ErrorClass::Connection,
                Some(c) if c.starts_with("08") || c.starts_with("57P") => ErrorClass::Connection,
                Some("28P01" | "28000" | "3D000" | "42501" | "42P01") => ErrorClass::Fatal,
                _ => ErrorClass::Other,
            }
        }
        match self {
            MigrateError::Connect(ConnectError::Postgres { source, .. }) => pg(source),
            MigrateError::Connect(ConnectError::Tls(_)) => ErrorClass::Fatal,
            MigrateError::Source(e) => pg(e),
            MigrateError::Replication(e) if e.is_connection_loss() => ErrorClass::Connection,
            MigrateError::Replication(e) => match e.code() {
                Some("28P01" | "28000" | "55000" | "58P01" | "42501" | "3D000" | "42710") => ErrorClass::Fatal,
                _ => ErrorClass::Other,
            },
            MigrateError::Applier(e) if e.is_connection_loss() => ErrorClass::Connection,
            MigrateError::Applier(StreamError::Status(s))
                if matches!(
                    s.code(),
                    tonic::Code::FailedPrecondition
                        | tonic::Code::PermissionDenied
                        | tonic::Code::Unauthenticated
                        | tonic::Code::InvalidArgument
                ) =>
            {
                ErrorClass::Fatal
            }
            MigrateError::Applier(_) => ErrorClass::Other,
            MigrateError::Schema(_) | MigrateError::Invalid(_) => ErrorClass::Fatal,
            MigrateError::Copy { class, .. } => *class,
        }
    }
}

fn status(s: tonic::Status) -> MigrateError {
    MigrateError::Applier(StreamError::Status(s))
}

/// A snapshot exported by the source, valid while `holder` stays open.
pub struct Snapshot {
    pub id: String,
    /// The LSN the snapshot corresponds to (0 when taken without a slot).
    pub lsn: Lsn,
    _holder: Holder,
}

/// The session that exported a snapshot: only held, never used again.
#[allow(dead_code)]
enum Holder {
    Replication(ReplicationClient),
    Sql(Client),
}

/// Opens a source session inside `snapshot` (one query, paced).
pub async fn snapshot_session(source: &ConnInfo, snapshot: &str, name: &str, pace: &SharedPace) -> Result<Client, MigrateError> {
    let (client, _conn) = connect(source, name, "").await?;
    pace.query().await;
    client
        .batch_execute(&format!("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}", quote_literal(snapshot)))
        .await?;
    Ok(client)
}

/// Runs the phases that are not done yet. Returns whether the task goes
/// on with the incremental stream. `connected` turns true once both ends
/// answered (from then on lost connections are retried). The task's
/// `claim` is recorded first: an overlap with another task refuses it
/// before anything is written. Every SQL statement sent to the source
/// waits its turn at `pace`.
#[allow(clippy::too_many_arguments)] // the task's context, handed through from `task`
pub async fn drive(
    config: &Config,
    source: &ConnInfo,
    claim: &Claim,
    transport: &TransportSettings,
    metrics: &Arc<Metrics>,
    pace: &SharedPace,
    shutdown: &watch::Receiver<bool>,
    connected: &mut bool,
) -> Result<bool, MigrateError> {
    let task_id = config.task_id.clone();
    let mut applier = connect_applier(&config.agent.applier_url, transport).await?;
    let mapping = config.mapping().map_err(|e| MigrateError::Invalid(e.to_string()))?;
    let mapping = mapping.fingerprint();
    let mut state = plan(&mut applier, &task_id, None, Some(claim.clone()), mapping).await?;
    *connected = true;
    check_types(config, &state)?;
    let incremental = config.migrate.has(MigrationType::Incremental);
    let mut snapshot = None;
    if state.phase == "new" {
        let snap = take_snapshot(config, source, SnapshotKind::Initial, pace).await?;
        let plan_body = build_plan(config, source, &snap, pace).await?;
        state = plan(&mut applier, &task_id, Some(plan_body), None, mapping).await?;
        tracing::info!(tables = state.tables.len(), snapshot_lsn = %Lsn(state.snapshot_lsn), "task planned");
        snapshot = Some(snap);
    }
    if state.phase == "schema" {
        tracing::info!("schema: creating pre-data objects");
        state = applier
            .schema(SchemaRequest { task_id: task_id.clone(), section: "pre-data".into(), workers: 1, sequences: vec![] })
            .await
            .map_err(status)?
            .into_inner();
        if !state.existing.is_empty() {
            tracing::warn!(objects = %state.existing.join(", "), "kept objects that already existed in the destination (migrate.conflicts = ignore)");
        }
    }
    if *shutdown.borrow() {
        return Ok(false);
    }
    if state.phase == "copy" {
        let snap = match snapshot.take() {
            Some(s) => s,
            None => {
                // The first snapshot ended with the process that took it:
                // unfinished tables are copied again from a new one.
                let snap = take_snapshot(config, source, SnapshotKind::Resume, pace).await?;
                tracing::info!(lsn = %snap.lsn, "copy resumes from a new snapshot");
                state = applier
                    .resnapshot(ResnapshotRequest { task_id: task_id.clone(), lsn: if incremental { snap.lsn.0 } else { 0 } })
                    .await
                    .map_err(status)?
                    .into_inner();
                snap
            }
        };
        if !state.reads_framed_copy {
            return Err(MigrateError::Invalid(
                "the applier is older than this agent and reads the copy's data in another form: upgrade the applier to this agent's version".into(),
            ));
        }
        let link = crate::transport::client::CopyLink::new(&applier, transport);
        if !copy::run(config, source, &link, &state, snap, metrics, pace, shutdown.clone()).await? {
            return Ok(false);
        }
    }
    if state.phase == "copy" || state.phase == "post-data" {
        let sequences = if config.migrate.has(MigrationType::Full) {
            let (client, _conn) = connect(source, "decant migrate", "").await?;
            tables::sequence_values(&client, config, pace).await?
        } else {
            Vec::new()
        };
        tracing::info!(sequences = sequences.len(), "schema: setting sequences and building post-data objects");
        state = applier
            .schema(SchemaRequest {
                task_id: task_id.clone(),
                section: "post-data".into(),
                workers: config.migrate.workers as u32,
                sequences,
            })
            .await
            .map_err(status)?
            .into_inner();
    }
    tracing::info!(phase = %state.phase, "migration phases done");
    Ok(state.phase == "incremental")
}

async fn plan(
    applier: &mut ApplierClient,
    task_id: &str,
    plan: Option<MigrationPlan>,
    claim: Option<Claim>,
    mapping: &str,
) -> Result<TaskState, MigrateError> {
    let request =
        PlanRequest { task_id: task_id.to_owned(), format_version: u32::from(FORMAT_VERSION), plan, claim, mapping: mapping.to_owned() };
    Ok(applier.plan(request).await.map_err(status)?.into_inner())
}

/// A task keeps the types it was planned with.
fn check_types(config: &Config, state: &TaskState) -> Result<(), MigrateError> {
    if state.phase == "new" {
        return Ok(());
    }
    let mut configured: Vec<&str> = config.migrate.types.iter().map(|t| t.name()).collect();
    configured.sort();
    let mut planned: Vec<&str> = state.types.iter().map(String::as_str).collect();
    planned.sort();
    if configured != planned {
        return Err(MigrateError::Invalid(format!(
            "task {} was started with migrate.types = {planned:?}, now configured as {configured:?}; \
             use another task_id for a new task (or DROP SCHEMA decant CASCADE in the destination to start this one over)",
            config.task_id
        )));
    }
    Ok(())
}

enum SnapshotKind {
    /// The task's start: the slot the stream will read (when incremental).
    Initial,
    /// A restart during the copy.
    Resume,
}

async fn take_snapshot(config: &Config, source: &ConnInfo, kind: SnapshotKind, pace: &SharedPace) -> Result<Snapshot, MigrateError> {
    if !config.migrate.has(MigrationType::Incremental) {
        // No stream to hand over to: an ordinary exported snapshot.
        let (client, _conn) = connect(source, "decant snapshot", "").await?;
        pace.query().await;
        client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await?;
        pace.query().await;
        let id: String = client.query_one("SELECT pg_export_snapshot()", &[]).await?.get(0);
        return Ok(Snapshot { id, lsn: Lsn(0), _holder: Holder::Sql(client) });
    }
    let mut repl = ReplicationClient::connect(source, "decant snapshot").await?;
    let slot = &config.source.slot;
    let created = match kind {
        SnapshotKind::Initial => {
            let existing = repl
                .simple_query(&format!(
                    "SELECT plugin, active_pid::text FROM pg_replication_slots WHERE slot_name = {}",
                    quote_literal(slot)
                ))
                .await?;
            if let Some(row) = existing.first() {
                // Never dropped here: it may be another task's.
                let plugin = row.first().cloned().flatten().unwrap_or_default();
                return Err(MigrateError::Invalid(format!(
                    "source slot {slot:?} already exists (plugin {plugin}) but the destination has no plan for task {}: \
                     choose another source.slot, or, if nothing uses it (an earlier start of this task that stopped \
                     before its plan was stored), drop it: SELECT pg_drop_replication_slot('{slot}')",
                    config.task_id
                )));
            }
            let (_, created) = crate::replication::decoder::create_slot(&mut repl, &config.source, true).await.map_err(|e| match e {
                crate::replication::decoder::PublicationError::Source(e) => MigrateError::from(e),
                other => MigrateError::Invalid(format!("source slot {slot:?} cannot be created: {other}")),
            })?;
            created
        }
        SnapshotKind::Resume => {
            let plugin = repl
                .simple_query(&format!("SELECT plugin FROM pg_replication_slots WHERE slot_name = {}", quote_literal(slot)))
                .await?
                .first()
                .and_then(|row| row.first().cloned().flatten());
            let Some(plugin) = plugin else {
                return Err(MigrateError::Invalid(format!(
                    "source slot {slot:?} of task {} is gone, so the changes since the copy began are lost: \
                     start the task over (DROP SCHEMA decant CASCADE and the migrated objects in the destination)",
                    config.task_id
                )));
            };
            // Only its snapshot is used: the task's own plugin exists.
            repl.create_temporary_slot(&format!("{}_copy", slot.chars().take(58).collect::<String>()), &plugin).await?
        }
    };
    let id = created.snapshot.ok_or_else(|| MigrateError::Invalid("the source exported no snapshot".into()))?;
    tracing::info!(slot = %created.name, consistent_point = %created.consistent_point, snapshot = %id, "snapshot taken");
    Ok(Snapshot { id, lsn: created.consistent_point, _holder: Holder::Replication(repl) })
}

/// Reads the schema and the tables to copy, inside the snapshot.
async fn build_plan(config: &Config, source: &ConnInfo, snapshot: &Snapshot, pace: &SharedPace) -> Result<MigrationPlan, MigrateError> {
    let client = snapshot_session(source, &snapshot.id, "decant migrate", pace).await?;
    pace.query().await;
    let version: i32 = client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
    let version = version as u32;
    let mut plan = MigrationPlan {
        types: config.migrate.types.iter().map(|t| t.name().to_owned()).collect(),
        conflicts: config.migrate.conflicts.name().to_owned(),
        snapshot_lsn: snapshot.lsn.0,
        ..Default::default()
    };
    let tables = tables::list_tables(&client, config, version, pace).await?;
    check_selection(config, &tables)?;
    if config.migrate.has(MigrationType::Schema) {
        let pg_dump = PgDump::locate(&config.migrate.pg_dump, version / 10000)?;
        let selection = schema::selection_args(config);
        // The two sections at once: each pg_dump spends most of its time
        // waiting on catalog queries.
        let (pre, post) = tokio::try_join!(
            pg_dump.dump(&config.source.dsn, source, "pre-data", Some(&snapshot.id), &selection),
            pg_dump.dump(&config.source.dsn, source, "post-data", Some(&snapshot.id), &selection),
        )?;
        let (pre, post) = (schema::split_dump(&pre)?, schema::split_dump(&post)?);
        tracing::info!(pg_dump = %pg_dump.path().display(), pre_data = pre.steps.len(), post_data = post.steps.len(), "schema dumped");
        plan.schema_prologue = pre.prologue;
        plan.pre_data = pre.steps;
        if !schema::selects_whole_schemas(config) {
            // pg_dump --table dumps the tables, not the schemas they are in.
            let mut schemas: Vec<&str> = tables.iter().map(|t| t.schema.as_str()).filter(|s| *s != "public").collect();
            schemas.sort();
            schemas.dedup();
            let creates = schemas.into_iter().map(|s| decant_proto::grpc::SchemaStep {
                kind: "SCHEMA".into(),
                schema: String::new(),
                name: s.to_owned(),
                sql: format!("CREATE SCHEMA IF NOT EXISTS {};", crate::connect::sql::quote_ident(s)),
                ..Default::default()
            });
            plan.pre_data.splice(0..0, creates);
        }
        plan.post_data = post.steps;
        schema::order_post_data(&mut plan.post_data);
        if config.migrate.has(MigrationType::Full) {
            tables::mark_table_steps(&client, version, &mut plan.post_data, &tables, pace).await?;
        }
        // migrate.map's renames, last and in one step: everything before
        // them (the copy included) uses the source names.
        let selected: Vec<(String, String, Vec<String>)> =
            tables.iter().map(|t| (t.schema.clone(), t.name.clone(), t.columns.clone())).collect();
        let renames = config.mapping().map_err(|e| MigrateError::Invalid(e.to_string()))?.rename_sql(&selected);
        if !renames.is_empty() {
            plan.post_data.push(decant_proto::grpc::SchemaStep {
                kind: "RENAME".into(),
                name: "migrate.map".into(),
                sql: renames.join("\n"),
                ..Default::default()
            });
        }
    }
    if config.migrate.has(MigrationType::Full) {
        plan.tables = tables;
    }
    Ok(plan)
}

/// Every pattern without a wildcard must name a table that exists.
fn check_selection(config: &Config, tables: &[decant_proto::grpc::TablePlan]) -> Result<(), MigrateError> {
    let missing: Vec<&String> = config
        .source
        .include_tables
        .iter()
        .filter(|p| !p.contains('*'))
        .filter(|p| !tables.iter().any(|t| format!("{}.{}", t.schema, t.name) == **p))
        .collect();
    if !missing.is_empty() {
        return Err(MigrateError::Invalid(format!(
            "source.include_tables: no such table on the source: {}",
            missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}
