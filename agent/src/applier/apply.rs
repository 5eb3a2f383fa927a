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

use super::bulk::{self, Conn, StageSql, Text};
use super::cells::{cell, slice, Cells, Mismatch};
use super::progress::{Durability, ProgressError, ProgressStore};
use super::statements::Target;
use crate::config::ConflictPolicy;
use crate::connect::sql::{connect, ConnectError};
use crate::connect::ConnInfo;
use crate::metrics::Metrics;

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
    pub split_merges: bool,
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
    #[error(
        "{op} on {table} cannot be applied: the table has no replica identity on the source, so the change does not say \
         which row it changes; the task stops rather than let the destination diverge. Give the table a primary key or \
         REPLICA IDENTITY FULL on the source, then migrate the table again"
    )]
    NoIdentity { op: &'static str, table: String },
    #[error("destination: {0}")]
    Session(#[source] tokio_postgres::Error),
    #[error("{0}")]
    Progress(#[from] ProgressError),
    #[error("the task committing a group on the destination failed: {0}")]
    CommitTask(String),
    #[error("COPY into {table} loaded {loaded} rows where {sent} were sent; the group was rolled back")]
    CopyCount { table: String, sent: u64, loaded: u64 },
}

impl ApplyError {
    /// True when the destination connection itself failed.
    pub fn is_connection_loss(&self) -> bool {
        let pg = match self {
            ApplyError::Connect(e) => return e.postgres().is_none_or(|e| e.as_db_error().is_none()),
            ApplyError::Statement { source, .. } | ApplyError::Session(source) => source,
            _ => return false,
        };
        crate::connect::sql::is_connection_loss(pg)
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
    /// BEGIN was sent (it is sent with the group's first statement).
    begun: bool,
    source_transactions: usize,
    bytes: usize,
    started: Instant,
    /// End LSN of its first and last source transactions.
    first_end: Lsn,
    last_end: Lsn,
    last_commit_time: i64,
    /// Tables this group wrote on the main connection before its commit
    /// (mid-group merges, row-by-row statements): their merges stay there,
    /// as the second connection would wait for those row locks.
    touched: std::collections::HashSet<u32>,
    /// A TRUNCATE ran in this group: nothing is split.
    truncated: bool,
}

/// The second destination connection of `split_merges`, with the staging
/// tables that exist in its session.
#[derive(Clone)]
struct Helper {
    client: Arc<Client>,
    stages_created: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// Maps looked up by relation OID on every change: a fast hash (the
/// default SipHash showed in the applier's profile while folding a backlog).
type OidMap<V> = HashMap<u32, V, foldhash::fast::RandomState>;

pub struct Applier {
    client: Arc<Client>,
    _connection: tokio::task::JoinHandle<()>,
    settings: ApplySettings,
    metrics: Arc<Metrics>,
    targets: OidMap<Arc<Target>>,
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
    /// Changes folded per table for set-based apply (tables with a key).
    bulk: OidMap<bulk::Buffer>,
    /// Keys each table's buffer held when last merged.
    bulk_rows: OidMap<usize>,
    /// Memory held by the folded changes in `bulk` and `appends`.
    folded_bytes: usize,
    /// The group's bound on `folded_bytes`: GROUP_FOLDED_BYTES, reached by
    /// doubling from FIRST_GROUP_FOLDED_BYTES (see there).
    group_folded_limit: usize,
    /// Changes applied in this batch, added to the metric once per batch
    /// (an atomic add per change, on a cache line that other threads
    /// write, took 6% of the applier's time in a backlog).
    changes_unreported: u64,
    /// INSERTs into tables without a key, as COPY text, until the next
    /// other change of that table.
    appends: OidMap<bulk::Appends>,
    /// Staging SQL per table; a new generation when the table's shape changes.
    stages: HashMap<u32, Arc<StageSql>>,
    /// Staging tables that exist in this session.
    stages_created: std::collections::HashSet<u32>,
    generation: u64,
    /// Tables copied again after a restart of the full copy, with the LSN
    /// of their new snapshot: their changes committed before it are
    /// already in the copy.
    skip_before: HashMap<String, Lsn>,
    /// Commit LSN of the current source transaction.
    txn_final: Lsn,
    /// Folded values that are not slices of a batch are written here; the
    /// long ones are kept as slices of it: one allocation for many values.
    scratch: BytesMut,
    /// The previous group, committing on the destination while this one is
    /// folded. The client is its own until [`Applier::settle`] took it back.
    committing: Option<tokio::task::JoinHandle<Result<(Group, Lsn), ApplyError>>>,
    /// Notified as each commit task ends (see [`Applier::flush`]).
    commit_ended: Arc<tokio::sync::Notify>,
    helper: Option<Helper>,
    _helper_connection: Option<tokio::task::JoinHandle<()>>,
}

/// A table's folded changes of a group are split over two connections
/// from this many keys on (below, the second transaction costs more than
/// it saves).
const SPLIT_MIN_ROWS: usize = 2000;

/// A group ends at the first COMMIT after its folded changes reach this
/// much memory: they are merged while the next group is folded. Larger
/// groups fold more and merge fewer times (8 → 16 MB took the backlog's
/// destination CPU from 2.9 to 2.4 s); 13 MB keeps the applier's peak RSS
/// with a large transaction under 150 MB (see BULK_FLUSH_BYTES; with the
/// system allocator and 14 MB it reached 146–147 MB; with jemalloc, 13 MB
/// measured 117–123 MB and 20 MB 150.4 MB).
const GROUP_FOLDED_BYTES: usize = 13 << 20;
/// The first group of a stream ends at this much folded memory, and each
/// next one at twice its predecessor's bound, up to GROUP_FOLDED_BYTES:
/// with a backlog waiting, the destination starts merging after a few
/// thousand transactions instead of idling while the first full group is
/// folded (a third of a second of the benchmark's drain).
const FIRST_GROUP_FOLDED_BYTES: usize = 512 << 10;
/// Folded changes are merged at once, inside a source transaction, when they
/// reach this much memory (a large transaction). Above GROUP_FOLDED_BYTES,
/// so that a group of small transactions ends at a COMMIT first: that merge
/// runs while the next group is folded, this one does not.
const BULK_FLUSH_BYTES: usize = GROUP_FOLDED_BYTES + (2 << 20);

impl Applier {
    /// Connects to the destination and reads the resume position.
    pub async fn open(destination: &ConnInfo, settings: ApplySettings, metrics: Arc<Metrics>) -> Result<Applier, ApplyError> {
        // session_replication_role = replica: no triggers or FK checks fire
        // for replicated rows (the source already enforced them). work_mem:
        // merges sort a staging table of up to BULK_FLUSH_BYTES in memory.
        const OPTIONS: &str = "-c session_replication_role=replica -c synchronous_commit=off -c work_mem=64MB";
        let (client, connection) = connect(destination, "decant applier", OPTIONS).await?;
        let (helper, helper_connection) = if settings.split_merges {
            let (client, connection) = connect(destination, "decant applier (second)", OPTIONS).await?;
            (Some(Helper { client: Arc::new(client), stages_created: Default::default() }), Some(connection))
        } else {
            (None, None)
        };
        let (progress, committed) = ProgressStore::open(&client, &settings.task_id).await?;
        if let (Some(helper), true) = (&helper, progress.origin) {
            progress.mark_second_session(&helper.client).await?;
        }
        let skip_before = super::migration::skip_before(&client, &settings.task_id).await.map_err(ApplyError::Session)?;
        tracing::info!(resume_lsn = %committed, replication_origin = progress.origin, "applier connected to the destination");
        Ok(Applier {
            client: Arc::new(client),
            _connection: connection,
            settings,
            metrics,
            targets: OidMap::default(),
            statements: HashMap::new(),
            progress,
            durability: Durability::new(committed),
            committed,
            group: None,
            in_source_txn: false,
            skipping: false,
            pipeline: Default::default(),
            bulk: OidMap::default(),
            bulk_rows: OidMap::default(),
            folded_bytes: 0,
            group_folded_limit: FIRST_GROUP_FOLDED_BYTES,
            changes_unreported: 0,
            appends: OidMap::default(),
            stages: HashMap::new(),
            stages_created: Default::default(),
            generation: 0,
            skip_before,
            txn_final: Lsn(0),
            scratch: BytesMut::new(),
            committing: None,
            commit_ended: Default::default(),
            helper,
            _helper_connection: helper_connection,
        })
    }

    /// Source position the agent must resume from.
    pub fn resume_lsn(&self) -> Lsn {
        self.committed
    }

    /// Highest source position whose destination commit is on disk.
    pub async fn durable_lsn(&mut self) -> Result<Lsn, ApplyError> {
        match &self.committing {
            // Settling refreshes the position.
            Some(job) if job.is_finished() => self.settle().await?,
            // The client is busy with that commit: the position as of the
            // last settle (under steady load a commit is always running).
            Some(_) => {}
            None => {
                self.durability.refresh(&self.client).await?;
            }
        }
        Ok(self.durability.durable())
    }

    /// Signalled when a group's commit task ends.
    pub fn commit_ended(&self) -> Arc<tokio::sync::Notify> {
        self.commit_ended.clone()
    }

    pub fn has_undurable_commits(&self) -> bool {
        self.durability.has_pending() || self.committing.is_some()
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
        if tracing::enabled!(tracing::Level::DEBUG) {
            let commits: Vec<Lsn> = records.iter().filter_map(|r| if let Record::Commit(c) = r { Some(c.end_lsn) } else { None }).collect();
            tracing::debug!(sequence, bytes = batch.len(), records = records.len(), commits = commits.len(), first_commit_end = %commits.first().copied().unwrap_or_default(), last_commit_end = %commits.last().copied().unwrap_or_default(), "batch received");
        }
        // Counted up front: a group ends at a COMMIT inside the batch.
        if let Some(g) = &mut self.group {
            g.bytes += batch.len();
        }
        let mut result = Ok(());
        for record in &records {
            result = self.apply_record(record, batch).await;
            if result.is_err() {
                break;
            }
        }
        self.metrics.changes.add(std::mem::take(&mut self.changes_unreported));
        result
    }

    fn group_is_full(&self) -> bool {
        match &self.group {
            Some(g) if !self.in_source_txn && g.source_transactions > 0 => {
                g.source_transactions >= self.settings.group_max_transactions
                    || g.bytes >= self.settings.group_max_bytes
                    || self.folded_bytes >= self.group_folded_limit
                    || g.started.elapsed() >= self.settings.group_max_delay
            }
            _ => false,
        }
    }

    /// Commits the open group if it is at a source commit boundary: called
    /// when no more input is waiting, so latency stays low on a quiet stream.
    /// While the previous group still commits, the open one keeps growing
    /// instead: its merge could not start before that commit ends anyway,
    /// and a larger group folds more (groups cut short this way were a
    /// fifth of a backlog's). The caller tries again when that commit ends
    /// ([`Applier::commit_ended`]).
    pub async fn flush(&mut self) -> Result<(), ApplyError> {
        if self.committing.as_ref().is_some_and(|job| !job.is_finished()) {
            return Ok(());
        }
        if !self.in_source_txn && self.group.as_ref().is_some_and(|g| g.source_transactions > 0) {
            self.commit_group().await?;
        }
        Ok(())
    }

    fn ensure_group(&mut self) {
        if self.group.is_none() {
            self.group = Some(Group {
                begun: false,
                source_transactions: 0,
                bytes: 0,
                started: Instant::now(),
                first_end: Lsn(0),
                last_end: self.committed,
                last_commit_time: 0,
                touched: Default::default(),
                truncated: false,
            });
        }
    }

    /// Takes the client back from the previous group's commit and opens
    /// the current group's destination transaction: call before any
    /// statement.
    async fn open_transaction(&mut self) -> Result<(), ApplyError> {
        self.settle().await?;
        if let Some(group) = &mut self.group {
            if !group.begun {
                self.client.batch_execute("BEGIN").await.map_err(ApplyError::Session)?;
                group.begun = true;
            }
        }
        Ok(())
    }

    /// Waits for the previous group's commit and takes note of it.
    async fn settle(&mut self) -> Result<(), ApplyError> {
        let Some(job) = self.committing.take() else { return Ok(()) };
        let (group, wal) = job.await.map_err(|e| ApplyError::CommitTask(e.to_string()))??;
        self.committed = group.last_end;
        self.durability.committed(wal, group.last_end);
        // The client is free until the next commit starts: learn what is on
        // disk now, so acks advance even when a commit is always running.
        self.durability.refresh(&self.client).await?;
        self.metrics.destination_commits.inc();
        self.metrics.transactions.add(group.source_transactions as u64);
        self.metrics.group_size.set(group.source_transactions as u64);
        self.metrics.applied_lsn.set(group.last_end.0);
        if group.last_commit_time != 0 {
            let age_us = crate::connect::clock::pg_now() - group.last_commit_time;
            self.metrics.lag_seconds.set(age_us / 1_000_000);
        }
        Ok(())
    }

    /// Commits the open group. Its merges, progress record and COMMIT run
    /// in a task of their own while the next group is folded (one group at
    /// a time: the next commit first waits for this one).
    async fn commit_group(&mut self) -> Result<(), ApplyError> {
        if self.group.is_none() {
            return Ok(());
        }
        // A table's first merge in this session (or first after its shape
        // changed) creates its staging table, in the group's own transaction.
        let mut stages = HashMap::new();
        let tables: Vec<u32> = self.bulk.iter().filter(|(_, b)| !b.is_empty()).map(|(oid, _)| *oid).collect();
        for oid in tables {
            let stage = match self.stages.get(&oid).filter(|_| self.stages_created.contains(&oid)) {
                Some(stage) => stage.clone(),
                None => {
                    self.open_transaction().await?;
                    self.ensure_stage(oid).await?
                }
            };
            stages.insert(oid, stage);
        }
        // The staging rows are built while the previous group still commits:
        // the destination waits only for the settle below.
        let mut merges = Vec::new();
        let mut second_merges = Vec::new();
        for (oid, rows) in std::mem::take(&mut self.appends) {
            merges.push(Merge::Append { target: self.target(oid)?, rows });
        }
        self.folded_bytes = 0;
        self.group_folded_limit = (self.group_folded_limit * 2).min(GROUP_FOLDED_BYTES);
        for (oid, buffer) in std::mem::take(&mut self.bulk) {
            if let Some(stage) = stages.remove(&oid) {
                let target = self.target(oid)?;
                let split = self.helper.is_some()
                    && stage.splittable
                    && buffer.len() >= SPLIT_MIN_ROWS
                    && self.group.as_ref().is_some_and(|g| !g.truncated && !g.touched.contains(&oid));
                self.bulk_rows.insert(oid, buffer.len());
                if split {
                    self.metrics.split_merges.inc();
                    let mut halves = Merge::staged(target, stage, buffer, 2);
                    second_merges.extend(halves.pop());
                    merges.extend(halves.pop());
                } else {
                    merges.extend(Merge::staged(target, stage, buffer, 1));
                }
            }
        }
        self.settle().await?;
        let Some(group) = self.group.take() else { return Ok(()) };
        let commit = GroupCommit {
            client: self.client.clone(),
            merges,
            second: self.helper.clone().filter(|_| !second_merges.is_empty()).map(|h| (h, second_merges)),
            pipeline: std::mem::take(&mut self.pipeline),
            progress: self.progress.clone(),
            on_conflict: self.settings.on_conflict,
            metrics: self.metrics.clone(),
        };
        let ended = self.commit_ended.clone();
        self.committing = Some(tokio::spawn(async move {
            let result = commit.run(group).await;
            ended.notify_one();
            result
        }));
        Ok(())
    }

    async fn apply_record(&mut self, record: &Record<'_>, batch: &Bytes) -> Result<(), ApplyError> {
        match record {
            Record::Begin(b) => {
                self.in_source_txn = true;
                // Already applied (the stream was resumed from an earlier
                // point than the destination's position).
                self.skipping = b.final_lsn < self.committed;
                self.txn_final = b.final_lsn;
                if !self.skipping {
                    self.ensure_group();
                }
            }
            Record::Commit(c) => {
                self.in_source_txn = false;
                if self.skipping {
                    self.skipping = false;
                    return Ok(());
                }
                if let Some(g) = &mut self.group {
                    if g.source_transactions == 0 {
                        g.first_end = c.end_lsn;
                    }
                    g.source_transactions += 1;
                    g.last_end = c.end_lsn;
                    g.last_commit_time = c.commit_time;
                }
                self.metrics.source_commit_time.set(c.commit_time);
                // Checked at every COMMIT: a batch of packed messages
                // rarely ends at one.
                if self.group_is_full() {
                    self.commit_group().await?;
                }
            }
            Record::Relation(r) => {
                self.flush_bulk(r.oid).await?;
                let mut target = Target::from_relation(r);
                self.learn_destination(&mut target).await?;
                self.statements.retain(|(oid, _), _| *oid != r.oid);
                self.stages.remove(&r.oid);
                self.stages_created.remove(&r.oid);
                self.targets.insert(r.oid, Arc::new(target));
            }
            Record::Insert(i) if !self.skipping => {
                let target = self.target(i.relation)?;
                if self.in_copy(&target) {
                    return Ok(());
                }
                if self.folds(&target) {
                    match row_cells(&target, &i.new.0, batch, &mut self.scratch) {
                        Ok((values, _)) => {
                            if let Some(key) = key_of(&target, &values) {
                                self.fold(target.oid, |b| b.insert(key, values));
                                return self.folded().await;
                            }
                        }
                        Err(Mismatch) => self.cells_to_text(&target).await?,
                    }
                } else if target.key.is_empty() {
                    // No key: nothing to fold, but inserts can be copied in.
                    let appends = self.appends.entry(target.oid).or_default();
                    let before = appends.bytes();
                    match appends.push(&target.cells, &i.new.0, &mut self.scratch) {
                        Ok(()) => {
                            self.folded_bytes += appends.bytes() - before;
                            return self.folded().await;
                        }
                        Err(Mismatch) => self.cells_to_text(&target).await?,
                    }
                }
                self.flush_bulk(target.oid).await?;
                // ON CONFLICT cannot take a DEFERRABLE key as its arbiter.
                let upsert = self.settings.on_conflict == ConflictPolicy::Overwrite && !target.key_deferrable;
                let sql = target.insert_sql(upsert);
                let params = params(&i.new.0, batch);
                // An upsert's DO UPDATE sets every column but the key.
                let writes = upsert && target.writes_identity_always((0..target.columns.len()).filter(|i| !target.key.contains(i)));
                self.execute_writing(&target, writes, sql, params, "INSERT", false).await?;
            }
            Record::Update(u) if !self.skipping => {
                let target = self.target(u.relation)?;
                if self.in_copy(&target) {
                    return Ok(());
                }
                if self.folds(&target) {
                    let cells = row_cells(&target, &u.new.0, batch, &mut self.scratch).and_then(|(values, unchanged)| {
                        let new_key = key_of(&target, &values);
                        // Without an old tuple the key did not change.
                        let old_key = match &u.old {
                            None => new_key.clone(),
                            old => match locator_values(&target, old.as_ref(), Some(&u.new)) {
                                Some(v) => key_cells(&target, &v, batch, &mut self.scratch)?,
                                None => None,
                            },
                        };
                        Ok((values, unchanged, new_key, old_key))
                    });
                    match cells {
                        Ok((values, unchanged, Some(key), Some(old))) => {
                            let moved = (old != key).then_some(old);
                            if self.fold(target.oid, |b| b.update(moved, key, values, unchanged)).is_ok() {
                                return self.folded().await;
                            }
                        }
                        Ok(_) => {}
                        Err(Mismatch) => self.cells_to_text(&target).await?,
                    }
                }
                self.flush_bulk(target.oid).await?;
                // Without an old key the key did not change: it stays out of
                // SET (an identity column GENERATED ALWAYS may not be set).
                let key_unchanged = u.old.is_none();
                let set: Vec<usize> = u
                    .new
                    .0
                    .iter()
                    .enumerate()
                    .filter(|(i, v)| !(matches!(v, Value::UnchangedToast) || (key_unchanged && target.key.contains(i))))
                    .map(|(i, _)| i)
                    .collect();
                if set.is_empty() {
                    // Only key columns, none changed: nothing to write.
                    return Ok(());
                }
                let Some(locator) = locator_values(&target, u.old.as_ref(), Some(&u.new)) else {
                    return self.no_identity("UPDATE", &target);
                };
                let mut p = params(&set.iter().map(|&i| u.new.0[i]).collect::<Vec<_>>(), batch);
                p.extend(params(&locator, batch));
                let writes = target.writes_identity_always(set.iter().copied());
                self.execute_writing(&target, writes, target.update_sql(&set), p, "UPDATE", true).await?;
            }
            Record::Delete(d) if !self.skipping => {
                let target = self.target(d.relation)?;
                if self.in_copy(&target) {
                    return Ok(());
                }
                if self.folds(&target) {
                    if let Some(v) = locator_values(&target, d.old.as_ref(), None) {
                        match key_cells(&target, &v, batch, &mut self.scratch) {
                            Ok(Some(key)) => {
                                self.fold(target.oid, |b| b.delete(key));
                                return self.folded().await;
                            }
                            Ok(None) => {}
                            Err(Mismatch) => self.cells_to_text(&target).await?,
                        }
                    }
                }
                self.flush_bulk(target.oid).await?;
                let Some(locator) = locator_values(&target, d.old.as_ref(), None) else {
                    return self.no_identity("DELETE", &target);
                };
                self.execute(target.oid, target.delete_sql(), params(&locator, batch), "DELETE", true).await?;
            }
            Record::Truncate(t) if !self.skipping && self.settings.apply_truncate => {
                let targets: Vec<Arc<Target>> = t.relations.iter().map(|oid| self.target(*oid)).collect::<Result<_, _>>()?;
                let tables: Vec<String> = targets.iter().filter(|t| !self.in_copy(t)).map(|t| t.qualified.clone()).collect();
                if tables.is_empty() {
                    return Ok(());
                }
                self.flush_all_bulk().await?;
                self.open_transaction().await?;
                if let Some(g) = &mut self.group {
                    g.truncated = true;
                }
                self.drain_pipeline(0).await?;
                let err = |source| ApplyError::Statement { op: "TRUNCATE", table: tables.join(", "), source };
                // Exactly the relations the record names, as PostgreSQL's own
                // apply worker does: the source's CASCADE already put every
                // source table it reached into the record, and cascading
                // again here would empty tables that exist only on the
                // destination or are not selected. A table that such a table
                // references by foreign key cannot be truncated without them;
                // it is emptied by DELETE instead, which in replica role
                // checks no foreign key, as for any replicated DELETE.
                let referenced: Vec<bool> = self
                    .client
                    .query(
                        "SELECT EXISTS (SELECT FROM pg_constraint c
                                         WHERE c.contype = 'f' AND c.confrelid = r.oid
                                           AND NOT c.conrelid = ANY ($1::text[]::regclass[]))
                           FROM unnest($1::text[]::regclass[]) WITH ORDINALITY AS r(oid, n) ORDER BY r.n",
                        &[&tables],
                    )
                    .await
                    .map_err(err)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let (deleted, truncated): (Vec<(&String, bool)>, Vec<(&String, bool)>) =
                    tables.iter().zip(referenced).partition(|(_, referenced)| *referenced);
                let mut sql = String::new();
                if !truncated.is_empty() {
                    let names: Vec<&str> = truncated.iter().map(|(t, _)| t.as_str()).collect();
                    sql = format!("TRUNCATE ONLY {}", names.join(", "));
                    if t.restart_identity {
                        sql.push_str(" RESTART IDENTITY");
                    }
                    sql.push(';');
                }
                for (table, _) in &deleted {
                    sql.push_str(&format!("DELETE FROM ONLY {table};"));
                }
                self.client.batch_execute(&sql).await.map_err(err)?;
            }
            Record::Message(m)
                if !self.skipping && m.transactional && self.settings.apply_messages && !m.prefix.starts_with(b"decant.") =>
            {
                let prefix = String::from_utf8_lossy(m.prefix).into_owned();
                let content = m.content.to_vec();
                self.flush_all_bulk().await?;
                self.open_transaction().await?;
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

    /// Learns what the destination table decides about applying its
    /// changes: how its values go into COPY data (binary when each column
    /// has the same built-in type on the destination as on the source and
    /// decant writes that type in binary, see [`Cells`], else text), its
    /// identity columns GENERATED ALWAYS, and whether its changes must keep
    /// source order (see [`Target::source_order`]).
    async fn learn_destination(&mut self, target: &mut Target) -> Result<(), ApplyError> {
        // The client is the commit task's until settled.
        self.settle().await?;
        let names: Vec<&str> = target.columns.iter().map(String::as_str).collect();
        let key: Vec<&str> = target.key.iter().map(|&i| target.columns[i].as_str()).collect();
        let rows = self
            .client
            .query(
                "SELECT a.atttypid, a.attidentity = 'a'
                   FROM unnest($2::text[]) WITH ORDINALITY AS c(name, n)
                   LEFT JOIN pg_attribute a ON a.attrelid = to_regclass($1) AND a.attname = c.name AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY c.n",
                &[&target.qualified, &names],
            )
            .await
            .map_err(statement_error("reading column types", &target.display))?;
        let destination: Vec<Option<u32>> = rows.iter().map(|r| r.get(0)).collect();
        target.cells = Cells::for_columns(&target.type_oids, &destination);
        target.identity_always =
            rows.iter().enumerate().filter(|(_, r)| r.get::<_, Option<bool>>(1) == Some(true)).map(|(i, _)| i).collect();
        // Unique indexes and exclusion constraints checked row by row
        // (not DEFERRABLE: those are checked at the statement's end, when a
        // merge has written every row), except unique indexes over every key
        // column, which the key already keeps unique.
        // A DEFERRABLE key cannot be the arbiter of the merges' and
        // upserts' ON CONFLICT: such a table goes row by row, inserting
        // plainly (exactly-once apply never inserts a row twice).
        let row = self
            .client
            .query_one(
                "SELECT EXISTS (
                    SELECT FROM pg_index i
                     WHERE i.indrelid = to_regclass($1) AND (i.indisunique OR i.indisexclusion) AND i.indimmediate
                       AND (i.indisexclusion OR cardinality($2::text[]) = 0 OR NOT $2::text[] <@ ARRAY(
                             SELECT a.attname::text FROM pg_attribute a
                              WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[]) AND a.attnum > 0))),
                        EXISTS (
                    SELECT FROM pg_index i
                     WHERE i.indrelid = to_regclass($1) AND i.indisunique AND NOT i.indimmediate AND cardinality($2::text[]) > 0
                       AND $2::text[] @> ARRAY(
                             SELECT a.attname::text FROM pg_attribute a
                              WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[]) AND a.attnum > 0))",
                &[&target.qualified, &key],
            )
            .await
            .map_err(statement_error("reading unique indexes", &target.display))?;
        target.key_deferrable = row.get(1);
        target.source_order = row.get::<_, bool>(0) || target.key_deferrable;
        Ok(())
    }

    /// A value did not fit its column's binary form (the source sent
    /// another kind than its type has): what is folded for the table is
    /// merged, and its values are written as text from now on.
    async fn cells_to_text(&mut self, target: &Target) -> Result<(), ApplyError> {
        self.flush_bulk(target.oid).await?;
        tracing::info!(table = %target.display, "a value does not fit its column's binary COPY form; the table's changes are copied as text");
        let text = Target { cells: Cells::Text, ..target.clone() };
        self.targets.insert(target.oid, Arc::new(text));
        Ok(())
    }

    /// The change is already in a re-copied table's snapshot.
    fn in_copy(&self, target: &Target) -> bool {
        self.skip_before.get(&target.qualified).is_some_and(|&lsn| self.txn_final < lsn)
    }

    fn target(&self, oid: u32) -> Result<Arc<Target>, ApplyError> {
        self.targets.get(&oid).cloned().ok_or(ApplyError::UnknownRelation(oid))
    }

    /// An UPDATE or DELETE that does not say which row: never skipped (the
    /// destination would keep a row the source changed), whatever the
    /// conflict policy. A task refuses such tables at start; this is one
    /// whose identity changed later, or one accepted as insert-only.
    fn no_identity(&mut self, op: &'static str, target: &Target) -> Result<(), ApplyError> {
        Err(ApplyError::NoIdentity { op, table: target.display.clone() })
    }

    async fn statement(&mut self, oid: u32, sql: String, table: &str) -> Result<Statement, ApplyError> {
        let key = (oid, sql);
        if let Some(s) = self.statements.get(&key) {
            return Ok(s.clone());
        }
        let statement = self.client.prepare(&key.1).await.map_err(statement_error("PREPARE", table))?;
        self.statements.insert(key, statement.clone());
        Ok(statement)
    }

    /// Sends a statement now and collects its result later, keeping at most
    /// `pipeline_depth` in flight.
    async fn execute(
        &mut self,
        oid: u32,
        sql: String,
        params: Vec<Option<Param>>,
        op: &'static str,
        expects_row: bool,
    ) -> Result<(), ApplyError> {
        self.open_transaction().await?;
        self.touch(oid);
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
        self.changes_unreported += 1;
        self.drain_pipeline(self.settings.pipeline_depth).await
    }

    /// [`Applier::execute`] for a statement that, when `writes_identity`,
    /// sets identity columns GENERATED ALWAYS: they are made BY DEFAULT
    /// around it, in the group's transaction (see
    /// [`Target::identity_always_sql`]). The statement is prepared while
    /// they are, since preparing checks the columns too.
    async fn execute_writing(
        &mut self,
        target: &Target,
        writes_identity: bool,
        sql: String,
        params: Vec<Option<Param>>,
        op: &'static str,
        expects_row: bool,
    ) -> Result<(), ApplyError> {
        let Some((relax, restore)) = target.identity_always_sql().filter(|_| writes_identity) else {
            return self.execute(target.oid, sql, params, op, expects_row).await;
        };
        self.open_transaction().await?;
        self.drain_pipeline(0).await?;
        let ddl_err = |source| ApplyError::Statement { op: "ALTER COLUMN … SET GENERATED", table: target.display.clone(), source };
        self.client.batch_execute(&relax).await.map_err(ddl_err)?;
        self.execute(target.oid, sql, params, op, expects_row).await?;
        self.drain_pipeline(0).await?;
        self.client.batch_execute(&restore).await.map_err(ddl_err)
    }

    async fn drain_pipeline(&mut self, keep: usize) -> Result<(), ApplyError> {
        drain(&mut self.pipeline, keep, self.settings.on_conflict, &self.metrics).await
    }

    /// Notes that the group wrote `oid` on the main connection.
    fn touch(&mut self, oid: u32) {
        if let Some(g) = &mut self.group {
            g.touched.insert(oid);
        }
    }

    /// Whether changes of `target` are folded for set-based apply: tables
    /// with a key, under the overwrite policy (the stop policy applies row by
    /// row so that the first offending row is the one reported), unless the
    /// destination table needs its changes in source order.
    fn folds(&self, target: &Target) -> bool {
        !target.key.is_empty() && self.settings.on_conflict == ConflictPolicy::Overwrite && !target.source_order
    }

    /// After folding a change: merge when the folded changes grew large.
    async fn folded(&mut self) -> Result<(), ApplyError> {
        self.changes_unreported += 1;
        if self.folded_bytes >= BULK_FLUSH_BYTES {
            self.flush_all_bulk().await?;
        }
        Ok(())
    }

    /// Folds one change of table `oid` into its buffer (made with room for
    /// as many keys as its previous group had) and counts the memory it adds.
    fn fold<R>(&mut self, oid: u32, change: impl FnOnce(&mut bulk::Buffer) -> R) -> R {
        let rows = &self.bulk_rows;
        let buffer = self.bulk.entry(oid).or_insert_with(|| bulk::Buffer::with_capacity(rows.get(&oid).copied().unwrap_or(0)));
        let before = buffer.bytes;
        let result = change(buffer);
        self.folded_bytes += buffer.bytes - before;
        result
    }

    async fn flush_all_bulk(&mut self) -> Result<(), ApplyError> {
        let oids: Vec<u32> = self.bulk.keys().chain(self.appends.keys()).copied().collect();
        for oid in oids {
            self.flush_bulk(oid).await?;
        }
        Ok(())
    }

    /// Merges the folded changes of one table now (in the middle of a
    /// group: before a change that cannot fold, or when they grew large).
    async fn flush_bulk(&mut self, oid: u32) -> Result<(), ApplyError> {
        let appends = self.appends.remove(&oid);
        let buffer = self.bulk.remove(&oid);
        self.folded_bytes -= appends.as_ref().map_or(0, bulk::Appends::bytes) + buffer.as_ref().map_or(0, |b| b.bytes);
        let buffer = buffer.filter(|b| !b.is_empty());
        if appends.is_none() && buffer.is_none() {
            return Ok(());
        }
        self.open_transaction().await?;
        self.touch(oid);
        self.drain_pipeline(0).await?;
        let target = self.target(oid)?;
        if let Some(rows) = appends {
            Merge::Append { target: target.clone(), rows }.run(&self.client, Conn::Main, &self.metrics).await?;
        }
        if let Some(buffer) = buffer {
            let stage = self.ensure_stage(oid).await?;
            for merge in Merge::staged(target, stage, buffer, 1) {
                merge.run(&self.client, Conn::Main, &self.metrics).await?;
            }
        }
        Ok(())
    }

    /// The table's staging SQL; creates its staging table in this session,
    /// inside the open transaction, if it is not there yet.
    async fn ensure_stage(&mut self, oid: u32) -> Result<Arc<StageSql>, ApplyError> {
        let target = self.target(oid)?;
        let table = target.display.clone();
        let stmt_err = |op| statement_error(op, &table);
        let stage = if let Some(stage) = self.stages.get(&oid) {
            stage.clone()
        } else {
            self.generation += 1;
            // INSERT … ON CONFLICT is refused on tables with INSERT or
            // UPDATE rules, even when the rules would not fire.
            // The second: whether the table's merges may be split (see
            // StageSql::splittable).
            let row = self
                .client
                .query_one(
                    "SELECT EXISTS (SELECT FROM pg_rewrite WHERE ev_class = $1::text::regclass AND ev_type IN ('2', '3')),
                            (SELECT count(*) FROM pg_index WHERE indrelid = $1::text::regclass AND indisunique) = 1
                            AND NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = $1::text::regclass AND contype = 'x')
                            AND NOT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgenabled IN ('A', 'R'))
                            AND NOT EXISTS (
                                SELECT FROM pg_index i
                                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                                 WHERE i.indrelid = $1::text::regclass AND i.indisunique
                                   AND (i.indexprs IS NOT NULL
                                        OR a.atttypid NOT IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'bool'::regtype,
                                                              'text'::regtype, 'varchar'::regtype, 'uuid'::regtype, 'date'::regtype,
                                                              'timestamp'::regtype, 'timestamptz'::regtype, 'bytea'::regtype)
                                        -- (collisdeterministic exists from PostgreSQL 12 on)
                                        OR EXISTS (SELECT FROM pg_collation c WHERE c.oid = ANY (i.indcollation)
                                                      AND NOT coalesce((to_jsonb(c) ->> 'collisdeterministic')::bool, true))))",
                    &[&target.qualified],
                )
                .await
                .map_err(stmt_err("reading rules, unique indexes and triggers"))?;
            // A merge that makes identity columns BY DEFAULT locks the table
            // until its group commits: the second connection would wait on it.
            let splittable = row.get::<_, bool>(1) && merge_identity_sql(&target).is_none();
            let stage = Arc::new(StageSql::new(&target, self.generation, row.get(0), splittable));
            self.stages.insert(oid, stage.clone());
            self.stages_created.remove(&oid);
            stage
        };
        if self.stages_created.contains(&oid) {
            return Ok(stage);
        }
        create_stage(&self.client, &stage, &table).await?;
        stage.created(Conn::Main);
        self.stages_created.insert(oid);
        Ok(stage)
    }

    /// Rolls back an open group (after an error, before reconnecting). A
    /// group already committing is let finish: it holds its own progress.
    pub async fn abort(&mut self) {
        if let Some(job) = self.committing.take() {
            let _ = job.await;
        }
        self.bulk.clear();
        self.appends.clear();
        self.folded_bytes = 0;
        self.stages_created.clear();
        self.pipeline.clear();
        self.group = None;
        // Also ends the transaction of a commit task that failed half-way.
        let _ = self.client.batch_execute("ROLLBACK").await;
        if let Some(h) = &self.helper {
            let _ = h.client.batch_execute("ROLLBACK").await;
            // A staging table created in a rolled-back transaction is gone.
            h.stages_created.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        self.in_source_txn = false;
        self.skipping = false;
    }
}

/// The destination work of a group once its last source transaction is
/// folded: run by its own task, so the applier folds the next group meanwhile.
struct GroupCommit {
    client: Arc<Client>,
    merges: Vec<Merge>,
    /// Halves of split merges, for the second connection.
    second: Option<(Helper, Vec<Merge>)>,
    /// Row-by-row statements already sent, whose results are still due.
    pipeline: std::collections::VecDeque<InFlight>,
    progress: ProgressStore,
    on_conflict: ConflictPolicy,
    metrics: Arc<Metrics>,
}

impl GroupCommit {
    /// Returns the group and an upper bound of its commit's WAL position.
    async fn run(mut self, group: Group) -> Result<(Group, Lsn), ApplyError> {
        if !group.begun {
            self.client.batch_execute("BEGIN").await.map_err(ApplyError::Session)?;
        }
        drain(&mut self.pipeline, 0, self.on_conflict, &self.metrics).await?;
        let client = &self.client;
        let metrics = &self.metrics;
        let main = async {
            let mut copied = Vec::with_capacity(self.merges.len());
            for merge in self.merges {
                let table = merge.target().display.clone();
                copied.push((table, merge.run(client, Conn::Main, metrics).await?));
            }
            Ok(copied)
        };
        // The second connection commits its halves before this group's
        // commit: they are idempotent (net rows by key), so if this commit
        // then fails, applying the group again rewrites them with the same
        // values, while the progress record stays exact.
        let second = async {
            let Some((helper, merges)) = self.second else { return Ok(()) };
            helper.client.batch_execute("BEGIN").await.map_err(ApplyError::Session)?;
            for merge in merges {
                if let Merge::Stage { target, stage, .. } = &merge {
                    let created = helper.stages_created.lock().unwrap_or_else(|e| e.into_inner()).contains(&stage.stage);
                    if !created {
                        create_stage(&helper.client, stage, &target.display).await?;
                        stage.created(Conn::Second);
                        helper.stages_created.lock().unwrap_or_else(|e| e.into_inner()).insert(stage.stage.clone());
                    }
                }
                merge.run(&helper.client, Conn::Second, metrics).await?;
            }
            helper.client.batch_execute("COMMIT").await.map_err(ApplyError::Session)
        };
        let (copied, ()) = tokio::try_join!(main, second)?;
        let record = (group.source_transactions > 0).then_some(group.last_end);
        let wal = self.progress.commit(&self.client, record).await?;
        tracing::debug!(
            transactions = group.source_transactions,
            first_end = %group.first_end,
            last_end = %group.last_end,
            destination_wal = %wal,
            ?copied,
            "group committed"
        );
        Ok((group, wal))
    }
}

/// Creates a staging table in `client`'s session, inside its open
/// transaction.
async fn create_stage(client: &Client, stage: &StageSql, table: &str) -> Result<(), ApplyError> {
    let stmt_err = |op| statement_error(op, table);
    client.batch_execute(&stage.create).await.map_err(stmt_err("CREATE staging table"))?;
    // Staging columns take the domains' base types: a staged deletion
    // has no values, which a NOT NULL domain refuses.
    loop {
        let domains = client
            .query(
                "SELECT format('ALTER TABLE %s ALTER COLUMN %I TYPE %s', $1::text, a.attname, format_type(t.typbasetype, t.typtypmod))
                   FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                  WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND t.typtype = 'd'",
                &[&stage.stage],
            )
            .await
            .map_err(stmt_err("reading staging column types"))?;
        if domains.is_empty() {
            return Ok(());
        }
        for d in domains {
            client.batch_execute(d.get(0)).await.map_err(stmt_err("ALTER staging table"))?;
        }
    }
}

/// Folded changes of one table, ready to be written.
enum Merge {
    /// INSERTs into a table without a key, as COPY data.
    Append { target: Arc<Target>, rows: bulk::Appends },
    /// Net changes per key as COPY data for the staging table, merged from
    /// there.
    Stage { target: Arc<Target>, stage: Arc<StageSql>, data: BytesMut, counts: bulk::Counts },
}

impl Merge {
    /// Turns folded changes into their staging rows. Done where they were
    /// folded: their many small allocations are freed on the thread that
    /// made them (freeing them on the commit task's thread made the
    /// allocator contend). `parts`: merges to make, each with its own
    /// range of the keys.
    fn staged(target: Arc<Target>, stage: Arc<StageSql>, buffer: bulk::Buffer, parts: usize) -> Vec<Merge> {
        buffer
            .into_copy_data(&target, parts)
            .into_iter()
            .map(|(data, counts)| Merge::Stage { target: target.clone(), stage: stage.clone(), data, counts })
            .collect()
    }

    fn target(&self) -> &Target {
        match self {
            Merge::Append { target, .. } | Merge::Stage { target, .. } => target,
        }
    }

    /// Writes the changes; returns the rows copied (appended or staged).
    async fn run(self, client: &Client, conn: Conn, metrics: &Metrics) -> Result<u64, ApplyError> {
        match self {
            Merge::Append { target, rows } => {
                let copy = format!(
                    "COPY {}{} FROM STDIN{}",
                    target.qualified,
                    crate::connect::sql::column_list(&target.columns),
                    target.cells.copy_options()
                );
                let sent = rows.rows;
                let loaded = copy_in(client, &copy, rows.finish(&target.cells)).await.map_err(statement_error("COPY", &target.display))?;
                check_copied(&target, sent, loaded)
            }
            Merge::Stage { target, stage, data, counts } => {
                let table = target.display.as_str();
                let stmt_err = |op| statement_error(op, table);
                let staged = data.len();
                let loaded = copy_in(client, stage.copy(&target.cells), data.freeze()).await.map_err(stmt_err("COPY"))?;
                check_copied(&target, counts.rows(), loaded)?;
                let identity = merge_identity_sql(&target);
                if let Some((relax, _)) = &identity {
                    client.batch_execute(relax).await.map_err(stmt_err("ALTER COLUMN … SET GENERATED BY DEFAULT"))?;
                }
                // Each statement scans the staging table: only those with
                // rows to act on run.
                let mut deleted = 0;
                if counts.deletes > 0 {
                    deleted = client.execute(&stage.delete, &[]).await.map_err(stmt_err("DELETE"))? as usize;
                }
                let update = if counts.keeps_values { &stage.update_keeping } else { &stage.update };
                let updated = match update {
                    Some(sql) if counts.updates > 0 => client.execute(sql, &[]).await.map_err(stmt_err("UPDATE"))? as usize,
                    _ => counts.updates,
                };
                if counts.inserts > 0 {
                    client.batch_execute(&stage.insert).await.map_err(stmt_err("INSERT"))?;
                }
                if let Some((_, restore)) = &identity {
                    client.batch_execute(restore).await.map_err(stmt_err("ALTER COLUMN … SET GENERATED ALWAYS"))?;
                }
                client.batch_execute(stage.empty(conn, staged)).await.map_err(stmt_err("emptying the staging table"))?;
                let missing = counts.updates.saturating_sub(updated) + counts.deletes_counted.saturating_sub(deleted);
                if missing > 0 {
                    metrics.missing_rows.add(missing as u64);
                    tracing::warn!(
                        table,
                        rows = missing,
                        "rows not found on the destination for UPDATE or DELETE; changes counted and skipped"
                    );
                }
                Ok(loaded)
            }
        }
    }
}

/// The statements around a merge of `target` when its UPDATE and upsert
/// set identity columns GENERATED ALWAYS (every column but the key).
fn merge_identity_sql(target: &Target) -> Option<(String, String)> {
    let non_key = (0..target.columns.len()).filter(|i| !target.key.contains(i));
    target.identity_always_sql().filter(|_| target.writes_identity_always(non_key))
}

/// A COPY must load every row sent: anything else means the data written
/// is not the data folded, and committing the group's position with it
/// would lose changes.
fn check_copied(target: &Target, sent: u64, loaded: u64) -> Result<u64, ApplyError> {
    if sent != loaded {
        return Err(ApplyError::CopyCount { table: target.display.clone(), sent, loaded });
    }
    Ok(loaded)
}

/// Collects the results of row-by-row statements in flight until at most
/// `keep` remain.
async fn drain(
    pipeline: &mut std::collections::VecDeque<InFlight>,
    keep: usize,
    on_conflict: ConflictPolicy,
    metrics: &Metrics,
) -> Result<(), ApplyError> {
    while pipeline.len() > keep {
        let Some(item) = pipeline.pop_front() else { break };
        let rows = item.future.await.map_err(|source| ApplyError::Statement { op: item.op, table: item.table.clone(), source })?;
        if rows == 0 && item.expects_row {
            match on_conflict {
                ConflictPolicy::Stop => return Err(ApplyError::MissingRow { op: item.op, table: item.table }),
                ConflictPolicy::Overwrite => {
                    metrics.missing_rows.inc();
                    tracing::warn!(table = %item.table, op = item.op, "row not found on the destination; change counted and skipped");
                }
            }
        }
    }
    Ok(())
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

/// The error for a failed statement on `table`; a missing table gets its
/// own error, which says what to do.
fn statement_error<'t>(op: &'static str, table: &'t str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError + 't {
    move |source| {
        if source.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
            ApplyError::MissingTable { table: table.to_owned() }
        } else {
            ApplyError::Statement { op, table: table.to_owned(), source }
        }
    }
}

/// Runs `COPY … FROM STDIN` with `data` (COPY text).
async fn copy_in(client: &Client, sql: &str, data: Bytes) -> Result<u64, tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = client.copy_in::<_, Bytes>(sql).await?;
    let mut sink = std::pin::pin!(sink);
    sink.send(data).await?;
    sink.as_mut().finish().await
}

/// A tuple's cells in the table's encoding, and which values are
/// unchanged TOAST (empty when none is).
fn row_cells(target: &Target, values: &[Value<'_>], batch: &Bytes, scratch: &mut BytesMut) -> Result<(Vec<Text>, Vec<bool>), Mismatch> {
    let unchanged = if values.iter().any(|v| matches!(v, Value::UnchangedToast)) {
        values.iter().map(|v| matches!(v, Value::UnchangedToast)).collect()
    } else {
        Vec::new()
    };
    let cells = values.iter().enumerate().map(|(i, v)| cell(&target.cells, i, v, batch, scratch)).collect::<Result<_, _>>()?;
    Ok((cells, unchanged))
}

/// The cells of the key columns' `values` (in key order), or `None` if
/// one is NULL or unchanged (then it cannot serve as a key).
fn key_cells(target: &Target, values: &[Value<'_>], batch: &Bytes, scratch: &mut BytesMut) -> Result<Option<Vec<Text>>, Mismatch> {
    let mut key = Vec::with_capacity(values.len());
    for (&column, v) in target.key.iter().zip(values) {
        match cell(&target.cells, column, v, batch, scratch)? {
            Some(c) => key.push(Some(c)),
            None => return Ok(None),
        }
    }
    Ok(Some(key))
}

/// The key columns of a row's texts; `None` if one is NULL or unchanged.
fn key_of(target: &Target, values: &[Text]) -> Option<Vec<Text>> {
    target.key.iter().map(|&i| values.get(i).cloned().flatten().map(Some)).collect()
}

fn params(values: &[Value<'_>], batch: &Bytes) -> Vec<Option<Param>> {
    values
        .iter()
        .map(|v| match v {
            Value::Null | Value::UnchangedToast => None,
            Value::Bytes(raw) => Some(Param { bytes: slice(batch, raw), binary: true }),
            other => other.to_pg_text().map(|t| Param {
                bytes: match t {
                    std::borrow::Cow::Borrowed(b) => slice(batch, b),
                    std::borrow::Cow::Owned(v) => Bytes::from(v),
                },
                binary: false,
            }),
        })
        .collect()
}
