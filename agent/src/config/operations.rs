//! `applier.operations`: which of INSERT, UPDATE, DELETE and TRUNCATE the
//! applier applies, per table. Each rule names tables by the patterns of
//! `source.include_tables`; the first rule whose patterns match a table
//! decides, and a table no rule matches gets all four.

use decant_proto::options::TablePattern;
use serde::{Deserialize, Serialize};

/// One entry of `applier.operations`, as written in the configuration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OperationsRule {
    /// `schema.table` patterns, as in `source.include_tables`.
    pub tables: Vec<String>,
    /// The operations applied to those tables (any of INSERT, UPDATE,
    /// DELETE, TRUNCATE, in any case).
    pub apply: Vec<String>,
}

/// A set of operations, a bit each: checked on every change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Operations(u8);

impl Operations {
    pub const INSERT: Operations = Operations(1);
    pub const UPDATE: Operations = Operations(2);
    pub const DELETE: Operations = Operations(4);
    pub const TRUNCATE: Operations = Operations(8);
    pub const ALL: Operations = Operations(15);
    pub const NONE: Operations = Operations(0);
    const NAMES: [(&'static str, Operations); 4] =
        [("INSERT", Self::INSERT), ("UPDATE", Self::UPDATE), ("DELETE", Self::DELETE), ("TRUNCATE", Self::TRUNCATE)];

    pub fn contains(self, op: Operations) -> bool {
        self.0 & op.0 == op.0
    }

    /// The operations named, in any case.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Operations, String> {
        names.iter().try_fold(Operations::NONE, |set, name| {
            let name = name.as_ref();
            Self::NAMES
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
                .map(|(_, op)| Operations(set.0 | op.0))
                .ok_or_else(|| format!("unknown operation {name:?}: use INSERT, UPDATE, DELETE or TRUNCATE"))
        })
    }

    /// For messages: "INSERT, DELETE", or "none".
    pub fn names(self) -> String {
        let names: Vec<&str> = Self::NAMES.iter().filter(|(_, op)| self.contains(*op)).map(|(n, _)| *n).collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }
}

/// `applier.operations`, parsed: matched once per table, when the applier
/// learns it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OperationRules(Vec<(Vec<TablePattern>, Operations)>);

impl OperationRules {
    pub fn parse(rules: &[OperationsRule]) -> Result<OperationRules, String> {
        rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let at = |e: String| format!("entry {}: {e}", i + 1);
                if rule.tables.is_empty() {
                    return Err(at("tables is empty: name at least one schema.table pattern".into()));
                }
                let patterns = TablePattern::parse_list("applier.operations", &rule.tables.join(",")).map_err(|e| at(e.message))?;
                Ok((patterns, Operations::parse(&rule.apply).map_err(at)?))
            })
            .collect::<Result<_, _>>()
            .map(OperationRules)
    }

    /// The operations applied to `schema.table`: the first matching rule's,
    /// else all.
    pub fn for_table(&self, schema: &[u8], table: &[u8]) -> Operations {
        self.0.iter().find(|(patterns, _)| patterns.iter().any(|p| p.matches(schema, table))).map_or(Operations::ALL, |(_, ops)| *ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(tables: &[&str], apply: &[&str]) -> OperationsRule {
        OperationsRule { tables: tables.iter().map(|s| s.to_string()).collect(), apply: apply.iter().map(|s| s.to_string()).collect() }
    }

    #[test]
    fn first_matching_rule_wins_and_unlisted_tables_get_all() {
        let rules = OperationRules::parse(&[
            rule(&["audit.*"], &["INSERT"]),
            rule(&["app.orders", "app.hist*"], &["insert", "Update"]),
            rule(&["*.*"], &["INSERT", "UPDATE", "DELETE"]),
        ])
        .unwrap();
        assert_eq!(rules.for_table(b"audit", b"log"), Operations::INSERT);
        let ops = rules.for_table(b"app", b"history");
        assert!(ops.contains(Operations::INSERT) && ops.contains(Operations::UPDATE));
        assert!(!ops.contains(Operations::DELETE) && !ops.contains(Operations::TRUNCATE));
        assert_eq!(ops.names(), "INSERT, UPDATE");
        // The catch-all, not the first rule: "audit" does not match "app".
        assert_eq!(rules.for_table(b"app", b"users").names(), "INSERT, UPDATE, DELETE");
        assert_eq!(OperationRules::default().for_table(b"app", b"users"), Operations::ALL);
        let none = OperationRules::parse(&[rule(&["a.b"], &[])]).unwrap();
        assert_eq!(none.for_table(b"a", b"b"), Operations::NONE);
        assert_eq!(Operations::NONE.names(), "none");
        assert_eq!(none.for_table(b"a", b"bc"), Operations::ALL);
    }

    #[test]
    fn errors_name_the_entry() {
        let e = OperationRules::parse(&[rule(&["a.b"], &["INSERT"]), rule(&["a.c"], &["insert", "upsert"])]).unwrap_err();
        assert!(e.starts_with("entry 2: unknown operation \"upsert\""), "{e}");
        let e = OperationRules::parse(&[rule(&[], &["INSERT"])]).unwrap_err();
        assert!(e.contains("entry 1: tables is empty"), "{e}");
        let e = OperationRules::parse(&[rule(&["nodot"], &["INSERT"])]).unwrap_err();
        assert!(e.contains("entry 1") && e.contains("schema.table"), "{e}");
    }
}
