//! The end of a task, and its state on the way.
//!
//! `decant cutover` end to end: a task migrated under load (pgbench and the
//! demo's identity, serial and standalone sequences, one counting down),
//! then cut over once the load stopped: the destination's sequences reach
//! the source's (plus the margin asked for), every table compares equal,
//! the running task stops by itself and is refused if started again, the
//! source can be frozen, and a second cutover changes nothing.
//!
//! `decant status` while the task retries (the source is down: how much
//! of the retry window is left, and why) and after it failed (why, and
//! since when).

use std::time::Duration;

use decant_tests::process::{run_ok, wait_for};
use decant_tests::task::Task;
use decant_tests::Cluster;

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/demo/sample.sql");

/// Task `c`: every phase, and the agent's default retry windows.
fn task() -> Task {
    Task::builder(env!("CARGO_BIN_EXE_decant"), "c").unset("retry").migrate("types = [\"schema\", \"full\", \"incremental\"]").build()
}

/// Every sequence's next value (what nextval would hand out), by name.
fn next_values(c: &mut postgres::Client) -> Vec<(String, i64)> {
    c.query(
        "SELECT schemaname || '.' || sequencename,
                coalesce(last_value + increment_by, start_value)
           FROM pg_sequences WHERE schemaname NOT IN ('pg_catalog', 'decant') ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Inserts that take values from sequences, for `seconds`.
fn sequence_load(source: &Cluster, seconds: u64) -> std::thread::JoinHandle<()> {
    let mut c = source.connect();
    std::thread::spawn(move || {
        let until = std::time::Instant::now() + Duration::from_secs(seconds);
        while std::time::Instant::now() < until {
            c.batch_execute(
                "INSERT INTO shop.customers (external_id, email, full_name)
                     SELECT gen_random_uuid(), 'load' || nextval('shop.order_no_seq') || '@example.com', 'load';
                 SELECT nextval('ops.event_seq'), nextval('countdown');
                 INSERT INTO counted (v) VALUES ('x');",
            )
            .unwrap();
        }
    })
}

#[test]
fn cutover_after_the_load_sets_sequences_compares_and_fences_the_task() {
    let t = task();
    t.pgbench_init("1");
    run_ok(t.source.tool("psql").args(["-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-f", SAMPLE]));
    t.source
        .connect()
        .batch_execute(
            "CREATE SEQUENCE countdown INCREMENT -1 START -1 MINVALUE -1000000000;
             CREATE TABLE counted (id bigserial PRIMARY KEY, v text);",
        )
        .unwrap();
    let mut m = t.migrate("migrate.log");
    let load = sequence_load(&t.source, 8);
    let mut pgbench = t.pgbench_load(8);
    t.wait_incremental(Duration::from_secs(180));
    load.join().unwrap();
    assert!(pgbench.wait().unwrap().success());

    let (mut src, mut dest) = (t.source.connect(), t.dest.connect());
    let source_next = next_values(&mut src);
    assert!(source_next.iter().any(|(n, _)| n == "public.countdown"), "{source_next:?}");
    // The stream carries rows, not sequences: the destination is behind.
    let behind = next_values(&mut dest);
    assert_ne!(behind, source_next, "the destination's sequences already moved: nothing to test");

    // A dry run changes nothing.
    let (ok, out) = t.command(&["cutover", "--dry-run", "--sequence-margin", "100"]);
    assert!(ok, "{out}");
    assert!(out.contains("would set sequence") && out.contains("would mark task c cut over"), "{out}");
    assert_eq!(next_values(&mut dest), behind);
    assert!(m.is_running(), "{}", m.log());

    let (ok, out) = t.command(&["cutover", "--wait", "120", "--sequence-margin", "100", "--freeze-source"]);
    assert!(ok, "{out}");
    for part in
        ["tables equal", "is cut over at source position", "pg_drop_replication_slot('decant_c')", "RESET default_transaction_read_only"]
    {
        assert!(out.contains(part), "missing {part:?} in:\n{out}");
    }
    // Every destination sequence hands out values past the source's, by
    // the margin, in its direction.
    let after = next_values(&mut dest);
    assert_eq!(after.len(), source_next.len(), "{after:?}");
    for ((name, there), (_, here)) in after.iter().zip(&source_next) {
        if name == "public.countdown" {
            assert!(*there <= here - 100, "{name}: destination {there}, source {here}");
        } else {
            assert!(*there >= here + 100, "{name}: destination {there}, source {here}");
        }
    }
    // The running task learns it was cut over and stops on its own.
    assert_eq!(m.wait_exit(Duration::from_secs(60)), Some(0), "{}", m.log());
    assert!(m.log().contains("the task was cut over"), "{}", m.log());
    // Started again, it does nothing.
    let mut again = t.migrate("again.log");
    assert_eq!(again.wait_exit(Duration::from_secs(60)), Some(0), "{}", again.log());

    let (ok, status) = t.command(&["status"]);
    assert!(ok && status.contains("Completed") && status.contains("cut over at"), "{status}");

    // The source is read-only for new sessions.
    let err = t.source.connect().batch_execute("INSERT INTO counted (v) VALUES ('late')").unwrap_err();
    assert!(format!("{err:?}").contains("read-only"), "{err:?}");

    // A second cutover changes nothing.
    let (ok, out) = t.command(&["cutover"]);
    assert!(ok && out.contains("nothing to do"), "{out}");
    assert_eq!(next_values(&mut dest), after);
}

#[test]
fn status_shows_a_retrying_and_a_failed_task_with_the_reason() {
    let t = task();
    t.source
        .connect()
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'x' FROM generate_series(1, 10) g;")
        .unwrap();
    let mut m = t.migrate("migrate.log");
    let status = || t.command(&["status"]).1;
    wait_for("the stream phase", Duration::from_secs(120), || status().contains("Running (phase: incremental"));

    // The source goes away: the agent retries, and says so.
    t.source.stop();
    wait_for("a retrying task", Duration::from_secs(60), || {
        let s = status();
        s.contains("Retrying") && s.contains("of the retry window left")
    });
    t.source.start_again();
    wait_for("the task running again", Duration::from_secs(120), || status().contains("Running (phase: incremental"));
    assert!(m.is_running(), "{}", m.log());

    // A change the destination cannot take ends the task: it failed.
    t.dest.connect().batch_execute("DROP TABLE t").unwrap();
    t.source.connect().batch_execute("INSERT INTO t VALUES (11, 'y')").unwrap();
    let code = m.wait_exit(Duration::from_secs(60));
    assert!(matches!(code, Some(c) if c != 0), "{code:?} {}", m.log());
    let s = status();
    assert!(s.contains("Failed") && s.contains("failed since") && s.contains("does not exist"), "{s}");
    let (ok, json) = t.command(&["status", "--json"]);
    assert!(ok && json.contains("\"state\":\"Failed\"") && json.contains("\"reason\":"), "{json}");
}
