//! Set-based merge: a table's folded changes (see `fold`) are copied into
//! a temporary staging table with COPY and merged into the table with
//! three statements (see `stage`); INSERTs into a table without a key are
//! copied straight in. One round of executor work per table instead of one
//! per row, which is what lets the applier drain a backlog faster than a
//! row-by-row apply worker.
//!
//! A group's merges normally run when it commits, in its commit task (see
//! `commit`), while the next group is folded. A table's folded changes are
//! merged in the middle of a group instead, on the main connection, when a
//! change of that table cannot fold (it must see them first), before a
//! TRUNCATE or a message, and when the folded changes grew large.
//!
//! With `applier.split_merges`, a large merge of a table that allows it is
//! split over a second destination connection, half the keys on each (see
//! [`splits`]). The second connection commits its halves before the group
//! does: they are idempotent, see `commit`.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio_postgres::Client;

use super::fold::{Appends, Buffer};
use super::stage::{staging_data, Conn, Counts, StageSql};
use super::statements::Target;
use super::{statement_error, Applier, ApplyError};
use crate::metrics::Metrics;

/// The second destination connection of `split_merges`, with the staging
/// tables that exist in its session.
#[derive(Clone)]
pub struct Helper {
    pub client: Arc<Client>,
    pub stages_created: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Applier {
    pub(super) async fn flush_all_bulk(&mut self) -> Result<(), ApplyError> {
        let oids: Vec<u32> = self.folding.tables();
        for oid in oids {
            self.flush_bulk(oid).await?;
        }
        Ok(())
    }

    /// Merges the folded changes of one table now (in the middle of a
    /// group: before a change that cannot fold, or when they grew large).
    pub(super) async fn flush_bulk(&mut self, oid: u32) -> Result<(), ApplyError> {
        let (appends, buffer) = self.folding.take(oid);
        if appends.is_none() && buffer.is_none() {
            return Ok(());
        }
        self.open_transaction().await?;
        self.touch(oid);
        self.drain_pipeline(0).await?;
        let target = self.target(oid)?;
        if let Some(rows) = appends {
            Merge::Append { target: target.clone(), rows }.run(&self.client, Conn::Main, &self.metrics).await?;
        }
        if let Some(buffer) = buffer {
            let stage = self.ensure_stage(oid).await?;
            for merge in Merge::staged(target, stage, buffer, 1) {
                merge.run(&self.client, Conn::Main, &self.metrics).await?;
            }
        }
        Ok(())
    }

    /// The table's staging SQL; creates its staging table in this session,
    /// inside the open transaction, if it is not there yet.
    pub(super) async fn ensure_stage(&mut self, oid: u32) -> Result<Arc<StageSql>, ApplyError> {
        let target = self.target(oid)?;
        let table = target.display.clone();
        let stmt_err = |op| statement_error(op, &table);
        let stage = if let Some(stage) = self.stages.get(&oid) {
            stage.clone()
        } else {
            self.generation += 1;
            // INSERT … ON CONFLICT is refused on tables with INSERT or
            // UPDATE rules, even when the rules would not fire.
            // The second: whether the table's merges may be split (see
            // StageSql::splittable).
            let row = self
                .client
                .query_one(
                    "SELECT EXISTS (SELECT FROM pg_rewrite WHERE ev_class = $1::text::regclass AND ev_type IN ('2', '3')),
                            (SELECT count(*) FROM pg_index WHERE indrelid = $1::text::regclass AND indisunique) = 1
                            AND NOT EXISTS (SELECT FROM pg_constraint WHERE conrelid = $1::text::regclass AND contype = 'x')
                            AND NOT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgenabled IN ('A', 'R'))
                            AND NOT EXISTS (
                                SELECT FROM pg_index i
                                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                                 WHERE i.indrelid = $1::text::regclass AND i.indisunique
                                   AND (i.indexprs IS NOT NULL
                                        OR a.atttypid NOT IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'bool'::regtype,
                                                              'text'::regtype, 'varchar'::regtype, 'uuid'::regtype, 'date'::regtype,
                                                              'timestamp'::regtype, 'timestamptz'::regtype, 'bytea'::regtype)
                                        -- (collisdeterministic exists from PostgreSQL 12 on)
                                        OR EXISTS (SELECT FROM pg_collation c WHERE c.oid = ANY (i.indcollation)
                                                      AND NOT coalesce((to_jsonb(c) ->> 'collisdeterministic')::bool, true))))",
                    &[&target.qualified],
                )
                .await
                .map_err(stmt_err("reading rules, unique indexes and triggers"))?;
            // A merge that makes identity columns BY DEFAULT locks the table
            // until its group commits: the second connection would wait on it.
            let splittable = row.get::<_, bool>(1) && merge_identity_sql(&target).is_none();
            let stage = Arc::new(StageSql::new(&target, self.generation, row.get(0), splittable));
            self.stages.insert(oid, stage.clone());
            self.stages_created.remove(&oid);
            stage
        };
        if self.stages_created.contains(&oid) {
            return Ok(stage);
        }
        create_stage(&self.client, &stage, &table).await?;
        stage.created(Conn::Main);
        self.stages_created.insert(oid);
        Ok(stage)
    }
}

/// Runs the merges of a group on the main connection, inside its open
/// transaction; returns each table's rows copied (for the log).
pub async fn run_main(client: &Client, merges: Vec<Merge>, metrics: &Metrics) -> Result<Vec<(String, u64)>, ApplyError> {
    let mut copied = Vec::with_capacity(merges.len());
    for merge in merges {
        let table = merge.target().display.clone();
        copied.push((table, merge.run(client, Conn::Main, metrics).await?));
    }
    Ok(copied)
}

/// Runs the halves of split merges on the second connection, in a
/// transaction of its own that it commits; creates their staging tables in
/// its session first where missing.
pub async fn run_second(helper: &Helper, merges: Vec<Merge>, metrics: &Metrics) -> Result<(), ApplyError> {
    helper.client.batch_execute("BEGIN").await.map_err(ApplyError::Session)?;
    for merge in merges {
        if let Merge::Stage { target, stage, .. } = &merge {
            let created = helper.stages_created.lock().unwrap_or_else(|e| e.into_inner()).contains(&stage.stage);
            if !created {
                create_stage(&helper.client, stage, &target.display).await?;
                stage.created(Conn::Second);
                helper.stages_created.lock().unwrap_or_else(|e| e.into_inner()).insert(stage.stage.clone());
            }
        }
        merge.run(&helper.client, Conn::Second, metrics).await?;
    }
    helper.client.batch_execute("COMMIT").await.map_err(ApplyError::Session)
}

/// Creates a staging table in `client`'s session, inside its open
/// transaction.
pub async fn create_stage(client: &Client, stage: &StageSql, table: &str) -> Result<(), ApplyError> {
    let stmt_err = |op| statement_error(op, table);
    client.batch_execute(&stage.create).await.map_err(stmt_err("CREATE staging table"))?;
    // Staging columns take the domains' base types: a staged deletion
    // has no values, which a NOT NULL domain refuses.
    loop {
        let domains = client
            .query(
                "SELECT format('ALTER TABLE %s ALTER COLUMN %I TYPE %s', $1::text, a.attname, format_type(t.typbasetype, t.typtypmod))
                   FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                  WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND t.typtype = 'd'",
                &[&stage.stage],
            )
            .await
            .map_err(stmt_err("reading staging column types"))?;
        if domains.is_empty() {
            return Ok(());
        }
        for d in domains {
            client.batch_execute(d.get(0)).await.map_err(stmt_err("ALTER staging table"))?;
        }
    }
}

/// Folded changes of one table, ready to be written.
pub enum Merge {
    /// INSERTs into a table without a key, as COPY data.
    Append { target: Arc<Target>, rows: Appends },
    /// Net changes per key as COPY data for the staging table, merged from
    /// there.
    Stage { target: Arc<Target>, stage: Arc<StageSql>, data: BytesMut, counts: Counts },
}

impl Merge {
    /// Turns folded changes into their staging rows. Done where they were
    /// folded: their many small allocations are freed on the thread that
    /// made them (freeing them on the commit task's thread made the
    /// allocator contend). `parts`: merges to make, each with its own
    /// range of the keys.
    pub fn staged(target: Arc<Target>, stage: Arc<StageSql>, buffer: Buffer, parts: usize) -> Vec<Merge> {
        staging_data(buffer, &target, parts)
            .into_iter()
            .map(|(data, counts)| Merge::Stage { target: target.clone(), stage: stage.clone(), data, counts })
            .collect()
    }

    pub fn target(&self) -> &Target {
        match self {
            Merge::Append { target, .. } | Merge::Stage { target, .. } => target,
        }
    }

    /// Writes the changes; returns the rows copied (appended or staged).
    pub async fn run(self, client: &Client, conn: Conn, metrics: &Metrics) -> Result<u64, ApplyError> {
        match self {
            Merge::Append { target, rows } => {
                let copy = format!(
                    "COPY {}{} FROM STDIN{}",
                    target.qualified,
                    crate::connect::sql::column_list(&target.columns),
                    target.cells.copy_options()
                );
                let sent = rows.rows;
                let loaded = copy_in(client, &copy, rows.finish(&target.cells)).await.map_err(statement_error("COPY", &target.display))?;
                check_copied(&target, sent, loaded)
            }
            Merge::Stage { target, stage, data, counts } => {
                let table = target.display.as_str();
                let stmt_err = |op| statement_error(op, table);
                let staged = data.len();
                let loaded = copy_in(client, stage.copy(&target.cells), data.freeze()).await.map_err(stmt_err("COPY"))?;
                check_copied(&target, counts.rows(), loaded)?;
                let identity = merge_identity_sql(&target);
                if let Some((relax, _)) = &identity {
                    client.batch_execute(relax).await.map_err(stmt_err("ALTER COLUMN … SET GENERATED BY DEFAULT"))?;
                }
                // Each statement scans the staging table: only those with
                // rows to act on run.
                let mut deleted = 0;
                if counts.deletes > 0 {
                    deleted = client.execute(&stage.delete, &[]).await.map_err(stmt_err("DELETE"))? as usize;
                }
                let update = if counts.keeps_values { &stage.update_keeping } else { &stage.update };
                let updated = match update {
                    Some(sql) if counts.updates > 0 => client.execute(sql, &[]).await.map_err(stmt_err("UPDATE"))? as usize,
                    _ => counts.updates,
                };
                if counts.inserts > 0 {
                    client.batch_execute(&stage.insert).await.map_err(stmt_err("INSERT"))?;
                }
                if let Some((_, restore)) = &identity {
                    client.batch_execute(restore).await.map_err(stmt_err("ALTER COLUMN … SET GENERATED ALWAYS"))?;
                }
                client.batch_execute(stage.empty(conn, staged)).await.map_err(stmt_err("emptying the staging table"))?;
                let missing = counts.updates.saturating_sub(updated) + counts.deletes_counted.saturating_sub(deleted);
                if missing > 0 {
                    metrics.missing_rows.add(missing as u64);
                    tracing::warn!(
                        table,
                        rows = missing,
                        "rows not found on the destination for UPDATE or DELETE; changes counted and skipped"
                    );
                }
                Ok(loaded)
            }
        }
    }
}

/// The statements around a merge of `target` when its UPDATE and upsert
/// set identity columns GENERATED ALWAYS (every column but the key).
pub fn merge_identity_sql(target: &Target) -> Option<(String, String)> {
    let non_key = (0..target.columns.len()).filter(|i| !target.key.contains(i));
    target.identity_always_sql().filter(|_| target.writes_identity_always(non_key))
}

/// A COPY must load every row sent: anything else means the data written
/// is not the data folded, and committing the group's position with it
/// would lose changes.
fn check_copied(target: &Target, sent: u64, loaded: u64) -> Result<u64, ApplyError> {
    if sent != loaded {
        return Err(ApplyError::CopyCount { table: target.display.clone(), sent, loaded });
    }
    Ok(loaded)
}
/// Runs `COPY … FROM STDIN` with `data` (COPY text).
async fn copy_in(client: &Client, sql: &str, data: Bytes) -> Result<u64, tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = client.copy_in::<_, Bytes>(sql).await?;
    let mut sink = std::pin::pin!(sink);
    sink.send(data).await?;
    sink.as_mut().finish().await
}

#[cfg(test)]
mod tests;
