//! `decant migrate` end to end on real clusters: schema, full copy under
//! load, handover to the stream, crashes during the copy and post-data,
//! and bad input.

use std::time::Duration;

use decant_tests::process::{run_ok, wait_for, wait_port};
use decant_tests::task::Task;
use decant_tests::Cluster;

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/demo/sample.sql");

/// A source and an empty destination, and task `m` with `migrate`
/// settings (and 2 minutes of retries for errors other than connections).
fn task(migrate: &str) -> Task {
    Task::builder(env!("CARGO_BIN_EXE_decant"), "m").set("retry.other_minutes", "2").migrate(migrate).build()
}

#[test]
fn schema_with_every_object_kind_and_its_data_migrate() {
    let t = task("types = [\"schema\", \"full\"]");
    run_ok(t.source.tool("psql").args(["-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-f", SAMPLE]));
    let mut m = t.migrate("migrate.log");
    assert_eq!(m.wait_exit(Duration::from_secs(180)), Some(0), "{}", m.log());
    let source_schema = t.source.normalized_schema("postgres");
    for kind in [
        "CREATE TABLE",
        "CREATE VIEW",
        "CREATE MATERIALIZED VIEW",
        "CREATE FUNCTION",
        "CREATE PROCEDURE",
        "CREATE AGGREGATE",
        "CREATE OPERATOR",
        "CREATE RULE",
        "CREATE SEQUENCE",
        "CREATE DOMAIN",
        "AS ENUM",
        "AS RANGE",
        "CREATE EXTENSION",
        "CREATE TRIGGER",
        "CREATE INDEX",
        "PARTITION BY",
        "ATTACH PARTITION",
        "FOREIGN KEY",
        "CHECK (",
        "GENERATED ALWAYS AS IDENTITY",
        "GENERATED ALWAYS AS (",
        "COMMENT ON",
    ] {
        assert!(source_schema.contains(kind), "the sample schema has no {kind}");
    }
    assert_eq!(t.dest.normalized_schema("postgres"), source_schema, "schemas differ after migration");
    t.assert_equal();
    // Sequences were set from the source.
    let seq = |c: &Cluster| -> i64 { c.connect().query_one("SELECT last_value FROM shop.order_no_seq", &[]).unwrap().get(0) };
    assert_eq!(seq(&t.dest), seq(&t.source));
    let (ok, status) = t.command(&["status"]);
    assert!(ok && status.contains("Completed"), "{status}");
    // The materialized view holds its data.
    let mv = |c: &Cluster| -> i64 { c.connect().query_one("SELECT count(*) FROM shop.daily_sales", &[]).unwrap().get(0) };
    assert_eq!(mv(&t.dest), mv(&t.source));
    // Indexes and keys of plain tables were built as soon as their table
    // was copied; nothing else was: not foreign keys, triggers, rules, nor
    // anything on partitions or partitioned tables.
    let mut dest = t.dest.connect();
    let mut count = |sql: &str| -> i64 { dest.query_one(sql, &[]).unwrap().get(0) };
    let early = count("SELECT count(*) FROM decant.schema_step WHERE after_table <> '' AND kind IN ('INDEX', 'CONSTRAINT')");
    assert!(early > 0, "no post-data step was planned to run after its table's copy");
    let misplaced = count(
        "SELECT count(*) FROM decant.schema_step s
          WHERE s.after_table <> ''
            AND (s.kind NOT IN ('INDEX', 'CONSTRAINT', 'CHECK CONSTRAINT', 'COMMENT')
                 OR NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = to_regclass(s.after_table) AND c.relkind = 'r' AND NOT c.relispartition))",
    );
    assert_eq!(misplaced, 0, "post-data steps planned after one table's copy that need more than that table");
    assert!(m.log().contains("built the indexes and keys of a copied table"), "{}", m.log());
}

#[test]
fn full_copy_under_load_hands_over_to_the_stream_without_loss_or_duplicates() {
    let t = task("types = [\"schema\", \"full\", \"incremental\"]\nsplit_tables_larger_than_mb = 1");
    t.pgbench_init("5");
    let mut load = t.pgbench_load(25);
    std::thread::sleep(Duration::from_secs(2));
    let mut m = t.migrate("migrate.log");
    t.wait_incremental(Duration::from_secs(120));
    // pgbench_accounts (about 64 MB) was copied in ranges.
    let ranges: i64 = t
        .dest
        .connect()
        .query_one(
            "SELECT count(*) FROM decant.copy_range r JOIN decant.copy_table c USING (task_id, table_id) WHERE c.name = 'pgbench_accounts'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ranges > 1, "pgbench_accounts was not split");
    assert!(load.wait().unwrap().success());
    t.assert_equal();
    let (ok, status) = t.command(&["status"]);
    assert!(ok && status.contains("Running (phase: incremental"), "{status}");
    assert!(m.is_running(), "{}", m.log());
    assert_eq!(m.stop(), Some(0), "{}", m.log());
}

#[test]
fn killed_during_copy_and_during_post_data_resumes_to_an_equal_destination() {
    // A throttled copy (the kill lands in it) and one slow index (the kill
    // lands in post-data).
    let t = task("types = [\"schema\", \"full\", \"incremental\"]\nsplit_tables_larger_than_mb = 2\nmax_mb_per_second = 4");
    t.pgbench_init("2");
    t.source
        .connect()
        .batch_execute(
            "CREATE FUNCTION slow_key(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'SELECT $1 + (SELECT 0 FROM pg_sleep(0.001))';
             CREATE TABLE slow (id int PRIMARY KEY, v text);
             INSERT INTO slow SELECT g, md5(g::text) FROM generate_series(1, 3000) g;
             CREATE INDEX slow_idx ON slow (slow_key(id));",
        )
        .unwrap();
    let mut load = t.pgbench_load(40);
    let mut m = t.migrate("migrate1.log");
    let mut dest = t.dest.connect();
    let ranges = |c: &mut postgres::Client| -> (i64, i64) {
        c.query_opt("SELECT count(*) FILTER (WHERE done_at IS NOT NULL), count(*) FROM decant.copy_range WHERE task_id = 'm'", &[])
            .ok()
            .flatten()
            .map(|r| (r.get(0), r.get(1)))
            .unwrap_or((0, 0))
    };
    wait_for("part of the copy", Duration::from_secs(120), || {
        let (done, total) = ranges(&mut dest);
        done >= 1 && done + 2 < total
    });
    m.kill9();
    let (done_before, _) = ranges(&mut dest);
    let mut m = t.migrate("migrate2.log");
    // Post-data: all ranges copied, the slow index being built.
    let post_data = |c: &mut postgres::Client| -> bool {
        let (done, total) = ranges(c);
        let building: i64 = c
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%CREATE INDEX slow_idx%' AND pid <> pg_backend_pid()", &[])
            .unwrap()
            .get(0);
        total > 0 && done == total && building > 0
    };
    wait_for("the slow index build", Duration::from_secs(180), || post_data(&mut dest));
    m.kill9();
    assert!(t.phase() != "incremental", "the kill came too late");
    let log2 = m.log();
    assert!(log2.contains("copy resumes from a new snapshot"), "{log2}");
    assert!(done_before >= 1);
    let mut m = t.migrate("migrate3.log");
    t.wait_incremental(Duration::from_secs(180));
    assert!(load.wait().unwrap().success());
    t.assert_equal();
    // The slow index exists once.
    let n: i64 = dest.query_one("SELECT count(*) FROM pg_indexes WHERE indexname = 'slow_idx'", &[]).unwrap().get(0);
    assert_eq!(n, 1);
    assert_eq!(m.stop(), Some(0), "{}", m.log());
}

#[test]
fn bad_input_gives_one_clear_error_and_writes_nothing() {
    let t = task("types = [\"schema\", \"full\"]");
    t.source.connect().batch_execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY, v text);").unwrap();
    let fails = |overrides: &[&str], expect: &[&str]| {
        let mut args = vec!["migrate"];
        for o in overrides {
            args.extend(["--set", o]);
        }
        let (ok, out) = t.command(&args);
        assert!(!ok, "{args:?} succeeded:\n{out}");
        for e in expect {
            assert!(out.contains(e), "{args:?}: expected {e:?} in:\n{out}");
        }
        assert!(!out.contains("panicked"), "{out}");
    };
    // Missing destination database.
    let dest_missing = format!("destination.dsn=\"{}\"", t.dest.conninfo("nosuchdb"));
    fails(&[&dest_missing], &["nosuchdb"]);
    // A selected table that does not exist.
    fails(&["source.include_tables=[\"public.a\", \"public.nope\"]"], &["no such table", "public.nope"]);
    // pg_dump missing, and pg_dump older than the source.
    fails(&["migrate.pg_dump=\"/nonexistent/pg_dump\""], &["pg_dump was not found", "migrate.pg_dump"]);
    let fake = t.path("old_pg_dump");
    std::fs::write(&fake, "#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    fails(&[&format!("migrate.pg_dump=\"{}\"", fake.display())], &["9.6.24", "older than the source"]);
    // A combination of types that makes no sense.
    fails(&["migrate.types=[\"schema\", \"incremental\"]"], &["migrate.types", "needs full"]);
    // Conflicting tables in report mode: listed, and nothing written.
    t.dest.connect().batch_execute("CREATE TABLE b (id int PRIMARY KEY, v text); INSERT INTO b VALUES (1, 'mine');").unwrap();
    fails(&[], &["already exist", "TABLE public.b", "conflicts"]);
    let mut d = t.dest.connect();
    let tables: i64 = d.query_one("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", &[]).unwrap().get(0);
    assert_eq!(tables, 1, "a table was created although the task failed");
    // The precheck refuses before the applier creates decant's own tables.
    let planned: bool = d.query_one("SELECT to_regclass('decant.task') IS NOT NULL", &[]).unwrap().get(0);
    let tasks: i64 = if planned { d.query_one("SELECT count(*) FROM decant.task", &[]).unwrap().get(0) } else { 0 };
    assert_eq!(tasks, 0, "a plan was stored although the task failed");
    // Nothing is left on the source either: no slot.
    let slots: i64 = t.source.connect().query_one("SELECT count(*) FROM pg_replication_slots", &[]).unwrap().get(0);
    assert_eq!(slots, 0);
    // With conflicts = ignore the task goes on and keeps the existing row.
    let (ok, out) = t.command(&["migrate", "--set", "migrate.conflicts=\"ignore\""]);
    assert!(ok, "{out}");
    let v: String = d.query_one("SELECT v FROM b WHERE id = 1", &[]).unwrap().get(0);
    assert_eq!(v, "mine");
    let a: Option<i32> = d.query_opt("SELECT 1 FROM pg_tables WHERE tablename = 'a'", &[]).unwrap().map(|r| r.get(0));
    assert!(a.is_some());
}

#[test]
fn the_same_phases_run_with_agent_and_applier_as_separate_services() {
    let port = decant_tests::process::free_port();
    let t = task("types = [\"schema\", \"full\", \"incremental\"]");
    t.pgbench_init("1");
    let overrides = [
        format!("agent.applier_url=\"http://127.0.0.1:{port}\""),
        format!("applier.listen=\"127.0.0.1:{port}\""),
        "transport.token=\"s3cret\"".to_owned(),
    ];
    let mut applier = t.start_with("applier", &overrides, "applier.log");
    wait_port(port);
    let mut agent = t.start_with("agent", &overrides, "agent.log");
    t.wait_incremental(Duration::from_secs(120));
    run_ok(t.source.tool("pgbench").args(["-n", "-t", "200", "postgres"]));
    t.assert_equal();
    assert_eq!(agent.stop(), Some(0), "{}", agent.log());
    assert_eq!(applier.stop(), Some(0), "{}", applier.log());
}

#[test]
fn selecting_single_tables_migrates_them_with_their_schema_and_nothing_else() {
    let t = task("types = [\"schema\", \"full\"]");
    t.source
        .connect()
        .batch_execute(
            "CREATE SCHEMA hr; CREATE TABLE hr.staff (id int PRIMARY KEY, name text NOT NULL);
             CREATE INDEX staff_name ON hr.staff (name);
             CREATE TABLE hr.other (id int); CREATE VIEW hr.v AS SELECT * FROM hr.staff;
             INSERT INTO hr.staff SELECT g, 'n' || g FROM generate_series(1, 1000) g;",
        )
        .unwrap();
    let (ok, out) = t.command(&["migrate", "--set", "source.include_tables=[\"hr.staff\"]"]);
    assert!(ok, "{out}");
    let mut d = t.dest.connect();
    let names: Vec<String> = d
        .query("SELECT relname::text FROM pg_class WHERE relnamespace = 'hr'::regnamespace ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["staff", "staff_name", "staff_pkey"]);
    let (ok, out) = t.command(&["verify", "--set", "source.include_tables=[\"hr.staff\"]"]);
    assert!(ok && out.contains("all 1 tables equal"), "{out}");
}
