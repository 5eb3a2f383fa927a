//! Precheck: everything that can make a task fail later, checked before it
//! starts and reported with its fix. `decant precheck` prints the report
//! (text or JSON); `decant migrate`, `agent` and `applier` run the checks
//! of the sides they reach at start and refuse to start on an error.
//!
//! This file owns the report: the stable check names ([`Check`], used by
//! `--accept` and in the JSON), the findings (one line each: check,
//! severity, object, what was found, the fix), accepting warnings, and
//! printing. The checks live in `source` (the source server), `tables`
//! (the selected tables, read on the source), `destination` (the
//! destination server) and `compare` (the destination against what the
//! source selected); `server` is what both sides read on connecting.
//!
//! Which checks run, and as errors, depends on the task's migration types:
//! slots, `wal_level` and replica identities matter only with
//! incremental, SELECT on the tables with schema or full, creating objects
//! in the destination with schema. Each side is one connection and a
//! handful of catalog queries.

mod compare;
mod decoder;
mod destination;
mod server;
mod source;
mod tables;

use serde::Serialize;

use crate::config::Config;

macro_rules! checks {
    ($($variant:ident = $name:literal,)*) => {
        /// A check, by its stable name.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Check {
            $($variant,)*
        }

        impl Check {
            pub const ALL: &'static [Check] = &[$(Check::$variant,)*];

            pub fn name(self) -> &'static str {
                match self {
                    $(Check::$variant => $name,)*
                }
            }
        }
    };
}

checks! {
    SourceConnect = "source.connect",
    SourceVersion = "source.version",
    SourcePgDump = "source.pg_dump",
    SourceWalLevel = "source.wal_level",
    SourceReplicationSlots = "source.replication_slots",
    SourceWalSenders = "source.wal_senders",
    SourceOutputPluginLibraries = "source.output_plugin_libraries",
    SourcePlugin = "source.plugin",
    SourceDdlCapture = "source.ddl_capture",
    SourceSlot = "source.slot",
    SourceReplicationPrivilege = "source.replication_privilege",
    SourceSelect = "source.select",
    SourceSchemaUsage = "source.schema_usage",
    SourceLongTransactions = "source.long_transactions",
    SourcePreparedTransactions = "source.prepared_transactions",
    SourceMaxSlotWalKeepSize = "source.max_slot_wal_keep_size",
    SourceWalSenderTimeout = "source.wal_sender_timeout",
    SourceTimeouts = "source.timeouts",
    SourceStandby = "source.standby",
    SourceLargeObjects = "source.large_objects",
    TablesSelection = "tables.selection",
    TablesReplicaIdentity = "tables.replica_identity",
    TablesUnlogged = "tables.unlogged",
    TablesForeign = "tables.foreign",
    TablesSequences = "tables.sequences",
    TablesMapping = "tables.mapping",
    DestinationConnect = "destination.connect",
    DestinationVersion = "destination.version",
    DestinationSessionReplicationRole = "destination.session_replication_role",
    DestinationCreate = "destination.create",
    DestinationReplicationOrigin = "destination.replication_origin",
    DestinationDiskSpace = "destination.disk_space",
    DestinationConflicts = "destination.conflicts",
    DestinationTables = "destination.tables",
    DestinationExtensions = "destination.extensions",
    DestinationTypes = "destination.types",
    DestinationEncoding = "destination.encoding",
    DestinationTriggers = "destination.triggers",
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Pass,
    Warning,
    Error,
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub severity: Severity,
    /// What the line is about: `source`, a setting, a table, a role…
    pub object: String,
    pub message: String,
    /// A command or configuration line that fixes it.
    pub fix: Option<String>,
    /// A warning accepted with `--accept` (or `migrate.accept`).
    pub accepted: bool,
}

/// Which servers a run checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Sides {
    /// The source only (`decant agent`, which cannot reach the
    /// destination in a split deployment).
    Source,
    /// The destination only (`decant applier`).
    Destination,
    /// Both, and the destination against the source's selection.
    Both,
}

impl Sides {
    fn source(self) -> bool {
        self != Sides::Destination
    }

    fn destination(self) -> bool {
        self != Sides::Source
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrecheckError {
    #[error("--accept / migrate.accept: no check is named {0:?}; the checks are: {1}")]
    UnknownCheck(String, String),
}

/// The findings collected by the checks.
#[derive(Default)]
struct Findings(Vec<Finding>);

impl Findings {
    fn push(&mut self, check: Check, severity: Severity, object: impl Into<String>, message: impl Into<String>, fix: Option<String>) {
        self.0.push(Finding { check: check.name(), severity, object: object.into(), message: message.into(), fix, accepted: false });
    }

    fn pass(&mut self, check: Check, object: impl Into<String>, message: impl Into<String>) {
        self.push(check, Severity::Pass, object, message, None);
    }

    fn warn(&mut self, check: Check, object: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) {
        self.push(check, Severity::Warning, object, message, Some(fix.into()));
    }

    fn error(&mut self, check: Check, object: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) {
        self.push(check, Severity::Error, object, message, Some(fix.into()));
    }

    /// A problem whose severity depends on the task.
    fn fail(&mut self, check: Check, severity: Severity, object: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) {
        self.push(check, severity, object, message, Some(fix.into()));
    }

    /// A query of `check` that failed: the check could not be made.
    fn query_failed(&mut self, check: Check, e: &tokio_postgres::Error) {
        self.push(
            check,
            Severity::Error,
            "precheck",
            format!("a catalog query failed, so this side was not fully checked: {}", crate::error::report(e)),
            Some("check the connection and the user's privileges, then run decant precheck again".into()),
        );
    }
}

/// What the destination holds of this task.
#[derive(Clone, Debug, PartialEq, Eq)]
enum TaskState {
    /// The destination was not checked.
    Unknown,
    /// No plan stored: the task starts from the beginning.
    New,
    /// Planned, in this phase.
    Planned(String),
}

/// Runs the checks of `sides` for the task `config`.
pub async fn run(config: &Config, sides: Sides) -> Result<Report, PrecheckError> {
    let accept = accepted(config)?;
    let mut f = Findings::default();
    let source = if sides.source() { source::Source::connect(config, &mut f).await } else { None };
    let destination = if sides.destination() { destination::Destination::connect(config, &mut f).await } else { None };
    let state = match &destination {
        Some(d) => match d.task_state(&config.task_id).await {
            Ok(s) => s,
            Err(e) => {
                f.query_failed(Check::DestinationConnect, &e);
                TaskState::Unknown
            }
        },
        None => TaskState::Unknown,
    };
    let mut selection = None;
    if let Some(s) = &source {
        match s.check(config, &state, &mut f).await {
            Ok(sel) => selection = Some(sel),
            Err(e) => f.query_failed(Check::SourceConnect, &e),
        }
    }
    if let Some(d) = &destination {
        if let Err(e) = d.check(config, source.as_ref().map(|s| &s.server), &mut f).await {
            f.query_failed(Check::DestinationConnect, &e);
        } else if let (Some(s), Some(sel)) = (&source, &selection) {
            if let Err(e) = compare::check(config, d, &s.server, sel, &state, &mut f).await {
                f.query_failed(Check::DestinationConnect, &e);
            }
        }
    }
    let mut findings = f.0;
    for finding in &mut findings {
        finding.accepted = finding.severity == Severity::Warning && accept.contains(&finding.check);
    }
    Ok(Report { findings })
}

/// The names in `migrate.accept`, each a known check.
fn accepted(config: &Config) -> Result<Vec<&'static str>, PrecheckError> {
    config
        .migrate
        .accept
        .iter()
        .map(|name| {
            Check::ALL.iter().map(|c| c.name()).find(|n| n == name).ok_or_else(|| {
                PrecheckError::UnknownCheck(name.clone(), Check::ALL.iter().map(|c| c.name()).collect::<Vec<_>>().join(", "))
            })
        })
        .collect()
}

/// The outcome of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn errors(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Error).count()
    }

    /// Warnings not accepted.
    pub fn warnings(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Warning && !f.accepted).count()
    }

    pub fn accepted(&self) -> usize {
        self.findings.iter().filter(|f| f.accepted).count()
    }

    pub fn ok(&self) -> bool {
        self.errors() == 0
    }

    fn summary(&self) -> String {
        let passed = self.findings.iter().filter(|f| f.severity == Severity::Pass).count();
        format!("precheck: {passed} passed, {} warning(s), {} accepted, {} error(s)", self.warnings(), self.accepted(), self.errors())
    }

    /// One line per finding, then a summary.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            out.push_str(&line(f));
            out.push('\n');
        }
        out.push_str(&self.summary());
        out.push('\n');
        out
    }

    /// One JSON object: `ok`, the counts, and every finding.
    pub fn json(&self) -> String {
        serde_json::json!({
            "ok": self.ok(),
            "errors": self.errors(),
            "warnings": self.warnings(),
            "accepted": self.accepted(),
            "checks": self.findings,
        })
        .to_string()
    }

    /// The refusal of a task that does not start: every error with its
    /// fix. None when there is no error.
    pub fn refusal(&self) -> Option<String> {
        if self.ok() {
            return None;
        }
        let lines: Vec<String> = self.findings.iter().filter(|f| f.severity == Severity::Error).map(|f| format!("  {}", line(f))).collect();
        Some(format!(
            "precheck found {} error(s); the task does not start, and nothing was written:\n{}\n\
             (decant precheck --config FILE lists every check)",
            lines.len(),
            lines.join("\n")
        ))
    }

    /// Logs the warnings and a summary, as a role starts.
    pub fn log(&self) {
        for f in &self.findings {
            match f.severity {
                Severity::Warning if f.accepted => {
                    tracing::info!(check = f.check, object = %f.object, "precheck: accepted: {}", f.message)
                }
                Severity::Warning => tracing::warn!(
                    check = f.check,
                    object = %f.object,
                    fix = f.fix.as_deref().unwrap_or(""),
                    "precheck: {} (accept with --accept {})",
                    f.message,
                    f.check
                ),
                _ => tracing::debug!(check = f.check, object = %f.object, "precheck: {}", f.message),
            }
        }
        tracing::info!("{}", self.summary());
    }
}

fn line(f: &Finding) -> String {
    let label = match (f.severity, f.accepted) {
        (Severity::Pass, _) => "pass",
        (Severity::Warning, true) => "accepted",
        (Severity::Warning, false) => "warning",
        (Severity::Error, _) => "error",
    };
    let fix = match (&f.fix, f.severity, f.accepted) {
        (Some(fix), Severity::Warning, false) => format!(" Fix: {fix} (or --accept {})", f.check),
        (Some(fix), _, _) => format!(" Fix: {fix}"),
        (None, _, _) => String::new(),
    };
    format!("{label:<8} {:<36} {}: {}{fix}", f.check, f.object, f.message)
}

/// `schema.name`, as the rest of decant names tables to the operator.
fn display(schema: &str, name: &str) -> String {
    format!("{schema}.{name}")
}

/// `"schema"."name"`, for SQL in a fix.
fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", crate::connect::sql::quote_ident(schema), crate::connect::sql::quote_ident(name))
}

/// Bytes as MB or GB, for people.
fn size(bytes: i64) -> String {
    let b = bytes.max(0) as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

/// A list of names, shortened past `max`.
fn list(names: &[String], max: usize) -> String {
    if names.len() <= max {
        names.join(", ")
    } else {
        format!("{} and {} more", names[..max].join(", "), names.len() - max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_are_unique_and_documented() {
        let readme = include_str!("../../../README.md");
        let mut seen = std::collections::BTreeSet::new();
        for c in Check::ALL {
            assert!(seen.insert(c.name()), "{} twice", c.name());
            assert!(readme.contains(&format!("`{}`", c.name())), "README.md does not list {}", c.name());
        }
    }

    #[test]
    fn unknown_accepted_names_are_refused_and_warnings_only_are_accepted() {
        let mut config = Config::default();
        config.migrate.accept = vec!["source.large_objectz".into()];
        let e = accepted(&config).unwrap_err().to_string();
        assert!(e.contains("source.large_objectz") && e.contains("source.large_objects"), "{e}");
        config.migrate.accept = vec!["tables.unlogged".into()];
        assert_eq!(accepted(&config).unwrap(), ["tables.unlogged"]);
    }

    #[test]
    fn lines_and_refusal() {
        let mut f = Findings::default();
        f.pass(Check::SourceWalLevel, "source", "wal_level is logical");
        f.warn(Check::TablesUnlogged, "public.u", "unlogged", "ALTER TABLE \"public\".\"u\" SET LOGGED;");
        f.error(Check::TablesReplicaIdentity, "public.k", "no replica identity", "ALTER TABLE \"public\".\"k\" REPLICA IDENTITY FULL;");
        let report = Report { findings: f.0 };
        let text = report.text();
        assert!(text.contains("warning  tables.unlogged") && text.contains("(or --accept tables.unlogged)"), "{text}");
        assert!(text.contains("1 passed, 1 warning(s), 0 accepted, 1 error(s)"), "{text}");
        let refusal = report.refusal().unwrap();
        assert!(refusal.contains("public.k") && !refusal.contains("public.u"), "{refusal}");
        let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["checks"][2]["check"], "tables.replica_identity");
        assert_eq!(json["checks"][2]["severity"], "error");
    }
}
