//! Applying decant records to the destination, in source commit order: the
//! orchestration of one stream. A batch is decoded whole (every CRC checked
//! before anything is applied), and each record is dispatched: BEGIN and
//! COMMIT open and close source transactions within a group (see
//! `commit`), RELATION teaches the applier a table (and what its
//! destination decides about applying it), and each change is either folded
//! (see `fold`, merged set-based by `merge`) or applied row by row (see
//! `rowwise`), after what is folded for its table has been merged.
//!
//! Many source transactions are grouped into one destination transaction
//! (bounded by count, bytes and time), statements are prepared once per
//! relation and shape and pipelined, and the group's last source commit LSN
//! is recorded in the same destination transaction. A crash anywhere loses
//! the open group as a whole, and the agent resumes from the recorded
//! position: nothing is lost and nothing applied twice.
//!
//! The [`Applier`]'s state is shared by those modules (its fields are
//! visible to its siblings); each module's `impl Applier` holds the steps
//! of its own concern.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use decant_proto::{decode, DecodeError, Lsn, Record};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Statement};

use super::cells::{Cells, Mismatch};
use super::commit::{Group, Position, FIRST_GROUP_FOLDED_BYTES};
use super::fold::Folding;
use super::merge::Helper;
use super::progress::{ProgressError, ProgressStore};
use super::rowwise::InFlight;
use super::stage::StageSql;
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

/// The error for a failed statement on `table`; a missing table gets its
/// own error, which says what to do.
pub(super) fn statement_error<'t>(op: &'static str, table: &'t str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError + 't {
    move |source| {
        if source.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
            ApplyError::MissingTable { table: table.to_owned() }
        } else {
            ApplyError::Statement { op, table: table.to_owned(), source }
        }
    }
}

/// Maps looked up by relation OID on every change: a fast hash (the
/// default SipHash showed in the applier's profile while folding a backlog).
pub type OidMap<V> = HashMap<u32, V, foldhash::fast::RandomState>;

pub struct Applier {
    pub(super) client: Arc<Client>,
    /// Ends when the destination session does (see [`Applier::session_ended`]).
    connection: JoinHandle<()>,
    pub(super) settings: ApplySettings,
    pub(super) metrics: Arc<Metrics>,
    pub(super) targets: OidMap<Arc<Target>>,
    pub(super) statements: HashMap<(u32, String), Statement>,
    pub(super) progress: ProgressStore,
    /// The last source transaction committed on the destination, which of
    /// those commits are durable, and the re-copied tables' snapshot
    /// positions (see [`Position`]).
    pub(super) position: Position,
    pub(super) group: Option<Group>,
    /// Inside a source transaction (between BEGIN and COMMIT).
    pub(super) in_source_txn: bool,
    /// The current source transaction was applied before (a resend).
    pub(super) skipping: bool,
    pub(super) pipeline: VecDeque<InFlight>,
    /// Changes folded for set-based apply, and the memory they hold.
    pub(super) folding: Folding,
    /// The group's bound on the folded changes' memory: GROUP_FOLDED_BYTES,
    /// reached by doubling from FIRST_GROUP_FOLDED_BYTES (see there).
    pub(super) group_folded_limit: usize,
    /// Changes applied in this batch, added to the metric once per batch
    /// (an atomic add per change, on a cache line that other threads
    /// write, took 6% of the applier's time in a backlog).
    pub(super) changes_unreported: u64,
    /// Staging SQL per table; a new generation when the table's shape changes.
    pub(super) stages: HashMap<u32, Arc<StageSql>>,
    /// Staging tables that exist in this session.
    pub(super) stages_created: HashSet<u32>,
    pub(super) generation: u64,
    /// Commit LSN of the current source transaction.
    pub(super) txn_final: Lsn,
    /// Folded values that are not slices of a batch are written here; the
    /// long ones are kept as slices of it: one allocation for many values.
    pub(super) scratch: BytesMut,
    /// The previous group, committing on the destination while this one is
    /// folded. The client is its own until [`Applier::settle`] took it back.
    pub(super) committing: Option<JoinHandle<Result<(Group, Lsn), ApplyError>>>,
    /// Notified as each commit task ends (see [`Applier::flush`]).
    pub(super) commit_ended: Arc<tokio::sync::Notify>,
    pub(super) helper: Option<Helper>,
    helper_connection: Option<JoinHandle<()>>,
}

impl Applier {
    /// Whether a destination session of this applier has ended (the
    /// destination restarted, or someone ended it): an idle applier would
    /// otherwise notice only with its next statement.
    pub fn session_ended(&self) -> bool {
        self.connection.is_finished() || self.helper_connection.as_ref().is_some_and(|c| c.is_finished())
    }

    /// Connects to the destination and reads the resume position.
    pub async fn open(destination: &ConnInfo, settings: ApplySettings, metrics: Arc<Metrics>) -> Result<Applier, ApplyError> {
        // session_replication_role = replica: no triggers or FK checks fire
        // for replicated rows (the source already enforced them). work_mem:
        // merges sort a staging table of up to BULK_FLUSH_BYTES in memory.
        const OPTIONS: &str = "-c session_replication_role=replica -c synchronous_commit=off -c work_mem=64MB";
        // Named after the task, whatever the connection string says, so
        // that `decant cutover` can end exactly these sessions.
        let [main_name, second_name] = super::session_names(&settings.task_id);
        let destination = &ConnInfo { application_name: None, ..destination.clone() };
        let (client, connection) = connect(destination, &main_name, OPTIONS).await?;
        let (helper, helper_connection) = if settings.split_merges {
            let (client, connection) = connect(destination, &second_name, OPTIONS).await?;
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
        let folding = Folding::new(settings.on_conflict);
        Ok(Applier {
            client: Arc::new(client),
            connection,
            settings,
            metrics,
            targets: OidMap::default(),
            statements: HashMap::new(),
            progress,
            position: Position::new(committed, skip_before),
            group: None,
            in_source_txn: false,
            skipping: false,
            pipeline: Default::default(),
            folding,
            group_folded_limit: FIRST_GROUP_FOLDED_BYTES,
            changes_unreported: 0,
            stages: HashMap::new(),
            stages_created: Default::default(),
            generation: 0,
            txn_final: Lsn(0),
            scratch: BytesMut::new(),
            committing: None,
            commit_ended: Default::default(),
            helper,
            helper_connection,
        })
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

    async fn apply_record(&mut self, record: &Record<'_>, batch: &Bytes) -> Result<(), ApplyError> {
        match record {
            Record::Begin(b) => {
                self.in_source_txn = true;
                // Already applied (the stream was resumed from an earlier
                // point than the destination's position).
                self.skipping = self.position.applied(b.final_lsn);
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
                    g.source_commit(c.end_lsn, c.commit_time);
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
                let attempt = self.folding.fold_insert(&target, &i.new, batch, &mut self.scratch);
                if self.folded(&target, attempt).await? {
                    return Ok(());
                }
                self.flush_bulk(target.oid).await?;
                self.insert_row(&target, i, batch).await?;
            }
            Record::Update(u) if !self.skipping => {
                let target = self.target(u.relation)?;
                if self.in_copy(&target) {
                    return Ok(());
                }
                let attempt = self.folding.fold_update(&target, u, batch, &mut self.scratch);
                if self.folded(&target, attempt).await? {
                    return Ok(());
                }
                self.flush_bulk(target.oid).await?;
                self.update_row(&target, u, batch).await?;
            }
            Record::Delete(d) if !self.skipping => {
                let target = self.target(d.relation)?;
                if self.in_copy(&target) {
                    return Ok(());
                }
                let attempt = self.folding.fold_delete(&target, d.old.as_ref(), batch, &mut self.scratch);
                if self.folded(&target, attempt).await? {
                    return Ok(());
                }
                self.flush_bulk(target.oid).await?;
                self.delete_row(&target, d.old.as_ref(), batch).await?;
            }
            Record::Truncate(t) if !self.skipping && self.settings.apply_truncate => self.truncate(t).await?,
            Record::Message(m)
                if !self.skipping && m.transactional && self.settings.apply_messages && !m.prefix.starts_with(b"decant.") =>
            {
                self.message(m).await?
            }
            _ => {}
        }
        Ok(())
    }

    /// After an attempt to fold a change. Folded (true): merge when the
    /// folded changes grew large. Not folded (false): the change is applied
    /// row by row, the table's values switched to text first if one did not
    /// fit its binary form.
    async fn folded(&mut self, target: &Target, attempt: Result<bool, Mismatch>) -> Result<bool, ApplyError> {
        match attempt {
            Ok(true) => {
                self.changes_unreported += 1;
                if self.folding.is_large() {
                    self.flush_all_bulk().await?;
                }
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(Mismatch) => {
                self.cells_to_text(target).await?;
                Ok(false)
            }
        }
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
    pub(super) fn in_copy(&self, target: &Target) -> bool {
        self.position.in_copy(&target.qualified, self.txn_final)
    }

    pub(super) fn target(&self, oid: u32) -> Result<Arc<Target>, ApplyError> {
        self.targets.get(&oid).cloned().ok_or(ApplyError::UnknownRelation(oid))
    }
}
