//! Precheck of the destination against what the source selected (needs
//! both sides, so `decant migrate` and `decant precheck` make it, not the
//! split roles): conflicting tables, tables the task expects there and the
//! privileges to write them, schemas to create in, the extensions, types
//! and collations the columns need, encodings and collations, triggers
//! that fire on applied changes, and free space for the copy.
//!
//! Conflicts are found by name here, early and fast; the applier's trial
//! run of the pre-data stays the exact check.

use std::collections::{BTreeMap, BTreeSet};

use super::destination::{Destination, Disk};
use super::server::Server;
use super::tables::Selection;
use super::{display, qualified, size, Check, Findings, Severity, TaskState};
use crate::config::{Config, ConflictMode, MigrationType, Operations};
use crate::connect::sql::quote_ident;

pub(super) async fn check(
    config: &Config,
    d: &Destination,
    source: &Server,
    sel: &Selection,
    state: &TaskState,
    f: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    let m = &config.migrate;
    encoding(source, &d.server, f);
    if m.has(MigrationType::Schema) {
        conflicts(config, d, sel, state, f).await?;
        schemas(d, sel, f).await?;
        dependencies(config, d, sel, f).await?;
    } else {
        tables(config, d, sel, f).await?;
    }
    if m.has(MigrationType::Full) || m.has(MigrationType::Incremental) {
        triggers(d, sel, f).await?;
    }
    if m.has(MigrationType::Full) {
        disk(d, sel, f).await?;
    }
    Ok(())
}

fn encoding(source: &Server, dest: &Server, f: &mut Findings) {
    if source.encoding != dest.encoding {
        let what = if dest.encoding == "UTF8" {
            "text is converted to UTF8 on every path; a value without a UTF-8 equivalent stops the task, naming it".to_owned()
        } else {
            format!("text is converted to {}; a value that encoding cannot hold stops the task, naming it", dest.encoding)
        };
        f.warn(
            Check::DestinationEncoding,
            "encoding",
            format!("the source database is {}, the destination {}: {what}", source.encoding, dest.encoding),
            format!("migrate into a destination database created WITH ENCODING '{}' TEMPLATE template0", source.encoding),
        );
    }
    if (&source.collate, &source.ctype) != (&dest.collate, &dest.ctype) {
        f.warn(
            Check::DestinationEncoding,
            "collation",
            format!(
                "the source database sorts with LC_COLLATE {} and LC_CTYPE {}, the destination with {} and {}: text sorts \
                 differently (ORDER BY, indexes on text, case mapping)",
                source.collate, source.ctype, dest.collate, dest.ctype
            ),
            format!(
                "migrate into a destination database created WITH LC_COLLATE '{}' LC_CTYPE '{}' TEMPLATE template0",
                source.collate, source.ctype
            ),
        );
    }
    if source.encoding == dest.encoding && (&source.collate, &source.ctype) == (&dest.collate, &dest.ctype) {
        f.pass(Check::DestinationEncoding, "encoding", format!("both databases are {} with collation {}", source.encoding, source.collate));
    }
}

/// Relations of the destination with the names of selected tables: the
/// source's names (the schema phase creates them) and those `migrate.map`
/// gives them (it renames them to those at its end).
async fn existing(config: &Config, d: &Destination, sel: &Selection) -> Result<BTreeMap<(String, String), String>, tokio_postgres::Error> {
    let mapping = config.mapping().unwrap_or_default();
    let (schemas, names): (Vec<String>, Vec<String>) = sel
        .tables
        .iter()
        .flat_map(|t| [(t.schema.clone(), t.name.clone()), mapping.table(&t.schema, &t.name)])
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .unzip();
    let rows = d
        .client
        .query(
            "SELECT x.s, x.t, c.relkind::text
               FROM unnest($1::text[], $2::text[]) AS x(s, t)
               JOIN pg_namespace n ON n.nspname = x.s
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = x.t",
            &[&schemas, &names],
        )
        .await?;
    Ok(rows.iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect())
}

async fn conflicts(
    config: &Config,
    d: &Destination,
    sel: &Selection,
    state: &TaskState,
    f: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    if let TaskState::Planned(phase) = state {
        f.pass(
            Check::DestinationConflicts,
            "destination",
            format!("task {} is planned (phase {phase}): what it created is its own", config.task_id),
        );
        return Ok(());
    }
    if config.migrate.has(MigrationType::Schema) {
        renamed_schemas(config, d, f).await?;
    }
    let found = existing(config, d, sel).await?;
    if config.migrate.conflicts == ConflictMode::Ignore {
        f.pass(
            Check::DestinationConflicts,
            "destination",
            format!("{} of the selected tables exist in the destination and are kept (migrate.conflicts = ignore)", found.len()),
        );
        return Ok(());
    }
    for ((s, t), kind) in &found {
        let kind = match kind.as_str() {
            "r" | "p" => "TABLE",
            "f" => "FOREIGN TABLE",
            "v" => "VIEW",
            "m" => "MATERIALIZED VIEW",
            "S" => "SEQUENCE",
            "i" | "I" => "INDEX",
            _ => "TYPE",
        };
        f.error(
            Check::DestinationConflicts,
            format!("{kind} {}", display(s, t)),
            format!("{kind} {} already exists in the destination (migrate.conflicts = report)", display(s, t)),
            "drop it, migrate into another database, or set migrate.conflicts = \"ignore\" to keep it",
        );
    }
    if found.is_empty() {
        f.pass(Check::DestinationConflicts, "destination", "no selected table exists in the destination");
    }
    Ok(())
}

/// A schema that `migrate.map` renames is renamed on the destination at
/// the end of the schema phase: its new name must be free there.
async fn renamed_schemas(config: &Config, d: &Destination, f: &mut Findings) -> Result<(), tokio_postgres::Error> {
    let mapping = config.mapping().unwrap_or_default();
    for (from, to) in mapping.schemas() {
        if d.client.query_opt("SELECT FROM pg_namespace WHERE nspname = $1", &[&to]).await?.is_some() {
            f.error(
                Check::DestinationConflicts,
                format!("schema {to}"),
                format!(
                    "migrate.map renames schema {from} to {to} at the end of the schema phase, and the destination already has \
                     a schema {to}"
                ),
                format!("drop schema {to} in the destination, or map the tables of {from} one by one (to = \"{to}.name\")"),
            );
        }
    }
    Ok(())
}

/// Without schema, the destination must hold the selected tables, and its
/// user write them.
async fn tables(config: &Config, d: &Destination, sel: &Selection, f: &mut Findings) -> Result<(), tokio_postgres::Error> {
    let m = &config.migrate;
    let mapping = config.mapping().unwrap_or_default();
    let selected: Vec<&super::tables::Relation> = sel.tables.iter().filter(|t| t.kind == "r").collect();
    // Under the names migrate.map gives them on the destination.
    let (schemas, names): (Vec<String>, Vec<String>) = selected.iter().map(|t| mapping.table(&t.schema, &t.name)).unzip();
    let rows = d
        .client
        .query(
            "SELECT x.s, x.t, c.oid IS NOT NULL,
                    coalesce(has_table_privilege(c.oid, 'INSERT'), false), coalesce(has_table_privilege(c.oid, 'UPDATE'), false),
                    coalesce(has_table_privilege(c.oid, 'DELETE'), false), coalesce(has_table_privilege(c.oid, 'TRUNCATE'), false)
               FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS x(s, t, n)
               LEFT JOIN pg_namespace n ON n.nspname = x.s
               LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = x.t AND c.relkind IN ('r', 'p')
              ORDER BY x.n",
            &[&schemas, &names],
        )
        .await?;
    let severity = if m.has(MigrationType::Full) { Severity::Error } else { Severity::Warning };
    let truncate = m.has(MigrationType::Incremental) && config.applier.apply_truncate;
    // A table whose TRUNCATE applier.operations leaves out needs no TRUNCATE privilege.
    let operations = config.operation_rules().unwrap_or_default();
    let mut fine = true;
    for (r, source) in rows.iter().zip(&selected) {
        let (s, t): (String, String) = (r.get(0), r.get(1));
        if !r.get::<_, bool>(2) {
            fine = false;
            f.fail(
                Check::DestinationTables,
                severity,
                display(&s, &t),
                "does not exist in the destination, where a task without \"schema\" expects it",
                "create it in the destination, or add \"schema\" to migrate.types",
            );
            continue;
        }
        let mut missing: Vec<&str> =
            ["INSERT", "UPDATE", "DELETE"].into_iter().zip(3..6).filter(|(_, i)| !r.get::<_, bool>(*i)).map(|(p, _)| p).collect();
        if truncate
            && operations.for_table(source.schema.as_bytes(), source.name.as_bytes()).contains(Operations::TRUNCATE)
            && !r.get::<_, bool>(6)
        {
            missing.push("TRUNCATE");
        }
        if !missing.is_empty() {
            fine = false;
            f.error(
                Check::DestinationTables,
                display(&s, &t),
                format!("{} may not {} it in the destination", d.server.user, missing.join(", ")),
                format!("GRANT {} ON {} TO {};", missing.join(", "), qualified(&s, &t), quote_ident(&d.server.user)),
            );
        }
    }
    if fine {
        f.pass(
            Check::DestinationTables,
            "destination",
            format!("the {} selected tables exist in the destination and may be written", rows.len()),
        );
    }
    Ok(())
}

/// With schema: the user may create in each schema of the selection (or
/// create the schema).
async fn schemas(d: &Destination, sel: &Selection, f: &mut Findings) -> Result<(), tokio_postgres::Error> {
    let rows = d
        .client
        .query(
            "SELECT x.s, n.oid IS NOT NULL, coalesce(has_schema_privilege(n.oid, 'CREATE'), false),
                    has_database_privilege(current_database(), 'CREATE'), current_database()::text
               FROM unnest($1::text[]) AS x(s) LEFT JOIN pg_namespace n ON n.nspname = x.s",
            &[&sel.schemas()],
        )
        .await?;
    let user = quote_ident(&d.server.user);
    let mut fine = true;
    for r in &rows {
        let (schema, exists, create, create_db, db): (String, bool, bool, bool, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        if d.server.superuser || (exists && create) || (!exists && create_db) {
            continue;
        }
        fine = false;
        if exists {
            f.error(
                Check::DestinationCreate,
                format!("schema {schema}"),
                format!("{} may not create the selected tables in schema {schema} of the destination (CREATE)", d.server.user),
                format!("GRANT CREATE ON SCHEMA {} TO {user};", quote_ident(&schema)),
            );
        } else {
            f.error(
                Check::DestinationCreate,
                format!("schema {schema}"),
                format!("{} may not create schema {schema} in database {db} of the destination (CREATE)", d.server.user),
                format!("GRANT CREATE ON DATABASE {} TO {user};", quote_ident(&db)),
            );
        }
    }
    if fine {
        f.pass(Check::DestinationCreate, "schemas", format!("may create the objects of schemas {}", sel.schemas().join(", ")));
    }
    Ok(())
}

/// Whether the schema phase creates the objects of `schema`: pg_dump
/// dumps whole schemas (all of them, or `schema.*` patterns), while a
/// table pattern dumps only tables.
fn dumped_whole(config: &Config, schema: &str) -> bool {
    let whole = |p: &String| p.strip_suffix(".*") == Some(schema);
    let s = &config.source;
    (s.include_tables.is_empty() || s.include_tables.iter().any(whole)) && !s.exclude_tables.iter().any(whole)
}

/// The extensions, types and collations the selected columns need.
async fn dependencies(config: &Config, d: &Destination, sel: &Selection, f: &mut Findings) -> Result<(), tokio_postgres::Error> {
    // pg_dump creates extensions only when it dumps the whole database.
    let whole_database = config.source.include_tables.is_empty();
    let rows = d.client.query("SELECT name::text, installed_version IS NOT NULL FROM pg_available_extensions", &[]).await?;
    let available: BTreeMap<String, bool> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let mut extensions_fine = true;
    if whole_database {
        for e in &sel.extensions {
            if !available.contains_key(e) {
                extensions_fine = false;
                f.error(
                    Check::DestinationExtensions,
                    format!("extension {e}"),
                    format!("extension {e} is installed on the source; the schema phase creates it, but the destination server does not have it"),
                    format!("install the package that provides extension {e} on the destination server"),
                );
            }
        }
    }
    let (kinds, names): (Vec<String>, Vec<(String, String)>) =
        sel.dependencies.iter().map(|x| (x.kind.to_owned(), (x.schema.clone(), x.name.clone()))).unzip();
    let (schemas, names): (Vec<String>, Vec<String>) = names.into_iter().unzip();
    let rows = d
        .client
        .query(
            "SELECT x.k, x.s, x.n FROM unnest($1::text[], $2::text[], $3::text[]) AS x(k, s, n)
              WHERE (x.k = 'type' AND EXISTS (SELECT FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                                               WHERE n.nspname = x.s AND t.typname = x.n))
                 OR (x.k = 'collation' AND EXISTS (SELECT FROM pg_collation c JOIN pg_namespace n ON n.oid = c.collnamespace
                                                    WHERE n.nspname = x.s AND c.collname = x.n))",
            &[&kinds, &schemas, &names],
        )
        .await?;
    let present: BTreeSet<(String, String, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let mut reported = BTreeSet::new();
    let mut types_fine = true;
    for dep in &sel.dependencies {
        let key = (dep.kind.to_owned(), dep.schema.clone(), dep.name.clone());
        if present.contains(&key) || dep.selected_row_type || !reported.insert(key) {
            continue;
        }
        let shown = format!("{} {}", dep.kind, display(&dep.schema, &dep.name));
        match &dep.extension {
            Some(e) if available.get(e) == Some(&true) || (whole_database && available.contains_key(e)) => {}
            Some(e) => {
                extensions_fine = false;
                let (what, fix) = if available.contains_key(e) {
                    (
                        "is not installed in the destination, and the schema phase creates extensions only when it migrates the whole database",
                        format!("on the destination: CREATE EXTENSION {};", quote_ident(e)),
                    )
                } else {
                    (
                        "is not available on the destination server",
                        format!(
                            "install the package that provides extension {e} on the destination server, then CREATE EXTENSION {};",
                            quote_ident(e)
                        ),
                    )
                };
                f.error(
                    Check::DestinationExtensions,
                    format!("extension {e}"),
                    format!("extension {e}, whose {shown} column {} uses, {what}", dep.used_by),
                    fix,
                );
            }
            None if dumped_whole(config, &dep.schema) => {}
            None => {
                types_fine = false;
                f.error(
                    Check::DestinationTypes,
                    shown.clone(),
                    format!(
                        "column {} uses {shown}, which the destination lacks, and the schema phase does not create it: schema \
                         {} is not migrated as a whole",
                        dep.used_by, dep.schema
                    ),
                    format!(
                        "create it in the destination first, or select schema {0} as a whole: source.include_tables = [\"{0}.*\", …]",
                        dep.schema
                    ),
                );
            }
        }
    }
    if extensions_fine {
        f.pass(
            Check::DestinationExtensions,
            "extensions",
            "the destination has (or the schema phase creates) every extension the selection needs",
        );
    }
    if types_fine {
        f.pass(
            Check::DestinationTypes,
            "types",
            "the destination has (or the schema phase creates) every type and collation the selected columns use",
        );
    }
    Ok(())
}

/// Triggers enabled ALWAYS or REPLICA fire under the applier's
/// `session_replication_role = replica`: on the destination's existing
/// tables, and (with schema) on those the source's definitions create.
async fn triggers(d: &Destination, sel: &Selection, f: &mut Findings) -> Result<(), tokio_postgres::Error> {
    let (schemas, names): (Vec<String>, Vec<String>) = sel.tables.iter().map(|t| (t.schema.clone(), t.name.clone())).unzip();
    let rows = d
        .client
        .query(
            "SELECT n.nspname::text, c.relname::text, t.tgname::text
               FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE NOT t.tgisinternal AND t.tgenabled IN ('A', 'R')
                AND (n.nspname::text, c.relname::text) IN (SELECT * FROM unnest($1::text[], $2::text[]))
              ORDER BY 1, 2, 3",
            &[&schemas, &names],
        )
        .await?;
    let mut found: Vec<(String, String, &str)> =
        rows.iter().map(|r| (display(r.get(0), r.get(1)), r.get(2), "the destination's")).collect();
    found.extend(sel.triggers.iter().map(|(t, g)| (t.clone(), g.clone(), "the source's (the schema phase creates it as it is)")));
    for (table, trigger, whose) in &found {
        let (s, t) = table.split_once('.').unwrap_or(("", table));
        f.warn(
            Check::DestinationTriggers,
            format!("trigger {trigger} on {table}"),
            format!(
                "{whose} trigger is enabled ALWAYS or REPLICA, so it fires on the rows decant writes (the applier runs with \
                 session_replication_role = replica, where ordinary triggers do not): its effects happen again on the destination"
            ),
            format!("on the destination: ALTER TABLE {} ENABLE TRIGGER {};", qualified(s, t), quote_ident(trigger)),
        );
    }
    if found.is_empty() {
        f.pass(Check::DestinationTriggers, "triggers", "no trigger of the selected tables fires on applied changes");
    }
    Ok(())
}

async fn disk(d: &Destination, sel: &Selection, f: &mut Findings) -> Result<(), tokio_postgres::Error> {
    let needed: i64 = sel.tables.iter().map(|t| t.bytes).sum();
    let how = format!("the selected tables take {} on the source (pg_total_relation_size: rows, TOAST and indexes)", size(needed));
    match d.disk().await? {
        Disk::Measured { path, free } if free >= needed => {
            f.pass(Check::DestinationDiskSpace, path, format!("{} free (df on the destination's host); {how}", size(free)))
        }
        Disk::Measured { path, free } => f.warn(
            Check::DestinationDiskSpace,
            path.clone(),
            format!("only {} free (df on the destination's host), and {how}", size(free)),
            format!("free space in {path} (or move the database to a larger tablespace) before the copy"),
        ),
        Disk::Unknown(why) => f.warn(
            Check::DestinationDiskSpace,
            "destination",
            format!("free space cannot be measured from here: {why}; {how}"),
            format!("check on the destination's host that its data directory has {} free (df -h)", size(needed)),
        ),
    }
    Ok(())
}
