//! `decant precheck` on clusters the tests misconfigure, several ways at
//! once: for each check that can fail here, its line (severity, name,
//! object) and its fix; a clean pass, `--json`, `--accept`, the checks
//! that a task's types leave out, and the roles refusing to start before
//! they write anything.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use decant_tests::process::{fails, Role};
use decant_tests::task::Config;
use decant_tests::Cluster;

fn decant() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_decant"))
}

/// Writes task `p`'s configuration `name`: the test defaults without
/// heartbeats, status interval and retry settings, with a transport token;
/// `migrate` goes into `[migrate]`.
fn config(dir: &Path, name: &str, source: &str, destination: &str, migrate: &str) -> PathBuf {
    Config::new("p")
        .dsns(source, destination)
        .unset("source.heartbeat_seconds")
        .unset("agent.status_interval_seconds")
        .unset("retry")
        .set("transport.token", "\"precheck test\"")
        .lines("migrate", migrate)
        .write(&dir.join(format!("{name}.toml")))
}

/// Runs `decant precheck`; returns (exit success, stdout, stderr).
fn precheck(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(decant()).arg("precheck").arg("--config").arg(config).args(args).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.success(), stdout, stderr)
}

/// Asserts a line `severity check object: …` that contains each of
/// `parts` (the message and the fix).
fn expect_line(out: &str, severity: &str, check: &str, object: &str, parts: &[&str]) {
    let line = out
        .lines()
        .find(|l| {
            let mut words = l.split_whitespace();
            words.next() == Some(severity) && words.next() == Some(check) && (object.is_empty() || l.contains(&format!(" {object}: ")))
        })
        .unwrap_or_else(|| panic!("no {severity} line of {check} about {object} in:\n{out}"));
    for p in parts {
        assert!(line.contains(p), "the {check} line does not say {p:?}:\n{line}");
    }
}

/// Whether any line names `check`.
fn mentions(out: &str, check: &str) -> bool {
    out.lines().any(|l| l.split_whitespace().nth(1) == Some(check))
}

fn plugin_libraries_known(c: &Cluster) -> bool {
    c.connect().query_one("SELECT count(*) = 1 FROM pg_settings WHERE name = 'output_plugin_libraries'", &[]).unwrap().get(0)
}

#[test]
fn a_misconfigured_source_and_destination_report_each_problem_with_its_fix() {
    let dir = tempfile::tempdir().unwrap();
    let source = Cluster::start_with(&[
        "wal_level = replica",
        "max_replication_slots = 0",
        "max_wal_senders = 0",
        "max_slot_wal_keep_size = 1GB",
        "wal_sender_timeout = 5s",
        "max_prepared_transactions = 2",
    ]);
    let dest = Cluster::start();
    let restricted = plugin_libraries_known(&source);
    if restricted {
        let mut c = source.connect();
        c.batch_execute("ALTER SYSTEM SET output_plugin_libraries = 'pgoutput'").unwrap();
        c.batch_execute("SELECT pg_reload_conf()").unwrap();
    }
    source.connect().batch_execute("CREATE DATABASE shop ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0").unwrap();
    dest.connect().batch_execute("CREATE DATABASE shop").unwrap();
    source
        .connect_db("shop")
        .batch_execute(
            "CREATE ROLE weak LOGIN;
             ALTER ROLE weak SET statement_timeout = '1min';
             CREATE SCHEMA hidden; CREATE TABLE hidden.h (id int PRIMARY KEY);
             CREATE SCHEMA types; CREATE TYPE types.mood AS ENUM ('sad', 'ok');
             CREATE TABLE keyless (a int, b text);
             CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);
             CREATE FOREIGN DATA WRAPPER dummy; CREATE SERVER elsewhere FOREIGN DATA WRAPPER dummy;
             CREATE FOREIGN TABLE remote (id int) SERVER elsewhere;
             CREATE TABLE unsel (id serial PRIMARY KEY);
             CREATE TABLE orders (id int PRIMARY KEY DEFAULT nextval('unsel_id_seq'), mood types.mood);
             SELECT lo_create(0);
             GRANT SELECT ON keyless, scratch, unsel, orders TO weak;",
        )
        .unwrap();
    let mut c = source.connect_db("shop");
    c.batch_execute("BEGIN").unwrap();
    c.batch_execute("INSERT INTO keyless VALUES (1, 'x')").unwrap();
    c.batch_execute("PREPARE TRANSACTION 'stuck'").unwrap();
    // A transaction of the source user that writes, left open.
    let mut open =
        postgres::Client::connect(&format!("host=127.0.0.1 port={} user=weak dbname=shop", source.port()), postgres::NoTls).unwrap();
    open.batch_execute("BEGIN; SELECT txid_current()").unwrap();
    let opened = Instant::now();
    dest.connect_db("shop")
        .batch_execute(
            "CREATE ROLE app LOGIN;
             CREATE TABLE orders (id int PRIMARY KEY);
             CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
             CREATE TRIGGER audit BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION noop();
             ALTER TABLE orders ENABLE ALWAYS TRIGGER audit;",
        )
        .unwrap();
    let old_pg_dump = dir.path().join("old_pg_dump");
    std::fs::write(&old_pg_dump, "#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n").unwrap();
    std::fs::set_permissions(&old_pg_dump, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cfg = config(
        dir.path(),
        "bad",
        &format!("host=127.0.0.1 port={} user=weak dbname=shop", source.port()),
        &format!("host=127.0.0.1 port={} user=app dbname=shop", dest.port()),
        &format!("types = [\"schema\", \"full\", \"incremental\"]\npg_dump = \"{}\"\n", old_pg_dump.display()),
    );
    let exclude = "source.exclude_tables=[\"public.unsel*\", \"types.*\"]";
    // The open transaction counts as long after 10 s.
    std::thread::sleep(Duration::from_secs(11).saturating_sub(opened.elapsed()));
    let (ok, out, err) = precheck(&cfg, &["--set", exclude]);
    assert!(!ok, "{out}");
    assert!(err.contains("error(s); fix them"), "{err}");

    // The source server.
    expect_line(&out, "pass", "source.connect", "source", &["as weak", "not encrypted"]);
    expect_line(&out, "error", "source.pg_dump", "pg_dump", &["9.6.24", "older than the source", "migrate.pg_dump"]);
    expect_line(&out, "error", "source.wal_level", "wal_level", &["wal_level is replica", "wal_level = logical", "restart"]);
    expect_line(&out, "error", "source.replication_slots", "max_replication_slots", &["is 0", "max_replication_slots = 1", "restart"]);
    expect_line(&out, "error", "source.wal_senders", "max_wal_senders", &["is 0", "max_wal_senders = 1", "restart"]);
    if restricted {
        // Hidden from weak, who may not read it (a superuser sees the list:
        // see the clean task's test).
        expect_line(
            &out,
            "warning",
            "source.output_plugin_libraries",
            "output_plugin_libraries",
            &["may not read", "SHOW output_plugin_libraries", "pg_reload_conf()"],
        );
    }
    expect_line(&out, "pass", "source.plugin", "decant", &["installed"]);
    expect_line(&out, "pass", "source.slot", "slot \"decant_p\"", &["free"]);
    expect_line(
        &out,
        "error",
        "source.replication_privilege",
        "weak",
        &["neither REPLICATION nor superuser", "ALTER ROLE \"weak\" REPLICATION;"],
    );
    expect_line(&out, "error", "source.select", "hidden.h", &["may not read", "GRANT SELECT ON \"hidden\".\"h\" TO \"weak\";"]);
    expect_line(&out, "error", "source.select", "public.remote", &["GRANT SELECT ON \"public\".\"remote\" TO \"weak\";"]);
    expect_line(&out, "error", "source.schema_usage", "schema hidden", &["GRANT USAGE ON SCHEMA \"hidden\" TO \"weak\";"]);
    let pid: i32 = source
        .connect_db("shop")
        .query_one("SELECT pid FROM pg_stat_activity WHERE usename = 'weak' AND backend_xid IS NOT NULL", &[])
        .unwrap()
        .get(0);
    expect_line(
        &out,
        "warning",
        "source.long_transactions",
        &format!("pid {pid}"),
        &["has been open for", &format!("pg_terminate_backend({pid})"), "--accept source.long_transactions"],
    );
    expect_line(
        &out,
        "warning",
        "source.prepared_transactions",
        "prepared transaction \"stuck\"",
        &["COMMIT PREPARED 'stuck';", "ROLLBACK PREPARED 'stuck';"],
    );
    expect_line(&out, "warning", "source.max_slot_wal_keep_size", "max_slot_wal_keep_size", &["1024 MB", "max_slot_wal_keep_size = -1"]);
    expect_line(&out, "warning", "source.wal_sender_timeout", "wal_sender_timeout", &["5000 ms", "wal_sender_timeout = 60s"]);
    expect_line(&out, "warning", "source.timeouts", "statement_timeout", &["60000 ms", "ALTER ROLE \"weak\" SET statement_timeout = 0;"]);
    expect_line(&out, "pass", "source.standby", "source", &["primary"]);
    expect_line(&out, "warning", "source.large_objects", "pg_largeobject", &["1 large object"]);
    // The selected tables.
    expect_line(
        &out,
        "error",
        "tables.replica_identity",
        "public.keyless",
        &["ALTER TABLE \"public\".\"keyless\" REPLICA IDENTITY FULL;", "insert_only_tables"],
    );
    expect_line(&out, "warning", "tables.unlogged", "public.scratch", &["ALTER TABLE \"public\".\"scratch\" SET LOGGED;"]);
    expect_line(&out, "warning", "tables.foreign", "public.remote", &["source.exclude_tables = [\"public.remote\"]"]);
    expect_line(
        &out,
        "warning",
        "tables.sequences",
        "sequence public.unsel_id_seq",
        &["public.orders.id", "belongs to public.unsel", "setval("],
    );
    // The destination, and the destination against the source.
    expect_line(&out, "pass", "destination.connect", "destination", &["as app"]);
    // PostgreSQL 15 lets a role be granted the parameter, and no longer
    // lets everyone create in schema public.
    let version: i32 = dest.connect().query_one("SELECT current_setting('server_version_num')::int4", &[]).unwrap().get(0);
    let fix = if version >= 150000 { "GRANT SET ON PARAMETER session_replication_role TO \"app\";" } else { "SUPERUSER" };
    expect_line(&out, "error", "destination.session_replication_role", "app", &["every applier session", fix]);
    expect_line(&out, "error", "destination.create", "database shop", &["schema decant", "GRANT CREATE ON DATABASE \"shop\" TO \"app\";"]);
    if version >= 150000 {
        expect_line(&out, "error", "destination.create", "schema public", &["GRANT CREATE ON SCHEMA \"public\" TO \"app\";"]);
    }
    expect_line(&out, "error", "destination.create", "schema hidden", &["GRANT CREATE ON DATABASE \"shop\" TO \"app\";"]);
    expect_line(
        &out,
        "warning",
        "destination.replication_origin",
        "app",
        &["GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text)"],
    );
    expect_line(&out, "error", "destination.conflicts", "TABLE public.orders", &["already exists", "migrate.conflicts = \"ignore\""]);
    expect_line(
        &out,
        "warning",
        "destination.triggers",
        "trigger audit on public.orders",
        &["ALWAYS", "ALTER TABLE \"public\".\"orders\" ENABLE TRIGGER \"audit\";"],
    );
    expect_line(&out, "error", "destination.types", "type types.mood", &["public.orders.mood", "\"types.*\""]);
    expect_line(&out, "warning", "destination.encoding", "encoding", &["LATIN1", "UTF8", "WITH ENCODING 'LATIN1'"]);
    expect_line(&out, "warning", "destination.disk_space", "destination", &["cannot be measured", "data_directory", "df -h"]);

    // Incremental alone: no slot may be created, and the schema and copy
    // checks are left out.
    let (ok, out, _) = precheck(&cfg, &["--set", exclude, "--set", "migrate.types=[\"incremental\"]", "--set", "source.create_slot=false"]);
    assert!(!ok);
    expect_line(&out, "error", "source.slot", "slot \"decant_p\"", &["does not exist", "source.create_slot = true"]);
    for absent in
        ["source.pg_dump", "source.select", "source.timeouts", "destination.conflicts", "destination.types", "destination.disk_space"]
    {
        assert!(!mentions(&out, absent), "{absent} ran with incremental alone:\n{out}");
    }
    // Schema and full alone: nothing of logical decoding.
    let (_, out, _) = precheck(&cfg, &["--set", exclude, "--set", "migrate.types=[\"schema\", \"full\"]"]);
    for absent in ["source.wal_level", "source.slot", "source.replication_slots", "tables.replica_identity", "tables.unlogged"] {
        assert!(!mentions(&out, absent), "{absent} ran without incremental:\n{out}");
    }
    open.batch_execute("ROLLBACK").unwrap();
    source.connect_db("shop").batch_execute("ROLLBACK PREPARED 'stuck'").unwrap();
}

#[test]
fn a_clean_task_passes_and_the_roles_refuse_to_start_on_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let source = Cluster::start();
    let dest = Cluster::start();
    source.connect().batch_execute("CREATE TABLE items (id int PRIMARY KEY, v text)").unwrap();
    let all = "types = [\"schema\", \"full\", \"incremental\"]";
    let cfg = config(dir.path(), "clean", &source.conninfo("postgres"), &dest.conninfo("postgres"), all);

    // Everything in order: exit 0, no error line; the disk measured here.
    let (ok, out, err) = precheck(&cfg, &[]);
    assert!(ok, "{out}{err}");
    assert!(!out.lines().any(|l| l.starts_with("error")), "{out}");
    expect_line(&out, "pass", "source.wal_level", "wal_level", &["logical"]);
    expect_line(&out, "pass", "tables.selection", "tables", &["1 tables selected"]);
    expect_line(&out, "pass", "destination.disk_space", "", &["free (df on the destination's host)", "pg_total_relation_size"]);
    let (ok, json, _) = precheck(&cfg, &["--json"]);
    assert!(ok);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!((json["ok"].as_bool(), json["errors"].as_u64()), (Some(true), Some(0)), "{json}");
    let checks = json["checks"].as_array().unwrap();
    assert!(checks.iter().all(|c| ["pass", "warning"].contains(&c["severity"].as_str().unwrap())), "{json}");
    assert!(checks.iter().any(|c| c["check"] == "destination.session_replication_role"), "{json}");

    // A server that does not allow the plugin (where it has the setting).
    if plugin_libraries_known(&source) {
        let mut c = source.connect();
        c.batch_execute("ALTER SYSTEM SET output_plugin_libraries = 'pgoutput'").unwrap();
        c.batch_execute("SELECT pg_reload_conf()").unwrap();
        decant_tests::process::wait_for("the reload", Duration::from_secs(10), || {
            c.query_one("SHOW output_plugin_libraries", &[]).unwrap().get::<_, String>(0) == "pgoutput"
        });
        // decant asked for by name (auto would choose pgoutput here).
        let (ok, out, _) = precheck(&cfg, &["--set", "source.decoder=\"decant\""]);
        assert!(!ok);
        expect_line(
            &out,
            "error",
            "source.output_plugin_libraries",
            "output_plugin_libraries",
            &["'pgoutput'", "may not be used as an output plugin", "output_plugin_libraries = 'pgoutput, decant'", "pg_reload_conf()"],
        );
        c.batch_execute("ALTER SYSTEM RESET output_plugin_libraries").unwrap();
        c.batch_execute("SELECT pg_reload_conf()").unwrap();
        decant_tests::process::wait_for("the reload", Duration::from_secs(10), || {
            c.query_one("SHOW output_plugin_libraries", &[]).unwrap().get::<_, String>(0).contains("decant")
        });
    }

    // An unknown name to accept.
    let (ok, _, err) = precheck(&cfg, &["--accept", "tables.unloged"]);
    assert!(!ok && err.contains("no check is named \"tables.unloged\"") && err.contains("tables.unlogged"), "{err}");

    // A keyless table (an error with incremental) and an unlogged one.
    source
        .connect()
        .batch_execute("CREATE TABLE log (at timestamptz, line text); CREATE UNLOGGED TABLE cache (k int PRIMARY KEY)")
        .unwrap();
    let (ok, out, _) = precheck(&cfg, &[]);
    assert!(!ok);
    expect_line(&out, "error", "tables.replica_identity", "public.log", &["ALTER TABLE \"public\".\"log\" REPLICA IDENTITY FULL;"]);
    expect_line(&out, "warning", "tables.unlogged", "public.cache", &["SET LOGGED", "(or --accept tables.unlogged)"]);
    let (ok, out, _) = precheck(&cfg, &["--accept", "tables.unlogged"]);
    assert!(!ok);
    expect_line(&out, "accepted", "tables.unlogged", "public.cache", &["SET LOGGED"]);
    let (_, json, _) = precheck(&cfg, &["--accept", "tables.unlogged", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let unlogged = json["checks"].as_array().unwrap().iter().find(|c| c["check"] == "tables.unlogged").unwrap();
    assert_eq!((unlogged["severity"].as_str(), unlogged["accepted"].as_bool()), (Some("warning"), Some(true)), "{json}");
    assert_eq!((json["ok"].as_bool(), json["errors"].as_u64(), json["accepted"].as_u64()), (Some(false), Some(1), Some(1)), "{json}");

    // migrate refuses before writing anything, and lists the warnings.
    let mut m = Role::start(decant(), "migrate", &cfg, &dir.path().join("migrate.log"));
    let log = fails(&mut m);
    for part in
        ["precheck found 1 error(s)", "tables.replica_identity", "public.log", "ALTER TABLE \"public\".\"log\" REPLICA IDENTITY FULL;"]
    {
        assert!(log.contains(part), "missing {part:?}:\n{log}");
    }
    assert!(log.contains("accept with --accept tables.unlogged"), "{log}");
    let written: bool = dest.connect().query_one("SELECT to_regnamespace('decant') IS NOT NULL", &[]).unwrap().get(0);
    assert!(!written, "the destination was written to:\n{log}");
    let slots: i64 = source.connect().query_one("SELECT count(*) FROM pg_replication_slots", &[]).unwrap().get(0);
    assert_eq!(slots, 0);

    // The agent checks the source only: an unreachable destination is no
    // concern of its precheck.
    let split =
        config(dir.path(), "split", &source.conninfo("postgres"), "host=127.0.0.1 port=1 user=postgres", "types = [\"incremental\"]");
    let log = fails(&mut Role::start(decant(), "agent", &split, &dir.path().join("agent.log")));
    assert!(log.contains("tables.replica_identity") && !log.contains("destination.connect"), "{log}");
    // The applier the destination only, here with a user who may not set
    // session_replication_role.
    dest.connect().batch_execute("CREATE ROLE app LOGIN").unwrap();
    let split = config(
        dir.path(),
        "applier",
        "host=127.0.0.1 port=1 user=postgres",
        &format!("host=127.0.0.1 port={} user=app dbname=postgres", dest.port()),
        "types = [\"incremental\"]",
    );
    let log = fails(&mut Role::start(decant(), "applier", &split, &dir.path().join("applier.log")));
    assert!(log.contains("destination.session_replication_role") && !log.contains("source.connect"), "{log}");

    // Schema and full copy alone need no replica identity.
    let (ok, out, _) = precheck(&cfg, &["--set", "migrate.types=[\"schema\", \"full\"]"]);
    assert!(ok, "{out}");
    assert!(!mentions(&out, "tables.replica_identity"), "{out}");

    // TLS the destination does not offer.
    let tls = format!("destination.dsn=\"{} sslmode=require\"", dest.conninfo("postgres"));
    let (ok, out, _) = precheck(&cfg, &["--set", &tls]);
    assert!(!ok);
    expect_line(&out, "error", "destination.connect", "destination", &["TLS", "sslmode"]);

    // A slot of another plugin, and one of ours that no plan explains.
    source.connect().batch_execute("SELECT pg_create_logical_replication_slot('td', 'test_decoding')").unwrap();
    let (ok, out, _) = precheck(&cfg, &["--set", "source.slot=\"td\"", "--set", "source.decoder=\"decant\""]);
    assert!(!ok);
    expect_line(
        &out,
        "error",
        "source.slot",
        "slot \"td\"",
        &["uses output plugin test_decoding, but source.decoder = \"decant\"", "pg_drop_replication_slot('td')"],
    );
    source.connect().batch_execute("SELECT pg_create_logical_replication_slot('decant_p', 'decant')").unwrap();
    let (_, out, _) = precheck(&cfg, &[]);
    expect_line(&out, "error", "source.slot", "slot \"decant_p\"", &["already exists, but the destination has no plan for task p"]);
    source.connect().batch_execute("SELECT pg_drop_replication_slot('decant_p'), pg_drop_replication_slot('td')").unwrap();

    // Single tables: the schema phase creates no extension; a pattern
    // that names no table.
    source.connect().batch_execute("CREATE EXTENSION citext; CREATE TABLE tagged (id int PRIMARY KEY, tag citext)").unwrap();
    let (ok, out, _) = precheck(
        &cfg,
        &["--set", "migrate.types=[\"schema\", \"full\"]", "--set", "source.include_tables=[\"public.tagged\", \"public.nope\"]"],
    );
    assert!(!ok);
    expect_line(&out, "error", "destination.extensions", "extension citext", &["public.tagged.tag", "CREATE EXTENSION \"citext\";"]);
    expect_line(&out, "error", "tables.selection", "public.nope", &["no such table on the source: public.nope"]);

    // Full copy without schema: the destination must hold the tables.
    let (ok, out, _) = precheck(&cfg, &["--set", "migrate.types=[\"full\"]", "--set", "source.include_tables=[\"public.items\"]"]);
    assert!(!ok);
    expect_line(
        &out,
        "error",
        "destination.tables",
        "public.items",
        &["does not exist in the destination", "add \"schema\" to migrate.types"],
    );
}

#[test]
fn a_standby_source_is_checked_for_what_decoding_there_needs() {
    let dir = tempfile::tempdir().unwrap();
    let primary = Cluster::start();
    primary.connect().batch_execute("CREATE TABLE t (id int PRIMARY KEY)").unwrap();
    let standby = primary.start_standby(&["hot_standby_feedback = off"]);
    let version: i32 = standby.connect().query_one("SELECT current_setting('server_version_num')::int4", &[]).unwrap().get(0);
    let cfg = config(dir.path(), "standby", &standby.conninfo("postgres"), "host=127.0.0.1 port=1", "types = [\"incremental\"]");
    let (ok, out, _) = precheck(&cfg, &["--side", "source"]);
    if version < 160000 {
        assert!(!ok);
        expect_line(&out, "error", "source.standby", "source", &["a standby", "PostgreSQL 16 or later", "the primary"]);
    } else {
        expect_line(&out, "warning", "source.standby", "hot_standby_feedback", &["hot_standby_feedback = on"]);
    }
    assert!(!mentions(&out, "destination.connect"), "{out}");
    // A full copy reads a standby, whose recovery may cancel long queries
    // without hot_standby_feedback.
    let (ok, out, _) = precheck(&cfg, &["--side", "source", "--set", "migrate.types=[\"full\"]"]);
    assert!(ok, "{out}");
    expect_line(
        &out,
        "warning",
        "source.standby",
        "hot_standby_feedback",
        &["cancel the copy's long queries", "hot_standby_feedback = on"],
    );
}
