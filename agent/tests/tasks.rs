//! Several tasks writing into one destination, split by tables.
//!
//! Two tasks over disjoint tables of one source — one as agent and applier
//! (two processes, its own applier port), one as `decant migrate` — run at
//! the same time under a pgbench load, with schema, full copy and stream;
//! both verify equal; `decant status` lists both; a third task whose
//! tables overlap is refused before anything is written (no slot, no
//! claim); two tasks claiming the same whole schema at the same moment:
//! exactly one passes; one `decant cutover` fences both.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use decant_tests::process::{free_port, run_ok, wait_for, wait_port, Role};
use decant_tests::Cluster;

fn decant() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_decant"))
}

/// Writes the configuration of task `id` selecting `tables`; `port`: the
/// applier's, for a task run as agent and applier.
fn task_config(dir: &Path, id: &str, source: &Cluster, dest: &Cluster, tables: &[&str], types: &str, port: Option<u16>) -> PathBuf {
    let path = dir.join(format!("{id}.toml"));
    let tables = tables.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", ");
    let (agent, applier, transport) = match port {
        Some(p) => (
            format!("applier_url = \"http://127.0.0.1:{p}\"\n"),
            format!("listen = \"127.0.0.1:{p}\"\n"),
            "[transport]\ntoken = \"tasks test\"\n",
        ),
        None => (String::new(), String::new(), ""),
    };
    std::fs::write(
        &path,
        format!(
            "task_id = \"{id}\"\n\
             [source]\ndsn = \"{}\"\nslot = \"decant_{id}\"\nheartbeat_seconds = 1\ninclude_tables = [{tables}]\n\
             [destination]\ndsn = \"{}\"\n\
             [agent]\n{agent}metrics_listen = \"\"\nstatus_interval_seconds = 1\n\
             [applier]\n{applier}metrics_listen = \"\"\n\
             {transport}\
             [migrate]\nprogress = \"log\"\ntypes = {types}\nconflicts = \"ignore\"\n",
            source.conninfo("postgres"),
            dest.conninfo("postgres")
        ),
    )
    .unwrap();
    path
}

fn command(args: &[&str], configs: &[&Path]) -> (bool, String) {
    let mut cmd = Command::new(decant());
    cmd.args(args);
    for c in configs {
        cmd.arg("--config").arg(c);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn phase(dest: &Cluster, task: &str) -> String {
    dest.connect()
        .query_opt("SELECT phase FROM decant.task WHERE task_id = $1", &[&task])
        .ok()
        .flatten()
        .map(|r| r.get(0))
        .unwrap_or_default()
}

fn count(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn tasks_split_by_tables_run_together_and_overlaps_are_refused() {
    let (source, dest) = (Cluster::start(), Cluster::start());
    let dir = tempfile::tempdir().unwrap();
    run_ok(source.tool("pgbench").args(["-i", "-s", "1", "-q", "postgres"]));
    source
        .connect()
        .batch_execute(
            "ALTER TABLE pgbench_history REPLICA IDENTITY FULL;
             CREATE SCHEMA billing;
             CREATE TABLE billing.invoices (id bigserial PRIMARY KEY, amount numeric NOT NULL, note text);
             INSERT INTO billing.invoices (amount, note) SELECT g, 'n' || g FROM generate_series(1, 2000) g;
             CREATE SCHEMA spare;
             CREATE TYPE spare.mood AS ENUM ('calm', 'busy');
             CREATE TABLE spare.s1 (id int PRIMARY KEY, mood spare.mood);
             CREATE TABLE spare.s2 (id int PRIMARY KEY);
             CREATE FUNCTION spare.twice(int) RETURNS int LANGUAGE sql AS 'SELECT $1 * 2';
             INSERT INTO spare.s1 SELECT g, 'calm' FROM generate_series(1, 100) g;",
        )
        .unwrap();
    let all = "[\"schema\", \"full\", \"incremental\"]";
    let port = free_port();
    let a = task_config(dir.path(), "ta", &source, &dest, &["public.pgbench_accounts", "public.pgbench_branches"], all, Some(port));
    let b =
        task_config(dir.path(), "tb", &source, &dest, &["public.pgbench_tellers", "public.pgbench_history", "billing.invoices"], all, None);

    // Both tasks start at the same moment, under load.
    let mut pgbench =
        source.tool("pgbench").args(["-n", "-c", "2", "-T", "20", "postgres"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let invoices = {
        let mut c = source.connect();
        std::thread::spawn(move || {
            let until = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < until {
                c.batch_execute(
                    "INSERT INTO billing.invoices (amount, note) VALUES (random() * 100, 'load');
                     UPDATE billing.invoices SET amount = amount + 1 WHERE id = (SELECT max(id) - 7 FROM billing.invoices);",
                )
                .unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut applier = Role::start(decant(), "applier", &a, &dir.path().join("ta-applier.log"));
    let mut migrate_b = Role::start(decant(), "migrate", &b, &dir.path().join("tb-migrate.log"));
    wait_port(port);
    let mut agent = Role::start(decant(), "agent", &a, &dir.path().join("ta-agent.log"));
    wait_for("both tasks streaming", Duration::from_secs(240), || {
        assert!(agent.is_running(), "{}", agent.log());
        assert!(migrate_b.is_running(), "{}", migrate_b.log());
        phase(&dest, "ta") == "incremental" && phase(&dest, "tb") == "incremental"
    });
    assert!(pgbench.wait().unwrap().success());
    invoices.join().unwrap();

    for config in [&a, &b] {
        let (ok, out) = command(&["verify", "--wait", "120"], &[config]);
        assert!(ok, "verify {}:\n{out}", config.display());
    }
    // Each task's rows, and only those, reached the destination through it:
    // the claims say which task has which table.
    let mut d = dest.connect();
    let claims: Vec<(String, String)> = d
        .query("SELECT task_id, schema_name || '.' || name FROM decant.claim WHERE kind = 'table' ORDER BY 2", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected = [
        ("tb", "billing.invoices"),
        ("ta", "public.pgbench_accounts"),
        ("ta", "public.pgbench_branches"),
        ("tb", "public.pgbench_history"),
        ("tb", "public.pgbench_tellers"),
    ];
    assert_eq!(claims, expected.iter().map(|(t, n)| (t.to_string(), n.to_string())).collect::<Vec<_>>());
    // Two tasks, two positions, two slots.
    assert_eq!(count(&mut d, "SELECT count(*) FROM decant.progress WHERE task_id IN ('ta', 'tb')"), 2);
    assert_eq!(count(&mut d, "SELECT count(DISTINCT name) FROM decant.claim WHERE kind = 'slot'"), 2);

    // decant status lists every task, this one first.
    let (ok, out) = command(&["status"], &[&b]);
    assert!(ok, "{out}");
    assert!(out.contains("tasks in this destination (2; * this one)"), "{out}");
    let tb_line = out.lines().find(|l| l.starts_with("  * tb")).unwrap_or_else(|| panic!("{out}"));
    assert!(tb_line.contains("Running") && tb_line.contains("incremental"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("    ta") && l.contains("Running")), "{out}");
    let (ok, out) = command(&["status", "--json"], &[&a]);
    assert!(ok, "{out}");
    let json: serde_json::Value = serde_json::from_str(out.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
    let tasks = json["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2, "{json}");
    assert_eq!((tasks[0]["task_id"].as_str(), tasks[0]["this"].as_bool(), tasks[0]["tables"].as_i64()), (Some("ta"), Some(true), Some(2)));
    assert_eq!((tasks[1]["task_id"].as_str(), tasks[1]["this"].as_bool(), tasks[1]["tables"].as_i64()), (Some("tb"), Some(false), Some(3)));

    // A third task over tables of both is refused, naming the first it
    // overlaps, before anything is written: no slot, no claim, no position.
    let c = task_config(
        dir.path(),
        "tc",
        &source,
        &dest,
        &["public.pgbench_accounts", "public.pgbench_history", "public.pgbench_branches"],
        "[\"incremental\"]",
        None,
    );
    let mut refused = Role::start(decant(), "migrate", &c, &dir.path().join("tc.log"));
    assert_ne!(refused.wait_exit(Duration::from_secs(60)), Some(0), "{}", refused.log());
    let log = refused.log();
    for part in [
        "task tc overlaps task ta in this destination: table public.pgbench_accounts, table public.pgbench_branches (2 in all); nothing was written",
        "change source.include_tables / source.exclude_tables",
        "decant cutover --config",
    ] {
        assert!(log.contains(part), "missing {part:?} in:\n{log}");
    }
    assert_eq!(count(&mut source.connect(), "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'decant_tc'"), 0);
    assert_eq!(count(&mut d, "SELECT count(*) FROM decant.claim WHERE task_id = 'tc'"), 0);
    assert_eq!(count(&mut d, "SELECT count(*) FROM decant.progress WHERE task_id = 'tc'"), 0);

    // Two tasks taking the same whole schema at the same moment: the claims
    // are taken one after the other, so exactly one task passes.
    let schema_only = "[\"schema\", \"full\"]";
    let td = task_config(dir.path(), "td", &source, &dest, &["spare.*"], schema_only, None);
    let te = task_config(dir.path(), "te", &source, &dest, &["spare.*"], schema_only, None);
    let mut racers = [
        Role::start(decant(), "migrate", &td, &dir.path().join("td.log")),
        Role::start(decant(), "migrate", &te, &dir.path().join("te.log")),
    ];
    let exits: Vec<Option<i32>> = racers.iter_mut().map(|r| r.wait_exit(Duration::from_secs(120))).collect();
    let passed: Vec<usize> = (0..2).filter(|&i| exits[i] == Some(0)).collect();
    assert_eq!(passed.len(), 1, "{exits:?}\n{}\n{}", racers[0].log(), racers[1].log());
    let (winner, loser) = if passed[0] == 0 { ("td", 1) } else { ("te", 0) };
    let log = racers[loser].log();
    assert!(
        log.contains(&format!(
            "overlaps task {winner} in this destination: the objects of schema spare, table spare.s1, table spare.s2 (3 in all)"
        )),
        "{log}"
    );
    assert_eq!(count(&mut d, "SELECT count(*) FROM spare.s1"), 100);

    // One cutover for both tasks of the split (the load has stopped).
    let (ok, out) = command(&["cutover", "--wait", "120"], &[&a, &b]);
    assert!(ok, "{out}");
    assert!(out.contains("task ta is cut over") && out.contains("task tb is cut over"), "{out}");
    assert_eq!(agent.wait_exit(Duration::from_secs(60)), Some(0), "{}", agent.log());
    assert_eq!(migrate_b.wait_exit(Duration::from_secs(60)), Some(0), "{}", migrate_b.log());
    applier.stop();
    let (ok, out) = command(&["status"], &[&a]);
    assert!(ok, "{out}");
    assert!(out.lines().any(|l| l.starts_with("  * ta") && l.contains("Completed")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("    tb") && l.contains("Completed")), "{out}");
    // Run again, it changes nothing.
    let (ok, out) = command(&["cutover"], &[&a, &b]);
    assert!(ok && out.matches("nothing to do").count() == 2, "{out}");
    // A task cut over holds its tables no more: the overlapping task may
    // now claim them (its claim is all that is checked here).
    let mut again = Role::start(decant(), "migrate", &c, &dir.path().join("tc-again.log"));
    wait_for("task tc's claim", Duration::from_secs(60), || {
        count(&mut d, "SELECT count(*) FROM decant.claim WHERE task_id = 'tc' AND kind = 'table'") == 3
    });
    again.stop();
}
