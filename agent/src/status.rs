//! `decant status`: where a task is — its phase, each table's copy state,
//! the incremental lag, and rates measured over one second — and every
//! other task writing into the same destination, in brief.

use std::time::Duration;

use decant_proto::Lsn;
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::config::Config;
use crate::connect::sql::connect;
use crate::connect::{ConnInfo, ProcessEnv};

#[derive(Debug, Serialize)]
pub struct Status {
    pub task_id: String,
    /// "Not started", "Running", "Retrying", "Failed" or "Completed".
    pub state: String,
    pub phase: String,
    pub types: Vec<String>,
    pub tables: Vec<TableStatus>,
    pub applied_lsn: Option<String>,
    pub source_lsn: Option<String>,
    pub confirmed_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub copy_rows_per_s: f64,
    pub copy_mb_per_s: f64,
    pub apply_wal_mb_per_s: f64,
    /// Retrying or Failed: the error the agent reported, and since when.
    pub reason: Option<String>,
    pub since: Option<String>,
    /// Retrying: seconds left of the retry window.
    pub retry_seconds_left: Option<u64>,
    /// When `decant cutover` fenced the task.
    pub cut_over_at: Option<String>,
    /// The source position it was cut over at.
    pub cut_over_lsn: Option<String>,
    /// Every task the destination knows, this one first.
    pub tasks: Vec<TaskSummary>,
    /// The throttle in force (0 = unlimited; null: not reported yet).
    pub throttle: Throttle,
    /// The alerts firing now (fired and not resolved).
    pub alerts: Vec<AlertStatus>,
    /// DDL captured on the source: applied, skipped, marked to skip.
    pub ddl: crate::applier::ddl::DdlCounts,
    /// migrate.ddl of this configuration.
    pub ddl_policy: String,
}

/// One task of the destination, in brief.
#[derive(Debug, Serialize)]
pub struct TaskSummary {
    pub task_id: String,
    /// The task of the configuration `decant status` was given.
    pub this: bool,
    pub state: String,
    pub phase: String,
    /// The tables it claims (`decant.claim`).
    pub tables: i64,
    pub applied_lsn: Option<String>,
}

/// The throttle in force: the copy's as the agent reported it, the
/// stream's as the applier applies it.
#[derive(Debug, Default, Serialize)]
pub struct Throttle {
    pub copy_max_rows_per_second: Option<u64>,
    pub copy_max_mb_per_second: Option<u64>,
    pub copy_max_source_queries_per_second: Option<u64>,
    pub apply_max_rows_per_second: Option<u64>,
    pub apply_max_mb_per_second: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AlertStatus {
    /// "lag", "failure" or "retries_exhausted".
    pub kind: String,
    pub message: String,
    /// When it fired, RFC 3339 UTC.
    pub since: String,
}

#[derive(Debug, Serialize)]
pub struct TableStatus {
    pub table: String,
    /// "pending", "copying" or "done".
    pub state: String,
    pub ranges_done: i64,
    pub ranges: i64,
    pub rows: i64,
    pub bytes: i64,
}

struct Sample {
    rows: i64,
    bytes: i64,
    applied: Option<Lsn>,
}

pub async fn run(config: Config, json: bool) -> anyhow::Result<()> {
    let destination = ConnInfo::parse(&config.destination.dsn, &ProcessEnv)?;
    let (dest, _c) = connect(&destination, "decant status", "").await?;
    let first = sample(&dest, &config.task_id).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = sample(&dest, &config.task_id).await?;
    let types = config.migrate.types.iter().map(|t| t.name().to_owned()).collect();
    let mut status = read(&dest, &config.task_id, types, !config.migrate.has_phases_before_stream()).await?;
    status.tasks = summaries(&dest, &status).await?;
    status.ddl = crate::applier::ddl::counts(&dest, &config.task_id).await?;
    status.ddl_policy = config.migrate.ddl.name().to_owned();
    status.copy_rows_per_s = (second.rows - first.rows).max(0) as f64;
    status.copy_mb_per_s = (second.bytes - first.bytes).max(0) as f64 / 1048576.0;
    if let (Some(a), Some(b)) = (first.applied, second.applied) {
        status.apply_wal_mb_per_s = b.0.saturating_sub(a.0) as f64 / 1048576.0;
    }
    status.applied_lsn = second.applied.map(|l| l.to_string());
    if let Ok(source) = ConnInfo::parse(&config.source.dsn, &ProcessEnv) {
        match connect(&source, "decant status", "").await {
            Ok((src, _c)) => {
                let row = src
                    .query_one(
                        "SELECT pg_current_wal_lsn()::text, (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1)",
                        &[&config.source.slot],
                    )
                    .await?;
                let current: String = row.get(0);
                let confirmed: Option<String> = row.get(1);
                if let (Ok(c), Some(Ok(f))) = (current.parse::<Lsn>(), confirmed.as_ref().map(|s| s.parse::<Lsn>())) {
                    status.lag_bytes = Some(c.0.saturating_sub(f.0));
                }
                status.source_lsn = Some(current);
                status.confirmed_lsn = confirmed;
            }
            Err(e) => tracing::warn!(error = %e, "source not reachable: no lag"),
        }
    }
    if json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

async fn sample(dest: &Client, task_id: &str) -> anyhow::Result<Sample> {
    let row = dest.query_one("SELECT CASE WHEN to_regclass('decant.copy_range') IS NULL THEN NULL ELSE 1 END", &[]).await?;
    let (rows, bytes) = if row.get::<_, Option<i32>>(0).is_some() {
        let r = dest
            .query_one(
                "SELECT coalesce(sum(rows), 0)::int8, coalesce(sum(bytes), 0)::int8 FROM decant.copy_range WHERE task_id = $1",
                &[&task_id],
            )
            .await?;
        (r.get(0), r.get(1))
    } else {
        (0, 0)
    };
    Ok(Sample { rows, bytes, applied: applied_lsn(dest, task_id).await })
}

/// The source position the destination has committed (decant.progress).
async fn applied_lsn(dest: &Client, task_id: &str) -> Option<Lsn> {
    let row = dest.query_opt("SELECT source_lsn::text FROM decant.progress WHERE task_id = $1", &[&task_id]).await.ok()??;
    row.get::<_, String>(0).parse().ok()
}

/// Every task of the destination: `this` first, then the others by id.
async fn summaries(dest: &Client, this: &Status) -> anyhow::Result<Vec<TaskSummary>> {
    let known = crate::applier::migration::tasks(dest).await?;
    let claimed = |id: &str| known.iter().find(|(t, _)| t == id).map_or(0, |(_, n)| *n);
    let mut out = vec![TaskSummary {
        task_id: this.task_id.clone(),
        this: true,
        state: this.state.clone(),
        phase: this.phase.clone(),
        tables: claimed(&this.task_id),
        applied_lsn: this.applied_lsn.clone(),
    }];
    for (id, tables) in known.iter().filter(|(t, _)| *t != this.task_id) {
        // Their types are not in this configuration: a task without a plan
        // is taken for a stream-only one.
        let other = read(dest, id, Vec::new(), true).await?;
        let applied = applied_lsn(dest, id).await.map(|l| l.to_string());
        out.push(TaskSummary {
            task_id: id.clone(),
            this: false,
            state: other.state,
            phase: other.phase,
            tables: *tables,
            applied_lsn: applied,
        });
    }
    Ok(out)
}

/// The state of `task_id`, configured with `types` (a task not planned
/// yet); `stream_only`: it has no phases before the stream.
async fn read(dest: &Client, task_id: &str, types: Vec<String>, stream_only: bool) -> anyhow::Result<Status> {
    let mut status = Status {
        task_id: task_id.to_owned(),
        state: "Not started".into(),
        phase: "new".into(),
        types,
        tables: Vec::new(),
        applied_lsn: None,
        source_lsn: None,
        confirmed_lsn: None,
        lag_bytes: None,
        copy_rows_per_s: 0.0,
        copy_mb_per_s: 0.0,
        apply_wal_mb_per_s: 0.0,
        reason: None,
        since: None,
        retry_seconds_left: None,
        cut_over_at: None,
        cut_over_lsn: None,
        tasks: Vec::new(),
        throttle: Throttle::default(),
        ddl: Default::default(),
        ddl_policy: String::new(),
        alerts: Vec::new(),
    };
    let planned: bool = dest.query_one("SELECT to_regclass('decant.task') IS NOT NULL", &[]).await?.get(0);
    let task = if planned { dest.query_opt("SELECT phase, types FROM decant.task WHERE task_id = $1", &[&task_id]).await? } else { None };
    match task {
        Some(t) => {
            status.phase = t.get(0);
            status.types = t.get(1);
            status.state = if status.phase == "completed" { "Completed" } else { "Running" }.into();
            for r in dest
                .query(
                    "SELECT t.schema_name || '.' || t.name,
                            count(*) FILTER (WHERE r.done_at IS NOT NULL), count(*),
                            count(*) FILTER (WHERE r.started_at IS NOT NULL AND r.done_at IS NULL),
                            coalesce(sum(r.rows), 0)::int8, coalesce(sum(r.bytes), 0)::int8
                       FROM decant.copy_table t JOIN decant.copy_range r USING (task_id, table_id)
                      WHERE t.task_id = $1 GROUP BY t.table_id, t.schema_name, t.name ORDER BY t.table_id",
                    &[&task_id],
                )
                .await?
            {
                let (done, total, copying): (i64, i64, i64) = (r.get(1), r.get(2), r.get(3));
                let state = if done == total {
                    "done"
                } else if copying > 0 || done > 0 {
                    "copying"
                } else {
                    "pending"
                };
                status.tables.push(TableStatus {
                    table: r.get(0),
                    state: state.into(),
                    ranges_done: done,
                    ranges: total,
                    rows: r.get(4),
                    bytes: r.get(5),
                });
            }
        }
        None if stream_only && applied_lsn(dest, task_id).await.is_some() => {
            status.state = "Running".into();
            status.phase = "incremental".into();
        }
        None => {}
    }
    if let Some(h) = crate::applier::migration::health(dest, task_id).await? {
        if h.state == "retrying" || h.state == "failed" {
            status.state = if h.state == "failed" { "Failed" } else { "Retrying" }.into();
            status.reason = Some(h.reason);
            status.since = Some(h.since);
            status.retry_seconds_left = h.retry_seconds_left;
        }
    }
    if let Some(c) = crate::applier::migration::controls(dest, task_id).await? {
        let t = &mut status.throttle;
        if let Some([rows, mb, queries]) = c.copy {
            (t.copy_max_rows_per_second, t.copy_max_mb_per_second, t.copy_max_source_queries_per_second) =
                (Some(rows), Some(mb), Some(queries));
        }
        if let Some([rows, mb]) = c.apply {
            (t.apply_max_rows_per_second, t.apply_max_mb_per_second) = (Some(rows), Some(mb));
        }
        status.alerts = serde_json::from_str(&c.alerts).unwrap_or_default();
    }
    if let Some(c) = crate::applier::migration::cut_over(dest, task_id).await? {
        status.state = "Completed".into();
        status.phase = "completed".into();
        status.cut_over_at = Some(c.at);
        status.cut_over_lsn = Some(c.source_lsn.to_string());
    }
    Ok(status)
}

pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "task {}: {} (phase: {}; types: {})", s.task_id, s.state, s.phase, s.types.join(", "));
    if let (Some(reason), Some(since)) = (&s.reason, &s.since) {
        let left = s.retry_seconds_left.map(|l| format!("; {l} s of the retry window left")).unwrap_or_default();
        let _ = writeln!(out, "{} since {since}{left}: {reason}", s.state.to_lowercase());
    }
    if let (Some(at), Some(lsn)) = (&s.cut_over_at, &s.cut_over_lsn) {
        let _ = writeln!(out, "cut over at {at} (source position {lsn}): the applier takes no more changes");
    }
    if !s.tables.is_empty() {
        let count = |state: &str| s.tables.iter().filter(|t| t.state == state).count();
        let _ = writeln!(out, "tables: {} done, {} copying, {} pending", count("done"), count("copying"), count("pending"));
        let width = s.tables.iter().map(|t| t.table.len()).max().unwrap_or(5).max(5);
        let _ = writeln!(out, "  {:width$}  {:8}  {:>7}  {:>12}  {:>10}", "TABLE", "STATE", "RANGES", "ROWS", "MB");
        for t in &s.tables {
            let _ = writeln!(
                out,
                "  {:width$}  {:8}  {:>7}  {:>12}  {:>10.1}",
                t.table,
                t.state,
                format!("{}/{}", t.ranges_done, t.ranges),
                t.rows,
                t.bytes as f64 / 1048576.0
            );
        }
    }
    if s.applied_lsn.is_some() || s.lag_bytes.is_some() {
        let _ = writeln!(
            out,
            "incremental: applied up to {}, slot confirmed {}, source at {}, lag {}",
            s.applied_lsn.as_deref().unwrap_or("-"),
            s.confirmed_lsn.as_deref().unwrap_or("-"),
            s.source_lsn.as_deref().unwrap_or("-"),
            s.lag_bytes.map(|b| format!("{b} bytes")).unwrap_or_else(|| "-".into())
        );
    }
    let _ = writeln!(
        out,
        "rates: copy {:.0} rows/s, {:.1} MB/s; apply {:.2} MB/s of source WAL",
        s.copy_rows_per_s, s.copy_mb_per_s, s.apply_wal_mb_per_s
    );
    if s.tasks.len() > 1 {
        let _ = writeln!(out, "tasks in this destination ({}; * this one):", s.tasks.len());
        let width = s.tasks.iter().map(|t| t.task_id.len()).max().unwrap_or(4).max(4);
        let _ = writeln!(out, "    {:width$}  {:11}  {:11}  {:>6}  APPLIED", "TASK", "STATE", "PHASE", "TABLES");
        for t in &s.tasks {
            let mark = if t.this { '*' } else { ' ' };
            let applied = t.applied_lsn.as_deref().unwrap_or("-");
            let _ = writeln!(out, "  {mark} {:width$}  {:11}  {:11}  {:>6}  {applied}", t.task_id, t.state, t.phase, t.tables);
        }
    }
    if !s.ddl_policy.is_empty() {
        let d = &s.ddl;
        let marked = if d.to_skip > 0 { format!(", {} marked to skip", d.to_skip) } else { String::new() };
        let _ = writeln!(out, "ddl: {} applied, {} skipped{marked} (migrate.ddl = {})", d.applied, d.skipped, s.ddl_policy);
    }
    let t = &s.throttle;
    let _ = writeln!(
        out,
        "throttle: copy {}, {}, {}; stream {}, {}",
        limit(t.copy_max_rows_per_second, "rows/s"),
        limit(t.copy_max_mb_per_second, "MB/s"),
        limit(t.copy_max_source_queries_per_second, "source queries/s"),
        limit(t.apply_max_rows_per_second, "rows/s"),
        limit(t.apply_max_mb_per_second, "MB/s"),
    );
    if s.alerts.is_empty() {
        let _ = writeln!(out, "alerts: none firing");
    }
    for a in &s.alerts {
        let _ = writeln!(out, "alert firing since {}: {}: {}", a.since, a.kind, a.message);
    }
    out
}

fn limit(v: Option<u64>, unit: &str) -> String {
    match v {
        None => format!("? {unit} (not reported yet)"),
        Some(0) => format!("unlimited {unit}"),
        Some(v) => format!("{v} {unit}"),
    }
}
