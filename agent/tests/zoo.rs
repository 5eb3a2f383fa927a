//! The "zoo": a database holding, in schema `zoo`, every built-in type
//! family, a type without binary I/O, tables without columns, inheritance
//! children with reordered columns, partitions three levels deep, every
//! constraint kind, comments on every object kind pg_dump can comment,
//! row-level security, ALWAYS and ordinary triggers, generated and identity
//! columns, keyless tables, views, rules, functions... (`zoo.sql`), migrated
//! by `decant migrate` (schema + full + incremental) while a load changes
//! it, once from a UTF-8 database and once from a LATIN1 twin into UTF-8.
//!
//! Passes when, after the load stopped and the destination caught up:
//! `decant verify` says every table is equal, every table and materialized
//! view holds the same rows on both sides (compared here too, by column
//! name, independently of `verify`), the task still runs and stops
//! cleanly, and the normalised `pg_dump --schema-only` of source and
//! destination are equal. "Normalised" takes out only what `pg_dump |
//! psql` changes as well; the test checks that claim itself on a
//! `pg_dump | psql` copy (the control) before the migration.
//!
//! The dumps, their diff and decant's log stay in
//! `target/tmp/zoo-<task>/` for a look after a failure.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use decant_tests::process::{run_ok, Role};
use decant_tests::task::Task;
use decant_tests::Cluster;

const ZOO_SQL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/zoo.sql");

#[test]
fn zoo_migrates_under_load_to_an_equal_database() {
    zoo("zoo", "zoo", "");
}

#[test]
fn zoo_in_a_latin1_database_migrates_under_load_to_an_equal_utf8_database() {
    zoo("zoo_latin1", "zoo_latin1", "WITH ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0");
}

/// Builds the zoo in database `db` of a fresh source (created with
/// `create_options`), migrates it into database `db` (UTF-8) of a fresh
/// destination under load, and reports every difference at once.
fn zoo(task_id: &str, db: &str, create_options: &str) {
    let started = Instant::now();
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("zoo-{task_id}"));
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir).unwrap();

    let t = Task::builder(env!("CARGO_BIN_EXE_decant"), task_id)
        .database(db, create_options)
        .migrate("types = [\"schema\", \"full\", \"incremental\"]")
        .build();
    t.config.write(&out_dir.join("task.toml"));
    let (source, dest) = (&t.source, &t.dest);
    // With psql, as a user would: statement by statement (an enum value
    // added by ALTER TYPE must be committed before it is used).
    run_ok(source.tool("psql").args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, "-f", ZOO_SQL]));

    // The control: `pg_dump | psql` into a third database. Normalised, its
    // schema must equal the source's, or the normalisation hides too little
    // (a bug of this test, not of decant).
    let control_db = format!("{db}_control");
    dest.connect().batch_execute(&format!("CREATE DATABASE {control_db}")).unwrap();
    let control_sql = out_dir.join("control-restore.sql");
    std::fs::write(&control_sql, raw_dump(source, db)).unwrap();
    run_ok(dest.tool("psql").args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &control_db, "-f"]).arg(&control_sql));
    let source_before = normalized_schema(source, db);
    let control = normalized_schema(dest, &control_db);
    if control != source_before {
        let diff = write_and_diff(&out_dir, "source-before", &source_before, "control", &control);
        panic!("test bug: `pg_dump | psql` changes the schema in ways the normalisation does not cover:\n{diff}");
    }

    // Changes run from before the migration starts until after it streams.
    let load = Load::start(source.conninfo(db));
    let log_path = out_dir.join("migrate.log");
    let mut m = t.start("migrate", &log_path);
    let mut failures: Vec<String> = Vec::new();

    let phase = wait_for_stream(dest, db, task_id, &mut m, Duration::from_secs(180));
    let streaming = phase.as_deref() == Ok("incremental");
    if let Err(e) = &phase {
        failures.push(format!("the task never reached the stream: {e}\n{}", log_excerpt(&m.log())));
    }
    if streaming {
        // Some rounds of changes (TRUNCATE included) while streaming.
        load.streaming.store(true, Ordering::SeqCst);
        let from = load.rounds.load(Ordering::SeqCst);
        let until = Instant::now() + Duration::from_secs(60);
        while load.rounds.load(Ordering::SeqCst) < from + 30 && Instant::now() < until && !load.finished() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let (rounds, load_error) = load.stop();
    eprintln!("zoo {task_id}: {rounds} rounds of changes; streaming reached: {streaming}; {:?} so far", started.elapsed());
    if let Some(e) = load_error {
        failures.push(format!("the load on the source failed (a bug of this test or of the zoo): {e}"));
    }

    let running = m.is_running();
    if streaming && !running {
        failures.push(format!("decant migrate ended during the stream:\n{}", log_excerpt(&m.log())));
    }
    // `verify --wait` needs a running task; without one, compare as is.
    let wait: &[&str] = if running { &["--wait", "120"] } else { &[] };
    let (verified, verify_out) = t.command(&[&["verify"], wait].concat());
    std::fs::write(out_dir.join("verify.out"), &verify_out).unwrap();
    if !verified {
        failures.push(format!("decant verify failed:\n{}", only_differences(&verify_out)));
    }

    // Every table and materialized view, compared here by column name.
    let (compared, differing) = compare_rows(source, dest, db);
    eprintln!("zoo {task_id}: {compared} tables and materialized views compared, {} differ", differing.len());
    if !differing.is_empty() {
        failures.push(format!("{} relations differ in their rows:\n{}", differing.len(), differing.join("\n")));
    }

    let source_schema = normalized_schema(source, db);
    let dest_schema = normalized_schema(dest, db);
    std::fs::write(out_dir.join("source.sql"), &source_schema).unwrap();
    std::fs::write(out_dir.join("destination.sql"), &dest_schema).unwrap();
    if source_schema != dest_schema {
        let diff = write_and_diff(&out_dir, "source", &source_schema, "destination", &dest_schema);
        failures.push(format!("the normalised schema dumps differ (files in {}):\n{diff}", out_dir.display()));
    }

    if m.is_running() {
        let code = m.stop();
        if code != Some(0) {
            failures.push(format!("decant migrate did not stop cleanly on SIGTERM: exit {code:?}\n{}", log_excerpt(&m.log())));
        }
    } else if failures.is_empty() {
        failures.push(format!("decant migrate is not running at the end:\n{}", log_excerpt(&m.log())));
    }
    eprintln!("zoo {task_id}: done in {:?}", started.elapsed());

    if !failures.is_empty() {
        let mut msg = format!("zoo {task_id} ({db}): {} failures; dumps, diff and decant log in {}\n", failures.len(), out_dir.display());
        for (i, f) in failures.iter().enumerate() {
            let _ = writeln!(msg, "\n===== failure {} =====\n{f}", i + 1);
        }
        let _ = writeln!(msg, "\n===== errors and warnings in the decant log =====\n{}", log_excerpt(&m.log()));
        panic!("{msg}");
    }
}

/// Waits until the task's phase is `incremental`; Err when decant exits or
/// the time is up (with the last phase seen).
fn wait_for_stream(dest: &Cluster, db: &str, task_id: &str, m: &mut Role, timeout: Duration) -> Result<String, String> {
    let until = Instant::now() + timeout;
    let mut phase = String::new();
    let mut client: Option<postgres::Client> = None;
    while Instant::now() < until {
        if !m.is_running() {
            return Err(format!("decant migrate exited (last phase seen: {phase:?})"));
        }
        if client.is_none() {
            client = postgres::Client::connect(&dest.conninfo(db), postgres::NoTls).ok();
        }
        if let Some(c) = client.as_mut() {
            if let Ok(Some(row)) = c.query_opt("SELECT phase FROM decant.task WHERE task_id = $1", &[&task_id]) {
                phase = row.get(0);
                if phase == "incremental" {
                    return Ok(phase);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(format!("not in the stream after {timeout:?} (last phase seen: {phase:?})"))
}

// ----- the load ---------------------------------------------------------------

/// A thread changing the zoo round after round: inserts, updates (keys,
/// partition keys, unique and excluded values swapped inside one
/// transaction, a non-key identity ALWAYS column, TOASTed rows left
/// unchanged), deletes (with cascades), rows of keyless and column-less
/// tables, and, once the task streams, a TRUNCATE every few rounds.
struct Load {
    stop: Arc<AtomicBool>,
    streaming: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl Load {
    fn start(conninfo: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let streaming = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (s, st, r) = (stop.clone(), streaming.clone(), rounds.clone());
        let thread = std::thread::spawn(move || -> Result<(), String> {
            let mut c = postgres::Client::connect(&conninfo, postgres::NoTls).map_err(|e| e.to_string())?;
            let mut round = 0u64;
            while !s.load(Ordering::SeqCst) {
                load_round(&mut c, round, st.load(Ordering::SeqCst)).map_err(|e| format!("round {round}: {e}"))?;
                round += 1;
                r.store(round, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        });
        Load { stop, streaming, rounds, thread }
    }

    fn finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops the load; the number of rounds done and its error, if any.
    fn stop(self) -> (u64, Option<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let rounds = self.rounds.load(Ordering::SeqCst);
        match self.thread.join() {
            Ok(Ok(())) => (rounds, None),
            Ok(Err(e)) => (rounds, Some(e)),
            Err(_) => (rounds, Some("the load thread panicked".to_owned())),
        }
    }
}

fn load_round(c: &mut postgres::Client, round: u64, streaming: bool) -> Result<(), String> {
    let r = round as i64;
    let exec = |c: &mut postgres::Client, what: &str, sql: &str| c.batch_execute(sql).map_err(|e| format!("{what}: {}", pg_error(&e)));

    // Every type: new rows, changed values, deleted rows.
    exec(
        c,
        "types",
        &format!(
            "SET search_path = zoo, public;
             INSERT INTO types SELECT (type_row({new})).*;
             UPDATE types SET n = n * 2, f8 = -f8, f4 = f4 / 3, t = t || 'ü', jb = jb || jsonb_build_object('u', {r}), ia = ia || {r},
                    ta[2] = 'ß{r}', noio = (noio::text || '!')::t_noio, acl = makeaclitem('postgres'::regrole, 'postgres'::regrole, 'UPDATE', true),
                    tv = tv || 'extra'::tsvector, tstz = CASE WHEN tstz = 'infinity' THEN '-infinity' ELSE tstz + interval '1 hour' END,
                    mr = mr + int4multirange(int4range(100, 101)), cp = ROW((cp).a + 1, (cp).b)::pair, x = '<changed/>'
              WHERE id = {upd};
             DELETE FROM types WHERE id = {del} AND {r} < 100;",
            new = 1000 + r,
            upd = 1 + r % 300,
            del = 300 - r
        ),
    )?;

    // A key with another unique column: swap two values in one transaction.
    {
        let (a, b) = (1 + (2 * r) % 300, 2 + (2 * r) % 300);
        let (a, b) = (a as i32, b as i32);
        let mut tx = c.transaction().map_err(|e| e.to_string())?;
        let ua: i32 = tx.query_one("SELECT u FROM zoo.uniq WHERE id = $1", &[&a]).map_err(|e| e.to_string())?.get(0);
        let ub: i32 = tx.query_one("SELECT u FROM zoo.uniq WHERE id = $1", &[&b]).map_err(|e| e.to_string())?.get(0);
        tx.batch_execute(&format!(
            "UPDATE zoo.uniq SET u = -1 WHERE id = {a}; UPDATE zoo.uniq SET u = {ua} WHERE id = {b}; UPDATE zoo.uniq SET u = {ub} WHERE id = {a};"
        ))
        .map_err(|e| format!("uniq swap: {}", pg_error(&e)))?;
        tx.commit().map_err(|e| e.to_string())?;
    }

    // Expression and partial unique indexes, an exclusion constraint, a
    // deferred unique constraint: the same kind of swap.
    let (a, b) = (1 + (2 * r) % 100, 2 + (2 * r) % 100);
    exec(
        c,
        "swaps",
        &format!(
            "DO $$DECLARE ea text; eb text; da tsrange; db tsrange; BEGIN
                 SELECT email INTO ea FROM zoo.uniq_more WHERE id = {a}; SELECT email INTO eb FROM zoo.uniq_more WHERE id = {b};
                 UPDATE zoo.uniq_more SET email = 'tmp' WHERE id = {a};
                 UPDATE zoo.uniq_more SET email = upper(ea) WHERE id = {b};
                 UPDATE zoo.uniq_more SET email = eb WHERE id = {a};
                 UPDATE zoo.uniq_more SET active = false WHERE id = {a};
                 UPDATE zoo.uniq_more SET slot = slot + 1000 WHERE id = {b};
                 UPDATE zoo.uniq_more SET slot = slot - 1000, active = true WHERE id = {b};
                 UPDATE zoo.uniq_more SET active = true WHERE id = {a};
                 SELECT during INTO da FROM zoo.booking WHERE id = {a}; SELECT during INTO db FROM zoo.booking WHERE id = {a} + 5;
                 IF db IS NOT NULL THEN
                     UPDATE zoo.booking SET during = tsrange('1900-01-01', '1900-01-02') WHERE id = {a};
                     UPDATE zoo.booking SET during = da WHERE id = {a} + 5;
                     UPDATE zoo.booking SET during = db WHERE id = {a};
                 END IF;
             END$$;
             UPDATE zoo.seats SET seat = CASE id WHEN {a} THEN (SELECT seat FROM zoo.seats WHERE id = {b}) ELSE (SELECT seat FROM zoo.seats WHERE id = {a}) END
              WHERE id IN ({a}, {b});"
        ),
    )?;
    // A foreign key cycle, checked at commit.
    exec(
        c,
        "node/edge",
        &format!(
            "BEGIN; INSERT INTO zoo.node VALUES ({n}, 1, {n}); INSERT INTO zoo.edge VALUES ({n}, {n}); COMMIT;
             UPDATE zoo.node SET up = {up} WHERE id = {n} - 1 AND {r} > 0;",
            n = 1000 + r,
            up = 1 + r % 50
        ),
    )?;

    // Identity: ALWAYS on a column that is not the key, BY DEFAULT as the key.
    exec(
        c,
        "ticket",
        &format!(
            "INSERT INTO zoo.ticket (v) VALUES ('load {r}');
             UPDATE zoo.ticket SET v = v || '+' WHERE id = {a};
             UPDATE zoo.ticket SET n = DEFAULT WHERE id = {b};
             DELETE FROM zoo.ticket WHERE id = 200 - {r} AND {r} < 50;
             INSERT INTO zoo.ticket_always (v) VALUES ('load {r}');
             UPDATE zoo.ticket_always SET v = v || '+' WHERE id = {a};",
            a = 1 + r % 200,
            b = 2 + r % 200
        ),
    )?;

    // Keyless (REPLICA IDENTITY FULL) with duplicates and TOAST; no columns at all.
    exec(
        c,
        "keyless_log/nocols",
        &format!(
            "INSERT INTO zoo.keyless_log (at, msg, js, pt, x, noio, acl)
                  SELECT '2025-01-01 00:00+00', 'dup', '{{\"r\": {r}}}', point({r}, 0), '<b/>', 'noio', makeaclitem(0, 'postgres'::regrole, 'SELECT', false)
                  FROM generate_series(1, 2);
             UPDATE zoo.keyless_log SET msg = msg || '+' WHERE ctid = (SELECT min(ctid) FROM zoo.keyless_log WHERE msg LIKE 'msg %');
             UPDATE zoo.keyless_log SET pt = point({r}, {r}) WHERE ctid = (SELECT max(ctid) FROM zoo.keyless_log WHERE big IS NOT NULL);
             DELETE FROM zoo.keyless_log WHERE ctid = (SELECT min(ctid) FROM zoo.keyless_log WHERE msg = 'dup');
             INSERT INTO zoo.nocols DEFAULT VALUES;
             DELETE FROM zoo.nocols WHERE ctid = (SELECT min(ctid) FROM zoo.nocols) AND {r} % 3 = 0;"
        ),
    )?;

    // REPLICA IDENTITY USING INDEX, its key changed too.
    exec(
        c,
        "ri_index",
        &format!(
            "UPDATE zoo.ri_index SET v = v || '+' WHERE a = {a};
             UPDATE zoo.ri_index SET b = b || 'x' WHERE a = 200 - {r} AND {r} < 100;
             INSERT INTO zoo.ri_index VALUES ({new}, 'new', 'v');
             DELETE FROM zoo.ri_index WHERE a = {new} - 1 AND {r} % 2 = 0;",
            a = 1 + r % 200,
            new = 1000 + r
        ),
    )?;

    // Partitions: routed inserts, rows moving between partitions, deletes.
    exec(
        c,
        "measure",
        &format!(
            "INSERT INTO zoo.measure VALUES ({new}, date '2023-10-01' + {r} * 3 % 700, (ARRAY['eu', 'ch', 'us', 'jp', 'xx'])[1 + {r} % 5], {r} * 1.5, 'ß');
             UPDATE zoo.measure SET at = at + 200, region = CASE region WHEN 'eu' THEN 'us' ELSE 'eu' END WHERE id = 100 + {r};
             UPDATE zoo.measure SET v = v + 1 WHERE id = 300 + {r};
             DELETE FROM zoo.measure WHERE id = 600 - {r} AND {r} < 200;",
            new = 10000 + r
        ),
    )?;

    // Inheritance: rows of children changed through the parent.
    exec(
        c,
        "vehicle",
        &format!(
            "INSERT INTO zoo.car (id, name, doors, plate) VALUES ({car}, 'new car', 3, 'NEW-{r}');
             INSERT INTO zoo.trailer (id, name, payload, hitch) VALUES ({trailer}, 'new trailer', 1.5, 'ü');
             UPDATE zoo.vehicle SET wheels = wheels + 1 WHERE id = 1001 + {r} % 100;
             UPDATE zoo.vehicle SET name = name || '!' WHERE id = 2001 + {r} % 60;
             UPDATE zoo.truck SET payload = payload + 1 WHERE id = 3001 + {r} % 30;
             DELETE FROM zoo.vehicle WHERE id = 3030 - {r} AND {r} < 30;
             DELETE FROM zoo.vehicle WHERE id = 50 - {r} AND {r} < 30;",
            car = 5000 + r,
            trailer = 6000 + r
        ),
    )?;

    // Foreign keys with ON DELETE / ON UPDATE CASCADE, a rule, a function.
    exec(
        c,
        "parent/child",
        &format!(
            "DELETE FROM zoo.parent WHERE id = 200 - {r} AND {r} < 100;
             UPDATE zoo.parent SET id = 5000 + {r} WHERE id = 50 + {r} AND {r} < 40;
             INSERT INTO zoo.parent_codes VALUES (1000 + {r}, 'new {r}');
             SELECT zoo.add_child(1000 + {r}, {r});
             UPDATE zoo.child SET qty = qty + 1 WHERE parent_id = 1 + {r} % 40;"
        ),
    )?;

    // Row-level security and triggers (ordinary and ENABLE ALWAYS), a procedure.
    exec(
        c,
        "account",
        &format!(
            "INSERT INTO zoo.account (id, title, balance) VALUES (1000 + {r}, 'Neues Konto {r}', 5);
             UPDATE zoo.account SET title = title || ' Ü' WHERE id = 1 + {r} % 150;
             CALL zoo.move_balance(1 + {r} % 150, 2 + {r} % 150, 0.5);"
        ),
    )?;

    // Non-ASCII names and values, TOAST left unchanged, generated columns,
    // a typed table, quoted names.
    exec(
        c,
        "misc",
        &format!(
            "INSERT INTO zoo.\"tablé\" VALUES (1000 + {r}, 'neue größe é', 'Straße', 'naïve', {r});
             UPDATE zoo.\"tablé\" SET \"größe\" = \"größe\" || ' ß' WHERE id = 1 + {r} % 150;
             DELETE FROM zoo.\"tablé\" WHERE id = 150 - {r} AND {r} < 50;
             UPDATE zoo.docs SET meta = meta + 1 WHERE id = 1 + {r} % 60;
             UPDATE zoo.docs SET title = title || '.' WHERE id = 1 + {r} % 7;
             INSERT INTO zoo.order_line (qty, price) VALUES ({r} % 9, 1.25);
             UPDATE zoo.order_line SET qty = qty + 1 WHERE id = 1 + {r} % 300;
             UPDATE zoo.\"Mixed Case\" SET \"Group\" = \"Group\" || '.' WHERE \"select\" = 1 + {r} % 30;"
        ),
    )?;

    if streaming && round.is_multiple_of(5) {
        exec(
            c,
            "truncate",
            &format!(
                "TRUNCATE zoo.scratch;
                 INSERT INTO zoo.scratch SELECT g, 'round {r}' FROM generate_series(1, 20 + {r} % 30) g;"
            ),
        )?;
    }
    Ok(())
}

// ----- comparisons --------------------------------------------------------------

/// Every table and populated materialized view (relkind r or m, partitions
/// and inheritance children each on their own, ONLY) in the source's
/// schemas but `decant`: row count and rows compared as text, over the
/// source's columns by name, in UTF-8. Returns how many relations were
/// compared, and one line (with example rows) per relation that differs.
fn compare_rows(source: &Cluster, dest: &Cluster, db: &str) -> (usize, Vec<String>) {
    let mut src = source.connect_db(db);
    let mut dst = dest.connect_db(db);
    let rels = src
        .query(
            "SELECT c.oid::regclass::text, c.relkind::text, c.relispopulated,
                    coalesce((SELECT array_agg(quote_ident(a.attname) ORDER BY a.attnum) FROM pg_attribute a
                               WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}')
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'decant') AND n.nspname !~ '^pg_toast'
              ORDER BY 1",
            &[],
        )
        .unwrap();
    let mut out = Vec::new();
    let compared = rels.len();
    for rel in rels {
        let (name, kind, populated, cols): (String, String, bool, Vec<String>) = (rel.get(0), rel.get(1), rel.get(2), rel.get(3));
        if kind == "m" && !populated {
            let dest_populated = dst
                .query_opt("SELECT relispopulated FROM pg_class WHERE oid = to_regclass($1)", &[&name])
                .ok()
                .flatten()
                .map(|r| r.get::<_, bool>(0));
            if dest_populated != Some(false) {
                out.push(format!(
                    "{name}: materialized view WITH NO DATA on the source; on the destination populated = {dest_populated:?}"
                ));
            }
            continue;
        }
        let text = format!("ROW({})::text", cols.iter().map(|c| format!("t.{c}")).collect::<Vec<_>>().join(", "));
        let digest_sql = format!(
            "SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY h)), '') FROM (SELECT md5(convert_to({text}, 'UTF8')) AS h FROM ONLY {name} t) s"
        );
        let digest = |c: &mut postgres::Client| -> Result<(i64, String), String> {
            c.query_one(&digest_sql, &[]).map(|r| (r.get(0), r.get(1))).map_err(|e| pg_error(&e))
        };
        let s = match digest(&mut src) {
            Ok(s) => s,
            Err(e) => {
                out.push(format!("{name}: cannot read it on the source: {e}"));
                continue;
            }
        };
        match digest(&mut dst) {
            Err(e) => out.push(format!("{name}: {e}")),
            Ok(d) if d == s => {}
            Ok(d) => {
                // Example rows present on one side only.
                let rows_sql = format!("SELECT {text} FROM ONLY {name} t");
                let rows = |c: &mut postgres::Client| -> Vec<String> {
                    let mut v: Vec<String> = c.query(&rows_sql, &[]).map(|rs| rs.iter().map(|r| r.get(0)).collect()).unwrap_or_default();
                    v.sort();
                    v
                };
                let (sr, dr) = (rows(&mut src), rows(&mut dst));
                let only = |a: &[String], b: &[String]| -> Vec<String> {
                    let mut b_left: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
                    for x in b {
                        *b_left.entry(x.as_str()).or_default() += 1;
                    }
                    let mut res = Vec::new();
                    for x in a {
                        match b_left.get_mut(x.as_str()) {
                            Some(n) if *n > 0 => *n -= 1,
                            _ => res.push(x.clone()),
                        }
                    }
                    res
                };
                let (only_s, only_d) = (only(&sr, &dr), only(&dr, &sr));
                let show = |v: &[String]| -> String {
                    v.iter().take(3).map(|x| format!("      {}", truncate(x, 300))).collect::<Vec<_>>().join("\n")
                };
                out.push(format!(
                    "{name}: source {} rows, destination {} rows; {} rows only on the source, {} only on the destination\n    only on the source:\n{}\n    only on the destination:\n{}",
                    s.0,
                    d.0,
                    only_s.len(),
                    only_d.len(),
                    show(&only_s),
                    show(&only_d)
                ));
            }
        }
    }
    (compared, out)
}

/// `pg_dump --schema-only` (in UTF-8, without owners and privileges, which
/// decant leaves to the destination user by design), then normalised for
/// what `pg_dump | psql` changes too:
/// - the `\restrict` / `\unrestrict` lines (a random key per dump);
/// - decant's own schema (`--exclude-schema=decant`) and extension, which
///   exist on one side only;
/// - the column order of a table with INHERITS: CREATE TABLE … INHERITS
///   puts inherited columns first, so a child created first and attached
///   with INHERIT gets its columns in the parent's order (the column lines
///   are sorted).
fn normalized_schema(cluster: &Cluster, db: &str) -> String {
    let dump = run_ok(cluster.tool("pg_dump").args([
        "--schema-only",
        "--no-owner",
        "--no-privileges",
        "--encoding=UTF8",
        "--exclude-schema=decant",
        "-d",
        db,
    ]));
    let mut blocks: Vec<Vec<&str>> = vec![vec![]];
    let lines: Vec<&str> = dump.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line == "--" && lines.get(i + 1).is_some_and(|l| l.starts_with("-- Name: ")) && lines.get(i + 2) == Some(&"--") {
            blocks.push(vec![]);
        }
        blocks.last_mut().unwrap().push(line);
        i += 1;
    }
    let mut out = String::new();
    for block in blocks {
        let header = block.get(1).copied().unwrap_or("");
        if header.starts_with("-- Name: decant; Type: EXTENSION") || header.starts_with("-- Name: EXTENSION decant; Type: COMMENT") {
            continue;
        }
        let lines: Vec<&str> = block.into_iter().filter(|l| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict ")).collect();
        let inherits = lines.iter().any(|l| l.starts_with("INHERITS ("));
        let mut j = 0;
        while j < lines.len() {
            let l = lines[j];
            if inherits && l.starts_with("CREATE TABLE ") && l.ends_with(" (") {
                out.push_str(l);
                out.push('\n');
                let end = (j + 1..lines.len()).find(|&k| lines[k] == ")").unwrap_or(lines.len());
                let mut cols: Vec<&str> = lines[j + 1..end].iter().map(|c| c.trim_end_matches(',')).collect();
                cols.sort_unstable();
                for c in cols {
                    out.push_str(c);
                    out.push_str(" -- (sorted)\n");
                }
                j = end;
                continue;
            }
            out.push_str(l);
            out.push('\n');
            j += 1;
        }
    }
    out
}

/// The dump a `pg_dump | psql` control restores (schema only).
fn raw_dump(cluster: &Cluster, db: &str) -> String {
    run_ok(cluster.tool("pg_dump").args(["--schema-only", "--no-owner", "--no-privileges", "--encoding=UTF8", "-d", db]))
}

/// Writes both texts to files in `dir` and returns `diff -u` of them
/// (its first 300 lines).
fn write_and_diff(dir: &Path, a_name: &str, a: &str, b_name: &str, b: &str) -> String {
    let (pa, pb) = (dir.join(format!("{a_name}.sql")), dir.join(format!("{b_name}.sql")));
    std::fs::write(&pa, a).unwrap();
    std::fs::write(&pb, b).unwrap();
    let out = Command::new("diff").arg("-u").arg(&pa).arg(&pb).output().unwrap();
    let diff = String::from_utf8_lossy(&out.stdout).into_owned();
    std::fs::write(dir.join(format!("{a_name}-vs-{b_name}.diff")), &diff).unwrap();
    let lines: Vec<&str> = diff.lines().collect();
    let mut shown = lines.iter().take(300).copied().collect::<Vec<_>>().join("\n");
    if lines.len() > 300 {
        let _ = write!(shown, "\n[... {} more lines of diff ...]", lines.len() - 300);
    }
    shown
}

/// verify's output without its `equal` lines.
fn only_differences(verify_out: &str) -> String {
    let kept: Vec<&str> = verify_out.lines().filter(|l| !l.trim_end().ends_with(" equal")).collect();
    let hidden = verify_out.lines().count() - kept.len();
    format!("{}\n({hidden} equal tables not shown)", kept.join("\n"))
}

/// The first distinct ERROR/WARN lines of decant's log and its last lines.
fn log_excerpt(log: &str) -> String {
    let mut seen = std::collections::HashSet::new();
    let problems: Vec<String> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN") || l.contains("panicked") || l.contains("error:"))
        .filter(|l| seen.insert(strip_timestamp(l)))
        .take(25)
        .map(|l| truncate(l, 1500))
        .collect();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(25)..].iter().map(|l| truncate(l, 1500)).collect::<Vec<_>>().join("\n");
    format!("--- first distinct errors/warnings ({}) ---\n{}\n--- last lines of the log ---\n{tail}", problems.len(), problems.join("\n"))
}

fn strip_timestamp(line: &str) -> String {
    // "2025-01-01T00:00:00.000000Z  WARN ..." -> "WARN ..."
    match line.split_once(char::is_whitespace) {
        Some((first, rest)) if first.chars().next().is_some_and(|c| c.is_ascii_digit()) => rest.trim_start().to_owned(),
        _ => line.to_owned(),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A PostgreSQL error with its detail, hint and position.
fn pg_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
            if let Some(d) = db.detail() {
                let _ = write!(s, "; DETAIL: {d}");
            }
            if let Some(h) = db.hint() {
                let _ = write!(s, "; HINT: {h}");
            }
            if let Some(w) = db.where_() {
                let _ = write!(s, "; WHERE: {w}");
            }
            s
        }
        None => e.to_string(),
    }
}
