//! `applier.operations`: per table, which of INSERT, UPDATE, DELETE and
//! TRUNCATE the stream applies. Six tables, each missing another operation
//! (one of them by a schema pattern, one matching two rules), get changes
//! during the stream, row by row and folded set-based; the destination must
//! hold exactly what applying only the allowed changes gives, the skipped
//! ones counted, the position advancing past a transaction of skipped
//! changes only, and the stream going on after it.

use std::collections::BTreeMap;
use std::time::Duration;

use decant_tests::process::{free_port, http_get, wait_for};
use decant_tests::task::Task;

/// `applier.operations`.
const OPERATIONS: &str = r#"[
    { tables = ["public.no_insert"], apply = ["UPDATE", "DELETE", "TRUNCATE"] },
    { tables = ["public.no_update"], apply = ["insert", "delete", "truncate"] },
    { tables = ["public.no_delete"], apply = ["INSERT", "UPDATE", "TRUNCATE"] },
    { tables = ["public.no_truncate", "public.no_*"], apply = ["INSERT", "UPDATE", "DELETE"] },
    { tables = ["audit.*"], apply = ["INSERT"] },
]"#;

const TABLES: [&str; 6] = ["no_insert", "no_update", "no_delete", "no_truncate", "audit.log", "plain"];

/// What the test expects of each table, written out independently of the
/// configuration's patterns.
fn allowed(table: &str, op: &str) -> bool {
    match table {
        "no_insert" => op != "INSERT",
        "no_update" => op != "UPDATE",
        "no_delete" => op != "DELETE",
        "no_truncate" => op != "TRUNCATE",
        "audit.log" => op == "INSERT",
        _ => true,
    }
}

enum Op {
    /// Rows `from..=to`, valued `prefix` followed by the id.
    Insert(i32, i32, &'static str),
    Update(i32, i32, &'static str),
    Delete(i32, i32),
}

type Rows = BTreeMap<i32, String>;

/// The tables' rows on the source and, applying only allowed changes, on
/// the destination; and the number of changes skipped.
struct Model {
    source: BTreeMap<&'static str, Rows>,
    dest: BTreeMap<&'static str, Rows>,
    skipped: u64,
}

impl Model {
    /// One source transaction: its SQL, and the model updated.
    fn transaction(&mut self, changes: &[(&'static str, Op)]) -> String {
        let mut sql = String::from("BEGIN;");
        for (table, op) in changes {
            let allow = allowed(
                table,
                match op {
                    Op::Insert(..) => "INSERT",
                    Op::Update(..) => "UPDATE",
                    Op::Delete(..) => "DELETE",
                },
            );
            let source = self.source.get_mut(table).unwrap();
            let dest = self.dest.get_mut(table).unwrap();
            let mut touched = 0;
            match *op {
                Op::Insert(from, to, prefix) => {
                    sql += &format!("INSERT INTO {table} SELECT g, '{prefix}' || g FROM generate_series({from}, {to}) g;");
                    for id in from..=to {
                        source.insert(id, format!("{prefix}{id}"));
                        if allow {
                            dest.insert(id, format!("{prefix}{id}"));
                        }
                        touched += 1;
                    }
                }
                Op::Update(from, to, value) => {
                    sql += &format!("UPDATE {table} SET v = '{value}' WHERE id BETWEEN {from} AND {to};");
                    for id in from..=to {
                        if let Some(v) = source.get_mut(&id) {
                            *v = value.to_owned();
                            touched += 1;
                            if let (true, Some(d)) = (allow, dest.get_mut(&id)) {
                                *d = value.to_owned();
                            }
                        }
                    }
                }
                Op::Delete(from, to) => {
                    sql += &format!("DELETE FROM {table} WHERE id BETWEEN {from} AND {to};");
                    for id in from..=to {
                        if source.remove(&id).is_some() {
                            touched += 1;
                            if allow {
                                dest.remove(&id);
                            }
                        }
                    }
                }
            }
            if !allow {
                self.skipped += touched;
            }
        }
        sql + "COMMIT;"
    }

    /// One TRUNCATE of several tables (one record naming them all).
    fn truncate(&mut self, tables: &[&'static str]) -> String {
        for table in tables {
            self.source.get_mut(table).unwrap().clear();
            if allowed(table, "TRUNCATE") {
                self.dest.get_mut(table).unwrap().clear();
            } else {
                self.skipped += 1;
            }
        }
        format!("TRUNCATE {}", tables.join(", "))
    }
}

fn rows(client: &mut postgres::Client, table: &str) -> Rows {
    client.query(&format!("SELECT id, v FROM {table}"), &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
}

fn metric(port: u16, name: &str) -> u64 {
    let metrics = http_get(port, "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name}:\n{metrics}"))
}

#[test]
fn each_operation_can_be_left_out_per_table() {
    let port = free_port();
    // No heartbeats: the position moves only with the tables' transactions.
    let t = Task::builder(env!("CARGO_BIN_EXE_decant"), "r")
        .set("source.heartbeat_seconds", "0")
        .set("agent.metrics_listen", &format!("\"127.0.0.1:{port}\""))
        .set("applier.operations", OPERATIONS)
        .migrate("types = [\"schema\", \"full\", \"incremental\"]")
        .build();
    let (mut src, mut dst) = (t.src(), t.dst());
    let mut setup = String::from("CREATE SCHEMA audit;");
    let mut model = Model { source: BTreeMap::new(), dest: BTreeMap::new(), skipped: 0 };
    for table in TABLES {
        // The full copy copies what exists, whatever the operations.
        setup += &format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, v text); INSERT INTO {table} SELECT g, 'v' || g FROM generate_series(1, 5) g;"
        );
        let initial: Rows = (1..=5).map(|g| (g, format!("v{g}"))).collect();
        model.source.insert(table, initial.clone());
        model.dest.insert(table, initial);
    }
    src.batch_execute(&setup).unwrap();

    let mut m = t.migrate_until_incremental("migrate.log", Duration::from_secs(120));
    for table in TABLES {
        assert_eq!(rows(&mut dst, table), model.source[table], "{table}: the full copy");
    }

    // A few rows each, and a folded backlog: rows inserted, updated and
    // partly deleted in one transaction (a skipped UPDATE or DELETE must
    // not reach the folded changes of the rows).
    let mut one = Vec::new();
    let mut bulk = Vec::new();
    for table in TABLES {
        one.extend([(table, Op::Insert(10, 10, "i")), (table, Op::Update(1, 1, "u1")), (table, Op::Delete(2, 2))]);
        bulk.extend([(table, Op::Insert(100, 299, "b")), (table, Op::Update(100, 299, "bulk")), (table, Op::Delete(100, 149))]);
    }
    let mut sql = model.transaction(&one);
    sql += &model.transaction(&bulk);
    sql += &model.truncate(&["no_truncate", "plain", "audit.log"]);
    src.batch_execute(&sql).unwrap();
    src.batch_execute(&model.transaction(&[("plain", Op::Insert(1000, 1000, "m"))])).unwrap();
    wait_for("the first marker", Duration::from_secs(60), || {
        assert!(m.is_running(), "decant migrate ended:\n{}", m.log());
        dst.query_opt("SELECT FROM plain WHERE id = 1000", &[]).unwrap().is_some()
    });

    // A transaction of skipped changes only: the destination's position
    // still moves past it.
    let before: String = src.query_one("SELECT pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    src.batch_execute(&model.transaction(&[
        ("no_delete", Op::Delete(3, 3)),
        ("no_update", Op::Update(4, 4, "x")),
        ("audit.log", Op::Update(5, 5, "y")),
        ("no_insert", Op::Insert(20, 20, "s")),
    ]))
    .unwrap();
    wait_for("the position past the skipped transaction", Duration::from_secs(60), || {
        assert!(m.is_running(), "decant migrate ended:\n{}", m.log());
        dst.query_one("SELECT coalesce((SELECT source_lsn > $1::text::pg_lsn FROM decant.progress WHERE task_id = 'r'), false)", &[&before])
            .unwrap()
            .get(0)
    });

    // The stream goes on: a later allowed change arrives.
    src.batch_execute(&model.transaction(&[("plain", Op::Insert(2000, 2000, "m")), ("no_delete", Op::Update(1, 1, "later"))])).unwrap();
    wait_for("the second marker", Duration::from_secs(60), || {
        assert!(m.is_running(), "decant migrate ended:\n{}", m.log());
        dst.query_opt("SELECT FROM plain WHERE id = 2000", &[]).unwrap().is_some()
    });

    for table in TABLES {
        assert_eq!(rows(&mut src, table), model.source[table], "{table}: the model of the source");
        assert_eq!(rows(&mut dst, table), model.dest[table], "{table}: only the allowed changes");
    }
    // The tables do differ: each test case left its mark.
    for table in ["no_insert", "no_update", "no_delete", "no_truncate", "audit.log"] {
        assert_ne!(model.source[table], model.dest[table], "{table}: the test shows nothing");
    }
    assert_eq!(metric(port, "decant_skipped_changes_total"), model.skipped);
    let log = m.log();
    for table in ["public.no_insert", "public.no_update", "public.no_delete", "public.no_truncate", "audit.log"] {
        let logged = log.lines().filter(|l| l.contains("its changes are skipped") && l.contains(table)).count();
        assert!(logged >= 1, "no skip logged for {table}:\n{log}");
    }
    assert!(m.is_running(), "{log}");
    assert_eq!(m.stop(), Some(0));
}
