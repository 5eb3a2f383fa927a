//! The incremental path end to end: source slot → agent → gRPC → applier →
//! destination, with real clusters, real load, and crashes.

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::time::Duration;

use decant_tests::process::{free_port, http_get, run_ok, table_digest, wait_for, Role};
use decant_tests::task::Task;
use decant_tests::Cluster;

const TABLES: &[(&str, &str)] = &[
    ("pgbench_accounts", "aid"),
    ("pgbench_branches", "bid"),
    ("pgbench_tellers", "tid"),
    ("pgbench_history", "t::text"),
    ("mixed", "id"),
    ("typed", "id"),
];

/// A task whose agent and applier run as separate roles.
struct Pair(Task);

impl Deref for Pair {
    type Target = Task;
    fn deref(&self) -> &Task {
        &self.0
    }
}

impl DerefMut for Pair {
    fn deref_mut(&mut self) -> &mut Task {
        &mut self.0
    }
}

/// The shared token of a pair's agent and applier.
const PAIR_TOKEN: &str = "streaming test";

/// Two clusters with the same schema and data (pgbench scale 1 plus a
/// mixed-type table with TOASTed values), and task `t` (2 minutes of
/// retries for errors other than connections; no `[migrate]`).
fn pair() -> Pair {
    let t = Task::builder(env!("CARGO_BIN_EXE_decant"), "t").transport(PAIR_TOKEN).set("retry.other_minutes", "2").unset("migrate").build();
    let (source, dest) = (&t.source, &t.dest);
    t.pgbench_init("1");
    source
        .connect()
        .batch_execute(
            "CREATE EXTENSION decant;
             CREATE TABLE mixed (id int PRIMARY KEY, n numeric, f float8, t text, b bytea, ts timestamptz, j jsonb, a int[], big text, c char(8));
             ALTER TABLE mixed ALTER big SET STORAGE EXTERNAL;
             INSERT INTO mixed SELECT g, g * 1.5, g / 3.0, 'row ' || g, int4send(g), '2024-01-01'::timestamptz + g * interval '1 hour',
                    jsonb_build_object('g', g), ARRAY[g, g + 1], CASE WHEN g % 10 = 0 THEN repeat(md5(g::text), 400) END, 'c' || g
             FROM generate_series(1, 200) g;
             -- Every column of a type the applier copies in binary.
             CREATE TABLE typed (id int8 PRIMARY KEY, s int2, i int4, b bool, f4 float4, f8 float8, d date, tm time,
                                 ts timestamp, tz timestamptz, u uuid, t text, v varchar(20), c char(6), raw bytea, big text);
             ALTER TABLE typed ALTER big SET STORAGE EXTERNAL;
             INSERT INTO typed SELECT g, g - 100, g * 1000, g % 2 = 0, g / 7.0, -g / 3.0, '2000-01-01'::date + g,
                    '00:00'::time + g * interval '1 min', '2024-01-01'::timestamp + g * interval '1 s',
                    '2024-01-01'::timestamptz + g * interval '1 ms', md5(g::text)::uuid, 'ü ' || g, 'v' || g, 'c' || g,
                    int4send(g), CASE WHEN g % 10 = 0 THEN repeat(md5(g::text), 400) END
             FROM generate_series(1, 200) g;",
        )
        .unwrap();
    let dump = source.tool("pg_dump").args(["-d", "postgres"]).output().unwrap();
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let mut psql = dest
        .tool("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(psql.stdin.as_mut().unwrap(), &dump.stdout).unwrap();
    drop(psql.stdin.take());
    assert!(psql.wait().unwrap().success());
    Pair(t)
}

impl Pair {
    /// A backlog, then megabytes of WAL of another database after its last
    /// COMMIT: a walsender reads that COMMIT with WAL still to decode, so
    /// the plugin holds it (pack_transactions).
    fn backlog_then_unrelated_wal(&self) {
        self.pgbench(&["-t", "100"]);
        self.source.connect().batch_execute("CREATE DATABASE other").unwrap();
        self.source.connect_db("other").batch_execute("CREATE TABLE filler AS SELECT g FROM generate_series(1, 200000) g").unwrap();
    }

    /// A test_decoding slot beside decant's, read only if the destination
    /// never catches up: it shows where the missing transactions committed.
    fn audit_slot(&self) {
        self.source.connect().batch_execute("SELECT pg_create_logical_replication_slot('audit', 'test_decoding')").unwrap();
    }

    /// Turns on the applier's metrics endpoint (its metrics_listen is the
    /// second one in the file); returns its port.
    fn applier_metrics(&mut self) -> u16 {
        let port = free_port();
        self.edit(|c| c.set("applier.metrics_listen", &format!("\"127.0.0.1:{port}\"")));
        port
    }

    /// Starts a role; an applier is waited for until it listens, an agent
    /// until its slot exists and streams (changes made before the slot is
    /// created are not in it, and the test would wait for them forever).
    fn role(&self, name: &str) -> Role {
        let log = format!("{name}.log");
        if name == "applier" {
            return self.applier(&[], &log);
        }
        let role = self.start(name, &log);
        if name == "agent" {
            self.wait_slot_active(Duration::from_secs(60));
        }
        role
    }

    fn pgbench(&self, args: &[&str]) {
        run_ok(self.source.tool("pgbench").args(["-n", "-c", "4", "-j", "2"]).args(args).arg("postgres"));
    }

    fn mixed_changes(&self, round: i32) {
        self.source
            .connect()
            .batch_execute(&format!(
                "UPDATE mixed SET n = n + {round}, ts = ts + interval '1 day' WHERE id % 7 = {r};
                 UPDATE mixed SET f = 'NaN', t = t || ' ü' WHERE id % 10 = 0 AND id % 3 = {r3};
                 DELETE FROM mixed WHERE id = {del};
                 UPDATE mixed SET id = id + 5000 WHERE id = {moved};
                 UPDATE mixed SET id = id + 7000, big = 'moved' WHERE id = {moved2};
                 INSERT INTO mixed VALUES ({ins}, 'NaN', '-Infinity', NULL, '\\x00ff', 'infinity', '{{\"x\": 1.50}}', '{{1,NULL}}', repeat('x', 9000), 'z')
                 ON CONFLICT (id) DO NOTHING;
                 UPDATE typed SET i = i + {round}, ts = ts + interval '1 day', f8 = 'NaN' WHERE id % 7 = {r};
                 UPDATE typed SET d = 'infinity', tz = '-infinity', tm = '24:00', f4 = '-0', c = 'x', t = t || E'\\t\\\\'
                 WHERE id % 10 = {r3};
                 DELETE FROM typed WHERE id = {del};
                 UPDATE typed SET id = id + 5000 WHERE id = {moved};
                 UPDATE typed SET id = id + 7000, big = 'moved' WHERE id = {moved2};
                 INSERT INTO typed VALUES ({ins}, 32767, -2147483648, NULL, 'Infinity', '-Infinity', '-infinity', '00:00',
                                           'infinity', 'infinity', NULL, E'tab\\there', '', '', '\\x00', repeat('y', 9000))
                 ON CONFLICT (id) DO NOTHING;",
                r = round % 7,
                r3 = round % 3,
                del = 100 + round,
                moved = 10 * round + 10,
                moved2 = 10 * round + 15,
                ins = 1000 + round
            ))
            .unwrap();
    }

    fn digests(cluster: &Cluster) -> Vec<(i64, String)> {
        let mut c = cluster.connect();
        TABLES.iter().map(|(t, order)| table_digest(&mut c, t, order)).collect()
    }

    /// Waits until every table on the destination equals the source.
    fn wait_equal(&self) {
        let want = Self::digests(&self.source);
        let mut got = Vec::new();
        let until = std::time::Instant::now() + Duration::from_secs(120);
        while std::time::Instant::now() < until {
            got = Self::digests(&self.dest);
            if got == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let diff: Vec<String> = TABLES
            .iter()
            .zip(want.iter().zip(&got))
            .filter(|(_, (w, g))| w != g)
            .map(|(t, (w, g))| format!("{}: source {} rows, destination {} rows", t.0, w.0, g.0))
            .collect();
        // The roles' logs: whether rows were lost or the stream stopped.
        let tail = |name: &str| {
            let log = std::fs::read_to_string(self.path(format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        panic!(
            "destination differs from source after 120 s: {}\n{}\n--- agent log (end)\n{}\n--- applier log (end)\n{}",
            diff.join("; "),
            self.positions_and_missing_history(),
            tail("agent"),
            tail("applier")
        );
    }

    /// For a destination that never caught up: where the source, the slot
    /// and the destination stand, and which history rows differ (rows
    /// missing from the middle are a loss; missing at the end, a stream that
    /// stopped).
    fn positions_and_missing_history(&self) -> String {
        let mut src = self.source.connect();
        let mut dst = self.dest.connect();
        let one = |c: &mut postgres::Client, sql: &str| -> String {
            c.query_one(sql, &[]).map(|r| r.get::<_, Option<String>>(0).unwrap_or_default()).unwrap_or_else(|e| e.to_string())
        };
        let wal = one(&mut src, "SELECT pg_current_wal_lsn()::text");
        let slot = one(
            &mut src,
            "SELECT confirmed_flush_lsn::text || ' active ' || active FROM pg_replication_slots WHERE slot_name = 'decant_t'",
        );
        let sent = one(&mut src, "SELECT string_agg(sent_lsn::text || '/' || flush_lsn::text, ', ') FROM pg_stat_replication");
        let applied = one(&mut dst, "SELECT string_agg(task_id || ' ' || source_lsn::text, ', ') FROM decant.progress");
        // (mtime, whole row as text), sorted: a merge walk finds the rows
        // only on one side.
        let rows = |c: &mut postgres::Client| -> Vec<(String, String)> {
            let mut v: Vec<(String, String)> =
                c.query("SELECT mtime::text, h::text FROM pgbench_history h", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
            v.sort();
            v
        };
        let (want, got) = (rows(&mut src), rows(&mut dst));
        let (mut missing, mut extra) = (Vec::new(), 0);
        let (mut i, mut j) = (0, 0);
        while i < want.len() || j < got.len() {
            if i < want.len() && j < got.len() && want[i] == got[j] {
                i += 1;
                j += 1;
            } else if j == got.len() || (i < want.len() && want[i] < got[j]) {
                missing.push(&want[i].0);
                i += 1;
            } else {
                extra += 1;
                j += 1;
            }
        }
        let newest = one(&mut src, "SELECT max(mtime)::text FROM pgbench_history");
        // With an audit slot (see `audit_slot`): the commit positions of
        // the transactions whose rows are missing, and of the commit before
        // each, to set against the destination's position.
        let mut audit = String::new();
        if let Ok(changes) = src.query("SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_changes('audit', NULL, NULL)", &[]) {
            const MTIME: &str = "mtime[timestamp without time zone]:'";
            let mut xids = std::collections::BTreeSet::new();
            for c in &changes {
                let data: String = c.get(2);
                if let (true, Some(at)) = (data.starts_with("table public.pgbench_history: INSERT:"), data.find(MTIME)) {
                    let mtime = data[at + MTIME.len()..].split('\'').next().unwrap_or_default();
                    if missing.iter().any(|m| m.as_str() == mtime) {
                        xids.insert(c.get::<_, String>(1));
                    }
                }
            }
            let mut previous = String::new();
            for c in changes.iter().filter(|c| c.get::<_, String>(2).starts_with("COMMIT")) {
                let (lsn, xid): (String, String) = (c.get(0), c.get(1));
                if xids.contains(&xid) {
                    audit.push_str(&format!("\n  xid {xid} committed at {lsn} (the commit before: {previous})"));
                }
                previous = lsn;
            }
        }
        format!(
            "source WAL {wal}; slot confirmed {slot}; walsender sent/flush {sent}; destination applied {applied}\n\
             pgbench_history: {} rows missing (mtime {:?} .. {:?}), {} extra; newest source mtime {newest}{audit}",
            missing.len(),
            missing.first(),
            missing.last(),
            extra
        )
    }
}

#[test]
fn streams_pgbench_and_mixed_types_exactly() {
    let p = pair();
    let mut applier = p.role("applier");
    let mut agent = p.role("agent");
    p.pgbench(&["-t", "500"]);
    for round in 0..5 {
        p.mixed_changes(round);
    }
    // Relation metadata sent again in the middle of folded changes (ANALYZE
    // invalidates the tables' cache entries) under load.
    let load = background_load(&p, 3);
    let mut source = p.source.connect();
    for _ in 0..10 {
        pause(300);
        source.batch_execute("ANALYZE pgbench_accounts, pgbench_tellers, pgbench_branches").unwrap();
    }
    load.join().unwrap();
    p.wait_equal();
    assert!(agent.is_running() && applier.is_running(), "{}", applier.log());
    assert_eq!(agent.stop(), Some(0), "{}", agent.log());
    assert_eq!(applier.stop(), Some(0), "{}", applier.log());
    if std::env::var_os("DECANT_SHOW_LOGS").is_some() {
        eprintln!("{}\n{}", agent.log(), applier.log());
    }
}

/// pgbench for `seconds` in the background; failures (a restarted source)
/// are expected and ignored.
fn background_load(p: &Pair, seconds: u32) -> std::thread::JoinHandle<()> {
    let mut cmd = p.source.tool("pgbench");
    cmd.args(["-n", "-c", "4", "-j", "2", "-T", &seconds.to_string(), "postgres"]);
    std::thread::spawn(move || {
        let _ = cmd.output();
    })
}

fn pause(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

#[test]
fn survives_kill9_of_agent_and_applier_and_restarts_of_both_databases() {
    let p = pair();
    p.audit_slot();
    let mut applier = p.role("applier");
    let mut agent = p.role("agent");

    let load = background_load(&p, 3);
    pause(1500);
    agent.kill9();
    pause(300);
    agent = p.role("agent");
    load.join().unwrap();

    // A graceful stop under load: what was read goes out before the agent
    // confirms and exits.
    let load = background_load(&p, 3);
    pause(1500);
    assert_eq!(agent.stop(), Some(0));
    agent = p.role("agent");
    load.join().unwrap();

    let load = background_load(&p, 3);
    pause(1500);
    applier.kill9();
    pause(300);
    applier = p.role("applier");
    load.join().unwrap();
    p.mixed_changes(1);

    let load = background_load(&p, 3);
    pause(1500);
    p.dest.restart();
    load.join().unwrap();
    p.mixed_changes(2);

    let load = background_load(&p, 3);
    pause(1500);
    p.source.restart();
    load.join().unwrap();
    p.pgbench(&["-t", "200"]);
    p.mixed_changes(3);

    p.wait_equal();
    assert!(agent.is_running() && applier.is_running(), "agent: {}\napplier: {}", agent.log(), applier.log());
    // The crashes and restarts really interrupted the stream.
    let reconnects = applier.log().matches("agent connected").count();
    assert!(reconnects >= 2, "the agent reconnected {reconnects} times to the last applier:\n{}", applier.log());
    assert!(agent.log().contains("retrying"), "{}", agent.log());
    assert_eq!(agent.stop(), Some(0));
    assert_eq!(applier.stop(), Some(0));
}

/// Runs `setup`, then installs on the destination's pgbench_history a
/// deferred constraint trigger that runs `body` (PL/pgSQL) for each row
/// at the commit of a transaction that inserted history rows.
fn at_destination_commit(p: &Pair, setup: &str, body: &str) {
    p.dest
        .connect()
        .batch_execute(&format!(
            "{setup};
             CREATE FUNCTION at_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON pgbench_history
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION at_commit();
             -- Replicated rows fire only triggers enabled ALWAYS.
             ALTER TABLE pgbench_history ENABLE ALWAYS TRIGGER at_commit;"
        ))
        .unwrap();
}

#[test]
fn a_group_whose_commit_fails_is_applied_again_in_full() {
    // A deferred constraint trigger on the destination fails the first
    // group's COMMIT, after the group's position was written in it. The
    // position must roll back with the changes, so that the applier, on
    // its next session, asks for them again.
    let p = pair();
    at_destination_commit(
        &p,
        "CREATE SEQUENCE history_rows",
        "IF nextval('history_rows') = 1 THEN RAISE EXCEPTION 'the first commit fails'; END IF;",
    );
    let applier = p.role("applier");
    let _agent = p.role("agent");
    p.pgbench(&["-t", "50"]);
    p.wait_equal();
    assert!(applier.log().contains("the first commit fails"), "the trigger did not fail a commit:\n{}", applier.log());
}

#[test]
fn a_destination_session_ended_during_commit_loses_nothing() {
    // A group's COMMIT waits in a deferred trigger, and its session is
    // terminated there. At exit the session drops its temporary (staging)
    // tables in a transaction of its own, which commits with the session's
    // replication origin and the position last set with
    // pg_replication_origin_xact_setup: a position kept there would pass
    // the aborted group. decant.progress rolls back with the changes.
    let p = pair();
    at_destination_commit(
        &p,
        "CREATE TABLE armed (); CREATE SEQUENCE waits",
        "IF EXISTS (SELECT FROM armed) AND nextval('waits') = 1 THEN PERFORM pg_sleep(60); END IF;",
    );
    let _applier = p.role("applier");
    let _agent = p.role("agent");
    // First groups commit, and with them the session's staging tables.
    p.pgbench(&["-t", "20"]);
    p.wait_equal();
    let mut admin = p.dest.connect();
    admin.batch_execute("INSERT INTO armed DEFAULT VALUES").unwrap();
    p.pgbench(&["-t", "50"]);
    wait_for("the applier's commit to wait in the trigger", Duration::from_secs(60), || {
        admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                  WHERE application_name = 'decant applier t' AND wait_event = 'PgSleep'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 1
    });
    p.wait_equal();
}

#[test]
fn an_idle_source_keeps_advancing_the_slot() {
    let p = pair();
    let _applier = p.role("applier");
    let _agent = p.role("agent");
    p.pgbench(&["-t", "10"]);
    p.wait_equal();
    // WAL written by another database only: nothing for this slot to
    // stream, yet its confirmed position must follow the WAL.
    let mut admin = p.source.connect();
    admin.batch_execute("CREATE DATABASE other").unwrap();
    let mut other = p.source.connect_db("other");
    other.batch_execute("CREATE TABLE filler AS SELECT g FROM generate_series(1, 50000) g").unwrap();
    let target: String = admin.query_one("SELECT pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    wait_for("confirmed_flush_lsn to pass the WAL written elsewhere", Duration::from_secs(60), || {
        admin
            .query_one("SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'decant_t'", &[&target])
            .unwrap()
            .get::<_, bool>(0)
    });
}

#[test]
fn a_source_shutting_down_while_the_plugin_holds_a_commit_stops_and_loses_nothing() {
    // Heartbeats so rare, and none when a commit may be held, that nothing
    // but the shutdown can end the hold.
    let mut p = pair();
    p.edit(|c| c.set("source.heartbeat_seconds", "3600").set("source.heartbeat_when_held", "false"));
    let _applier = p.role("applier");
    let mut agent = p.role("agent");
    p.pgbench(&["-t", "10"]);
    p.wait_equal();
    // A backlog, then megabytes of WAL of another database after its last
    // COMMIT: the plugin reads that COMMIT with a backlog waiting, so it
    // holds it (pack_transactions), and nothing after it would send it.
    assert_eq!(agent.stop(), Some(0));
    p.backlog_then_unrelated_wal();
    let mut admin = p.source.connect();
    let end: String = admin.query_one("SELECT pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    let mut agent = p.role("agent");
    wait_for("the walsender to send everything", Duration::from_secs(60), || {
        admin
            .query_one("SELECT coalesce(bool_or(sent_lsn >= $1::text::pg_lsn), false) FROM pg_stat_replication", &[&end])
            .unwrap()
            .get::<_, bool>(0)
    });
    let history = |c: &mut postgres::Client| c.query_one("SELECT count(*) FROM pgbench_history", &[]).unwrap().get::<_, i64>(0);
    let source_rows = history(&mut admin);
    let mut dest = p.dest.connect();
    std::thread::sleep(Duration::from_secs(1));
    assert!(history(&mut dest) < source_rows, "the last transactions were expected to be held by the plugin");
    // The walsender waits at shutdown for a confirmation of all it sent; the
    // agent cannot give it (a held COMMIT lies before), so it ends the stream.
    p.source.restart();
    assert!(agent.log().contains("the source is shutting down"), "{}", agent.log());
    // After the restart the held transactions come again, with new ones,
    // sent at the latest with the next non-transactional message.
    p.pgbench(&["-t", "10"]);
    p.source.connect().batch_execute("SELECT pg_logical_emit_message(false, 'test', 'flush')").unwrap();
    p.wait_equal();
    assert!(agent.is_running(), "{}", agent.log());
}

#[test]
fn a_commit_held_by_the_plugin_arrives_without_waiting_for_the_heartbeat() {
    // The same hold as above, with heartbeat_when_held on (the default):
    // the agent sees the source's WAL far past the last COMMIT it received
    // and sends a heartbeat at once, which ends the hold.
    let mut p = pair();
    p.edit(|c| c.set("source.heartbeat_seconds", "3600"));
    let _applier = p.role("applier");
    let mut agent = p.role("agent");
    p.pgbench(&["-t", "10"]);
    p.wait_equal();
    assert_eq!(agent.stop(), Some(0));
    // No autovacuum: its commits in this database would also end the hold.
    let mut admin = p.source.connect();
    admin.batch_execute("ALTER SYSTEM SET autovacuum = off").unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    p.backlog_then_unrelated_wal();
    let _agent = p.role("agent");
    p.wait_equal();
}

#[test]
fn a_large_group_merged_on_two_connections_arrives_exactly() {
    // A backlog makes groups with thousands of pgbench_accounts keys, which
    // split_merges (on by default) merges half on each connection.
    let mut p = pair();
    let metrics_port = p.applier_metrics();
    let mut applier = p.role("applier");
    let mut agent = p.role("agent");
    p.pgbench(&["-t", "10"]);
    p.wait_equal();
    assert_eq!(agent.stop(), Some(0));
    p.pgbench(&["-t", "3000"]);
    let mut agent = p.role("agent");
    p.wait_equal();
    let body = http_get(metrics_port, "/metrics");
    assert!(metric(&body, "decant_split_merges_total") >= 1, "no merge was split:\n{body}");
    // The applier killed while such a backlog is applied: a half that the
    // second connection committed is applied again after the restart.
    assert_eq!(agent.stop(), Some(0));
    p.pgbench(&["-t", "3000"]);
    let _agent = p.role("agent");
    pause(400);
    applier.kill9();
    let _applier = p.role("applier");
    p.wait_equal();
}

#[test]
fn a_destination_role_without_replication_origins_applies_exactly_once() {
    // An applier role that owns the tables but may not use replication
    // origins (superuser only): its changes carry no origin, and the
    // position is in decant.progress as always.
    let mut p = pair();
    p.dest
        .connect()
        .batch_execute(
            "CREATE ROLE app LOGIN;
             GRANT CREATE ON DATABASE postgres TO app;
             GRANT USAGE, CREATE ON SCHEMA decant TO app; -- the extension's schema, restored from the dump
             GRANT SET ON PARAMETER session_replication_role TO app;
             ALTER TABLE pgbench_accounts OWNER TO app; ALTER TABLE pgbench_branches OWNER TO app;
             ALTER TABLE pgbench_tellers OWNER TO app; ALTER TABLE pgbench_history OWNER TO app;
             ALTER TABLE mixed OWNER TO app; ALTER TABLE typed OWNER TO app;",
        )
        .unwrap();
    let app_dsn = p.dest.conninfo("postgres").replace("user=postgres", "user=app");
    p.edit(|c| c.set("destination.dsn", &format!("\"{app_dsn}\"")));
    let mut applier = p.role("applier");
    let _agent = p.role("agent");
    let load = background_load(&p, 3);
    pause(1500);
    applier.kill9();
    pause(300);
    let _applier = p.role("applier");
    load.join().unwrap();
    p.mixed_changes(1);
    p.wait_equal();
    let mut dest = p.dest.connect();
    let (origins, position): (i64, Option<String>) = {
        let row = dest
            .query_one(
                "SELECT (SELECT count(*) FROM pg_replication_origin),
                        (SELECT source_lsn::text FROM decant.progress WHERE task_id = 't')",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(origins, 0, "the applier used a replication origin");
    assert!(position.is_some(), "no position in decant.progress");
}

#[test]
fn a_key_whose_equal_values_can_differ_as_text_is_not_split() {
    // numeric 1.0 and 1.00 are one key with two texts: split by text, the
    // two connections could both reach that key and wait on each other.
    let mut p = pair();
    for c in [&p.source, &p.dest] {
        c.connect().batch_execute("CREATE TABLE nk (k numeric PRIMARY KEY, v int)").unwrap();
    }
    let metrics_port = p.applier_metrics();
    let _applier = p.role("applier");
    let mut agent = p.role("agent");
    assert_eq!(agent.stop(), Some(0));
    // One group with thousands of keys of that table, as split merges need.
    p.source.connect().batch_execute("INSERT INTO nk SELECT g, g FROM generate_series(1, 6000) g").unwrap();
    let _agent = p.role("agent");
    let want = table_digest(&mut p.source.connect(), "nk", "k");
    let mut dest = p.dest.connect();
    wait_for("nk on the destination", Duration::from_secs(60), || table_digest(&mut dest, "nk", "k") == want);
    assert_eq!(metric(&http_get(metrics_port, "/metrics"), "decant_split_merges_total"), 0);
}

#[test]
fn metrics_endpoint_reports_progress() {
    let mut p = pair();
    let metrics_port = p.applier_metrics();
    let _applier = p.role("applier");
    let _agent = p.role("agent");
    p.pgbench(&["-t", "50"]);
    p.wait_equal();
    // The data is visible at COMMIT; the counters follow right after it.
    wait_for("the commit counters", Duration::from_secs(30), || {
        metric(&http_get(metrics_port, "/metrics"), "decant_transactions_applied_total") >= 50
    });
    let body = http_get(metrics_port, "/metrics");
    let value = |name: &str| metric(&body, name);
    assert!(value("decant_changes_applied_total") >= 200, "{body}");
    assert!(value("decant_transactions_applied_total") >= 50, "{body}");
    assert!(value("decant_destination_commits_total") >= 1, "{body}");
    assert!(http_get(metrics_port, "/other").contains("only /metrics"));
}

/// A counter's value in a /metrics body.
fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in\n{body}"))
}

#[test]
fn mutual_tls_token_and_compression_between_agent_and_applier() {
    use decant_tests::certs::Certs;
    let certs = Certs::new("decant-agent");
    let mut p = pair();
    let path = |p: &Path| p.display().to_string();
    let url = p.config.get("agent.applier_url").unwrap().replace("\"http://", "\"https://");
    p.edit(|c| {
        c.set("agent.applier_url", &url)
            .set("transport.token", "\"correct horse\"")
            .set("transport.tls_ca", &format!("\"{}\"", path(&certs.ca)))
            .set("transport.tls_domain", "\"localhost\"")
            .set("transport.compression", "\"zstd\"")
    });
    let applier_tls =
        [format!("transport.tls_cert=\"{}\"", path(&certs.server_cert)), format!("transport.tls_key=\"{}\"", path(&certs.server_key))];
    let agent_tls =
        [format!("transport.tls_cert=\"{}\"", path(&certs.client_cert)), format!("transport.tls_key=\"{}\"", path(&certs.client_key))];
    let _applier = p.applier(&applier_tls, "applier.log");

    // A wrong token is refused, and the agent stops with a clear error.
    let mut wrong: Vec<String> = agent_tls.to_vec();
    wrong.push("transport.token=\"wrong\"".into());
    let mut agent = p.start_with("agent", &wrong, "agent-wrong-token.log");
    assert_ne!(agent.wait_exit(Duration::from_secs(30)), Some(0), "{}", agent.log());
    assert!(agent.log().contains("token does not match"), "{}", agent.log());
    // The slot exists from here on: the changes below are all to arrive,
    // though the agents that fail create none (a task's slot is created once
    // its applier accepted the task's claim).
    p.source.connect().batch_execute("SELECT pg_create_logical_replication_slot('decant_t', 'decant')").unwrap();
    // Without a client certificate the TLS handshake fails (mutual TLS).
    let mut agent = p.start_with("agent", &["retry.connection_minutes=10".into()], "agent-no-cert.log");
    p.pgbench(&["-t", "5"]);
    std::thread::sleep(Duration::from_secs(2));
    let dest_history = table_digest(&mut p.dest.connect(), "pgbench_history", "t::text");
    assert_eq!(dest_history.0, 0, "nothing may arrive without a client certificate");
    agent.kill9();
    // With both, data flows.
    let _agent = p.start_with("agent", &agent_tls, "agent.log");
    let mut c = p.source.connect();
    wait_for("the agent's slot to stream", Duration::from_secs(60), || {
        c.query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'decant_t' AND active", &[]).unwrap().get::<_, i64>(0) == 1
    });
    p.pgbench(&["-t", "50"]);
    p.wait_equal();
}
