//! The destination side of schema migration and full copy. The task's plan
//! and progress live in the destination (schema `decant`), and every step —
//! one schema object, one copied range — is marked done in the same
//! transaction that does it, so a task killed at any moment resumes
//! without redoing finished work and without duplicates.
//!
//! `store` keeps the plan and the task's state, `schema` runs the dumped
//! schema steps, `copy` loads copied ranges; this module holds what they
//! share: the error type and the task's destination sessions.

mod claim;
mod copy;
mod schema;
mod store;

pub use claim::{claim, tasks};
pub use copy::{copy_range, skip_before};
pub use schema::{run_schema, run_table_steps};
pub use store::{
    controls, cut_over, health, mark_cut_over, plan, record_agent_controls, record_applier_controls, record_health, resnapshot, state,
    Controls, CutOver, Health,
};

use decant_proto::grpc::SchemaStep;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::connect::sql::quote_ident;
use crate::connect::sql::{connect, ConnectError};
use crate::connect::wire::{WireError, WireSession};
use crate::connect::ConnInfo;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("destination: {0}")]
    Session(#[from] tokio_postgres::Error),
    #[error(
        "these objects already exist in the destination (migrate.conflicts = report; nothing was written): {}; \
         drop them, migrate into another database, or set migrate.conflicts = \"ignore\" to keep them",
        .0.join(", ")
    )]
    Conflicts(Vec<String>),
    #[error(
        "these tables do not exist in the destination: {}; add \"schema\" to migrate.types, or create them",
        .0.join(", ")
    )]
    MissingTables(Vec<String>),
    #[error("{section} step {kind} {name} failed on the destination: {source}")]
    Step { section: String, kind: String, name: String, source: tokio_postgres::Error },
    #[error(
        "pre-data step {step} cannot run on the destination: {source} (found by the trial run of the pre-data steps; \
         nothing was written)"
    )]
    Trial { step: String, source: tokio_postgres::Error },
    #[error("sequence {0} does not exist in the destination: {1}")]
    Sequence(String, tokio_postgres::Error),
    #[error("task {0}: {1}")]
    State(String, String),
    #[error("destination: {0}")]
    Wire(#[from] WireError),
    #[error("copy of {table}: {source}")]
    Copy { table: String, source: WireError },
    #[error("copy of {table}: the agent's stream failed: {message}")]
    Stream { table: String, message: String },
    #[error(
        "task {task} overlaps task {other} in this destination: {}; nothing was written. Each table (and each schema \
         selected whole, and each slot) belongs to one task: change source.include_tables / source.exclude_tables (or \
         source.slot) of one of them, or finish task {other} first (decant cutover --config <its file>)",
        claim::overlap_list(.overlap)
    )]
    Overlap { task: String, other: String, overlap: Vec<String> },
}

impl MigrationError {
    pub fn is_connection_loss(&self) -> bool {
        let pg = match self {
            MigrationError::Connect(e) => return e.postgres().is_none_or(|e| e.as_db_error().is_none()),
            MigrationError::Wire(e) | MigrationError::Copy { source: e, .. } => return e.is_connection_loss(),
            MigrationError::Session(e) | MigrationError::Step { source: e, .. } | MigrationError::Trial { source: e, .. } => e,
            MigrationError::Stream { .. } => return true,
            _ => return false,
        };
        crate::connect::sql::is_connection_loss(pg)
    }

    /// Errors that retrying cannot fix.
    pub fn is_precondition(&self) -> bool {
        matches!(
            self,
            MigrationError::Conflicts(_)
                | MigrationError::Overlap { .. }
                | MigrationError::MissingTables(_)
                | MigrationError::Sequence(..)
                | MigrationError::State(..)
        ) || matches!(self, MigrationError::Step { source, .. } | MigrationError::Trial { source, .. }
                if source.as_db_error().is_some() && !self.is_connection_loss())
    }
}

/// A destination session of the task's migration; its application_name
/// names the task, so sessions left by a killed run can be found.
async fn session(destination: &ConnInfo, task_id: &str) -> Result<Client, MigrationError> {
    let (client, _conn) = connect(&named_for_task(destination), &session_name(task_id), SESSION_SETTINGS).await?;
    Ok(client)
}

/// The copy's destination session, on decant's own protocol session so
/// that COPY data is written as it came (`connect::wire::copy`).
async fn wire_session(destination: &ConnInfo, task_id: &str) -> Result<WireSession, MigrationError> {
    Ok(WireSession::connect(&named_for_task(destination), &session_name(task_id), false, SESSION_SETTINGS).await?)
}

/// Every session of the migration is named after its task alone, so that
/// sessions left by a killed run can be found.
fn named_for_task(destination: &ConnInfo) -> ConnInfo {
    ConnInfo { application_name: None, ..destination.clone() }
}

/// The settings of the migration's destination sessions: no triggers or
/// foreign key checks (the source has checked the data), and commits
/// that do not wait for the disk (a range lost with them is copied again,
/// as it was never marked done).
const SESSION_SETTINGS: &str = "-c session_replication_role=replica -c synchronous_commit=off";

fn session_name(task_id: &str) -> String {
    format!("decant migrate {task_id}")
}

/// Ends the destination sessions of an earlier run of this task. A killed
/// run's backend goes on with its statement (a CREATE INDEX, say) until it
/// next talks to its client; redoing that step beside it would collide.
async fn end_leftover_sessions(client: &Client, task_id: &str) -> Result<(), MigrationError> {
    let name = session_name(task_id);
    for _ in 0..300 {
        let pids: Vec<i32> = client
            .query("SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()", &[&name])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if pids.is_empty() {
            return Ok(());
        }
        for pid in &pids {
            tracing::info!(pid, "ending a destination session left by an earlier run of this task");
            client.execute("SELECT pg_terminate_backend($1)", &[pid]).await?;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(MigrationError::State(task_id.into(), "sessions of an earlier run do not end (pg_terminate_backend)".into()))
}

/// Duplicate-object errors: the object a step creates is already there.
fn is_duplicate(e: &tokio_postgres::Error) -> bool {
    let Some(db) = e.as_db_error() else { return false };
    let code = db.code();
    *code == SqlState::DUPLICATE_SCHEMA
        || *code == SqlState::DUPLICATE_TABLE
        || *code == SqlState::DUPLICATE_OBJECT
        || *code == SqlState::DUPLICATE_FUNCTION
        || (*code == SqlState::INVALID_TABLE_DEFINITION && db.message().contains("multiple primary keys"))
}

fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

fn step_label(s: &SchemaStep) -> String {
    if s.schema.is_empty() {
        format!("{} {}", s.kind, s.name)
    } else {
        format!("{} {}.{}", s.kind, s.schema, s.name)
    }
}

const CREATE_TABLES: &str = "CREATE SCHEMA IF NOT EXISTS decant;
CREATE TABLE IF NOT EXISTS decant.task (
    task_id text PRIMARY KEY,
    phase text NOT NULL,
    types text[] NOT NULL,
    conflicts text NOT NULL,
    snapshot_lsn pg_lsn NOT NULL,
    prologue text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS decant.schema_step (
    task_id text NOT NULL,
    section text NOT NULL,
    step int NOT NULL,
    kind text NOT NULL,
    schema_name text NOT NULL,
    name text NOT NULL,
    sql text NOT NULL,
    done_at timestamptz,
    existed boolean NOT NULL DEFAULT false,
    step_order int NOT NULL DEFAULT 0,
    after_table text NOT NULL DEFAULT '',
    PRIMARY KEY (task_id, section, step)
);
CREATE TABLE IF NOT EXISTS decant.copy_table (
    task_id text NOT NULL,
    table_id int NOT NULL,
    schema_name text NOT NULL,
    name text NOT NULL,
    columns text[] NOT NULL,
    types text[] NOT NULL,
    binary_ok boolean NOT NULL,
    bytes int8 NOT NULL,
    merge boolean NOT NULL DEFAULT false,
    skip_before pg_lsn,
    key_columns text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (task_id, table_id)
);
CREATE TABLE IF NOT EXISTS decant.copy_range (
    task_id text NOT NULL,
    table_id int NOT NULL,
    range_id int NOT NULL,
    condition text NOT NULL,
    started_at timestamptz,
    done_at timestamptz,
    rows int8 NOT NULL DEFAULT 0,
    bytes int8 NOT NULL DEFAULT 0,
    first_page int8,
    end_page int8,
    key_from text[],
    key_to text[],
    PRIMARY KEY (task_id, table_id, range_id)
);
-- A range is its heap pages [first_page, end_page) (NULL: open), from
-- which the source builds its SQL; condition is '' (destinations planned
-- by older versions hold the range as text there, read only as numbers).
-- Checked first, so that a destination already upgraded takes no lock.
DO $$BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'decant.copy_range'::regclass AND attname = 'end_page') THEN
        ALTER TABLE decant.copy_range ADD COLUMN IF NOT EXISTS first_page int8, ADD COLUMN IF NOT EXISTS end_page int8;
    END IF;
    -- Key ranges (sources before PostgreSQL 14): the key's columns, and
    -- each range's key values [key_from, key_to) (NULL: open).
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'decant.copy_range'::regclass AND attname = 'key_to') THEN
        ALTER TABLE decant.copy_table ADD COLUMN IF NOT EXISTS key_columns text[] NOT NULL DEFAULT '{}';
        ALTER TABLE decant.copy_range ADD COLUMN IF NOT EXISTS key_from text[], ADD COLUMN IF NOT EXISTS key_to text[];
    END IF;
    -- How the applier schedules a step (decant_proto StepOrder); steps
    -- planned before it existed run one at a time, in order.
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'decant.schema_step'::regclass AND attname = 'step_order') THEN
        ALTER TABLE decant.schema_step ADD COLUMN IF NOT EXISTS step_order int NOT NULL DEFAULT 0;
    END IF;
    -- The copied table a post-data step needs alone ('': the whole copy).
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'decant.schema_step'::regclass AND attname = 'after_table') THEN
        ALTER TABLE decant.schema_step ADD COLUMN IF NOT EXISTS after_table text NOT NULL DEFAULT '';
    END IF;
    -- The task's migrate.map in canonical form ('' for none, as for tasks
    -- planned before it existed).
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'decant.task'::regclass AND attname = 'mapping') THEN
        ALTER TABLE decant.task ADD COLUMN IF NOT EXISTS mapping text NOT NULL DEFAULT '';
    END IF;
END$$;
-- How the task is doing, for decant status: running, or retrying / failed
-- as the agent reported it; since: when that state began.
CREATE TABLE IF NOT EXISTS decant.health (
    task_id text PRIMARY KEY,
    state text NOT NULL,
    reason text NOT NULL DEFAULT '',
    retry_until timestamptz,
    since timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- The controls in force, for decant status: the copy's throttle and the
-- alerts firing as the agent reported them, the stream's throttle as the
-- applier applies it (NULL: not reported yet; 0: unlimited).
CREATE TABLE IF NOT EXISTS decant.controls (
    task_id text PRIMARY KEY,
    copy_max_rows_per_second int8,
    copy_max_mb_per_second int8,
    copy_max_source_queries_per_second int8,
    apply_max_rows_per_second int8,
    apply_max_mb_per_second int8,
    alerts text NOT NULL DEFAULT '[]',
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- A task that was cut over: its applier takes no stream any more.
CREATE TABLE IF NOT EXISTS decant.cutover (
    task_id text PRIMARY KEY,
    cut_over_at timestamptz NOT NULL DEFAULT now(),
    source_lsn pg_lsn NOT NULL,
    sequences int NOT NULL
);
-- What each task takes: its tables ('table', schema, name), the schemas
-- its schema phase creates whole ('schema', schema, ''), its slot ('slot',
-- the source's system identifier, slot name). One task per object.
CREATE TABLE IF NOT EXISTS decant.claim (
    task_id text NOT NULL,
    kind text NOT NULL,
    schema_name text NOT NULL,
    name text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, schema_name, name)
);
COMMENT ON TABLE decant.task IS 'decant: migration tasks, their plan and phase';";

/// Creates decant's tables in the destination when missing.
pub async fn ensure_tables(client: &Client) -> Result<(), tokio_postgres::Error> {
    crate::applier::progress::create_decant_objects(client, CREATE_TABLES).await
}
