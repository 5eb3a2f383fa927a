//! A migration task for an integration test: two throwaway clusters, a
//! temp dir, the task's TOML written there, and what the tests do with it.
//!
//! ```ignore
//! use decant_tests::task::Task;
//!
//! let t = Task::builder(env!("CARGO_BIN_EXE_decant"), "m")
//!     .migrate("types = [\"schema\", \"full\", \"incremental\"]")
//!     .build();
//! t.pgbench_init("1");
//! let mut m = t.migrate_until_incremental("migrate.log", Duration::from_secs(120));
//! t.assert_equal();
//! assert_eq!(m.stop(), Some(0));
//! ```
//!
//! The binary's path is the test's `env!("CARGO_BIN_EXE_decant")`: only the
//! test crate knows it. [`Config`] starts from settings suited to tests
//! (below); a test changes any of them with `set`/`unset` (dotted keys,
//! TOML values), adds lines to a section with `lines`, and may write a
//! [`Config`] of its own when it needs no clusters (`Config::empty`, then
//! `write`). The test defaults:
//!
//! ```toml
//! task_id = "<id>"
//! [source]      dsn, slot = "decant_<id>", heartbeat_seconds = 1
//! [destination] dsn
//! [agent]       metrics_listen = "", status_interval_seconds = 1
//! [applier]     metrics_listen = ""
//! [retry]       connection_minutes = 10, other_minutes = 1
//! [migrate]     progress = "log"
//! ```
//!
//! No metrics listener (tests run side by side), quick heartbeats and
//! status (tests wait for them), retries long enough to survive a restart
//! of a cluster yet short enough that a test sees them end, and progress
//! as log lines (the tests read the log).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::process::{free_port, run_ok, wait_for, wait_port, Role};
use crate::Cluster;

/// A task's TOML: keys in the order first set, each value as TOML text;
/// sections in the order of `decant default-config`.
#[derive(Clone, Debug)]
pub struct Config {
    /// (section, key, value); section "" is the top level.
    entries: Vec<(String, String, String)>,
}

impl Config {
    /// Only `task_id`.
    pub fn empty(id: &str) -> Config {
        Config { entries: vec![(String::new(), "task_id".into(), format!("\"{id}\""))] }
    }

    /// The test defaults (module comment), without DSNs.
    pub fn new(id: &str) -> Config {
        Config::empty(id)
            .set("source.slot", &format!("\"decant_{id}\""))
            .set("source.heartbeat_seconds", "1")
            .set("agent.metrics_listen", "\"\"")
            .set("agent.status_interval_seconds", "1")
            .set("applier.metrics_listen", "\"\"")
            .set("retry.connection_minutes", "10")
            .set("retry.other_minutes", "1")
            .set("migrate.progress", "\"log\"")
    }

    /// `source.dsn` and `destination.dsn`.
    pub fn dsns(self, source: &str, destination: &str) -> Config {
        self.set("source.dsn", &quote(source)).set("destination.dsn", &quote(destination))
    }

    /// Sets `section.key` (or a top-level `key`) to the TOML `value`, in
    /// place if it is set already.
    pub fn set(mut self, key: &str, value: &str) -> Config {
        let (section, key) = key.rsplit_once('.').unwrap_or(("", key));
        match self.entries.iter_mut().find(|(s, k, _)| s == section && k == key) {
            Some(entry) => entry.2 = value.to_owned(),
            None => self.entries.push((section.to_owned(), key.to_owned(), value.to_owned())),
        }
        self
    }

    /// Removes `section.key`, or a whole `section`.
    pub fn unset(mut self, key: &str) -> Config {
        match key.rsplit_once('.') {
            Some((section, key)) => self.entries.retain(|(s, k, _)| !(s == section && k == key)),
            None => self.entries.retain(|(s, _, _)| s != key),
        }
        self
    }

    /// Sets each `key = value` line of `text` in `section` (a value on one
    /// line; multi-line values go through `set`).
    pub fn lines(mut self, section: &str, text: &str) -> Config {
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("decant-tests: not a `key = value` line: {line:?}"));
            let key = key.trim();
            let key = if section.is_empty() { key.to_owned() } else { format!("{section}.{key}") };
            self = self.set(&key, value.trim());
        }
        self
    }

    /// The value of `section.key` as written, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        let (section, key) = key.rsplit_once('.').unwrap_or(("", key));
        self.entries.iter().find(|(s, k, _)| s == section && k == key).map(|e| e.2.as_str())
    }

    /// The TOML text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut sections: Vec<&str> = Vec::new();
        for (s, _, _) in &self.entries {
            if !sections.contains(&s.as_str()) {
                sections.push(s);
            }
        }
        // Top-level keys must come before the first table.
        const ORDER: [&str; 10] = ["", "source", "destination", "agent", "applier", "transport", "retry", "log", "migrate", "alert"];
        sections.sort_by_key(|s| ORDER.iter().position(|o| o == s).unwrap_or(ORDER.len()));
        for section in sections {
            if !section.is_empty() {
                let _ = writeln!(out, "[{section}]");
            }
            for (_, k, v) in self.entries.iter().filter(|(s, _, _)| s == section) {
                let _ = writeln!(out, "{k} = {v}");
            }
        }
        out
    }

    /// Writes the TOML to `path`; returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.render()).unwrap_or_else(|e| panic!("decant-tests: cannot write {}: {e}", path.display()));
        path.to_owned()
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Runs a one-shot command, `bin ARGS --config config`; returns (exit
/// success, stdout + stderr).
pub fn command(bin: &Path, config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin).args(args).arg("--config").arg(config).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Builds a [`Task`]: [`Task::builder`].
pub struct TaskBuilder {
    bin: PathBuf,
    config: Config,
    source: Option<Cluster>,
    dest: Option<Cluster>,
    db: String,
    create_db: Option<String>,
    applier_port: Option<u16>,
    path_first: Option<PathBuf>,
}

impl TaskBuilder {
    /// A directory searched first on the PATH of the decant processes
    /// (e.g. where a newer pg_dump is, for decant to find by itself).
    pub fn path_first(mut self, dir: impl Into<PathBuf>) -> TaskBuilder {
        self.path_first = Some(dir.into());
        self
    }

    /// The source cluster (default: a fresh one).
    pub fn source(mut self, cluster: Cluster) -> TaskBuilder {
        self.source = Some(cluster);
        self
    }

    /// The destination cluster (default: a fresh one).
    pub fn destination(mut self, cluster: Cluster) -> TaskBuilder {
        self.dest = Some(cluster);
        self
    }

    /// Migrates database `db` (default `postgres`): created on the source
    /// with `create_options` (e.g. "ENCODING 'LATIN1' ... TEMPLATE
    /// template0") and plainly on the destination.
    pub fn database(mut self, db: &str, create_options: &str) -> TaskBuilder {
        self.db = db.to_owned();
        self.create_db = Some(create_options.to_owned());
        self
    }

    /// Lines for `[migrate]` (e.g. `types = [...]`).
    pub fn migrate(self, lines: &str) -> TaskBuilder {
        self.lines("migrate", lines)
    }

    /// Lines for `section`.
    pub fn lines(mut self, section: &str, lines: &str) -> TaskBuilder {
        self.config = self.config.lines(section, lines);
        self
    }

    /// [`Config::set`].
    pub fn set(mut self, key: &str, value: &str) -> TaskBuilder {
        self.config = self.config.set(key, value);
        self
    }

    /// [`Config::unset`].
    pub fn unset(mut self, key: &str) -> TaskBuilder {
        self.config = self.config.unset(key);
        self
    }

    /// Agent and applier as separate roles on a free loopback port,
    /// authenticated by `token` ([`Task::applier`] waits for it).
    pub fn transport(mut self, token: &str) -> TaskBuilder {
        let port = free_port();
        self.applier_port = Some(port);
        self.config = self
            .config
            .set("agent.applier_url", &format!("\"http://127.0.0.1:{port}\""))
            .set("applier.listen", &format!("\"127.0.0.1:{port}\""))
            .set("transport.token", &quote(token));
        self
    }

    /// Starts what is missing and writes the configuration.
    pub fn build(self) -> Task {
        let source = self.source.unwrap_or_else(Cluster::start);
        let dest = self.dest.unwrap_or_else(Cluster::start);
        if let Some(options) = &self.create_db {
            source.connect().batch_execute(&format!("CREATE DATABASE {} {options}", self.db)).unwrap();
            dest.connect().batch_execute(&format!("CREATE DATABASE {}", self.db)).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("task.toml");
        let config = self.config.dsns(&source.conninfo(&self.db), &dest.conninfo(&self.db));
        config.write(&config_path);
        let id = config.get("task_id").unwrap_or_default().trim_matches('"').to_owned();
        Task {
            source,
            dest,
            db: self.db,
            dir,
            config_path,
            config,
            id,
            bin: self.bin,
            applier_port: self.applier_port,
            path_first: self.path_first,
        }
    }
}

/// A source, a destination and a task between them; the clusters are
/// stopped and the temp dir removed on drop.
pub struct Task {
    pub source: Cluster,
    pub dest: Cluster,
    /// The database migrated, on both sides.
    pub db: String,
    /// Holds `task.toml` and the roles' logs.
    pub dir: tempfile::TempDir,
    /// `task.toml`.
    pub config_path: PathBuf,
    /// What `task.toml` holds ([`Task::edit`] changes both).
    pub config: Config,
    pub id: String,
    /// The decant binary.
    pub bin: PathBuf,
    /// The applier's port, with [`TaskBuilder::transport`].
    pub applier_port: Option<u16>,
    /// See [`TaskBuilder::path_first`].
    pub path_first: Option<PathBuf>,
}

impl Task {
    /// Fresh source and destination clusters and task `id` with the test
    /// defaults; `bin` is `env!("CARGO_BIN_EXE_decant")`.
    pub fn builder(bin: impl Into<PathBuf>, id: &str) -> TaskBuilder {
        TaskBuilder {
            bin: bin.into(),
            config: Config::new(id),
            source: None,
            dest: None,
            db: "postgres".into(),
            create_db: None,
            applier_port: None,
            path_first: None,
        }
    }

    /// Changes the configuration and writes it again.
    pub fn edit(&mut self, f: impl FnOnce(Config) -> Config) {
        self.config = f(self.config.clone());
        self.config.write(&self.config_path);
    }

    /// `name` in the task's temp dir (an absolute `name` stays as it is).
    pub fn path(&self, name: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A client of the task's database on the source.
    pub fn src(&self) -> postgres::Client {
        self.source.connect_db(&self.db)
    }

    /// A client of the task's database on the destination.
    pub fn dst(&self) -> postgres::Client {
        self.dest.connect_db(&self.db)
    }

    /// Starts `decant <role> --config task.toml`, logging to `log` (a name
    /// in the temp dir, or an absolute path).
    pub fn start(&self, role: &str, log: impl AsRef<Path>) -> Role {
        self.start_with(role, &[], log)
    }

    /// Same, with `--set` overrides.
    pub fn start_with(&self, role: &str, overrides: &[String], log: impl AsRef<Path>) -> Role {
        let path = self.path_first.as_ref().map(|first| {
            let rest = std::env::var_os("PATH").unwrap_or_default();
            std::env::join_paths(std::iter::once(first.clone()).chain(std::env::split_paths(&rest))).unwrap_or_default()
        });
        Role::start_env(&self.bin, role, &self.config_path, overrides, path.as_deref(), &self.path(log))
    }

    /// `decant migrate`.
    pub fn migrate(&self, log: &str) -> Role {
        self.start("migrate", log)
    }

    /// `decant applier`, waited for until it listens (needs
    /// [`TaskBuilder::transport`]).
    pub fn applier(&self, overrides: &[String], log: &str) -> Role {
        let role = self.start_with("applier", overrides, log);
        wait_port(self.applier_port.expect("decant-tests: an applier needs TaskBuilder::transport"));
        role
    }

    /// Waits until the agent streams from the task's slot.
    pub fn wait_slot_active(&self, timeout: Duration) {
        let slot = self.config.get("source.slot").unwrap_or_default().trim_matches('"').to_owned();
        let mut c = self.source.connect();
        wait_for("the agent's slot to stream", timeout, || {
            c.query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active", &[&slot]).unwrap().get::<_, i64>(0)
                == 1
        });
    }

    /// Runs a one-shot command (`decant ARGS --config task.toml`); returns
    /// (exit success, stdout + stderr).
    pub fn command(&self, args: &[&str]) -> (bool, String) {
        command(&self.bin, &self.config_path, args)
    }

    /// The task's phase in the destination's `decant.task` ("" before the
    /// plan is stored).
    pub fn phase(&self) -> String {
        self.dst()
            .query_opt("SELECT phase FROM decant.task WHERE task_id = $1", &[&self.id])
            .ok()
            .flatten()
            .map(|r| r.get(0))
            .unwrap_or_default()
    }

    /// Waits until the task's phase is `incremental`.
    pub fn wait_incremental(&self, timeout: Duration) {
        wait_for("the stream phase", timeout, || self.phase() == "incremental");
    }

    /// Starts `decant migrate` and waits until it streams; it must not
    /// exit on the way.
    pub fn migrate_until_incremental(&self, log: &str, timeout: Duration) -> Role {
        let mut m = self.migrate(log);
        wait_for("the stream phase", timeout, || {
            assert!(m.is_running(), "decant migrate ended:\n{}", m.log());
            self.phase() == "incremental"
        });
        m
    }

    /// `decant verify --wait 120`: every table equal once the destination
    /// caught up; returns its output.
    pub fn assert_equal(&self) -> String {
        let (ok, out) = self.command(&["verify", "--wait", "120"]);
        assert!(ok, "verify failed:\n{out}");
        assert!(out.contains("tables equal"), "{out}");
        out
    }

    /// `pgbench -i -s scale` on the source, with pgbench_history (no key)
    /// given REPLICA IDENTITY FULL.
    pub fn pgbench_init(&self, scale: &str) {
        run_ok(self.source.tool("pgbench").args(["-i", "-s", scale, "-q", &self.db]));
        self.src().batch_execute("ALTER TABLE pgbench_history REPLICA IDENTITY FULL").unwrap();
    }

    /// A pgbench run (2 clients) in the background for `seconds`.
    pub fn pgbench_load(&self, seconds: u32) -> Child {
        self.source
            .tool("pgbench")
            .args(["-n", "-c", "2", "-T", &seconds.to_string(), &self.db])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_sets_in_place_and_renders_top_level_first() {
        let c = Config::new("x")
            .dsns("host=a", "host=b")
            .lines("migrate", "types = [\"full\"]\nworkers = 4")
            .set("retry.other_minutes", "2")
            .unset("agent.status_interval_seconds")
            .set("alert.url", "\"u\"")
            .unset("alert");
        let text = c.render();
        assert!(
            text.starts_with("task_id = \"x\"\n[source]\nslot = \"decant_x\"\nheartbeat_seconds = 1\ndsn = \"host=a\"\n[destination]\n"),
            "{text}"
        );
        assert!(text.contains("[retry]\nconnection_minutes = 10\nother_minutes = 2\n"), "{text}");
        assert!(text.contains("[migrate]\nprogress = \"log\"\ntypes = [\"full\"]\nworkers = 4\n"), "{text}");
        assert!(!text.contains("status_interval") && !text.contains("alert"), "{text}");
        assert_eq!(c.get("destination.dsn"), Some("\"host=b\""));
    }
}
