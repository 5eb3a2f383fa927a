//! Set-based apply for tables with a key: the changes of a stretch of the
//! stream are folded per key into their net effect (the row's final image,
//! or its deletion), copied into a temporary staging table with COPY, and
//! merged into the table with three statements. One round of executor work
//! per table instead of one per row, which is what lets the applier drain a
//! backlog faster than a row-by-row apply worker.
//!
//! Folding preserves the result of applying the changes one by one in order:
//! rows are independent of each other once the key is known (foreign keys
//! and triggers are off under session_replication_role = replica).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};

use decant_proto::Value;

use super::cells::{BinaryRow, Cell, Cells, Mismatch, BINARY_COPY_OPTIONS, BINARY_HEADER, BINARY_TRAILER};
use super::statements::Target;
use crate::connect::sql::quote_ident;

/// A folded value; `None` is NULL.
pub type Text = Option<Cell>;

/// What the folded changes leave of one key.
#[derive(Debug)]
enum Net {
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

#[derive(Default)]
pub struct Buffer {
    /// Keys come from the source's rows: a seeded fast hash (SipHash took
    /// a tenth of the applier's time while folding a backlog).
    rows: HashMap<Vec<Text>, Net, foldhash::fast::RandomState>,
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

    /// The staging table's rows as COPY data (in the target's cells), in
    /// `parts` parts (for merges on as many connections; every key in
    /// exactly one), with how many rows of each operation a part holds.
    /// Parts are ranges of keys in byte order, which for the usual keys
    /// (integers, uuids, text) is, or is close to, the order of the table's
    /// key index: each connection then works on pages of its own, where
    /// halves of interleaved keys made the two merges meet on every page
    /// (8% more destination CPU for pgbench_accounts than ranges). Each row
    /// is freed once written, so the folded rows and their COPY data are
    /// not both held whole (the applier's peak memory).
    pub fn into_copy_data(self, target: &Target, parts: usize) -> Vec<(BytesMut, Counts)> {
        let parts = parts.max(1);
        let ncols = target.columns.len();
        let binary = target.cells.is_binary();
        let mut outs: Vec<(BytesMut, Counts)> = (0..parts)
            .map(|_| {
                let mut out = BytesMut::with_capacity(self.bytes / parts + 1024);
                if binary {
                    out.extend_from_slice(BINARY_HEADER);
                }
                (out, Counts::default())
            })
            .collect();
        let rows = self.rows.len();
        let in_parts: Box<dyn Iterator<Item = (Vec<Text>, Net)>> = if parts == 1 {
            Box::new(self.rows.into_iter())
        } else {
            // Partitioned, not sorted: linear time.
            let mut in_order: Vec<_> = self.rows.into_iter().collect();
            let mut start = 0;
            for p in 1..parts {
                let end = rows * p / parts;
                if end > start && end < rows {
                    in_order[start..].select_nth_unstable_by(end - start, |a, b| a.0.cmp(&b.0));
                }
                start = end;
            }
            Box::new(in_order.into_iter())
        };
        for (n, (key, net)) in in_parts.enumerate() {
            let (out, counts) = &mut outs[n * parts / rows];
            let mut deleted: Vec<&Text> = Vec::new();
            let (values, op, unchanged): (&mut dyn Iterator<Item = &Text>, u8, &[bool]) = match &net {
                Net::Deleted { counted } => {
                    counts.deletes += 1;
                    counts.deletes_counted += usize::from(*counted);
                    deleted.resize(ncols, &None);
                    for (n, &i) in target.key.iter().enumerate() {
                        deleted[i] = &key[n];
                    }
                    (&mut deleted.iter().copied(), if *counted { b'D' } else { b'd' }, &[])
                }
                Net::Row { values, unchanged, inserted } => {
                    if *inserted {
                        counts.inserts += 1;
                    } else {
                        counts.updates += 1;
                    }
                    counts.keeps_values |= unchanged.contains(&true);
                    (&mut values.iter(), if *inserted { b'i' } else { b'u' }, unchanged)
                }
            };
            if binary {
                write_binary_row(out, ncols, values, op, unchanged);
            } else {
                write_row(out, values, op, unchanged);
            }
        }
        if binary {
            for (out, _) in &mut outs {
                out.extend_from_slice(BINARY_TRAILER);
            }
        }
        outs
    }
}

#[derive(Debug, Default)]
pub struct Counts {
    pub deletes: usize,
    /// Deletions that expected the row to exist.
    pub deletes_counted: usize,
    pub updates: usize,
    pub inserts: usize,
    /// Some row keeps a destination value (an untouched TOASTed column).
    pub keeps_values: bool,
}

impl Counts {
    /// Staging rows: one per key.
    pub fn rows(&self) -> u64 {
        (self.deletes + self.updates + self.inserts) as u64
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

/// One line of COPY text: the columns, the operation, and the 1-based
/// indexes of the columns to keep (those marked in `unchanged`; NULL when
/// none is, which spares the destination parsing an empty array per row).
fn write_row(out: &mut BytesMut, values: &mut dyn Iterator<Item = &Text>, op: u8, unchanged: &[bool]) {
    for v in values {
        match v {
            None => out.extend_from_slice(b"\\N"),
            Some(b) => escape(out, b),
        }
        out.extend_from_slice(b"\t");
    }
    out.extend_from_slice(&[op, b'\t']);
    if !unchanged.contains(&true) {
        out.extend_from_slice(b"\\N\n");
        return;
    }
    out.extend_from_slice(b"{");
    let mut first = true;
    for (i, _) in unchanged.iter().enumerate().filter(|(_, &u)| u) {
        if !first {
            out.extend_from_slice(b",");
        }
        first = false;
        out.extend_from_slice(itoa::Buffer::new().format(i + 1).as_bytes());
    }
    out.extend_from_slice(b"}\n");
}

/// The same row in binary COPY: the columns' binary cells, the operation as
/// "char", the kept columns as int2[] (NULL when none).
fn write_binary_row(out: &mut BytesMut, ncols: usize, values: &mut dyn Iterator<Item = &Text>, op: u8, unchanged: &[bool]) {
    BinaryRow::start(out, ncols + 2);
    for v in values {
        BinaryRow::field(out, v.as_deref());
    }
    BinaryRow::field(out, Some(&[op]));
    let kept = unchanged.iter().enumerate().filter(|(_, &u)| u).map(|(i, _)| (i + 1) as i16);
    BinaryRow::int2_array(out, kept.collect::<Vec<_>>().into_iter());
}

/// COPY text escaping: backslash, and the characters that delimit.
fn escape(out: &mut BytesMut, b: &[u8]) {
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&b[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&b[start..]);
}

/// The SQL around one table's staging table.
pub struct StageSql {
    /// The staging table's name, quoted.
    pub stage: String,
    pub create: String,
    /// COPY into the staging table: text, binary.
    copy: [String; 2],
    pub delete: String,
    /// UPDATE from the staged rows that keep destination values where marked
    /// (`None`: the table has only key columns).
    pub update_keeping: Option<String>,
    /// UPDATE when no staged row keeps a value: no per-column test.
    pub update: Option<String>,
    pub insert: String,
    /// Empties the staging table after a merge: `DELETE` while it is small,
    /// `TRUNCATE` once enough dead rows piled up (see [`StageSql::empty`]).
    delete_all: String,
    truncate: String,
    /// COPY bytes staged since the table was last truncated (or created),
    /// on each connection (each has its own temporary table).
    staged_since_truncate: [AtomicUsize; 2],
    /// The table's merges may run on two connections at once, half the keys
    /// each: its only unique index is the key, of types whose values are
    /// equal exactly when their text is (not numeric's `1.0` and `1.00`, nor
    /// a nondeterministic collation: two such keys could fall in different
    /// halves and meet in the index), and no trigger fires for replicated
    /// rows (nothing else could make one half wait for the other).
    pub splittable: bool,
}

impl StageSql {
    /// `has_rules`: the table has INSERT or UPDATE rules, which rule out
    /// INSERT … ON CONFLICT; existing keys are then updated first and only
    /// missing ones inserted (the applier is the table's only writer).
    pub fn new(target: &Target, generation: u64, has_rules: bool, splittable: bool) -> StageSql {
        let stage = quote_ident(&format!("decant_stage_{}_{generation}", target.oid));
        let cols: Vec<String> = target.columns.iter().map(|c| quote_ident(c)).collect();
        let list = cols.join(", ");
        let key_match: Vec<String> = target.key.iter().map(|&i| format!("t.{c} = s.{c}", c = cols[i])).collect();
        let key_match = key_match.join(" AND ");
        // Staged rows are merged in key order: the index descents and heap
        // pages of consecutive rows are then near each other (measured on
        // pgbench_accounts: the UPDATE of 17,000 rows took 13% less time).
        let key_cols: Vec<String> = target.key.iter().map(|&i| cols[i].clone()).collect();
        let order = key_cols.join(", ");
        let updates = format!("(SELECT * FROM {stage} WHERE decant_op = 'u' ORDER BY {order}) s");
        let non_key: Vec<usize> = (0..cols.len()).filter(|i| !target.key.contains(i)).collect();
        let update_keeping = (!non_key.is_empty()).then(|| {
            let set: Vec<String> = non_key
                .iter()
                .map(|&i| format!("{c} = CASE WHEN {n} = ANY (s.decant_keep) THEN t.{c} ELSE s.{c} END", c = cols[i], n = i + 1))
                .collect();
            format!("UPDATE {} t SET {} FROM {updates} WHERE {key_match}", target.qualified, set.join(", "))
        });
        let update = (!non_key.is_empty()).then(|| {
            let set: Vec<String> = non_key.iter().map(|&i| format!("{c} = s.{c}", c = cols[i])).collect();
            format!("UPDATE {} t SET {} FROM {updates} WHERE {key_match}", target.qualified, set.join(", "))
        });
        let on_conflict = if non_key.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            let set: Vec<String> = non_key.iter().map(|&i| format!("{c} = EXCLUDED.{c}", c = cols[i])).collect();
            format!("DO UPDATE SET {}", set.join(", "))
        };
        let insert = if has_rules {
            let mut sql = String::new();
            if !non_key.is_empty() {
                let set: Vec<String> = non_key.iter().map(|&i| format!("{c} = s.{c}", c = cols[i])).collect();
                sql = format!(
                    "UPDATE {} t SET {} FROM (SELECT * FROM {stage} WHERE decant_op = 'i' ORDER BY {order}) s WHERE {key_match}; ",
                    target.qualified,
                    set.join(", ")
                );
            }
            sql.push_str(&format!(
                "INSERT INTO {t} ({list}) OVERRIDING SYSTEM VALUE SELECT {list} FROM {stage} s \
                 WHERE s.decant_op = 'i' AND NOT EXISTS (SELECT FROM {t} t WHERE {key_match}) ORDER BY {order}",
                t = target.qualified
            ));
            sql
        } else {
            format!(
                "INSERT INTO {} ({list}) OVERRIDING SYSTEM VALUE SELECT {list} FROM {stage} s WHERE s.decant_op = 'i' ORDER BY {order} ON CONFLICT ({order}) {on_conflict}",
                target.qualified
            )
        };
        StageSql {
            stage: stage.clone(),
            create: format!(
                "CREATE TEMP TABLE IF NOT EXISTS {stage} AS SELECT {list} FROM {} WITH NO DATA;
                 ALTER TABLE {stage} ADD COLUMN IF NOT EXISTS decant_op \"char\", ADD COLUMN IF NOT EXISTS decant_keep int2[]",
                target.qualified
            ),
            copy: {
                let text = format!("COPY {stage} ({list}, decant_op, decant_keep) FROM STDIN");
                let binary = format!("{text}{BINARY_COPY_OPTIONS}");
                [text, binary]
            },
            delete: format!(
                "DELETE FROM {} t USING (SELECT {order} FROM {stage} WHERE decant_op IN ('D', 'd') ORDER BY {order}) s WHERE {key_match}",
                target.qualified
            ),
            update_keeping,
            update,
            insert,
            delete_all: format!("DELETE FROM {stage}"),
            truncate: format!("TRUNCATE {stage}"),
            staged_since_truncate: Default::default(),
            splittable,
        }
    }

    /// The COPY into the staging table of data in `cells`.
    pub fn copy(&self, cells: &Cells) -> &str {
        &self.copy[usize::from(cells.is_binary())]
    }

    /// Called when the staging table was (re)created on `conn`.
    pub fn created(&self, conn: Conn) {
        self.staged_since_truncate[conn as usize].store(0, Ordering::Relaxed);
    }

    /// The statement that empties the staging table after a merge of
    /// `staged` bytes. TRUNCATE makes new files and unlinks the old ones;
    /// after every small merge that file churn cost the destination more
    /// than the merge itself (the kernel's inode allocation showed at the
    /// top of its profile). A DELETE leaves dead rows instead, which the
    /// next merges scan, so the table is truncated once they reach
    /// `STAGE_TRUNCATE_BYTES`.
    pub fn empty(&self, conn: Conn, staged: usize) -> &str {
        let counter = &self.staged_since_truncate[conn as usize];
        let total = counter.fetch_add(staged, Ordering::Relaxed) + staged;
        if total >= STAGE_TRUNCATE_BYTES {
            counter.store(0, Ordering::Relaxed);
            &self.truncate
        } else {
            &self.delete_all
        }
    }
}

/// The applier's destination connections: the main one, and the second
/// one that split merges use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Conn {
    Main = 0,
    Second = 1,
}

/// Staged bytes after which a staging table is truncated rather than
/// emptied with DELETE.
const STAGE_TRUNCATE_BYTES: usize = 4 << 20;

#[cfg(test)]
mod tests {
    use super::super::cells::BinaryType;
    use super::*;

    fn t(s: &str) -> Text {
        Some(Cell::copy_from(s.as_bytes()))
    }

    fn target() -> Target {
        Target {
            oid: 7,
            qualified: "\"public\".\"t\"".into(),
            display: "public.t".into(),
            columns: vec!["id".into(), "a".into(), "big".into()],
            key: vec![0],
            identity: decant_proto::ReplicaIdentity::Default,
            type_oids: vec![23, 25, 25],
            cells: Cells::Text,
            identity_always: Vec::new(),
            source_order: false,
            key_deferrable: false,
        }
    }

    fn lines(b: Buffer) -> Vec<String> {
        let [(data, _)]: [_; 1] = b.into_copy_data(&target(), 1).try_into().unwrap();
        let mut l: Vec<String> = String::from_utf8(data.to_vec()).unwrap().lines().map(str::to_owned).collect();
        l.sort();
        l
    }

    #[test]
    fn folds_to_the_net_effect() {
        let mut b = Buffer::default();
        b.insert(vec![t("1")], vec![t("1"), t("a"), t("x")]);
        b.update(None, vec![t("1")], vec![t("1"), t("b"), None], vec![false, false, true]).unwrap();
        b.update(None, vec![t("2")], vec![t("2"), t("c"), None], vec![false, false, true]).unwrap();
        b.delete(vec![t("3")]);
        b.insert(vec![t("4")], vec![t("4"), t("tab\there"), t("back\\slash")]);
        b.delete(vec![t("4")]);
        assert_eq!(
            lines(b),
            [
                "1\tb\tx\ti\t\\N",     // insert then update: the new image, TOAST value carried over
                "2\tc\t\\N\tu\t{3}",   // update of a row only on the destination: keep column 3
                "3\t\\N\t\\N\tD\t\\N", // a delete that expects the row
                "4\t\\N\t\\N\td\t\\N", // inserted then deleted: nothing to count
            ]
        );
    }

    #[test]
    fn key_changes_and_what_cannot_fold() {
        let mut b = Buffer::default();
        b.update(Some(vec![t("1")]), vec![t("9")], vec![t("9"), t("a"), t("x")], vec![false; 3]).unwrap();
        assert!(b.update(Some(vec![t("5")]), vec![t("6")], vec![t("6"), t("a"), None], vec![false, false, true]).is_err());
        b.delete(vec![t("7")]);
        assert!(b.update(None, vec![t("7")], vec![t("7"), t("a"), t("x")], vec![false; 3]).is_err());
        // The key change is a delete plus an insert; what could not fold left nothing.
        assert_eq!(lines(b), ["1\t\\N\t\\N\tD\t\\N", "7\t\\N\t\\N\tD\t\\N", "9\ta\tx\ti\t\\N"]);
    }

    #[test]
    fn parts_are_key_ranges_holding_every_key_once() {
        let mut b = Buffer::with_capacity(4);
        for i in 0..5 {
            b.insert(vec![t(&i.to_string())], vec![t(&i.to_string()), t("a"), t("x")]);
        }
        b.delete(vec![t("9")]);
        let parts = b.into_copy_data(&target(), 2);
        assert_eq!(parts.len(), 2);
        let mut keys: Vec<String> = Vec::new();
        for (data, counts) in &parts {
            let text = String::from_utf8(data.to_vec()).unwrap();
            assert_eq!(text.lines().count() as u64, counts.rows());
            keys.extend(text.lines().map(|l| l.split('\t').next().unwrap().to_owned()));
        }
        // Ranges of keys: the first part's keys all sort before the second's.
        assert!(keys[..3].iter().max() < keys[3..].iter().min(), "{keys:?}");
        keys.sort();
        assert_eq!(keys, ["0", "1", "2", "3", "4", "9"]);
        assert_eq!(parts.iter().map(|(_, c)| c.inserts).sum::<usize>(), 5);
        assert_eq!(parts.iter().map(|(_, c)| c.deletes).sum::<usize>(), 1);
        assert!(parts.iter().all(|(_, c)| c.rows() == 3));
    }

    #[test]
    fn binary_staging_rows() {
        let mut t = target();
        t.cells = Cells::Binary(vec![BinaryType::Int4, BinaryType::Text, BinaryType::Text]);
        let c = |v: &[u8]| Some(Cell::copy_from(v));
        let mut b = Buffer::default();
        b.update(None, vec![c(&[0, 0, 0, 2])], vec![c(&[0, 0, 0, 2]), c(b"c"), None], vec![false, false, true]).unwrap();
        let [(data, counts)]: [_; 1] = b.into_copy_data(&t, 1).try_into().unwrap();
        assert_eq!(counts.updates, 1);
        let mut want = BINARY_HEADER.to_vec();
        want.extend_from_slice(&[0, 5]); // fields: three columns, op, kept
        want.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 2]);
        want.extend_from_slice(&[0, 0, 0, 1, b'c']);
        want.extend_from_slice(&[0xff; 4]); // the unchanged value: NULL, kept
        want.extend_from_slice(&[0, 0, 0, 1, b'u']);
        want.extend_from_slice(&[0, 0, 0, 26, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 21, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 3]);
        want.extend_from_slice(BINARY_TRAILER);
        assert_eq!(data.as_ref(), want);
    }

    #[test]
    fn a_first_appended_row_that_does_not_fit_leaves_an_empty_binary_copy() {
        let cells = Cells::Binary(vec![BinaryType::Int4]);
        let mut out = BytesMut::new();
        let mut scratch = BytesMut::new();
        assert_eq!(append_row(&mut out, &cells, &[Value::Text(b"1")], &mut scratch), Err(Mismatch));
        finish_appends(&mut out, &cells);
        // Header and trailer: a COPY of no rows, which PostgreSQL accepts.
        assert_eq!(out.as_ref(), [BINARY_HEADER, BINARY_TRAILER].concat());
    }

    #[test]
    fn statements() {
        let s = StageSql::new(&target(), 1, false, false);
        assert!(s.update_keeping.unwrap().contains("\"a\" = CASE WHEN 2 = ANY (s.decant_keep) THEN t.\"a\" ELSE s.\"a\" END"));
        assert!(s.update.unwrap().contains("SET \"a\" = s.\"a\", \"big\" = s.\"big\" FROM"));
        assert!(s.insert.ends_with("ON CONFLICT (\"id\") DO UPDATE SET \"a\" = EXCLUDED.\"a\", \"big\" = EXCLUDED.\"big\""));
        assert!(s.delete.contains("t.\"id\" = s.\"id\""));
    }
}
