//! What the task takes in a destination shared with other tasks, read
//! from the source: the selected tables (resolved, as the copy and the
//! stream select them), the schemas its schema phase dumps whole, and its
//! slot. The applier records it and refuses an overlap with another task.

use decant_proto::grpc::{Claim, TableName};

use super::tables::{NOT_EXTENSION_MEMBER, SYSTEM_SCHEMAS};
use super::MigrateError;
use crate::config::{Config, MigrationType};
use crate::connect::sql::connect;
use crate::connect::ConnInfo;
use crate::transport::client::connect as connect_applier;
use crate::transport::TransportSettings;

/// Records `claim` through the applier, before a stream session (the
/// phases before the stream send it with their first call, in `drive`):
/// the slot is not created, nor anything written, for a task refused.
pub async fn record(config: &Config, transport: &TransportSettings, claim: Claim) -> Result<(), MigrateError> {
    let mut applier = connect_applier(&config.agent.applier_url, transport).await?;
    let mapping = config.mapping().map_err(|e| MigrateError::Invalid(e.to_string()))?;
    super::plan(&mut applier, &config.task_id, None, Some(claim), mapping.fingerprint()).await?;
    Ok(())
}

/// The task's claim, read on the source now.
pub async fn claim(config: &Config, source: &ConnInfo) -> Result<Claim, MigrateError> {
    let (client, _conn) = connect(source, "decant agent", "").await?;
    // Ordinary tables and partitions, as the copy lists them: the
    // destination tables rows are written to.
    let sql = format!(
        "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind = 'r' AND c.relpersistence <> 't' AND {SYSTEM_SCHEMAS} AND {NOT_EXTENSION_MEMBER}
          ORDER BY 1, 2"
    );
    let selected = config.selection();
    let mapping = config.mapping().map_err(|e| MigrateError::Invalid(e.to_string()))?;
    let tables = client
        .query(&sql, &[])
        .await?
        .iter()
        .map(|r| TableName { schema: r.get(0), name: r.get(1) })
        .filter(|t| selected.table_selected(t.schema.as_bytes(), t.name.as_bytes()))
        // Claimed under the names they have on the destination.
        .map(|t| {
            let (schema, name) = mapping.table(&t.schema, &t.name);
            TableName { schema, name }
        })
        .collect();
    let mut claim = Claim { tables, ..Default::default() };
    if config.migrate.has(MigrationType::Schema) {
        let every: Vec<String> = client
            .query(&format!("SELECT n.nspname::text FROM pg_namespace n WHERE {SYSTEM_SCHEMAS} ORDER BY 1"), &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        claim.schemas = whole_schemas(&config.source.include_tables, &config.source.exclude_tables, &every)
            .iter()
            .map(|s| mapping.schema(s).to_owned())
            .collect();
    }
    if config.migrate.has(MigrationType::Incremental) {
        claim.slot = config.source.slot.clone();
        // Slot names are per cluster. Where the server does not say which
        // cluster it is, the name alone is claimed.
        claim.source_system_id = match client.query_one("SELECT system_identifier::text FROM pg_control_system()", &[]).await {
            Ok(row) => row.get(0),
            Err(_) => String::new(),
        };
    }
    Ok(claim)
}

/// The schemas pg_dump dumps whole for these patterns (see
/// `schema::selection_args`): `app.*` selects schema app with every object
/// in it, no pattern at all every schema; `app.*` excluded removes it.
fn whole_schemas(include: &[String], exclude: &[String], every: &[String]) -> Vec<String> {
    let whole = |p: &String| p.strip_suffix(".*").filter(|s| !s.contains('*')).map(str::to_owned);
    let excluded: Vec<String> = exclude.iter().filter_map(whole).collect();
    let included: Vec<String> = if include.is_empty() { every.to_vec() } else { include.iter().filter_map(whole).collect() };
    let mut out: Vec<String> = included.into_iter().filter(|s| !excluded.contains(s)).collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_schema_patterns_claim_a_schema() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let every = v(&["app", "hr", "public"]);
        assert_eq!(whole_schemas(&v(&["app.*", "hr.staff", "a*.*"]), &[], &every), v(&["app"]));
        assert_eq!(whole_schemas(&[], &v(&["hr.*", "app.tmp"]), &every), v(&["app", "public"]));
        assert_eq!(whole_schemas(&v(&["public.pgbench_accounts"]), &[], &every), Vec::<String>::new());
    }
}
