//! The destination side: applying the stream's records exactly once, and
//! running the schema steps and copied ranges of a migration.
//!
//! The stream: `apply` reads records and dispatches each change; `fold`
//! nets a group's changes per key; `stage` and `merge` apply them set-based
//! through staging tables; `rowwise` applies what cannot fold, in source
//! order; `commit` groups source transactions into destination
//! transactions and decides what may be acknowledged; `progress` keeps the
//! position in the same transaction as the data. `cells` and `statements`
//! are the per-table shapes they share. `migration` runs the schema steps
//! and copied ranges. `service` answers the gRPC server's calls with all
//! this; the server itself is plumbing in `transport`.
//!
//! Many source transactions are grouped into one destination transaction
//! (bounded by count, bytes and time), statements are prepared once per
//! relation and shape and pipelined, and the group's last source commit LSN
//! is recorded in the same destination transaction. A crash anywhere loses
//! the open group as a whole, and the agent resumes from the recorded
//! position: nothing is lost and nothing applied twice.
//!
//! The [`Applier`]'s state is defined here and shared by those modules;
//! each module's `impl Applier` holds the steps of its own concern, and
//! they depend on each other only downwards (`layers.rs` checks it).

pub mod apply;
pub mod cells;
pub mod commit;
pub mod ddl;
pub mod fold;
pub mod merge;
pub mod migration;
pub mod progress;
pub mod rowwise;
pub mod service;
pub mod stage;
pub mod statements;

pub use service::Service;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use decant_proto::options::PluginOptions;
use decant_proto::{DecodeError, Lsn};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Statement};

use self::commit::{Group, Position};
use self::fold::{Folding, FIRST_GROUP_FOLDED_BYTES};
use self::merge::Helper;
use self::progress::{ProgressError, ProgressStore};
use self::rowwise::InFlight;
use self::stage::StageSql;
use self::statements::Target;
use crate::config::{ConflictPolicy, DdlPolicy, Mapping, OperationRules, Operations};
use crate::connect::sql::{connect, ConnectError};
use crate::connect::ConnInfo;
use crate::metrics::Metrics;

/// The `application_name`s of a task's applier sessions on the
/// destination (the main one, and the second of `split_merges`), by which
/// `decant cutover` ends them.
pub fn session_names(task_id: &str) -> [String; 2] {
    [format!("decant applier {task_id}"), format!("decant applier {task_id} (second)")]
}

#[derive(Clone, Debug)]
pub struct ApplySettings {
    pub task_id: String,
    pub group_max_transactions: usize,
    pub group_max_bytes: usize,
    pub group_max_delay: Duration,
    pub pipeline_depth: usize,
    pub on_conflict: ConflictPolicy,
    /// TRUNCATE is applied at all (and then to the tables whose
    /// `operations` allow it).
    pub apply_truncate: bool,
    /// Which operations are applied to which tables (`applier.operations`).
    pub operations: OperationRules,
    pub apply_messages: bool,
    pub split_merges: bool,
    /// Destination names, row filters and transforms (`migrate.map`).
    pub mapping: Arc<Mapping>,
    /// What is done with DDL captured on the source (`migrate.ddl`).
    pub ddl: DdlPolicy,
    /// The task's tables (source.include_tables, exclude_tables): which
    /// captured DDL concerns it.
    pub selection: Arc<PluginOptions>,
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
    #[error("migrate.map entry of table {table}: {reason}")]
    Mapping { table: String, reason: String },
    #[error(
        "UPDATE of {table} left a TOASTed value unchanged, so the change does not hold the whole row; the table has a row \
         filter or transforms (migrate.map), and its rows are rewritten whole on the destination, which needs the old row. \
         Set ALTER TABLE {table} REPLICA IDENTITY FULL on the source, then migrate the table again"
    )]
    NeedsOldRow { table: String },
    #[error("destination: {0}")]
    Session(#[source] tokio_postgres::Error),
    #[error("{0}")]
    Progress(#[from] ProgressError),
    #[error("the task committing a group on the destination failed: {0}")]
    CommitTask(String),
    #[error("COPY into {table} loaded {loaded} rows where {sent} were sent; the group was rolled back")]
    CopyCount { table: String, sent: u64, loaded: u64 },
    #[error(
        "migrate.ddl = \"stop\": the task stops at {what}, source position {at}: {statement}\nMake the change on the destination \
         if you want it, then run `decant skip-ddl --at {at}` and start the task again"
    )]
    DdlStopped { at: Lsn, what: String, statement: String },
    #[error(
        "{what} at source position {at} cannot be applied: {reason}\nMake the same change on the destination by hand, then run \
         `decant skip-ddl --at {at}` and start the task again"
    )]
    DdlNotReplayable { at: Lsn, what: String, reason: String },
    #[error(
        "{what} at source position {at} failed on the destination: {error}\n  statement: {statement}\nNothing after it was \
         applied. Fix the destination and start the task again (it runs the statement again), or make the change by hand \
         and run `decant skip-ddl --at {at}`"
    )]
    DdlFailed { at: Lsn, what: String, statement: String, error: String },
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
    /// The current source transaction runs CREATE TABLE AS or SELECT INTO
    /// (announced by the capture): a table of its changes that the
    /// destination lacks is created (see [`Applier::create_missing_table`]).
    pub(super) creating_table: bool,
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
    /// Changes skipped by `applier.operations` in this batch, likewise.
    pub(super) skipped_unreported: u64,
    /// The tables (and operations) whose skipped changes were logged.
    pub(super) skipped_logged: HashSet<(u32, Operations)>,
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
        let [main_name, second_name] = session_names(&settings.task_id);
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
        let skip_before = migration::skip_before(&client, &settings.task_id, &settings.mapping).await.map_err(ApplyError::Session)?;
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
            creating_table: false,
            pipeline: Default::default(),
            folding,
            group_folded_limit: FIRST_GROUP_FOLDED_BYTES,
            changes_unreported: 0,
            skipped_unreported: 0,
            skipped_logged: HashSet::new(),
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
}
