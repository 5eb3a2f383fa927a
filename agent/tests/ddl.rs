//! DDL run on the source while the task streams, captured by the decant
//! extension's event triggers and applied on the destination at its place
//! among the changes: every kind of statement alone and between DML in one
//! transaction, a client string of DDL and DML, a savepoint rolled back,
//! kill -9 right after DDL, statements the destination refuses or that
//! cannot be replayed, a table created during the full copy, and the
//! capture script for sources without the extension. Each ends with
//! `decant verify` equal and the selected schemas' `pg_dump --schema-only`
//! equal on both sides.

use std::time::Duration;

use decant_tests::process::{expect, fails, wait_for};
use decant_tests::task::Task;
use decant_tests::Cluster;

/// A task of all three types over schemas app, archive and public (where
/// pgbench's tables are), whose source has the decant extension; schema
/// other is not selected.
fn task(id: &str) -> Task {
    with_extension(builder(id).build())
}

fn builder(id: &str) -> decant_tests::task::TaskBuilder {
    Task::builder(env!("CARGO_BIN_EXE_decant"), id)
        .migrate("types = [\"schema\", \"full\", \"incremental\"]")
        .set("source.include_tables", "[\"app.*\", \"archive.*\", \"public.*\"]")
}

fn with_extension(t: Task) -> Task {
    t.src().batch_execute("CREATE EXTENSION decant").unwrap();
    t
}

const APP: &str = "CREATE SCHEMA app;
     CREATE TABLE app.items (id int PRIMARY KEY, name text NOT NULL, qty int NOT NULL, legacy text);
     INSERT INTO app.items SELECT g, 'item ' || g, g % 10, 'old' FROM generate_series(1, 500) g;
     CREATE TABLE app.old_stuff (id int PRIMARY KEY);
     INSERT INTO app.old_stuff SELECT generate_series(1, 10);
     CREATE SCHEMA other;
     CREATE TABLE other.unrelated (id int PRIMARY KEY, v int);";

/// The selected schemas of `db` as `pg_dump --schema-only` gives them,
/// without comments and blank lines.
fn schema_of(cluster: &Cluster, db: &str) -> String {
    let out = cluster
        .tool("pg_dump")
        .args(["--schema-only", "--no-owner", "-n", "app", "-n", "archive", "-n", "public", "-d", db])
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("--") && !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict") && !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// verify equal, and the selected schemas equal.
fn assert_same(t: &Task) {
    t.assert_equal();
    let (source, destination) = (schema_of(&t.source, &t.db), schema_of(&t.dest, &t.db));
    if source != destination {
        let diff: Vec<String> = source
            .lines()
            .filter(|l| !destination.lines().any(|d| d == *l))
            .map(|l| format!("- {l}"))
            .chain(destination.lines().filter(|l| !source.lines().any(|s| s == *l)).map(|l| format!("+ {l}")))
            .collect();
        panic!("the schemas differ (- source only, + destination only):\n{}", diff.join("\n"));
    }
}

fn outcomes(t: &Task) -> Vec<(String, String)> {
    t.dst()
        .query("SELECT outcome, tag FROM decant.ddl WHERE task_id = $1 ORDER BY source_lsn", &[&t.id])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[test]
fn every_kind_of_ddl_reaches_the_destination_in_order_with_the_changes() {
    let t = task("ddl_kinds");
    t.pgbench_init("1");
    t.src().batch_execute(APP).unwrap();
    let mut m = t.migrate_until_incremental("migrate.log", Duration::from_secs(120));
    let mut load = t.pgbench_load(15);
    let mut src = t.src();
    // Each entry is one query string sent as a whole (simple query
    // protocol), as a client or a migration tool sends it.
    let script = [
        // ADD COLUMN, then an INSERT that uses it, in one transaction.
        "BEGIN; ALTER TABLE app.items ADD COLUMN color text DEFAULT 'red';
         INSERT INTO app.items (id, name, qty, color) VALUES (1001, 'new', 3, 'blue'); COMMIT",
        // DROP COLUMN, then an UPDATE.
        "BEGIN; ALTER TABLE app.items DROP COLUMN legacy; UPDATE app.items SET name = name || '!' WHERE id <= 10; COMMIT",
        "ALTER TABLE app.items RENAME COLUMN name TO title",
        "ALTER TABLE app.items ALTER COLUMN qty TYPE bigint",
        "ALTER TABLE app.items ALTER COLUMN qty SET DEFAULT 7",
        "ALTER TABLE app.items ALTER COLUMN color SET NOT NULL",
        "ALTER TABLE app.items ADD CONSTRAINT qty_positive CHECK (qty >= 0)",
        "ALTER TABLE app.items ADD CONSTRAINT title_unique UNIQUE (title)",
        "ALTER TABLE app.items DROP CONSTRAINT qty_positive",
        "INSERT INTO app.items (id, title) VALUES (1002, 'defaults')",
        // A new table is part of the task from its first row.
        "CREATE TABLE app.events (id bigserial PRIMARY KEY, item_id int, note text);
         INSERT INTO app.events (item_id, note) SELECT id, 'e' FROM app.items WHERE id <= 50",
        "ALTER TABLE app.events RENAME TO happenings",
        "CREATE SCHEMA archive",
        "ALTER TABLE app.happenings SET SCHEMA archive",
        "INSERT INTO archive.happenings (item_id, note) VALUES (7, 'moved')",
        "DROP TABLE app.old_stuff",
        "CREATE INDEX items_qty ON app.items (qty)",
        "CREATE INDEX CONCURRENTLY items_title_lower ON app.items (lower(title))",
        "DROP INDEX app.items_qty",
        "CREATE VIEW app.cheap AS SELECT id, title FROM app.items WHERE qty < 5",
        "CREATE OR REPLACE VIEW app.cheap AS SELECT id, title FROM app.items WHERE qty < 3",
        "ALTER VIEW app.cheap RENAME TO bargains",
        "CREATE VIEW app.doomed AS SELECT 1 AS one",
        "DROP VIEW app.doomed",
        "CREATE FUNCTION app.double(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 * 2'",
        "ALTER FUNCTION app.double(int) RENAME TO twice",
        "CREATE FUNCTION app.gone() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "DROP FUNCTION app.gone()",
        // Its body has DML: created, never run.
        "CREATE PROCEDURE app.bump() LANGUAGE sql AS $$ UPDATE app.items SET qty = qty + 1 $$",
        "CREATE SEQUENCE app.tickets START 100",
        "ALTER SEQUENCE app.tickets INCREMENT BY 5",
        "CREATE TYPE app.mood AS ENUM ('sad', 'ok')",
        "ALTER TYPE app.mood ADD VALUE 'happy'",
        "ALTER TABLE app.items ADD COLUMN mood app.mood",
        "UPDATE app.items SET mood = 'happy' WHERE id <= 3",
        "CREATE TABLE app.measures (id int, day date, v int, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)",
        "CREATE TABLE app.measures_2026 PARTITION OF app.measures FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
        "INSERT INTO app.measures VALUES (1, '2026-05-01', 10), (2, '2026-06-01', 20)",
        "CREATE TABLE app.measures_2027 (id int, day date, v int, PRIMARY KEY (id, day))",
        "ALTER TABLE app.measures ATTACH PARTITION app.measures_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')",
        "INSERT INTO app.measures VALUES (3, '2027-02-01', 30)",
        "ALTER TABLE app.measures DETACH PARTITION app.measures_2026",
        "UPDATE app.measures_2026 SET v = v + 1",
        "COMMENT ON TABLE app.items IS 'things'",
        "COMMENT ON COLUMN app.items.title IS 'what it is called'",
        // DDL and DML in one string: the DDL is replayed once, the DML
        // only through the stream.
        "ALTER TABLE app.items ADD COLUMN note text; INSERT INTO app.items (id, title, note) VALUES (2001, 'multi', 'x');
         UPDATE app.items SET note = 'y' WHERE id = 1; CREATE INDEX items_note ON app.items (note)",
        // Rolled back: never on the destination.
        "BEGIN; SAVEPOINT s; ALTER TABLE app.items ADD COLUMN ghost int; ROLLBACK TO SAVEPOINT s;
         INSERT INTO app.items (id, title) VALUES (2002, 'after the savepoint'); COMMIT",
        // Its rows come through the stream; the statement makes the table.
        "CREATE TABLE app.snapshot AS SELECT id, title FROM app.items WHERE id <= 100",
        "CREATE TABLE app.empty_copy AS SELECT id, title FROM app.items WITH NO DATA",
        "INSERT INTO app.empty_copy SELECT id, title FROM app.items WHERE id > 490",
        "SELECT id, title INTO app.selected FROM app.items WHERE id < 10",
        "CREATE MATERIALIZED VIEW app.by_qty AS SELECT qty, count(*) AS n FROM app.items GROUP BY qty",
        "REFRESH MATERIALIZED VIEW app.by_qty",
        // A refresh inside a procedure is computed again from the
        // destination's rows (the DDL text of a procedure is not replayed).
        "CREATE PROCEDURE app.refresh() LANGUAGE plpgsql AS $$ BEGIN REFRESH MATERIALIZED VIEW CONCURRENTLY app.by_qty; END $$",
        "CREATE UNIQUE INDEX by_qty_qty ON app.by_qty (qty)",
        "UPDATE app.items SET qty = qty + 100 WHERE id <= 20",
        "CALL app.refresh()",
        // Outside the selection: not applied (the destination has no such table).
        "ALTER TABLE other.unrelated ADD COLUMN w int",
        "CREATE TABLE other.not_selected (id int)",
        // A temporary table is not the user's schema.
        "CREATE TEMP TABLE scratch (a int); DROP TABLE scratch",
    ];
    for sql in script {
        src.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let _ = load.wait();
    assert!(m.is_running(), "{}", m.log());
    assert_same(&t);
    let mut dst = t.dst();
    let ghost: i64 = dst.query_one("SELECT count(*) FROM pg_attribute WHERE attname = 'ghost'", &[]).unwrap().get(0);
    assert_eq!(ghost, 0, "a column added in a rolled-back savepoint reached the destination");
    let not_selected: i64 =
        dst.query_one("SELECT count(*) FROM pg_class WHERE relname IN ('not_selected', 'unrelated', 'scratch')", &[]).unwrap().get(0);
    assert_eq!(not_selected, 0, "DDL outside the selection was applied");
    // The matview was built on the destination from its rows.
    let by_qty: i64 = dst.query_one("SELECT sum(n)::int8 FROM app.by_qty", &[]).unwrap().get(0);
    let items: i64 = src.query_one("SELECT count(*) FROM app.items", &[]).unwrap().get(0);
    assert!(by_qty > 0 && by_qty <= items, "{by_qty} {items}");
    let outcomes = outcomes(&t);
    assert!(outcomes.iter().all(|(o, _)| o == "applied"), "{outcomes:?}");
    // Each DDL statement of the script once (49), and nothing of the
    // three outside the selection.
    assert_eq!(outcomes.len(), 49, "{outcomes:?}");
    let (ok, status) = t.command(&["status"]);
    assert!(ok && status.contains("ddl: 49 applied, 0 skipped (migrate.ddl = apply)"), "{status}");
    let _ = m.stop();
}

#[test]
fn ddl_is_applied_exactly_once_across_kill_9() {
    let t = with_extension(builder("ddl_kill").transport("ddl kill test").build());
    t.pgbench_init("1");
    t.src().batch_execute(APP).unwrap();
    let mut m = t.migrate_until_incremental("migrate.log", Duration::from_secs(120));
    let mut load = t.pgbench_load(30);
    let mut src = t.src();
    let ddl = |src: &mut postgres::Client, round: u64| {
        src.batch_execute(&format!(
            "BEGIN; ALTER TABLE app.items ADD COLUMN c{round} int DEFAULT {round};
             UPDATE app.items SET c{round} = id WHERE id % 7 = {round}; COMMIT;
             CREATE TABLE app.t{round} (id int PRIMARY KEY); INSERT INTO app.t{round} SELECT generate_series(1, {round});"
        ))
        .unwrap();
    };
    // decant migrate (agent and applier in one process) killed right
    // after the statements, at a little more of them applied each time.
    for round in 1..=3 {
        ddl(&mut src, round);
        std::thread::sleep(Duration::from_millis(50 * round));
        m.kill9();
        m = t.migrate("migrate.log");
    }
    wait_for("the stream phase", Duration::from_secs(60), || t.phase() == "incremental");
    let _ = m.stop();
    // Then agent and applier as separate processes, each killed in turn.
    let mut applier = t.applier(&[], "applier.log");
    let mut agent = t.start("agent", "agent.log");
    for round in 4..=7 {
        ddl(&mut src, round);
        std::thread::sleep(Duration::from_millis(30 * round));
        if round % 2 == 0 {
            applier.kill9();
            applier = t.applier(&[], "applier.log");
        } else {
            agent.kill9();
            agent = t.start("agent", "agent.log");
        }
    }
    let _ = load.wait();
    assert_same(&t);
    assert!(agent.is_running() && applier.is_running(), "{}\n{}", agent.log(), applier.log());
    let outcomes = outcomes(&t);
    assert_eq!(outcomes.len(), 14, "each statement applied once: {outcomes:?}");
    let _ = (agent.stop(), applier.stop());
}

#[test]
fn ddl_the_destination_refuses_or_cannot_replay_stops_the_task_until_fixed() {
    let mut t = task("ddl_stop");
    t.src().batch_execute(APP).unwrap();
    let mut m = t.migrate_until_incremental("migrate.log", Duration::from_secs(120));
    let mut src = t.src();
    let mut dst = t.dst();

    // 1. The destination refuses it (a table of that name is there): the
    // task stops with the statement, its position and the error, and
    // nothing after it is applied. After the fix it resumes by itself on
    // the next start.
    dst.batch_execute("CREATE TABLE app.clash (x int)").unwrap();
    src.batch_execute("CREATE TABLE app.clash (id int PRIMARY KEY); INSERT INTO app.clash VALUES (1)").unwrap();
    src.batch_execute("INSERT INTO app.items (id, name, qty) VALUES (3001, 'after the clash', 1)").unwrap();
    let log = fails(&mut m);
    expect(&log, &["CREATE TABLE of app.clash", "failed on the destination", "already exists", "statement: CREATE TABLE app.clash"]);
    let after: i64 = dst.query_one("SELECT count(*) FROM app.items WHERE id = 3001", &[]).unwrap().get(0);
    assert_eq!(after, 0, "a change after the refused DDL was applied");
    dst.batch_execute("DROP TABLE app.clash").unwrap();
    m = t.migrate("migrate.log");
    wait_for("the row after the fixed DDL", Duration::from_secs(60), || {
        dst.query_one("SELECT count(*) FROM app.items WHERE id = 3001", &[]).unwrap().get::<_, i64>(0) == 1
    });
    assert_same(&t);

    // 2. DDL run by a DO block cannot be replayed alone: the task stops
    // and says what to do; done by hand and skipped, it goes on.
    src.batch_execute("DO $$ BEGIN EXECUTE 'ALTER TABLE app.items ADD COLUMN by_do int'; END $$").unwrap();
    src.batch_execute("UPDATE app.items SET by_do = 5 WHERE id = 1").unwrap();
    let log = fails(&mut m);
    expect(&log, &["ALTER TABLE of app.items", "inside a function, DO block or procedure", "decant skip-ddl --at"]);
    let at = log.rsplit("decant skip-ddl --at ").next().unwrap().split('`').next().unwrap().to_owned();
    dst.batch_execute("ALTER TABLE app.items ADD COLUMN by_do int").unwrap();
    let (ok, out) = t.command(&["skip-ddl", "--at", &at]);
    assert!(ok, "{out}");
    m = t.migrate("migrate.log");
    wait_for("the update after the skipped DDL", Duration::from_secs(60), || {
        dst.query_one("SELECT count(*) FROM app.items WHERE by_do = 5", &[]).unwrap().get::<_, i64>(0) == 1
    });
    assert_same(&t);

    // 3. migrate.ddl = "stop": the task stops at the next DDL.
    let _ = m.stop();
    t.edit(|c| c.set("migrate.ddl", "\"stop\""));
    m = t.migrate("migrate.log");
    t.wait_slot_active(Duration::from_secs(60));
    src.batch_execute("ALTER TABLE app.items ADD COLUMN stopped int").unwrap();
    let log = fails(&mut m);
    expect(&log, &["migrate.ddl = \"stop\"", "ALTER TABLE app.items ADD COLUMN stopped int"]);
    let at = log.rsplit("decant skip-ddl --at ").next().unwrap().split('`').next().unwrap().to_owned();
    // Skipped twice is refused once it is recorded as skipped.
    dst.batch_execute("ALTER TABLE app.items ADD COLUMN stopped int").unwrap();
    let (ok, out) = t.command(&["skip-ddl", "--at", &at]);
    assert!(ok, "{out}");
    m = t.migrate("migrate.log");
    src.batch_execute("INSERT INTO app.items (id, name, qty, stopped) VALUES (3002, 'after stop', 1, 9)").unwrap();
    assert_same(&t);
    let (ok, out) = t.command(&["skip-ddl", "--at", &at]);
    assert!(!ok && out.contains("already skipped"), "{out}");
    let (_, status) = t.command(&["status"]);
    assert!(status.contains("ddl: 1 applied, 2 skipped (migrate.ddl = stop)"), "{status}");
    let _ = m.stop();
}

#[test]
fn a_table_created_during_the_full_copy_is_neither_lost_nor_created_twice() {
    let t = task("ddl_copy");
    t.src()
        .batch_execute(&format!(
            "{APP}
             CREATE TABLE app.big (id int PRIMARY KEY, pad text);
             INSERT INTO app.big SELECT g, repeat('x', 200) FROM generate_series(1, 60000) g;"
        ))
        .unwrap();
    let mut t = t;
    // A slow copy: the statements below run while it reads.
    t.edit(|c| c.set("migrate.max_rows_per_second", "20000"));
    let mut m = t.migrate("migrate.log");
    wait_for("the copy", Duration::from_secs(60), || t.phase() == "copy");
    let mut src = t.src();
    src.batch_execute(
        "CREATE TABLE app.born_during_copy (id int PRIMARY KEY, v text);
         INSERT INTO app.born_during_copy SELECT g, 'v' || g FROM generate_series(1, 100) g;
         ALTER TABLE app.items ADD COLUMN during_copy int DEFAULT 1;
         UPDATE app.items SET during_copy = 2 WHERE id <= 5;",
    )
    .unwrap();
    assert_eq!(t.phase(), "copy", "the statements ran after the copy");
    wait_for("the stream phase", Duration::from_secs(120), || {
        assert!(m.is_running(), "{}", m.log());
        t.phase() == "incremental"
    });
    assert_same(&t);
    let _ = m.stop();
}

#[test]
fn the_capture_script_works_where_the_extension_is_not_installed() {
    let t = Task::builder(env!("CARGO_BIN_EXE_decant"), "ddl_script")
        .migrate("types = [\"schema\", \"full\", \"incremental\"]")
        .set("source.include_tables", "[\"app.*\", \"archive.*\", \"public.*\"]")
        .build();
    let out = std::process::Command::new(&t.bin).arg("ddl-capture-sql").output().unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    let mut src = t.src();
    src.batch_execute(&script).unwrap();
    // Idempotent.
    src.batch_execute(&script).unwrap();
    src.batch_execute(APP).unwrap();
    let (_, precheck) = t.command(&["precheck"]);
    assert!(precheck.contains("DDL on the source is captured (the script of decant ddl-capture-sql)"), "{precheck}");
    let mut m = t.migrate_until_incremental("migrate.log", Duration::from_secs(120));
    src.batch_execute("ALTER TABLE app.items ADD COLUMN flag boolean").unwrap();
    src.batch_execute("UPDATE app.items SET flag = true WHERE id <= 3").unwrap();
    assert_same(&t);
    // Without the extension a string of several statements cannot be
    // told apart: the task stops rather than replay its DML.
    src.batch_execute("ALTER TABLE app.items ADD COLUMN two int; UPDATE app.items SET two = 2 WHERE id = 4").unwrap();
    let log = fails(&mut m);
    expect(&log, &["query string of 2 statements", "decant skip-ddl --at"]);
}

/// The capture script on every major of the version matrix (and 10, the
/// oldest it is for): the messages come out of the WAL, read here through
/// test_decoding, at their place among the changes, with the whole query
/// string (no extension: origin "query"), the objects, and DDL run by a DO
/// block marked as such.
#[test]
fn the_capture_script_captures_ddl_on_every_major() {
    let script = {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_decant")).arg("ddl-capture-sql").output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let mut majors = decant_tests::versions::pg_versions();
    majors.insert(0, 10);
    majors.dedup();
    for major in majors {
        let cluster = Cluster::start_version(major);
        let mut c = cluster.connect();
        c.batch_execute(&script).unwrap_or_else(|e| panic!("PostgreSQL {major}: the script: {e:?}"));
        c.query_one("SELECT pg_create_logical_replication_slot('s', 'test_decoding')", &[]).unwrap();
        c.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").unwrap();
        c.batch_execute("BEGIN; ALTER TABLE t ADD COLUMN v text; INSERT INTO t VALUES (1, 'a'); COMMIT").unwrap();
        c.batch_execute("DO $$ BEGIN EXECUTE 'CREATE INDEX t_v ON t (v)'; END $$").unwrap();
        c.batch_execute("CREATE TEMP TABLE scratch (a int)").unwrap();
        c.batch_execute("DROP TABLE t").unwrap();
        let lines: Vec<String> = c
            .query("SELECT data FROM pg_logical_slot_get_changes('s', NULL, NULL)", &[])
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .filter(|d| !d.starts_with("BEGIN") && !d.starts_with("COMMIT"))
            .collect();
        let messages: Vec<serde_json::Value> =
            lines.iter().filter_map(|l| l.split_once("content:").map(|(_, json)| serde_json::from_str(json).unwrap())).collect();
        let summary: Vec<(String, String, String)> = messages
            .iter()
            .map(|m| {
                (m["tag"].as_str().unwrap().into(), m["origin"].as_str().unwrap().into(), m["statement"].as_str().unwrap_or("").into())
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("CREATE TABLE".into(), "query".into(), "CREATE TABLE t (id int PRIMARY KEY)".into()),
                (
                    "ALTER TABLE".into(),
                    "query".into(),
                    "BEGIN; ALTER TABLE t ADD COLUMN v text; INSERT INTO t VALUES (1, 'a'); COMMIT".into()
                ),
                ("CREATE INDEX".into(), "function".into(), String::new()),
                ("DROP TABLE".into(), "query".into(), "DROP TABLE t".into()),
            ],
            "PostgreSQL {major}: {lines:#?}"
        );
        // The ALTER's message comes before the INSERT that uses its column.
        let alter = lines.iter().position(|l| l.contains("\"tag\": \"ALTER TABLE\"")).unwrap();
        let insert = lines.iter().position(|l| l.starts_with("table public.t: INSERT")).unwrap();
        assert!(alter < insert, "PostgreSQL {major}: {lines:#?}");
        assert_eq!(messages[3]["objects"][0]["identity"], "public.t", "PostgreSQL {major}");
    }
}

/// DDL and `migrate.map`: a table with only a row filter keeps its names,
/// so its DDL is applied; DDL on a renamed table stops the task (its text
/// names the source's table), and is skipped after the change by hand.
#[test]
fn ddl_on_filtered_tables_is_applied_and_on_renamed_ones_stops() {
    let t = with_extension(
        builder("ddl_map")
            .set("migrate.map", "[{ table = \"app.items\", where = \"qty < 5\" }, { table = \"app.old_stuff\", to = \"archived\" }]")
            .build(),
    );
    t.src().batch_execute(&format!("{APP} ALTER TABLE app.items REPLICA IDENTITY FULL;")).unwrap();
    let mut m = t.migrate_until_incremental("migrate.log", Duration::from_secs(120));
    let mut src = t.src();
    src.batch_execute(
        "BEGIN; ALTER TABLE app.items ADD COLUMN note text; UPDATE app.items SET note = 'n' || id WHERE id <= 40; COMMIT;
         UPDATE app.items SET qty = 1 WHERE id BETWEEN 41 AND 45;",
    )
    .unwrap();
    t.assert_equal();
    let notes: i64 = t.dst().query_one("SELECT count(note) FROM app.items", &[]).unwrap().get(0);
    let expected: i64 = src.query_one("SELECT count(note) FROM app.items WHERE qty < 5", &[]).unwrap().get(0);
    assert_eq!(notes, expected);

    src.batch_execute("ALTER TABLE app.old_stuff ADD COLUMN v int").unwrap();
    let log = fails(&mut m);
    expect(&log, &["ALTER TABLE of app.old_stuff", "migrate.map gives its objects other names", "decant skip-ddl --at"]);
    let at = log.rsplit("decant skip-ddl --at ").next().unwrap().split('`').next().unwrap().to_owned();
    t.dst().batch_execute("ALTER TABLE app.archived ADD COLUMN v int").unwrap();
    let (ok, out) = t.command(&["skip-ddl", "--at", &at]);
    assert!(ok, "{out}");
    let mut m = t.migrate("migrate.log");
    src.batch_execute("INSERT INTO app.old_stuff VALUES (100, 7)").unwrap();
    t.assert_equal();
    let _ = m.stop();
}
