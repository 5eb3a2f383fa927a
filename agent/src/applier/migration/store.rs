//! The task's plan and state in the destination (schema `decant`): what
//! is planned, which phase the task is in, which steps and ranges are done.

use std::collections::HashMap;

use decant_proto::grpc::{MigrationPlan, PageRange, RangeState, TableState, TaskState};
use decant_proto::Lsn;
use tokio_postgres::Client;

use super::copy::{check_tables, copy_target};
use super::{end_leftover_sessions, ensure_tables, is_duplicate, qualified, session, step_label, MigrationError};
use crate::config::Mapping;
use crate::connect::ConnInfo;

/// The task's state; phase "new" when it has no plan.
pub async fn state(destination: &ConnInfo, task_id: &str, mapping: &Mapping) -> Result<TaskState, MigrationError> {
    let client = session(destination, task_id).await?;
    ensure_tables(&client).await?;
    check_mapping(&client, task_id, mapping).await?;
    read_state(&client, task_id).await
}

/// A planned task keeps the `migrate.map` it was planned with: the schema
/// phase renamed, and the copy filtered, by those entries.
async fn check_mapping(client: &Client, task_id: &str, mapping: &Mapping) -> Result<(), MigrationError> {
    let planned: Option<String> =
        client.query_opt("SELECT mapping FROM decant.task WHERE task_id = $1", &[&task_id]).await?.map(|r| r.get(0));
    match planned {
        Some(planned) if planned != mapping.fingerprint() => Err(MigrationError::State(
            task_id.into(),
            "was planned with other migrate.map entries than the configuration now has: restore them, or use another \
             task_id for a new task (DROP SCHEMA decant CASCADE in the destination starts this one over)"
                .into(),
        )),
        _ => Ok(()),
    }
}

pub(super) async fn read_state(client: &Client, task_id: &str) -> Result<TaskState, MigrationError> {
    let Some(task) = client.query_opt("SELECT phase, snapshot_lsn::text, types FROM decant.task WHERE task_id = $1", &[&task_id]).await?
    else {
        return Ok(TaskState { phase: "new".into(), reads_framed_copy: true, ..Default::default() });
    };
    let mut tables: Vec<TableState> = client
        .query(
            "SELECT table_id, schema_name, name, columns, binary_ok, bytes, key_columns FROM decant.copy_table
              WHERE task_id = $1 ORDER BY table_id",
            &[&task_id],
        )
        .await?
        .iter()
        .map(|r| TableState {
            table_id: r.get::<_, i32>(0) as u32,
            schema: r.get(1),
            name: r.get(2),
            columns: r.get(3),
            binary: r.get(4),
            bytes: r.get::<_, i64>(5) as u64,
            ranges: Vec::new(),
            key_columns: r.get(6),
        })
        .collect();
    let index: HashMap<u32, usize> = tables.iter().enumerate().map(|(i, t)| (t.table_id, i)).collect();
    for r in client
        .query(
            "SELECT table_id, range_id, condition, done_at IS NOT NULL, rows, bytes, first_page, end_page, key_from, key_to
               FROM decant.copy_range
              WHERE task_id = $1 ORDER BY table_id, range_id",
            &[&task_id],
        )
        .await?
    {
        if let Some(&i) = index.get(&(r.get::<_, i32>(0) as u32)) {
            let range_id = r.get::<_, i32>(1) as u32;
            let (condition, first, end): (String, Option<i64>, Option<i64>) = (r.get(2), r.get(6), r.get(7));
            let refused = |what: &str| {
                MigrationError::State(
                    task_id.into(),
                    format!(
                        "decant.copy_range holds {what} for range {range_id} of table {}.{}; it was changed by hand: start the \
                         task over (DROP SCHEMA decant CASCADE, and the tables it migrated)",
                        tables[i].schema, tables[i].name
                    ),
                )
            };
            let pages = match (first, end) {
                (None, None) if !condition.is_empty() => {
                    legacy_page_range(&condition).ok_or_else(|| refused("a condition that is no page range"))?
                }
                _ => PageRange {
                    first_page: first.map(u64::try_from).transpose().map_err(|_| refused("a negative page"))?,
                    end_page: end.map(u64::try_from).transpose().map_err(|_| refused("a negative page"))?,
                    ..Default::default()
                },
            };
            tables[i].ranges.push(RangeState {
                range_id,
                done: r.get(3),
                rows: r.get::<_, i64>(4) as u64,
                bytes: r.get::<_, i64>(5) as u64,
                first_page: pages.first_page,
                end_page: pages.end_page,
                key_from: r.get::<_, Option<Vec<String>>>(8).unwrap_or_default(),
                key_to: r.get::<_, Option<Vec<String>>>(9).unwrap_or_default(),
            });
        }
    }
    let existing = client
        .query(
            "SELECT kind || ' ' || CASE WHEN schema_name = '' THEN name ELSE schema_name || '.' || name END
               FROM decant.schema_step WHERE task_id = $1 AND existed AND kind <> 'SCHEMA' ORDER BY section DESC, step",
            &[&task_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lsn: String = task.get(1);
    Ok(TaskState {
        phase: task.get(0),
        snapshot_lsn: lsn.parse::<Lsn>().unwrap_or_default().0,
        types: task.get(2),
        tables,
        existing,
        reads_framed_copy: true,
    })
}

/// Stores a plan, once. With conflicts = report, objects that already
/// exist are reported before anything is written.
pub async fn plan(destination: &ConnInfo, task_id: &str, mut plan: MigrationPlan, mapping: &Mapping) -> Result<TaskState, MigrationError> {
    let mut client = session(destination, task_id).await?;
    ensure_tables(&client).await?;
    check_mapping(&client, task_id, mapping).await?;
    let current = read_state(&client, task_id).await?;
    if current.phase != "new" {
        return Ok(current);
    }
    plan.schema_prologue = fit_prologue(&client, &plan.schema_prologue).await?;
    let report = plan.conflicts == "report";
    let has = |t: &str| plan.types.iter().any(|x| x == t);
    if has("schema") {
        trial_pre_data(&client, &plan, report).await?;
    }
    let mut flags = Vec::new();
    if has("full") && !has("schema") {
        let checks =
            check_tables(&client, plan.tables.iter().map(|t| (copy_target(mapping, false, &t.schema, &t.name, &t.columns), &t.types)))
                .await?;
        if report {
            let full: Vec<String> = checks
                .iter()
                .zip(&plan.tables)
                .filter(|(c, _)| c.has_rows)
                .map(|(_, t)| format!("rows in table {}.{}", t.schema, t.name))
                .collect();
            if !full.is_empty() {
                return Err(MigrationError::Conflicts(full));
            }
        }
        flags = checks;
    }
    let phase = if has("schema") { "schema" } else { "copy" };
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO decant.task (task_id, phase, types, conflicts, snapshot_lsn, prologue, mapping)
         VALUES ($1, $2, $3, $4, $5::text::pg_lsn, $6, $7)",
        &[
            &task_id,
            &phase,
            &plan.types,
            &plan.conflicts,
            &Lsn(plan.snapshot_lsn).to_string(),
            &plan.schema_prologue,
            &mapping.fingerprint(),
        ],
    )
    .await?;
    let insert_step = tx
        .prepare(
            "INSERT INTO decant.schema_step (task_id, section, step, kind, schema_name, name, sql, step_order, after_table)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .await?;
    for (section, steps) in [("pre-data", &plan.pre_data), ("post-data", &plan.post_data)] {
        for (i, s) in steps.iter().enumerate() {
            tx.execute(&insert_step, &[&task_id, &section, &(i as i32), &s.kind, &s.schema, &s.name, &s.sql, &s.order, &s.after_table])
                .await?;
        }
    }
    for (i, t) in plan.tables.iter().enumerate() {
        let (binary, merge) = match flags.get(i) {
            Some(c) => (t.binary && c.same_builtin_types, c.has_rows),
            None => (t.binary, false),
        };
        let binary = binary && !mapping.projection(&t.schema, &t.name, &t.columns).transformed;
        tx.execute(
            "INSERT INTO decant.copy_table (task_id, table_id, schema_name, name, columns, types, binary_ok, bytes, merge, key_columns)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[&task_id, &(i as i32), &t.schema, &t.name, &t.columns, &t.types, &binary, &(t.bytes as i64), &merge, &t.key_columns],
        )
        .await?;
        let ranges = if t.ranges.is_empty() { vec![Default::default()] } else { t.ranges.clone() };
        for (r, pages) in ranges.iter().enumerate() {
            let page = |p: Option<u64>| p.map(|p| i64::try_from(p).unwrap_or(i64::MAX));
            let key = |k: &Vec<String>| (!k.is_empty()).then(|| k.clone());
            tx.execute(
                "INSERT INTO decant.copy_range (task_id, table_id, range_id, condition, first_page, end_page, key_from, key_to)
                 VALUES ($1, $2, $3, '', $4, $5, $6, $7)",
                &[
                    &task_id,
                    &(i as i32),
                    &(r as i32),
                    &page(pages.first_page),
                    &page(pages.end_page),
                    &key(&pages.key_from),
                    &key(&pages.key_to),
                ],
            )
            .await?;
        }
    }
    tx.commit().await?;
    read_state(&client, task_id).await
}

/// pg_dump's prologue without the `SET name = value;` lines of settings
/// this destination does not have: a newer pg_dump resets settings that
/// older servers do not know (transaction_timeout from 17,
/// default_table_access_method from 12), to values that are their
/// behaviour anyway.
async fn fit_prologue(client: &Client, prologue: &str) -> Result<String, tokio_postgres::Error> {
    let known: Vec<String> = client.query("SELECT name FROM pg_settings", &[]).await?.iter().map(|r| r.get(0)).collect();
    let mut out = String::with_capacity(prologue.len());
    for line in prologue.lines() {
        let setting = line.strip_prefix("SET ").and_then(|rest| rest.split_once(" = ")).map(|(name, _)| name.trim());
        match setting {
            Some(name) if !known.iter().any(|k| k.eq_ignore_ascii_case(name)) => {
                tracing::info!(setting = name, "pg_dump's prologue sets a setting this destination does not have; left out");
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Ok(out)
}

/// Runs the pre-data steps in one transaction that is rolled back, to find
/// what already exists (and any step the destination cannot run) before
/// anything is written.
async fn trial_pre_data(client: &Client, plan: &MigrationPlan, report: bool) -> Result<(), MigrationError> {
    client.batch_execute("BEGIN").await?;
    let result = async {
        client.batch_execute(&plan.schema_prologue).await?;
        let mut conflicts = Vec::new();
        let mut first_failure = None;
        for step in &plan.pre_data {
            client.batch_execute("SAVEPOINT decant_step").await?;
            match client.batch_execute(&step.sql).await {
                Ok(()) => client.batch_execute("RELEASE decant_step").await?,
                Err(e) => {
                    client.batch_execute("ROLLBACK TO decant_step").await?;
                    if is_duplicate(&e) {
                        if step.kind != "SCHEMA" {
                            conflicts.push(step_label(step));
                        }
                    } else if first_failure.is_none() {
                        first_failure = Some(MigrationError::Trial { step: step_label(step), source: e });
                    }
                }
            }
        }
        if report && !conflicts.is_empty() {
            return Err(MigrationError::Conflicts(conflicts));
        }
        // With conflicts = ignore, a step may fail only because an object
        // it builds on was kept; those are reported when they run.
        match first_failure {
            Some(e) if conflicts.is_empty() => Err(e),
            _ => Ok(()),
        }
    }
    .await;
    client.batch_execute("ROLLBACK").await?;
    result
}

/// After a restart during the copy: every table with an unfinished range
/// is emptied and copied again from a snapshot taken at `lsn`, and changes
/// to it that committed before `lsn` are not applied (they are in the new
/// copy). Tables the copy finished keep their rows.
pub async fn resnapshot(destination: &ConnInfo, task_id: &str, lsn: Lsn) -> Result<TaskState, MigrationError> {
    let mut client = session(destination, task_id).await?;
    end_leftover_sessions(&client, task_id).await?;
    let state = read_state(&client, task_id).await?;
    let has_schema = state.types.iter().any(|t| t == "schema");
    let tx = client.transaction().await?;
    for t in state.tables.iter().filter(|t| t.ranges.iter().any(|r| !r.done)) {
        let merge: bool = tx
            .query_one("SELECT merge FROM decant.copy_table WHERE task_id = $1 AND table_id = $2", &[&task_id, &(t.table_id as i32)])
            .await?
            .get(0);
        if !merge && t.ranges.iter().any(|r| r.done) {
            // Without schema migration the user's own foreign keys may point
            // at the table, which TRUNCATE refuses; DELETE in replica role
            // fires none of their checks.
            let empty = if has_schema { "TRUNCATE ONLY" } else { "DELETE FROM ONLY" };
            tx.batch_execute(&format!("{empty} {}", qualified(&t.schema, &t.name))).await?;
        }
        tx.execute(
            "UPDATE decant.copy_range SET done_at = NULL, started_at = NULL, rows = 0, bytes = 0 WHERE task_id = $1 AND table_id = $2",
            &[&task_id, &(t.table_id as i32)],
        )
        .await?;
        // A merged table (conflicts = ignore, rows of its own) keeps what
        // was copied; replaying every change since the first snapshot over
        // it, with overwrite, converges instead.
        if lsn.0 != 0 && !merge {
            tx.execute(
                "UPDATE decant.copy_table SET skip_before = $3::text::pg_lsn WHERE task_id = $1 AND table_id = $2",
                &[&task_id, &(t.table_id as i32), &lsn.to_string()],
            )
            .await?;
        }
    }
    tx.commit().await?;
    read_state(&client, task_id).await
}
/// The pages of a range planned by a version of decant that stored ranges
/// as WHERE conditions (`ctid >= '(34,0)' AND ctid < '(68,0)'`), so that
/// a copy under way goes on after an upgrade. Only the exact forms it
/// wrote are read, and only their numbers; any other text is refused.
fn legacy_page_range(condition: &str) -> Option<PageRange> {
    let page = |s: &str| -> Option<u64> {
        (1..=10).contains(&s.len()).then_some(s).filter(|s| s.bytes().all(|b| b.is_ascii_digit()))?.parse().ok()
    };
    let bound = |s: &str, op: &str| s.strip_prefix(op)?.strip_prefix("'(")?.strip_suffix(",0)'").and_then(page);
    let (first_page, end_page) = match condition.split_once(" AND ") {
        Some((lower, upper)) => (Some(bound(lower, "ctid >= ")?), Some(bound(upper, "ctid < ")?)),
        None => match (bound(condition, "ctid >= "), bound(condition, "ctid < ")) {
            (None, None) => return None,
            bounds => bounds,
        },
    };
    Some(PageRange { first_page, end_page, ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_conditions_are_read_as_numbers_or_refused() {
        let r = |first_page, end_page| Some(PageRange { first_page, end_page, ..Default::default() });
        assert_eq!(legacy_page_range("ctid < '(34,0)'"), r(None, Some(34)));
        assert_eq!(legacy_page_range("ctid >= '(34,0)' AND ctid < '(68,0)'"), r(Some(34), Some(68)));
        assert_eq!(legacy_page_range("ctid >= '(68,0)'"), r(Some(68), None));
        for bad in [
            "",
            "true",
            "ctid >= '(1,0)' OR true",
            "ctid < '(1,0)' AND pg_sleep(10) IS NOT NULL",
            "ctid >= '(1,0)' AND ctid < '(2,0)' AND true",
            "ctid >= '(-1,0)'",
            "ctid >= '(+1,0)'",
            "ctid >= '(1,1)'",
            "ctid >= '(99999999999,0)'",
            "ctid >= '(1,0)'; DROP TABLE t; --",
            "ctid < '(1,0)' AND ctid >= '(0,0)'",
        ] {
            assert_eq!(legacy_page_range(bad), None, "{bad}");
        }
    }
}

/// When and where a task was cut over (`decant cutover`).
#[derive(Debug, Clone, PartialEq)]
pub struct CutOver {
    /// `cut_over_at` as text, in the session's time zone (UTC).
    pub at: String,
    pub source_lsn: Lsn,
    pub sequences: i32,
}

/// Whether the task was cut over; read on `client`, a destination session.
/// Reads only: a destination without decant's tables has no cutover.
pub async fn cut_over(client: &Client, task_id: &str) -> Result<Option<CutOver>, tokio_postgres::Error> {
    if client.query_one("SELECT to_regclass('decant.cutover') IS NULL", &[]).await?.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT to_char(cut_over_at, 'YYYY-MM-DD HH24:MI:SS TZ'), source_lsn::text, sequences FROM decant.cutover WHERE task_id = $1",
            &[&task_id],
        )
        .await?;
    Ok(row.map(|r| CutOver { at: r.get(0), source_lsn: r.get::<_, String>(1).parse().unwrap_or_default(), sequences: r.get(2) }))
}

/// Fences the task: from now on its applier refuses every stream. The
/// phase becomes "completed" where the task has a plan.
pub async fn mark_cut_over(client: &Client, task_id: &str, source_lsn: Lsn, sequences: i32) -> Result<(), tokio_postgres::Error> {
    ensure_tables(client).await?;
    client
        .execute(
            "INSERT INTO decant.cutover (task_id, source_lsn, sequences) VALUES ($1, $2::text::pg_lsn, $3) ON CONFLICT (task_id) DO NOTHING",
            &[&task_id, &source_lsn.to_string(), &sequences],
        )
        .await?;
    client.execute("UPDATE decant.task SET phase = 'completed', updated_at = now() WHERE task_id = $1", &[&task_id]).await?;
    Ok(())
}

/// How a task is doing, as `decant status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// "running", "retrying" or "failed".
    pub state: String,
    pub reason: String,
    /// When this state began (UTC, as text).
    pub since: String,
    /// While retrying: seconds left of the retry window.
    pub retry_seconds_left: Option<u64>,
}

/// Records the task's state; `since` moves only when the state changes,
/// and an unchanged state writes nothing (these writes carry no replication
/// origin, so a stream reading the destination would see each one).
/// `retry_seconds_left` applies to "retrying".
pub async fn record_health(
    client: &Client,
    task_id: &str,
    state: &str,
    reason: &str,
    retry_seconds_left: Option<u64>,
) -> Result<(), tokio_postgres::Error> {
    ensure_tables(client).await?;
    let left = retry_seconds_left.map(|s| s as f64);
    client
        .execute(
            "INSERT INTO decant.health AS h (task_id, state, reason, retry_until)
             VALUES ($1, $2, $3, now() + make_interval(secs => $4))
             ON CONFLICT (task_id) DO UPDATE SET state = EXCLUDED.state, reason = EXCLUDED.reason,
                    retry_until = EXCLUDED.retry_until, updated_at = now(),
                    since = CASE WHEN h.state = EXCLUDED.state THEN h.since ELSE now() END
             WHERE (h.state, h.reason, h.retry_until) IS DISTINCT FROM (EXCLUDED.state, EXCLUDED.reason, EXCLUDED.retry_until)",
            &[&task_id, &state, &reason, &left],
        )
        .await?;
    Ok(())
}

/// The task's recorded state; reads only.
pub async fn health(client: &Client, task_id: &str) -> Result<Option<Health>, tokio_postgres::Error> {
    if client.query_one("SELECT to_regclass('decant.health') IS NULL", &[]).await?.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT state, reason, to_char(since, 'YYYY-MM-DD HH24:MI:SS TZ'),
                    CASE WHEN retry_until IS NULL THEN NULL ELSE greatest(0, extract(epoch FROM retry_until - now()))::int8 END
               FROM decant.health WHERE task_id = $1",
            &[&task_id],
        )
        .await?;
    Ok(row.map(|r| Health {
        state: r.get(0),
        reason: r.get(1),
        since: r.get(2),
        retry_seconds_left: r.get::<_, Option<i64>>(3).map(|s| s as u64),
    }))
}

/// The controls in force as recorded for `decant status`; `None` where a
/// side has not reported them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Controls {
    /// rows/s, MB/s, source queries/s of the full copy (agent).
    pub copy: Option<[u64; 3]>,
    /// rows/s, MB/s of the stream (applier).
    pub apply: Option<[u64; 2]>,
    /// The alerts firing, as JSON: [{kind, message, since}].
    pub alerts: String,
}

fn int8(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Records the agent's controls; writes only what changed (see
/// [`record_health`]).
pub async fn record_agent_controls(client: &Client, task_id: &str, copy: [u64; 3], alerts: &str) -> Result<(), tokio_postgres::Error> {
    ensure_tables(client).await?;
    client
        .execute(
            "INSERT INTO decant.controls AS c (task_id, copy_max_rows_per_second, copy_max_mb_per_second,
                                               copy_max_source_queries_per_second, alerts)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (task_id) DO UPDATE SET copy_max_rows_per_second = EXCLUDED.copy_max_rows_per_second,
                    copy_max_mb_per_second = EXCLUDED.copy_max_mb_per_second,
                    copy_max_source_queries_per_second = EXCLUDED.copy_max_source_queries_per_second,
                    alerts = EXCLUDED.alerts, updated_at = now()
             WHERE (c.copy_max_rows_per_second, c.copy_max_mb_per_second, c.copy_max_source_queries_per_second, c.alerts)
                   IS DISTINCT FROM (EXCLUDED.copy_max_rows_per_second, EXCLUDED.copy_max_mb_per_second,
                                     EXCLUDED.copy_max_source_queries_per_second, EXCLUDED.alerts)",
            &[&task_id, &int8(copy[0]), &int8(copy[1]), &int8(copy[2]), &alerts],
        )
        .await?;
    Ok(())
}

/// Records the stream's throttle the applier applies.
pub async fn record_applier_controls(client: &Client, task_id: &str, apply: [u64; 2]) -> Result<(), tokio_postgres::Error> {
    ensure_tables(client).await?;
    client
        .execute(
            "INSERT INTO decant.controls AS c (task_id, apply_max_rows_per_second, apply_max_mb_per_second) VALUES ($1, $2, $3)
             ON CONFLICT (task_id) DO UPDATE SET apply_max_rows_per_second = EXCLUDED.apply_max_rows_per_second,
                    apply_max_mb_per_second = EXCLUDED.apply_max_mb_per_second, updated_at = now()
             WHERE (c.apply_max_rows_per_second, c.apply_max_mb_per_second)
                   IS DISTINCT FROM (EXCLUDED.apply_max_rows_per_second, EXCLUDED.apply_max_mb_per_second)",
            &[&task_id, &int8(apply[0]), &int8(apply[1])],
        )
        .await?;
    Ok(())
}

/// The task's recorded controls; reads only.
pub async fn controls(client: &Client, task_id: &str) -> Result<Option<Controls>, tokio_postgres::Error> {
    if client.query_one("SELECT to_regclass('decant.controls') IS NULL", &[]).await?.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT copy_max_rows_per_second, copy_max_mb_per_second, copy_max_source_queries_per_second,
                    apply_max_rows_per_second, apply_max_mb_per_second, alerts
               FROM decant.controls WHERE task_id = $1",
            &[&task_id],
        )
        .await?;
    Ok(row.map(|r| {
        let v = |i: usize| r.get::<_, Option<i64>>(i).map(|v| v.max(0) as u64);
        Controls {
            copy: v(0).zip(v(1)).zip(v(2)).map(|((a, b), c)| [a, b, c]),
            apply: v(3).zip(v(4)).map(|(a, b)| [a, b]),
            alerts: r.get(5),
        }
    }))
}
