//! Throwaway PostgreSQL clusters for integration tests.
//!
//! Every [`Cluster`] is a fresh `initdb` in its own temp dir, started with
//! `pg_ctl` on a free 127.0.0.1 port with `wal_level = logical`, and torn
//! down (`pg_ctl stop -m immediate`, temp dir removed) when dropped.
//!
//! PostgreSQL refuses to run as root, so when the test process has euid 0
//! the server programs are run as the `postgres` OS user via `runuser`, and
//! the temp dir is chowned to that user.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};

/// Lines of server log printed by `Drop` when a test is panicking.
const LOG_TAIL_LINES: usize = 200;
/// How many ports `start` tries before giving up on port clashes.
const PORT_ATTEMPTS: usize = 5;
const HOST: &str = "127.0.0.1";
const PLUGIN_LIBRARIES: &str = "pgoutput, test_decoding, decant, wal2json, decoderbufs";

/// A running throwaway PostgreSQL cluster; stopped and deleted on drop.
pub struct Cluster {
    /// Temp dir holding `data/`, `server.log` and the unix socket.
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    log_path: PathBuf,
    bindir: PathBuf,
    port: u16,
    /// Whether the server is (believed to be) running, so Drop knows to stop it.
    running: bool,
}

impl Cluster {
    /// initdb + pg_ctl start on a free 127.0.0.1 port in a fresh temp dir.
    pub fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// Same, with extra postgresql.conf lines appended (e.g. "max_wal_senders = 30").
    pub fn start_with(extra_conf: &[&str]) -> Cluster {
        let mut cluster = Cluster::unstarted(bindir_default().to_path_buf());
        cluster.initdb();
        cluster.check_hba();
        cluster.launch(extra_conf);
        cluster
    }

    /// initdb + pg_ctl start of a server of PostgreSQL `major` (bin
    /// directory from [`crate::versions::bindir_of`]), with the same settings as [`Cluster::start`].
    pub fn start_version(major: u32) -> Cluster {
        Cluster::start_version_with(major, &[])
    }

    /// Same, with extra postgresql.conf lines.
    pub fn start_version_with(major: u32, extra_conf: &[&str]) -> Cluster {
        let mut cluster = Cluster::unstarted(crate::versions::bindir_of(major));
        cluster.initdb();
        cluster.check_hba();
        cluster.launch(extra_conf);
        cluster
    }

    /// A hot standby of this cluster (`pg_basebackup -R`), started on a
    /// free port, with extra postgresql.conf lines.
    pub fn start_standby(&self, extra_conf: &[&str]) -> Cluster {
        let mut standby = Cluster::unstarted(self.bindir.clone());
        let mut cmd = standby.server_cmd("pg_basebackup");
        cmd.args(["-h", HOST, "-p", &self.port.to_string(), "-U", "postgres", "-R", "-X", "stream", "--no-sync", "-D"])
            .arg(&standby.data_dir);
        let out = run_capture(&mut cmd);
        assert!(out.status.success(), "decant-tests: pg_basebackup failed\n{}", describe_output(&out));
        standby.launch(extra_conf);
        standby
    }

    /// A fresh temp dir (owned by the server's OS user) where `data/` is
    /// still to be made; nothing runs yet.
    fn unstarted(bindir: PathBuf) -> Cluster {
        let dir =
            tempfile::Builder::new().prefix("decant-pg-").tempdir().unwrap_or_else(|e| panic!("decant-tests: cannot create temp dir: {e}"));
        if is_root() {
            let (uid, gid) = postgres_user();
            chown(dir.path(), uid, gid);
        }
        let data_dir = dir.path().join("data");
        let log_path = dir.path().join("server.log");
        Cluster { dir, data_dir, log_path, bindir, port: 0, running: false }
    }

    /// Starts the server of a prepared data directory on a free port.
    fn launch(&mut self, extra_conf: &[&str]) {
        let cluster = self;
        let base_conf = fs::read_to_string(cluster.conf_path())
            .unwrap_or_else(|e| panic!("decant-tests: cannot read {}: {e}", cluster.conf_path().display()));
        let mut last_err = String::new();
        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port();
            cluster.port = port;
            cluster.write_conf(&base_conf, extra_conf);
            let log_offset = fs::metadata(&cluster.log_path).map_or(0, |m| m.len());
            let out = cluster.pg_ctl("start", &[]);
            if out.status.success() {
                cluster.running = true;
                return;
            }
            let new_log = cluster.log_since(log_offset);
            last_err = format!("attempt {attempt} on port {port}: {}\n--- server log (this attempt) ---\n{new_log}", describe_output(&out));
            if !is_port_clash(&new_log) {
                break;
            }
            // The postmaster may have left a stale pid file behind; it exits
            // on bind failure, so nothing to stop. Try the next port.
        }
        panic!("decant-tests: pg_ctl start failed (data dir {})\n{last_err}", cluster.data_dir.display());
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &str {
        HOST
    }

    /// libpq keyword/value string for database `db` as user postgres.
    pub fn conninfo(&self, db: &str) -> String {
        format!("host={HOST} port={} user=postgres dbname={}", self.port, quote_conninfo_value(db))
    }

    /// A connected sync client (postgres crate, NoTls) to database `postgres`.
    pub fn connect(&self) -> postgres::Client {
        self.connect_db("postgres")
    }

    pub fn connect_db(&self, db: &str) -> postgres::Client {
        let conninfo = self.conninfo(db);
        postgres::Client::connect(&conninfo, postgres::NoTls).unwrap_or_else(|e| {
            panic!("decant-tests: cannot connect with {conninfo:?}: {e}\n--- server log ---\n{}", self.log_tail(LOG_TAIL_LINES))
        })
    }

    /// Creates `user` (superuser, replication) with `password` and makes
    /// the server ask for it (scram-sha-256) on TCP, in lines put before
    /// the trust lines, which the harness's own `postgres` connections go
    /// on using. With `tls_and_certificate`, `user` may only connect over
    /// TLS and with a client certificate for `user` as well (the server's
    /// TLS must be on, see `certs::Certs::install_in_server`).
    pub fn add_password_user(&self, user: &str, password: &str, tls_and_certificate: bool) {
        let mut c = self.connect();
        c.batch_execute(&format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE \"{}\" SUPERUSER LOGIN REPLICATION PASSWORD '{}'",
            user.replace('"', "\"\""),
            password.replace('\'', "''")
        ))
        .unwrap_or_else(|e| panic!("decant-tests: cannot create role {user}: {e}"));
        let line = if tls_and_certificate {
            // Without TLS the hostssl line does not match: the trust lines
            // below it would.
            format!(
                "hostssl all,replication {user} {HOST}/32 scram-sha-256 clientcert=verify-full\n\
                 hostnossl all,replication {user} {HOST}/32 reject\n"
            )
        } else {
            format!("host all,replication {user} {HOST}/32 scram-sha-256\n")
        };
        let hba_path = self.data_dir.join("pg_hba.conf");
        let hba = fs::read_to_string(&hba_path).unwrap_or_else(|e| panic!("decant-tests: cannot read {}: {e}", hba_path.display()));
        // pg_hba.conf belongs to the server's user; root may write it, and a
        // non-root runner is that user.
        fs::write(&hba_path, format!("{line}{hba}")).unwrap_or_else(|e| panic!("decant-tests: cannot write {}: {e}", hba_path.display()));
        c.batch_execute("SELECT pg_reload_conf()").unwrap_or_else(|e| panic!("decant-tests: reload: {e}"));
        // The postmaster reloads on the signal, a moment later.
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    /// Contents of the server log so far.
    pub fn log(&self) -> String {
        match fs::read(&self.log_path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => String::new(),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// A PostgreSQL client program of this cluster's version (psql,
    /// pg_dump, pgbench…) with host, port and user set; the system
    /// server's when this cluster's installation has none (the servers of
    /// other majors come without client programs; psql and pgbench work
    /// with older and newer servers).
    pub fn tool(&self, program: &str) -> Command {
        let own = self.bindir.join(program);
        let mut c = Command::new(if own.exists() { own } else { bindir_default().join(program) });
        c.args(["-h", HOST, "-p", &self.port.to_string(), "-U", "postgres"]);
        c
    }

    /// `pg_dump --schema-only` of database `db` with what legitimately
    /// differs after a migration taken out: the restrict keys, comments
    /// and blank lines, and decant's own schema and extension.
    pub fn normalized_schema(&self, db: &str) -> String {
        let out = self
            .tool("pg_dump")
            .args(["--schema-only", "--no-owner", "--exclude-schema=decant", "-d", db])
            .output()
            .unwrap_or_else(|e| panic!("pg_dump: {e}"));
        assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict") && !l.starts_with("--") && !l.trim().is_empty())
            .filter(|l| !l.contains("EXTENSION IF NOT EXISTS decant") && !l.contains("EXTENSION decant"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// pg_ctl restart (-m fast), keeping port and data.
    pub fn restart(&self) {
        let out = self.pg_ctl("restart", &["-m", "fast"]);
        if !out.status.success() {
            panic!(
                "decant-tests: pg_ctl restart failed (port {}, data dir {})\n{}\n--- server log ---\n{}",
                self.port,
                self.data_dir.display(),
                describe_output(&out),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
    }

    /// Stops the server (fast shutdown) until [`Cluster::start_again`].
    pub fn stop(&self) {
        let out = self.pg_ctl("stop", &["-m", "fast"]);
        assert!(out.status.success(), "decant-tests: pg_ctl stop failed (port {})\n{}", self.port, describe_output(&out));
    }

    /// Starts a server stopped by [`Cluster::stop`] again, on its port.
    pub fn start_again(&self) {
        let out = self.pg_ctl("start", &[]);
        assert!(out.status.success(), "decant-tests: pg_ctl start failed (port {})\n{}", self.port, describe_output(&out));
    }

    // ----- internals -------------------------------------------------------

    fn conf_path(&self) -> PathBuf {
        self.data_dir.join("postgresql.conf")
    }

    /// The last `n` lines of the server log.
    fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(n);
        let mut out = String::new();
        if start > 0 {
            let _ = writeln!(out, "[... {start} earlier lines omitted ...]");
        }
        for line in &lines[start..] {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    fn log_since(&self, offset: u64) -> String {
        let bytes = fs::read(&self.log_path).unwrap_or_default();
        let offset = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
        String::from_utf8_lossy(&bytes[offset..]).into_owned()
    }

    /// A command running server program `prog` from the bindir, as the
    /// postgres OS user when we are root.
    fn server_cmd(&self, prog: &str) -> Command {
        server_command(&self.bindir.join(prog), self.dir.path())
    }

    /// `pg_ctl ACTION [options] -w -t 60 -D data -l log`.
    fn pg_ctl(&self, action: &str, options: &[&str]) -> Output {
        let mut cmd = self.server_cmd("pg_ctl");
        cmd.arg(action).args(options).args(["-w", "-t", "60", "-D"]).arg(&self.data_dir).arg("-l").arg(&self.log_path);
        run_capture(&mut cmd)
    }

    fn initdb(&self) {
        let base: [&OsStr; 6] = [
            OsStr::new("-D"),
            self.data_dir.as_os_str(),
            OsStr::new("-U"),
            OsStr::new("postgres"),
            OsStr::new("--auth=trust"),
            OsStr::new("--no-sync"),
        ];
        let mut first_err = None;
        for locale in ["--locale=C.UTF-8", "--no-locale"] {
            let mut cmd = self.server_cmd("initdb");
            cmd.args(base).args(["-E", "UTF8", locale]);
            let out = run_capture(&mut cmd);
            if out.status.success() {
                return;
            }
            let msg = format!("{cmd:?}\n{}", describe_output(&out));
            if first_err.is_none() {
                first_err = Some(msg);
                // initdb removes a data dir it created when it fails, but be
                // sure before retrying.
                let _ = fs::remove_dir_all(&self.data_dir);
            } else {
                panic!(
                    "decant-tests: initdb failed with both locales\n--- with C.UTF-8 ---\n{}\n--- with --no-locale ---\n{msg}",
                    first_err.unwrap_or_default()
                );
            }
        }
    }

    /// initdb --auth=trust should already allow replication connections from
    /// 127.0.0.1; add the line if it does not.
    fn check_hba(&self) {
        let hba_path = self.data_dir.join("pg_hba.conf");
        let hba = fs::read_to_string(&hba_path).unwrap_or_else(|e| panic!("decant-tests: cannot read {}: {e}", hba_path.display()));
        let has_repl = hba.lines().any(|line| {
            let toks: Vec<&str> = line.split('#').next().unwrap_or("").split_whitespace().collect();
            toks.len() >= 5
                && toks[0] == "host"
                && toks[1] == "replication"
                && toks[2] == "all"
                && toks[3] == "127.0.0.1/32"
                && toks[4] == "trust"
        });
        if !has_repl {
            append_file(&hba_path, "host    replication     all             127.0.0.1/32            trust\n");
        }
    }

    /// Rewrite postgresql.conf as initdb's version plus our settings (the
    /// port changes between start attempts).
    fn write_conf(&self, base_conf: &str, extra_conf: &[&str]) {
        let mut conf = String::from(base_conf);
        if !conf.ends_with('\n') {
            conf.push('\n');
        }
        conf.push_str("\n# --- decant-tests harness ---\n");
        let socket_dir = self.dir.path().display().to_string().replace('\'', "''");
        let _ = writeln!(conf, "port = {}", self.port);
        let _ = writeln!(conf, "listen_addresses = '{HOST}'");
        let _ = writeln!(conf, "unix_socket_directories = '{socket_dir}'");
        for line in [
            "wal_level = logical",
            "max_replication_slots = 20",
            "max_wal_senders = 20",
            "fsync = off",
            // synchronous_commit stays on: logical decoding reads only WAL that
            // is flushed, and tests read a slot right after committing.
            "full_page_writes = off",
            "shared_buffers = 128MB",
            "log_min_messages = warning",
        ] {
            conf.push_str(line);
            conf.push('\n');
        }
        if server_knows_output_plugin_libraries(&self.bindir) {
            let _ = writeln!(conf, "output_plugin_libraries = '{PLUGIN_LIBRARIES}'");
        }
        if !extra_conf.is_empty() {
            conf.push_str("# --- extra ---\n");
            for line in extra_conf {
                conf.push_str(line);
                conf.push('\n');
            }
        }
        // Write via truncate (the file is owned by postgres; root may write it,
        // and a non-root runner is the owner).
        fs::write(self.conf_path(), conf).unwrap_or_else(|e| panic!("decant-tests: cannot write {}: {e}", self.conf_path().display()));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut msg = String::new();
            let _ = writeln!(
                msg,
                "\n===== decant-tests: server log of cluster on port {} (data dir {}), last {LOG_TAIL_LINES} lines =====",
                self.port,
                self.data_dir.display()
            );
            msg.push_str(&self.log_tail(LOG_TAIL_LINES));
            let _ = writeln!(msg, "===== end of server log (port {}) =====", self.port);
            let _ = std::io::stderr().write_all(msg.as_bytes());
        }
        if self.running || self.data_dir.join("postmaster.pid").exists() {
            let out = self.pg_ctl("stop", &["-m", "immediate"]);
            if !out.status.success() && self.running {
                eprintln!(
                    "decant-tests: pg_ctl stop failed for cluster on port {} ({}): {}",
                    self.port,
                    self.data_dir.display(),
                    describe_output(&out)
                );
            }
            self.running = false;
        }
        // `self.dir` (TempDir) is dropped after this and removes everything.
    }
}

// ----- process-wide helpers -------------------------------------------------

/// Directory holding initdb, pg_ctl and postgres: `$DECANT_PG_BINDIR`, else
/// `pg_config --bindir`, else /usr/lib/postgresql/15/bin.
fn bindir_default() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("DECANT_PG_BINDIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").stdin(Stdio::null()).output() {
            let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !dir.is_empty() && Path::new(&dir).join("initdb").exists() {
                return PathBuf::from(dir);
            }
        }
        PathBuf::from("/usr/lib/postgresql/15/bin")
    })
}

/// Whether this server build has the `output_plugin_libraries` GUC
/// (`postgres --describe-config`), detected once per bin directory: only
/// some builds have it, and a server refuses a setting it does not know.
fn server_knows_output_plugin_libraries(bindir: &Path) -> bool {
    static KNOWN: OnceLock<Mutex<HashMap<PathBuf, bool>>> = OnceLock::new();
    let mut known = KNOWN.get_or_init(|| Mutex::new(HashMap::new())).lock().unwrap_or_else(|p| p.into_inner());
    *known.entry(bindir.to_path_buf()).or_insert_with(|| {
        let mut cmd = server_command(&bindir.join("postgres"), Path::new("/"));
        cmd.arg("--describe-config");
        let out = run_capture(&mut cmd);
        if !out.status.success() {
            panic!("decant-tests: {cmd:?} failed\n{}", describe_output(&out));
        }
        String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("output_plugin_libraries"))
    })
}

fn server_command(program: &Path, cwd: &Path) -> Command {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.current_dir(cwd).stdin(Stdio::null());
    cmd
}

/// Run to completion, capturing stdout/stderr; panics only if the program
/// cannot be spawned at all.
fn run_capture(cmd: &mut Command) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.output().unwrap_or_else(|e| panic!("decant-tests: cannot run {cmd:?}: {e}"))
}

fn describe_output(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn is_port_clash(log: &str) -> bool {
    log.contains("Address already in use")
        || log.contains("could not bind IPv4 address")
        || log.contains("could not create any TCP/IP sockets")
}

/// A port that was free a moment ago and that this process has not handed
/// out before (so clusters started concurrently don't pick the same one).
fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..100 {
        let listener = TcpListener::bind((HOST, 0)).unwrap_or_else(|e| panic!("decant-tests: cannot bind {HOST}:0: {e}"));
        let port = listener.local_addr().unwrap_or_else(|e| panic!("decant-tests: local_addr: {e}")).port();
        drop(listener);
        let mut set = handed_out.lock().unwrap_or_else(|p| p.into_inner());
        if set.insert(port) {
            return port;
        }
    }
    panic!("decant-tests: could not find a free port");
}

fn append_file(path: &Path, text: &str) {
    let mut f =
        fs::OpenOptions::new().append(true).open(path).unwrap_or_else(|e| panic!("decant-tests: cannot open {}: {e}", path.display()));
    f.write_all(text.as_bytes()).unwrap_or_else(|e| panic!("decant-tests: cannot write {}: {e}", path.display()));
}

/// Quote a conninfo value if it needs it (spaces, quotes, backslashes).
fn quote_conninfo_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\', '\t', '\n']) {
        return v.to_string();
    }
    let mut s = String::from("'");
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

// ----- users and ownership ---------------------------------------------------

/// Whether we run as root: /proc/self belongs to the effective user.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// uid and gid of the `postgres` OS user (looked up once, in /etc/passwd).
fn postgres_user() -> (u32, u32) {
    static USER: OnceLock<(u32, u32)> = OnceLock::new();
    *USER.get_or_init(|| {
        let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
        passwd
            .lines()
            .find_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                (f.first() == Some(&"postgres") && f.len() > 3).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?))).flatten()
            })
            .unwrap_or_else(|| panic!("decant-tests: running as root but there is no `postgres` OS user to run the server as"))
    })
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("decant-tests: chown {} to {uid}:{gid} failed: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_quoting() {
        assert_eq!(quote_conninfo_value("postgres"), "postgres");
        assert_eq!(quote_conninfo_value("a b"), "'a b'");
        assert_eq!(quote_conninfo_value("it's"), "'it\\'s'");
        assert_eq!(quote_conninfo_value(""), "''");
    }

    #[test]
    fn port_clash_detection() {
        assert!(is_port_clash("LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use"));
        assert!(!is_port_clash("FATAL:  invalid value for parameter"));
    }
}
