//! SQL for applying one relation's changes, built from its RELATION record,
//! and the values of a change that locate its row (which both folding and
//! the row-by-row apply use).

use std::sync::Arc;

use decant_proto::{OldTuple, Relation, ReplicaIdentity, Tuple, Value};

use super::cells::Cells;
use crate::config::{Mapping, Operations, Projection};

/// What the applier knows of a source relation.
#[derive(Clone, Debug)]
pub struct Target {
    pub oid: u32,
    /// `"schema"."table"` on the destination.
    pub qualified: String,
    /// For messages: `schema.table`.
    pub display: String,
    pub columns: Vec<String>,
    /// Indexes of the columns that identify a row on the destination: the
    /// replica identity key, else the primary key.
    pub key: Vec<usize>,
    pub identity: ReplicaIdentity,
    /// Each column's type on the source.
    pub type_oids: Vec<u32>,
    /// How its values are written into COPY data (text until the
    /// destination's column types are known).
    pub cells: Cells,
    /// Columns that are identity columns GENERATED ALWAYS on the
    /// destination: an UPDATE may set them only to DEFAULT (see
    /// [`Target::identity_always_sql`]).
    pub identity_always: Vec<usize>,
    /// Changes must be applied in source order, never folded into one
    /// set-based merge: the destination has a unique index or exclusion
    /// constraint, checked row by row, that the key does not make
    /// redundant, and that a merge could violate in an order the source
    /// never had (two rows swapping unique values in one transaction).
    pub source_order: bool,
    /// The key's unique index is DEFERRABLE: no ON CONFLICT on it.
    pub key_deferrable: bool,
    /// The operations applied to the table (`applier.operations`, matched
    /// once, when its RELATION record arrives).
    pub operations: Operations,
    /// A row filter or transforms of `migrate.map`: the table's changes
    /// are then applied row by row through [`Projected`] statements.
    pub projected: Option<Arc<Projected>>,
}

/// How a table with a row filter or transforms is applied: each row's
/// values go in as parameters named after the source columns, and the
/// destination computes the destination row from them and keeps it only
/// when it matches the filter — the same SQL the copy ran on the source.
/// An INSERT inserts the matching row (or nothing); an UPDATE deletes the
/// old row and inserts the new one when it matches, so a row that moves
/// into the filter appears and one that moves out disappears, as with
/// PostgreSQL's publication row filters; a DELETE deletes.
#[derive(Clone, Debug)]
pub struct Projected {
    pub source_columns: Vec<String>,
    pub projection: Projection,
    /// The destination type (`format_type`) of each source column's
    /// destination column, which its parameter is cast to.
    pub types: Vec<String>,
}

use crate::connect::sql::quote_ident;

impl Target {
    /// The relation as `migrate.map` names it on the destination.
    pub fn from_relation(r: &Relation<'_>, mapping: &Mapping) -> Target {
        let schema = String::from_utf8_lossy(r.namespace).into_owned();
        let name = String::from_utf8_lossy(r.name).into_owned();
        let mut key: Vec<usize> = r.identity_key().collect();
        if key.is_empty() {
            key = r.columns.iter().enumerate().filter(|(_, c)| c.flags.primary_key()).map(|(i, _)| i).collect();
        }
        let source_columns: Vec<String> = r.columns.iter().map(|c| String::from_utf8_lossy(c.name).into_owned()).collect();
        let projection = mapping.projection(&schema, &name, &source_columns);
        let (to_schema, to_name) = mapping.table(&schema, &name);
        Target {
            oid: r.oid,
            qualified: format!("{}.{}", quote_ident(&to_schema), quote_ident(&to_name)),
            display: format!("{schema}.{name}"),
            columns: projection.targets[..source_columns.len()].to_vec(),
            key,
            identity: r.replica_identity,
            type_oids: r.columns.iter().map(|c| c.type_oid).collect(),
            cells: Cells::Text,
            identity_always: Vec::new(),
            source_order: false,
            key_deferrable: false,
            operations: Operations::ALL,
            projected: (!projection.is_plain()).then(|| Arc::new(Projected { source_columns, projection, types: Vec::new() })),
        }
    }

    /// Whether writing the columns `written` (indexes) sets an identity
    /// column GENERATED ALWAYS.
    pub fn writes_identity_always(&self, written: impl IntoIterator<Item = usize>) -> bool {
        written.into_iter().any(|i| self.identity_always.contains(&i))
    }

    /// The statements that turn the table's GENERATED ALWAYS identity
    /// columns into BY DEFAULT and back. UPDATE (and INSERT's ON CONFLICT DO
    /// UPDATE) refuses any value but DEFAULT for an ALWAYS column, whatever
    /// OVERRIDING clause; the source's value must still be written. Both
    /// run inside the group's transaction, so no other session ever sees
    /// the column changed, and a rolled-back group leaves it as it was.
    pub fn identity_always_sql(&self) -> Option<(String, String)> {
        if self.identity_always.is_empty() {
            return None;
        }
        let alter = |to: &str| {
            let cols: Vec<String> =
                self.identity_always.iter().map(|&i| format!("ALTER COLUMN {} SET GENERATED {to}", self.col(i))).collect();
            format!("ALTER TABLE ONLY {} {}", self.qualified, cols.join(", "))
        };
        Some((alter("BY DEFAULT"), alter("ALWAYS")))
    }

    fn col(&self, i: usize) -> String {
        quote_ident(&self.columns[i])
    }

    /// `INSERT … VALUES ($1 …)`, overwriting an existing row with the same
    /// key when `upsert` and the relation has a key. With a filter or
    /// transforms, `INSERT … SELECT` the destination row computed from the
    /// parameters, when it matches (see [`Projected`]).
    pub fn insert_sql(&self, upsert: bool) -> String {
        if self.columns.is_empty() {
            return format!("INSERT INTO {} DEFAULT VALUES", self.qualified);
        }
        let targets: Vec<String> = match &self.projected {
            Some(p) => p.projection.targets.iter().map(|c| quote_ident(c)).collect(),
            None => (0..self.columns.len()).map(|i| self.col(i)).collect(),
        };
        // OVERRIDING SYSTEM VALUE: identity columns GENERATED ALWAYS take the
        // source's value like any other column.
        let mut sql = format!("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE ", self.qualified, targets.join(", "));
        match &self.projected {
            Some(p) => {
                let row: Vec<String> = p
                    .source_columns
                    .iter()
                    .enumerate()
                    .map(|(n, c)| format!("${}::{} AS {}", n + 1, p.types.get(n).map_or("text", String::as_str), quote_ident(c)))
                    .collect();
                sql.push_str(&p.projection.select(&format!("(SELECT {}) AS decant_source_row", row.join(", ")), None));
            }
            None => {
                let params: Vec<String> = (1..=self.columns.len()).map(|n| format!("${n}")).collect();
                sql.push_str(&format!("VALUES ({})", params.join(", ")));
            }
        }
        if upsert && !self.key.is_empty() {
            let key: Vec<String> = self.key.iter().map(|&i| self.col(i)).collect();
            let set: Vec<String> =
                (0..targets.len()).filter(|i| !self.key.contains(i)).map(|i| format!("{c} = EXCLUDED.{c}", c = targets[i])).collect();
            if set.is_empty() {
                sql.push_str(&format!(" ON CONFLICT ({}) DO NOTHING", key.join(", ")));
            } else {
                sql.push_str(&format!(" ON CONFLICT ({}) DO UPDATE SET {}", key.join(", "), set.join(", ")));
            }
        }
        sql
    }

    /// The row locator of UPDATE/DELETE, with parameters from `$first`:
    /// the key columns, or — for a table without one (REPLICA IDENTITY FULL
    /// on a table without primary key) — every column compared as text,
    /// limited to one row.
    fn locator(&self, first: usize) -> String {
        if !self.key.is_empty() {
            let conds: Vec<String> = self.key.iter().enumerate().map(|(n, &i)| format!("{} = ${}", self.col(i), first + n)).collect();
            conds.join(" AND ")
        } else if self.columns.is_empty() {
            // Rows without columns are all alike: any one is the one.
            format!("ctid = (SELECT ctid FROM {} LIMIT 1)", self.qualified)
        } else {
            let cols: Vec<String> = (0..self.columns.len()).map(|i| format!("{}::text", self.col(i))).collect();
            let params: Vec<String> = (0..self.columns.len()).map(|n| format!("${}::text", first + n)).collect();
            format!(
                "ctid = (SELECT ctid FROM {} WHERE ({}) IS NOT DISTINCT FROM ({}) LIMIT 1)",
                self.qualified,
                cols.join(", "),
                params.join(", ")
            )
        }
    }

    /// Number of parameters the locator takes.
    pub fn locator_len(&self) -> usize {
        if self.key.is_empty() {
            self.columns.len()
        } else {
            self.key.len()
        }
    }

    /// `UPDATE … SET` the columns in `set` (indexes), then the locator.
    pub fn update_sql(&self, set: &[usize]) -> String {
        let assignments: Vec<String> = set.iter().enumerate().map(|(n, &i)| format!("{} = ${}", self.col(i), n + 1)).collect();
        format!("UPDATE {} SET {} WHERE {}", self.qualified, assignments.join(", "), self.locator(set.len() + 1))
    }

    pub fn delete_sql(&self) -> String {
        format!("DELETE FROM {} WHERE {}", self.qualified, self.locator(1))
    }
}

/// The values that locate the old row: the key columns (from the old key or
/// row when logged, else from the new row, whose key is then unchanged), or
/// every column for a table without key when the whole old row is logged.
pub fn locator_values<'a>(target: &Target, old: Option<&OldTuple<'a>>, new: Option<&Tuple<'a>>) -> Option<Vec<Value<'a>>> {
    if target.key.is_empty() {
        return match old {
            Some(OldTuple::Row(row)) => Some(row.0.clone()),
            _ => None,
        };
    }
    match old {
        Some(OldTuple::Key(key)) if key.0.len() == target.key.len() => Some(key.0.clone()),
        Some(OldTuple::Row(row)) => target.key.iter().map(|&i| row.0.get(i).copied()).collect(),
        // A key tuple of another shape means the identity differs from the
        // key we use (primary key under REPLICA IDENTITY NOTHING): only the
        // new row can tell.
        _ => new.and_then(|n| target.key.iter().map(|&i| n.0.get(i).copied()).collect()),
    }
}

/// A table `"public"."t"` (oid 7) with an int and two text columns named
/// `columns`, keyed on `key`: the shape the applier's unit tests use.
#[cfg(test)]
pub(super) fn test_target(columns: [&str; 3], key: Vec<usize>) -> Target {
    Target {
        oid: 7,
        qualified: "\"public\".\"t\"".into(),
        display: "public.t".into(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
        key,
        identity: ReplicaIdentity::Default,
        type_oids: vec![23, 25, 25],
        cells: Cells::Text,
        identity_always: Vec::new(),
        source_order: false,
        key_deferrable: false,
        operations: Operations::ALL,
        projected: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(key: Vec<usize>) -> Target {
        Target { oid: 1, qualified: "\"s\".\"t\"".into(), display: "s.t".into(), ..test_target(["id", "a", "b\"q"], key) }
    }

    #[test]
    fn the_old_row_is_located_by_its_key_or_whole_row() {
        let row = |v: &[&'static str]| Tuple(v.iter().map(|s| Value::Text(s.as_bytes())).collect());
        let keyed = target(vec![0]);
        // The old key, when logged.
        let old = OldTuple::Key(row(&["1"]));
        assert_eq!(locator_values(&keyed, Some(&old), Some(&row(&["2", "a", "b"]))), Some(row(&["1"]).0));
        // REPLICA IDENTITY FULL: the key columns of the old row.
        let old = OldTuple::Row(row(&["3", "a", "b"]));
        assert_eq!(locator_values(&keyed, Some(&old), None), Some(row(&["3"]).0));
        // No old tuple: the key did not change, the new row has it.
        assert_eq!(locator_values(&keyed, None, Some(&row(&["4", "a", "b"]))), Some(row(&["4"]).0));
        // A key tuple of another shape (the identity is not our key): the new row.
        let old = OldTuple::Key(row(&["x", "y"]));
        assert_eq!(locator_values(&keyed, Some(&old), Some(&row(&["5", "a", "b"]))), Some(row(&["5"]).0));
        // A DELETE under REPLICA IDENTITY NOTHING says nothing.
        assert_eq!(locator_values(&keyed, None, None), None);
        // No key: the whole old row, when logged, else nothing.
        let keyless = target(vec![]);
        let old = OldTuple::Row(row(&["6", "a", "b"]));
        assert_eq!(locator_values(&keyless, Some(&old), None), Some(row(&["6", "a", "b"]).0));
        assert_eq!(locator_values(&keyless, None, Some(&row(&["7", "a", "b"]))), None);
        assert_eq!(locator_values(&keyless, Some(&OldTuple::Key(row(&["8"]))), None), None);
    }

    #[test]
    fn statements() {
        let t = target(vec![0]);
        assert_eq!(
            t.insert_sql(true),
            "INSERT INTO \"s\".\"t\" (\"id\", \"a\", \"b\"\"q\") OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3) ON CONFLICT (\"id\") DO UPDATE SET \"a\" = EXCLUDED.\"a\", \"b\"\"q\" = EXCLUDED.\"b\"\"q\""
        );
        assert_eq!(t.insert_sql(false), "INSERT INTO \"s\".\"t\" (\"id\", \"a\", \"b\"\"q\") OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3)");
        assert_eq!(t.update_sql(&[1]), "UPDATE \"s\".\"t\" SET \"a\" = $1 WHERE \"id\" = $2");
        assert_eq!(t.delete_sql(), "DELETE FROM \"s\".\"t\" WHERE \"id\" = $1");
        let keyless = target(vec![]);
        assert_eq!(
            keyless.insert_sql(true),
            "INSERT INTO \"s\".\"t\" (\"id\", \"a\", \"b\"\"q\") OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3)"
        );
        assert!(keyless.delete_sql().contains("IS NOT DISTINCT FROM ($1::text, $2::text, $3::text) LIMIT 1"));
        assert_eq!(keyless.locator_len(), 3);
        let all_key = target(vec![0, 1, 2]);
        assert!(all_key.insert_sql(true).ends_with("DO NOTHING"));
        let mut identity = target(vec![0]);
        assert_eq!(identity.identity_always_sql(), None);
        identity.identity_always = vec![1];
        assert!(identity.writes_identity_always([0, 1]));
        assert!(!identity.writes_identity_always([0, 2]));
        assert_eq!(
            identity.identity_always_sql(),
            Some((
                "ALTER TABLE ONLY \"s\".\"t\" ALTER COLUMN \"a\" SET GENERATED BY DEFAULT".into(),
                "ALTER TABLE ONLY \"s\".\"t\" ALTER COLUMN \"a\" SET GENERATED ALWAYS".into()
            ))
        );
        // A row filter and a transform: the row goes in as typed
        // parameters named after the source columns.
        let mapping = crate::config::Mapping::parse(&[toml::from_str(
            "table = \"s.t\"\ncolumns = { a = \"x\" }\nwhere = \"a <> ''\"\nset = { \"b\\\"q\" = \"upper(a)\" }",
        )
        .unwrap()])
        .unwrap();
        let projection = mapping.projection("s", "t", &["id".into(), "a".into(), "b\"q".into()]);
        let projected = Target {
            columns: projection.targets.clone(),
            projected: Some(Arc::new(Projected {
                source_columns: vec!["id".into(), "a".into(), "b\"q".into()],
                projection,
                types: vec!["integer".into(), "text".into(), "text".into()],
            })),
            ..target(vec![0])
        };
        assert_eq!(
            projected.insert_sql(true),
            "INSERT INTO \"s\".\"t\" (\"id\", \"x\", \"b\"\"q\") OVERRIDING SYSTEM VALUE SELECT \"id\", \"a\", (upper(a)) \
             FROM (SELECT $1::integer AS \"id\", $2::text AS \"a\", $3::text AS \"b\"\"q\") AS decant_source_row WHERE (a <> '') \
             ON CONFLICT (\"id\") DO UPDATE SET \"x\" = EXCLUDED.\"x\", \"b\"\"q\" = EXCLUDED.\"b\"\"q\""
        );
        let empty = Target { columns: vec![], type_oids: vec![], ..target(vec![]) };
        assert_eq!(empty.insert_sql(true), "INSERT INTO \"s\".\"t\" DEFAULT VALUES");
        assert_eq!(empty.delete_sql(), "DELETE FROM \"s\".\"t\" WHERE ctid = (SELECT ctid FROM \"s\".\"t\" LIMIT 1)");
    }
}
