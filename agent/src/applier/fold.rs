//! Folding: the changes a group makes to a table with a key, reduced per key
//! to their net effect (the row's final image, or its deletion), and the
//! INSERTs into a table without a key, gathered as COPY data. What is
//! folded is written by the set-based merge (see `merge` and `stage`); a
//! change that cannot fold is applied row by row (see `rowwise`), after what
//! is folded for its table has been merged, so the table's changes still
//! reach the destination in source order.
//!
//! Folding preserves the result of applying the changes one by one in order:
//! rows are independent of each other once the key is known (foreign keys
//! and triggers are off under session_replication_role = replica).
//!
//! Everything here is pure (no destination connection): which tables fold,
//! what a change leaves of its key, and how much memory the folded changes
//! hold (which decides when they are merged, see `commit`) are unit tested
//! below.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use bytes::{Bytes, BytesMut};

use decant_proto::{OldTuple, Tuple, Update, Value};

use super::cells::{cell, escape, BinaryRow, Cell, Cells, Mismatch, BINARY_HEADER, BINARY_TRAILER};
use super::statements::{locator_values, Target};
use super::OidMap;
use crate::config::ConflictPolicy;

/// A group ends at the first COMMIT after its folded changes reach this
/// much memory: they are merged while the next group is folded. Larger
/// groups fold more and merge fewer times (8 → 16 MB took the backlog's
/// destination CPU from 2.9 to 2.4 s); 13 MB keeps the applier's peak RSS
/// with a large transaction under 150 MB (see BULK_FLUSH_BYTES; with the
/// system allocator and 14 MB it reached 146–147 MB; with jemalloc, 13 MB
/// measured 117–123 MB and 20 MB 150.4 MB).
pub const GROUP_FOLDED_BYTES: usize = 13 << 20;
/// The first group of a stream ends at this much folded memory, and each
/// next one at twice its predecessor's bound, up to GROUP_FOLDED_BYTES:
/// with a backlog waiting, the destination starts merging after a few
/// thousand transactions instead of idling while the first full group is
/// folded (a third of a second of the benchmark's drain).
pub const FIRST_GROUP_FOLDED_BYTES: usize = 512 << 10;
/// Folded changes are merged at once, inside a source transaction, when they
/// reach this much memory (a large transaction). Above GROUP_FOLDED_BYTES,
/// so that a group of small transactions ends at a COMMIT first: that merge
/// runs while the next group is folded, this one does not.
pub const BULK_FLUSH_BYTES: usize = GROUP_FOLDED_BYTES + (2 << 20);

/// A folded value; `None` is NULL.
pub type Text = Option<Cell>;

/// What the folded changes leave of one key.
#[derive(Debug)]
pub enum Net {
    /// The row ends deleted. `counted`: the first change seen for the key
    /// expected the row to exist (so zero rows deleted means it was missing).
    Deleted { counted: bool },
    /// The row ends with these values. `unchanged[i]`: column i keeps the
    /// destination's value (an untouched TOASTed value); empty when none does. `inserted`: the
    /// first change was an INSERT (so the row is written whether or not it
    /// exists); otherwise the row must already exist.
    Row { values: Vec<Text>, unchanged: Vec<bool>, inserted: bool },
}

/// A change this module cannot fold; the caller applies it row by row,
/// after flushing what is buffered for the table.
#[derive(Debug)]
pub struct NotFoldable;

/// The net changes of one table, per key.
pub type NetRows = HashMap<Vec<Text>, Net, foldhash::fast::RandomState>;

#[derive(Default)]
pub struct Buffer {
    /// Keys come from the source's rows: a seeded fast hash (SipHash took
    /// a tenth of the applier's time while folding a backlog).
    rows: NetRows,
    pub bytes: usize,
}

/// A later image of a row takes the columns it left untouched (unchanged
/// TOAST) from the earlier image, or keeps them untouched too.
fn carry_unchanged(values: &mut [Text], unchanged: &mut [bool], earlier: &[Text], earlier_unchanged: &[bool]) {
    for i in 0..unchanged.len() {
        if unchanged[i] {
            values[i] = earlier.get(i).cloned().flatten();
            unchanged[i] = earlier_unchanged.get(i).copied().unwrap_or(false);
        }
    }
}

fn size(values: &[Text]) -> usize {
    values.iter().map(|v| v.as_ref().map_or(1, |b| b.len() + 8)).sum::<usize>() + 64
}

impl Buffer {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// An empty buffer with room for `rows` keys: a table's previous group
    /// tells how many to expect, which spares the map's rehashing as it
    /// grows (a tenth of the applier's time while folding a backlog).
    pub fn with_capacity(rows: usize) -> Buffer {
        Buffer { rows: HashMap::with_capacity_and_hasher(rows, Default::default()), bytes: 0 }
    }

    /// The net rows, for the staging table (see `stage::staging_data`).
    pub fn into_rows(self) -> NetRows {
        self.rows
    }

    pub fn insert(&mut self, key: Vec<Text>, values: Vec<Text>) {
        self.bytes += size(&values);
        self.rows.insert(key, Net::Row { values, unchanged: Vec::new(), inserted: true });
    }

    /// An UPDATE: `old_key` is given when the key changed.
    pub fn update(
        &mut self,
        old_key: Option<Vec<Text>>,
        key: Vec<Text>,
        mut values: Vec<Text>,
        mut unchanged: Vec<bool>,
    ) -> Result<(), NotFoldable> {
        let Some(old) = old_key else {
            // The common case: one lookup of the key.
            let added = size(&values);
            match self.rows.entry(key) {
                Entry::Occupied(mut e) => match e.get_mut() {
                    // After a delete: the row-by-row apply would find no row.
                    Net::Deleted { .. } => return Err(NotFoldable),
                    Net::Row { values: pv, unchanged: pu, .. } => {
                        carry_unchanged(&mut values, &mut unchanged, pv, pu);
                        *pv = values;
                        *pu = unchanged;
                    }
                },
                Entry::Vacant(e) => {
                    e.insert(Net::Row { values, unchanged, inserted: false });
                }
            }
            self.bytes += added;
            return Ok(());
        };
        // The old key's deletion is counted unless the row was inserted in
        // these changes.
        let counted = match self.rows.get(&old) {
            Some(Net::Deleted { .. }) => return Err(NotFoldable),
            Some(Net::Row { values: pv, unchanged: pu, inserted }) => {
                carry_unchanged(&mut values, &mut unchanged, pv, pu);
                !*inserted
            }
            None => true,
        };
        // A key change moving a row whose untouched values are only on
        // the destination cannot be expressed as a delete plus an insert.
        if unchanged.iter().any(|&u| u) {
            return Err(NotFoldable);
        }
        self.rows.insert(old, Net::Deleted { counted });
        self.bytes += 64;
        self.bytes += size(&values);
        self.rows.insert(key, Net::Row { values, unchanged, inserted: true });
        Ok(())
    }

    pub fn delete(&mut self, key: Vec<Text>) {
        self.bytes += 64;
        match self.rows.entry(key) {
            Entry::Occupied(mut e) => {
                let counted = !matches!(e.get(), Net::Row { inserted: true, .. } | Net::Deleted { counted: false });
                e.insert(Net::Deleted { counted });
            }
            Entry::Vacant(e) => {
                e.insert(Net::Deleted { counted: true });
            }
        }
    }
}

/// INSERTs into a table without a key, as COPY data in the table's cells,
/// until the next other change of that table.
#[derive(Default)]
pub struct Appends {
    data: BytesMut,
    /// Rows in `data`: what the COPY must report loading.
    pub rows: u64,
}

impl Appends {
    /// Appends one row; a value that does not fit its binary column
    /// leaves the data as it was.
    pub fn push(&mut self, cells: &Cells, values: &[Value<'_>], scratch: &mut BytesMut) -> Result<(), Mismatch> {
        append_row(&mut self.data, cells, values, scratch)?;
        self.rows += 1;
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// The complete COPY data.
    pub fn finish(mut self, cells: &Cells) -> Bytes {
        finish_appends(&mut self.data, cells);
        self.data.freeze()
    }
}

/// One row of COPY data for a plain INSERT, written straight from the
/// record's values in the table's cells (binary data starts with its
/// header; [`finish_appends`] ends it). A value that does not fit its
/// binary column leaves `out` as it was.
fn append_row(out: &mut BytesMut, cells: &Cells, values: &[Value<'_>], scratch: &mut BytesMut) -> Result<(), Mismatch> {
    if !cells.is_binary() {
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b"\t");
            }
            match v {
                Value::Text(b) => escape(out, b),
                other => {
                    scratch.clear();
                    if other.write_pg_text(scratch) {
                        escape(out, scratch);
                    } else {
                        out.extend_from_slice(b"\\N");
                    }
                    scratch.clear();
                }
            }
        }
        out.extend_from_slice(b"\n");
        return Ok(());
    }
    if out.is_empty() {
        out.extend_from_slice(BINARY_HEADER);
    }
    let row_start = out.len();
    BinaryRow::start(out, values.len());
    for (i, v) in values.iter().enumerate() {
        if let Err(e) = BinaryRow::field_with(out, |o| cells.write(i, v, o)) {
            out.truncate(row_start);
            return Err(e);
        }
    }
    Ok(())
}

/// The end of appended rows' COPY data.
fn finish_appends(out: &mut BytesMut, cells: &Cells) {
    if cells.is_binary() {
        out.extend_from_slice(BINARY_TRAILER);
    }
}

/// Whether changes of `target` are folded for set-based apply: tables
/// with a key, under the overwrite policy (the stop policy applies row by
/// row so that the first offending row is the one reported), unless the
/// destination table needs its changes in source order or has a row
/// filter or transforms (see [`super::statements::Projected`]).
pub fn folds(target: &Target, on_conflict: ConflictPolicy) -> bool {
    !target.key.is_empty() && on_conflict == ConflictPolicy::Overwrite && !target.source_order && target.projected.is_none()
}

/// The changes of the open group (or of the stretch of it since a table's
/// last mid-group merge) that are folded, per table, and the memory they
/// hold.
///
/// Each `fold_*` method takes one change and returns `Ok(true)` when it was
/// folded, `Ok(false)` when it must be applied row by row, and
/// `Err(Mismatch)` when a value does not fit its column's binary form (the
/// caller then switches the table to text and applies the change row by
/// row).
pub struct Folding {
    on_conflict: ConflictPolicy,
    /// Changes folded per table for set-based apply (tables with a key).
    bulk: OidMap<Buffer>,
    /// Keys each table's buffer held when last merged.
    bulk_rows: OidMap<usize>,
    /// INSERTs into tables without a key, as COPY text, until the next
    /// other change of that table.
    appends: OidMap<Appends>,
    /// Memory held by the folded changes in `bulk` and `appends`.
    bytes: usize,
}

impl Folding {
    pub fn new(on_conflict: ConflictPolicy) -> Folding {
        Folding { on_conflict, bulk: OidMap::default(), bulk_rows: OidMap::default(), appends: OidMap::default(), bytes: 0 }
    }

    /// Memory held by the folded changes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The folded changes grew large (a large source transaction): merge
    /// them now, inside the transaction (see [`BULK_FLUSH_BYTES`]).
    pub fn is_large(&self) -> bool {
        self.bytes >= BULK_FLUSH_BYTES
    }

    pub fn folds(&self, target: &Target) -> bool {
        folds(target, self.on_conflict)
    }

    /// An INSERT: folded under its key, or, for a table without a key
    /// (whatever the policy), appended to its COPY data.
    pub fn fold_insert(&mut self, target: &Target, new: &Tuple<'_>, batch: &Bytes, scratch: &mut BytesMut) -> Result<bool, Mismatch> {
        if self.folds(target) {
            let (values, _) = row_cells(target, &new.0, batch, scratch)?;
            let Some(key) = key_of(target, &values) else { return Ok(false) };
            self.fold(target.oid, |b| b.insert(key, values));
            Ok(true)
        } else if target.key.is_empty() {
            // No key: nothing to fold, but inserts can be copied in.
            let appends = self.appends.entry(target.oid).or_default();
            let before = appends.bytes();
            let pushed = appends.push(&target.cells, &new.0, scratch);
            // Counted even when the row did not fit: a first binary row
            // leaves the COPY header behind, which `take` subtracts too.
            self.bytes += appends.bytes() - before;
            pushed.map(|()| true)
        } else {
            Ok(false)
        }
    }

    pub fn fold_update(&mut self, target: &Target, u: &Update<'_>, batch: &Bytes, scratch: &mut BytesMut) -> Result<bool, Mismatch> {
        if !self.folds(target) {
            return Ok(false);
        }
        let (values, unchanged) = row_cells(target, &u.new.0, batch, scratch)?;
        let new_key = key_of(target, &values);
        // Without an old tuple the key did not change.
        let old_key = match &u.old {
            None => new_key.clone(),
            old => match locator_values(target, old.as_ref(), Some(&u.new)) {
                Some(v) => key_cells(target, &v, batch, scratch)?,
                None => None,
            },
        };
        let (Some(key), Some(old)) = (new_key, old_key) else { return Ok(false) };
        let moved = (old != key).then_some(old);
        Ok(self.fold(target.oid, |b| b.update(moved, key, values, unchanged)).is_ok())
    }

    pub fn fold_delete(
        &mut self,
        target: &Target,
        old: Option<&OldTuple<'_>>,
        batch: &Bytes,
        scratch: &mut BytesMut,
    ) -> Result<bool, Mismatch> {
        if !self.folds(target) {
            return Ok(false);
        }
        let Some(v) = locator_values(target, old, None) else { return Ok(false) };
        let Some(key) = key_cells(target, &v, batch, scratch)? else { return Ok(false) };
        self.fold(target.oid, |b| b.delete(key));
        Ok(true)
    }

    /// Folds one change of table `oid` into its buffer (made with room for
    /// as many keys as its previous group had) and counts the memory it adds.
    fn fold<R>(&mut self, oid: u32, change: impl FnOnce(&mut Buffer) -> R) -> R {
        let rows = &self.bulk_rows;
        let buffer = self.bulk.entry(oid).or_insert_with(|| Buffer::with_capacity(rows.get(&oid).copied().unwrap_or(0)));
        let before = buffer.bytes;
        let result = change(buffer);
        self.bytes += buffer.bytes - before;
        result
    }

    /// Tables with anything folded (possibly an empty buffer).
    pub fn tables(&self) -> Vec<u32> {
        self.bulk.keys().chain(self.appends.keys()).copied().collect()
    }

    /// Tables whose folded changes are merged through a staging table.
    pub fn staged_tables(&self) -> Vec<u32> {
        self.bulk.iter().filter(|(_, b)| !b.is_empty()).map(|(oid, _)| *oid).collect()
    }

    /// Takes what is folded for `oid`, to be merged now (in the middle of a
    /// group); an empty buffer is dropped.
    pub fn take(&mut self, oid: u32) -> (Option<Appends>, Option<Buffer>) {
        let appends = self.appends.remove(&oid);
        let buffer = self.bulk.remove(&oid);
        self.bytes -= appends.as_ref().map_or(0, Appends::bytes) + buffer.as_ref().map_or(0, |b| b.bytes);
        (appends, buffer.filter(|b| !b.is_empty()))
    }

    /// Takes everything folded, for the group's commit.
    pub fn take_all(&mut self) -> (OidMap<Appends>, OidMap<Buffer>) {
        self.bytes = 0;
        (std::mem::take(&mut self.appends), std::mem::take(&mut self.bulk))
    }

    /// Notes how many keys `oid`'s buffer held when merged (the capacity of
    /// its next buffer).
    pub fn merged(&mut self, oid: u32, rows: usize) {
        self.bulk_rows.insert(oid, rows);
    }

    /// Drops everything folded (the group is rolled back).
    pub fn clear(&mut self) {
        self.bulk.clear();
        self.appends.clear();
        self.bytes = 0;
    }
}

/// A tuple's cells in the table's encoding, and which values are
/// unchanged TOAST (empty when none is).
fn row_cells(target: &Target, values: &[Value<'_>], batch: &Bytes, scratch: &mut BytesMut) -> Result<(Vec<Text>, Vec<bool>), Mismatch> {
    let unchanged = if values.iter().any(|v| matches!(v, Value::UnchangedToast)) {
        values.iter().map(|v| matches!(v, Value::UnchangedToast)).collect()
    } else {
        Vec::new()
    };
    let cells = values.iter().enumerate().map(|(i, v)| cell(&target.cells, i, v, batch, scratch)).collect::<Result<_, _>>()?;
    Ok((cells, unchanged))
}

/// The cells of the key columns' `values` (in key order), or `None` if
/// one is NULL or unchanged (then it cannot serve as a key).
fn key_cells(target: &Target, values: &[Value<'_>], batch: &Bytes, scratch: &mut BytesMut) -> Result<Option<Vec<Text>>, Mismatch> {
    let mut key = Vec::with_capacity(values.len());
    for (&column, v) in target.key.iter().zip(values) {
        match cell(&target.cells, column, v, batch, scratch)? {
            Some(c) => key.push(Some(c)),
            None => return Ok(None),
        }
    }
    Ok(Some(key))
}

/// The key columns of a row's texts; `None` if one is NULL or unchanged.
fn key_of(target: &Target, values: &[Text]) -> Option<Vec<Text>> {
    target.key.iter().map(|&i| values.get(i).cloned().flatten().map(Some)).collect()
}

#[cfg(test)]
mod tests;
