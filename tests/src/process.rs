//! Running `decant` roles as child processes, and comparing databases.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `decant` child process, killed on drop; its output goes to a log file
/// that is printed when a test fails.
pub struct Role {
    child: Child,
    log: PathBuf,
    name: String,
}

impl Role {
    pub fn start(bin: &Path, role: &str, config: &Path, log: &Path) -> Role {
        Self::start_with(bin, role, config, &[], log)
    }

    /// With `--set` overrides.
    pub fn start_with(bin: &Path, role: &str, config: &Path, overrides: &[String], log: &Path) -> Role {
        Self::start_env(bin, role, config, overrides, None, log)
    }

    /// With `--set` overrides and, when given, this PATH.
    pub fn start_env(bin: &Path, role: &str, config: &Path, overrides: &[String], path: Option<&std::ffi::OsStr>, log: &Path) -> Role {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("role log");
        let err = out.try_clone().unwrap();
        let mut command = Command::new(bin);
        if let Some(path) = path {
            command.env("PATH", path);
        }
        let child = command
            .args([role, "--config"])
            .arg(config)
            .args(overrides.iter().flat_map(|o| ["--set", o.as_str()]))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} {role}: {e}", bin.display()));
        Role { child, log: log.to_owned(), name: role.to_owned() }
    }

    /// Waits for the process to exit by itself, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGKILL, as in a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Option<i32> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        None
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("===== decant {} log =====\n{}", self.name, self.log());
        }
        self.kill9();
    }
}

/// A checksum of a table's rows in key order (text forms), and the count.
pub fn table_digest(client: &mut postgres::Client, table: &str, order_by: &str) -> (i64, String) {
    let row = client
        .query_one(&format!("SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY {order_by})), '') FROM {table} t"), &[])
        .unwrap_or_else(|e| panic!("digest of {table}: {e}"));
    (row.get(0), row.get(1))
}

/// Waits until `f` returns true, up to `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Waits until something listens on 127.0.0.1:`port`.
pub fn wait_port(port: u16) {
    wait_for(&format!("a listener on port {port}"), Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
}

/// Runs a command that must succeed; returns its standard output.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free TCP port on 127.0.0.1 (free when asked; a test binds it soon).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The whole HTTP/1.0 answer to `GET path` on a loopback port.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Waits for a role that must fail (a non-zero exit, no panic, within
/// 60 s) and returns its output.
pub fn fails(role: &mut Role) -> String {
    let code = role.wait_exit(Duration::from_secs(60));
    let log = role.log();
    assert!(code.is_some() && code != Some(0), "expected a non-zero exit, got {code:?}:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    log
}

/// Asserts that `log` contains each of `parts`.
pub fn expect(log: &str, parts: &[&str]) {
    for p in parts {
        assert!(log.contains(p), "missing {p:?} in:\n{log}");
    }
}
