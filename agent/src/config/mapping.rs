//! `migrate.map`: the destination's names for source schemas, tables and
//! columns, and per table a row filter (`where`) and column transforms
//! (`set`). Both roles read the same entries: the agent for the copy's
//! SELECT and the schema's renames, the applier for the stream's targets
//! and statements, `verify` for both sides of its comparison.
//!
//! Names are source names unless said otherwise; a table's `to` and the
//! keys of `set` are destination names.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::quote::quote_ident;

/// One entry of `migrate.map`, as written in the configuration: either a
/// schema (`schema`, `to`) or a table (`table` and any of `to`, `columns`,
/// `where`, `set`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MapEntry {
    /// A source schema, renamed as a whole.
    pub schema: String,
    /// A source table, `schema.table`.
    pub table: String,
    /// The schema's new name; the table's new name, or `schema.name` to
    /// move it into another schema.
    pub to: String,
    /// Source column -> destination column.
    pub columns: BTreeMap<String, String>,
    /// A row filter: an SQL condition over the source row's columns.
    #[serde(rename = "where")]
    pub filter: String,
    /// Destination column -> an SQL expression over the source row's
    /// columns, its value on the destination.
    pub set: BTreeMap<String, String>,
}

/// What `migrate.map` says about one table.
#[derive(Clone, Debug, Default, PartialEq)]
struct TableEntry {
    schema: Option<String>,
    name: Option<String>,
    columns: HashMap<String, String>,
    filter: Option<String>,
    set: BTreeMap<String, String>,
}

/// `migrate.map`, parsed and checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mapping {
    schemas: HashMap<String, String>,
    tables: HashMap<(String, String), TableEntry>,
    /// The entries in a canonical text form (see [`Mapping::fingerprint`]).
    fingerprint: String,
}

/// A table's rows as the destination gets them: for each destination
/// column, the SQL over the source row that computes its value, and the
/// rows kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Projection {
    /// Destination columns: one per copied source column, in source order,
    /// then the destination-only columns that `set` fills.
    pub targets: Vec<String>,
    /// The SQL computing each target over the source row's columns: the
    /// quoted source column, or its `set` expression (parenthesised).
    pub values: Vec<String>,
    /// Whether some value is a `set` expression.
    pub transformed: bool,
    /// The row filter, parenthesised.
    pub filter: Option<String>,
}

impl Projection {
    /// Whether the rows go over as they are (maybe under other names).
    pub fn is_plain(&self) -> bool {
        !self.transformed && self.filter.is_none()
    }

    /// `SELECT <values> FROM <from> [WHERE <filter> [AND <also>]]`.
    pub fn select(&self, from: &str, also: Option<&str>) -> String {
        let conditions: Vec<&str> = self.filter.iter().map(String::as_str).chain(also).collect();
        let mut sql = format!("SELECT {} FROM {from}", self.values.join(", "));
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql
    }
}

impl Mapping {
    pub fn parse(entries: &[MapEntry]) -> Result<Mapping, String> {
        let mut mapping = Mapping::default();
        for (i, e) in entries.iter().enumerate() {
            let at = |m: String| format!("entry {}: {m}", i + 1);
            match (e.schema.is_empty(), e.table.is_empty()) {
                (false, true) => {
                    if e.to.is_empty() || e.to.contains('.') {
                        return Err(at(format!("schema {:?} needs `to`, the schema's new name (without a dot)", e.schema)));
                    }
                    if !e.columns.is_empty() || !e.filter.is_empty() || !e.set.is_empty() {
                        return Err(at("columns, where and set belong to a table entry (table = \"schema.table\")".into()));
                    }
                    if mapping.schemas.insert(e.schema.clone(), e.to.clone()).is_some() {
                        return Err(at(format!("schema {:?} is mapped twice", e.schema)));
                    }
                }
                (true, false) => {
                    let key = split(&e.table).ok_or_else(|| at(format!("table {:?}: write it as schema.table", e.table)))?;
                    let (schema, name) = match e.to.as_str() {
                        "" => (None, None),
                        to => match to.split_once('.') {
                            Some((s, n)) if !s.is_empty() && !n.is_empty() => (Some(s.to_owned()), Some(n.to_owned())),
                            Some(_) => return Err(at(format!("to = {to:?}: write a name, or schema.name"))),
                            None => (None, Some(to.to_owned())),
                        },
                    };
                    if e.columns.iter().any(|(s, d)| s.is_empty() || d.is_empty())
                        || e.set.iter().any(|(c, x)| c.is_empty() || x.trim().is_empty())
                    {
                        return Err(at("a column name or an expression is empty".into()));
                    }
                    let entry = TableEntry {
                        schema,
                        name,
                        columns: e.columns.clone().into_iter().collect(),
                        filter: (!e.filter.trim().is_empty()).then(|| format!("({})", e.filter.trim())),
                        set: e.set.clone(),
                    };
                    if mapping.tables.insert(key, entry).is_some() {
                        return Err(at(format!("table {:?} is mapped twice", e.table)));
                    }
                }
                _ => return Err(at("give either schema (a schema entry) or table (a table entry)".into())),
            }
        }
        mapping.fingerprint = if entries.is_empty() {
            String::new()
        } else {
            let mut lines: Vec<String> = entries.iter().map(|e| serde_json::to_string(e).unwrap_or_default()).collect();
            lines.sort();
            lines.join("\n")
        };
        Ok(mapping)
    }

    pub fn is_empty(&self) -> bool {
        self.schemas.is_empty() && self.tables.is_empty()
    }

    /// The entries in a canonical form: equal for equal mappings whatever
    /// their order, so agent and applier can check they agree.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The destination schema of the source schema `schema`'s objects.
    pub fn schema<'a>(&'a self, schema: &'a str) -> &'a str {
        self.schemas.get(schema).map_or(schema, String::as_str)
    }

    /// The destination `(schema, table)` of a source table.
    pub fn table(&self, schema: &str, table: &str) -> (String, String) {
        let entry = self.tables.get(&(schema.to_owned(), table.to_owned()));
        let to_schema = entry.and_then(|e| e.schema.clone()).unwrap_or_else(|| self.schema(schema).to_owned());
        (to_schema, entry.and_then(|e| e.name.clone()).unwrap_or_else(|| table.to_owned()))
    }

    /// The destination name of a source table's column.
    pub fn column(&self, schema: &str, table: &str, column: &str) -> String {
        self.entry(schema, table).and_then(|e| e.columns.get(column)).cloned().unwrap_or_else(|| column.to_owned())
    }

    /// The destination `(schema, table)` of a source sequence: a sequence
    /// owned by a table moved into another schema moves with it.
    pub fn sequence(&self, schema: &str, name: &str, owner: Option<(&str, &str)>) -> (String, String) {
        match owner.and_then(|(s, t)| self.entry(s, t)).and_then(|e| e.schema.clone()) {
            Some(moved) => (moved, name.to_owned()),
            None => (self.schema(schema).to_owned(), name.to_owned()),
        }
    }

    /// The schemas renamed, as (source, destination), in order.
    pub fn schemas(&self) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = self.schemas.iter().filter(|(f, t)| f != t).map(|(f, t)| (f.as_str(), t.as_str())).collect();
        out.sort();
        out
    }

    /// The tables with an entry, as (schema, table, has a filter or
    /// transforms), in order.
    pub fn tables(&self) -> Vec<(&str, &str, bool)> {
        let mut out: Vec<(&str, &str, bool)> =
            self.tables.iter().map(|((s, t), e)| (s.as_str(), t.as_str(), e.filter.is_some() || !e.set.is_empty())).collect();
        out.sort();
        out
    }

    /// Whether the source schema `schema`, or the table `schema.table`
    /// (`None`: any object of the schema), has other names on the
    /// destination: the schema, the table's name or schema, or a column.
    /// (A row filter or transforms alone keep every name.)
    pub fn renames(&self, schema: &str, table: Option<&str>) -> bool {
        self.schema(schema) != schema
            || table.and_then(|t| self.entry(schema, t).map(|e| (t, e))).is_some_and(|(t, e)| {
                e.schema.as_deref().is_some_and(|s| s != schema)
                    || e.name.as_deref().is_some_and(|n| n != t)
                    || e.columns.iter().any(|(from, to)| from != to)
            })
    }

    fn entry(&self, schema: &str, table: &str) -> Option<&TableEntry> {
        self.tables.get(&(schema.to_owned(), table.to_owned()))
    }

    /// The table's rows as the destination gets them, from its copied
    /// (source) columns. An error when `set` names a destination column
    /// that is a transformed source key column is the caller's to find:
    /// only the destination knows the key.
    pub fn projection(&self, schema: &str, table: &str, columns: &[String]) -> Projection {
        let entry = self.entry(schema, table);
        let set = entry.map(|e| &e.set);
        let mut targets = Vec::with_capacity(columns.len());
        let mut values = Vec::with_capacity(columns.len());
        let mut transformed = false;
        for c in columns {
            let to = self.column(schema, table, c);
            match set.and_then(|s| s.get(&to)) {
                Some(expr) => {
                    values.push(format!("({expr})"));
                    transformed = true;
                }
                None => values.push(quote_ident(c)),
            }
            targets.push(to);
        }
        for (to, expr) in set.into_iter().flatten() {
            if !targets.contains(to) {
                targets.push(to.clone());
                values.push(format!("({expr})"));
                transformed = true;
            }
        }
        Projection { targets, values, transformed, filter: entry.and_then(|e| e.filter.clone()) }
    }

    /// The statements that give the objects the schema phase created under
    /// their source names their destination names, run once the schema's
    /// last step is done (the copy and every post-data step use the source
    /// names; dependent views, indexes, constraints, foreign keys and
    /// triggers follow a renamed object, since PostgreSQL refers to it by
    /// OID): columns, then tables within their schema, then schemas, then
    /// moves into another schema. `tables` are the selected source tables.
    pub fn rename_sql(&self, tables: &[(String, String, Vec<String>)]) -> Vec<String> {
        let q = |s: &str, t: &str| format!("{}.{}", quote_ident(s), quote_ident(t));
        let mut sql = Vec::new();
        let mut entries: Vec<(&(String, String), &TableEntry)> = self.tables.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        for ((s, t), e) in &entries {
            let Some((_, _, columns)) = tables.iter().find(|(ts, tt, _)| ts == s && tt == t) else { continue };
            let mut renames: Vec<(&String, &String)> = e.columns.iter().filter(|(from, to)| from != to && columns.contains(from)).collect();
            renames.sort();
            for (from, to) in renames {
                sql.push(format!("ALTER TABLE {} RENAME COLUMN {} TO {};", q(s, t), quote_ident(from), quote_ident(to)));
            }
            if let Some(name) = e.name.as_ref().filter(|n| *n != t) {
                sql.push(format!("ALTER TABLE {} RENAME TO {};", q(s, t), quote_ident(name)));
            }
        }
        let mut schemas: Vec<(&String, &String)> = self.schemas.iter().filter(|(from, to)| from != to).collect();
        schemas.sort();
        for (from, to) in schemas {
            sql.push(format!("ALTER SCHEMA {} RENAME TO {};", quote_ident(from), quote_ident(to)));
        }
        for ((s, t), e) in &entries {
            let selected = tables.iter().any(|(ts, tt, _)| ts == s && tt == t);
            if let (true, Some(to)) = (selected, e.schema.as_ref().filter(|to| *to != self.schema(s))) {
                let name = e.name.as_deref().unwrap_or(t);
                sql.push(format!("CREATE SCHEMA IF NOT EXISTS {};", quote_ident(to)));
                sql.push(format!("ALTER TABLE {} SET SCHEMA {};", q(self.schema(s), name), quote_ident(to)));
            }
        }
        sql
    }
}

/// `schema.table` split at its first dot.
fn split(table: &str) -> Option<(String, String)> {
    let (s, t) = table.split_once('.')?;
    (!s.is_empty() && !t.is_empty()).then(|| (s.to_owned(), t.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(toml: &str) -> MapEntry {
        toml::from_str(toml).unwrap()
    }

    fn cols(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_map_per_schema_table_and_column() {
        let m = Mapping::parse(&[
            entry("schema = \"sales\"\nto = \"sales_v2\""),
            entry("table = \"sales.orders\"\nto = \"purchases\"\ncolumns = { note = \"remark\" }"),
            entry("table = \"public.users\"\nto = \"crm.customers\""),
        ])
        .unwrap();
        assert_eq!(m.schema("sales"), "sales_v2");
        assert_eq!(m.schema("public"), "public");
        assert_eq!(m.table("sales", "orders"), ("sales_v2".into(), "purchases".into()));
        assert_eq!(m.table("sales", "items"), ("sales_v2".into(), "items".into()));
        assert_eq!(m.table("public", "users"), ("crm".into(), "customers".into()));
        assert_eq!(m.table("public", "other"), ("public".into(), "other".into()));
        assert_eq!(m.column("sales", "orders", "note"), "remark");
        assert_eq!(m.column("sales", "orders", "id"), "id");
        assert_eq!(m.sequence("public", "users_id_seq", Some(("public", "users"))), ("crm".into(), "users_id_seq".into()));
        assert_eq!(m.sequence("sales", "s", None), ("sales_v2".into(), "s".into()));
        let tables = vec![("sales".into(), "orders".into(), cols(&["id", "note"])), ("public".into(), "users".into(), cols(&["id"]))];
        assert_eq!(
            m.rename_sql(&tables),
            vec![
                "ALTER TABLE \"public\".\"users\" RENAME TO \"customers\";",
                "ALTER TABLE \"sales\".\"orders\" RENAME COLUMN \"note\" TO \"remark\";",
                "ALTER TABLE \"sales\".\"orders\" RENAME TO \"purchases\";",
                "ALTER SCHEMA \"sales\" RENAME TO \"sales_v2\";",
                "CREATE SCHEMA IF NOT EXISTS \"crm\";",
                "ALTER TABLE \"public\".\"customers\" SET SCHEMA \"crm\";",
            ]
        );
        // The same entries in another order: the same fingerprint.
        let again = Mapping::parse(&[
            entry("table = \"public.users\"\nto = \"crm.customers\""),
            entry("table = \"sales.orders\"\nto = \"purchases\"\ncolumns = { note = \"remark\" }"),
            entry("schema = \"sales\"\nto = \"sales_v2\""),
        ])
        .unwrap();
        assert_eq!(m.fingerprint(), again.fingerprint());
        assert!(Mapping::parse(&[]).unwrap().fingerprint().is_empty());
    }

    #[test]
    fn projection_applies_filter_transforms_and_extra_columns() {
        let m = Mapping::parse(&[entry(
            "table = \"app.users\"\ncolumns = { mail = \"email\" }\nwhere = \"tenant = 1\"\n\
             set = { email = \"md5(mail)\", domain = \"split_part(mail, '@', 2)\" }",
        )])
        .unwrap();
        let p = m.projection("app", "users", &cols(&["id", "mail"]));
        assert_eq!(p.targets, cols(&["id", "email", "domain"]));
        assert_eq!(p.values, cols(&["\"id\"", "(md5(mail))", "(split_part(mail, '@', 2))"]));
        assert!(p.transformed && !p.is_plain());
        assert_eq!(
            p.select("\"app\".\"users\"", Some("ctid < '(5,0)'")),
            "SELECT \"id\", (md5(mail)), (split_part(mail, '@', 2)) FROM \"app\".\"users\" WHERE (tenant = 1) AND ctid < '(5,0)'"
        );
        let plain = m.projection("app", "other", &cols(&["a"]));
        assert!(plain.is_plain());
        assert_eq!(plain.select("t", None), "SELECT \"a\" FROM t");
    }

    #[test]
    fn errors_name_the_entry() {
        let e = |toml: &str| Mapping::parse(&[entry("schema = \"a\"\nto = \"b\""), entry(toml)]).unwrap_err();
        assert!(e("table = \"nodot\"").starts_with("entry 2: table \"nodot\""));
        assert!(e("schema = \"a\"\nto = \"c\"").contains("mapped twice"));
        assert!(e("schema = \"x\"").contains("needs `to`"));
        assert!(e("schema = \"x\"\nto = \"y\"\nwhere = \"true\"").contains("table entry"));
        assert!(e("to = \"y\"").contains("either schema"));
        assert!(e("table = \"a.b\"\nto = \".x\"").contains("schema.name"));
        assert!(e("table = \"a.b\"\nset = { c = \" \" }").contains("empty"));
    }

    #[test]
    fn which_objects_have_other_names() {
        let m = Mapping::parse(&[
            entry("schema = \"sales\"\nto = \"shop\""),
            entry("table = \"app.users\"\nwhere = \"tenant = 1\""),
            entry("table = \"app.orders\"\ncolumns = { note = \"remark\" }"),
            entry("table = \"app.items\"\nto = \"things\""),
        ])
        .unwrap();
        assert!(m.renames("sales", None) && m.renames("sales", Some("anything")));
        assert!(!m.renames("app", None));
        assert!(!m.renames("app", Some("users")), "a filter alone keeps the names");
        assert!(m.renames("app", Some("orders")) && m.renames("app", Some("items")));
        assert!(!m.renames("app", Some("other")));
    }
}
