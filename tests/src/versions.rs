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
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg.sh");
    let out = Command::new(&script)
        .args(["install", &major.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("decant-tests: cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "decant-tests: {} install {major} failed ({})\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(dir.join("postgres").exists(), "decant-tests: pg.sh install {major} printed {dir:?}, which has no postgres");
    dir
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
