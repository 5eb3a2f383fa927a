//! DDL captured on the source (a `decant.ddl` message at its place in its
//! transaction), applied on the destination per `migrate.ddl`: in the
//! group's destination transaction, after what was folded before it is
//! merged, under the source session's search_path, and recorded in
//! `decant.ddl` in that same transaction, so that a crash anywhere applies
//! it exactly once. The group then ends at that source transaction's
//! COMMIT, and the applier learns its tables' destination shapes again.

use std::sync::Arc;

use decant_proto::{Lsn, Message, Relation};

use super::statements::Target;
use super::{Applier, ApplyError};
use crate::config::{DdlPolicy, Mapping};
use crate::ddl::{DdlCommand, Origin};
use crate::quote::quote_ident;

/// What became of a captured statement on the destination, as
/// `decant.ddl.outcome` records it.
const APPLIED: &str = "applied";
const SKIPPED: &str = "skipped";
/// Marked by `decant skip-ddl` before the stream reached it.
pub const TO_SKIP: &str = "to skip";

impl Applier {
    pub(super) async fn ddl(&mut self, m: &Message<'_>) -> Result<(), ApplyError> {
        let at = m.lsn;
        let command =
            DdlCommand::parse(m.content).map_err(|reason| ApplyError::DdlNotReplayable { at, what: "a DDL statement".into(), reason })?;
        if command.origin == Origin::Announce {
            self.creating_table = true;
            return Ok(());
        }
        if !command.selected(&self.settings.selection) {
            tracing::debug!(%at, tag = %command.tag, objects = %command.object_list(), "DDL outside the task's selection");
            return Ok(());
        }
        let what = format!("the {} of {}", command.tag, command.object_list());
        // What was folded before it reaches the destination before it, in
        // the same transaction.
        self.flush_all_bulk().await?;
        self.open_transaction().await?;
        self.drain_pipeline(0).await?;
        let marked = self.ddl_outcome(at).await?;
        let statement = command.statement.clone().unwrap_or_default();
        if marked.as_deref() == Some(TO_SKIP) || self.settings.ddl == DdlPolicy::Skip {
            return self.skip_ddl(at, &command, &statement).await;
        }
        if self.settings.ddl == DdlPolicy::Stop {
            return Err(ApplyError::DdlStopped { at, what, statement });
        }
        if touches_mapping(&command, &self.settings.mapping) {
            return Err(ApplyError::DdlNotReplayable {
                at,
                what,
                reason: "migrate.map gives its objects other names on the destination, and the source's statement names the \
                         source objects"
                    .into(),
            });
        }
        let text = command.replay_text().map_err(|e| ApplyError::DdlNotReplayable { at, what: what.clone(), reason: e.to_string() })?;
        let Some(text) = text else {
            // An owner change: owners are not migrated.
            return self.skip_ddl(at, &command, &statement).await;
        };
        let failed = |source: tokio_postgres::Error| match source.as_db_error() {
            Some(db) if !crate::connect::sql::is_connection_loss(&source) => ApplyError::DdlFailed {
                at,
                what: what.clone(),
                statement: text.clone(),
                error: format!("{}: {}", db.severity(), db.message()),
            },
            // A lost destination is retried like any other.
            _ => ApplyError::Session(source),
        };
        let path = command.search_path.as_deref().unwrap_or("\"$user\", public");
        let row = self
            .client
            .query_one("SELECT current_setting('search_path'), set_config('search_path', $1, true)", &[&path])
            .await
            .map_err(failed)?;
        let own_path: String = row.get(0);
        self.client.batch_execute(&text).await.map_err(failed)?;
        self.client.execute("SELECT set_config('search_path', $1, true)", &[&own_path]).await.map_err(failed)?;
        self.record_ddl(at, APPLIED, &command.tag, &text).await?;
        self.metrics.ddl_applied.inc();
        tracing::info!(%at, tag = %command.tag, objects = %command.object_list(), statement = %text, "DDL applied");
        if let Some(g) = &mut self.group {
            g.ddl = true;
            g.exclusive = true;
        }
        self.relearn_tables().await
    }

    /// Leaves the statement at `at` out: recorded, counted and logged.
    async fn skip_ddl(&mut self, at: Lsn, command: &DdlCommand, statement: &str) -> Result<(), ApplyError> {
        self.record_ddl(at, SKIPPED, &command.tag, statement).await?;
        self.metrics.ddl_skipped.inc();
        tracing::info!(%at, tag = %command.tag, objects = %command.object_list(), statement = %statement, "DDL skipped");
        Ok(())
    }

    /// What `decant.ddl` holds for the statement at `at` (a mark of
    /// `decant skip-ddl`).
    async fn ddl_outcome(&mut self, at: Lsn) -> Result<Option<String>, ApplyError> {
        let row = self
            .client
            .query_opt(
                "SELECT outcome FROM decant.ddl WHERE task_id = $1 AND source_lsn = $2::text::pg_lsn",
                &[&self.settings.task_id, &at.to_string()],
            )
            .await
            .map_err(ApplyError::Session)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn record_ddl(&mut self, at: Lsn, outcome: &str, tag: &str, statement: &str) -> Result<(), ApplyError> {
        self.client
            .execute(
                "INSERT INTO decant.ddl (task_id, source_lsn, outcome, tag, statement) VALUES ($1, $2::text::pg_lsn, $3, $4, $5)
                 ON CONFLICT (task_id, source_lsn) DO UPDATE SET outcome = EXCLUDED.outcome, tag = EXCLUDED.tag,
                   statement = EXCLUDED.statement, at = now()",
                &[&self.settings.task_id, &at.to_string(), &outcome, &tag, &statement],
            )
            .await
            .map_err(ApplyError::Session)?;
        Ok(())
    }

    /// After a DDL statement: what the applier knows of each table's
    /// destination (column types, unique indexes, identity columns) is read
    /// again, and prepared statements and staging tables are made anew.
    /// Tables the statement dropped or renamed are left as they were: no
    /// change reaches them under their old name.
    async fn relearn_tables(&mut self) -> Result<(), ApplyError> {
        self.statements.clear();
        self.stages.clear();
        self.stages_created.clear();
        let targets: Vec<_> = self.targets.values().cloned().collect();
        let names: Vec<&str> = targets.iter().map(|t| t.qualified.as_str()).collect();
        let existing: Vec<String> = self
            .client
            .query("SELECT n FROM unnest($1::text[]) n WHERE to_regclass(n) IS NOT NULL", &[&names])
            .await
            .map_err(ApplyError::Session)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for target in targets.iter().filter(|t| existing.contains(&t.qualified)) {
            let mut relearned = (**target).clone();
            self.learn_destination(&mut relearned).await?;
            self.targets.insert(target.oid, Arc::new(relearned));
        }
        Ok(())
    }

    /// A table of the stream that the destination lacks, in a source
    /// transaction that runs CREATE TABLE AS or SELECT INTO, is created
    /// from its relation metadata (columns, types, NOT NULL, primary key)
    /// when DDL is applied: that statement's rows are decoded before its
    /// own message, which then finds the table there (its statement is
    /// CREATE TABLE IF NOT EXISTS). Any other missing table is an error
    /// that names it, as is one whose name or rows `migrate.map` changes.
    pub(super) async fn create_missing_table(&mut self, r: &Relation<'_>, target: &Target) -> Result<(), ApplyError> {
        if !self.creating_table || self.settings.ddl != DdlPolicy::Apply {
            return Ok(());
        }
        let (schema, name) = (String::from_utf8_lossy(r.namespace), String::from_utf8_lossy(r.name));
        if target.projected.is_some() || self.settings.mapping.renames(&schema, Some(&name)) {
            return Ok(());
        }
        let qualified = target.qualified.as_str();
        self.settle().await?;
        let missing: bool =
            self.client.query_one("SELECT to_regclass($1) IS NULL", &[&qualified]).await.map_err(ApplyError::Session)?.get(0);
        if !missing {
            return Ok(());
        }
        let mut columns: Vec<String> = r
            .columns
            .iter()
            .map(|c| {
                let not_null = if c.flags.not_null() { " NOT NULL" } else { "" };
                format!("{} {}{not_null}", quote_ident(&String::from_utf8_lossy(c.name)), String::from_utf8_lossy(c.type_name))
            })
            .collect();
        let key: Vec<String> =
            r.columns.iter().filter(|c| c.flags.primary_key()).map(|c| quote_ident(&String::from_utf8_lossy(c.name))).collect();
        if !key.is_empty() {
            columns.push(format!("PRIMARY KEY ({})", key.join(", ")));
        }
        let sql = format!("CREATE TABLE {qualified} ({})", columns.join(", "));
        self.flush_all_bulk().await?;
        self.open_transaction().await?;
        self.drain_pipeline(0).await?;
        self.client.batch_execute(&sql).await.map_err(|source| ApplyError::Statement {
            op: "CREATE TABLE",
            table: qualified.to_owned(),
            source,
        })?;
        tracing::info!(table = %qualified, statement = %sql, "created a table of the stream that the destination lacked, from its relation metadata");
        if let Some(g) = &mut self.group {
            g.exclusive = true;
        }
        Ok(())
    }
}

/// Whether `migrate.map` gives an object of the statement another name on
/// the destination (its text names the source's). A table with only a row
/// filter or transforms keeps its names: its DDL is applied as it is.
fn touches_mapping(command: &DdlCommand, mapping: &Mapping) -> bool {
    !mapping.is_empty()
        && command.objects.iter().any(|o| match o.schema.as_deref() {
            Some(schema) => {
                mapping.renames(schema, None)
                    || [o.name.as_deref(), o.table.as_deref()].into_iter().flatten().any(|n| mapping.renames(schema, Some(n)))
            }
            None => o.kind == "schema" && o.identity.as_deref().is_some_and(|s| mapping.renames(s, None)),
        })
}

/// The captured DDL statements of a task the destination recorded.
#[derive(Debug, Default, serde::Serialize)]
pub struct DdlCounts {
    pub applied: i64,
    pub skipped: i64,
    /// Marked by `decant skip-ddl`, not reached by the stream yet.
    pub to_skip: i64,
}

pub async fn counts(client: &tokio_postgres::Client, task_id: &str) -> Result<DdlCounts, tokio_postgres::Error> {
    let mut counts = DdlCounts::default();
    if client.query_one("SELECT to_regclass('decant.ddl') IS NULL", &[]).await?.get(0) {
        return Ok(counts);
    }
    for row in client.query("SELECT outcome, count(*) FROM decant.ddl WHERE task_id = $1 GROUP BY outcome", &[&task_id]).await? {
        let n: i64 = row.get(1);
        match row.get::<_, &str>(0) {
            APPLIED => counts.applied = n,
            SKIPPED => counts.skipped = n,
            TO_SKIP => counts.to_skip = n,
            _ => {}
        }
    }
    Ok(counts)
}

/// `decant skip-ddl`: marks the statement at source position `at` to be
/// skipped when the stream reaches it (after the operator applied it by
/// hand, or decided the destination goes without it). Refused for a
/// statement the destination already applied or skipped. (The position
/// applied is no guide: a transaction that committed later holds
/// positions before it.)
pub async fn mark_to_skip(client: &tokio_postgres::Client, task_id: &str, at: Lsn) -> anyhow::Result<String> {
    super::progress::create_decant_objects(client, super::progress::CREATE_TABLE).await?;
    let recorded: Option<String> = client
        .query_opt("SELECT outcome FROM decant.ddl WHERE task_id = $1 AND source_lsn = $2::text::pg_lsn", &[&task_id, &at.to_string()])
        .await?
        .map(|r| r.get(0));
    if let Some(done @ (APPLIED | SKIPPED)) = recorded.as_deref() {
        anyhow::bail!("the DDL statement at source position {at} was already {done} on the destination of task {task_id}");
    }
    client
        .execute(
            "INSERT INTO decant.ddl (task_id, source_lsn, outcome) VALUES ($1, $2::text::pg_lsn, $3)
             ON CONFLICT (task_id, source_lsn) DO UPDATE SET outcome = EXCLUDED.outcome, at = now()",
            &[&task_id, &at.to_string(), &TO_SKIP],
        )
        .await?;
    Ok(format!("task {task_id}: the DDL statement at source position {at} will be skipped; start the task again"))
}
