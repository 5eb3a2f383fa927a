//! Applying decant records to the destination, in source commit order: the
//! orchestration of one stream. A batch is decoded whole (every CRC checked
//! before anything is applied), and each record is dispatched: BEGIN and
//! COMMIT open and close source transactions within a group (see
//! `commit`), RELATION teaches the applier a table (and what its
//! destination decides about applying it), and each change is either folded
//! (see `fold`, merged set-based by `merge`) or applied row by row (see
//! `rowwise`), after what is folded for its table has been merged.

use std::sync::Arc;

use bytes::Bytes;
use decant_proto::{decode, Lsn, Record};

use super::cells::{Cells, Mismatch};
use super::statements::Target;
use super::{statement_error, Applier, ApplyError};
use crate::config::Operations;

impl Applier {
    /// Applies one batch of frames. Every CRC is checked before anything of
    /// the batch is applied.
    pub async fn apply_batch(&mut self, sequence: u64, batch: &Bytes) -> Result<(), ApplyError> {
        let mut records = Vec::new();
        let mut at = 0;
        while at < batch.len() {
            let (record, used) = decode(&batch[at..]).map_err(|mut error| {
                error.offset += at;
                ApplyError::Corrupt { sequence, error }
            })?;
            records.push(record);
            at += used;
        }
        self.metrics.batches.inc();
        self.metrics.batch_bytes.add(batch.len() as u64);
        if tracing::enabled!(tracing::Level::DEBUG) {
            let commits: Vec<Lsn> = records.iter().filter_map(|r| if let Record::Commit(c) = r { Some(c.end_lsn) } else { None }).collect();
            tracing::debug!(sequence, bytes = batch.len(), records = records.len(), commits = commits.len(), first_commit_end = %commits.first().copied().unwrap_or_default(), last_commit_end = %commits.last().copied().unwrap_or_default(), "batch received");
        }
        // Counted up front: a group ends at a COMMIT inside the batch.
        if let Some(g) = &mut self.group {
            g.bytes += batch.len();
        }
        let mut result = Ok(());
        for record in &records {
            result = self.apply_record(record, batch).await;
            if result.is_err() {
                break;
            }
        }
        self.metrics.changes.add(std::mem::take(&mut self.changes_unreported));
        self.metrics.skipped_changes.add(std::mem::take(&mut self.skipped_unreported));
        result
    }

    async fn apply_record(&mut self, record: &Record<'_>, batch: &Bytes) -> Result<(), ApplyError> {
        match record {
            Record::Begin(b) => {
                self.in_source_txn = true;
                self.creating_table = false;
                // Already applied (the stream was resumed from an earlier
                // point than the destination's position).
                self.skipping = self.position.applied(b.final_lsn);
                self.txn_final = b.final_lsn;
                if !self.skipping {
                    self.ensure_group();
                }
            }
            Record::Commit(c) => {
                self.in_source_txn = false;
                if self.skipping {
                    self.skipping = false;
                    return Ok(());
                }
                if let Some(g) = &mut self.group {
                    g.source_commit(c.end_lsn, c.commit_time);
                }
                self.metrics.source_commit_time.set(c.commit_time);
                // Checked at every COMMIT: a batch of packed messages
                // rarely ends at one.
                if self.group_is_full() {
                    self.commit_group().await?;
                }
            }
            Record::Relation(r) => {
                self.flush_bulk(r.oid).await?;
                let mut target = Target::from_relation(r, &self.settings.mapping);
                target.operations = self.settings.operations.for_table(r.namespace, r.name);
                self.create_missing_table(r, &target).await?;
                self.learn_destination(&mut target).await?;
                self.statements.retain(|(oid, _), _| *oid != r.oid);
                self.stages.remove(&r.oid);
                self.stages_created.remove(&r.oid);
                self.targets.insert(r.oid, Arc::new(target));
            }
            Record::Insert(i) if !self.skipping => {
                let target = self.target(i.relation)?;
                if self.in_copy(&target) || self.skips(&target, Operations::INSERT) {
                    return Ok(());
                }
                let attempt = self.folding.fold_insert(&target, &i.new, batch, &mut self.scratch);
                if self.folded(&target, attempt).await? {
                    return Ok(());
                }
                self.flush_bulk(target.oid).await?;
                self.insert_row(&target, i, batch).await?;
            }
            Record::Update(u) if !self.skipping => {
                let target = self.target(u.relation)?;
                if self.in_copy(&target) || self.skips(&target, Operations::UPDATE) {
                    return Ok(());
                }
                let attempt = self.folding.fold_update(&target, u, batch, &mut self.scratch);
                if self.folded(&target, attempt).await? {
                    return Ok(());
                }
                self.flush_bulk(target.oid).await?;
                self.update_row(&target, u, batch).await?;
            }
            Record::Delete(d) if !self.skipping => {
                let target = self.target(d.relation)?;
                if self.in_copy(&target) || self.skips(&target, Operations::DELETE) {
                    return Ok(());
                }
                let attempt = self.folding.fold_delete(&target, d.old.as_ref(), batch, &mut self.scratch);
                if self.folded(&target, attempt).await? {
                    return Ok(());
                }
                self.flush_bulk(target.oid).await?;
                self.delete_row(&target, d.old.as_ref(), batch).await?;
            }
            Record::Truncate(t) if !self.skipping && self.settings.apply_truncate => self.truncate(t).await?,
            Record::Message(m) if !self.skipping && m.transactional && m.prefix == crate::ddl::MESSAGE_PREFIX => self.ddl(m).await?,
            Record::Message(m)
                if !self.skipping && m.transactional && self.settings.apply_messages && !m.prefix.starts_with(b"decant.") =>
            {
                self.message(m).await?
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether `applier.operations` skips the change `op` of `target`: it
    /// is then applied nowhere (neither folded nor row by row), counted,
    /// and logged once per table and operation. The source transaction
    /// still commits in its group, so the position advances past it.
    #[inline]
    pub(super) fn skips(&mut self, target: &Target, op: Operations) -> bool {
        if target.operations.contains(op) {
            return false;
        }
        self.skipped_unreported += 1;
        self.log_skip(target, op);
        true
    }

    #[cold]
    fn log_skip(&mut self, target: &Target, op: Operations) {
        if self.skipped_logged.insert((target.oid, op)) {
            tracing::info!(
                table = %target.display,
                operation = %op.names(),
                applied = %target.operations.names(),
                "applier.operations does not apply this operation to the table: its changes are skipped (counted in decant_skipped_changes_total)"
            );
        }
    }

    /// After an attempt to fold a change. Folded (true): merge when the
    /// folded changes grew large. Not folded (false): the change is applied
    /// row by row, the table's values switched to text first if one did not
    /// fit its binary form.
    async fn folded(&mut self, target: &Target, attempt: Result<bool, Mismatch>) -> Result<bool, ApplyError> {
        match attempt {
            Ok(true) => {
                self.changes_unreported += 1;
                if self.folding.is_large() {
                    self.flush_all_bulk().await?;
                }
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(Mismatch) => {
                self.cells_to_text(target).await?;
                Ok(false)
            }
        }
    }

    /// Learns what the destination table decides about applying its
    /// changes: how its values go into COPY data (binary when each column
    /// has the same built-in type on the destination as on the source and
    /// decant writes that type in binary, see [`Cells`], else text), its
    /// identity columns GENERATED ALWAYS, and whether its changes must keep
    /// source order (see [`Target::source_order`]).
    pub(super) async fn learn_destination(&mut self, target: &mut Target) -> Result<(), ApplyError> {
        // The client is the commit task's until settled.
        self.settle().await?;
        let names: Vec<&str> = target.columns.iter().map(String::as_str).collect();
        let key: Vec<&str> = target.key.iter().map(|&i| target.columns[i].as_str()).collect();
        let rows = self
            .client
            .query(
                "SELECT a.atttypid, a.attidentity = 'a', format_type(a.atttypid, a.atttypmod)
                   FROM unnest($2::text[]) WITH ORDINALITY AS c(name, n)
                   LEFT JOIN pg_attribute a ON a.attrelid = to_regclass($1) AND a.attname = c.name AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY c.n",
                &[&target.qualified, &names],
            )
            .await
            .map_err(statement_error("reading column types", &target.display))?;
        let destination: Vec<Option<u32>> = rows.iter().map(|r| r.get(0)).collect();
        target.cells = Cells::for_columns(&target.type_oids, &destination);
        target.identity_always =
            rows.iter().enumerate().filter(|(_, r)| r.get::<_, Option<bool>>(1) == Some(true)).map(|(i, _)| i).collect();
        if let Some(p) = &target.projected {
            let transformed = |i: usize| p.projection.values[i] != crate::connect::sql::quote_ident(&p.source_columns[i]);
            let refuse = |reason: String| Err(ApplyError::Mapping { table: target.display.clone(), reason });
            if target.key.is_empty() && p.projection.transformed {
                return refuse(
                    "a table without a key whose values are transformed (set): the stream could not find its rows on the destination"
                        .into(),
                );
            }
            if let Some(&k) = target.key.iter().find(|&&k| transformed(k)) {
                return refuse(format!(
                    "set transforms key column {}: the stream finds rows by the source's key values",
                    p.source_columns[k]
                ));
            }
            let types = rows.iter().map(|r| r.get::<_, Option<String>>(2).unwrap_or_else(|| "text".into())).collect();
            target.projected = Some(std::sync::Arc::new(super::statements::Projected { types, ..(**p).clone() }));
        }
        // Unique indexes and exclusion constraints checked row by row
        // (not DEFERRABLE: those are checked at the statement's end, when a
        // merge has written every row), except unique indexes over every key
        // column, which the key already keeps unique.
        // A DEFERRABLE key cannot be the arbiter of the merges' and
        // upserts' ON CONFLICT: such a table goes row by row, inserting
        // plainly (exactly-once apply never inserts a row twice).
        let row = self
            .client
            .query_one(
                "SELECT EXISTS (
                    SELECT FROM pg_index i
                     WHERE i.indrelid = to_regclass($1) AND (i.indisunique OR i.indisexclusion) AND i.indimmediate
                       AND (i.indisexclusion OR cardinality($2::text[]) = 0 OR NOT $2::text[] <@ ARRAY(
                             SELECT a.attname::text FROM pg_attribute a
                              WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[]) AND a.attnum > 0))),
                        EXISTS (
                    SELECT FROM pg_index i
                     WHERE i.indrelid = to_regclass($1) AND i.indisunique AND NOT i.indimmediate AND cardinality($2::text[]) > 0
                       AND $2::text[] @> ARRAY(
                             SELECT a.attname::text FROM pg_attribute a
                              WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey::int2[]) AND a.attnum > 0))",
                &[&target.qualified, &key],
            )
            .await
            .map_err(statement_error("reading unique indexes", &target.display))?;
        target.key_deferrable = row.get(1);
        target.source_order = row.get::<_, bool>(0) || target.key_deferrable;
        Ok(())
    }

    /// A value did not fit its column's binary form (the source sent
    /// another kind than its type has): what is folded for the table is
    /// merged, and its values are written as text from now on.
    async fn cells_to_text(&mut self, target: &Target) -> Result<(), ApplyError> {
        self.flush_bulk(target.oid).await?;
        tracing::info!(table = %target.display, "a value does not fit its column's binary COPY form; the table's changes are copied as text");
        let text = Target { cells: Cells::Text, ..target.clone() };
        self.targets.insert(target.oid, Arc::new(text));
        Ok(())
    }

    /// The change is already in a re-copied table's snapshot.
    pub(super) fn in_copy(&self, target: &Target) -> bool {
        self.position.in_copy(&target.qualified, self.txn_final)
    }

    pub(super) fn target(&self, oid: u32) -> Result<Arc<Target>, ApplyError> {
        self.targets.get(&oid).cloned().ok_or(ApplyError::UnknownRelation(oid))
    }
}
