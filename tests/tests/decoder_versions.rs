//! The `decant` plugin on every PostgreSQL major of the matrix from 13 up
//! (`DECANT_PG_VERSIONS`): the extension installs (with its DDL capture),
//! and the same workload decodes to the same records as on the system's
//! PostgreSQL 15, the reference, but for LSNs, xids, commit times and
//! relation OIDs. The plugin is built for each major and installed into its
//! server by `scripts/pg.sh plugin` (cached; `scripts/test.sh` runs it first).

use std::collections::HashMap;

use decant_proto::{Lsn, Record};
use decant_tests::slot::{decode_all, get_changes, prepare_source, TEXT_SETTINGS};
use decant_tests::versions::{pg_versions, plugin_installed};
use decant_tests::Cluster;

/// The oldest major the plugin supports (pgrx 0.18).
const OLDEST_PLUGIN_MAJOR: u32 = 13;

/// The other majors to compare with the reference (15 is the reference,
/// the system server where scripts/setup.sh installed the plugin): those
/// of the matrix from 13 up that the plugin can be built for here (not 14
/// and 16, whose sources no Debian suite has; `plugin_installed` says so).
fn majors() -> Vec<u32> {
    pg_versions().into_iter().filter(|&m| m >= OLDEST_PLUGIN_MAJOR && m != 15 && plugin_installed(m)).collect()
}

/// A server of `major` (its plugin installed by `majors`); None for the
/// system's 15.
fn server(major: Option<u32>) -> Cluster {
    match major {
        None => Cluster::start(),
        Some(m) => Cluster::start_version(m),
    }
}

const WORKLOAD: &[&str] = &[
    "CREATE TABLE kinds (
        id int PRIMARY KEY, b bool, i2 smallint, i8 bigint, n numeric(12,3), f4 real, f8 double precision,
        t text, vc varchar(20), ch char(5), by bytea, d date, ts timestamp, tz timestamptz, tm time,
        iv interval, u uuid, j json, jb jsonb, ia int[], ta text[], ip inet, cidr cidr, mac macaddr,
        vb bit varying(8), r int4range, p point, o oid)",
    "CREATE TABLE big (id int PRIMARY KEY, note text, doc text)",
    "ALTER TABLE big ALTER COLUMN doc SET STORAGE EXTERNAL",
    "CREATE TABLE full_rows (a int, b text)",
    "ALTER TABLE full_rows REPLICA IDENTITY FULL",
    "INSERT INTO kinds VALUES
        (1, true, -2, 9007199254740993, 12345.678, 1.5, -0.1, 'tëxt ☃', 'var', 'ab', '\\x00ff10',
         '2024-02-29', '2024-02-29 13:14:15.123456', '2024-02-29 13:14:15+02', '23:59:59.5',
         '1 year 2 mons 3 days 04:05:06', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"k\": [1, 2]}',
         '{\"k\": [1, 2], \"a\": null}', '{1,NULL,3}', '{\"a b\",c}', '192.168.0.1/24', '10.0.0.0/8',
         '08:00:2b:01:02:03', B'101', '[1,10)', '(1.5,-2)', 4294967295),
        (2, NULL, NULL, NULL, 'NaN', 'Infinity', '-Infinity', NULL, NULL, NULL, NULL, 'infinity',
         '-infinity', NULL, NULL, NULL, NULL, NULL, NULL, '{}', NULL, NULL, NULL, NULL, NULL, 'empty',
         NULL, 0)",
    // 3000 bytes, stored out of line uncompressed (STORAGE EXTERNAL).
    "INSERT INTO big VALUES (1, 'first', repeat('decant', 500))",
    "UPDATE big SET note = 'second' WHERE id = 1",
    "UPDATE kinds SET t = NULL, n = n * 2, ia = ia || 4 WHERE id = 1",
    "UPDATE kinds SET id = 3 WHERE id = 2",
    "DELETE FROM kinds WHERE id = 3",
    "INSERT INTO full_rows VALUES (1, 'one'), (2, 'two')",
    "UPDATE full_rows SET b = 'uno' WHERE a = 1",
    "DELETE FROM full_rows WHERE a = 2",
    "BEGIN; SELECT pg_logical_emit_message(true, 'app', 'in a transaction'); INSERT INTO full_rows VALUES (3, NULL); COMMIT",
    "TRUNCATE kinds, full_rows",
    "DELETE FROM big",
];

/// The records a workload decodes to, each as text, with what legitimately
/// differs between servers taken out: LSNs, xids and commit times become 0,
/// relation OIDs become their order of first appearance.
fn decoded(major: Option<u32>) -> Vec<String> {
    let cluster = server(major);
    let mut client = cluster.connect();
    prepare_source(&mut client, "s");
    for sql in WORKLOAD {
        client.batch_execute(sql).unwrap_or_else(|e| panic!("PostgreSQL {major:?}: {sql}: {e}"));
    }
    let messages = get_changes(&mut client, "s", &[]).expect("read slot");
    let mut relations: HashMap<u32, u32> = HashMap::new();
    let mut rel = |oid: &mut u32| {
        let next = u32::try_from(relations.len()).expect("few relations");
        *oid = *relations.entry(*oid).or_insert(next);
    };
    decode_all(&messages)
        .into_iter()
        .map(|mut r| {
            match &mut r {
                Record::Begin(b) => (b.xid, b.final_lsn, b.commit_time) = (0, Lsn(0), 0),
                Record::Commit(c) => (c.end_lsn, c.commit_time) = (Lsn(0), 0),
                Record::Relation(x) => rel(&mut x.oid),
                Record::Insert(x) => rel(&mut x.relation),
                Record::Update(x) => rel(&mut x.relation),
                Record::Delete(x) => rel(&mut x.relation),
                Record::Truncate(x) => x.relations.iter_mut().for_each(&mut rel),
                Record::Message(m) => m.lsn = Lsn(0),
            }
            format!("{r:?}")
        })
        .collect()
}

#[test]
fn the_same_workload_decodes_to_the_same_records_on_every_major() {
    let reference = decoded(None);
    // The workload's shape, so that "equal" cannot mean "both empty".
    let kinds: Vec<&str> = reference.iter().map(|r| r.split('(').next().unwrap_or("")).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "Begin").count(), 12, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "Truncate").count(), 1, "{kinds:?}");
    assert!(reference.iter().any(|r| r.contains("UnchangedToast")), "no unchanged TOASTed value: {kinds:?}");
    assert!(reference.iter().any(|r| r.starts_with("Update") && r.contains("old: Some(Row(")), "no full old row: {kinds:?}");
    assert!(reference.iter().any(|r| r.starts_with("Message") && r.contains("transactional: true")), "no message: {kinds:?}");
    for major in majors() {
        let records = decoded(Some(major));
        for (i, (got, want)) in records.iter().zip(&reference).enumerate() {
            assert_eq!(got, want, "PostgreSQL {major}: record {i} differs from PostgreSQL 15's");
        }
        assert_eq!(records.len(), reference.len(), "PostgreSQL {major}: record count differs from PostgreSQL 15's");
    }
}

/// The extension's SQL, DDL capture included, installs on every major, and
/// the capture announces a DDL statement through the plugin.
#[test]
fn the_extension_installs_and_captures_ddl_on_every_major() {
    for major in std::iter::once(None).chain(majors().into_iter().map(Some)) {
        let cluster = server(major);
        let mut client = cluster.connect();
        client.batch_execute(TEXT_SETTINGS).expect("settings");
        client.batch_execute("CREATE EXTENSION decant").unwrap_or_else(|e| panic!("PostgreSQL {major:?}: CREATE EXTENSION decant: {e}"));
        client.query("SELECT pg_create_logical_replication_slot('s', 'decant')", &[]).expect("create slot");
        client.batch_execute("CREATE TABLE captured (id int PRIMARY KEY, v text)").expect("CREATE TABLE");
        let messages = get_changes(&mut client, "s", &[]).expect("read slot");
        let ddl: Vec<String> = decode_all(&messages)
            .into_iter()
            .filter_map(|r| match r {
                Record::Message(m) if m.prefix == b"decant.ddl" => Some(String::from_utf8_lossy(m.content).into_owned()),
                _ => None,
            })
            .collect();
        assert!(
            ddl.iter().any(|c| c.contains("CREATE TABLE captured")),
            "PostgreSQL {major:?}: no decant.ddl message with the CREATE TABLE: {ddl:?}"
        );
    }
}
