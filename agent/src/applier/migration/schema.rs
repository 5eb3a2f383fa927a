//! Running the dumped schema steps: pre-data in dump order in one
//! session, post-data as the plan orders it (`StepOrder`), each step in its
//! own transaction that marks it done.

use std::collections::VecDeque;
use std::sync::Arc;

use decant_proto::grpc::{SchemaStep, SequenceValue, StepOrder, TaskState};
use tokio::sync::Mutex;
use tokio_postgres::Client;

use super::copy::prepare_copy;
use super::store::read_state;
use super::{end_leftover_sessions, ensure_tables, is_duplicate, qualified, session, step_label, MigrationError};
use crate::config::Mapping;
use crate::connect::ConnInfo;

/// Runs the steps of `section` that are not done, then moves the task to
/// its next phase. Pre-data runs in dump order in one session; post-data
/// in the batches of [`batches`], the parallel ones by `workers` sessions
/// at once.
pub async fn run_schema(
    destination: &ConnInfo,
    task_id: &str,
    section: &str,
    workers: usize,
    sequences: &[SequenceValue],
    mapping: &Mapping,
) -> Result<TaskState, MigrationError> {
    let client = session(destination, task_id).await?;
    ensure_tables(&client).await?;
    let state = read_state(&client, task_id).await?;
    let has = |t: &str| state.types.iter().any(|x| x == t);
    let expected = if section == "pre-data" { "schema" } else { "post-data" };
    let ready = state.phase == expected || (section == "post-data" && state.phase == "copy");
    if !ready {
        return if phase_rank(&state.phase) > phase_rank(expected) {
            Ok(state)
        } else {
            Err(MigrationError::State(task_id.into(), format!("cannot run {section} in phase {}", state.phase)))
        };
    }
    if section == "post-data" && has("full") {
        let pending: Vec<String> =
            state.tables.iter().filter(|t| t.ranges.iter().any(|r| !r.done)).map(|t| format!("{}.{}", t.schema, t.name)).collect();
        if !pending.is_empty() {
            return Err(MigrationError::State(task_id.into(), format!("tables not copied yet: {}", pending.join(", "))));
        }
    }
    end_leftover_sessions(&client, task_id).await?;
    let task = client.query_one("SELECT conflicts, prologue FROM decant.task WHERE task_id = $1", &[&task_id]).await?;
    let (conflicts, prologue): (String, String) = (task.get(0), task.get(1));
    let ignore = conflicts == "ignore";
    let steps = steps_to_run(&client, task_id, section, None).await?;
    if section == "pre-data" {
        client.batch_execute(&prologue).await?;
        for (n, step) in &steps {
            run_step(&client, task_id, section, *n, step, ignore).await?;
        }
        if has("full") {
            prepare_copy(&client, task_id, &state, ignore, mapping).await?;
        }
    } else {
        set_sequences(&client, sequences).await?;
        for batch in batches(steps, |(_, s)| s.order()) {
            let parallel = if batch.parallel { workers.max(1) } else { 1 };
            run_parallel(destination, task_id, section, &prologue, batch.units.into(), parallel, ignore).await?;
        }
    }
    let next = match section {
        "pre-data" if has("full") => "copy",
        "pre-data" => "post-data",
        _ if has("incremental") => "incremental",
        _ => "completed",
    };
    client.execute("UPDATE decant.task SET phase = $2, updated_at = now() WHERE task_id = $1", &[&task_id, &next]).await?;
    read_state(&client, task_id).await
}

/// The steps of `section` not done yet, in plan order; with `after_table`,
/// only those the plan marked as needing that table alone.
async fn steps_to_run(
    client: &Client,
    task_id: &str,
    section: &str,
    after_table: Option<&str>,
) -> Result<Vec<(i32, SchemaStep)>, MigrationError> {
    Ok(client
        .query(
            "SELECT step, kind, schema_name, name, sql, step_order, after_table FROM decant.schema_step
              WHERE task_id = $1 AND section = $2 AND done_at IS NULL AND ($3::text IS NULL OR after_table = $3) ORDER BY step",
            &[&task_id, &section, &after_table],
        )
        .await?
        .iter()
        .map(|r| {
            let step =
                SchemaStep { kind: r.get(1), schema: r.get(2), name: r.get(3), sql: r.get(4), order: r.get(5), after_table: r.get(6) };
            (r.get(0), step)
        })
        .collect())
}

/// Once the copy of table `table_id` is done, while other tables are still
/// copied: runs the post-data steps the plan marked as needing that table
/// alone (its indexes and keys), one after the other in one session, each
/// in its own transaction that marks it done. Returns the table and how
/// many steps ran. A step that fails here is left undone: the post-data
/// phase runs it again in plan order, and reports it if it fails again.
pub async fn run_table_steps(destination: &ConnInfo, task_id: &str, table_id: u32) -> Result<(String, usize), MigrationError> {
    let client = session(destination, task_id).await?;
    let row = client
        .query_opt(
            "SELECT t.schema_name, t.name, k.conflicts, k.prologue FROM decant.copy_table t JOIN decant.task k USING (task_id)
              WHERE t.task_id = $1 AND t.table_id = $2 AND k.phase = 'copy'
                AND NOT EXISTS (SELECT FROM decant.copy_range r WHERE r.task_id = t.task_id AND r.table_id = t.table_id AND r.done_at IS NULL)",
            &[&task_id, &(table_id as i32)],
        )
        .await?;
    let Some(row) = row else { return Ok((String::new(), 0)) };
    let table = qualified(row.get(0), row.get(1));
    let (conflicts, prologue): (String, String) = (row.get(2), row.get(3));
    let steps = steps_to_run(&client, task_id, "post-data", Some(&table)).await?;
    if !steps.is_empty() {
        client.batch_execute(&prologue).await?;
        client.batch_execute("SET maintenance_work_mem = '256MB'").await?;
        for (n, step) in &steps {
            run_step(&client, task_id, "post-data", *n, step, conflicts == "ignore").await?;
        }
    }
    Ok((table, steps.len()))
}

/// Post-data work as the plan ordered it: batches run one after the other;
/// the units of a parallel batch may run at once, those of a sequential
/// batch one at a time, in order. A unit is a step and the steps that go
/// with it ([`StepOrder::WithPrevious`]), run by one session in order.
#[derive(Debug, PartialEq)]
struct Batch<T> {
    parallel: bool,
    units: Vec<Vec<T>>,
}

/// Groups `steps` (the undone ones, in plan order) into [`Batch`]es.
/// After a restart a step whose predecessor was done runs alone.
fn batches<T>(steps: impl IntoIterator<Item = T>, order: impl Fn(&T) -> StepOrder) -> Vec<Batch<T>> {
    let mut batches: Vec<Batch<T>> = Vec::new();
    for step in steps {
        let order = order(&step);
        let parallel = order == StepOrder::Parallel;
        match batches.last_mut() {
            Some(batch) if order == StepOrder::WithPrevious => match batch.units.last_mut() {
                Some(unit) => unit.push(step),
                None => batch.units.push(vec![step]),
            },
            Some(batch) if batch.parallel == parallel => batch.units.push(vec![step]),
            _ => batches.push(Batch { parallel, units: vec![vec![step]] }),
        }
    }
    batches
}

fn phase_rank(phase: &str) -> u8 {
    match phase {
        "new" => 0,
        "schema" => 1,
        "copy" => 2,
        "post-data" => 3,
        _ => 4,
    }
}

async fn run_parallel(
    destination: &ConnInfo,
    task_id: &str,
    section: &str,
    prologue: &str,
    work: VecDeque<Vec<(i32, SchemaStep)>>,
    workers: usize,
    ignore: bool,
) -> Result<(), MigrationError> {
    if work.is_empty() {
        return Ok(());
    }
    let queue = Arc::new(Mutex::new(work));
    let mut handles = Vec::new();
    for _ in 0..workers.min(queue.lock().await.len()) {
        let (queue, destination, task_id, section, prologue) =
            (queue.clone(), destination.clone(), task_id.to_owned(), section.to_owned(), prologue.to_owned());
        handles.push(tokio::spawn(async move {
            let client = session(&destination, &task_id).await?;
            // Index builds sort: give each session room.
            client.batch_execute(&prologue).await?;
            client.batch_execute("SET maintenance_work_mem = '256MB'").await?;
            loop {
                let Some(unit) = queue.lock().await.pop_front() else { return Ok::<(), MigrationError>(()) };
                for (n, step) in &unit {
                    run_step(&client, &task_id, &section, *n, step, ignore).await?;
                }
            }
        }));
    }
    let mut first_error = None;
    for h in handles {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(MigrationError::State(task_id.into(), format!("schema worker failed: {e}")));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// One step in its own transaction, marked done in it.
async fn run_step(client: &Client, task_id: &str, section: &str, n: i32, step: &SchemaStep, ignore: bool) -> Result<(), MigrationError> {
    let mark =
        |set: &str| format!("UPDATE decant.schema_step SET {set} WHERE task_id = '{task_id}' AND section = '{section}' AND step = {n}");
    match client.batch_execute(&format!("BEGIN;\n{}\n;\n{};\nCOMMIT", step.sql, mark("done_at = now()"))).await {
        Ok(()) => Ok(()),
        Err(e) => {
            client.batch_execute("ROLLBACK").await?;
            if is_duplicate(&e) && (ignore || step.kind == "SCHEMA") {
                tracing::info!(object = %step_label(step), "already in the destination; kept");
                client.batch_execute(&mark("done_at = now(), existed = true")).await?;
                Ok(())
            } else {
                Err(MigrationError::Step { section: section.into(), kind: step.kind.clone(), name: step.name.clone(), source: e })
            }
        }
    }
}

async fn set_sequences(client: &Client, sequences: &[SequenceValue]) -> Result<(), MigrationError> {
    for s in sequences {
        let q = qualified(&s.schema, &s.name);
        client
            .execute("SELECT setval($1::text::regclass, $2, $3)", &[&q, &s.last_value, &s.is_called])
            .await
            .map_err(|e| MigrationError::Sequence(format!("{}.{}", s.schema, s.name), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_follow_the_plan_and_keep_annotations_with_their_object() {
        use StepOrder::*;
        let steps = [
            ("pk_a", Parallel),
            ("comment on pk_a", WithPrevious),
            ("i_b", Parallel),
            ("pk_c", Parallel),
            ("attach i_b", Sequential),
            ("trigger t", Sequential),
            ("comment on t", WithPrevious),
            ("fk", Sequential),
            ("comment on fk", WithPrevious),
            ("late index", Parallel),
            ("refresh mv", Sequential),
        ];
        let shape: Vec<(bool, Vec<Vec<&str>>)> = batches(steps, |s| s.1)
            .into_iter()
            .map(|b| (b.parallel, b.units.into_iter().map(|u| u.into_iter().map(|s| s.0).collect()).collect()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (true, vec![vec!["pk_a", "comment on pk_a"], vec!["i_b"], vec!["pk_c"]]),
                (false, vec![vec!["attach i_b"], vec!["trigger t", "comment on t"], vec!["fk", "comment on fk"]]),
                (true, vec![vec!["late index"]]),
                (false, vec![vec!["refresh mv"]]),
            ]
        );
        // After a restart, a comment whose object was done runs alone.
        let resumed = batches([("comment on fk", WithPrevious), ("trigger t", Sequential)], |s| s.1);
        assert_eq!(
            resumed,
            vec![Batch { parallel: false, units: vec![vec![("comment on fk", WithPrevious)], vec![("trigger t", Sequential)]] }]
        );
    }
}
