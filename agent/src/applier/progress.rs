//! Where the applier keeps its position in the destination, written in the
//! same transaction as the data it covers, and how it learns which of its
//! commits are durable.
//!
//! The position is recorded with a replication origin where the destination
//! allows it (the commit record then carries it, and the applied changes are
//! marked with the origin so they can be told apart from local writes), and
//! in the table `decant.progress` otherwise.

use std::collections::VecDeque;

use decant_proto::Lsn;
use tokio_postgres::Client;

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
pub enum ProgressStore {
    Origin { name: String },
    Table { task_id: String },
}

const CREATE_TABLE: &str = "CREATE SCHEMA IF NOT EXISTS decant;
CREATE TABLE IF NOT EXISTS decant.progress (
    task_id text PRIMARY KEY,
    source_lsn pg_lsn NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE decant.progress IS 'decant: last source commit applied per task, written with the data'";

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
        client.batch_execute(CREATE_TABLE).await.map_err(err("creating decant.progress"))?;
        let from_table: Option<String> = client
            .query_opt("SELECT source_lsn::text FROM decant.progress WHERE task_id = $1", &[&task_id])
            .await
            .map_err(err("reading decant.progress"))?
            .map(|r| r.get(0));
        let table_lsn = from_table.and_then(|s| s.parse::<Lsn>().ok()).unwrap_or_default();
        let name = format!("decant_{task_id}");
        // A session of this task that just ended (a restarted process, a
        // dropped connection) may hold the origin for a moment longer.
        let mut result = Self::open_origin(client, &name).await;
        for _ in 0..50 {
            match &result {
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    result = Self::open_origin(client, &name).await;
                }
                _ => break,
            }
        }
        match result {
            Ok(origin_lsn) => Ok((ProgressStore::Origin { name }, origin_lsn.max(table_lsn))),
            // Another session holds the origin: a second applier for this
            // task, or a stale one; never apply beside it.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                Err(ProgressError { what: "another applier session holds this task's replication origin", source: e })
            }
            // Origins refused (not a superuser or replication role) or not
            // offered (a PostgreSQL-compatible server without them).
            Err(e) if e.code().is_some_and(|c| ORIGINS_UNAVAILABLE.contains(c)) => {
                tracing::info!(reason = %e, "replication origins are not available on the destination; keeping progress in decant.progress");
                Ok((ProgressStore::Table { task_id: task_id.to_owned() }, table_lsn))
            }
            // Anything else (a timeout, a lost connection) says nothing
            // about origins: falling back to the table would resume from
            // its older position and apply transactions twice.
            Err(e) => Err(ProgressError { what: "setting up the replication origin", source: e }),
        }
    }

    async fn open_origin(client: &Client, name: &str) -> Result<Lsn, tokio_postgres::Error> {
        client
            .execute(
                "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS (SELECT FROM pg_replication_origin WHERE roname = $1)",
                &[&name],
            )
            .await?;
        client.execute("SELECT pg_replication_origin_session_setup($1)", &[&name]).await?;
        let lsn: Option<String> = client.query_one("SELECT pg_replication_origin_session_progress(true)::text", &[]).await?.get(0);
        Ok(lsn.and_then(|s| s.parse().ok()).unwrap_or_default())
    }

    /// Records `lsn` inside the open destination transaction.
    pub async fn record(&self, client: &Client, lsn: Lsn, commit_time: i64) -> Result<(), ProgressError> {
        let lsn_text = lsn.to_string();
        match self {
            ProgressStore::Origin { .. } => {
                let time = decant_proto::pgtext::timestamptz_text(commit_time);
                client
                    .execute("SELECT pg_replication_origin_xact_setup($1::text::pg_lsn, $2::text::timestamptz)", &[&lsn_text, &time])
                    .await
                    .map_err(err("recording the origin position"))?;
            }
            ProgressStore::Table { task_id } => {
                client
                    .execute(
                        "INSERT INTO decant.progress (task_id, source_lsn, updated_at) VALUES ($1, $2::text::pg_lsn, now())
                         ON CONFLICT (task_id) DO UPDATE SET source_lsn = EXCLUDED.source_lsn, updated_at = EXCLUDED.updated_at",
                        &[task_id, &lsn_text],
                    )
                    .await
                    .map_err(err("writing decant.progress"))?;
            }
        }
        Ok(())
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

    /// An upper bound of the WAL position of the commit that just returned
    /// on `client`.
    pub async fn commit_position(client: &Client) -> Result<Lsn, ProgressError> {
        let wal: String =
            client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.map_err(err("reading the WAL position"))?.get(0);
        Ok(wal.parse().unwrap_or(Lsn(u64::MAX)))
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
        while let Some(&(wal, source)) = self.pending.front() {
            if wal > flushed {
                break;
            }
            self.durable = source;
            self.pending.pop_front();
        }
        Ok(self.durable)
    }

    pub fn durable(&self) -> Lsn {
        self.durable
    }
}
