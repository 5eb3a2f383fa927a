//! Applying decant records to the destination, in source commit order.
//!
//! Many source transactions are grouped into one destination transaction
//! (bounded by count, bytes and time), statements are prepared once per
//! relation and shape and pipelined, and the group's last source commit LSN
//! is recorded in the same destination transaction. A crash anywhere loses
//! the open group as a whole, and the agent resumes from the recorded
//! position: nothing is lost and nothing applied twice.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use decant_proto::{decode, DecodeError, Lsn, OldTuple, Record, Tuple, Value};
use tokio_postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};
use tokio_postgres::{Client, Statement};

use super::progress::{Durability, ProgressError, ProgressStore};
use super::statements::Target;
use crate::connect::sql::{connect, ConnectError};
use crate::connect::ConnInfo;
use crate::metrics::Metrics;

/// What to do when a change does not fit the destination's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConflictPolicy {
    /// An INSERT over an existing key updates the row; an UPDATE or DELETE
    /// of a missing row is counted and logged.
    Overwrite,
    /// Any of those stops the applier with an error.
    Stop,
}

#[derive(Clone, Debug)]
pub struct ApplySettings {
    pub task_id: String,
    pub group_max_transactions: usize,
    pub group_max_bytes: usize,
    pub group_max_delay: Duration,
    pub pipeline_depth: usize,
    pub on_conflict: ConflictPolicy,
    pub apply_truncate: bool,
    pub apply_messages: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("corrupt record in batch {sequence}, {error}; nothing of this batch was applied")]
    Corrupt { sequence: u64, error: DecodeError },
    #[error("change for relation {0} arrived before its RELATION record (the stream is out of order)")]
    UnknownRelation(u32),
    #[error("destination table {table} does not exist: create it (decant migrate creates the schema) or exclude the table from the task")]
    MissingTable { table: String },
    #[error("{op} on {table} failed: {source}")]
    Statement { op: &'static str, table: String, source: tokio_postgres::Error },
    #[error("{op} on {table} matched no destination row (on_conflict = stop)")]
    MissingRow { op: &'static str, table: String },
    #[error("{op} on {table}: the table has no replica identity, so the row cannot be located; give it a primary key or REPLICA IDENTITY FULL on the source")]
    NoIdentity { op: &'static str, table: String },
    #[error("destination: {0}")]
    Session(tokio_postgres::Error),
    #[error("{0}")]
    Progress(#[from] ProgressError),
}

impl ApplyError {
    /// True when the destination connection itself failed.
    pub fn is_connection_loss(&self) -> bool {
        let pg = match self {
            ApplyError::Connect(e) => return e.postgres().is_none_or(|e| e.as_db_error().is_none()),
            ApplyError::Statement { source, .. } | ApplyError::Session(source) => source,
            _ => return false,
        };
        pg.is_closed() || pg.as_db_error().is_none() || pg.code().is_some_and(|c| c.code().starts_with("57P") || c.code().starts_with("08"))
    }
}

/// A value sent as text (or, for bytea, raw binary), whatever the column type:
/// the destination parses it with the type's input function.
#[derive(Debug)]
struct Param {
    bytes: Bytes,
    binary: bool,
}

impl ToSql for Param {
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.bytes);
        Ok(IsNull::No)
    }
    fn accepts(_ty: &Type) -> bool {
        true
    }
    fn encode_format(&self, _ty: &Type) -> Format {
        if self.binary {
            Format::Binary
        } else {
            Format::Text
        }
    }
    to_sql_checked!();
}

/// One statement in flight.
struct InFlight {
    future: Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send>>,
    op: &'static str,
    table: String,
    /// Whether zero affected rows means a missing row.
    expects_row: bool,
}

/// Open destination transaction grouping source transactions.
struct Group {
    source_transactions: usize,
    bytes: usize,
    started: Instant,
    last_end: Lsn,
    last_commit_time: i64,
}

pub struct Applier {
    client: Arc<Client>,
    _connection: tokio::task::JoinHandle<()>,
    settings: ApplySettings,
    metrics: Arc<Metrics>,
    targets: HashMap<u32, Target>,
    statements: HashMap<(u32, String), Statement>,
    progress: ProgressStore,
    durability: Durability,
    /// End LSN of the last source transaction committed on the destination.
    committed: Lsn,
    group: Option<Group>,
    /// Inside a source transaction (between BEGIN and COMMIT).
    in_source_txn: bool,
    /// The current source transaction was applied before (a resend).
    skipping: bool,
    pipeline: std::collections::VecDeque<InFlight>,
}

impl Applier {
    /// Connects to the destination and reads the resume position.
    pub async fn open(destination: &ConnInfo, settings: ApplySettings, metrics: Arc<Metrics>) -> Result<Applier, ApplyError> {
        // session_replication_role = replica: no triggers or FK checks fire
        // for replicated rows (the source already enforced them).
        let (client, connection) = connect(destination, "decant applier", "-c session_replication_role=replica -c synchronous_commit=off").await?;
        let (progress, committed) = ProgressStore::open(&client, &settings.task_id).await?;
        tracing::info!(resume_lsn = %committed, store = match progress { ProgressStore::Origin { .. } => "replication origin", ProgressStore::Table { .. } => "decant.progress" }, "applier connected to the destination");
        Ok(Applier {
            client: Arc::new(client),
            _connection: connection,
            settings,
            metrics,
            targets: HashMap::new(),
            statements: HashMap::new(),
            progress,
            durability: Durability::new(committed),
            committed,
            group: None,
            in_source_txn: false,
            skipping: false,
            pipeline: Default::default(),
        })
    }

    /// Source position the agent must resume from.
    pub fn resume_lsn(&self) -> Lsn {
        self.committed
    }

    /// Highest source position whose destination commit is on disk.
    pub async fn durable_lsn(&mut self) -> Result<Lsn, ApplyError> {
        Ok(self.durability.refresh(&self.client).await?)
    }

    pub fn has_undurable_commits(&self) -> bool {
        self.durability.has_pending()
    }

    /// Applies one batch of frames. Every CRC is checked before anything of
    /// the batch is applied.
    pub async fn apply_batch(&mut self, sequence: u64, batch: &Bytes) -> Result<(), ApplyError> {
        let mut records = Vec::new();
        let mut at = 0;
        while at < batch.len() {
            let (record, used) = decode(&batch[at..]).map_err(|mut error| {
                error.offset += at;
                ApplyError::Corrupt { sequence, error }
            })?;
            records.push(record);
            at += used;
        }
        self.metrics.batches.inc();
        self.metrics.batch_bytes.add(batch.len() as u64);
        for record in &records {
            self.apply_record(record, batch).await?;
        }
        if let Some(g) = &mut self.group {
            g.bytes += batch.len();
        }
        if self.group_is_full() {
            self.commit_group().await?;
        }
        Ok(())
    }

    fn group_is_full(&self) -> bool {
        match &self.group {
            Some(g) if !self.in_source_txn && g.source_transactions > 0 => {
                g.source_transactions >= self.settings.group_max_transactions
                    || g.bytes >= self.settings.group_max_bytes
                    || g.started.elapsed() >= self.settings.group_max_delay
            }
            _ => false,
        }
    }

    /// Commits the open group if it is at a source commit boundary: called
    /// when no more input is waiting, so latency stays low on a quiet stream.
    pub async fn flush(&mut self) -> Result<(), ApplyError> {
        if !self.in_source_txn && self.group.as_ref().is_some_and(|g| g.source_transactions > 0) {
            self.commit_group().await?;
        }
        Ok(())
    }

    async fn ensure_group(&mut self) -> Result<(), ApplyError> {
        if self.group.is_none() {
            self.client.batch_execute("BEGIN").await.map_err(ApplyError::Session)?;
            self.group = Some(Group { source_transactions: 0, bytes: 0, started: Instant::now(), last_end: self.committed, last_commit_time: 0 });
        }
        Ok(())
    }

    async fn commit_group(&mut self) -> Result<(), ApplyError> {
        let Some(group) = self.group.take() else { return Ok(()) };
        self.drain_pipeline(0).await?;
        if group.source_transactions > 0 {
            self.progress.record(&self.client, group.last_end, group.last_commit_time).await?;
        }
        self.client.batch_execute("COMMIT").await.map_err(ApplyError::Session)?;
        self.committed = group.last_end;
        self.durability.committed(&self.client, group.last_end).await?;
        self.metrics.destination_commits.inc();
        self.metrics.transactions.add(group.source_transactions as u64);
        self.metrics.group_size.set(group.source_transactions as u64);
        self.metrics.applied_lsn.set(group.last_end.0);
        if group.last_commit_time != 0 {
            let age_us = crate::replication::messages::pg_now() - group.last_commit_time;
            self.metrics.lag_seconds.set(age_us / 1_000_000);
        }
        Ok(())
    }

    async fn apply_record(&mut self, record: &Record<'_>, batch: &Bytes) -> Result<(), ApplyError> {
        match record {
            Record::Begin(b) => {
                self.in_source_txn = true;
                // Already applied (the stream was resumed from an earlier
                // point than the destination's position).
                self.skipping = b.final_lsn < self.committed;
                if !self.skipping {
                    self.ensure_group().await?;
                }
            }
            Record::Commit(c) => {
                self.in_source_txn = false;
                if self.skipping {
                    self.skipping = false;
                    return Ok(());
                }
                if let Some(g) = &mut self.group {
                    g.source_transactions += 1;
                    g.last_end = c.end_lsn;
                    g.last_commit_time = c.commit_time;
                }
                self.metrics.source_commit_time.set(c.commit_time);
            }
            Record::Relation(r) => {
                let target = Target::from_relation(r);
                self.statements.retain(|(oid, _), _| *oid != r.oid);
                self.targets.insert(r.oid, target);
            }
            Record::Insert(i) if !self.skipping => {
                let target = self.target(i.relation)?;
                let upsert = self.settings.on_conflict == ConflictPolicy::Overwrite;
                let sql = target.insert_sql(upsert);
                let params = params(&i.new.0, batch);
                self.execute(target.oid, sql, params, "INSERT", false).await?;
            }
            Record::Update(u) if !self.skipping => {
                let target = self.target(u.relation)?;
                let set: Vec<usize> = u.new.0.iter().enumerate().filter(|(_, v)| !matches!(v, Value::UnchangedToast)).map(|(i, _)| i).collect();
                let Some(locator) = locator_values(&target, u.old.as_ref(), Some(&u.new)) else {
                    return self.no_identity("UPDATE", &target);
                };
                let mut p = params(&set.iter().map(|&i| u.new.0[i]).collect::<Vec<_>>(), batch);
                p.extend(params(&locator, batch));
                self.execute(target.oid, target.update_sql(&set), p, "UPDATE", true).await?;
            }
            Record::Delete(d) if !self.skipping => {
                let target = self.target(d.relation)?;
                let Some(locator) = locator_values(&target, d.old.as_ref(), None) else {
                    return self.no_identity("DELETE", &target);
                };
                self.execute(target.oid, target.delete_sql(), params(&locator, batch), "DELETE", true).await?;
            }
            Record::Truncate(t) if !self.skipping && self.settings.apply_truncate => {
                let tables: Vec<String> = t.relations.iter().map(|oid| self.target(*oid).map(|t| t.qualified)).collect::<Result<_, _>>()?;
                let mut sql = format!("TRUNCATE {}", tables.join(", "));
                if t.restart_identity {
                    sql.push_str(" RESTART IDENTITY");
                }
                if t.cascade {
                    sql.push_str(" CASCADE");
                }
                self.drain_pipeline(0).await?;
                self.client.batch_execute(&sql).await.map_err(|source| ApplyError::Statement { op: "TRUNCATE", table: tables.join(", "), source })?;
            }
            Record::Message(m) if !self.skipping && m.transactional && self.settings.apply_messages && !m.prefix.starts_with(b"decant.") => {
                let prefix = String::from_utf8_lossy(m.prefix).into_owned();
                let content = m.content.to_vec();
                self.drain_pipeline(0).await?;
                self.client
                    .execute("SELECT pg_logical_emit_message(true, $1, $2)", &[&prefix, &content])
                    .await
                    .map_err(|source| ApplyError::Statement { op: "MESSAGE", table: prefix.clone(), source })?;
            }
            _ => {}
        }
        Ok(())
    }

    fn target(&self, oid: u32) -> Result<Target, ApplyError> {
        self.targets.get(&oid).cloned().ok_or(ApplyError::UnknownRelation(oid))
    }

    fn no_identity(&mut self, op: &'static str, target: &Target) -> Result<(), ApplyError> {
        match self.settings.on_conflict {
            ConflictPolicy::Stop => Err(ApplyError::NoIdentity { op, table: target.display.clone() }),
            ConflictPolicy::Overwrite => {
                self.metrics.skipped_changes.inc();
                tracing::warn!(table = %target.display, op, "change skipped: the table has no replica identity (give it a primary key or REPLICA IDENTITY FULL on the source)");
                Ok(())
            }
        }
    }

    async fn statement(&mut self, oid: u32, sql: String, table: &str) -> Result<Statement, ApplyError> {
        let key = (oid, sql);
        if let Some(s) = self.statements.get(&key) {
            return Ok(s.clone());
        }
        let statement = self.client.prepare(&key.1).await.map_err(|source| {
            if source.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
                ApplyError::MissingTable { table: table.to_owned() }
            } else {
                ApplyError::Statement { op: "PREPARE", table: table.to_owned(), source }
            }
        })?;
        self.statements.insert(key, statement.clone());
        Ok(statement)
    }

    /// Sends a statement now and collects its result later, keeping at most
    /// `pipeline_depth` in flight.
    async fn execute(&mut self, oid: u32, sql: String, params: Vec<Option<Param>>, op: &'static str, expects_row: bool) -> Result<(), ApplyError> {
        let table = self.targets.get(&oid).map(|t| t.display.clone()).unwrap_or_default();
        let statement = self.statement(oid, sql, &table).await?;
        let client = self.client.clone();
        let mut future: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move { client.execute_raw(&statement, params).await });
        // The request is written to the connection on the first poll; poll
        // once now so statements go out in order and overlap their round trips.
        if let Poll::Ready(result) = future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            future = Box::pin(std::future::ready(result));
        }
        self.pipeline.push_back(InFlight { future, op, table, expects_row });
        self.metrics.changes.inc();
        self.drain_pipeline(self.settings.pipeline_depth).await
    }

    async fn drain_pipeline(&mut self, keep: usize) -> Result<(), ApplyError> {
        while self.pipeline.len() > keep {
            let Some(item) = self.pipeline.pop_front() else { break };
            let rows = item.future.await.map_err(|source| ApplyError::Statement { op: item.op, table: item.table.clone(), source })?;
            if rows == 0 && item.expects_row {
                match self.settings.on_conflict {
                    ConflictPolicy::Stop => return Err(ApplyError::MissingRow { op: item.op, table: item.table }),
                    ConflictPolicy::Overwrite => {
                        self.metrics.missing_rows.inc();
                        tracing::warn!(table = %item.table, op = item.op, "row not found on the destination; change counted and skipped");
                    }
                }
            }
        }
        Ok(())
    }

    /// Rolls back an open group (after an error, before reconnecting).
    pub async fn abort(&mut self) {
        self.pipeline.clear();
        if self.group.take().is_some() {
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        self.in_source_txn = false;
        self.skipping = false;
    }
}

/// The values that locate the old row: the key columns (from the old key or
/// row when logged, else from the new row, whose key is then unchanged), or
/// every column for a table without key when the whole old row is logged.
fn locator_values<'a>(target: &Target, old: Option<&OldTuple<'a>>, new: Option<&Tuple<'a>>) -> Option<Vec<Value<'a>>> {
    if target.key.is_empty() {
        return match old {
            Some(OldTuple::Row(row)) => Some(row.0.clone()),
            _ => None,
        };
    }
    match old {
        Some(OldTuple::Key(key)) if key.0.len() == target.key.len() => Some(key.0.clone()),
        Some(OldTuple::Row(row)) => target.key.iter().map(|&i| row.0.get(i).copied()).collect(),
        // A key tuple of another shape means the identity differs from the
        // key we use (primary key under REPLICA IDENTITY NOTHING): only the
        // new row can tell.
        _ => new.and_then(|n| target.key.iter().map(|&i| n.0.get(i).copied()).collect()),
    }
}

fn params(values: &[Value<'_>], batch: &Bytes) -> Vec<Option<Param>> {
    values
        .iter()
        .map(|v| match v {
            Value::Null | Value::UnchangedToast => None,
            Value::Bytes(raw) => Some(Param { bytes: slice(batch, raw), binary: true }),
            other => other.to_pg_text().map(|text| Param {
                bytes: match text {
                    std::borrow::Cow::Borrowed(b) => slice(batch, b),
                    std::borrow::Cow::Owned(v) => Bytes::from(v),
                },
                binary: false,
            }),
        })
        .collect()
}

/// `b` as a zero-copy slice of `batch` when it lies inside it.
fn slice(batch: &Bytes, b: &[u8]) -> Bytes {
    let start = b.as_ptr() as usize;
    let base = batch.as_ptr() as usize;
    if start >= base && start + b.len() <= base + batch.len() {
        batch.slice_ref(b)
    } else {
        Bytes::copy_from_slice(b)
    }
}
