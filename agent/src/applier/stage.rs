//! The staging table of a table's set-based merge: the SQL around it
//! (creating it, the COPY into it, the DELETE, UPDATE and INSERT that merge
//! it into the table, emptying it) and the COPY data loaded into it from
//! the folded changes. Both sides of one format live here: a staged row is
//! the table's columns, its operation (`decant_op`: `i` insert or upsert,
//! `u` update of an existing row, `D` delete expecting the row, `d` delete
//! of a row inserted in the same changes) and the columns that keep the
//! destination's value (`decant_keep`, unchanged TOAST), and each merge
//! statement selects the staged rows by those.
//!
//! No I/O here: the statements and the rows are built as values and unit
//! tested; `merge` runs them.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;

use super::cells::{escape, BinaryRow, Cells, BINARY_COPY_OPTIONS, BINARY_HEADER, BINARY_TRAILER};
use super::fold::{Buffer, Net, Text};
use super::statements::Target;
use crate::connect::sql::quote_ident;

/// The staging table's rows for `buffer`'s folded changes, as COPY data
/// (in the target's cells), in `parts` parts (for merges on as many
/// connections; every key in exactly one), with how many rows of each
/// operation a part holds.
/// Parts are ranges of keys in byte order, which for the usual keys
/// (integers, uuids, text) is, or is close to, the order of the table's
/// key index: each connection then works on pages of its own, where
/// halves of interleaved keys made the two merges meet on every page
/// (8% more destination CPU for pgbench_accounts than ranges). Each row
/// is freed once written, so the folded rows and their COPY data are
/// not both held whole (the applier's peak memory).
pub fn staging_data(buffer: Buffer, target: &Target, parts: usize) -> Vec<(BytesMut, Counts)> {
    let parts = parts.max(1);
    let ncols = target.columns.len();
    let binary = target.cells.is_binary();
    let mut outs: Vec<(BytesMut, Counts)> = (0..parts)
        .map(|_| {
            let mut out = BytesMut::with_capacity(buffer.bytes / parts + 1024);
            if binary {
                out.extend_from_slice(BINARY_HEADER);
            }
            (out, Counts::default())
        })
        .collect();
    let rows = buffer.len();
    let net = buffer.into_rows();
    let in_parts: Box<dyn Iterator<Item = (Vec<Text>, Net)>> = if parts == 1 {
        Box::new(net.into_iter())
    } else {
        // Partitioned, not sorted: linear time.
        let mut in_order: Vec<_> = net.into_iter().collect();
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
mod tests;
