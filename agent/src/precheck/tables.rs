//! Precheck of the selected tables, read on the source: the selection
//! itself, the privileges to read them, replica identities, unlogged and
//! foreign tables, large objects, sequences that column defaults use but
//! the task does not carry over; and what the destination is compared
//! with (sizes, the types, collations and extensions the columns need,
//! triggers that fire on replicated changes).

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;

use super::server::Server;
use super::{display, list, qualified, Check, Findings, Severity};
use crate::config::{Config, MigrationType};
use crate::connect::sql::quote_ident;
use crate::migrate::tables::{tables_without_identity, NOT_EXTENSION_MEMBER, SEQUENCE_OWNER, SYSTEM_SCHEMAS};

/// A selected table (ordinary, partitioned or foreign).
pub(super) struct Relation {
    pub schema: String,
    pub name: String,
    /// `r`, `p` or `f`.
    pub kind: String,
    /// With indexes and TOAST.
    pub bytes: i64,
}

/// A type or collation a selected column uses that is not built in.
pub(super) struct Dependency {
    /// "type" or "collation".
    pub kind: &'static str,
    pub schema: String,
    pub name: String,
    /// The extension it belongs to.
    pub extension: Option<String>,
    /// The column, as `schema.table.column`.
    pub used_by: String,
    /// The row type of a selected table (created with it).
    pub selected_row_type: bool,
}

/// What the source selected, for the comparison with the destination.
#[derive(Default)]
pub(super) struct Selection {
    pub tables: Vec<Relation>,
    /// With schema only.
    pub dependencies: Vec<Dependency>,
    /// Installed on the source (plpgsql and decant aside).
    pub extensions: Vec<String>,
    /// Triggers enabled ALWAYS or REPLICA on selected tables of the source
    /// (with schema, the destination gets them): (table, trigger).
    pub triggers: Vec<(String, String)>,
}

impl Selection {
    /// The schemas the selected tables are in.
    pub fn schemas(&self) -> Vec<String> {
        self.tables.iter().map(|t| t.schema.clone()).collect::<BTreeSet<_>>().into_iter().collect()
    }
}

pub(super) async fn check(client: &Client, config: &Config, server: &Server, f: &mut Findings) -> Result<Selection, tokio_postgres::Error> {
    let m = &config.migrate;
    let (schema, full, incremental) = (m.has(MigrationType::Schema), m.has(MigrationType::Full), m.has(MigrationType::Incremental));
    let selected = config.selection();
    let rows = client
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text, c.relkind::text, c.relpersistence::text,
                        CASE WHEN c.relkind = 'r' THEN pg_total_relation_size(c.oid) ELSE 0 END::int8,
                        has_table_privilege(c.oid, 'SELECT'), has_schema_privilege(n.oid, 'USAGE')
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p', 'f') AND c.relpersistence <> 't' AND {SYSTEM_SCHEMAS} AND {NOT_EXTENSION_MEMBER}
                  ORDER BY 1, 2"
            ),
            &[],
        )
        .await?;
    let mut sel = Selection::default();
    let mut unreadable: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut no_usage = BTreeSet::new();
    let mut unlogged = false;
    for r in rows.iter().filter(|r| selected.table_selected(r.get::<_, &str>(0).as_bytes(), r.get::<_, &str>(1).as_bytes())) {
        let t = Relation { schema: r.get(0), name: r.get(1), kind: r.get(2), bytes: r.get(4) };
        let persistence: String = r.get(3);
        let shown = display(&t.schema, &t.name);
        if persistence == "u" && incremental {
            unlogged = true;
            f.warn(
                Check::TablesUnlogged,
                &shown,
                "unlogged: its changes are not written to the WAL, so the incremental phase never sees them (a full copy copies its rows once)",
                format!("ALTER TABLE {} SET LOGGED;", qualified(&t.schema, &t.name)),
            );
        }
        if t.kind == "f" {
            f.warn(
                Check::TablesForeign,
                &shown,
                "a foreign table: its rows live on another server and are neither copied nor streamed (with schema, its \
                 definition is created and needs the foreign server and wrapper on the destination)",
                format!("exclude it: source.exclude_tables = [\"{shown}\"]"),
            );
        }
        if !r.get::<_, bool>(5) {
            unreadable.entry(t.schema.clone()).or_default().push(t.name.clone());
        }
        if !r.get::<_, bool>(6) {
            no_usage.insert(t.schema.clone());
        }
        sel.tables.push(t);
    }
    selection(config, &sel, f);
    mapping(client, config, &sel, incremental, f).await?;
    if incremental {
        if !unlogged {
            f.pass(Check::TablesUnlogged, "tables", "no selected table is unlogged");
        }
        identity(client, config, f).await?;
    }
    if !sel.tables.iter().any(|t| t.kind == "f") {
        f.pass(Check::TablesForeign, "tables", "no selected table is a foreign table");
    }
    if schema || full {
        let sequences = sequences(client, config, f).await?;
        privileges(server, unreadable, sequences, no_usage, f);
    }
    large_objects(client, f).await?;
    if schema {
        sel.dependencies = dependencies(client, config, &sel).await?;
        sel.extensions = client
            .query("SELECT extname::text FROM pg_extension WHERE extname NOT IN ('plpgsql', 'decant') ORDER BY 1", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        sel.triggers = client
            .query(
                "SELECT n.nspname::text, c.relname::text, t.tgname::text
                   FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE NOT t.tgisinternal AND t.tgenabled IN ('A', 'R') ORDER BY 1, 2, 3",
                &[],
            )
            .await?
            .iter()
            .filter(|r| selected.table_selected(r.get::<_, &str>(0).as_bytes(), r.get::<_, &str>(1).as_bytes()))
            .map(|r| (display(r.get(0), r.get(1)), r.get(2)))
            .collect();
    }
    Ok(sel)
}

/// Every pattern without a wildcard must name a table (as the plan
/// requires with schema or full).
fn selection(config: &Config, sel: &Selection, f: &mut Findings) {
    let m = &config.migrate;
    let severity = if m.has_phases_before_stream() { Severity::Error } else { Severity::Warning };
    let missing: Vec<&String> = config
        .source
        .include_tables
        .iter()
        .filter(|p| !p.contains('*'))
        .filter(|p| !sel.tables.iter().any(|t| t.kind == "r" && display(&t.schema, &t.name) == **p))
        .collect();
    for p in &missing {
        f.fail(
            Check::TablesSelection,
            severity,
            p.as_str(),
            format!("source.include_tables: no such table on the source: {p}"),
            "correct or remove the pattern in source.include_tables",
        );
    }
    if sel.tables.is_empty() {
        f.fail(Check::TablesSelection, severity, "tables", "no table is selected", "check source.include_tables and source.exclude_tables");
    } else if missing.is_empty() {
        let bytes: i64 = sel.tables.iter().map(|t| t.bytes).sum();
        f.pass(Check::TablesSelection, "tables", format!("{} tables selected, {} on the source", sel.tables.len(), super::size(bytes)));
    }
}

/// `migrate.map`'s table entries: each names a selected table; and a
/// table with a row filter or transforms, whose rows the stream rewrites
/// whole, logs its old rows whole (REPLICA IDENTITY FULL) when a value of
/// it can be TOASTed: an UPDATE that leaves such a value unchanged carries
/// it nowhere else.
async fn mapping(
    client: &Client,
    config: &Config,
    sel: &Selection,
    incremental: bool,
    f: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    let Ok(mapping) = config.mapping() else { return Ok(()) };
    let entries = mapping.tables();
    if entries.is_empty() {
        return Ok(());
    }
    let mut problems = 0;
    for (s, t, projected) in entries {
        let shown = display(s, t);
        if !sel.tables.iter().any(|r| r.schema == s && r.name == t) {
            problems += 1;
            f.warn(
                Check::TablesMapping,
                &shown,
                "migrate.map has an entry for this table, which is not selected (or does not exist): the entry does nothing",
                "fix the entry's table name, or select the table in source.include_tables",
            );
            continue;
        }
        if !(projected && incremental) {
            continue;
        }
        let row = client
            .query_one(
                "SELECT c.relreplident = 'f',
                        EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                   AND a.attstorage <> 'p')
                   FROM pg_class c WHERE c.oid = $1::text::regclass",
                &[&qualified(s, t)],
            )
            .await?;
        let (full, toastable): (bool, bool) = (row.get(0), row.get(1));
        if toastable && !full {
            problems += 1;
            f.error(
                Check::TablesMapping,
                &shown,
                "has a row filter or transforms (migrate.map), so the stream rewrites its rows whole, and a column whose values \
                 can be TOASTed: an UPDATE that leaves such a value unchanged carries it only in the old row, which the WAL \
                 holds whole only with REPLICA IDENTITY FULL",
                format!("ALTER TABLE {} REPLICA IDENTITY FULL;", qualified(s, t)),
            );
        }
    }
    if problems == 0 {
        f.pass(
            Check::TablesMapping,
            "migrate.map",
            "every entry names a selected table; filtered and transformed tables log whole old rows where needed",
        );
    }
    Ok(())
}

async fn identity(client: &Client, config: &Config, f: &mut Findings) -> Result<(), tokio_postgres::Error> {
    let keyless = tables_without_identity(client, config).await?;
    for (s, t) in &keyless {
        f.error(
            Check::TablesReplicaIdentity,
            display(s, t),
            "no replica identity (no primary key, a DEFERRABLE one, REPLICA IDENTITY NOTHING, or a dropped identity index): \
             the stream could not apply its UPDATEs and DELETEs, and the destination would silently keep rows the source \
             changed or deleted; schema and full copy alone need none",
            format!(
                "give it a primary key, or ALTER TABLE {} REPLICA IDENTITY FULL; or, if it only ever gets INSERTs, list it in \
                 migrate.insert_only_tables (an UPDATE or DELETE of it then stops the task)",
                qualified(s, t)
            ),
        );
    }
    if keyless.is_empty() {
        f.pass(
            Check::TablesReplicaIdentity,
            "tables",
            "every selected table has a replica identity (or is listed in migrate.insert_only_tables)",
        );
    }
    Ok(())
}

/// A sequence the task reads: (schema, name, may read it).
type Sequence = (String, String, bool);

/// The sequences the task carries over (those selected by name and those
/// owned by a selected table, as the copy reads them), and a warning for
/// each sequence a selected column's default uses that is not among them.
async fn sequences(client: &Client, config: &Config, f: &mut Findings) -> Result<Vec<Sequence>, tokio_postgres::Error> {
    let selected = config.selection();
    let rows = client
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text, has_sequence_privilege(c.oid, 'SELECT'), tn.nspname::text, t.relname::text,
                        coalesce(users.schemas, '{{}}'), coalesce(users.tables, '{{}}'), coalesce(users.columns, '{{}}')
                   FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   {SEQUENCE_OWNER}
                   -- The columns whose default uses it.
                   LEFT JOIN LATERAL (
                        SELECT array_agg(un.nspname::text) AS schemas, array_agg(u.relname::text) AS tables,
                               array_agg(a.attname::text) AS columns
                          FROM pg_depend ud
                          JOIN pg_attrdef ad ON ad.oid = ud.objid
                          JOIN pg_class u ON u.oid = ad.adrelid
                          JOIN pg_namespace un ON un.oid = u.relnamespace
                          JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
                         WHERE ud.classid = 'pg_attrdef'::regclass AND ud.refclassid = 'pg_class'::regclass AND ud.refobjid = c.oid
                   ) users ON true
                  WHERE c.relkind = 'S' AND {SYSTEM_SCHEMAS} AND {NOT_EXTENSION_MEMBER}
                  ORDER BY 1, 2"
            ),
            &[],
        )
        .await?;
    let mut carried = Vec::new();
    let mut warned = false;
    for r in &rows {
        let (schema, name, readable): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
        let owner: Option<(String, String)> = r.get::<_, Option<String>>(3).zip(r.get::<_, Option<String>>(4));
        let owner_selected = owner.as_ref().is_some_and(|(s, t)| selected.table_selected(s.as_bytes(), t.as_bytes()));
        if selected.table_selected(schema.as_bytes(), name.as_bytes()) || owner_selected {
            carried.push((schema, name, readable));
            continue;
        }
        // Used by a default of a selected table?
        let (schemas, tables, columns): (Vec<String>, Vec<String>, Vec<String>) = (r.get(5), r.get(6), r.get(7));
        let users: Vec<String> = schemas
            .iter()
            .zip(&tables)
            .zip(&columns)
            .filter(|((s, t), _)| selected.table_selected(s.as_bytes(), t.as_bytes()))
            .map(|((s, t), c)| format!("{}.{c}", display(s, t)))
            .collect();
        if users.is_empty() {
            continue;
        }
        warned = true;
        let whose = match &owner {
            Some((s, t)) => format!("belongs to {}, which is not selected", display(s, t)),
            None => "is not selected".to_owned(),
        };
        let select_fix = match &owner {
            Some((s, t)) => format!("select {} as well (source.include_tables)", display(s, t)),
            None => format!("select its schema {schema} as a whole (\"{schema}.*\")"),
        };
        f.warn(
            Check::TablesSequences,
            format!("sequence {}", display(&schema, &name)),
            format!(
                "the default of {} uses it, but it {whose}: its value is not carried over, so the destination would hand out \
                 numbers the source already used (and with schema, the default needs the sequence to exist in the destination)",
                list(&users, 3)
            ),
            format!(
                "{select_fix}; or set it in the destination at cutover: SELECT setval('{}', <the source's last_value>)",
                qualified(&schema, &name).replace('\'', "''")
            ),
        );
    }
    if !warned {
        f.pass(Check::TablesSequences, "sequences", "every sequence a selected column's default uses is carried over");
    }
    Ok(carried)
}

/// SELECT on the selected tables and carried sequences, USAGE on their
/// schemas.
fn privileges(
    server: &Server,
    unreadable: BTreeMap<String, Vec<String>>,
    sequences: Vec<Sequence>,
    no_usage: BTreeSet<String>,
    f: &mut Findings,
) {
    let user = quote_ident(&server.user);
    let mut unreadable = unreadable;
    for (s, n, readable) in sequences {
        if !readable {
            unreadable.entry(s).or_default().push(n);
        }
    }
    for (schema, names) in &unreadable {
        let shown: Vec<String> = names.iter().map(|n| display(schema, n)).collect();
        let objects: Vec<String> = names.iter().map(|n| qualified(schema, n)).collect();
        f.error(
            Check::SourceSelect,
            list(&shown, 5),
            format!("{} may not read these (SELECT), which the schema dump and the copy do", server.user),
            format!("GRANT SELECT ON {} TO {user};", objects.join(", ")),
        );
    }
    if unreadable.is_empty() {
        f.pass(Check::SourceSelect, &server.user, "may read every selected table and sequence");
    }
    for schema in &no_usage {
        f.error(
            Check::SourceSchemaUsage,
            format!("schema {schema}"),
            format!("{} may not use the schema (USAGE), so it cannot reach its tables", server.user),
            format!("GRANT USAGE ON SCHEMA {} TO {user};", quote_ident(schema)),
        );
    }
    if no_usage.is_empty() {
        f.pass(Check::SourceSchemaUsage, &server.user, "may use every schema of the selected tables");
    }
}

async fn large_objects(client: &Client, f: &mut Findings) -> Result<(), tokio_postgres::Error> {
    let count: i64 = client.query_one("SELECT count(*) FROM pg_largeobject_metadata", &[]).await?.get(0);
    if count > 0 {
        f.warn(
            Check::SourceLargeObjects,
            "pg_largeobject",
            format!(
                "the source database holds {count} large object(s): decant migrates neither them nor their changes (they are \
                 not in the logical stream, nor among the copied tables)"
            ),
            "copy them yourself at cutover (pg_dump --large-objects, or lo_export and lo_import)",
        );
    } else {
        f.pass(Check::SourceLargeObjects, "pg_largeobject", "no large objects");
    }
    Ok(())
}

/// The types (array element types resolved) and collations of selected
/// columns that are not built in.
async fn dependencies(client: &Client, config: &Config, sel: &Selection) -> Result<Vec<Dependency>, tokio_postgres::Error> {
    let selected = config.selection();
    let rows = client
        .query(
            &format!(
                "SELECT 'type', n.nspname::text, c.relname::text, a.attname::text, tn.nspname::text, t.typname::text, e.extname::text,
                        rn.nspname::text, r.relname::text
                   FROM pg_attribute a
                   JOIN pg_class c ON c.oid = a.attrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_type t0 ON t0.oid = a.atttypid
                   JOIN pg_type t ON t.oid = CASE WHEN t0.typcategory = 'A' AND t0.typelem <> 0 THEN t0.typelem ELSE t0.oid END
                   JOIN pg_namespace tn ON tn.oid = t.typnamespace
                   LEFT JOIN pg_depend d ON d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e'
                   LEFT JOIN pg_extension e ON e.oid = d.refobjid
                   LEFT JOIN pg_class r ON r.oid = t.typrelid AND r.relkind IN ('r', 'p', 'f')
                   LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace
                  WHERE a.attnum > 0 AND NOT a.attisdropped AND t.oid >= 16384
                    AND c.relkind IN ('r', 'p', 'f') AND {SYSTEM_SCHEMAS} AND {NOT_EXTENSION_MEMBER}
                 UNION ALL
                 SELECT 'collation', n.nspname::text, c.relname::text, a.attname::text, cn.nspname::text, co.collname::text,
                        e.extname::text, NULL, NULL
                   FROM pg_attribute a
                   JOIN pg_class c ON c.oid = a.attrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_collation co ON co.oid = a.attcollation
                   JOIN pg_namespace cn ON cn.oid = co.collnamespace
                   LEFT JOIN pg_depend d ON d.classid = 'pg_collation'::regclass AND d.objid = co.oid AND d.deptype = 'e'
                   LEFT JOIN pg_extension e ON e.oid = d.refobjid
                  WHERE a.attnum > 0 AND NOT a.attisdropped AND co.oid >= 16384
                    AND c.relkind IN ('r', 'p', 'f') AND {SYSTEM_SCHEMAS} AND {NOT_EXTENSION_MEMBER}"
            ),
            &[],
        )
        .await?;
    let is_selected = |s: &str, t: &str| sel.tables.iter().any(|x| x.schema == s && x.name == t);
    Ok(rows
        .iter()
        .filter(|r| selected.table_selected(r.get::<_, &str>(1).as_bytes(), r.get::<_, &str>(2).as_bytes()))
        .map(|r| {
            let kind = if r.get::<_, &str>(0) == "type" { "type" } else { "collation" };
            let row_of: Option<(String, String)> = r.get::<_, Option<String>>(7).zip(r.get::<_, Option<String>>(8));
            Dependency {
                kind,
                schema: r.get(4),
                name: r.get(5),
                extension: r.get(6),
                used_by: format!("{}.{}", display(r.get(1), r.get(2)), r.get::<_, &str>(3)),
                selected_row_type: row_of.is_some_and(|(s, t)| is_selected(&s, &t)),
            }
        })
        .collect())
}
