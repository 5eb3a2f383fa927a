//! Schemas that real applications and PostgreSQL's own regression tests
//! build, one class of trouble per test: types without binary I/O, post-data
//! dependencies, sources that are not UTF-8, unique constraints besides the
//! key, identity columns GENERATED ALWAYS, tables without replica identity,
//! tables without columns, TRUNCATE, and the origin of both applier
//! sessions. Each migrates with `decant migrate` between two real clusters
//! and compares what arrived.

use std::time::Duration;

use decant_tests::process::{http_get, run_ok};
use decant_tests::task::Task;

const ALL: &str = "types = [\"schema\", \"full\", \"incremental\"]";

/// Task `r` between database `db` of a fresh source and the database of
/// the same name of a fresh destination: unless it is `postgres`, created
/// on the source with `create_db` (its options) and as UTF-8 on the
/// destination.
fn task(db: &str, create_db: &str, migrate: &str) -> Task {
    let builder = Task::builder(env!("CARGO_BIN_EXE_decant"), "r").migrate(migrate);
    if db == "postgres" { builder } else { builder.database(db, create_db) }.build()
}

/// Runs `decant migrate` until the stream runs.
fn migrate_until_streaming(t: &Task) -> decant_tests::process::Role {
    t.migrate_until_incremental("migrate.log", Duration::from_secs(120))
}

/// Runs `decant migrate` to its end (no incremental).
fn migrate_to_end(t: &Task) {
    let mut m = t.migrate("migrate.log");
    assert_eq!(m.wait_exit(Duration::from_secs(180)), Some(0), "{}", m.log());
}

/// The rows of `query` on both sides, as text.
fn rows(t: &Task, query: &str) -> (Vec<String>, Vec<String>) {
    let q = format!("SELECT t::text FROM ({query}) t ORDER BY 1");
    let get = |mut c: postgres::Client| -> Vec<String> { c.query(&q, &[]).unwrap().iter().map(|r| r.get(0)).collect() };
    (get(t.src()), get(t.dst()))
}

fn assert_same_rows(t: &Task, query: &str) {
    let (s, d) = rows(t, query);
    assert_eq!(d, s, "{query}: the destination differs from the source");
}

#[test]
fn types_without_binary_io_are_copied_and_streamed_as_text() {
    let t = task("postgres", "", ALL);
    // A base type with text I/O only, the way PostgreSQL's regression tests
    // make one, a domain over it, and aclitem, a built-in type without
    // send/receive; with int columns beside them, which alone would be
    // copied in binary.
    t.src()
        .batch_execute(
            "CREATE TYPE textonly;
             CREATE FUNCTION textonly_in(cstring) RETURNS textonly LANGUAGE internal IMMUTABLE STRICT AS 'textin';
             CREATE FUNCTION textonly_out(textonly) RETURNS cstring LANGUAGE internal IMMUTABLE STRICT AS 'textout';
             CREATE TYPE textonly (INPUT = textonly_in, OUTPUT = textonly_out, LIKE = text);
             CREATE DOMAIN textonly_d AS textonly;
             CREATE TABLE grants (id int PRIMARY KEY, acl aclitem, acls aclitem[], n int8);
             CREATE TABLE custom (id int PRIMARY KEY, v textonly, d textonly_d, n int4);
             INSERT INTO grants SELECT g, makeaclitem('postgres'::regrole, 'postgres'::regrole, 'SELECT', g % 2 = 0),
                    ARRAY[makeaclitem('postgres'::regrole, 'postgres'::regrole, 'UPDATE', false)], g FROM generate_series(1, 50) g;
             INSERT INTO custom SELECT g, ('v' || g)::textonly, ('d' || g)::textonly_d, g FROM generate_series(1, 50) g;",
        )
        .unwrap();
    let mut m = migrate_until_streaming(&t);
    t.src()
        .batch_execute(
            "INSERT INTO grants VALUES (100, makeaclitem('postgres'::regrole, 'postgres'::regrole, 'DELETE', true), NULL, 1);
             UPDATE custom SET v = 'changed'::textonly WHERE id = 3;
             INSERT INTO custom VALUES (100, 'new'::textonly, 'newd'::textonly_d, 7);",
        )
        .unwrap();
    t.assert_equal();
    assert_same_rows(&t, "SELECT id, acl::text, acls::text, n FROM grants");
    assert_same_rows(&t, "SELECT id, v::text, d::text, n FROM custom");
    assert!(m.is_running(), "{}", m.log());
    assert_eq!(m.stop(), Some(0));
}

#[test]
fn post_data_keeps_every_dependency_pg_dump_knows() {
    let t = task("postgres", "", "types = [\"schema\", \"full\"]\nworkers = 4");
    t.src()
        .batch_execute(
            "CREATE TABLE parent (id int PRIMARY KEY, code text NOT NULL);
             CREATE UNIQUE INDEX parent_code ON parent (code);
             CREATE TABLE child (id int PRIMARY KEY, parent_id int, note text);
             ALTER TABLE child ADD CONSTRAINT child_parent_fk FOREIGN KEY (parent_id) REFERENCES parent (id) ON DELETE CASCADE;
             COMMENT ON CONSTRAINT child_parent_fk ON child IS 'a comment on a foreign key';
             COMMENT ON CONSTRAINT parent_pkey ON parent IS 'a comment on a key';
             COMMENT ON INDEX parent_code IS 'a comment on an index';
             ALTER TABLE parent REPLICA IDENTITY USING INDEX parent_code;
             ALTER TABLE child CLUSTER ON child_pkey;
             CREATE INDEX child_note ON child (note);
             CREATE STATISTICS child_stats (dependencies) ON parent_id, note FROM child;
             COMMENT ON STATISTICS child_stats IS 'a comment on statistics';
             CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
             CREATE TRIGGER child_touch BEFORE UPDATE ON child FOR EACH ROW EXECUTE FUNCTION touch();
             COMMENT ON TRIGGER child_touch ON child IS 'a comment on a trigger';
             CREATE CONSTRAINT TRIGGER child_check AFTER INSERT ON child DEFERRABLE INITIALLY DEFERRED
                    FOR EACH ROW EXECUTE FUNCTION touch();
             ALTER TABLE child ENABLE ROW LEVEL SECURITY;
             CREATE POLICY child_own ON child USING (note IS NOT NULL);
             COMMENT ON POLICY child_own ON child IS 'a comment on a policy';
             CREATE RULE parent_log AS ON DELETE TO parent DO ALSO NOTIFY parent_deleted;
             COMMENT ON RULE parent_log ON parent IS 'a comment on a rule';
             -- Partitions two levels deep, with a partitioned index attached at each level.
             CREATE TABLE events (id int, at date, kind text, PRIMARY KEY (id, at, kind)) PARTITION BY RANGE (at);
             CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01') PARTITION BY LIST (kind);
             CREATE TABLE events_2024_a PARTITION OF events_2024 FOR VALUES IN ('a');
             CREATE TABLE events_2024_b PARTITION OF events_2024 FOR VALUES IN ('b');
             CREATE INDEX events_kind ON events (kind);
             COMMENT ON INDEX events_kind IS 'a comment on a partitioned index';
             ALTER TABLE events ADD CONSTRAINT events_kind_check CHECK (kind <> '') NOT VALID;
             -- Materialized views that read one another.
             CREATE MATERIALIZED VIEW parent_codes AS SELECT id, code FROM parent;
             CREATE UNIQUE INDEX parent_codes_id ON parent_codes (id);
             CREATE MATERIALIZED VIEW parent_codes_count AS SELECT count(*) AS n FROM parent_codes;
             INSERT INTO parent SELECT g, 'c' || g FROM generate_series(1, 100) g;
             INSERT INTO child SELECT g, g % 100 + 1, 'n' || g FROM generate_series(1, 300) g;
             INSERT INTO events SELECT g, '2024-03-01', CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END FROM generate_series(1, 100) g;
             REFRESH MATERIALIZED VIEW parent_codes;
             REFRESH MATERIALIZED VIEW parent_codes_count;",
        )
        .unwrap();
    migrate_to_end(&t);
    assert_eq!(t.dest.normalized_schema("postgres"), t.source.normalized_schema("postgres"), "schemas differ after migration");
    t.assert_equal();
    assert_same_rows(&t, "SELECT n FROM parent_codes_count");
    assert_same_rows(&t,
        "SELECT c.conname::text, obj_description(c.oid, 'pg_constraint') FROM pg_constraint c WHERE c.conrelid IN ('child'::regclass, 'parent'::regclass)",
    );
}

/// The encodings a source may be in, with text each can hold, and the type
/// of a fixed-width column.
const ENCODINGS: &[(&str, &str, &str, &str)] = &[
    ("latin1", "LATIN1", "Grüße, café, naïve ß", "char(40)"),
    ("win1252", "WIN1252", "€ œ “quotes” Grüße", "char(40)"),
    ("euc_jp", "EUC_JP", "日本語のテキスト、カタカナ", "char(40)"),
    // No declared encoding: bytes pass through; these are UTF-8 bytes. Its
    // char(n) counts bytes, not characters, so a UTF-8 destination pads
    // multibyte text differently (as `pg_dump | psql` does): varchar here.
    ("sql_ascii", "SQL_ASCII", "bytes é ü ß", "varchar(40)"),
];

#[test]
fn sources_in_other_encodings_arrive_in_utf8_on_every_path() {
    for (db, encoding, text, fixed) in ENCODINGS {
        let t = task(db, &format!("ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"), ALL);
        // Non-ASCII names of table, column, schema and type, and values.
        let (table, column) = if *encoding == "EUC_JP" { ("表", "列") } else { ("tablé", "größe") };
        t.src()
            .batch_execute(&format!(
                "CREATE SCHEMA \"schéma\";
                 CREATE TYPE \"schéma\".\"humeur\" AS ENUM ('{text}', 'plain');
                 CREATE TABLE \"schéma\".\"{table}\" (id int PRIMARY KEY, \"{column}\" text, v varchar(80), c {fixed}, h \"schéma\".\"humeur\", j jsonb, a text[]);
                 INSERT INTO \"schéma\".\"{table}\" SELECT g, '{text} ' || g, '{text}', '{text}', '{text}', jsonb_build_object('{text}', g), ARRAY['{text}', 'x']
                   FROM generate_series(1, 20) g;"
            ))
            .unwrap();
        let mut m = migrate_until_streaming(&t);
        t.src()
            .batch_execute(&format!(
                "INSERT INTO \"schéma\".\"{table}\" VALUES (100, '{text} streamed', '{text}', '{text}', 'plain', '{{\"k\": \"{text}\"}}', ARRAY['{text}']);
                 UPDATE \"schéma\".\"{table}\" SET \"{column}\" = \"{column}\" || ' {text}' WHERE id % 3 = 0;
                 DELETE FROM \"schéma\".\"{table}\" WHERE id = 5;"
            ))
            .unwrap();
        let (verified, out) = t.command(&["verify", "--wait", "120"]);
        // The destination (UTF-8) holds the same characters.
        let query = format!("SELECT id, \"{column}\", v, c, h::text, j::text, a::text FROM \"schéma\".\"{table}\"");
        let (s, d) = rows(&t, &query);
        assert_eq!(d, s, "{encoding}: the destination differs");
        assert!(verified && out.contains(&format!("schéma.{table}")), "{encoding}: {out}");
        assert!(d.iter().any(|r| r.contains(&format!("{text} streamed"))), "{encoding}: {d:?}");
        assert!(m.is_running(), "{encoding}: {}", m.log());
        assert_eq!(m.stop(), Some(0));
    }
}

#[test]
fn a_value_without_a_utf8_equivalent_stops_the_task_naming_table_column_and_key() {
    // WIN1252 leaves 0x81 undefined; a WIN1252 database stores it anyway.
    let create = "ENCODING 'WIN1252' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0";
    let bad = "convert_from('\\x4181'::bytea, 'WIN1252')";

    // In the stream: the task stops, nothing of the transaction is applied.
    let t = task("win", create, ALL);
    t.src().batch_execute("CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'fine');").unwrap();
    let mut m = migrate_until_streaming(&t);
    t.src()
        .batch_execute(&format!("BEGIN; INSERT INTO notes VALUES (2, 'also fine'); INSERT INTO notes VALUES (3, {bad}); COMMIT;"))
        .unwrap();
    assert!(m.wait_exit(Duration::from_secs(60)).is_some_and(|c| c != 0), "the task went on:\n{}", m.log());
    let log = m.log();
    for expected in ["column \"body\"", "table \"public\".\"notes\"", "\"id\" = '3'", "no equivalent in UTF8", "WIN1252"] {
        assert!(log.contains(expected), "the error does not say {expected}:\n{log}");
    }
    let ids: Vec<i32> = t.dst().query("SELECT id FROM notes ORDER BY id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![1], "part of the failed transaction was applied");

    // In the full copy: the task stops naming the table, and the table
    // holds nothing.
    let t = task("win", create, "types = [\"schema\", \"full\"]");
    t.src()
        .batch_execute(&format!("CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'fine'), (2, {bad});"))
        .unwrap();
    let mut m = t.migrate("migrate.log");
    assert!(m.wait_exit(Duration::from_secs(60)).is_some_and(|c| c != 0), "the copy went on:\n{}", m.log());
    for expected in ["copy of public.notes", "0x81", "column \"body\" in the row with (id) = 2"] {
        assert!(m.log().contains(expected), "the error does not say {expected}:\n{}", m.log());
    }
    let rows: i64 = t.dst().query_one("SELECT count(*) FROM notes", &[]).unwrap().get(0);
    assert_eq!(rows, 0);
}

#[test]
fn unique_constraints_besides_the_key_see_changes_in_source_order() {
    let t = task("postgres", "", ALL);
    t.src()
        .batch_execute(
            "CREATE EXTENSION btree_gist;
             CREATE TABLE uniq (id int PRIMARY KEY, u int UNIQUE, v text);
             CREATE TABLE uniq_expr (id int PRIMARY KEY, email text);
             CREATE UNIQUE INDEX uniq_expr_lower ON uniq_expr (lower(email));
             CREATE TABLE uniq_partial (id int PRIMARY KEY, slot int, active bool);
             CREATE UNIQUE INDEX uniq_partial_active ON uniq_partial (slot) WHERE active;
             CREATE TABLE booking (id int PRIMARY KEY, room int, during int4range, EXCLUDE USING gist (room WITH =, during WITH &&));
             -- PostgreSQL logs no key for a DEFERRABLE primary key: it needs FULL.
             CREATE TABLE deferred_key (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v text);
             ALTER TABLE deferred_key REPLICA IDENTITY FULL;
             CREATE TABLE deferred_unique (id int PRIMARY KEY, u int UNIQUE DEFERRABLE INITIALLY IMMEDIATE);
             INSERT INTO deferred_key SELECT g, 'v' || g FROM generate_series(1, 10) g;
             INSERT INTO deferred_unique SELECT g, g FROM generate_series(1, 10) g;
             INSERT INTO uniq SELECT g, g, 'v' FROM generate_series(1, 10) g;
             INSERT INTO uniq_expr SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 10) g;
             INSERT INTO uniq_partial SELECT g, g, true FROM generate_series(1, 10) g;
             INSERT INTO booking SELECT g, 1, int4range(g * 10, g * 10 + 5) FROM generate_series(1, 10) g;",
        )
        .unwrap();
    let mut m = migrate_until_streaming(&t);
    // Each transaction passes through a state that a merge of its net rows
    // would reach in another order.
    t.src()
        .batch_execute(
            "BEGIN; UPDATE uniq SET u = -1 WHERE id = 1; UPDATE uniq SET u = 1 WHERE id = 2; UPDATE uniq SET u = 2 WHERE id = 1; COMMIT;
             BEGIN; UPDATE uniq_expr SET email = 'tmp' WHERE id = 1;
                    UPDATE uniq_expr SET email = 'USER1@example.com' WHERE id = 2;
                    UPDATE uniq_expr SET email = 'user2@example.com' WHERE id = 1; COMMIT;
             BEGIN; UPDATE uniq_partial SET active = false WHERE id = 1; UPDATE uniq_partial SET slot = 1 WHERE id = 2;
                    UPDATE uniq_partial SET slot = 2, active = true WHERE id = 1; COMMIT;
             BEGIN; UPDATE booking SET during = int4range(500, 505) WHERE id = 1;
                    UPDATE booking SET during = int4range(10, 15) WHERE id = 2;
                    UPDATE booking SET during = int4range(20, 25) WHERE id = 1; COMMIT;
             BEGIN; DELETE FROM uniq WHERE id = 3; INSERT INTO uniq VALUES (30, 3, 'reused'); COMMIT;
             -- Every key moves at once; legal only because the key is deferred.
             UPDATE deferred_key SET id = 11 - id;
             INSERT INTO deferred_key VALUES (20, 'new');
             UPDATE deferred_unique SET u = 11 - u;",
        )
        .unwrap();
    t.assert_equal();
    for table in ["uniq", "uniq_expr", "uniq_partial", "booking", "deferred_key", "deferred_unique"] {
        assert_same_rows(&t, &format!("SELECT * FROM {table}"));
    }
    assert!(m.is_running(), "{}", m.log());
    assert_eq!(m.stop(), Some(0));
}

#[test]
fn identity_columns_generated_always_that_are_not_the_key_are_updated() {
    let t = task("postgres", "", ALL);
    t.src()
        .batch_execute(
            "CREATE TABLE ticket (id int PRIMARY KEY, n int GENERATED ALWAYS AS IDENTITY, v text);
             -- Also applied row by row (a second unique index keeps source order).
             CREATE TABLE ticket_ordered (id int PRIMARY KEY, n int GENERATED ALWAYS AS IDENTITY, v text UNIQUE);
             CREATE TABLE ticket_by_default (id int PRIMARY KEY, n int GENERATED BY DEFAULT AS IDENTITY, v text);
             INSERT INTO ticket (id, v) SELECT g, 'v' || g FROM generate_series(1, 20) g;
             INSERT INTO ticket_ordered (id, v) SELECT g, 'v' || g FROM generate_series(1, 20) g;
             INSERT INTO ticket_by_default (id, v) SELECT g, 'v' || g FROM generate_series(1, 20) g;",
        )
        .unwrap();
    let mut m = migrate_until_streaming(&t);
    for table in ["ticket", "ticket_ordered", "ticket_by_default"] {
        t.src()
            .batch_execute(&format!(
                "UPDATE {table} SET v = v || '!' WHERE id % 2 = 0;
                 UPDATE {table} SET n = DEFAULT WHERE id = 3;
                 INSERT INTO {table} (id, v) VALUES (100, 'new');
                 UPDATE {table} SET id = 101 WHERE id = 4;
                 DELETE FROM {table} WHERE id = 5;"
            ))
            .unwrap();
    }
    t.assert_equal();
    for table in ["ticket", "ticket_ordered", "ticket_by_default"] {
        assert_same_rows(&t, &format!("SELECT * FROM {table}"));
    }
    // The columns are GENERATED ALWAYS on the destination still.
    assert_same_rows(&t, "SELECT attrelid::regclass::text, attname::text, attidentity::text FROM pg_attribute WHERE attidentity <> ''");
    assert!(m.is_running(), "{}", m.log());
    assert_eq!(m.stop(), Some(0));
}

#[test]
fn tables_without_replica_identity_are_refused_with_incremental_only() {
    let mut t = task("postgres", "", ALL);
    t.src()
        .batch_execute(
            "CREATE TABLE keyed (id int PRIMARY KEY);
             CREATE TABLE \"Log Lines\" (at timestamptz, line text);
             CREATE TABLE nothing (id int PRIMARY KEY);
             ALTER TABLE nothing REPLICA IDENTITY NOTHING;
             CREATE TABLE deferred_pk (id int PRIMARY KEY DEFERRABLE);
             CREATE TABLE full_identity (a int, b text);
             ALTER TABLE full_identity REPLICA IDENTITY FULL;
             INSERT INTO \"Log Lines\" VALUES (now(), 'one');",
        )
        .unwrap();
    // Refused before anything is written, with the fix for each table.
    let mut m = t.migrate("migrate.log");
    assert!(m.wait_exit(Duration::from_secs(60)).is_some_and(|c| c != 0), "{}", m.log());
    let log = m.log();
    for expected in [
        "public.Log Lines",
        "public.nothing",
        "public.deferred_pk",
        "ALTER TABLE \"public\".\"Log Lines\" REPLICA IDENTITY FULL;",
        "insert_only_tables",
    ] {
        assert!(log.contains(expected), "the refusal does not say {expected}:\n{log}");
    }
    assert!(!log.contains("public.full_identity") && !log.contains("public.keyed,"), "{log}");
    let written: bool = t.dst().query_one("SELECT to_regclass('public.keyed') IS NOT NULL", &[]).unwrap().get(0);
    assert!(!written, "the destination was written to");
    let slots: i64 = t.src().query_one("SELECT count(*) FROM pg_replication_slots", &[]).unwrap().get(0);
    assert_eq!(slots, 0, "a slot was created");

    // Schema and full copy alone need no replica identity.
    t.edit(|c| c.set("migrate.types", "[\"schema\", \"full\"]"));
    migrate_to_end(&t);
    t.assert_equal();

    // Accepted as insert-only: inserts flow; an UPDATE stops the task.
    let t = task("postgres", "", &format!("{ALL}\ninsert_only_tables = [\"public.Log*\", \"public.nothing\"]"));
    t.src()
        .batch_execute("CREATE TABLE \"Log Lines\" (at timestamptz, line text); INSERT INTO \"Log Lines\" VALUES (now(), 'one');")
        .unwrap();
    let mut m = migrate_until_streaming(&t);
    t.src().batch_execute("INSERT INTO \"Log Lines\" VALUES (now(), 'two')").unwrap();
    t.assert_equal();
    t.src().batch_execute("UPDATE \"Log Lines\" SET line = 'changed' WHERE line = 'one'").unwrap();
    assert!(m.wait_exit(Duration::from_secs(60)).is_some_and(|c| c != 0), "the UPDATE was skipped:\n{}", m.log());
    assert!(m.log().contains("UPDATE on public.Log Lines cannot be applied"), "{}", m.log());
}

#[test]
fn tables_without_columns_keep_their_rows_on_every_path() {
    let t = task("postgres", "", ALL);
    t.src()
        .batch_execute(
            "CREATE TABLE nocols ();
             ALTER TABLE nocols REPLICA IDENTITY FULL;
             INSERT INTO nocols DEFAULT VALUES; INSERT INTO nocols DEFAULT VALUES; INSERT INTO nocols DEFAULT VALUES;
             CREATE TABLE parent_of_nocols (id int PRIMARY KEY);
             CREATE TABLE grown () INHERITS (parent_of_nocols);
             ALTER TABLE grown REPLICA IDENTITY FULL;
             INSERT INTO grown VALUES (1);",
        )
        .unwrap();
    let mut m = migrate_until_streaming(&t);
    let count = |mut c: postgres::Client| -> i64 { c.query_one("SELECT count(*) FROM nocols", &[]).unwrap().get(0) };
    assert_eq!(count(t.dst()), 3, "the copy lost the rows of a table without columns");
    t.src()
        .batch_execute(
            "INSERT INTO nocols DEFAULT VALUES; INSERT INTO nocols DEFAULT VALUES;
             DELETE FROM nocols WHERE ctid = (SELECT min(ctid) FROM nocols);",
        )
        .unwrap();
    let out = t.assert_equal();
    assert!(out.lines().any(|l| l.starts_with("public.nocols") && l.contains(" 4 ")), "verify does not show nocols:\n{out}");
    assert_eq!(count(t.dst()), 4);
    assert_eq!(m.stop(), Some(0));
    // verify notices a missing row of a table without columns.
    t.dst().batch_execute("DELETE FROM nocols WHERE ctid = (SELECT min(ctid) FROM nocols)").unwrap();
    let (ok, out) = t.command(&["verify"]);
    assert!(!ok && out.contains("public.nocols"), "{out}");
}

#[test]
fn truncate_empties_exactly_the_tables_the_source_truncated() {
    let t = task("postgres", "", ALL);
    t.src()
        .batch_execute(
            "CREATE TABLE account (id int PRIMARY KEY);
             CREATE TABLE entry (id int PRIMARY KEY, account_id int REFERENCES account);
             CREATE TABLE other (id int PRIMARY KEY);
             INSERT INTO account SELECT generate_series(1, 10);
             INSERT INTO entry SELECT g, g FROM generate_series(1, 10) g;
             INSERT INTO other SELECT generate_series(1, 10);",
        )
        .unwrap();
    let mut m = migrate_until_streaming(&t);
    // A table only on the destination that references a truncated one, and
    // one that references a table the source did not truncate.
    t.dst()
        .batch_execute(
            "CREATE TABLE local_audit (account_id int REFERENCES account);
             INSERT INTO local_audit SELECT generate_series(1, 10);
             CREATE TABLE local_other (other_id int REFERENCES other);
             INSERT INTO local_other SELECT generate_series(1, 10);",
        )
        .unwrap();
    t.src().batch_execute("TRUNCATE account CASCADE").unwrap();
    t.assert_equal();
    let count = |table: &str| -> i64 { t.dst().query_one(&format!("SELECT count(*) FROM {table}"), &[]).unwrap().get(0) };
    assert_eq!((count("account"), count("entry")), (0, 0));
    assert_eq!(count("local_audit"), 10, "a table only on the destination was emptied");
    assert_eq!((count("other"), count("local_other")), (10, 10));
    assert!(m.is_running(), "{}", m.log());
    assert_eq!(m.stop(), Some(0));
}

#[test]
fn both_applier_sessions_mark_their_changes_with_an_origin() {
    let t = task("postgres", "", ALL);
    t.pgbench_init("1");
    let mut m = migrate_until_streaming(&t);
    // A reverse stream would read the destination with origin = none: it
    // must see none of the applied changes.
    t.dst().batch_execute("SELECT pg_create_logical_replication_slot('reverse', 'decant')").unwrap();
    // Enough updates of pgbench_accounts in a backlog for merges split over
    // both sessions (thousands of keys per group).
    assert_eq!(m.stop(), Some(0));
    run_ok(t.source.tool("pgbench").args(["-n", "-c", "4", "-j", "2", "-t", "2000", "postgres"]));
    let port = decant_tests::process::free_port();
    let mut m = t.start_with("migrate", &[format!("agent.metrics_listen=127.0.0.1:{port}")], "migrate2.log");
    t.assert_equal();
    let metrics = http_get(port, "/metrics");
    let split: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("decant_split_merges_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no split merge metric:\n{metrics}"));
    assert!(split >= 1.0, "no merge was split: the test shows nothing\n{metrics}");
    let mut dst = t.dst();
    let changes = |dst: &mut postgres::Client, origin: &str| -> usize {
        let flat = ["origin", origin, "include_messages", "false"];
        let rows = dst
            .query("SELECT data FROM pg_logical_slot_peek_binary_changes('reverse', NULL, NULL, VARIADIC $1::text[])", &[&&flat[..]])
            .unwrap();
        let messages: Vec<Vec<u8>> = rows.into_iter().map(|r| r.get(0)).collect();
        decant_tests::slot::decode_all(&messages)
            .iter()
            .filter(|r| matches!(r, decant_proto::Record::Insert(_) | decant_proto::Record::Update(_) | decant_proto::Record::Delete(_)))
            .count()
    };
    // The slot holds the applied changes (8000 history rows at least)...
    assert!(changes(&mut dst, "any") >= 8000, "the reverse slot saw too few changes");
    // ...and every one of them carries an origin.
    assert_eq!(changes(&mut dst, "none"), 0, "applied changes without an origin:\n{}", m.log());
    assert_eq!(m.stop(), Some(0));
}
