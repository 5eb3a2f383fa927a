//! The split full copy on a source older than PostgreSQL 14 (no TID range
//! scan): tables split by ranges of their key, on a real server of the
//! oldest major below 14 in `DECANT_PG_VERSIONS` (installed by
//! `scripts/pg.sh`), migrated (schema + full) into the system server.
//!
//! Passes when: `decant verify` says every table is equal; the tables with
//! a usable key stored in heap order were copied in several key ranges
//! (integer, text with quotes and backslashes, two-column and unique
//! non-primary keys, a table under a `migrate.map` row filter), recorded
//! with their key in the destination's progress tables; a keyless table
//! and one whose key is shuffled against the heap were copied whole, each
//! with a log line saying why; and a copy killed (-9) between its ranges
//! resumes with the same stored ranges to an equal destination.

use std::time::Duration;

use decant_tests::process::wait_for;
use decant_tests::task::Task;
use decant_tests::versions::pg_versions;
use decant_tests::Cluster;

/// Every table is a few MB; with `split_tables_larger_than_mb = 1` each is
/// planned as several ranges. Rows are inserted in key order (what a
/// table filled by a sequence or loaded sorted looks like), except in
/// `shuffled`.
const TABLES_SQL: &str = "
    CREATE TABLE ints (id int PRIMARY KEY, v text);
    INSERT INTO ints SELECT i, repeat(md5(i::text), 3) FROM generate_series(1, 40000) i;
    CREATE TABLE texts (k text PRIMARY KEY, v text);
    INSERT INTO texts SELECT k, repeat(md5(k), 3) FROM (SELECT format(E'it''s\\\\%s', md5(i::text)) AS k FROM generate_series(1, 30000) i) s ORDER BY k;
    CREATE TABLE pairs (a int, b text, v text, PRIMARY KEY (a, b));
    INSERT INTO pairs SELECT i / 100, md5(i::text), repeat(md5(i::text), 3) FROM generate_series(1, 30000) i ORDER BY 1, 2;
    CREATE TABLE uniq (code text NOT NULL UNIQUE, v text);
    INSERT INTO uniq SELECT lpad(i::text, 8, '0'), repeat(md5(i::text), 3) FROM generate_series(1, 30000) i;
    CREATE TABLE filtered (id bigint PRIMARY KEY, tenant int, v text);
    INSERT INTO filtered SELECT i, i % 5, repeat(md5(i::text), 3) FROM generate_series(1, 40000) i;
    CREATE TABLE nokey (id int, v text);
    INSERT INTO nokey SELECT i, repeat(md5(i::text), 3) FROM generate_series(1, 30000) i;
    CREATE TABLE shuffled (id int PRIMARY KEY, v text);
    INSERT INTO shuffled SELECT i, repeat(md5(i::text), 3) FROM generate_series(1, 30000) i ORDER BY random();
";

/// A stored range: range_id, key_from, key_to, done.
type Range = (i32, Option<Vec<String>>, Option<Vec<String>>, bool);

/// The oldest major below 14 in the matrix, if any.
fn old_major() -> Option<u32> {
    let major = pg_versions().into_iter().filter(|&m| m < 14).min();
    if major.is_none() {
        eprintln!("key_ranges: no major below 14 in DECANT_PG_VERSIONS; nothing to check");
    }
    major
}

fn task(major: u32, id: &str, migrate: &str) -> Task {
    let t = Task::builder(env!("CARGO_BIN_EXE_decant"), id)
        .source(Cluster::start_version(major))
        .set("retry.other_minutes", "1")
        .migrate(migrate)
        .build();
    let version: i32 = t.src().query_one("SELECT current_setting('server_version_num')::int", &[]).unwrap().get(0);
    assert_eq!(version / 10000, i32::try_from(major).unwrap(), "the source runs {version}");
    t
}

/// Per copied table: its number of ranges and its key columns, as the
/// destination's progress tables hold them.
fn plan(t: &Task) -> Vec<(String, i64, Vec<String>)> {
    t.dst()
        .query(
            "SELECT c.name, count(*), c.key_columns FROM decant.copy_table c JOIN decant.copy_range r USING (task_id, table_id)
              WHERE task_id = $1 GROUP BY c.name, c.key_columns ORDER BY 1",
            &[&t.id],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[test]
fn tables_of_an_old_source_are_copied_in_key_ranges() {
    let Some(major) = old_major() else { return };
    let t = task(
        major,
        "keys",
        "types = [\"schema\", \"full\"]\nsplit_tables_larger_than_mb = 1\nmap = [{ table = \"public.filtered\", where = \"tenant <> 3\" }]",
    );
    t.src().batch_execute(TABLES_SQL).unwrap();
    let mut m = t.migrate("migrate.log");
    assert_eq!(m.wait_exit(Duration::from_secs(240)), Some(0), "{}", m.log());
    t.assert_equal();
    let log = m.log();
    let plan = plan(&t);
    let of = |name: &str| plan.iter().find(|p| p.0 == name).unwrap_or_else(|| panic!("{name} not planned: {plan:?}")).clone();
    let cols = |c: &[&str]| c.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    for (name, key) in [
        ("ints", cols(&["id"])),
        ("texts", cols(&["k"])),
        ("pairs", cols(&["a", "b"])),
        ("uniq", cols(&["code"])),
        ("filtered", cols(&["id"])),
    ] {
        let (_, ranges, key_columns) = of(name);
        assert!(ranges > 1, "{name} was not split: {plan:?}\n{log}");
        assert_eq!(key_columns, key, "{name}");
    }
    for name in ["nokey", "shuffled"] {
        assert_eq!(of(name).1, 1, "{name} was split: {plan:?}");
        assert!(of(name).2.is_empty());
        assert!(log.contains(&format!("table=public.{name}")) && log.contains("copied whole"), "no log line for {name}:\n{log}");
    }
    assert!(log.contains("its rows are not stored in the order of its key"), "{log}");
    assert!(log.contains("no primary key or unique index"), "{log}");
    // The filter held in every range: no row of tenant 3, all the others.
    let counts = |c: &mut postgres::Client, filter: &str| -> i64 {
        c.query_one(&format!("SELECT count(*) FROM filtered WHERE {filter}"), &[]).unwrap().get(0)
    };
    assert_eq!(counts(&mut t.dst(), "tenant = 3"), 0);
    assert_eq!(counts(&mut t.dst(), "true"), counts(&mut t.src(), "tenant <> 3"));
    assert_eq!(counts(&mut t.dst(), "true"), 32000);
}

#[test]
fn a_copy_killed_between_key_ranges_resumes_the_same_ranges_to_an_equal_destination() {
    let Some(major) = old_major() else { return };
    // Throttled, so that the kill lands between ranges.
    let t = task(major, "keyskill", "types = [\"schema\", \"full\"]\nsplit_tables_larger_than_mb = 1\nmax_mb_per_second = 2");
    t.src()
        .batch_execute(
            "CREATE TABLE big (id int PRIMARY KEY, v text);
             INSERT INTO big SELECT i, repeat(md5(i::text), 3) FROM generate_series(1, 80000) i;",
        )
        .unwrap();
    let mut m = t.migrate("migrate1.log");
    let mut dest = t.dest.connect();
    let ranges = |c: &mut postgres::Client| -> Vec<Range> {
        c.query("SELECT range_id, key_from, key_to, done_at IS NOT NULL FROM decant.copy_range WHERE task_id = 'keyskill' ORDER BY 1", &[])
            .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect())
            .unwrap_or_default()
    };
    wait_for("part of the copy", Duration::from_secs(120), || {
        let r = ranges(&mut dest);
        let done = r.iter().filter(|r| r.3).count();
        done >= 1 && done + 2 < r.len()
    });
    m.kill9();
    let before = ranges(&mut dest);
    assert!(before.len() > 3 && before.iter().all(|r| r.1.is_some() || r.2.is_some()), "{before:?}");
    let mut m = t.migrate("migrate2.log");
    assert_eq!(m.wait_exit(Duration::from_secs(240)), Some(0), "{}", m.log());
    assert!(m.log().contains("copy resumes from a new snapshot"), "{}", m.log());
    let after = ranges(&mut dest);
    let bounds = |r: &[Range]| r.iter().map(|r| (r.0, r.1.clone(), r.2.clone())).collect::<Vec<_>>();
    assert_eq!(bounds(&after), bounds(&before), "the resumed copy ran other ranges");
    assert!(after.iter().all(|r| r.3));
    t.assert_equal();
    let n: i64 = t.dst().query_one("SELECT count(*) FROM big", &[]).unwrap().get(0);
    assert_eq!(n, 80000);
}
