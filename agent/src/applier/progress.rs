//! Where the applier keeps its position in the destination, written in the
//! same transaction as the data it covers, and how it learns which of its
//! commits are durable.
//!
//! The position is a row of the table `decant.progress`, written by the
//! statement that commits the group. Where the destination allows it, the
//! session also uses a replication origin: the applied changes are then
//! marked with it, so they can be told apart from local writes (a reverse
//! replication can skip them), and it keeps a second applier of the task
//! out. The origin does not hold the position: the position set with
//! `pg_replication_origin_xact_setup` stays in the session after the
//! transaction, and the next commit of that session advances the origin to
//! it, even when the transaction it was set for aborted. An applier killed
//! between that call and COMMIT showed it on PostgreSQL 15: at backend exit
//! the server drops the session's temporary tables (our staging tables) in a
//! transaction of its own, whose commit moved the origin past a group that
//! had been rolled back.

use std::collections::VecDeque;

use decant_proto::Lsn;
use tokio_postgres::{Client, SimpleQueryMessage};

#[derive(Debug, thiserror::Error)]
#[error("destination progress ({what}): {source}")]
pub struct ProgressError {
    what: &'static str,
    #[source]
    source: tokio_postgres::Error,
}

fn err(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ProgressError {
    move |source| ProgressError { what, source }
}

#[derive(Clone)]
pub struct ProgressStore {
    task_id: String,
    /// The session's changes carry the replication origin `decant_<task>`.
    pub origin: bool,
}

pub(super) const CREATE_TABLE: &str = "CREATE SCHEMA IF NOT EXISTS decant;
CREATE TABLE IF NOT EXISTS decant.progress (
    task_id text PRIMARY KEY,
    source_lsn pg_lsn NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE decant.progress IS 'decant: last source commit applied per task, written with the data';
-- The DDL captured on the source that reached this destination, by source
-- position (the message's LSN), written with the data: applied, skipped,
-- or 'to skip' (marked by decant skip-ddl before the stream reaches it).
CREATE TABLE IF NOT EXISTS decant.ddl (
    task_id text NOT NULL,
    source_lsn pg_lsn NOT NULL,
    outcome text NOT NULL,
    tag text NOT NULL DEFAULT '',
    statement text NOT NULL DEFAULT '',
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, source_lsn)
)";

/// Runs `ddl`, which creates decant's objects if missing, holding a lock
/// that every task sharing the destination takes for it: two sessions
/// running `CREATE … IF NOT EXISTS` at the same moment can both find the
/// object missing, and the second then fails on a duplicate key.
pub async fn create_decant_objects(client: &Client, ddl: &str) -> Result<(), tokio_postgres::Error> {
    let result = client.batch_execute(&format!("BEGIN; SELECT pg_advisory_xact_lock({DDL_LOCK}); {ddl}; COMMIT")).await;
    if result.is_err() {
        // Leaves no failed transaction open on a session that goes on.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

/// The advisory lock key of [`create_decant_objects`] ('decant' in ASCII).
const DDL_LOCK: i64 = 0x6465_6361_6e74;

/// Errors that mean the destination does not let this session use
/// replication origins.
const ORIGINS_UNAVAILABLE: &[tokio_postgres::error::SqlState] = &[
    tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE,
    tokio_postgres::error::SqlState::UNDEFINED_FUNCTION,
    tokio_postgres::error::SqlState::UNDEFINED_TABLE,
    tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED,
    // max_replication_slots = 0
    tokio_postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
];

impl ProgressStore {
    /// Sets up the store on `client` (once per connection) and returns it
    /// with the last source LSN the destination has committed.
    pub async fn open(client: &Client, task_id: &str) -> Result<(ProgressStore, Lsn), ProgressError> {
        create_decant_objects(client, CREATE_TABLE).await.map_err(err("creating decant.progress"))?;
        let origin = Self::use_origin(client, &format!("decant_{task_id}")).await?;
        let position: Option<String> = client
            .query_opt("SELECT source_lsn::text FROM decant.progress WHERE task_id = $1", &[&task_id])
            .await
            .map_err(err("reading decant.progress"))?
            .map(|r| r.get(0));
        let position = position.and_then(|s| s.parse::<Lsn>().ok()).unwrap_or_default();
        Ok((ProgressStore { task_id: task_id.to_owned(), origin }, position))
    }

    /// Marks the changes of the task's second destination session
    /// (`applier.split_merges`) with a replication origin of its own: an
    /// origin is held by one session at a time, and a reverse stream that
    /// skips changes with any origin (`origin = none`) then skips these too.
    /// Call only when the main session's origin is in use (`self.origin`).
    pub async fn mark_second_session(&self, client: &Client) -> Result<(), ProgressError> {
        // Not `decant_<task>_second`: that is the main origin of a task named
        // `<task>_second` (task ids are letters, digits and underscores).
        let name = format!("decant_{}.second", self.task_id);
        Self::setup_origin_waiting(client, &name).await.map_err(err("setting up the second session's replication origin"))
    }

    /// Marks this session's changes with the replication origin `name`;
    /// false when the destination does not offer or allow origins.
    async fn use_origin(client: &Client, name: &str) -> Result<bool, ProgressError> {
        match Self::setup_origin_waiting(client, name).await {
            Ok(()) => Ok(true),
            // Another session holds the origin: a second applier for this
            // task, or a stale one; never apply beside it.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                Err(ProgressError { what: "another applier session holds this task's replication origin", source: e })
            }
            // Origins refused (not a superuser or replication role) or not
            // offered (a PostgreSQL-compatible server without them).
            Err(e) if e.code().is_some_and(|c| ORIGINS_UNAVAILABLE.contains(c)) => {
                tracing::info!(reason = %e, "replication origins are not available on the destination; applied changes are not marked with one");
                Ok(false)
            }
            // Anything else (a timeout, a lost connection) is an error.
            Err(e) => Err(ProgressError { what: "setting up the replication origin", source: e }),
        }
    }

    /// A session of this task that just ended (a restarted process, a
    /// dropped connection) may hold the origin for a moment longer.
    async fn setup_origin_waiting(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
        let mut result = Self::setup_origin(client, name).await;
        for _ in 0..50 {
            match &result {
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    result = Self::setup_origin(client, name).await;
                }
                _ => break,
            }
        }
        result
    }

    async fn setup_origin(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
        client
            .execute(
                "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS (SELECT FROM pg_replication_origin WHERE roname = $1)",
                &[&name],
            )
            .await?;
        client.execute("SELECT pg_replication_origin_session_setup($1)", &[&name]).await?;
        Ok(())
    }

    /// Records `lsn` and commits the open destination transaction, in one
    /// round trip; returns an upper bound of the commit's WAL position.
    /// `lsn` None: commits without recording.
    pub async fn commit(&self, client: &Client, lsn: Option<Lsn>) -> Result<Lsn, ProgressError> {
        // One simple query: the statements run in order, and one that
        // fails ends the transaction before COMMIT runs (the task id is
        // letters, digits and underscores; the position is ours).
        let record = match lsn {
            Some(lsn) => format!(
                "INSERT INTO decant.progress (task_id, source_lsn, updated_at) VALUES ('{}', '{lsn}', now()) \
                 ON CONFLICT (task_id) DO UPDATE SET source_lsn = EXCLUDED.source_lsn, updated_at = EXCLUDED.updated_at;",
                self.task_id
            ),
            None => String::new(),
        };
        let sql = format!("{record}COMMIT; SELECT pg_current_wal_insert_lsn()::text");
        let messages = client.simple_query(&sql).await.map_err(err("recording the position and committing"))?;
        let wal = messages.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|s| s.parse().ok()),
            _ => None,
        });
        Ok(wal.unwrap_or(Lsn(u64::MAX)))
    }
}

/// Destination commits are asynchronous (synchronous_commit = off); a
/// source position may be confirmed to the source only once the commit
/// that recorded it is on disk. This remembers, per commit, an upper bound
/// of its WAL position and releases the source position once the
/// destination's flush position passes it.
#[derive(Default)]
pub struct Durability {
    pending: VecDeque<(Lsn, Lsn)>, // (destination WAL position, source LSN)
    durable: Lsn,
}

impl Durability {
    pub fn new(durable: Lsn) -> Self {
        Durability { pending: VecDeque::new(), durable }
    }

    /// The commit at destination WAL position `wal` recorded `source`.
    pub fn committed(&mut self, wal: Lsn, source: Lsn) {
        self.pending.push_back((wal, source));
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The highest source LSN whose destination commit is flushed.
    pub async fn refresh(&mut self, client: &Client) -> Result<Lsn, ProgressError> {
        if self.pending.is_empty() {
            return Ok(self.durable);
        }
        let flushed: String =
            client.query_one("SELECT pg_current_wal_flush_lsn()::text", &[]).await.map_err(err("reading the flush position"))?.get(0);
        let flushed: Lsn = flushed.parse().unwrap_or_default();
        Ok(self.flushed_to(flushed))
    }

    /// The destination's WAL is flushed up to `flushed`: releases, in commit
    /// order, the source LSNs of the commits at or below it; returns the
    /// highest source LSN released so far.
    pub fn flushed_to(&mut self, flushed: Lsn) -> Lsn {
        while let Some(&(wal, source)) = self.pending.front() {
            if wal > flushed {
                break;
            }
            self.durable = source;
            self.pending.pop_front();
        }
        self.durable
    }

    pub fn durable(&self) -> Lsn {
        self.durable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_position_is_durable_once_its_commit_is_flushed() {
        let mut d = Durability::new(Lsn(100));
        assert!(!d.has_pending());
        d.committed(Lsn(5000), Lsn(200));
        d.committed(Lsn(6000), Lsn(300));
        // Committed, not yet flushed: the position as of the start.
        assert_eq!(d.durable(), Lsn(100));
        assert_eq!(d.flushed_to(Lsn(4999)), Lsn(100));
        // The first commit's WAL is flushed, the second's not.
        assert_eq!(d.flushed_to(Lsn(5000)), Lsn(200));
        assert!(d.has_pending());
        // A flush position reported lower later (it never is) releases nothing back.
        assert_eq!(d.flushed_to(Lsn(0)), Lsn(200));
        assert_eq!(d.flushed_to(Lsn(u64::MAX - 1)), Lsn(300));
        assert!(!d.has_pending());
        assert_eq!(d.durable(), Lsn(300));
    }

    #[test]
    fn commits_are_released_in_order() {
        let mut d = Durability::new(Lsn(0));
        // A commit whose WAL position is unknown (u64::MAX) holds back the
        // ones after it, even when their positions are flushed.
        d.committed(Lsn(10), Lsn(1));
        d.committed(Lsn(u64::MAX), Lsn(2));
        d.committed(Lsn(30), Lsn(3));
        assert_eq!(d.flushed_to(Lsn(1000)), Lsn(1));
        assert!(d.has_pending());
    }
}
