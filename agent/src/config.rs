//! Task configuration: one TOML file for both roles, with command-line
//! overrides (`--set section.key=value`). `decant default-config` prints
//! [`DEFAULT_CONFIG`], which documents every setting and is checked to
//! parse to exactly [`Config::default`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod decoder;
mod mapping;
mod migrate;
mod operations;
pub use mapping::{MapEntry, Mapping, Projection};
pub use migrate::{ConflictMode, DdlPolicy, Migrate, MigrationType, ProgressDisplay};
pub use operations::{OperationRules, Operations, OperationsRule};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("configuration {path}: {message}")]
    Parse { path: String, message: String },
    #[error("--set {0:?}: expected section.key=value")]
    BadOverride(String),
    #[error("configuration: {key} = {value}: {reason}")]
    Invalid { key: &'static str, value: String, reason: String },
}

/// What to do when a change does not fit the destination's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConflictPolicy {
    /// An INSERT over an existing key updates the row; an UPDATE or DELETE
    /// of a missing row is counted and logged.
    Overwrite,
    /// Any of those stops the applier with an error.
    Stop,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub task_id: String,
    pub source: Source,
    pub destination: Destination,
    pub agent: Agent,
    pub applier: Applier,
    pub transport: Transport,
    pub retry: Retry,
    pub log: Log,
    pub migrate: Migrate,
    pub alert: Alert,
}

/// Alerts (see `alert`): all off by default.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Alert {
    pub command: String,
    pub url: String,
    pub ca_file: String,
    pub lag_seconds: u64,
    pub lag_bytes: u64,
    pub for_seconds: u64,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Source {
    pub dsn: String,
    pub slot: String,
    pub create_slot: bool,
    pub include_tables: Vec<String>,
    pub exclude_tables: Vec<String>,
    pub heartbeat_seconds: u64,
    pub heartbeat_when_held: bool,
    pub decoder: decoder::DecoderChoice,
    pub publication: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Destination {
    pub dsn: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Agent {
    pub applier_url: String,
    pub batch_max_bytes: usize,
    pub batch_max_delay_ms: u64,
    pub max_batches_in_flight: usize,
    pub status_interval_seconds: u64,
    pub metrics_listen: String,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Applier {
    pub listen: String,
    pub group_max_transactions: usize,
    pub group_max_bytes: usize,
    pub group_max_delay_ms: u64,
    pub pipeline_depth: usize,
    pub on_conflict: ConflictPolicy,
    pub apply_truncate: bool,
    pub operations: Vec<OperationsRule>,
    pub apply_messages: bool,
    pub split_merges: bool,
    pub max_rows_per_second: u64,
    pub max_mb_per_second: u64,
    pub metrics_listen: String,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Zstd,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Transport {
    pub token: String,
    pub token_file: String,
    pub tls_cert: String,
    pub tls_key: String,
    pub tls_ca: String,
    pub tls_domain: String,
    pub compression: Option<Compression>,
    /// Lets the applier serve without a token or mutual TLS, and the agent
    /// send its token unencrypted to an address other than loopback.
    pub insecure: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    pub connection_minutes: u64,
    pub other_minutes: u64,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            task_id: "decant".into(),
            source: Source::default(),
            destination: Destination::default(),
            agent: Agent::default(),
            applier: Applier::default(),
            transport: Transport::default(),
            retry: Retry::default(),
            log: Log::default(),
            migrate: Migrate::default(),
            alert: Alert::default(),
        }
    }
}

impl Source {
    /// The publication a pgoutput task reads: `publication`, else one
    /// named after the slot (which the agent creates).
    pub fn publication(&self) -> &str {
        if self.publication.is_empty() {
            &self.slot
        } else {
            &self.publication
        }
    }
}

impl Default for Source {
    fn default() -> Self {
        Source {
            dsn: String::new(),
            slot: "decant".into(),
            create_slot: true,
            include_tables: vec![],
            exclude_tables: vec![],
            heartbeat_seconds: 10,
            heartbeat_when_held: true,
            decoder: decoder::DecoderChoice::Auto,
            publication: String::new(),
        }
    }
}

impl Default for Agent {
    fn default() -> Self {
        Agent {
            applier_url: "http://127.0.0.1:7480".into(),
            batch_max_bytes: 1 << 20,
            batch_max_delay_ms: 20,
            max_batches_in_flight: 8,
            status_interval_seconds: 10,
            metrics_listen: "127.0.0.1:9631".into(),
        }
    }
}

impl Default for Applier {
    fn default() -> Self {
        Applier {
            listen: "127.0.0.1:7480".into(),
            group_max_transactions: 50000,
            group_max_bytes: 32 << 20,
            group_max_delay_ms: 200,
            pipeline_depth: 512,
            on_conflict: ConflictPolicy::Overwrite,
            apply_truncate: true,
            operations: vec![],
            apply_messages: false,
            split_merges: true,
            max_rows_per_second: 0,
            max_mb_per_second: 0,
            metrics_listen: "127.0.0.1:9632".into(),
        }
    }
}

impl Default for Retry {
    fn default() -> Self {
        Retry { connection_minutes: 720, other_minutes: 10 }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log { format: LogFormat::Text, level: "info".into() }
    }
}

/// The documented default configuration, printed by `decant default-config`.
pub const DEFAULT_CONFIG: &str = include_str!("config/default.toml");

impl Config {
    /// Reads `path` (when given), then applies `overrides`, then validates.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        let (text, name) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.display().to_string(), source })?,
                p.display().to_string(),
            ),
            None => (String::new(), "(defaults)".to_owned()),
        };
        Self::parse(&text, &name, overrides)
    }

    pub fn parse(text: &str, name: &str, overrides: &[String]) -> Result<Config, ConfigError> {
        // A TOML error quotes the line it stopped at, which may be a dsn
        // with a password.
        let parse_error =
            |e: toml::de::Error| ConfigError::Parse { path: name.to_owned(), message: crate::secrets::redact(&e.to_string()) };
        let mut table: toml::Table = text.parse().map_err(parse_error)?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let config: Config = toml::Value::Table(table).try_into().map_err(parse_error)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, value: String, reason: &str| Err(ConfigError::Invalid { key, value, reason: reason.to_owned() });
        if self.task_id.is_empty() || !self.task_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || self.task_id.len() > 48 {
            return invalid("task_id", self.task_id.clone(), "use 1-48 letters, digits or underscores");
        }
        if !(10..=1440).contains(&self.retry.connection_minutes) {
            return invalid("retry.connection_minutes", self.retry.connection_minutes.to_string(), "must be between 10 and 1440");
        }
        if !(1..=1440).contains(&self.retry.other_minutes) {
            return invalid("retry.other_minutes", self.retry.other_minutes.to_string(), "must be between 1 and 1440");
        }
        if self.retry.other_minutes >= self.retry.connection_minutes {
            return invalid(
                "retry.other_minutes",
                self.retry.other_minutes.to_string(),
                &format!("must be less than retry.connection_minutes ({})", self.retry.connection_minutes),
            );
        }
        if self.agent.batch_max_bytes < 1024 || self.agent.batch_max_bytes > (64 << 20) {
            return invalid("agent.batch_max_bytes", self.agent.batch_max_bytes.to_string(), "must be between 1024 and 67108864");
        }
        if self.agent.max_batches_in_flight == 0 {
            return invalid("agent.max_batches_in_flight", "0".into(), "must be at least 1");
        }
        if self.applier.group_max_transactions == 0 {
            return invalid("applier.group_max_transactions", "0".into(), "must be at least 1");
        }
        if self.applier.pipeline_depth == 0 {
            return invalid("applier.pipeline_depth", "0".into(), "must be at least 1");
        }
        if self.transport.tls_cert.is_empty() != self.transport.tls_key.is_empty() {
            return invalid("transport.tls_cert", self.transport.tls_cert.clone(), "tls_cert and tls_key must be given together");
        }
        if !self.transport.token.is_empty() && !self.transport.token_file.is_empty() {
            return invalid("transport.token", "(hidden)".into(), "give token or token_file, not both");
        }
        let m = &self.migrate;
        let types: Vec<&str> = m.types.iter().map(|t| t.name()).collect();
        if m.types.is_empty() {
            return invalid("migrate.types", "[]".into(), "choose at least one of schema, full, incremental");
        }
        if m.has(MigrationType::Schema) && m.has(MigrationType::Incremental) && !m.has(MigrationType::Full) {
            return invalid(
                "migrate.types",
                format!("{types:?}"),
                "schema with incremental needs full as well: changes would be applied to tables that hold none of the existing rows",
            );
        }
        if m.workers == 0 || m.workers > 64 {
            return invalid("migrate.workers", m.workers.to_string(), "must be between 1 and 64");
        }
        if m.split_tables_larger_than_mb == 0 {
            return invalid("migrate.split_tables_larger_than_mb", "0".into(), "must be at least 1");
        }
        let whole_schemas = self.source.include_tables.iter().filter(|p| p.ends_with(".*")).count();
        if whole_schemas != 0 && whole_schemas != self.source.include_tables.len() && m.has(MigrationType::Schema) {
            return invalid(
                "source.include_tables",
                self.source.include_tables.join(","),
                "select whole schemas (\"app.*\") or single tables, not both, when migrating the schema",
            );
        }
        decant_proto::options::PluginOptions::parse(self.plugin_option_pairs().iter().map(|(k, v)| (*k, Some(v.as_str())))).map_err(
            |e| ConfigError::Invalid { key: "source.include_tables", value: self.source.include_tables.join(","), reason: e.message },
        )?;
        self.insert_only_patterns()?;
        self.operation_rules()?;
        self.mapping()?;
        let url = &self.alert.url;
        if !url.is_empty() && !url.starts_with("http://") && !url.starts_with("https://") {
            return invalid("alert.url", url.clone(), "must start with http:// or https://");
        }
        Ok(())
    }

    /// `applier.operations`, parsed.
    pub fn operation_rules(&self) -> Result<OperationRules, ConfigError> {
        OperationRules::parse(&self.applier.operations).map_err(|reason| ConfigError::Invalid {
            key: "applier.operations",
            value: toml::Value::try_from(&self.applier.operations).map_or_else(|_| String::new(), |v| v.to_string()),
            reason,
        })
    }

    /// `migrate.map`, parsed.
    pub fn mapping(&self) -> Result<Mapping, ConfigError> {
        Mapping::parse(&self.migrate.map).map_err(|reason| ConfigError::Invalid {
            key: "migrate.map",
            value: toml::Value::try_from(&self.migrate.map).map_or_else(|_| String::new(), |v| v.to_string()),
            reason,
        })
    }

    /// Plugin options for the slot, from the table filters.
    pub fn plugin_option_pairs(&self) -> Vec<(&'static str, String)> {
        let mut o = Vec::new();
        if !self.source.include_tables.is_empty() {
            o.push(("include_tables", self.source.include_tables.join(",")));
        }
        if !self.source.exclude_tables.is_empty() {
            o.push(("exclude_tables", self.source.exclude_tables.join(",")));
        }
        o
    }

    /// The task's table selection (source.include_tables minus
    /// exclude_tables), as the plugin applies it. The patterns are checked
    /// when the configuration is loaded.
    pub fn selection(&self) -> decant_proto::options::PluginOptions {
        let pairs = self.plugin_option_pairs();
        decant_proto::options::PluginOptions::parse(pairs.iter().map(|(k, v)| (*k, Some(v.as_str())))).unwrap_or_default()
    }

    /// `migrate.insert_only_tables`, parsed.
    pub fn insert_only_patterns(&self) -> Result<Vec<decant_proto::options::TablePattern>, ConfigError> {
        let list = &self.migrate.insert_only_tables;
        if list.is_empty() {
            return Ok(Vec::new());
        }
        decant_proto::options::TablePattern::parse_list("migrate.insert_only_tables", &list.join(",")).map_err(|e| ConfigError::Invalid {
            key: "migrate.insert_only_tables",
            value: list.join(","),
            reason: e.message,
        })
    }

    /// The shared token, from `token` or `token_file`.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        if !self.transport.token.is_empty() {
            return Ok(Some(self.transport.token.clone()));
        }
        if self.transport.token_file.is_empty() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&self.transport.token_file)
            .map_err(|source| ConfigError::Read { path: self.transport.token_file.clone(), source })?;
        let token = text.trim();
        // An empty token would be matched by a request that carries none.
        if token.is_empty() {
            return Err(ConfigError::Invalid {
                key: "transport.token_file",
                value: self.transport.token_file.clone(),
                reason: "the file is empty: write the shared token into it (the same on agent and applier)".into(),
            });
        }
        Ok(Some(token.to_owned()))
    }

    pub fn connection_retry(&self) -> Duration {
        Duration::from_secs(self.retry.connection_minutes * 60)
    }

    pub fn other_retry(&self) -> Duration {
        Duration::from_secs(self.retry.other_minutes * 60)
    }

    pub fn path(s: &str) -> Option<PathBuf> {
        (!s.is_empty()).then(|| PathBuf::from(s))
    }
}

fn apply_override(table: &mut toml::Table, o: &str) -> Result<(), ConfigError> {
    let bad = || ConfigError::BadOverride(crate::secrets::redact(o));
    let (key, value) = o.split_once('=').ok_or_else(bad)?;
    let value: toml::Value = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let mut parts: Vec<&str> = key.trim().split('.').collect();
    let last = parts.pop().filter(|l| !l.is_empty()).ok_or_else(bad)?;
    let mut current = table;
    for part in parts {
        current =
            current.entry(part.to_owned()).or_insert_with(|| toml::Value::Table(toml::Table::new())).as_table_mut().ok_or_else(bad)?;
    }
    current.insert(last.to_owned(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_defaults_are_the_defaults() {
        assert_eq!(Config::parse(DEFAULT_CONFIG, "default", &[]).unwrap(), Config::default());
    }

    #[test]
    fn overrides_and_validation() {
        let c = Config::parse(
            "task_id = \"t1\"\n[source]\ndsn = \"host=a\"\n",
            "x",
            &["retry.other_minutes=5".into(), "source.slot=s2".into(), "applier.on_conflict=stop".into()],
        )
        .unwrap();
        assert_eq!((c.retry.other_minutes, c.source.slot.as_str(), c.applier.on_conflict), (5, "s2", ConflictPolicy::Stop));
        let err = |text: &str, o: &[&str]| {
            Config::parse(text, "x", &o.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap_err().to_string()
        };
        assert!(err("", &["retry.other_minutes=800"]).contains("less than retry.connection_minutes"));
        assert!(err("", &["retry.connection_minutes=5"]).contains("between 10 and 1440"));
        assert!(err("[source]\nslott = \"x\"", &[]).contains("unknown field `slott`"));
        assert!(err("task_id = \"a-b\"", &[]).contains("task_id"));
        assert!(err("[applier]\non_conflict = \"maybe\"", &[]).contains("on_conflict"));
        assert!(err("[source]\ninclude_tables = [\"nodot\"]", &[]).contains("schema.table"));
        assert!(err("", &["noequals"]).contains("section.key=value"));
        let e = err("[applier]\noperations = [{ tables = [\"audit.*\"], apply = [\"INSERT\", \"MERGE\"] }]", &[]);
        assert!(e.contains("applier.operations") && e.contains("entry 1: unknown operation \"MERGE\""), "{e}");
        assert!(err("[applier]\noperations = [{ tables = [\"a.b\"], aply = [] }]", &[]).contains("aply"));
        let c = Config::parse("[applier]\noperations = [{ tables = [\"audit.*\"], apply = [\"insert\"] }]", "x", &[]).unwrap();
        assert_eq!(c.operation_rules().unwrap().for_table(b"audit", b"log"), Operations::INSERT);
        // A line quoted by the TOML error keeps its password hidden.
        let e = err("[source]\ndsn = \"host=a password=hunter2\n", &[]);
        assert!(e.contains("password=********") && !e.contains("hunter2"), "{e}");
        let e = err("[source]\ndsn = postgresql://me:hunter2@db/x\n", &[]);
        assert!(!e.contains("hunter2"), "{e}");
        let e = err("", &["postgresql://me:hunter2@db/x"]);
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn an_empty_token_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("decant-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "\n").unwrap();
        let c = Config::parse(&format!("[transport]\ntoken_file = \"{}\"\n", path.display()), "x", &[]).unwrap();
        let e = c.token().unwrap_err().to_string();
        assert!(e.contains("transport.token_file") && e.contains("empty"), "{e}");
        std::fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(c.token().unwrap().as_deref(), Some("s3cret"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
