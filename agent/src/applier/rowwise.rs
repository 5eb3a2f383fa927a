//! Row-by-row apply: the changes that are not folded (see `fold`) run as
//! one statement each, in source order, on the main connection, inside the
//! group's transaction — tables without a key (UPDATE and DELETE), tables
//! whose changes must keep source order, every table under the stop policy,
//! and the changes that cannot fold (an update of a row deleted in the same
//! group, a key change moving unchanged TOAST values). TRUNCATE and
//! transactional messages run here too.
//!
//! Statements are prepared once per relation and shape, and pipelined: each
//! is sent at once and its result collected later, up to `pipeline_depth`
//! in flight, so their round trips overlap. A statement's result is checked
//! when collected ([`drain`]): zero rows for an UPDATE or DELETE is a
//! missing row, which the conflict policy stops on or counts. Results still
//! due when the group ends are collected by its commit task, before its
//! merges.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use decant_proto::{Insert, Message, OldTuple, Truncate, Update, Value};
use tokio_postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};
use tokio_postgres::Statement;

use super::cells::slice;
use super::statements::{locator_values, Target};
use super::{statement_error, Applier, ApplyError};
use crate::config::{ConflictPolicy, Operations};
use crate::metrics::Metrics;

/// A value sent as text (or, for bytea, raw binary), whatever the column type:
/// the destination parses it with the type's input function.
#[derive(Debug)]
pub struct Param {
    bytes: Bytes,
    binary: bool,
}

impl ToSql for Param {
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.bytes);
        Ok(IsNull::No)
    }
    fn accepts(_ty: &Type) -> bool {
        true
    }
    fn encode_format(&self, _ty: &Type) -> Format {
        if self.binary {
            Format::Binary
        } else {
            Format::Text
        }
    }
    to_sql_checked!();
}

pub fn params(values: &[Value<'_>], batch: &Bytes) -> Vec<Option<Param>> {
    values
        .iter()
        .map(|v| match v {
            Value::Null | Value::UnchangedToast => None,
            Value::Bytes(raw) => Some(Param { bytes: slice(batch, raw), binary: true }),
            other => other.to_pg_text().map(|t| Param {
                bytes: match t {
                    std::borrow::Cow::Borrowed(b) => slice(batch, b),
                    std::borrow::Cow::Owned(v) => Bytes::from(v),
                },
                binary: false,
            }),
        })
        .collect()
}

/// One statement in flight.
pub struct InFlight {
    pub future: Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send>>,
    pub op: &'static str,
    pub table: String,
    /// Whether zero affected rows means a missing row.
    pub expects_row: bool,
}

/// Collects the results of row-by-row statements in flight until at most
/// `keep` remain.
pub async fn drain(
    pipeline: &mut VecDeque<InFlight>,
    keep: usize,
    on_conflict: ConflictPolicy,
    metrics: &Metrics,
) -> Result<(), ApplyError> {
    while pipeline.len() > keep {
        let Some(item) = pipeline.pop_front() else { break };
        let rows = item.future.await.map_err(|source| ApplyError::Statement { op: item.op, table: item.table.clone(), source })?;
        if rows == 0 && item.expects_row {
            match on_conflict {
                ConflictPolicy::Stop => return Err(ApplyError::MissingRow { op: item.op, table: item.table }),
                ConflictPolicy::Overwrite => {
                    metrics.missing_rows.inc();
                    tracing::warn!(table = %item.table, op = item.op, "row not found on the destination; change counted and skipped");
                }
            }
        }
    }
    Ok(())
}

/// The columns an UPDATE sets: every column the change carries, except
/// unchanged TOAST values and, when the key did not change (no old tuple),
/// the key columns: they stay out of SET (an identity column GENERATED
/// ALWAYS may not be set).
pub fn update_set(target: &Target, u: &Update<'_>) -> Vec<usize> {
    let key_unchanged = u.old.is_none();
    u.new
        .0
        .iter()
        .enumerate()
        .filter(|(i, v)| !(matches!(v, Value::UnchangedToast) || (key_unchanged && target.key.contains(i))))
        .map(|(i, _)| i)
        .collect()
}

/// The new row of an UPDATE with its unchanged TOAST values taken from
/// the old row; `None` when the old row was not logged whole.
pub fn whole_row<'a>(u: &Update<'a>) -> Option<Vec<Value<'a>>> {
    let mut row = u.new.0.clone();
    for (i, v) in row.iter_mut().enumerate() {
        if matches!(v, Value::UnchangedToast) {
            match &u.old {
                Some(OldTuple::Row(old)) => *v = old.0.get(i).copied().filter(|o| !matches!(o, Value::UnchangedToast))?,
                _ => return None,
            }
        }
    }
    Some(row)
}

/// The statements emptying `tables` (qualified names, as a TRUNCATE
/// record names them): TRUNCATE ONLY, except for those `referenced` by a
/// foreign key from a table not among them, which are emptied by DELETE
/// (see [`Applier::truncate`]).
pub fn truncate_sql(tables: &[String], referenced: Vec<bool>, restart_identity: bool) -> String {
    let (deleted, truncated): (Vec<_>, Vec<_>) = tables.iter().zip(referenced).partition(|(_, referenced)| *referenced);
    let mut sql = String::new();
    if !truncated.is_empty() {
        let names: Vec<&str> = truncated.iter().map(|(t, _)| t.as_str()).collect();
        sql = format!("TRUNCATE ONLY {}", names.join(", "));
        if restart_identity {
            sql.push_str(" RESTART IDENTITY");
        }
        sql.push(';');
    }
    for (table, _) in &deleted {
        sql.push_str(&format!("DELETE FROM ONLY {table};"));
    }
    sql
}

impl Applier {
    /// An INSERT, as a statement of its own (what is folded for the table
    /// has been merged).
    pub(super) async fn insert_row(&mut self, target: &Target, i: &Insert<'_>, batch: &Bytes) -> Result<(), ApplyError> {
        // ON CONFLICT cannot take a DEFERRABLE key as its arbiter.
        let upsert = self.settings.on_conflict == ConflictPolicy::Overwrite && !target.key_deferrable;
        let sql = target.insert_sql(upsert);
        let params = params(&i.new.0, batch);
        // An upsert's DO UPDATE sets every column but the key.
        let writes = upsert && target.writes_identity_always((0..target.columns.len()).filter(|i| !target.key.contains(i)));
        self.execute_writing(target, writes, sql, params, "INSERT", false).await
    }

    pub(super) async fn update_row(&mut self, target: &Target, u: &Update<'_>, batch: &Bytes) -> Result<(), ApplyError> {
        if target.projected.is_some() {
            return self.rewrite_row(target, u, batch).await;
        }
        let set = update_set(target, u);
        if set.is_empty() {
            // Only key columns, none changed: nothing to write.
            return Ok(());
        }
        let Some(locator) = locator_values(target, u.old.as_ref(), Some(&u.new)) else {
            return self.no_identity("UPDATE", target);
        };
        let mut p = params(&set.iter().map(|&i| u.new.0[i]).collect::<Vec<_>>(), batch);
        p.extend(params(&locator, batch));
        let writes = target.writes_identity_always(set.iter().copied());
        self.execute_writing(target, writes, target.update_sql(&set), p, "UPDATE", true).await
    }

    /// An UPDATE of a table with a row filter or transforms: the old row
    /// is deleted and the new one inserted when it matches the filter
    /// (see [`super::statements::Projected`]). Unchanged TOAST values come
    /// from the old row (REPLICA IDENTITY FULL).
    async fn rewrite_row(&mut self, target: &Target, u: &Update<'_>, batch: &Bytes) -> Result<(), ApplyError> {
        let Some(locator) = locator_values(target, u.old.as_ref(), Some(&u.new)) else {
            return self.no_identity("UPDATE", target);
        };
        let Some(row) = whole_row(u) else {
            return Err(ApplyError::NeedsOldRow { table: target.display.clone() });
        };
        self.execute(target.oid, target.delete_sql(), params(&locator, batch), "UPDATE", false).await?;
        let upsert = self.settings.on_conflict == ConflictPolicy::Overwrite && !target.key_deferrable;
        let writes = upsert && target.writes_identity_always((0..target.columns.len()).filter(|i| !target.key.contains(i)));
        self.execute_writing(target, writes, target.insert_sql(upsert), params(&row, batch), "UPDATE", false).await
    }

    pub(super) async fn delete_row(&mut self, target: &Target, old: Option<&OldTuple<'_>>, batch: &Bytes) -> Result<(), ApplyError> {
        let Some(locator) = locator_values(target, old, None) else {
            return self.no_identity("DELETE", target);
        };
        // A row the filter kept off the destination is not missing.
        let expects_row = target.projected.as_ref().is_none_or(|p| p.projection.filter.is_none());
        self.execute(target.oid, target.delete_sql(), params(&locator, batch), "DELETE", expects_row).await
    }

    /// A TRUNCATE of the relations the record names that are not being
    /// copied again and whose `applier.operations` allow it; everything
    /// folded is merged first.
    pub(super) async fn truncate(&mut self, t: &Truncate) -> Result<(), ApplyError> {
        let targets: Vec<std::sync::Arc<Target>> = t.relations.iter().map(|oid| self.target(*oid)).collect::<Result<_, _>>()?;
        let mut tables = Vec::with_capacity(targets.len());
        for target in &targets {
            if !self.in_copy(target) && !self.skips(target, Operations::TRUNCATE) {
                tables.push(target.qualified.clone());
            }
        }
        if tables.is_empty() {
            return Ok(());
        }
        self.flush_all_bulk().await?;
        self.open_transaction().await?;
        if let Some(g) = &mut self.group {
            g.exclusive = true;
        }
        self.drain_pipeline(0).await?;
        let err = |source| ApplyError::Statement { op: "TRUNCATE", table: tables.join(", "), source };
        // Exactly the relations the record names, as PostgreSQL's own
        // apply worker does: the source's CASCADE already put every
        // source table it reached into the record, and cascading
        // again here would empty tables that exist only on the
        // destination or are not selected. A table that such a table
        // references by foreign key cannot be truncated without them;
        // it is emptied by DELETE instead, which in replica role
        // checks no foreign key, as for any replicated DELETE.
        let referenced: Vec<bool> = self
            .client
            .query(
                "SELECT EXISTS (SELECT FROM pg_constraint c
                                 WHERE c.contype = 'f' AND c.confrelid = r.oid
                                   AND NOT c.conrelid = ANY ($1::text[]::regclass[]))
                   FROM unnest($1::text[]::regclass[]) WITH ORDINALITY AS r(oid, n) ORDER BY r.n",
                &[&tables],
            )
            .await
            .map_err(err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let sql = truncate_sql(&tables, referenced, t.restart_identity);
        self.client.batch_execute(&sql).await.map_err(err)
    }

    /// A transactional message, emitted again on the destination inside
    /// the group's transaction, after everything before it.
    pub(super) async fn message(&mut self, m: &Message<'_>) -> Result<(), ApplyError> {
        let prefix = String::from_utf8_lossy(m.prefix).into_owned();
        let content = m.content.to_vec();
        self.flush_all_bulk().await?;
        self.open_transaction().await?;
        self.drain_pipeline(0).await?;
        self.client
            .execute("SELECT pg_logical_emit_message(true, $1, $2)", &[&prefix, &content])
            .await
            .map_err(|source| ApplyError::Statement { op: "MESSAGE", table: prefix.clone(), source })?;
        Ok(())
    }

    /// An UPDATE or DELETE that does not say which row: never skipped (the
    /// destination would keep a row the source changed), whatever the
    /// conflict policy. A task refuses such tables at start; this is one
    /// whose identity changed later, or one accepted as insert-only.
    fn no_identity(&mut self, op: &'static str, target: &Target) -> Result<(), ApplyError> {
        Err(ApplyError::NoIdentity { op, table: target.display.clone() })
    }

    async fn statement(&mut self, oid: u32, sql: String, table: &str) -> Result<Statement, ApplyError> {
        let key = (oid, sql);
        if let Some(s) = self.statements.get(&key) {
            return Ok(s.clone());
        }
        let statement = self.client.prepare(&key.1).await.map_err(statement_error("PREPARE", table))?;
        self.statements.insert(key, statement.clone());
        Ok(statement)
    }

    /// Sends a statement now and collects its result later, keeping at most
    /// `pipeline_depth` in flight.
    async fn execute(
        &mut self,
        oid: u32,
        sql: String,
        params: Vec<Option<Param>>,
        op: &'static str,
        expects_row: bool,
    ) -> Result<(), ApplyError> {
        self.open_transaction().await?;
        self.touch(oid);
        let table = self.targets.get(&oid).map(|t| t.display.clone()).unwrap_or_default();
        let statement = self.statement(oid, sql, &table).await?;
        let client = self.client.clone();
        let mut future: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move { client.execute_raw(&statement, params).await });
        // The request is written to the connection on the first poll; poll
        // once now so statements go out in order and overlap their round trips.
        if let Poll::Ready(result) = future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            future = Box::pin(std::future::ready(result));
        }
        self.pipeline.push_back(InFlight { future, op, table, expects_row });
        self.changes_unreported += 1;
        self.drain_pipeline(self.settings.pipeline_depth).await
    }

    /// [`Applier::execute`] for a statement that, when `writes_identity`,
    /// sets identity columns GENERATED ALWAYS: they are made BY DEFAULT
    /// around it, in the group's transaction (see
    /// [`Target::identity_always_sql`]). The statement is prepared while
    /// they are, since preparing checks the columns too.
    async fn execute_writing(
        &mut self,
        target: &Target,
        writes_identity: bool,
        sql: String,
        params: Vec<Option<Param>>,
        op: &'static str,
        expects_row: bool,
    ) -> Result<(), ApplyError> {
        let Some((relax, restore)) = target.identity_always_sql().filter(|_| writes_identity) else {
            return self.execute(target.oid, sql, params, op, expects_row).await;
        };
        self.open_transaction().await?;
        self.drain_pipeline(0).await?;
        let ddl_err = |source| ApplyError::Statement { op: "ALTER COLUMN … SET GENERATED", table: target.display.clone(), source };
        self.client.batch_execute(&relax).await.map_err(ddl_err)?;
        self.execute(target.oid, sql, params, op, expects_row).await?;
        self.drain_pipeline(0).await?;
        self.client.batch_execute(&restore).await.map_err(ddl_err)
    }

    pub(super) async fn drain_pipeline(&mut self, keep: usize) -> Result<(), ApplyError> {
        drain(&mut self.pipeline, keep, self.settings.on_conflict, &self.metrics).await
    }

    /// Notes that the group wrote `oid` on the main connection.
    pub(super) fn touch(&mut self, oid: u32) {
        if let Some(g) = &mut self.group {
            g.touched.insert(oid);
        }
    }
}

#[cfg(test)]
mod tests;
