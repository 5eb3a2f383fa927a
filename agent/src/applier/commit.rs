//! Group commit and progress: many source transactions are grouped into
//! one destination transaction, whose commit also records the group's last
//! source commit LSN (see `progress`). A crash anywhere loses the open group
//! as a whole, and the agent resumes from the recorded position: nothing is
//! lost and nothing applied twice.
//!
//! The rules that make this exactly once are decisions on plain values,
//! kept apart from the I/O so they are unit tested without a server:
//! - a group ends only at a source COMMIT: once it holds enough
//!   transactions, bytes, time or folded memory ([`Group::is_full`]; the
//!   first groups of a stream with a smaller memory bound,
//!   [`next_folded_limit`]), or when no more input waits and no other group
//!   is committing ([`commits_on_flush`]);
//! - a group's commit records its last source transaction's end LSN
//!   ([`Group::position`]), which becomes the position a new stream resumes
//!   from once that commit has ended ([`Position::group_committed`]);
//! - a resent source transaction whose commit record lies before that
//!   position is skipped ([`Position::applied`]), and so are the changes
//!   of a table copied again that its new snapshot already holds
//!   ([`Position::in_copy`]);
//! - a position is confirmed to the source only once the destination
//!   commit that recorded it is on disk ([`Position::durable`], see
//!   `progress::Durability`).
//!
//! A group's merges, progress record and COMMIT run in a task of their own
//! ([`GroupCommit`]) while the next group is folded; one group commits at a
//! time, and the main connection is the commit task's until
//! [`Applier::settle`] takes it back.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use decant_proto::Lsn;
use tokio_postgres::Client;

use super::fold::GROUP_FOLDED_BYTES;
use super::merge::{self, Helper, Merge};
use super::progress::{Durability, ProgressError, ProgressStore};
use super::rowwise::{drain, InFlight};
use super::{Applier, ApplyError, ApplySettings};
use crate::config::ConflictPolicy;
use crate::metrics::Metrics;

/// The bound on the folded memory of the group after one bounded by
/// `limit` (see [`super::fold::FIRST_GROUP_FOLDED_BYTES`]).
pub fn next_folded_limit(limit: usize) -> usize {
    (limit * 2).min(GROUP_FOLDED_BYTES)
}

/// A table's folded changes of a group are split over two connections
/// from this many keys on (below, the second transaction costs more than
/// it saves).
const SPLIT_MIN_ROWS: usize = 2000;

/// Whether the `rows` keys folded for table `oid` in `group` are merged
/// half on each connection: there is a second connection, the table allows
/// it (see [`super::stage::StageSql::splittable`]), there are enough keys, and the group
/// neither ran a TRUNCATE nor wrote the table on the main connection before
/// its commit (mid-group merges, row-by-row statements): the second
/// connection would wait for those locks.
pub fn splits(second: bool, splittable: bool, rows: usize, group: Option<&Group>, oid: u32) -> bool {
    second && splittable && rows >= SPLIT_MIN_ROWS && group.is_some_and(|g| !g.exclusive && !g.touched.contains(&oid))
}

/// Open destination transaction grouping source transactions.
pub struct Group {
    /// BEGIN was sent (it is sent with the group's first statement).
    pub begun: bool,
    pub source_transactions: usize,
    pub bytes: usize,
    pub started: Instant,
    /// End LSN of its first and last source transactions.
    pub first_end: Lsn,
    pub last_end: Lsn,
    pub last_commit_time: i64,
    /// Tables this group wrote on the main connection before its commit
    /// (mid-group merges, row-by-row statements): their merges stay there,
    /// as the second connection would wait for those row locks.
    pub touched: HashSet<u32>,
    /// A TRUNCATE or a DDL statement ran in this group, and its locks are
    /// held on the main connection until the commit: nothing is split.
    pub exclusive: bool,
    /// A DDL statement ran in this group: it ends at that source
    /// transaction's COMMIT, so that what follows sees the schema committed
    /// (a value added to an enum cannot be used in the transaction that
    /// added it).
    pub ddl: bool,
}

impl Group {
    /// A group opened at `started` on a destination that holds the source
    /// up to `committed`.
    pub fn new(committed: Lsn, started: Instant) -> Group {
        Group {
            begun: false,
            source_transactions: 0,
            bytes: 0,
            started,
            first_end: Lsn(0),
            last_end: committed,
            last_commit_time: 0,
            touched: Default::default(),
            exclusive: false,
            ddl: false,
        }
    }

    /// One of its source transactions ended (its COMMIT record).
    pub fn source_commit(&mut self, end_lsn: Lsn, commit_time: i64) {
        if self.source_transactions == 0 {
            self.first_end = end_lsn;
        }
        self.source_transactions += 1;
        self.last_end = end_lsn;
        self.last_commit_time = commit_time;
    }

    /// Whether the group ends at the source COMMIT just applied: it holds
    /// a source transaction, and one of its bounds is reached (transactions,
    /// batch bytes, time since it opened at `now`, or the memory of the
    /// folded changes, `folded_bytes`, against this group's `folded_limit`).
    pub fn is_full(&self, settings: &ApplySettings, folded_bytes: usize, folded_limit: usize, now: Instant) -> bool {
        self.source_transactions > 0
            && (self.ddl
                || self.source_transactions >= settings.group_max_transactions
                || self.bytes >= settings.group_max_bytes
                || folded_bytes >= folded_limit
                || now.saturating_duration_since(self.started) >= settings.group_max_delay)
    }

    /// The source position its commit records: the end of its last source
    /// transaction (none when it has none).
    pub fn position(&self) -> Option<Lsn> {
        (self.source_transactions > 0).then_some(self.last_end)
    }
}

/// Whether the open group is committed when no more input is waiting: it is
/// at a source commit boundary, holds a source transaction, and the
/// previous group is no longer committing (see [`Applier::flush`]).
pub fn commits_on_flush(previous_committing: bool, in_source_txn: bool, group: Option<&Group>) -> bool {
    !previous_committing && !in_source_txn && group.is_some_and(|g| g.source_transactions > 0)
}

/// What of the source stream the destination holds, and what of that may
/// be confirmed to the source.
pub struct Position {
    /// End LSN of the last source transaction committed on the destination.
    committed: Lsn,
    durability: Durability,
    /// Tables copied again after a restart of the full copy, with the LSN
    /// of their new snapshot: their changes committed before it are
    /// already in the copy.
    skip_before: HashMap<String, Lsn>,
}

impl Position {
    /// The position read from the destination at start; all of it durable.
    pub fn new(committed: Lsn, skip_before: HashMap<String, Lsn>) -> Position {
        Position { committed, durability: Durability::new(committed), skip_before }
    }

    /// Where a new stream resumes.
    pub fn committed(&self) -> Lsn {
        self.committed
    }

    /// The source transaction whose commit record is at `final_lsn` was
    /// applied before (the stream was resumed from an earlier point than
    /// the destination's position): its commit record lies before the end
    /// of the last one committed.
    pub fn applied(&self, final_lsn: Lsn) -> bool {
        final_lsn < self.committed
    }

    /// A change of `table` (qualified) in the source transaction committing
    /// at `final_lsn` is already in the table's re-copied snapshot.
    pub fn in_copy(&self, table: &str, final_lsn: Lsn) -> bool {
        self.skip_before.get(table).is_some_and(|&lsn| final_lsn < lsn)
    }

    /// A group's commit, at destination WAL position `wal` (an upper bound),
    /// recorded `last_end`: it is where a new stream resumes, and may be
    /// confirmed once `wal` is flushed.
    pub fn group_committed(&mut self, last_end: Lsn, wal: Lsn) {
        self.committed = last_end;
        self.durability.committed(wal, last_end);
    }

    /// Learns the destination's flush position (one query, when a commit
    /// awaits it) and returns the durable position.
    pub async fn refresh(&mut self, client: &Client) -> Result<Lsn, ProgressError> {
        self.durability.refresh(client).await
    }

    /// The highest source position whose destination commit is on disk:
    /// what may be confirmed to the source.
    pub fn durable(&self) -> Lsn {
        self.durability.durable()
    }

    /// Some committed position is not yet known to be on disk.
    pub fn has_pending(&self) -> bool {
        self.durability.has_pending()
    }

    #[cfg(test)]
    fn flushed_to(&mut self, flushed: Lsn) -> Lsn {
        self.durability.flushed_to(flushed)
    }
}

/// The destination work of a group once its last source transaction is
/// folded: run by its own task, so the applier folds the next group meanwhile.
pub struct GroupCommit {
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
        let metrics = &self.metrics;
        let main = merge::run_main(&self.client, self.merges, metrics);
        // The second connection commits its halves before this group's
        // commit: they are idempotent (net rows by key), so if this commit
        // then fails, applying the group again rewrites them with the same
        // values, while the progress record stays exact.
        let second = async {
            let Some((helper, merges)) = self.second else { return Ok(()) };
            merge::run_second(&helper, merges, metrics).await
        };
        let (copied, ()) = tokio::try_join!(main, second)?;
        let wal = self.progress.commit(&self.client, group.position()).await?;
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

impl Applier {
    /// Source position the agent must resume from.
    pub fn resume_lsn(&self) -> Lsn {
        self.position.committed()
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
                self.position.refresh(&self.client).await?;
            }
        }
        Ok(self.position.durable())
    }

    /// Signalled when a group's commit task ends.
    pub fn commit_ended(&self) -> Arc<tokio::sync::Notify> {
        self.commit_ended.clone()
    }

    pub fn has_undurable_commits(&self) -> bool {
        self.position.has_pending() || self.committing.is_some()
    }

    pub(super) fn group_is_full(&self) -> bool {
        !self.in_source_txn
            && self.group.as_ref().is_some_and(|g| g.is_full(&self.settings, self.folding.bytes(), self.group_folded_limit, Instant::now()))
    }

    /// Commits the open group if it is at a source commit boundary: called
    /// when no more input is waiting, so latency stays low on a quiet stream.
    /// While the previous group still commits, the open one keeps growing
    /// instead: its merge could not start before that commit ends anyway,
    /// and a larger group folds more (groups cut short this way were a
    /// fifth of a backlog's). The caller tries again when that commit ends
    /// ([`Applier::commit_ended`]).
    pub async fn flush(&mut self) -> Result<(), ApplyError> {
        let previous_committing = self.committing.as_ref().is_some_and(|job| !job.is_finished());
        if commits_on_flush(previous_committing, self.in_source_txn, self.group.as_ref()) {
            self.commit_group().await?;
        }
        Ok(())
    }

    pub(super) fn ensure_group(&mut self) {
        if self.group.is_none() {
            self.group = Some(Group::new(self.position.committed(), Instant::now()));
        }
    }

    /// Takes the client back from the previous group's commit and opens
    /// the current group's destination transaction: call before any
    /// statement.
    pub(super) async fn open_transaction(&mut self) -> Result<(), ApplyError> {
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
    pub(super) async fn settle(&mut self) -> Result<(), ApplyError> {
        let Some(job) = self.committing.take() else { return Ok(()) };
        let (group, wal) = job.await.map_err(|e| ApplyError::CommitTask(e.to_string()))??;
        self.position.group_committed(group.last_end, wal);
        // The client is free until the next commit starts: learn what is on
        // disk now, so acks advance even when a commit is always running.
        self.position.refresh(&self.client).await?;
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
    pub(super) async fn commit_group(&mut self) -> Result<(), ApplyError> {
        if self.group.is_none() {
            return Ok(());
        }
        // A table's first merge in this session (or first after its shape
        // changed) creates its staging table, in the group's own transaction.
        let mut stages = HashMap::new();
        for oid in self.folding.staged_tables() {
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
        let (appends, bulk) = self.folding.take_all();
        for (oid, rows) in appends {
            merges.push(Merge::Append { target: self.target(oid)?, rows });
        }
        self.group_folded_limit = next_folded_limit(self.group_folded_limit);
        for (oid, buffer) in bulk {
            if let Some(stage) = stages.remove(&oid) {
                let target = self.target(oid)?;
                let split = splits(self.helper.is_some(), stage.splittable, buffer.len(), self.group.as_ref(), oid);
                self.folding.merged(oid, buffer.len());
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

    /// Rolls back an open group (after an error, before reconnecting). A
    /// group already committing is let finish: it holds its own progress.
    pub async fn abort(&mut self) {
        if let Some(job) = self.committing.take() {
            let _ = job.await;
        }
        self.folding.clear();
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

#[cfg(test)]
mod tests;
