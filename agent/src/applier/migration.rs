//! The destination side of schema migration and full copy. The task's plan
//! and progress live in the destination (schema `decant`), and every step —
//! one schema object, one copied range — is marked done in the same
//! transaction that does it, so a task killed at any moment resumes
//! without redoing finished work and without duplicates.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use decant_proto::grpc::{CopyDone, MigrationPlan, PageRange, RangeState, SchemaStep, SequenceValue, TableState, TaskState};
use decant_proto::Lsn;
use futures_util::SinkExt;
use tokio::sync::Mutex;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::connect::sql::{column_list, quote_ident};
use crate::connect::sql::{connect, ConnectError, BINARY_IO};
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
    #[error("sequence {0} does not exist in the destination: {1}")]
    Sequence(String, tokio_postgres::Error),
    #[error("task {0}: {1}")]
    State(String, String),
    #[error("copy of {table}: {source}")]
    Copy { table: String, source: tokio_postgres::Error },
    #[error("copy of {table}: the agent's stream failed: {message}")]
    Stream { table: String, message: String },
}

impl MigrationError {
    pub fn is_connection_loss(&self) -> bool {
        let pg = match self {
            MigrationError::Connect(e) => return e.postgres().is_none_or(|e| e.as_db_error().is_none()),
            MigrationError::Session(e) | MigrationError::Copy { source: e, .. } | MigrationError::Step { source: e, .. } => e,
            MigrationError::Stream { .. } => return true,
            _ => return false,
        };
        crate::connect::sql::is_connection_loss(pg)
    }

    /// Errors that retrying cannot fix.
    pub fn is_precondition(&self) -> bool {
        matches!(
            self,
            MigrationError::Conflicts(_) | MigrationError::MissingTables(_) | MigrationError::Sequence(..) | MigrationError::State(..)
        ) || matches!(self, MigrationError::Step { source, .. } if source.as_db_error().is_some() && !self.is_connection_loss())
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
END$$;
COMMENT ON TABLE decant.task IS 'decant: migration tasks, their plan and phase';";

/// Creates decant's tables in the destination when missing.
pub async fn ensure_tables(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(CREATE_TABLES).await
}

/// A destination session of the task's migration; its application_name
/// names the task, so sessions left by a killed run can be found.
async fn session(destination: &ConnInfo, task_id: &str) -> Result<Client, MigrationError> {
    let mut destination = destination.clone();
    destination.application_name = None;
    let destination = &destination;
    let (client, _conn) =
        connect(destination, &session_name(task_id), "-c session_replication_role=replica -c synchronous_commit=off").await?;
    Ok(client)
}

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

/// The task's state; phase "new" when it has no plan.
pub async fn state(destination: &ConnInfo, task_id: &str) -> Result<TaskState, MigrationError> {
    let client = session(destination, task_id).await?;
    ensure_tables(&client).await?;
    read_state(&client, task_id).await
}

async fn read_state(client: &Client, task_id: &str) -> Result<TaskState, MigrationError> {
    let Some(task) = client.query_opt("SELECT phase, snapshot_lsn::text, types FROM decant.task WHERE task_id = $1", &[&task_id]).await?
    else {
        return Ok(TaskState { phase: "new".into(), ..Default::default() });
    };
    let mut tables: Vec<TableState> = client
        .query(
            "SELECT table_id, schema_name, name, columns, binary_ok, bytes FROM decant.copy_table WHERE task_id = $1 ORDER BY table_id",
            &[&task_id],
        )
        .await?
        .iter()
        .map(|r| TableState {
            table_id: r.get::<_, i32>(0) as u32,
            schema: r.get(1),
            name: r.get(2),
            columns: r.get(3),
            binary: r.get(4),
            bytes: r.get::<_, i64>(5) as u64,
            ranges: Vec::new(),
        })
        .collect();
    let index: HashMap<u32, usize> = tables.iter().enumerate().map(|(i, t)| (t.table_id, i)).collect();
    for r in client
        .query(
            "SELECT table_id, range_id, condition, done_at IS NOT NULL, rows, bytes, first_page, end_page FROM decant.copy_range
              WHERE task_id = $1 ORDER BY table_id, range_id",
            &[&task_id],
        )
        .await?
    {
        if let Some(&i) = index.get(&(r.get::<_, i32>(0) as u32)) {
            let range_id = r.get::<_, i32>(1) as u32;
            let (condition, first, end): (String, Option<i64>, Option<i64>) = (r.get(2), r.get(6), r.get(7));
            let refused = |what: &str| {
                MigrationError::State(
                    task_id.into(),
                    format!(
                        "decant.copy_range holds {what} for range {range_id} of table {}.{}; it was changed by hand: start the \
                         task over (DROP SCHEMA decant CASCADE, and the tables it migrated)",
                        tables[i].schema, tables[i].name
                    ),
                )
            };
            let pages = match (first, end) {
                (None, None) if !condition.is_empty() => {
                    legacy_page_range(&condition).ok_or_else(|| refused("a condition that is no page range"))?
                }
                _ => PageRange {
                    first_page: first.map(u64::try_from).transpose().map_err(|_| refused("a negative page"))?,
                    end_page: end.map(u64::try_from).transpose().map_err(|_| refused("a negative page"))?,
                },
            };
            tables[i].ranges.push(RangeState {
                range_id,
                done: r.get(3),
                rows: r.get::<_, i64>(4) as u64,
                bytes: r.get::<_, i64>(5) as u64,
                first_page: pages.first_page,
                end_page: pages.end_page,
            });
        }
    }
    let existing = client
        .query(
            "SELECT kind || ' ' || CASE WHEN schema_name = '' THEN name ELSE schema_name || '.' || name END
               FROM decant.schema_step WHERE task_id = $1 AND existed AND kind <> 'SCHEMA' ORDER BY section DESC, step",
            &[&task_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lsn: String = task.get(1);
    Ok(TaskState { phase: task.get(0), snapshot_lsn: lsn.parse::<Lsn>().unwrap_or_default().0, types: task.get(2), tables, existing })
}

/// Stores a plan, once. With conflicts = report, objects that already
/// exist are reported before anything is written.
pub async fn plan(destination: &ConnInfo, task_id: &str, plan: MigrationPlan) -> Result<TaskState, MigrationError> {
    let mut client = session(destination, task_id).await?;
    ensure_tables(&client).await?;
    let current = read_state(&client, task_id).await?;
    if current.phase != "new" {
        return Ok(current);
    }
    let report = plan.conflicts == "report";
    let has = |t: &str| plan.types.iter().any(|x| x == t);
    if has("schema") {
        trial_pre_data(&client, &plan, report).await?;
    }
    let mut flags = Vec::new();
    if has("full") && !has("schema") {
        let checks = check_tables(&client, plan.tables.iter().map(|t| (t.schema.as_str(), t.name.as_str(), &t.columns, &t.types))).await?;
        if report {
            let full: Vec<String> = checks
                .iter()
                .zip(&plan.tables)
                .filter(|(c, _)| c.has_rows)
                .map(|(_, t)| format!("rows in table {}.{}", t.schema, t.name))
                .collect();
            if !full.is_empty() {
                return Err(MigrationError::Conflicts(full));
            }
        }
        flags = checks;
    }
    let phase = if has("schema") { "schema" } else { "copy" };
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO decant.task (task_id, phase, types, conflicts, snapshot_lsn, prologue) VALUES ($1, $2, $3, $4, $5::text::pg_lsn, $6)",
        &[&task_id, &phase, &plan.types, &plan.conflicts, &Lsn(plan.snapshot_lsn).to_string(), &plan.schema_prologue],
    )
    .await?;
    let insert_step = tx
        .prepare(
            "INSERT INTO decant.schema_step (task_id, section, step, kind, schema_name, name, sql) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await?;
    for (section, steps) in [("pre-data", &plan.pre_data), ("post-data", &plan.post_data)] {
        for (i, s) in steps.iter().enumerate() {
            tx.execute(&insert_step, &[&task_id, &section, &(i as i32), &s.kind, &s.schema, &s.name, &s.sql]).await?;
        }
    }
    for (i, t) in plan.tables.iter().enumerate() {
        let (binary, merge) = match flags.get(i) {
            Some(c) => (t.binary && c.same_builtin_types, c.has_rows),
            None => (t.binary, false),
        };
        tx.execute(
            "INSERT INTO decant.copy_table (task_id, table_id, schema_name, name, columns, types, binary_ok, bytes, merge)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[&task_id, &(i as i32), &t.schema, &t.name, &t.columns, &t.types, &binary, &(t.bytes as i64), &merge],
        )
        .await?;
        let ranges = if t.ranges.is_empty() { vec![Default::default()] } else { t.ranges.clone() };
        for (r, pages) in ranges.iter().enumerate() {
            let page = |p: Option<u64>| p.map(|p| i64::try_from(p).unwrap_or(i64::MAX));
            tx.execute(
                "INSERT INTO decant.copy_range (task_id, table_id, range_id, condition, first_page, end_page)
                 VALUES ($1, $2, $3, '', $4, $5)",
                &[&task_id, &(i as i32), &(r as i32), &page(pages.first_page), &page(pages.end_page)],
            )
            .await?;
        }
    }
    tx.commit().await?;
    read_state(&client, task_id).await
}

/// Runs the pre-data steps in one transaction that is rolled back, to find
/// what already exists (and any step the destination cannot run) before
/// anything is written.
async fn trial_pre_data(client: &Client, plan: &MigrationPlan, report: bool) -> Result<(), MigrationError> {
    client.batch_execute("BEGIN").await?;
    let result = async {
        client.batch_execute(&plan.schema_prologue).await?;
        let mut conflicts = Vec::new();
        let mut first_failure = None;
        for step in &plan.pre_data {
            client.batch_execute("SAVEPOINT decant_step").await?;
            match client.batch_execute(&step.sql).await {
                Ok(()) => client.batch_execute("RELEASE decant_step").await?,
                Err(e) => {
                    client.batch_execute("ROLLBACK TO decant_step").await?;
                    if is_duplicate(&e) {
                        if step.kind != "SCHEMA" {
                            conflicts.push(step_label(step));
                        }
                    } else if first_failure.is_none() {
                        first_failure = Some(MigrationError::Step {
                            section: "pre-data".into(),
                            kind: step.kind.clone(),
                            name: step.name.clone(),
                            source: e,
                        });
                    }
                }
            }
        }
        if report && !conflicts.is_empty() {
            return Err(MigrationError::Conflicts(conflicts));
        }
        // With conflicts = ignore, a step may fail only because an object
        // it builds on was kept; those are reported when they run.
        match first_failure {
            Some(e) if conflicts.is_empty() => Err(e),
            _ => Ok(()),
        }
    }
    .await;
    client.batch_execute("ROLLBACK").await?;
    result
}

struct TableCheck {
    has_rows: bool,
    same_builtin_types: bool,
}

/// Checks the destination tables of the copy: they exist with the copied
/// columns; binary COPY needs the same built-in type, with binary I/O, on
/// both sides.
async fn check_tables<'a>(
    client: &Client,
    tables: impl Iterator<Item = (&'a str, &'a str, &'a Vec<String>, &'a Vec<String>)>,
) -> Result<Vec<TableCheck>, MigrationError> {
    let mut missing = Vec::new();
    let mut out = Vec::new();
    for (schema, name, columns, types) in tables {
        let q = qualified(schema, name);
        let exists: bool = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&q]).await?.get(0);
        if !exists {
            missing.push(format!("{schema}.{name}"));
            continue;
        }
        let cols = client
            .query(
                &format!(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), {BINARY_IO}
                       FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                      WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped"
                ),
                &[&q],
            )
            .await?;
        let found: HashMap<String, (String, bool)> = cols.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
        let mut same = true;
        for (c, t) in columns.iter().zip(types) {
            match found.get(c) {
                None => missing.push(format!("{schema}.{name} (column {c})")),
                Some((dt, builtin)) => same &= dt == t && *builtin,
            }
        }
        let has_rows: bool = client.query_one(&format!("SELECT EXISTS (SELECT FROM ONLY {q})"), &[]).await?.get(0);
        out.push(TableCheck { has_rows, same_builtin_types: same });
    }
    if !missing.is_empty() {
        return Err(MigrationError::MissingTables(missing));
    }
    Ok(out)
}

/// Runs the steps of `section` that are not done, then moves the task to
/// its next phase. Pre-data runs in dump order in one session; post-data
/// in batches that keep dump order where it matters (see
/// [`crate::migrate::schema::post_data_batches`]), indexes and key
/// constraints by `workers` sessions at once.
pub async fn run_schema(
    destination: &ConnInfo,
    task_id: &str,
    section: &str,
    workers: usize,
    sequences: &[SequenceValue],
) -> Result<TaskState, MigrationError> {
    let client = session(destination, task_id).await?;
    ensure_tables(&client).await?;
    let state = read_state(&client, task_id).await?;
    let has = |t: &str| state.types.iter().any(|x| x == t);
    let expected = if section == "pre-data" { "schema" } else { "post-data" };
    let ready = state.phase == expected || (section == "post-data" && state.phase == "copy");
    if !ready {
        return if phase_rank(&state.phase) > phase_rank(expected) {
            Ok(state)
        } else {
            Err(MigrationError::State(task_id.into(), format!("cannot run {section} in phase {}", state.phase)))
        };
    }
    if section == "post-data" && has("full") {
        let pending: Vec<String> =
            state.tables.iter().filter(|t| t.ranges.iter().any(|r| !r.done)).map(|t| format!("{}.{}", t.schema, t.name)).collect();
        if !pending.is_empty() {
            return Err(MigrationError::State(task_id.into(), format!("tables not copied yet: {}", pending.join(", "))));
        }
    }
    end_leftover_sessions(&client, task_id).await?;
    let task = client.query_one("SELECT conflicts, prologue FROM decant.task WHERE task_id = $1", &[&task_id]).await?;
    let (conflicts, prologue): (String, String) = (task.get(0), task.get(1));
    let ignore = conflicts == "ignore";
    let steps: Vec<(i32, SchemaStep)> = client
        .query(
            "SELECT step, kind, schema_name, name, sql FROM decant.schema_step
              WHERE task_id = $1 AND section = $2 AND done_at IS NULL ORDER BY step",
            &[&task_id, &section],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), SchemaStep { kind: r.get(1), schema: r.get(2), name: r.get(3), sql: r.get(4) }))
        .collect();
    if section == "pre-data" {
        client.batch_execute(&prologue).await?;
        for (n, step) in &steps {
            run_step(&client, task_id, section, *n, step, ignore).await?;
        }
        if has("full") {
            prepare_copy(&client, task_id, &state, ignore).await?;
        }
    } else {
        set_sequences(&client, sequences).await?;
        for batch in crate::migrate::schema::post_data_batches(steps, |(_, s)| s.kind.clone()) {
            let parallel = if batch.parallel { workers.max(1) } else { 1 };
            run_parallel(destination, task_id, section, &prologue, batch.units.into(), parallel, ignore).await?;
        }
    }
    let next = match section {
        "pre-data" if has("full") => "copy",
        "pre-data" => "post-data",
        _ if has("incremental") => "incremental",
        _ => "completed",
    };
    client.execute("UPDATE decant.task SET phase = $2, updated_at = now() WHERE task_id = $1", &[&task_id, &next]).await?;
    read_state(&client, task_id).await
}

fn phase_rank(phase: &str) -> u8 {
    match phase {
        "new" => 0,
        "schema" => 1,
        "copy" => 2,
        "post-data" => 3,
        _ => 4,
    }
}

async fn run_parallel(
    destination: &ConnInfo,
    task_id: &str,
    section: &str,
    prologue: &str,
    work: VecDeque<Vec<(i32, SchemaStep)>>,
    workers: usize,
    ignore: bool,
) -> Result<(), MigrationError> {
    if work.is_empty() {
        return Ok(());
    }
    let queue = Arc::new(Mutex::new(work));
    let mut handles = Vec::new();
    for _ in 0..workers.min(queue.lock().await.len()) {
        let (queue, destination, task_id, section, prologue) =
            (queue.clone(), destination.clone(), task_id.to_owned(), section.to_owned(), prologue.to_owned());
        handles.push(tokio::spawn(async move {
            let client = session(&destination, &task_id).await?;
            // Index builds sort: give each session room.
            client.batch_execute(&prologue).await?;
            client.batch_execute("SET maintenance_work_mem = '256MB'").await?;
            loop {
                let Some(unit) = queue.lock().await.pop_front() else { return Ok::<(), MigrationError>(()) };
                for (n, step) in &unit {
                    run_step(&client, &task_id, &section, *n, step, ignore).await?;
                }
            }
        }));
    }
    let mut first_error = None;
    for h in handles {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(MigrationError::State(task_id.into(), format!("schema worker failed: {e}")));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// One step in its own transaction, marked done in it.
async fn run_step(client: &Client, task_id: &str, section: &str, n: i32, step: &SchemaStep, ignore: bool) -> Result<(), MigrationError> {
    let mark =
        |set: &str| format!("UPDATE decant.schema_step SET {set} WHERE task_id = '{task_id}' AND section = '{section}' AND step = {n}");
    match client.batch_execute(&format!("BEGIN;\n{}\n;\n{};\nCOMMIT", step.sql, mark("done_at = now()"))).await {
        Ok(()) => Ok(()),
        Err(e) => {
            client.batch_execute("ROLLBACK").await?;
            if is_duplicate(&e) && (ignore || step.kind == "SCHEMA") {
                tracing::info!(object = %step_label(step), "already in the destination; kept");
                client.batch_execute(&mark("done_at = now(), existed = true")).await?;
                Ok(())
            } else {
                Err(MigrationError::Step { section: section.into(), kind: step.kind.clone(), name: step.name.clone(), source: e })
            }
        }
    }
}

/// After pre-data: the destination tables are checked, and the copy
/// format and conflict handling of each decided.
async fn prepare_copy(client: &Client, task_id: &str, state: &TaskState, ignore: bool) -> Result<(), MigrationError> {
    let types: Vec<(Vec<String>, Vec<String>)> = client
        .query("SELECT columns, types FROM decant.copy_table WHERE task_id = $1 ORDER BY table_id", &[&task_id])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let checks =
        check_tables(client, state.tables.iter().zip(&types).map(|(t, (c, ty))| (t.schema.as_str(), t.name.as_str(), c, ty))).await?;
    for (t, c) in state.tables.iter().zip(checks) {
        let merge = ignore && c.has_rows;
        client
            .execute(
                "UPDATE decant.copy_table SET binary_ok = binary_ok AND $3, merge = $4 WHERE task_id = $1 AND table_id = $2",
                &[&task_id, &(t.table_id as i32), &c.same_builtin_types, &merge],
            )
            .await?;
    }
    Ok(())
}

async fn set_sequences(client: &Client, sequences: &[SequenceValue]) -> Result<(), MigrationError> {
    for s in sequences {
        let q = qualified(&s.schema, &s.name);
        client
            .execute("SELECT setval($1::text::regclass, $2, $3)", &[&q, &s.last_value, &s.is_called])
            .await
            .map_err(|e| MigrationError::Sequence(format!("{}.{}", s.schema, s.name), e))?;
    }
    Ok(())
}

/// After a restart during the copy: every table with an unfinished range
/// is emptied and copied again from a snapshot taken at `lsn`, and changes
/// to it that committed before `lsn` are not applied (they are in the new
/// copy). Tables the copy finished keep their rows.
pub async fn resnapshot(destination: &ConnInfo, task_id: &str, lsn: Lsn) -> Result<TaskState, MigrationError> {
    let mut client = session(destination, task_id).await?;
    end_leftover_sessions(&client, task_id).await?;
    let state = read_state(&client, task_id).await?;
    let has_schema = state.types.iter().any(|t| t == "schema");
    let tx = client.transaction().await?;
    for t in state.tables.iter().filter(|t| t.ranges.iter().any(|r| !r.done)) {
        let merge: bool = tx
            .query_one("SELECT merge FROM decant.copy_table WHERE task_id = $1 AND table_id = $2", &[&task_id, &(t.table_id as i32)])
            .await?
            .get(0);
        if !merge && t.ranges.iter().any(|r| r.done) {
            // Without schema migration the user's own foreign keys may point
            // at the table, which TRUNCATE refuses; DELETE in replica role
            // fires none of their checks.
            let empty = if has_schema { "TRUNCATE ONLY" } else { "DELETE FROM ONLY" };
            tx.batch_execute(&format!("{empty} {}", qualified(&t.schema, &t.name))).await?;
        }
        tx.execute(
            "UPDATE decant.copy_range SET done_at = NULL, started_at = NULL, rows = 0, bytes = 0 WHERE task_id = $1 AND table_id = $2",
            &[&task_id, &(t.table_id as i32)],
        )
        .await?;
        // A merged table (conflicts = ignore, rows of its own) keeps what
        // was copied; replaying every change since the first snapshot over
        // it, with overwrite, converges instead.
        if lsn.0 != 0 && !merge {
            tx.execute(
                "UPDATE decant.copy_table SET skip_before = $3::text::pg_lsn WHERE task_id = $1 AND table_id = $2",
                &[&task_id, &(t.table_id as i32), &lsn.to_string()],
            )
            .await?;
        }
    }
    tx.commit().await?;
    read_state(&client, task_id).await
}

/// Tables re-copied after a restart, with the LSN before which their
/// changes are already in the copy.
pub async fn skip_before(client: &Client, task_id: &str) -> Result<HashMap<String, Lsn>, tokio_postgres::Error> {
    ensure_tables(client).await?;
    Ok(client
        .query(
            "SELECT schema_name, name, skip_before::text FROM decant.copy_table WHERE task_id = $1 AND skip_before IS NOT NULL",
            &[&task_id],
        )
        .await?
        .iter()
        .map(|r| (qualified(r.get(0), r.get(1)), r.get::<_, String>(2).parse().unwrap_or_default()))
        .collect())
}

/// Copies one range: the data arrives as `chunks` (COPY format, binary or
/// text as planned), and the range is marked done in the same transaction.
pub async fn copy_range(
    destination: &ConnInfo,
    task_id: &str,
    table_id: u32,
    range_id: u32,
    first: (Bytes, bool),
    mut chunks: impl futures_util::Stream<Item = Result<(Bytes, bool), String>> + Unpin,
) -> Result<CopyDone, MigrationError> {
    use futures_util::StreamExt;
    let client = session(destination, task_id).await?;
    let row = client
        .query_opt(
            "SELECT t.schema_name, t.name, t.columns, t.binary_ok, t.merge, r.done_at IS NOT NULL, r.rows, r.bytes
               FROM decant.copy_table t JOIN decant.copy_range r USING (task_id, table_id)
              WHERE t.task_id = $1 AND t.table_id = $2 AND r.range_id = $3",
            &[&task_id, &(table_id as i32), &(range_id as i32)],
        )
        .await?
        .ok_or_else(|| MigrationError::State(task_id.into(), format!("no range {range_id} of table {table_id} in the plan")))?;
    let (schema, name, columns, binary, merge): (String, String, Vec<String>, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let table = format!("{schema}.{name}");
    if row.get::<_, bool>(5) {
        // Done before (the agent did not see the answer): nothing to do.
        return Ok(CopyDone { rows: row.get::<_, i64>(6) as u64, bytes: row.get::<_, i64>(7) as u64 });
    }
    client
        .execute(
            "UPDATE decant.copy_range SET started_at = now() WHERE task_id = $1 AND table_id = $2 AND range_id = $3",
            &[&task_id, &(table_id as i32), &(range_id as i32)],
        )
        .await?;
    let target = qualified(&schema, &name);
    let list = column_list(&columns);
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let cols = cols.join(", ");
    let format = if binary { "binary" } else { "text" };
    let err = |source| MigrationError::Copy { table: table.clone(), source };
    client.batch_execute("BEGIN").await.map_err(err)?;
    let into = if merge {
        client
            .batch_execute(&format!("CREATE TEMP TABLE decant_stage ON COMMIT DROP AS SELECT {cols} FROM {target} WITH NO DATA"))
            .await
            .map_err(err)?;
        "decant_stage".to_owned()
    } else {
        target.clone()
    };
    let sink = client.copy_in::<_, Bytes>(&format!("COPY {into}{list} FROM STDIN (FORMAT {format})")).await.map_err(err)?;
    futures_util::pin_mut!(sink);
    let (first, mut last) = first;
    let mut bytes = first.len() as u64;
    if !first.is_empty() {
        sink.send(first).await.map_err(err)?;
    }
    while !last {
        let (chunk, end) = match chunks.next().await {
            Some(Ok(c)) => c,
            other => {
                // Cut short: the transaction is dropped with the session.
                let message = match other {
                    Some(Err(m)) => m,
                    _ => "the stream ended before the end of the range".to_owned(),
                };
                return Err(MigrationError::Stream { table, message });
            }
        };
        last = end;
        bytes += chunk.len() as u64;
        if !chunk.is_empty() {
            sink.send(chunk).await.map_err(err)?;
        }
    }
    let mut rows = sink.finish().await.map_err(err)?;
    if merge {
        // conflicts = ignore: the destination's rows win.
        rows = client
            .execute(
                &format!("INSERT INTO {target}{list} OVERRIDING SYSTEM VALUE SELECT {cols} FROM decant_stage ON CONFLICT DO NOTHING"),
                &[],
            )
            .await
            .map_err(err)?;
    }
    client
        .execute(
            "UPDATE decant.copy_range SET done_at = now(), rows = $4, bytes = $5 WHERE task_id = $1 AND table_id = $2 AND range_id = $3",
            &[&task_id, &(table_id as i32), &(range_id as i32), &(rows as i64), &(bytes as i64)],
        )
        .await
        .map_err(err)?;
    client.batch_execute("COMMIT").await.map_err(err)?;
    Ok(CopyDone { rows, bytes })
}

/// The pages of a range planned by a version of decant that stored ranges
/// as WHERE conditions (`ctid >= '(34,0)' AND ctid < '(68,0)'`), so that
/// a copy under way goes on after an upgrade. Only the exact forms it
/// wrote are read, and only their numbers; any other text is refused.
fn legacy_page_range(condition: &str) -> Option<PageRange> {
    let page = |s: &str| -> Option<u64> {
        (1..=10).contains(&s.len()).then_some(s).filter(|s| s.bytes().all(|b| b.is_ascii_digit()))?.parse().ok()
    };
    let bound = |s: &str, op: &str| s.strip_prefix(op)?.strip_prefix("'(")?.strip_suffix(",0)'").and_then(page);
    let (first_page, end_page) = match condition.split_once(" AND ") {
        Some((lower, upper)) => (Some(bound(lower, "ctid >= ")?), Some(bound(upper, "ctid < ")?)),
        None => match (bound(condition, "ctid >= "), bound(condition, "ctid < ")) {
            (None, None) => return None,
            bounds => bounds,
        },
    };
    Some(PageRange { first_page, end_page })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_conditions_are_read_as_numbers_or_refused() {
        let r = |first_page, end_page| Some(PageRange { first_page, end_page });
        assert_eq!(legacy_page_range("ctid < '(34,0)'"), r(None, Some(34)));
        assert_eq!(legacy_page_range("ctid >= '(34,0)' AND ctid < '(68,0)'"), r(Some(34), Some(68)));
        assert_eq!(legacy_page_range("ctid >= '(68,0)'"), r(Some(68), None));
        for bad in [
            "",
            "true",
            "ctid >= '(1,0)' OR true",
            "ctid < '(1,0)' AND pg_sleep(10) IS NOT NULL",
            "ctid >= '(1,0)' AND ctid < '(2,0)' AND true",
            "ctid >= '(-1,0)'",
            "ctid >= '(+1,0)'",
            "ctid >= '(1,1)'",
            "ctid >= '(99999999999,0)'",
            "ctid >= '(1,0)'; DROP TABLE t; --",
            "ctid < '(1,0)' AND ctid >= '(0,0)'",
        ] {
            assert_eq!(legacy_page_range(bad), None, "{bad}");
        }
    }
}
