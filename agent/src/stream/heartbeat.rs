//! The agent's own SQL session on the source, beside the replication
//! stream: heartbeats and standby snapshots.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::connect::ConnInfo;

/// The agent's SQL session on the source, for two periodic writes.
///
/// A heartbeat message every `heartbeat_seconds` (0: none), so a slot on an
/// otherwise idle database still sees WAL go by, and at once when `nudge`
/// is notified. It is written in a transaction with an xid so that its
/// commit flushes the WAL: a non-transactional record alone would wait for
/// other activity to be flushed, and the walsender sends only flushed WAL.
///
/// Every second, where the decant extension is installed on the source and
/// the agent's role may call it, `decant.log_standby_snapshot()`: the slot's
/// restart point then follows the stream within a second or two, where
/// PostgreSQL's own snapshots every 15 s left up to twenty seconds of WAL
/// to decode again on every restart of the stream (after the change-capture
/// benchmark's 60 s live phase, a sixth of a second of the walsender's time
/// before the first change reached the applier) and to keep on the source.
pub(super) fn spawn_source_session(source: ConnInfo, heartbeat_seconds: u64, nudge: Arc<Notify>) -> tokio::task::JoinHandle<()> {
    const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
    tokio::spawn(async move {
        // The first one after a full interval, like every other.
        let period = Duration::from_secs(heartbeat_seconds.max(1));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut snapshot = tokio::time::interval(SNAPSHOT_EVERY);
        snapshot.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut session: Option<(tokio_postgres::Client, bool)> = None;
        loop {
            if session.is_none() {
                session = open_source_session(&source).await;
            }
            let write = tokio::select! {
                _ = heartbeat.tick(), if heartbeat_seconds > 0 => HEARTBEAT,
                _ = nudge.notified(), if heartbeat_seconds > 0 => HEARTBEAT,
                _ = snapshot.tick() => match &session {
                    Some((_, true)) => SNAPSHOT,
                    _ => continue,
                },
            };
            let Some((client, snapshots)) = &mut session else { continue };
            if let Err(e) = client.batch_execute(write).await {
                if write == SNAPSHOT && !client.is_closed() {
                    // Not a lost connection (a standby, a revoked grant):
                    // calling again would fail again.
                    tracing::warn!(error = %e, "decant.log_standby_snapshot() failed; the agent stops calling it until it reconnects");
                    *snapshots = false;
                } else {
                    tracing::debug!(error = %e, statement = write, "source session write failed");
                    session = None;
                }
            }
        }
    })
}

const HEARTBEAT: &str = "SELECT pg_logical_emit_message(false, 'decant.heartbeat', now()::text), txid_current()";
const SNAPSHOT: &str = "SELECT decant.log_standby_snapshot()";

/// Connects the source session; `true` with it when the role may call
/// `decant.log_standby_snapshot()`.
async fn open_source_session(source: &ConnInfo) -> Option<(tokio_postgres::Client, bool)> {
    let (client, _) = crate::connect::sql::connect(source, "decant agent session", "-c default_transaction_read_only=off").await.ok()?;
    let snapshots = client
        .query_opt(
            "SELECT has_schema_privilege('decant', 'USAGE') AND has_function_privilege(f, 'EXECUTE') \
             FROM to_regprocedure('decant.log_standby_snapshot()') AS f WHERE f IS NOT NULL",
            &[],
        )
        .await
        .ok()?
        .is_some_and(|row| row.get::<_, bool>(0));
    if !snapshots {
        tracing::info!("decant.log_standby_snapshot() is not installed on the source or not granted to this role: the slot's restart point moves only with PostgreSQL's own snapshots, every 15 s");
    }
    Some((client, snapshots))
}
