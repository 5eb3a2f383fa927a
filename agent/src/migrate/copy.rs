//! The full copy, source side: workers that each hold a session inside the
//! task's snapshot take ranges largest first and stream `COPY … TO STDOUT`
//! to the applier's `Copy` call, which feeds `COPY … FROM STDIN`.

use std::collections::VecDeque;
use std::sync::Arc;

use decant_proto::grpc::{RangeState, TaskState};
use tokio::sync::{mpsc, watch, Mutex};

use super::display::CopyProgress;
use super::keys;
use super::{MigrateError, Snapshot};
use crate::config::{Config, Mapping};
use crate::connect::sql::{column_list, connect, quote_ident, quote_literal};
use crate::connect::wire::copy::Scan;
use crate::connect::wire::{WireError, WireSession};
use crate::connect::ConnInfo;
use crate::metrics::Metrics;
use crate::retry::ErrorClass;
use crate::throttle::SharedPace;
use crate::transport::client::{CopyLink, StreamError};
use crate::transport::server::CopyPiece;

/// COPY data is sent in chunks of about this size.
const CHUNK_BYTES: usize = 1 << 20;

/// The source is read in steps of at most this size, each counted by the
/// copy's throttle, so that the rate holds over short spans too.
const PACE_BYTES: usize = 64 << 10;

/// One range to copy.
#[derive(Clone, Debug)]
pub struct Work {
    pub table_id: u32,
    pub range_id: u32,
    pub display: String,
    pub sql: String,
    pub binary: bool,
    pub estimated_bytes: u64,
    /// The table and its copied columns, to say which value stopped a copy.
    pub schema: String,
    pub name: String,
    pub columns: Vec<String>,
}

/// The ranges not done yet, largest first, with the COPY that reads each.
/// A range's SQL is built from its page numbers, or its key's column names
/// and values (quoted as names and string constants), and the task's own
/// `migrate.map` alone: the plan comes back from the destination, whose
/// text must never run on the source as SQL.
pub fn pending_work(state: &TaskState, mapping: &Mapping) -> Result<Vec<Work>, MigrateError> {
    let mut work = Vec::new();
    for t in &state.tables {
        let by_key = !t.key_columns.is_empty();
        let covered = if by_key {
            t.ranges.iter().all(|r| r.first_page.is_none() && r.end_page.is_none())
                && keys::key_ranges_cover(
                    t.key_columns.len(),
                    &t.ranges.iter().map(|r| (r.range_id, r.key_from.as_slice(), r.key_to.as_slice())).collect::<Vec<_>>(),
                )
        } else {
            t.ranges.iter().all(|r| r.key_from.is_empty() && r.key_to.is_empty()) && ranges_cover_table(&t.ranges)
        };
        if !covered {
            return Err(MigrateError::Invalid(format!(
                "the task's plan in the destination (decant.copy_range) splits table {}.{} into {} ranges that do not \
                 cover it once ({}): the plan was changed, or stored by an applier older than this agent (upgrade it); \
                 else start the task over (DROP SCHEMA decant CASCADE in the destination, and the tables it migrated)",
                t.schema,
                t.name,
                if by_key { "key" } else { "page" },
                t.ranges
                    .iter()
                    .map(|r| if by_key {
                        format!("{:?}..{:?}", r.key_from, r.key_to)
                    } else {
                        format!("{:?}..{:?}", r.first_page, r.end_page)
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let table = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
        let list = column_list(&t.columns);
        let projection = mapping.projection(&t.schema, &t.name, &t.columns);
        // A transform's value need not have its column's binary form.
        let binary = t.binary && !projection.transformed;
        let format = if binary { "binary" } else { "text" };
        let ranges = t.ranges.len().max(1) as u64;
        for r in t.ranges.iter().filter(|r| !r.done) {
            let range =
                if by_key { keys::key_condition(&t.key_columns, &r.key_from, &r.key_to) } else { page_condition(r.first_page, r.end_page) };
            let sql = if range.is_none() && projection.is_plain() {
                format!("COPY {table}{list} TO STDOUT (FORMAT {format})")
            } else {
                let select = projection.select(&format!("ONLY {table}"), range.as_deref());
                format!("COPY ({select}) TO STDOUT (FORMAT {format})")
            };
            let display = if t.ranges.len() > 1 {
                format!("{}.{} [{}/{}]", t.schema, t.name, r.range_id + 1, t.ranges.len())
            } else {
                format!("{}.{}", t.schema, t.name)
            };
            work.push(Work {
                table_id: t.table_id,
                range_id: r.range_id,
                display,
                sql,
                binary,
                estimated_bytes: t.bytes / ranges,
                schema: t.schema.clone(),
                name: t.name.clone(),
                columns: t.columns.clone(),
            });
        }
    }
    work.sort_by(|a, b| b.estimated_bytes.cmp(&a.estimated_bytes).then(a.table_id.cmp(&b.table_id)).then(a.range_id.cmp(&b.range_id)));
    Ok(work)
}

/// Whether a table's ranges, in range_id order, cover its pages once, as
/// planned (`tables::ctid_ranges`): the first open at the start, each
/// beginning where the one before ends, the last open at the end, every
/// bound a page number PostgreSQL has.
fn ranges_cover_table(ranges: &[RangeState]) -> bool {
    let mut sorted: Vec<&RangeState> = ranges.iter().collect();
    sorted.sort_by_key(|r| r.range_id);
    let mut first = None;
    for (i, r) in sorted.iter().enumerate() {
        let last = i + 1 == sorted.len();
        let end_ok = match r.end_page {
            None => last,
            Some(end) => !last && end <= u64::from(u32::MAX) && first.is_none_or(|f| f < end),
        };
        if r.first_page != first || !end_ok {
            return false;
        }
        first = r.end_page;
    }
    true
}

/// The WHERE condition that selects the heap pages [first, end), from
/// the numbers alone; `None` for the whole table.
fn page_condition(first: Option<u64>, end: Option<u64>) -> Option<String> {
    let bounds: Vec<String> =
        first.map(|f| format!("ctid >= '({f},0)'")).into_iter().chain(end.map(|e| format!("ctid < '({e},0)'"))).collect();
    (!bounds.is_empty()).then(|| bounds.join(" AND "))
}

/// A copy worker's source session, inside `snapshot`. It reads COPY data
/// as the source frames it, to hand on untouched (`connect::wire::copy`).
async fn copy_session(source: &ConnInfo, snapshot: &str, name: &str, pace: &SharedPace) -> Result<WireSession, MigrateError> {
    let mut session = WireSession::connect(source, name, false, "").await?;
    pace.query().await;
    session
        .simple_query(&format!("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}", quote_literal(snapshot)))
        .await?;
    Ok(session)
}

/// Copies every pending range. Returns false when stopped by `shutdown`.
/// Every worker paces its reads and queries at the shared `pace`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: &Config,
    source: &ConnInfo,
    link: &CopyLink,
    state: &TaskState,
    snapshot: Snapshot,
    metrics: &Arc<Metrics>,
    pace: &SharedPace,
    mut shutdown: watch::Receiver<bool>,
) -> Result<bool, MigrateError> {
    let work = pending_work(state, &config.mapping().map_err(|e| MigrateError::Invalid(e.to_string()))?)?;
    let progress = Arc::new(CopyProgress::new(state, config.migrate.progress));
    if work.is_empty() {
        progress.finish();
        return Ok(true);
    }
    // Every worker imports the snapshot before the session that exported
    // it is let go.
    let workers = config.migrate.workers.min(work.len());
    let mut sessions = Vec::with_capacity(workers);
    for i in 0..workers {
        sessions.push(copy_session(source, &snapshot.id, &format!("decant copy {}", i + 1), pace).await?);
    }
    drop(snapshot);
    tracing::info!(ranges = work.len(), workers, "copying");
    let queue = Arc::new(Mutex::new(VecDeque::from(work)));
    let mut handles = Vec::new();
    for mut session in sessions {
        let (queue, pace, progress, link, metrics) = (queue.clone(), pace.clone(), progress.clone(), link.clone(), metrics.clone());
        let (task_id, source) = (config.task_id.clone(), source.clone());
        handles.push(tokio::spawn(async move {
            loop {
                let Some(work) = queue.lock().await.pop_front() else { return Ok::<(), MigrateError>(()) };
                copy_range(&mut session, &source, link.clone(), &task_id, &work, &pace, &progress, &metrics).await?;
            }
        }));
    }
    let all = futures_util::future::try_join_all(handles.iter_mut().map(|h| async move {
        match h.await {
            Ok(r) => r,
            Err(e) => Err(MigrateError::Invalid(format!("copy worker failed: {e}"))),
        }
    }));
    let result = tokio::select! {
        r = all => r.map(|_| true),
        _ = shutdown.changed() => Ok(false),
    };
    for h in &handles {
        h.abort();
    }
    match &result {
        Ok(true) => progress.finish(),
        _ => progress.abandon(),
    }
    result
}

#[allow(clippy::too_many_arguments)] // a worker's context, handed through from `run`
async fn copy_range(
    session: &mut WireSession,
    source: &ConnInfo,
    link: CopyLink,
    task_id: &str,
    work: &Work,
    pace: &SharedPace,
    progress: &CopyProgress,
    metrics: &Metrics,
) -> Result<(), MigrateError> {
    let bar = progress.start(&work.display, work.estimated_bytes);
    let source_err = |e: WireError| MigrateError::Copy {
        table: work.display.clone(),
        // (A value with no equivalent in UTF-8 is reported by `unconvertible`.)
        class: match e.code() {
            _ if e.is_connection_loss() => ErrorClass::Connection,
            Some(_) => ErrorClass::Other,
            None => ErrorClass::Connection,
        },
        message: crate::error::report(&e),
    };
    // The range's COPY is a source query: its turn comes before the
    // applier's side of the copy opens.
    pace.query().await;
    let (tx, rx) = mpsc::channel::<CopyPiece>(4);
    // The call runs beside the reading, in the same task (no wakeup of
    // another thread per chunk). If the reading fails, the pieces end
    // without a `last` one: the applier commits only whole ranges.
    let call = link.copy(task_id.to_owned(), work.table_id, work.range_id, rx);
    let reading = async {
        let tx = tx;
        let mut out = session.copy_out(&work.sql, CHUNK_BYTES).await.map_err(Stop::Source)?;
        // Whole CopyData messages held that the pace has counted already.
        let mut paced = Scan::default();
        // COPY TO STDOUT sends one CopyData message per row (in binary
        // format the header rides with the first and the trailer is one
        // more message).
        let mut messages = 0u64;
        loop {
            let more = out.read(PACE_BYTES).await.map_err(Stop::Source)?;
            let held = out.held();
            let last = !more;
            let trailer = u64::from(last && work.binary && messages + held.messages > 0);
            let wait = pace.take((held.messages - paced.messages).saturating_sub(trailer), held.payload - paced.payload);
            paced = held;
            if last || held.bytes >= CHUNK_BYTES || (wait.is_needed() && held.bytes > 0) {
                // What was read goes to the applier before a pause;
                // waiting stops the reading: the source's COPY waits on
                // its socket, nothing piles up in memory.
                messages += held.messages;
                let piece = CopyPiece { data: out.take(), last, framing: Some(held) };
                tx.send(piece).await.map_err(|_| Stop::Other(closed(work)))?;
                progress.add(&bar, held.messages.saturating_sub(trailer), held.payload);
                paced = Scan::default();
            }
            wait.done().await;
            if last {
                return Ok(());
            }
        }
    };
    let (result, answer) = futures_util::future::join(reading, call).await;
    let result = match result {
        Ok(()) => Ok(()),
        Err(Stop::Source(e)) if super::encoding::is_unconvertible(e.code()) => {
            // The snapshot transaction failed with it; the search reads
            // the table as it is now, in a session of its own.
            let _ = session.simple_query("ROLLBACK").await;
            Err(unconvertible(source, work, &e).await)
        }
        Err(Stop::Source(e)) => Err(source_err(e)),
        Err(Stop::Other(e)) => Err(e),
    };
    let done = match (result, answer) {
        (Ok(()), Ok(done)) => done,
        // The applier ended the call: its answer says why.
        (Err(e), Err(status)) if e.is_closed_stream() => return Err(MigrateError::Applier(StreamError::Status(status))),
        (Err(e), _) => return Err(e),
        (Ok(()), Err(status)) => return Err(MigrateError::Applier(StreamError::Status(status))),
    };
    metrics.copy_rows.add(done.rows);
    metrics.copy_bytes.add(done.bytes);
    progress.done(bar, &work.display, done.rows, done.bytes);
    Ok(())
}

/// Why a range's reading stopped.
enum Stop {
    Source(WireError),
    Other(MigrateError),
}

/// The error for a value the source cannot render in UTF-8, naming its
/// column and row where they can be found. The worker's snapshot
/// transaction has failed; the search reads the table as it is now.
async fn unconvertible(source: &ConnInfo, work: &Work, e: &WireError) -> MigrateError {
    let place = match connect(source, "decant copy", "").await {
        Ok((client, _conn)) => super::encoding::locate(&client, &work.schema, &work.name, &work.columns).await,
        Err(_) => None,
    };
    let place = place.map(|p| format!(" (in {p})")).unwrap_or_default();
    MigrateError::Copy {
        table: work.display.clone(),
        message: format!(
            "{}{place}: the value has a character with no equivalent in UTF-8; correct it on the source, then start the task again",
            crate::error::report(e)
        ),
        class: ErrorClass::Fatal,
    }
}

impl MigrateError {
    fn is_closed_stream(&self) -> bool {
        matches!(self, MigrateError::Copy { message, .. } if message == CLOSED)
    }
}

const CLOSED: &str = "the applier closed the copy stream";

fn closed(work: &Work) -> MigrateError {
    MigrateError::Copy { table: work.display.clone(), message: CLOSED.into(), class: ErrorClass::Connection }
}

#[cfg(test)]
mod tests {
    use super::*;
    use decant_proto::grpc::{RangeState, TableState};

    #[test]
    fn work_is_the_unfinished_ranges_largest_first() {
        let range = |range_id, first_page, end_page, done| RangeState { range_id, first_page, end_page, done, ..Default::default() };
        let state = TaskState {
            tables: vec![
                TableState {
                    table_id: 0,
                    schema: "s".into(),
                    name: "small".into(),
                    columns: vec!["a".into()],
                    binary: false,
                    bytes: 10,
                    ranges: vec![range(0, None, None, false)],
                    ..Default::default()
                },
                TableState {
                    table_id: 1,
                    schema: "s".into(),
                    name: "Big".into(),
                    columns: vec!["a".into(), "b".into()],
                    binary: true,
                    bytes: 1000,
                    ranges: vec![range(0, None, Some(5), true), range(1, Some(5), None, false)],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let w = pending_work(&state, &Mapping::default()).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].sql, "COPY (SELECT \"a\", \"b\" FROM ONLY \"s\".\"Big\" WHERE ctid >= '(5,0)') TO STDOUT (FORMAT binary)");
        assert_eq!(w[0].display, "s.Big [2/2]");
        assert_eq!(w[1].sql, "COPY \"s\".\"small\" (\"a\") TO STDOUT (FORMAT text)");
    }

    #[test]
    fn key_ranges_read_their_key_values_under_the_row_filter() {
        let range = |range_id: u32, from: &[&str], to: &[&str]| RangeState {
            range_id,
            key_from: from.iter().map(|s| (*s).to_owned()).collect(),
            key_to: to.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        };
        let table = |ranges| TableState {
            schema: "s".into(),
            name: "t".into(),
            columns: vec!["a".into(), "b".into()],
            key_columns: vec!["a".into(), "b".into()],
            bytes: 100,
            ranges,
            ..Default::default()
        };
        let entry: crate::config::MapEntry = toml::from_str("table = \"s.t\"\nwhere = \"b <> 'x'\"").unwrap();
        let mapping = Mapping::parse(&[entry]).unwrap();
        let state =
            TaskState { tables: vec![table(vec![range(0, &[], &["1", "it's"]), range(1, &["1", "it's"], &[])])], ..Default::default() };
        let w = pending_work(&state, &mapping).unwrap();
        let sql: Vec<&str> = w.iter().map(|w| w.sql.as_str()).collect();
        assert_eq!(
            sql,
            [
                "COPY (SELECT \"a\", \"b\" FROM ONLY \"s\".\"t\" WHERE (b <> 'x') AND (\"a\", \"b\") < ('1', 'it''s')) TO STDOUT (FORMAT text)",
                "COPY (SELECT \"a\", \"b\" FROM ONLY \"s\".\"t\" WHERE (b <> 'x') AND (\"a\", \"b\") >= ('1', 'it''s')) TO STDOUT (FORMAT text)",
            ]
        );
        // Key ranges that do not chain, or that carry pages too, are refused.
        for bad in [
            vec![range(0, &[], &["1", "a"]), range(1, &["2", "a"], &[])],
            vec![range(0, &[], &["1"]), range(1, &["1"], &[])],
            vec![RangeState { end_page: Some(3), ..range(0, &[], &["1", "a"]) }, range(1, &["1", "a"], &[])],
        ] {
            let state = TaskState { tables: vec![table(bad)], ..Default::default() };
            let e = pending_work(&state, &mapping).unwrap_err().to_string();
            assert!(e.contains("s.t into key ranges"), "{e}");
        }
    }

    #[test]
    fn ranges_must_cover_their_table_once() {
        let r = |range_id, first_page, end_page| RangeState { range_id, first_page, end_page, ..Default::default() };
        assert!(ranges_cover_table(&[]));
        assert!(ranges_cover_table(&[r(0, None, None)]));
        assert!(ranges_cover_table(&[r(2, Some(68), None), r(0, None, Some(34)), r(1, Some(34), Some(68))]));
        for bad in [
            // Ranges stored by an applier that kept them as text only.
            vec![r(0, None, None), r(1, None, None)],
            vec![r(0, None, Some(34)), r(1, Some(35), None)],
            vec![r(0, None, Some(34)), r(1, Some(34), Some(34)), r(2, Some(34), None)],
            vec![r(0, Some(0), None)],
            vec![r(0, None, Some(5))],
            vec![r(0, None, Some(1 << 32)), r(1, Some(1 << 32), None)],
        ] {
            assert!(!ranges_cover_table(&bad), "{bad:?}");
            let state = TaskState {
                tables: vec![TableState { schema: "s".into(), name: "t".into(), ranges: bad, ..Default::default() }],
                ..Default::default()
            };
            let e = pending_work(&state, &Mapping::default()).unwrap_err().to_string();
            assert!(e.contains("s.t") && e.contains("decant.copy_range"), "{e}");
        }
        assert_eq!(page_condition(Some(34), Some(68)).as_deref(), Some("ctid >= '(34,0)' AND ctid < '(68,0)'"));
        assert_eq!(page_condition(None, None), None);
    }
}
