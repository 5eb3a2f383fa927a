//! The systemd units in scripts/systemd pass `systemd-analyze verify` with
//! no complaint about them (when the tool is installed).

use std::path::Path;
use std::process::Command;

#[test]
fn units_verify_cleanly() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze is not installed; skipping");
        return;
    }
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for role in ["agent", "applier"] {
        let text = std::fs::read_to_string(units.join(format!("decant-{role}@.service"))).unwrap();
        assert!(text.contains(&format!("ExecStart=/usr/local/bin/decant {role} --config /etc/decant/%i.toml")));
        // verify checks that ExecStart exists; point it at a binary that does.
        let name = format!("decant-{role}@demo.service");
        std::fs::write(dir.path().join(&name), text.replace("/usr/local/bin/decant", "/bin/true")).unwrap();
        names.push(name);
    }
    let out = Command::new("systemd-analyze").current_dir(dir.path()).arg("verify").args(&names).output().unwrap();
    let complaints: Vec<String> =
        String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.contains("decant-")).map(str::to_owned).collect();
    assert!(out.status.success() && complaints.is_empty(), "systemd-analyze verify: {complaints:#?}");
}
