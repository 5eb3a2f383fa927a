//! Servers of other PostgreSQL majors for the version matrix tests: which
//! majors to cover, and where each one's programs are (installed by
//! `scripts/pg.sh`). [`crate::Cluster::start_version`] starts one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// The matrix when `DECANT_PG_VERSIONS` is unset: the CI set.
const DEFAULT_VERSIONS: &str = "12,13,15,18";

/// The majors a version matrix test covers: `$DECANT_PG_VERSIONS` (a comma
/// list, e.g. "12,13,15,18"), else 12, 13, 15 and 18.
pub fn pg_versions() -> Vec<u32> {
    let list = std::env::var("DECANT_PG_VERSIONS").ok().filter(|l| !l.trim().is_empty());
    parse_versions(list.as_deref().unwrap_or(DEFAULT_VERSIONS))
}

fn parse_versions(list: &str) -> Vec<u32> {
    list.split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|v| v.parse().unwrap_or_else(|_| panic!("decant-tests: DECANT_PG_VERSIONS: {v:?} is not a major version")))
        .collect()
}

/// The bin directory of a PostgreSQL `major` server: `$DECANT_PG_BINDIR_<major>`
/// when set, else what `scripts/pg.sh install <major>` prints (it installs
/// the server once, in a cache outside the clone). Looked up once per major
/// and process.
pub fn bindir_of(major: u32) -> PathBuf {
    static BINDIRS: OnceLock<Mutex<HashMap<u32, PathBuf>>> = OnceLock::new();
    let mut known = BINDIRS.get_or_init(|| Mutex::new(HashMap::new())).lock().unwrap_or_else(|p| p.into_inner());
    known.entry(major).or_insert_with(|| install(major)).clone()
}

fn install(major: u32) -> PathBuf {
    if let Some(dir) = std::env::var_os(format!("DECANT_PG_BINDIR_{major}")).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let dir = pg_sh("install", major);
    assert!(dir.join("postgres").exists(), "decant-tests: pg.sh install {major} printed {dir:?}, which has no postgres");
    dir
}

/// Makes sure the server of `major` that [`bindir_of`] names has the decant
/// extension: `scripts/pg.sh plugin <major>` builds it (once per decoder
/// source hash) and installs it there. False when no plugin can be built
/// for that major here (no Debian suite has its sources: 14, 16), which is
/// printed. When `$DECANT_PG_BINDIR_<major>` names the server, its owner
/// installed the plugin. Run once per major and process.
pub fn plugin_installed(major: u32) -> bool {
    static DONE: OnceLock<Mutex<HashMap<u32, bool>>> = OnceLock::new();
    let mut done = DONE.get_or_init(|| Mutex::new(HashMap::new())).lock().unwrap_or_else(|p| p.into_inner());
    *done.entry(major).or_insert_with(|| {
        if std::env::var_os(format!("DECANT_PG_BINDIR_{major}")).is_some_and(|d| !d.is_empty()) {
            return true;
        }
        let out = run_pg_sh("plugin", major);
        if out.status.code() == Some(PG_SH_NO_SOURCE) {
            eprintln!("decant-tests: no decant plugin for PostgreSQL {major}: {}", String::from_utf8_lossy(&out.stderr).trim());
            return false;
        }
        let dir = checked(out, "plugin", major);
        assert_eq!(dir, bindir_of(major), "decant-tests: pg.sh plugin {major} installed into another server");
        true
    })
}

/// `scripts/pg.sh`'s exit status when no Debian suite has a major's sources.
const PG_SH_NO_SOURCE: i32 = 3;

/// The bin directory of PostgreSQL `major`'s client programs (pg_dump,
/// pg_restore, psql, built from the Debian source package by `scripts/pg.sh
/// dev <major>`, once): the pg_dump a migration from a source of that
/// major needs when no installed one is as new. Looked up once per major
/// and process.
pub fn client_bindir_of(major: u32) -> PathBuf {
    static BINDIRS: OnceLock<Mutex<HashMap<u32, PathBuf>>> = OnceLock::new();
    let mut known = BINDIRS.get_or_init(|| Mutex::new(HashMap::new())).lock().unwrap_or_else(|p| p.into_inner());
    known
        .entry(major)
        .or_insert_with(|| {
            let pg_config = pg_sh("dev", major);
            let dir = pg_config.parent().map(Path::to_path_buf).unwrap_or_default();
            assert!(dir.join("pg_dump").exists(), "decant-tests: pg.sh dev {major} printed {pg_config:?}, with no pg_dump beside it");
            dir
        })
        .clone()
}

/// Runs `scripts/pg.sh <command> <major>` and returns the path it prints.
fn pg_sh(command: &str, major: u32) -> PathBuf {
    checked(run_pg_sh(command, major), command, major)
}

fn run_pg_sh(command: &str, major: u32) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg.sh");
    Command::new(&script)
        .args([command, &major.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("decant-tests: cannot run {}: {e}", script.display()))
}

fn checked(out: std::process::Output, command: &str, major: u32) -> PathBuf {
    assert!(
        out.status.success(),
        "decant-tests: scripts/pg.sh {command} {major} failed ({})\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_list() {
        assert_eq!(parse_versions("12, 13,15,18"), vec![12, 13, 15, 18]);
        assert_eq!(parse_versions(DEFAULT_VERSIONS), vec![12, 13, 15, 18]);
        assert_eq!(parse_versions("18,"), vec![18]);
    }
}
