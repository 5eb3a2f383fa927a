//! Loading the full copy's ranges, each in one transaction that marks it
//! done, and the checks of the destination tables it loads into.

use std::collections::HashMap;

use decant_proto::grpc::{CopyDone, TaskState};
use decant_proto::Lsn;
use tokio_postgres::Client;

use super::{ensure_tables, qualified, wire_session, MigrationError};
use crate::config::Mapping;
use crate::connect::sql::{column_list, quote_ident, quote_literal, BINARY_IO};
use crate::connect::wire::copy::check;
use crate::connect::ConnInfo;
use crate::transport::server::CopyChunks;

pub(super) struct TableCheck {
    pub has_rows: bool,
    pub same_builtin_types: bool,
}

/// Where the copy of a source table goes. With the schema phase, into
/// the source names: `migrate.map`'s renames run after the post-data steps
/// (see [`Mapping::rename_sql`]); a column only `set` fills is then not
/// there, which the table check reports. Else into the destination names.
pub(super) struct CopyTarget {
    pub schema: String,
    pub name: String,
    pub columns: Vec<String>,
    /// Some value is a `set` expression: the copy is in text format.
    pub transformed: bool,
}

pub(super) fn copy_target(mapping: &Mapping, schema_phase: bool, schema: &str, name: &str, columns: &[String]) -> CopyTarget {
    let p = mapping.projection(schema, name, columns);
    if schema_phase {
        let extra = p.targets[columns.len()..].iter().cloned();
        CopyTarget {
            schema: schema.into(),
            name: name.into(),
            columns: columns.iter().cloned().chain(extra).collect(),
            transformed: p.transformed,
        }
    } else {
        let (schema, name) = mapping.table(schema, name);
        CopyTarget { schema, name, columns: p.targets, transformed: p.transformed }
    }
}

/// Checks the destination tables of the copy: they exist with the copied
/// columns; binary COPY needs the same built-in type, with binary I/O, on
/// both sides (each of `types` goes with the column at its place).
pub(super) async fn check_tables<'a>(
    client: &Client,
    tables: impl Iterator<Item = (CopyTarget, &'a Vec<String>)>,
) -> Result<Vec<TableCheck>, MigrationError> {
    let mut missing = Vec::new();
    let mut out = Vec::new();
    for (target, types) in tables {
        let CopyTarget { schema, name, columns, .. } = &target;
        let q = qualified(schema, name);
        let exists: bool = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&q]).await?.get(0);
        if !exists {
            missing.push(format!("{schema}.{name}"));
            continue;
        }
        let cols = client
            .query(
                &format!(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), {BINARY_IO}
                       FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                      WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped"
                ),
                &[&q],
            )
            .await?;
        let found: HashMap<String, (String, bool)> = cols.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect();
        let mut same = true;
        for (i, c) in columns.iter().enumerate() {
            match (found.get(c), types.get(i)) {
                (None, _) => missing.push(format!("{schema}.{name} (column {c})")),
                (Some((dt, builtin)), Some(t)) => same &= dt == t && *builtin,
                (Some(_), None) => same = false,
            }
        }
        let has_rows: bool = client.query_one(&format!("SELECT EXISTS (SELECT FROM ONLY {q})"), &[]).await?.get(0);
        out.push(TableCheck { has_rows, same_builtin_types: same });
    }
    if !missing.is_empty() {
        return Err(MigrationError::MissingTables(missing));
    }
    Ok(out)
}

/// After pre-data: the destination tables are checked, and the copy
/// format and conflict handling of each decided.
pub(super) async fn prepare_copy(
    client: &Client,
    task_id: &str,
    state: &TaskState,
    ignore: bool,
    mapping: &Mapping,
) -> Result<(), MigrationError> {
    let types: Vec<(Vec<String>, Vec<String>)> = client
        .query("SELECT columns, types FROM decant.copy_table WHERE task_id = $1 ORDER BY table_id", &[&task_id])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let schema_phase = state.types.iter().any(|t| t == "schema");
    let checks = check_tables(
        client,
        state.tables.iter().zip(&types).map(|(t, (c, ty))| (copy_target(mapping, schema_phase, &t.schema, &t.name, c), ty)),
    )
    .await?;
    for (t, c) in state.tables.iter().zip(checks) {
        let merge = ignore && c.has_rows;
        client
            .execute(
                "UPDATE decant.copy_table SET binary_ok = binary_ok AND $3, merge = $4 WHERE task_id = $1 AND table_id = $2",
                &[&task_id, &(t.table_id as i32), &c.same_builtin_types, &merge],
            )
            .await?;
    }
    Ok(())
}

/// Tables re-copied after a restart, with the LSN before which their
/// changes are already in the copy.
/// Keyed by the tables' destination names, as the stream's targets are.
pub async fn skip_before(client: &Client, task_id: &str, mapping: &Mapping) -> Result<HashMap<String, Lsn>, tokio_postgres::Error> {
    ensure_tables(client).await?;
    Ok(client
        .query(
            "SELECT schema_name, name, skip_before::text FROM decant.copy_table WHERE task_id = $1 AND skip_before IS NOT NULL",
            &[&task_id],
        )
        .await?
        .iter()
        .map(|r| {
            let (schema, name) = mapping.table(r.get(0), r.get(1));
            (qualified(&schema, &name), r.get::<_, String>(2).parse().unwrap_or_default())
        })
        .collect())
}

/// Copies one range: the data arrives as `chunks` of whole CopyData
/// messages (binary or text COPY format, as planned), which go to the
/// destination as they came; the range is marked done in the same
/// transaction. Also says whether that finished its table, which has
/// post-data steps to run now (`schema::run_table_steps`).
pub async fn copy_range(
    destination: &ConnInfo,
    mapping: &Mapping,
    task_id: &str,
    table_id: u32,
    range_id: u32,
    mut chunks: CopyChunks,
) -> Result<(CopyDone, bool), MigrationError> {
    use futures_util::StreamExt;
    let mut session = wire_session(destination, task_id).await?;
    let range = format!("task_id = {} AND table_id = {table_id} AND range_id = {range_id}", quote_literal(task_id));
    let row = session
        .simple_query(&format!(
            "SELECT t.schema_name, t.name, to_json(t.columns)::text, t.binary_ok, t.merge, r.done_at IS NOT NULL, r.rows, r.bytes,
                    'schema' = ANY (k.types)
               FROM decant.copy_table t JOIN decant.copy_range r USING (task_id, table_id) JOIN decant.task k USING (task_id)
              WHERE t.{range}"
        ))
        .await?
        .pop()
        .ok_or_else(|| MigrationError::State(task_id.into(), format!("no range {range_id} of table {table_id} in the plan")))?;
    let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let flag = |i: usize| text(i) == "t";
    let (schema, name) = (text(0), text(1));
    let columns: Vec<String> = serde_json::from_str(&text(2))
        .map_err(|e| MigrationError::State(task_id.into(), format!("columns of table {table_id} in the plan: {e}")))?;
    let (binary, merge) = (flag(3), flag(4));
    let table = format!("{schema}.{name}");
    if flag(5) {
        // Done before (the agent did not see the answer): nothing to do.
        return Ok((CopyDone { rows: text(6).parse().unwrap_or(0), bytes: text(7).parse().unwrap_or(0) }, false));
    }
    session.simple_query(&format!("UPDATE decant.copy_range SET started_at = now() WHERE {range}")).await?;
    let into_table = copy_target(mapping, flag(8), &schema, &name, &columns);
    let target = qualified(&into_table.schema, &into_table.name);
    let list = column_list(&into_table.columns);
    let cols: Vec<String> = into_table.columns.iter().map(|c| quote_ident(c)).collect();
    let cols = cols.join(", ");
    // As the agent reads it (`migrate::copy::pending_work`).
    let format = if binary && !into_table.transformed { "binary" } else { "text" };
    let err = |source| MigrationError::Copy { table: table.clone(), source };
    session.simple_query("BEGIN").await.map_err(err)?;
    let into = if merge {
        session
            .simple_query(&format!("CREATE TEMP TABLE decant_stage ON COMMIT DROP AS SELECT {cols} FROM {target} WITH NO DATA"))
            .await
            .map_err(err)?;
        "decant_stage".to_owned()
    } else {
        target.clone()
    };
    let mut sink = session.copy_in(&format!("COPY {into}{list} FROM STDIN (FORMAT {format})")).await.map_err(err)?;
    let mut bytes = 0;
    loop {
        let piece = match chunks.next().await {
            Some(Ok(piece)) => piece,
            other => {
                // Cut short: the transaction is dropped with the session.
                let message = match other {
                    Some(Err(m)) => m,
                    _ => "the stream ended before the end of the range".to_owned(),
                };
                return Err(MigrationError::Stream { table, message });
            }
        };
        // Only whole CopyData messages may reach the session: anything
        // else would be read by the server as a command. The agent in this
        // process has walked them already, while they were in its cache.
        let framing = match piece.framing {
            Some(framing) => framing,
            None => check(&piece.data).map_err(|message| MigrationError::Stream { table: table.clone(), message })?,
        };
        bytes += framing.payload;
        if !piece.data.is_empty() {
            sink.send(&piece.data).await.map_err(err)?;
        }
        if piece.last {
            break;
        }
    }
    let mut rows = sink.finish().await.map_err(err)?;
    if merge {
        // conflicts = ignore: the destination's rows win.
        rows = session
            .execute(&format!("INSERT INTO {target}{list} OVERRIDING SYSTEM VALUE SELECT {cols} FROM decant_stage ON CONFLICT DO NOTHING"))
            .await
            .map_err(err)?;
    }
    session
        .simple_query(&format!("UPDATE decant.copy_range SET done_at = now(), rows = {rows}, bytes = {bytes} WHERE {range}"))
        .await
        .map_err(err)?;
    session.simple_query("COMMIT").await.map_err(err)?;
    // Read after the commit, so that of two last ranges done at once at
    // least one sees the other (both may: the steps run once).
    let table_steps_ready = session
        .simple_query(&format!(
            "SELECT FROM decant.schema_step s
              WHERE s.task_id = {task} AND s.section = 'post-data' AND s.after_table = {table} AND s.done_at IS NULL
                AND NOT EXISTS (SELECT FROM decant.copy_range r WHERE r.task_id = {task} AND r.table_id = {table_id} AND r.done_at IS NULL)
              LIMIT 1",
            task = quote_literal(task_id),
            table = quote_literal(&qualified(&schema, &name)),
        ))
        .await
        .map_err(err)?
        .len()
        == 1;
    Ok((CopyDone { rows, bytes }, table_steps_ready))
}
