//! What the full copy moves, read from the source inside the task's
//! snapshot: the selected tables with their copied columns, sizes and
//! ranges, and the selected sequences.

use decant_proto::grpc::{PageRange, SchemaStep, SequenceValue, StepOrder, TablePlan};
use tokio_postgres::Client;

use crate::config::Config;
use crate::connect::sql::quote_ident;
use crate::connect::sql::BINARY_IO;
use crate::throttle::SharedPace;

use super::keys;

/// Schemas that are never migrated: the catalogs, and the decant
/// extension's own schema.
pub const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'decant') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'";

/// Condition on a `pg_class` row `c`: not a member of an extension (the
/// extension creates it on the destination).
pub const NOT_EXTENSION_MEMBER: &str =
    "NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')";

/// The tables to copy: ordinary tables and partitions (a partitioned
/// table holds no rows of its own), not extension members, not temporary.
/// Each query waits its turn at `pace` (migrate.max_source_queries_per_second).
pub async fn list_tables(
    client: &Client,
    config: &Config,
    server_version: u32,
    pace: &SharedPace,
) -> Result<Vec<TablePlan>, tokio_postgres::Error> {
    let not_generated = if server_version >= 120000 { "a.attgenerated = ''" } else { "true" };
    // LEFT JOIN: a table without columns still holds rows.
    let sql = format!(
        "SELECT n.nspname::text, c.relname::text, pg_table_size(c.oid)::int8, pg_relation_size(c.oid)::int8,
                coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE a.attnum IS NOT NULL), '{{}}'),
                coalesce(array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) FILTER (WHERE a.attnum IS NOT NULL), '{{}}'),
                coalesce(bool_and({BINARY_IO}) FILTER (WHERE a.attnum IS NOT NULL), true), c.oid
           FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND {not_generated}
           LEFT JOIN pg_type t ON t.oid = a.atttypid
          WHERE c.relkind = 'r' AND c.relpersistence <> 't' AND {SYSTEM_SCHEMAS}
            AND {NOT_EXTENSION_MEMBER}
          GROUP BY n.nspname, c.relname, c.oid
          ORDER BY pg_table_size(c.oid) DESC, 1, 2"
    );
    let selected = config.selection();
    let split_bytes = config.migrate.split_tables_larger_than_mb.saturating_mul(1 << 20);
    pace.query().await;
    let block: i64 = client.query_one("SELECT current_setting('block_size')::int8", &[]).await?.get(0);
    let mut tables = Vec::new();
    pace.query().await;
    for row in client.query(&sql, &[]).await? {
        let (schema, name): (String, String) = (row.get(0), row.get(1));
        if !selected.table_selected(schema.as_bytes(), name.as_bytes()) {
            continue;
        }
        let total: i64 = row.get(2);
        let heap: i64 = row.get(3);
        // The size that counts is the table's with its TOAST data; ranges
        // are cut by heap pages or by key values, which spreads the
        // TOASTed rows with them.
        let pieces = (total as u64).div_ceil(split_bytes.max(1));
        let pages = (heap / block.max(1)) as u64;
        let (mut ranges, mut key_columns) = (Vec::new(), Vec::new());
        if total as u64 > split_bytes && server_version >= 140000 {
            // TID range scans (PostgreSQL 14+) read one range without
            // touching the rest of the table.
            ranges = ctid_ranges(pages, pieces);
        } else if total as u64 > split_bytes {
            // Before 14 a ctid range is read by scanning the whole table;
            // a key range is an index range scan.
            match keys::key_columns(client, row.get(7), server_version, pace).await? {
                Some(key) => match keys::key_ranges(client, &schema, &name, &key, pages, pieces, pace).await? {
                    keys::KeySplit::Ranges(r) => {
                        if !r.is_empty() {
                            (ranges, key_columns) = (r, key);
                        }
                    }
                    keys::KeySplit::Uncorrelated(c) => tracing::info!(
                        table = %format!("{schema}.{name}"),
                        key = %key.join(", "),
                        correlation = format!("{c:.2}"),
                        "copied whole, not in ranges: its rows are not stored in the order of its key, so every key range \
                         would read most of the table (ctid ranges need a PostgreSQL 14 or later source)"
                    ),
                },
                None => tracing::info!(
                    table = %format!("{schema}.{name}"),
                    "copied whole, not in ranges: it has no primary key or unique index on NOT NULL columns to split it by \
                     (ctid ranges need a PostgreSQL 14 or later source)"
                ),
            }
        }
        tables.push(TablePlan {
            schema,
            name,
            columns: row.get(4),
            types: row.get(5),
            binary: row.get(6),
            bytes: total.max(0) as u64,
            ranges,
            key_columns,
        });
    }
    Ok(tables)
}

/// Selected tables whose UPDATEs and DELETEs the stream cannot locate on the
/// destination, as `schema.table`: replica identity DEFAULT without a
/// primary key (or with a DEFERRABLE one, which PostgreSQL does not log as
/// the identity), NOTHING, or USING INDEX of an index that is gone (the WAL
/// then carries no old key). Unlogged tables are not in the WAL at all and
/// not listed. Tables matching `migrate.insert_only_tables` are accepted.
/// Returns (schema, table) pairs.
pub async fn tables_without_identity(client: &Client, config: &Config) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT n.nspname::text, c.relname::text
           FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND {SYSTEM_SCHEMAS}
            AND {NOT_EXTENSION_MEMBER}
            AND (c.relreplident = 'n'
                 OR (c.relreplident = 'd' AND NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary AND i.indimmediate))
                 OR (c.relreplident = 'i' AND NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)))
          ORDER BY 1, 2"
    );
    let selected = config.selection();
    // Validated with the configuration.
    let accepted = config.insert_only_patterns().unwrap_or_default();
    Ok(client
        .query(&sql, &[])
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .filter(|(s, t)| selected.table_selected(s.as_bytes(), t.as_bytes()))
        .filter(|(s, t)| !accepted.iter().any(|p| p.matches(s.as_bytes(), t.as_bytes())))
        .collect())
}

/// `pieces` page ranges that together cover every page of a table of
/// `pages` pages; the last one is open-ended, so pages added since the
/// size was read are copied too.
pub fn ctid_ranges(pages: u64, pieces: u64) -> Vec<PageRange> {
    let pieces = pieces.clamp(1, pages.max(1));
    if pieces <= 1 {
        return Vec::new();
    }
    let per = pages.div_ceil(pieces);
    let bounds: Vec<u64> = (1..pieces).map(|i| i * per).filter(|&b| b < pages).collect();
    let mut out = Vec::new();
    let mut lower: Option<u64> = None;
    for end in bounds.iter().copied().map(Some).chain(std::iter::once(None)) {
        out.push(PageRange { first_page: lower, end_page: end, ..Default::default() });
        lower = end;
    }
    out
}

/// Joins a sequence `c` to the table `t` (in schema `tn`) that owns it
/// (serial and identity columns), if any.
pub const SEQUENCE_OWNER: &str = "LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid \
         AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') \
     LEFT JOIN pg_class t ON t.oid = d.refobjid \
     LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace";

/// The sequences that go with the selection: those in selected schemas or
/// matching a pattern, and those owned by a selected table (serial and
/// identity columns). Values are read now, not from the snapshot:
/// sequences are not transactional.
/// Each query waits its turn at `pace`.
pub async fn sequence_values(client: &Client, config: &Config, pace: &SharedPace) -> Result<Vec<SequenceValue>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT n.nspname::text, c.relname::text, tn.nspname::text, t.relname::text
           FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           {SEQUENCE_OWNER}
          WHERE c.relkind = 'S' AND {SYSTEM_SCHEMAS}
            AND {NOT_EXTENSION_MEMBER}
          ORDER BY 1, 2"
    );
    let selected = config.selection();
    let mut out = Vec::new();
    pace.query().await;
    for row in client.query(&sql, &[]).await? {
        let (schema, name): (String, String) = (row.get(0), row.get(1));
        let owner: Option<(String, String)> = row.get::<_, Option<String>>(2).zip(row.get::<_, Option<String>>(3));
        let chosen = selected.table_selected(schema.as_bytes(), name.as_bytes())
            || owner.as_ref().is_some_and(|(s, t)| selected.table_selected(s.as_bytes(), t.as_bytes()));
        if !chosen {
            continue;
        }
        pace.query().await;
        let value =
            client.query_one(&format!("SELECT last_value, is_called FROM {}.{}", quote_ident(&schema), quote_ident(&name)), &[]).await?;
        let (owner_schema, owner_name) = owner.unwrap_or_default();
        out.push(SequenceValue { schema, name, last_value: value.get(0), is_called: value.get(1), owner_schema, owner_name });
    }
    Ok(out)
}

/// Marks the post-data steps that need only one copied table, so that the
/// applier can run them as soon as that table is copied: the indexes and
/// keys (primary, unique, exclusion, check) of a plain table that is
/// neither partitioned nor a partition, with the comments and labels that
/// go with them. Foreign keys, triggers, rules and everything on
/// partitions wait for the whole copy. The source's catalog says which
/// table each index or constraint is on (pg_dump names a constraint
/// "table constraint").
pub async fn mark_table_steps(
    client: &Client,
    server_version: u32,
    steps: &mut [SchemaStep],
    tables: &[TablePlan],
    pace: &SharedPace,
) -> Result<(), tokio_postgres::Error> {
    let plain = if server_version >= 100000 { "ct.relkind = 'r' AND NOT ct.relispartition" } else { "ct.relkind = 'r'" };
    let sql = format!(
        "SELECT 'INDEX', n.nspname::text, ci.relname::text, tn.nspname::text, ct.relname::text
           FROM pg_index i JOIN pg_class ci ON ci.oid = i.indexrelid JOIN pg_namespace n ON n.oid = ci.relnamespace
           JOIN pg_class ct ON ct.oid = i.indrelid JOIN pg_namespace tn ON tn.oid = ct.relnamespace
          WHERE {plain}
         UNION ALL
         SELECT 'CONSTRAINT', tn.nspname::text, ct.relname || ' ' || c.conname, tn.nspname::text, ct.relname::text
           FROM pg_constraint c JOIN pg_class ct ON ct.oid = c.conrelid JOIN pg_namespace tn ON tn.oid = ct.relnamespace
          WHERE c.contype IN ('p', 'u', 'x', 'c') AND {plain}"
    );
    pace.query().await;
    let owners: std::collections::HashMap<(String, String, String), (String, String)> =
        client.query(&sql, &[]).await?.iter().map(|r| ((r.get(0), r.get(1), r.get(2)), (r.get(3), r.get(4)))).collect();
    let copied: std::collections::HashSet<(&str, &str)> = tables.iter().map(|t| (t.schema.as_str(), t.name.as_str())).collect();
    let mut previous = String::new();
    for step in steps {
        let kind = match step.kind.as_str() {
            "INDEX" => Some("INDEX"),
            "CONSTRAINT" | "CHECK CONSTRAINT" => Some("CONSTRAINT"),
            _ if step.order() == StepOrder::WithPrevious => {
                step.after_table = previous.clone();
                continue;
            }
            _ => None,
        };
        let owner = kind.and_then(|kind| owners.get(&(kind.to_owned(), step.schema.clone(), step.name.clone())));
        step.after_table = match owner {
            Some((schema, name)) if copied.contains(&(schema.as_str(), name.as_str())) => {
                format!("{}.{}", quote_ident(schema), quote_ident(name))
            }
            _ => String::new(),
        };
        previous = step.after_table.clone();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_every_page_once() {
        let r = |first_page, end_page| PageRange { first_page, end_page, ..Default::default() };
        assert!(ctid_ranges(100, 1).is_empty());
        assert_eq!(ctid_ranges(100, 3), vec![r(None, Some(34)), r(Some(34), Some(68)), r(Some(68), None)]);
        // More pieces than pages: one page each at most.
        assert_eq!(ctid_ranges(2, 5), vec![r(None, Some(1)), r(Some(1), None)]);
        assert!(ctid_ranges(0, 4).is_empty());
    }
}
