//! The `[migrate]` section: the task's phases, selection controls and
//! policies, read by the agent (which drives the phases) and, for DDL, by
//! the applier.

use serde::{Deserialize, Serialize};

use super::MapEntry;

/// What a migration task moves and how (read by the agent, which drives it).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Migrate {
    pub types: Vec<MigrationType>,
    pub conflicts: ConflictMode,
    pub workers: usize,
    pub split_tables_larger_than_mb: u64,
    pub max_rows_per_second: u64,
    pub max_mb_per_second: u64,
    pub max_source_queries_per_second: u64,
    pub pg_dump: String,
    pub progress: ProgressDisplay,
    pub insert_only_tables: Vec<String>,
    /// Precheck warnings accepted by name (`decant precheck` lists them).
    pub accept: Vec<String>,
    /// Destination names, row filters and transforms (see `mapping`).
    pub map: Vec<MapEntry>,
    /// What the applier does with DDL captured on the source.
    pub ddl: DdlPolicy,
}

/// What the applier does with a DDL statement captured on the source
/// (`migrate.ddl`), at its place in the stream.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DdlPolicy {
    /// Run it on the destination, in the transaction of the changes around it.
    Apply,
    /// Leave the destination's schema to the operator; counted.
    Skip,
    /// Stop the task there, naming the statement and its position.
    Stop,
}

impl DdlPolicy {
    pub fn name(self) -> &'static str {
        match self {
            DdlPolicy::Apply => "apply",
            DdlPolicy::Skip => "skip",
            DdlPolicy::Stop => "stop",
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum MigrationType {
    Schema,
    Full,
    Incremental,
}

impl MigrationType {
    pub fn name(self) -> &'static str {
        match self {
            MigrationType::Schema => "schema",
            MigrationType::Full => "full",
            MigrationType::Incremental => "incremental",
        }
    }
}

/// Objects that already exist in the destination.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConflictMode {
    /// Fail before anything is written, listing them.
    Report,
    /// Go on: keep the existing object; the full copy keeps the destination
    /// row on a key conflict, incremental overwrites it.
    Ignore,
}

impl ConflictMode {
    pub fn name(self) -> &'static str {
        match self {
            ConflictMode::Report => "report",
            ConflictMode::Ignore => "ignore",
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProgressDisplay {
    /// Progress bars on a terminal, log lines otherwise.
    Auto,
    Bars,
    Log,
}

impl Default for Migrate {
    fn default() -> Self {
        Migrate {
            types: vec![MigrationType::Incremental],
            conflicts: ConflictMode::Report,
            workers: 2,
            split_tables_larger_than_mb: 256,
            max_rows_per_second: 0,
            max_mb_per_second: 0,
            max_source_queries_per_second: 0,
            pg_dump: String::new(),
            progress: ProgressDisplay::Auto,
            insert_only_tables: Vec::new(),
            accept: Vec::new(),
            map: Vec::new(),
            ddl: DdlPolicy::Apply,
        }
    }
}

impl Migrate {
    pub fn has(&self, t: MigrationType) -> bool {
        self.types.contains(&t)
    }

    /// Whether the task has phases before the stream (schema or full).
    pub fn has_phases_before_stream(&self) -> bool {
        self.has(MigrationType::Schema) || self.has(MigrationType::Full)
    }
}
