//! Several tasks writing into one destination: what each takes, recorded
//! in `decant.claim`, so that two tasks never migrate the same table,
//! create the same schema's objects, or stream from the same slot.
//!
//! A task claims before its state is read or its plan stored, and again
//! at every stream start; its claim replaces its previous one (a task
//! re-planning itself, or whose selection changed, never conflicts with
//! itself). Claims are checked and written under a table lock that only
//! claimers take, so two tasks claiming at the same moment are checked one
//! after the other: the second sees the first's rows. A task that was cut
//! over (`decant cutover`) holds nothing any more: its tables belong to the
//! application, and a new task may take them over.

use decant_proto::grpc::Claim;
use tokio_postgres::Client;

use super::{ensure_tables, MigrationError};

/// At most this many overlapping objects are named in the refusal.
const SHOWN: usize = 5;

/// Records `claim` for `task_id`, or refuses it (writing nothing) when it
/// overlaps what another task that was not cut over holds.
pub async fn claim(client: &mut Client, task_id: &str, claim: &Claim) -> Result<(), MigrationError> {
    ensure_tables(client).await?;
    let mut kinds = Vec::new();
    let mut schemas = Vec::new();
    let mut names = Vec::new();
    for t in &claim.tables {
        kinds.push("table");
        schemas.push(t.schema.as_str());
        names.push(t.name.as_str());
    }
    for s in &claim.schemas {
        kinds.push("schema");
        schemas.push(s.as_str());
        names.push("");
    }
    if !claim.slot.is_empty() {
        kinds.push("slot");
        schemas.push(claim.source_system_id.as_str());
        names.push(claim.slot.as_str());
    }
    let tx = client.transaction().await?;
    // SHARE ROW EXCLUSIVE conflicts with itself, not with readers
    // (`decant status`).
    tx.batch_execute("LOCK TABLE decant.claim IN SHARE ROW EXCLUSIVE MODE").await?;
    let rows = tx
        .query(
            "SELECT c.task_id, c.kind, c.schema_name, c.name
               FROM decant.claim c
               JOIN unnest($2::text[], $3::text[], $4::text[]) AS n(kind, schema_name, name) USING (kind, schema_name, name)
              WHERE c.task_id <> $1 AND NOT EXISTS (SELECT FROM decant.cutover x WHERE x.task_id = c.task_id)
              ORDER BY c.task_id, c.kind, c.schema_name, c.name",
            &[&task_id, &kinds, &schemas, &names],
        )
        .await?;
    if let Some(first) = rows.first() {
        let other: String = first.get(0);
        let overlap: Vec<String> =
            rows.iter().filter(|r| r.get::<_, String>(0) == other).map(|r| describe(r.get(1), r.get(2), r.get(3))).collect();
        tx.rollback().await?;
        return Err(MigrationError::Overlap { task: task_id.into(), other, overlap });
    }
    tx.execute("DELETE FROM decant.claim WHERE task_id = $1", &[&task_id]).await?;
    // What is left on this claim belongs to tasks that were cut over: taken over.
    tx.execute(
        "DELETE FROM decant.claim c USING unnest($1::text[], $2::text[], $3::text[]) AS n(kind, schema_name, name)
          WHERE (c.kind, c.schema_name, c.name) = (n.kind, n.schema_name, n.name)",
        &[&kinds, &schemas, &names],
    )
    .await?;
    tx.execute(
        "INSERT INTO decant.claim (task_id, kind, schema_name, name)
         SELECT $1, kind, schema_name, name FROM unnest($2::text[], $3::text[], $4::text[]) AS n(kind, schema_name, name)",
        &[&task_id, &kinds, &schemas, &names],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

fn describe(kind: String, schema: String, name: String) -> String {
    match kind.as_str() {
        "table" => format!("table {schema}.{name}"),
        "schema" => format!("the objects of schema {schema}"),
        _ => format!("slot {name}"),
    }
}

/// The refusal's list: a few of the overlapping objects, and how many.
pub(super) fn overlap_list(overlap: &[String]) -> String {
    let shown = overlap.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    match overlap.len() {
        n if n > SHOWN => format!("{shown} and {} more ({n} in all)", n - SHOWN),
        n => format!("{shown} ({n} in all)"),
    }
}

/// Every task the destination knows, for `decant status`: its id, and how
/// many tables it claims. Reads only.
pub async fn tasks(client: &Client) -> Result<Vec<(String, i64)>, tokio_postgres::Error> {
    let mut sources = Vec::new();
    for table in ["task", "progress", "health", "cutover", "claim"] {
        let exists: bool = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&format!("decant.{table}")]).await?.get(0);
        if exists {
            sources.push(format!("SELECT task_id FROM decant.{table}"));
        }
    }
    if sources.is_empty() {
        return Ok(Vec::new());
    }
    let claims: bool = client.query_one("SELECT to_regclass('decant.claim') IS NOT NULL", &[]).await?.get(0);
    let count = if claims { "(SELECT count(*) FROM decant.claim c WHERE c.task_id = t.task_id AND c.kind = 'table')" } else { "0::int8" };
    let sql = format!("SELECT task_id, {count} FROM ({}) t GROUP BY task_id ORDER BY task_id", sources.join(" UNION "));
    Ok(client.query(&sql, &[]).await?.iter().map(|r| (r.get(0), r.get(1))).collect())
}
