//! Loading the full copy's ranges, each in one transaction that marks it
//! done, and the checks of the destination tables it loads into.

use std::collections::HashMap;

use bytes::Bytes;
use decant_proto::grpc::{CopyDone, TaskState};
use decant_proto::Lsn;
use futures_util::SinkExt;
use tokio_postgres::Client;

use super::{ensure_tables, qualified, session, MigrationError};
use crate::connect::sql::{column_list, quote_ident, BINARY_IO};
use crate::connect::ConnInfo;

pub(super) struct TableCheck {
    pub has_rows: bool,
    pub same_builtin_types: bool,
}

/// Checks the destination tables of the copy: they exist with the copied
/// columns; binary COPY needs the same built-in type, with binary I/O, on
/// both sides.
pub(super) async fn check_tables<'a>(
    client: &Client,
    tables: impl Iterator<Item = (&'a str, &'a str, &'a Vec<String>, &'a Vec<String>)>,
) -> Result<Vec<TableCheck>, MigrationError> {
    let mut missing = Vec::new();
    let mut out = Vec::new();
    for (schema, name, columns, types) in tables {
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
        for (c, t) in columns.iter().zip(types) {
            match found.get(c) {
                None => missing.push(format!("{schema}.{name} (column {c})")),
                Some((dt, builtin)) => same &= dt == t && *builtin,
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
pub(super) async fn prepare_copy(client: &Client, task_id: &str, state: &TaskState, ignore: bool) -> Result<(), MigrationError> {
    let types: Vec<(Vec<String>, Vec<String>)> = client
        .query("SELECT columns, types FROM decant.copy_table WHERE task_id = $1 ORDER BY table_id", &[&task_id])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let checks =
        check_tables(client, state.tables.iter().zip(&types).map(|(t, (c, ty))| (t.schema.as_str(), t.name.as_str(), c, ty))).await?;
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
pub async fn skip_before(client: &Client, task_id: &str) -> Result<HashMap<String, Lsn>, tokio_postgres::Error> {
    ensure_tables(client).await?;
    Ok(client
        .query(
            "SELECT schema_name, name, skip_before::text FROM decant.copy_table WHERE task_id = $1 AND skip_before IS NOT NULL",
            &[&task_id],
        )
        .await?
        .iter()
        .map(|r| (qualified(r.get(0), r.get(1)), r.get::<_, String>(2).parse().unwrap_or_default()))
        .collect())
}

/// Copies one range: the data arrives as `chunks` (COPY format, binary or
/// text as planned), and the range is marked done in the same transaction.
pub async fn copy_range(
    destination: &ConnInfo,
    task_id: &str,
    table_id: u32,
    range_id: u32,
    first: (Bytes, bool),
    mut chunks: impl futures_util::Stream<Item = Result<(Bytes, bool), String>> + Unpin,
) -> Result<CopyDone, MigrationError> {
    use futures_util::StreamExt;
    let client = session(destination, task_id).await?;
    let row = client
        .query_opt(
            "SELECT t.schema_name, t.name, t.columns, t.binary_ok, t.merge, r.done_at IS NOT NULL, r.rows, r.bytes
               FROM decant.copy_table t JOIN decant.copy_range r USING (task_id, table_id)
              WHERE t.task_id = $1 AND t.table_id = $2 AND r.range_id = $3",
            &[&task_id, &(table_id as i32), &(range_id as i32)],
        )
        .await?
        .ok_or_else(|| MigrationError::State(task_id.into(), format!("no range {range_id} of table {table_id} in the plan")))?;
    let (schema, name, columns, binary, merge): (String, String, Vec<String>, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let table = format!("{schema}.{name}");
    if row.get::<_, bool>(5) {
        // Done before (the agent did not see the answer): nothing to do.
        return Ok(CopyDone { rows: row.get::<_, i64>(6) as u64, bytes: row.get::<_, i64>(7) as u64 });
    }
    client
        .execute(
            "UPDATE decant.copy_range SET started_at = now() WHERE task_id = $1 AND table_id = $2 AND range_id = $3",
            &[&task_id, &(table_id as i32), &(range_id as i32)],
        )
        .await?;
    let target = qualified(&schema, &name);
    let list = column_list(&columns);
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let cols = cols.join(", ");
    let format = if binary { "binary" } else { "text" };
    let err = |source| MigrationError::Copy { table: table.clone(), source };
    client.batch_execute("BEGIN").await.map_err(err)?;
    let into = if merge {
        client
            .batch_execute(&format!("CREATE TEMP TABLE decant_stage ON COMMIT DROP AS SELECT {cols} FROM {target} WITH NO DATA"))
            .await
            .map_err(err)?;
        "decant_stage".to_owned()
    } else {
        target.clone()
    };
    let sink = client.copy_in::<_, Bytes>(&format!("COPY {into}{list} FROM STDIN (FORMAT {format})")).await.map_err(err)?;
    futures_util::pin_mut!(sink);
    let (first, mut last) = first;
    let mut bytes = first.len() as u64;
    if !first.is_empty() {
        sink.send(first).await.map_err(err)?;
    }
    while !last {
        let (chunk, end) = match chunks.next().await {
            Some(Ok(c)) => c,
            other => {
                // Cut short: the transaction is dropped with the session.
                let message = match other {
                    Some(Err(m)) => m,
                    _ => "the stream ended before the end of the range".to_owned(),
                };
                return Err(MigrationError::Stream { table, message });
            }
        };
        last = end;
        bytes += chunk.len() as u64;
        if !chunk.is_empty() {
            sink.send(chunk).await.map_err(err)?;
        }
    }
    let mut rows = sink.finish().await.map_err(err)?;
    if merge {
        // conflicts = ignore: the destination's rows win.
        rows = client
            .execute(
                &format!("INSERT INTO {target}{list} OVERRIDING SYSTEM VALUE SELECT {cols} FROM decant_stage ON CONFLICT DO NOTHING"),
                &[],
            )
            .await
            .map_err(err)?;
    }
    client
        .execute(
            "UPDATE decant.copy_range SET done_at = now(), rows = $4, bytes = $5 WHERE task_id = $1 AND table_id = $2 AND range_id = $3",
            &[&task_id, &(table_id as i32), &(range_id as i32), &(rows as i64), &(bytes as i64)],
        )
        .await
        .map_err(err)?;
    client.batch_execute("COMMIT").await.map_err(err)?;
    Ok(CopyDone { rows, bytes })
}
