//! Schema migration with pg_dump: the schema is taken as pg_dump's plain
//! output of the pre-data and post-data sections, inside the task's
//! snapshot, and split into one step per dumped object (pg_dump heads each
//! object with a `-- Name: …; Type: …; Schema: …` comment), so the applier
//! can record each step as done in the same transaction that creates it,
//! and build post-data objects in parallel.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use decant_proto::grpc::{SchemaStep, StepOrder};

use crate::config::Config;
use crate::connect::{conninfo, ConnInfo};

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "pg_dump was not found ({tried}); install the PostgreSQL client of the source's version or newer \
         (Debian: apt-get install postgresql-client-{major}), or set migrate.pg_dump to its path"
    )]
    Missing { tried: String, major: u32 },
    #[error(
        "{path} is pg_dump {found}, older than the source (PostgreSQL {major}): pg_dump refuses newer servers; \
         install postgresql-client-{major} or newer, or set migrate.pg_dump to a pg_dump of version {major} or later"
    )]
    TooOld { path: String, found: String, major: u32 },
    #[error("pg_dump ({path}) failed: {message}")]
    Failed { path: String, message: String },
    #[error("pg_dump's output has a psql command this tool cannot run: {0:?}")]
    MetaCommand(String),
}

/// A pg_dump that can dump the source.
#[derive(Debug, Clone)]
pub struct PgDump {
    path: PathBuf,
}

impl PgDump {
    /// Finds pg_dump: the configured one, else the newest of every pg_dump
    /// on PATH and in the standard per-version directories, which must not
    /// be older than the source (whose major version is `source_major`):
    /// pg_dump refuses servers newer than itself, and a newer pg_dump dumps
    /// every older server, so the newest one is the safe choice.
    pub fn locate(configured: &str, source_major: u32) -> Result<PgDump, SchemaError> {
        let candidates = if configured.is_empty() { installed_pg_dumps() } else { vec![PathBuf::from(configured)] };
        let probed = candidates.into_iter().map(with_version).collect();
        choose(probed, source_major).map(|path| PgDump { path })
    }

    /// Dumps one section (`pre-data` or `post-data`) inside `snapshot`,
    /// from `dsn` (whose completed settings are `source`). Secrets stay off
    /// pg_dump's command line, which any local user can read: it gets the
    /// connection string without them, the password in its own environment
    /// (PGPASSWORD), and a client key's sslpassword, which has no
    /// environment variable, in a service file only this user can read.
    pub async fn dump(
        &self,
        dsn: &str,
        source: &ConnInfo,
        section: &str,
        snapshot: Option<&str>,
        selection: &[String],
    ) -> Result<String, SchemaError> {
        let path = self.path.display().to_string();
        let failed = |message: String| SchemaError::Failed { path: path.clone(), message };
        let mut conninfo = conninfo::without_secrets(dsn).map_err(|e| failed(format!("source.dsn: {e}")))?;
        let mut cmd = tokio::process::Command::new(&self.path);
        if let Some(password) = &source.password {
            cmd.env("PGPASSWORD", password);
        }
        let _service_file = match &source.sslpassword {
            Some(key_password) => {
                let file = ServiceFile::write(key_password).map_err(failed)?;
                cmd.env("PGSERVICEFILE", &file.0);
                conninfo.push_str(" service=decant");
                Some(file)
            }
            None => None,
        };
        cmd.arg(format!("--section={section}"))
            .args(["--no-owner", "--no-privileges", "--no-publications", "--no-subscriptions", "--no-security-labels"])
            .arg("--encoding=UTF8")
            .arg("--exclude-schema=decant")
            .args(selection)
            .arg("--dbname")
            .arg(conninfo)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(s) = snapshot {
            cmd.arg(format!("--snapshot={s}"));
        }
        let out = cmd.output().await.map_err(|e| failed(e.to_string()))?;
        if !out.status.success() {
            return Err(failed(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        String::from_utf8(out.stdout).map_err(|_| failed("output is not UTF-8".into()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its version, as `pg_dump --version` prints it (`15.20`).
    pub fn version(&self) -> Option<String> {
        version_of(&self.path)
    }
}

/// A libpq service file (mode 0600, removed on drop) holding the source's
/// `sslpassword` as service `decant`, for pg_dump.
struct ServiceFile(PathBuf);

impl ServiceFile {
    fn write(key_password: &str) -> Result<ServiceFile, String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        use std::sync::atomic::{AtomicU32, Ordering};
        // libpq reads a value up to the end of its line, less trailing spaces.
        if key_password.contains(['\n', '\r']) || key_password.ends_with(char::is_whitespace) {
            return Err("the source's sslpassword ends with a space or holds a line break, which pg_dump cannot be given \
                        without its command line: decrypt the client key or change its password"
                .into());
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path =
            std::env::temp_dir().join(format!("decant-pg_dump-{}-{}.conf", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot create the service file {}: {e}", path.display()))?;
        // Removed on drop, also when the write fails.
        let service = ServiceFile(path);
        writeln!(file, "[decant]\nsslpassword={key_password}")
            .map_err(|e| format!("cannot write the service file {}: {e}", service.0.display()))?;
        Ok(service)
    }
}

impl Drop for ServiceFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Every pg_dump that may be installed: each PATH directory's, then the
/// per-version directories of Debian (/usr/lib/postgresql/N/bin) and of the
/// PGDG RPMs (/usr/pgsql-N/bin), then a source build's default prefix.
/// Directories that do not exist, or repeat one already listed, are left out.
fn installed_pg_dumps() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    for (parent, prefix, tail) in [("/usr/lib/postgresql", "", "bin"), ("/usr", "pgsql-", "bin")] {
        let Ok(entries) = std::fs::read_dir(parent) else { continue };
        let mut versioned: Vec<(u32, PathBuf)> = entries
            .filter_map(|d| d.ok())
            .filter_map(|d| {
                let name = d.file_name();
                let major = name.to_str()?.strip_prefix(prefix)?.parse().ok()?;
                Some((major, d.path().join(tail)))
            })
            .collect();
        versioned.sort();
        dirs.extend(versioned.into_iter().rev().map(|(_, d)| d));
    }
    dirs.push("/usr/local/pgsql/bin".into());
    let mut seen = std::collections::HashSet::new();
    dirs.into_iter()
        .map(|d| d.join("pg_dump"))
        .filter(|p| p.is_file())
        .filter(|p| seen.insert(std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())))
        .collect()
}

/// The newest pg_dump among `candidates` (path, `--version` number or None
/// when it did not run) that is not older than the source; the first listed
/// of equally new ones. A single candidate is the configured pg_dump.
fn choose(candidates: Vec<(PathBuf, Option<String>)>, source_major: u32) -> Result<PathBuf, SchemaError> {
    let mut best: Option<(Vec<u32>, &PathBuf)> = None;
    let mut too_old: Option<(Vec<u32>, &PathBuf, &str)> = None;
    for (path, version) in &candidates {
        let Some(version) = version else { continue };
        let key = version_key(version);
        if major_of(version) >= source_major {
            if best.as_ref().is_none_or(|(b, _)| key > *b) {
                best = Some((key, path));
            }
        } else if too_old.as_ref().is_none_or(|(b, _, _)| key > *b) {
            too_old = Some((key, path, version));
        }
    }
    if let Some((_, path)) = best {
        return Ok(path.clone());
    }
    match too_old {
        Some((_, path, found)) => {
            Err(SchemaError::TooOld { path: path.display().to_string(), found: found.to_owned(), major: source_major })
        }
        None => Err(SchemaError::Missing {
            tried: if candidates.is_empty() {
                "none on PATH or in /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin, /usr/local/pgsql/bin".to_owned()
            } else {
                candidates.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>().join(", ")
            },
            major: source_major,
        }),
    }
}

/// A version's numbers, for ordering: "15.20" < "18.1" < "18.10";
/// "18beta1" orders as 18.
fn version_key(version: &str) -> Vec<u32> {
    version.split('.').map_while(|part| part.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()).collect()
}

fn with_version(path: PathBuf) -> (PathBuf, Option<String>) {
    let version = version_of(&path);
    (path, version)
}

fn version_of(path: &Path) -> Option<String> {
    let out = std::process::Command::new(path).arg("--version").stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    // "pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"
    text.split_whitespace().nth(2).map(str::to_owned)
}

fn major_of(version: &str) -> u32 {
    version.split(|c: char| !c.is_ascii_digit()).next().and_then(|m| m.parse().ok()).unwrap_or(0)
}

/// pg_dump selection arguments from the task's table patterns: whole
/// schemas (`app.*`) select every object of those schemas; other patterns
/// select only tables. Pattern text is quoted so that case and special
/// characters match exactly; `*` stays a wildcard.
pub fn selection_args(config: &Config) -> Vec<String> {
    let mut args = Vec::new();
    for p in &config.source.include_tables {
        match p.strip_suffix(".*") {
            Some(schema) if !schema.contains('*') => args.push(format!("--schema={}", quote_pattern(schema))),
            _ => args.push(format!("--table={}", table_pattern(p))),
        }
    }
    for p in &config.source.exclude_tables {
        match p.strip_suffix(".*") {
            Some(schema) if !schema.contains('*') => args.push(format!("--exclude-schema={}", quote_pattern(schema))),
            _ => args.push(format!("--exclude-table={}", table_pattern(p))),
        }
    }
    args
}

/// The selection is whole schemas (or everything), not single tables.
pub fn selects_whole_schemas(config: &Config) -> bool {
    config.source.include_tables.iter().all(|p| p.strip_suffix(".*").is_some_and(|s| !s.contains('*')))
}

fn table_pattern(p: &str) -> String {
    match p.split_once('.') {
        Some((s, t)) => format!("{}.{}", quote_pattern(s), quote_pattern(t)),
        None => quote_pattern(p),
    }
}

/// `a*b` → `"a"*"b"`: literal parts in double quotes, wildcards outside.
fn quote_pattern(p: &str) -> String {
    p.split('*')
        .map(|part| if part.is_empty() { String::new() } else { format!("\"{}\"", part.replace('"', "\"\"")) })
        .collect::<Vec<_>>()
        .join("*")
}

/// A dump split into the settings before its first object and its objects.
#[derive(Debug, Default, PartialEq)]
pub struct SplitDump {
    pub prologue: String,
    pub steps: Vec<SchemaStep>,
}

/// Splits pg_dump's plain output at its object headers. psql's
/// `\restrict`/`\unrestrict` lines (which only guard psql itself) are
/// dropped; any other psql command is refused. The decant extension is
/// left out: it belongs to the source.
pub fn split_dump(text: &str) -> Result<SplitDump, SchemaError> {
    let mut out = SplitDump::default();
    let mut current: Option<SchemaStep> = None;
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        // A header block: "--", "-- <what>", "--". Comment lines elsewhere
        // may be part of a function body and are kept.
        if line == "--" && lines.get(i + 2) == Some(&"--") && lines.get(i + 1).is_some_and(|l| l.starts_with("-- ")) {
            if let Some(rest) = lines[i + 1].strip_prefix("-- Name: ") {
                if let Some(step) = current.take() {
                    push_step(&mut out.steps, step);
                }
                let field = |name: &str| {
                    rest.split("; ").find_map(|f| f.strip_prefix(name)).map(|v| if v == "-" { String::new() } else { v.to_owned() })
                };
                current = Some(SchemaStep {
                    kind: field("Type: ").unwrap_or_default(),
                    schema: field("Schema: ").unwrap_or_default(),
                    name: rest.split("; ").next().unwrap_or_default().to_owned(),
                    sql: String::new(),
                    ..Default::default()
                });
            }
            i += 3;
            continue;
        }
        i += 1;
        if line.starts_with('\\') {
            if line.starts_with("\\restrict ") || line.starts_with("\\unrestrict ") {
                continue;
            }
            return Err(SchemaError::MetaCommand(line.to_owned()));
        }
        match &mut current {
            Some(step) => {
                if !(line.is_empty() && step.sql.is_empty()) {
                    step.sql.push_str(line);
                    step.sql.push('\n');
                }
            }
            None if line.is_empty() || line.starts_with("--") => {}
            None => {
                out.prologue.push_str(line);
                out.prologue.push('\n');
            }
        }
    }
    if let Some(step) = current.take() {
        push_step(&mut out.steps, step);
    }
    Ok(out)
}

fn push_step(steps: &mut Vec<SchemaStep>, mut step: SchemaStep) {
    let is_decant = (step.kind == "EXTENSION" && step.name == "decant") || step.name == "EXTENSION decant";
    let trimmed = step.sql.trim_end().len();
    step.sql.truncate(trimmed);
    if !is_decant && !step.sql.is_empty() {
        steps.push(step);
    }
}

/// Decides how the applier schedules each post-data step, keeping pg_dump's
/// order, which already respects every dependency pg_dump knows: comments
/// after their constraint, index attachments after both indexes, a foreign
/// key after the key it references, CLUSTER ON and REPLICA IDENTITY USING
/// INDEX inside their index's step, materialized views refreshed after
/// those they read.
///
/// Only runs of indexes and index-backed or check constraints may build at
/// once: each needs nothing but its table (pg_dump sorts them first), and
/// each locks one table. Everything else keeps dump order, one step at a
/// time; foreign keys in particular lock two tables, and two tables that
/// reference each other would deadlock. A comment, security label or grant
/// goes with the step before it, the object it annotates (pg_dump writes
/// them right after their object), so it never runs before its object and
/// does not cut a parallel run short.
pub fn order_post_data(steps: &mut [SchemaStep]) {
    for step in steps {
        let order = match step.kind.as_str() {
            "COMMENT" | "SECURITY LABEL" | "ACL" => StepOrder::WithPrevious,
            "INDEX" | "CONSTRAINT" | "CHECK CONSTRAINT" => StepOrder::Parallel,
            _ => StepOrder::Sequential,
        };
        step.set_order(order);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "--
-- PostgreSQL database dump
--

\\restrict abc123

SET statement_timeout = 0;
SELECT pg_catalog.set_config('search_path', '', false);

--
-- Name: app; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA app;


--
-- Name: decant; Type: EXTENSION; Schema: -; Owner: -
--

CREATE EXTENSION IF NOT EXISTS decant WITH SCHEMA decant;


--
-- Name: EXTENSION decant; Type: COMMENT; Schema: -; Owner: 
--

COMMENT ON EXTENSION decant IS 'x';


--
-- Name: f(); Type: FUNCTION; Schema: app; Owner: -
--

CREATE FUNCTION app.f() RETURNS text
    LANGUAGE sql
    AS $$
-- a comment inside

select 'x'
$$;


\\unrestrict abc123
";

    #[test]
    fn splits_at_object_headers() {
        let d = split_dump(DUMP).unwrap();
        assert_eq!(d.prologue, "SET statement_timeout = 0;\nSELECT pg_catalog.set_config('search_path', '', false);\n");
        let kinds: Vec<(&str, &str, &str)> = d.steps.iter().map(|s| (s.kind.as_str(), s.schema.as_str(), s.name.as_str())).collect();
        assert_eq!(kinds, vec![("SCHEMA", "", "app"), ("FUNCTION", "app", "f()")]);
        assert_eq!(d.steps[0].sql, "CREATE SCHEMA app;");
        // Lines of a function body that look like comments or are empty stay.
        assert!(d.steps[1].sql.contains("$$\n-- a comment inside\n\nselect 'x'\n$$;"), "{}", d.steps[1].sql);
    }

    #[test]
    fn refuses_other_psql_commands() {
        assert!(matches!(split_dump("\\connect other\n"), Err(SchemaError::MetaCommand(_))));
    }

    #[test]
    fn patterns_keep_case_and_wildcards() {
        assert_eq!(table_pattern("App.T*x"), "\"App\".\"T\"*\"x\"");
        assert_eq!(quote_pattern("we\"ird"), "\"we\"\"ird\"");
        let mut c = Config::default();
        c.source.include_tables = vec!["app.*".into(), "hr.staff".into()];
        c.source.exclude_tables = vec!["app.tmp*".into()];
        assert_eq!(selection_args(&c), vec!["--schema=\"app\"", "--table=\"hr\".\"staff\"", "--exclude-table=\"app\".\"tmp\"*"]);
    }

    #[test]
    fn versions() {
        assert_eq!(major_of("15.20"), 15);
        assert_eq!(major_of("9.6.24"), 9);
    }

    #[test]
    fn the_newest_pg_dump_not_older_than_the_source_is_chosen() {
        let c = |list: &[(&str, Option<&str>)]| -> Vec<(PathBuf, Option<String>)> {
            list.iter().map(|(p, v)| (PathBuf::from(p), v.map(str::to_owned))).collect()
        };
        let found = c(&[
            ("/usr/bin/pg_dump", Some("15.20")),
            ("/cache/18-dev/bin/pg_dump", Some("18.6")),
            ("/usr/lib/postgresql/17/bin/pg_dump", Some("17.2")),
            ("/broken/pg_dump", None),
            ("/usr/lib/postgresql/13/bin/pg_dump", Some("13.16")),
        ]);
        // Not the first one that is new enough: the newest.
        assert_eq!(choose(found.clone(), 13).unwrap(), PathBuf::from("/cache/18-dev/bin/pg_dump"));
        assert_eq!(choose(found.clone(), 18).unwrap(), PathBuf::from("/cache/18-dev/bin/pg_dump"));
        // Minor versions count; equal versions keep the first listed.
        let minors = c(&[("/a/pg_dump", Some("18.2")), ("/b/pg_dump", Some("18.10")), ("/c/pg_dump", Some("18.10"))]);
        assert_eq!(choose(minors, 15).unwrap(), PathBuf::from("/b/pg_dump"));
        // Nothing new enough: the error names the newest one found.
        match choose(found, 19) {
            Err(SchemaError::TooOld { path, found, major }) => {
                assert_eq!((path.as_str(), found.as_str(), major), ("/cache/18-dev/bin/pg_dump", "18.6", 19));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(choose(c(&[("/broken/pg_dump", None)]), 15), Err(SchemaError::Missing { .. })));
        assert!(matches!(choose(Vec::new(), 15), Err(SchemaError::Missing { .. })));
        assert_eq!(version_key("18beta1"), vec![18]);
        assert!(version_key("9.6.24") < version_key("10.1"));
    }

    #[test]
    fn only_indexes_and_key_constraints_build_at_once_and_annotations_follow_their_object() {
        let mut steps: Vec<SchemaStep> = [
            "CONSTRAINT",
            "COMMENT",
            "INDEX",
            "CHECK CONSTRAINT",
            "INDEX ATTACH",
            "TRIGGER",
            "FK CONSTRAINT",
            "SECURITY LABEL",
            "ACL",
            "MATERIALIZED VIEW DATA",
        ]
        .into_iter()
        .map(|kind| SchemaStep { kind: kind.into(), ..Default::default() })
        .collect();
        order_post_data(&mut steps);
        let orders: Vec<StepOrder> = steps.iter().map(|s| s.order()).collect();
        use StepOrder::*;
        assert_eq!(
            orders,
            [Parallel, WithPrevious, Parallel, Parallel, Sequential, Sequential, Sequential, WithPrevious, WithPrevious, Sequential]
        );
    }
}
