//! The `decant` output plugin, end to end through a real slot: every change
//! decoded from the slot must equal what the source holds (text forms
//! compared), in order.

use std::collections::HashMap;

use decant_proto::{OldTuple, Record, ReplicaIdentity, Tuple, Value};
use decant_tests::slot::{decode_all, decode_packed, get_changes, prepare_source, TEXT_SETTINGS};
use decant_tests::Cluster;

/// A decoded value, owned, for comparisons.
#[derive(Clone, Debug, PartialEq)]
enum V {
    Null,
    Unchanged,
    Text(String),
}

fn v(s: &str) -> V {
    V::Text(s.to_owned())
}

fn owned(t: &Tuple<'_>) -> Vec<V> {
    t.0.iter()
        .map(|x| match x {
            Value::Null => V::Null,
            Value::UnchangedToast => V::Unchanged,
            other => V::Text(String::from_utf8(other.to_pg_text().unwrap().into_owned()).expect("test data is UTF-8")),
        })
        .collect()
}

struct Source {
    _cluster: Cluster,
    client: postgres::Client,
}

impl Source {
    fn new() -> Source {
        let cluster = Cluster::start();
        let mut client = cluster.connect();
        prepare_source(&mut client, "s");
        Source { _cluster: cluster, client }
    }

    fn sql(&mut self, sql: &str) {
        self.client.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn changes(&mut self) -> Vec<Vec<u8>> {
        get_changes(&mut self.client, "s", &[]).expect("read slot")
    }

    /// Every row of `query`, each column as its type's text output (the
    /// simple query protocol returns exactly that, no casts involved).
    fn rows(&mut self, query: &str) -> Vec<Vec<V>> {
        let messages = self.client.simple_query(query).unwrap_or_else(|e| panic!("{query}: {e}"));
        messages
            .iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => Some((0..r.len()).map(|i| r.get(i).map_or(V::Null, v)).collect()),
                _ => None,
            })
            .collect()
    }
}

/// Short names of the records, for asserting sequences.
fn kinds(records: &[Record<'_>]) -> Vec<&'static str> {
    records.iter().map(|r| r.kind().name()).collect()
}

fn inserts<'a>(records: &'a [Record<'a>], relation: u32) -> Vec<Vec<V>> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Insert(i) if i.relation == relation => Some(owned(&i.new)),
            _ => None,
        })
        .collect()
}

fn relation_oids(records: &[Record<'_>]) -> HashMap<String, u32> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Relation(rel) => Some((String::from_utf8_lossy(rel.name).into_owned(), rel.oid)),
            _ => None,
        })
        .collect()
}

#[test]
fn insert_update_delete_truncate_and_messages_in_order() {
    let mut s = Source::new();
    s.sql(
        "CREATE TABLE items (id int PRIMARY KEY, name text, qty int);
         CREATE TABLE other (id serial PRIMARY KEY);",
    );
    s.sql("INSERT INTO items VALUES (1, 'one', 10), (2, 'two', 20)");
    s.sql("UPDATE items SET qty = qty + 1 WHERE id = 1");
    s.sql("UPDATE items SET id = 3 WHERE id = 2");
    s.sql("DELETE FROM items WHERE id = 1");
    s.sql("SELECT pg_logical_emit_message(true, 'app', 'in a transaction')");
    s.sql("SELECT pg_logical_emit_message(false, 'app', E'\\\\x00ff'::bytea)");
    s.sql("TRUNCATE items, other RESTART IDENTITY CASCADE");
    let msgs = s.changes();
    let r = decode_all(&msgs);
    assert_eq!(
        kinds(&r),
        [
            "BEGIN", "RELATION", "INSERT", "INSERT", "COMMIT", // insert
            "BEGIN", "UPDATE", "COMMIT", // update, key unchanged
            "BEGIN", "UPDATE", "COMMIT", // update of the key
            "BEGIN", "DELETE", "COMMIT", // delete
            "BEGIN", "MESSAGE", "COMMIT",  // transactional message
            "MESSAGE", // non-transactional message: no transaction around it
            "BEGIN", "RELATION", "RELATION", "TRUNCATE", "COMMIT",
        ]
    );
    let Record::Relation(rel) = &r[1] else { unreachable!() };
    assert_eq!((rel.namespace, rel.name, rel.replica_identity), (&b"public"[..], &b"items"[..], ReplicaIdentity::Default));
    let cols: Vec<(&[u8], &[u8], bool)> = rel.columns.iter().map(|c| (c.name, c.type_name, c.flags.identity_key())).collect();
    assert_eq!(cols, [(&b"id"[..], &b"integer"[..], true), (b"name", b"text", false), (b"qty", b"integer", false)]);
    assert_eq!(inserts(&r, rel.oid), [[v("1"), v("one"), v("10")], [v("2"), v("two"), v("20")]]);
    match &r[6] {
        Record::Update(u) => {
            assert_eq!(u.old, None, "key unchanged: no old tuple under REPLICA IDENTITY DEFAULT");
            assert_eq!(owned(&u.new), [v("1"), v("one"), v("11")]);
        }
        other => panic!("{other:?}"),
    }
    match &r[9] {
        Record::Update(u) => {
            assert!(matches!(&u.old, Some(OldTuple::Key(k)) if owned(k) == [v("2")]), "{:?}", u.old);
            assert_eq!(owned(&u.new), [v("3"), v("two"), v("20")]);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&r[12], Record::Delete(d) if matches!(&d.old, Some(OldTuple::Key(k)) if owned(k) == [v("1")])));
    assert!(matches!(&r[15], Record::Message(m) if m.transactional && m.prefix == b"app" && m.content == b"in a transaction"));
    assert!(matches!(&r[17], Record::Message(m) if !m.transactional && m.content == [0x00, 0xff]));
    let oids = relation_oids(&r);
    match &r[21] {
        Record::Truncate(t) => {
            assert!(t.cascade && t.restart_identity);
            let mut got = t.relations.clone();
            got.sort();
            let mut want = vec![oids["items"], oids["other"]];
            want.sort();
            assert_eq!(got, want);
        }
        other => panic!("{other:?}"),
    }
    // BEGIN and COMMIT agree with each other and with the server.
    let (Record::Begin(b), Record::Commit(c)) = (&r[0], &r[4]) else { unreachable!() };
    assert_eq!(b.commit_time, c.commit_time);
    assert!(b.final_lsn < c.end_lsn);
}

#[test]
fn savepoints_and_rolled_back_subtransactions() {
    let mut s = Source::new();
    s.sql("CREATE TABLE t (id int PRIMARY KEY)");
    s.sql(
        "BEGIN;
         INSERT INTO t VALUES (1);
         SAVEPOINT a; INSERT INTO t VALUES (2); ROLLBACK TO a;
         INSERT INTO t VALUES (3);
         SAVEPOINT b; INSERT INTO t VALUES (4); RELEASE b;
         SAVEPOINT c; INSERT INTO t VALUES (5); SAVEPOINT d; INSERT INTO t VALUES (6); ROLLBACK TO d; RELEASE c;
         COMMIT;
         BEGIN; INSERT INTO t VALUES (7); ROLLBACK;",
    );
    let msgs = s.changes();
    let r = decode_all(&msgs);
    assert_eq!(kinds(&r), ["BEGIN", "RELATION", "INSERT", "INSERT", "INSERT", "INSERT", "COMMIT"]);
    let oid = relation_oids(&r)["t"];
    assert_eq!(inserts(&r, oid), [[v("1")], [v("3")], [v("4")], [v("5")]]);
    assert_eq!(s.rows("SELECT id::text FROM t ORDER BY id"), [[v("1")], [v("3")], [v("4")], [v("5")]]);
}

/// Every built-in type family, with its edge values: the decoded text form
/// equals the source's, value by value.
#[test]
fn every_type_family_round_trips() {
    let mut s = Source::new();
    s.sql(
        "CREATE TYPE mood AS ENUM ('sad', 'happy', 'ümlaut');
         CREATE DOMAIN positive AS int CHECK (VALUE > 0);
         CREATE DOMAIN short_text AS varchar(8);
         CREATE TYPE pair AS (a int, b text);",
    );
    let cases: &[(&str, &[&str])] = &[
        ("int2", &["0", "-32768", "32767"]),
        ("int4", &["1", "-2147483648", "2147483647"]),
        ("int8", &["-9223372036854775808", "9223372036854775807", "42"]),
        ("numeric", &["0", "-1.5", "12345678901234567890.123456789", "NaN", "Infinity", "-Infinity", "0.000001", "1e-20"]),
        ("numeric(10,3)", &["1.5", "-0.001", "9999999.999"]),
        ("float4", &["0", "-0", "NaN", "Infinity", "-Infinity", "1.17549435e-38", "3.4028235e38", "1.1", "1e6", "123456"]),
        (
            "float8",
            &[
                "0",
                "-0",
                "NaN",
                "Infinity",
                "-Infinity",
                "1e-310",
                "1.7976931348623157e308",
                "0.1",
                "1e15",
                "123456789012345",
                "0.0001",
                "1e-5",
            ],
        ),
        ("money", &["12.34", "-92233720368547758.08", "0"]),
        ("text", &["", "héllo wörld ✓ 日本語", "with 'quotes' and \\backslash", "line\nbreak"]),
        ("varchar(10)", &["", "ascii", "ñandú"]),
        ("char(5)", &["", "ab", "abcde", "é"]),
        ("bpchar", &["no typmod  ", "x"]),
        ("name", &["a_name"]),
        ("\"char\"", &["x"]),
        ("bytea", &["\\x", "\\x00ff10", "\\xdeadbeef"]),
        ("bool", &["true", "false"]),
        ("date", &["2024-02-29", "infinity", "-infinity", "4713-01-01 BC", "0001-01-01", "5874897-12-31", "2000-01-01"]),
        ("time", &["00:00:00", "12:34:56.789", "24:00:00", "23:59:59.999999"]),
        ("time(2)", &["12:34:56.78"]),
        ("timetz", &["12:34:56+05:30", "00:00:00-15:59"]),
        (
            "timestamp",
            &[
                "2024-01-01 00:00:00.000001",
                "infinity",
                "-infinity",
                "0001-01-01 00:00:00 BC",
                "294276-12-31 23:59:59.999999",
                "1999-12-31 23:59:59.5",
            ],
        ),
        ("timestamptz", &["2024-06-01 12:00:00+02", "infinity", "-infinity", "4713-01-01 00:00:00+00 BC", "1970-01-01 00:00:00+00"]),
        ("interval", &["1 year 2 mons 3 days 04:05:06.789", "-178000000 years", "0", "-1 days +02:00:00"]),
        ("uuid", &["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "00000000-0000-0000-0000-000000000000"]),
        ("json", &["{\"a\": [1, 2.50, 1e400]}", "\"ü\"", "[]"]),
        ("jsonb", &["{\"b\": 1, \"a\": \"x\"}", "12345678901234567890.123", "null"]),
        ("inet", &["192.168.1.1/24", "::1", "10.0.0.1"]),
        ("cidr", &["10.0.0.0/8", "::/0"]),
        ("macaddr", &["08:00:2b:01:02:03"]),
        ("macaddr8", &["08:00:2b:01:02:03:04:05"]),
        ("bit(4)", &["1010", "0000"]),
        ("varbit", &["", "101", "1111111111111111111111111111111111111111"]),
        ("int[]", &["{1,2,NULL}", "{}", "{{1,2},{3,4}}", "[0:1]={5,6}"]),
        ("text[]", &["{{a,b},{c,NULL}}", "{\"with space\",\"quote\\\"d\",\"\"}"]),
        ("numeric[]", &["{1.5,NaN,-Infinity}"]),
        ("int4range", &["[1,10)", "empty", "(,5]"]),
        ("tstzrange", &["[2024-01-01 00:00+00,2024-02-01 00:00+00)", "(,infinity)"]),
        ("numrange", &["(1.5,2.5]"]),
        ("mood", &["happy", "ümlaut"]),
        ("positive", &["5"]),
        ("short_text", &["domain"]),
        ("pair", &["(1,x)", "(,)", "(2,\"a,b\")"]),
        ("tsvector", &["a fat cat sat on a mat", "'ü':1A"]),
        ("tsquery", &["fat & (rat | cat)"]),
        ("xml", &["<a>b</a>", "<?xml version=\"1.0\"?><r/>"]),
        ("point", &["(1,2)", "(-1.5,NaN)"]),
        ("line", &["{1,2,3}"]),
        ("lseg", &["[(0,0),(1,1)]"]),
        ("box", &["(1,1),(0,0)"]),
        ("path", &["[(0,0),(1,1),(2,0)]", "((0,0),(1,1))"]),
        ("polygon", &["((0,0),(1,1),(2,0))"]),
        ("circle", &["<(0,0),1.5>"]),
        ("oid", &["4294967295"]),
        ("pg_lsn", &["16/B374D848"]),
        ("int8range", &["[1,2)"]),
    ];
    let mut tables = Vec::new();
    for (i, (ty, values)) in cases.iter().enumerate() {
        let table = format!("t{i}");
        s.sql(&format!("CREATE TABLE {table} (id int PRIMARY KEY, v {ty})"));
        let mut client_values: Vec<String> = values.iter().map(|v| v.replace('\'', "''")).collect();
        client_values.push(String::new()); // and a NULL
        let rows: Vec<String> = client_values
            .iter()
            .enumerate()
            .map(|(n, lit)| if n == values.len() { format!("({n}, NULL)") } else { format!("({n}, '{lit}')") })
            .collect();
        s.sql(&format!("INSERT INTO {table} VALUES {}", rows.join(", ")));
        tables.push((table, *ty));
    }
    let msgs = s.changes();
    let r = decode_all(&msgs);
    let oids = relation_oids(&r);
    for (table, ty) in &tables {
        let want = s.rows(&format!("SELECT t.id, t.v FROM {table} t ORDER BY t.id"));
        let got = inserts(&r, oids[table.as_str()]);
        assert_eq!(got, want, "type {ty}");
    }
    // The compact forms are in use where they should be.
    let first_value = |table: &str| {
        r.iter()
            .find_map(|rec| match rec {
                Record::Insert(i) if i.relation == oids[table] => Some(i.new.0[1]),
                _ => None,
            })
            .unwrap()
    };
    let index = |ty: &str| format!("t{}", cases.iter().position(|(t, _)| *t == ty).unwrap());
    assert!(matches!(first_value(&index("int4")), Value::Int(1)));
    assert!(matches!(first_value(&index("numeric")), Value::Numeric(_)));
    assert!(matches!(first_value(&index("float8")), Value::Float8(_)));
    assert!(matches!(first_value(&index("timestamptz")), Value::TimestampTz(_)));
    assert!(matches!(first_value(&index("uuid")), Value::Uuid(_)));
    assert!(matches!(first_value(&index("char(5)")), Value::PaddedText(b"", 5)));
    assert!(matches!(first_value(&index("bytea")), Value::Bytes(b"")));
    assert!(matches!(first_value(&index("interval")), Value::Text(_)));
}

/// A 1 MB out-of-line value: the insert carries it whole, an update of
/// another column marks it unchanged (never NULL, never a placeholder), and
/// under REPLICA IDENTITY FULL the old row still carries it.
#[test]
fn toasted_values_and_unchanged_toast() {
    let mut s = Source::new();
    s.sql(
        "CREATE TABLE docs (id int PRIMARY KEY, n int, body text);
         ALTER TABLE docs ALTER body SET STORAGE EXTERNAL;
         CREATE TABLE docs_full (id int PRIMARY KEY, n int, body text);
         ALTER TABLE docs_full REPLICA IDENTITY FULL;",
    );
    let big = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 32768) g)";
    s.sql(&format!("INSERT INTO docs VALUES (1, 0, {big}), (2, 0, 'small')"));
    s.sql(&format!("INSERT INTO docs_full VALUES (1, 0, {big})"));
    s.sql("UPDATE docs SET n = n + 1");
    s.sql("UPDATE docs_full SET n = 5");
    s.sql("UPDATE docs SET body = body || 'x' WHERE id = 1");
    let msgs = s.changes();
    let r = decode_all(&msgs);
    let oids = relation_oids(&r);
    let body = s.rows("SELECT body FROM docs_full")[0][0].clone();
    let V::Text(text) = &body else { panic!() };
    assert_eq!(text.len(), 1 << 20);
    assert_eq!(inserts(&r, oids["docs"])[0], [v("1"), v("0"), body.clone()]);
    let updates: Vec<&decant_proto::Update<'_>> = r.iter().filter_map(|x| if let Record::Update(u) = x { Some(u) } else { None }).collect();
    assert_eq!(updates.len(), 4);
    assert_eq!(owned(&updates[0].new), [v("1"), v("1"), V::Unchanged], "untouched TOASTed column is unchanged");
    assert_eq!(owned(&updates[1].new), [v("2"), v("1"), v("small")], "inline values are always carried");
    assert_eq!(owned(&updates[2].new), [v("1"), v("5"), V::Unchanged]);
    match &updates[2].old {
        Some(OldTuple::Row(old)) => assert_eq!(owned(old), [v("1"), v("0"), body.clone()]),
        other => panic!("REPLICA IDENTITY FULL must carry the old row: {other:?}"),
    }
    let changed = s.rows("SELECT id::text, n::text, body FROM docs WHERE id = 1");
    assert_eq!(owned(&updates[3].new), changed[0], "a changed TOASTed value is carried whole");
}

#[test]
fn replica_identity_variants() {
    let mut s = Source::new();
    s.sql(
        "CREATE TABLE ri_default (id int PRIMARY KEY, a int, b text);
         CREATE TABLE ri_full (id int PRIMARY KEY, a int, b text);
         ALTER TABLE ri_full REPLICA IDENTITY FULL;
         CREATE TABLE ri_index (id int PRIMARY KEY, a int NOT NULL, b text NOT NULL);
         CREATE UNIQUE INDEX ri_index_ab ON ri_index (b, a);
         ALTER TABLE ri_index REPLICA IDENTITY USING INDEX ri_index_ab;
         CREATE TABLE ri_nothing (id int PRIMARY KEY, a int, b text);
         ALTER TABLE ri_nothing REPLICA IDENTITY NOTHING;
         CREATE TABLE no_pk (a int, b text);",
    );
    for t in ["ri_default", "ri_full", "ri_index", "ri_nothing"] {
        s.sql(&format!("INSERT INTO {t} VALUES (1, 10, 'x'); UPDATE {t} SET a = 11, b = 'y'; DELETE FROM {t};"));
    }
    s.sql("INSERT INTO no_pk VALUES (10, 'x'), (10, 'x'); UPDATE no_pk SET b = 'y'; DELETE FROM no_pk;");
    let msgs = s.changes();
    let r = decode_all(&msgs);
    let mut rels = HashMap::new();
    let mut events: HashMap<&str, Vec<String>> = HashMap::new();
    for rec in &r {
        let describe = |old: &Option<OldTuple<'_>>| match old {
            None => "none".to_string(),
            Some(OldTuple::Key(t)) => format!("key {:?}", owned(t)),
            Some(OldTuple::Row(t)) => format!("row {:?}", owned(t)),
        };
        match rec {
            Record::Relation(rel) => {
                rels.insert(rel.oid, rel.clone());
            }
            Record::Update(u) => {
                let name = std::str::from_utf8(rels[&u.relation].name).unwrap();
                events.entry(name).or_default().push(format!("update old {}", describe(&u.old)));
            }
            Record::Delete(d) => {
                let name = std::str::from_utf8(rels[&d.relation].name).unwrap();
                events.entry(name).or_default().push(format!("delete old {}", describe(&d.old)));
            }
            _ => {}
        }
    }
    let identity = |name: &str| {
        let rel = rels.values().find(|r| r.name == name.as_bytes()).unwrap();
        let key: Vec<&[u8]> = rel.identity_key().map(|i| rel.columns[i].name).collect();
        (rel.replica_identity, key.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect::<Vec<_>>())
    };
    assert_eq!(identity("ri_default"), (ReplicaIdentity::Default, vec!["id".to_string()]));
    assert_eq!(identity("ri_full"), (ReplicaIdentity::Full, vec![]));
    assert_eq!(identity("ri_index"), (ReplicaIdentity::Index, vec!["a".to_string(), "b".to_string()]));
    assert_eq!(identity("ri_nothing"), (ReplicaIdentity::Nothing, vec![]));
    assert_eq!(identity("no_pk"), (ReplicaIdentity::Default, vec![]));
    let text = |vals: &[&str]| format!("{:?}", vals.iter().map(|x| v(x)).collect::<Vec<_>>());
    assert_eq!(events["ri_default"], ["update old none".to_string(), format!("delete old key {}", text(&["1"]))]);
    assert_eq!(
        events["ri_full"],
        [format!("update old row {}", text(&["1", "10", "x"])), format!("delete old row {}", text(&["1", "11", "y"]))]
    );
    assert_eq!(events["ri_index"], [format!("update old key {}", text(&["10", "x"])), format!("delete old key {}", text(&["11", "y"]))]);
    assert_eq!(events["ri_nothing"], ["update old none", "delete old none"]);
    // A table without a primary key and the default identity logs no old
    // key: updates and deletes arrive without one (precheck reports these).
    assert_eq!(events["no_pk"], ["update old none", "update old none", "delete old none", "delete old none"]);
}

/// Relation metadata is sent once per session, not per row, and again after
/// the relation changed; dropped and generated columns are left out.
#[test]
fn relation_metadata_is_resent_after_alter_table() {
    let mut s = Source::new();
    s.sql("CREATE TABLE t (id int PRIMARY KEY, a int, doomed text, g int GENERATED ALWAYS AS (a * 2) STORED)");
    // (One sql() call is one transaction.)
    s.sql("INSERT INTO t (id, a, doomed) VALUES (1, 1, 'x')");
    s.sql("INSERT INTO t (id, a, doomed) VALUES (2, 2, 'y')");
    s.sql("ALTER TABLE t ADD COLUMN added text DEFAULT 'new', DROP COLUMN doomed");
    s.sql("INSERT INTO t (id, a) VALUES (3, 3)");
    s.sql("UPDATE t SET a = 4 WHERE id = 3");
    let msgs = s.changes();
    let r = decode_all(&msgs);
    assert_eq!(
        kinds(&r),
        [
            "BEGIN", "RELATION", "INSERT", "COMMIT", "BEGIN", "INSERT", "COMMIT", "BEGIN", "RELATION", "INSERT", "COMMIT", "BEGIN",
            "UPDATE", "COMMIT"
        ]
    );
    let names = |i: usize| match &r[i] {
        Record::Relation(rel) => rel.columns.iter().map(|c| String::from_utf8_lossy(c.name).into_owned()).collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(names(1), ["id", "a", "doomed"]);
    assert_eq!(names(8), ["id", "a", "added"]);
    let oid = relation_oids(&r)["t"];
    assert_eq!(inserts(&r, oid), [vec![v("1"), v("1"), v("x")], vec![v("2"), v("2"), v("y")], vec![v("3"), v("3"), v("new")]]);
    // A second session sends the metadata again before first use.
    s.sql("INSERT INTO t (id, a) VALUES (4, 4)");
    let msgs = s.changes();
    assert_eq!(kinds(&decode_all(&msgs)), ["BEGIN", "RELATION", "INSERT", "COMMIT"]);
}

#[test]
fn a_logged_standby_snapshot_moves_the_slot_restart_point() {
    let mut s = Source::new();
    s.sql("CREATE TABLE t (id int PRIMARY KEY)");
    let _ = s.changes();
    let restart = |s: &mut Source| s.rows("SELECT restart_lsn - '0/0' FROM pg_replication_slots WHERE slot_name = 's'");
    let logged = |s: &mut Source| s.rows("SELECT decant.log_standby_snapshot()")[0][0].clone();
    let before = restart(&mut s);
    s.sql("INSERT INTO t VALUES (1)");
    assert_eq!(logged(&mut s), v("t"));
    // Nothing happened since: nothing to log.
    assert_eq!(logged(&mut s), v("f"));
    s.sql("INSERT INTO t VALUES (2)");
    // Decoding past the snapshot and confirming it moves the restart point
    // there (PostgreSQL's own snapshot comes only every 15 s).
    let _ = s.changes();
    let after = restart(&mut s);
    let n = |r: &[Vec<V>]| match &r[0][0] {
        V::Text(t) => t.parse::<u64>().expect("an LSN difference"),
        other => panic!("restart_lsn: {other:?}"),
    };
    assert!(n(&after) > n(&before), "restart_lsn stayed at {before:?}");
}

#[test]
fn materialized_view_refreshes_are_not_replicated() {
    // A concurrent refresh writes the view's rows with ordinary heap
    // changes; the destination refreshes its own view instead.
    let mut s = Source::new();
    s.sql("CREATE TABLE base (id int PRIMARY KEY, a int)");
    s.sql("CREATE MATERIALIZED VIEW mv AS SELECT id, a * 2 AS b FROM base");
    s.sql("CREATE UNIQUE INDEX ON mv (id)");
    let _ = s.changes();
    s.sql("INSERT INTO base SELECT g, g FROM generate_series(1, 5) g");
    s.sql("REFRESH MATERIALIZED VIEW CONCURRENTLY mv");
    s.sql("REFRESH MATERIALIZED VIEW mv");
    let msgs = s.changes();
    let r = decode_all(&msgs);
    assert_eq!(kinds(&r), ["BEGIN", "RELATION", "INSERT", "INSERT", "INSERT", "INSERT", "INSERT", "COMMIT"]);
    assert!(relation_oids(&r).keys().all(|name| name == "base"), "{:?}", relation_oids(&r));
}

#[test]
fn a_million_row_transaction_decodes_completely_in_order() {
    let mut s = Source::new();
    s.sql("CREATE TABLE big (id int PRIMARY KEY, pad text)");
    s.sql("INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 1000000) g");
    let msgs = s.changes();
    let r = decode_all(&msgs);
    assert_eq!(r.len(), 1_000_000 + 3);
    assert!(matches!(r[0], Record::Begin(_)) && matches!(r[1], Record::Relation(_)) && matches!(r[r.len() - 1], Record::Commit(_)));
    for (n, rec) in r[2..r.len() - 1].iter().enumerate() {
        let Record::Insert(i) = rec else { panic!("record {n}: {rec:?}") };
        let id = n as i64 + 1;
        assert_eq!(i.new.0[0], Value::Int(id));
        assert_eq!(i.new.0[1], Value::Text(format!("row {id}").as_bytes()));
    }
}

#[test]
fn options_are_validated_and_applied() {
    let mut s = Source::new();
    s.sql(
        "CREATE SCHEMA app;
         CREATE TABLE app.orders (id int PRIMARY KEY);
         CREATE TABLE app.audit (id int PRIMARY KEY);
         CREATE TABLE public.t (id int PRIMARY KEY);",
    );
    // Unknown options and bad values are errors that name the option.
    for (name, value, expect) in [
        ("no_such_option", "1", "unknown option"),
        ("format_version", "7", "format version"),
        ("include_messages", "maybe", "boolean"),
        ("origin", "elsewhere", "any"),
        ("include_tables", "no_schema", "schema.table"),
    ] {
        let err = get_changes(&mut s.client, "s", &[(name, value)]).unwrap_err();
        let db = err.as_db_error().expect("a server error");
        assert!(db.message().contains(name) && db.message().contains(expect), "{name}: {}", db.message());
        assert_eq!(db.code(), &postgres::error::SqlState::INVALID_PARAMETER_VALUE);
    }
    s.sql(
        "INSERT INTO app.orders VALUES (1); INSERT INTO app.audit VALUES (1); INSERT INTO public.t VALUES (1);
         SELECT pg_logical_emit_message(true, 'm', 'x');",
    );
    s.client.batch_execute("SELECT pg_replication_origin_create('elsewhere')").unwrap();
    s.sql(
        "SELECT pg_replication_origin_session_setup('elsewhere');
         INSERT INTO public.t VALUES (2);
         SELECT pg_replication_origin_session_reset();",
    );
    let peek = |s: &mut Source, options: &[(&str, &str)]| -> Vec<String> {
        let flat: Vec<String> = options.iter().flat_map(|(n, v)| [n.to_string(), v.to_string()]).collect();
        let rows =
            s.client.query("SELECT data FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL, VARIADIC $1::text[])", &[&flat]).unwrap();
        let msgs: Vec<Vec<u8>> = rows.into_iter().map(|r| r.get(0)).collect();
        let records = decode_all(&msgs);
        let mut names = HashMap::new();
        records
            .iter()
            .filter_map(|rec| match rec {
                Record::Relation(rel) => {
                    names.insert(rel.oid, format!("{}.{}", String::from_utf8_lossy(rel.namespace), String::from_utf8_lossy(rel.name)));
                    None
                }
                Record::Insert(i) => Some(format!("{} {:?}", names[&i.relation], owned(&i.new))),
                Record::Message(_) => Some("message".to_string()),
                _ => None,
            })
            .collect()
    };
    let all = peek(&mut s, &[]);
    assert_eq!(all, ["app.orders [Text(\"1\")]", "app.audit [Text(\"1\")]", "public.t [Text(\"1\")]", "message", "public.t [Text(\"2\")]"]);
    assert_eq!(
        peek(&mut s, &[("include_tables", "app.*"), ("exclude_tables", "app.aud*"), ("include_messages", "off")]),
        ["app.orders [Text(\"1\")]"]
    );
    assert_eq!(
        peek(&mut s, &[("origin", "none"), ("include_messages", "false")]),
        ["app.orders [Text(\"1\")]", "app.audit [Text(\"1\")]", "public.t [Text(\"1\")]"],
        "changes that carry a replication origin are skipped with origin=none"
    );
    // Packed messages carry the same records in fewer messages; the COMMIT
    // always ends a message.
    let packed = get_changes_peek(&mut s, &["max_message_bytes", "1024"]);
    let single = get_changes_peek(&mut s, &[]);
    assert_eq!(decode_packed(&packed), decode_all(&single));
    assert!(packed.len() < single.len(), "{} packed messages, {} single", packed.len(), single.len());
    for m in &packed {
        let last = decode_packed(std::slice::from_ref(m)).pop().unwrap();
        assert!(
            matches!(last, Record::Commit(_) | Record::Message(_)),
            "a message ends with COMMIT or a non-transactional message: {last:?}"
        );
    }
    // pack_transactions holds COMMITs back only in a walsender: the SQL
    // functions end at their last record, so they must send every message
    // exactly as without it (a held COMMIT would be lost there).
    let with_packing = get_changes_peek(&mut s, &["max_message_bytes", "1024", "pack_transactions", "on"]);
    assert_eq!(with_packing, packed);

    // Transactions whose changes are all filtered out produce no output at all.
    let msgs = get_changes(&mut s.client, "s", &[("include_tables", "nomatch.*"), ("include_messages", "off")]).unwrap();
    assert!(msgs.is_empty(), "{} messages", msgs.len());
}

/// The messages of slot `s`, without consuming them; `options` are name,
/// value, name, value, …
fn get_changes_peek(s: &mut Source, options: &[&str]) -> Vec<Vec<u8>> {
    let options: Vec<String> = options.iter().map(|o| o.to_string()).collect();
    s.client
        .query("SELECT data FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL, VARIADIC $1::text[])", &[&options])
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn text_settings_are_what_the_tests_assume() {
    // Guards the comparison basis of the tests above.
    let mut s = Source::new();
    s.sql(TEXT_SETTINGS);
    assert_eq!(s.rows("SHOW DateStyle"), [[v("ISO, MDY")]]);
    assert_eq!(s.rows("SHOW TimeZone"), [[v("UTC")]]);
}
