use super::super::cells::{BinaryType, Cell};
use super::super::statements::test_target;
use super::*;

fn t(s: &str) -> Text {
    Some(Cell::copy_from(s.as_bytes()))
}

fn target() -> Target {
    test_target(["id", "a", "big"], vec![0])
}

#[test]
fn parts_are_key_ranges_holding_every_key_once() {
    let mut b = Buffer::with_capacity(4);
    for i in 0..5 {
        b.insert(vec![t(&i.to_string())], vec![t(&i.to_string()), t("a"), t("x")]);
    }
    b.delete(vec![t("9")]);
    let parts = staging_data(b, &target(), 2);
    assert_eq!(parts.len(), 2);
    let mut keys: Vec<String> = Vec::new();
    for (data, counts) in &parts {
        let text = String::from_utf8(data.to_vec()).unwrap();
        assert_eq!(text.lines().count() as u64, counts.rows());
        keys.extend(text.lines().map(|l| l.split('\t').next().unwrap().to_owned()));
    }
    // Ranges of keys: the first part's keys all sort before the second's.
    assert!(keys[..3].iter().max() < keys[3..].iter().min(), "{keys:?}");
    keys.sort();
    assert_eq!(keys, ["0", "1", "2", "3", "4", "9"]);
    assert_eq!(parts.iter().map(|(_, c)| c.inserts).sum::<usize>(), 5);
    assert_eq!(parts.iter().map(|(_, c)| c.deletes).sum::<usize>(), 1);
    assert!(parts.iter().all(|(_, c)| c.rows() == 3));
}

#[test]
fn counts_tell_which_statements_run() {
    let mut b = Buffer::default();
    b.insert(vec![t("1")], vec![t("1"), t("a"), t("x")]);
    b.update(None, vec![t("2")], vec![t("2"), t("b"), None], vec![false, false, true]).unwrap();
    b.delete(vec![t("3")]);
    b.insert(vec![t("4")], vec![t("4"), t("a"), t("x")]);
    b.delete(vec![t("4")]);
    let [(_, c)]: [_; 1] = staging_data(b, &target(), 1).try_into().unwrap();
    assert_eq!((c.inserts, c.updates, c.deletes, c.deletes_counted, c.keeps_values), (1, 1, 2, 1, true));
    assert_eq!(c.rows(), 4);
}

#[test]
fn binary_staging_rows() {
    let mut t = target();
    t.cells = Cells::Binary(vec![BinaryType::Int4, BinaryType::Text, BinaryType::Text]);
    let c = |v: &[u8]| Some(Cell::copy_from(v));
    let mut b = Buffer::default();
    b.update(None, vec![c(&[0, 0, 0, 2])], vec![c(&[0, 0, 0, 2]), c(b"c"), None], vec![false, false, true]).unwrap();
    let [(data, counts)]: [_; 1] = staging_data(b, &t, 1).try_into().unwrap();
    assert_eq!(counts.updates, 1);
    let mut want = BINARY_HEADER.to_vec();
    want.extend_from_slice(&[0, 5]); // fields: three columns, op, kept
    want.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 2]);
    want.extend_from_slice(&[0, 0, 0, 1, b'c']);
    want.extend_from_slice(&[0xff; 4]); // the unchanged value: NULL, kept
    want.extend_from_slice(&[0, 0, 0, 1, b'u']);
    want.extend_from_slice(&[0, 0, 0, 26, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 21, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 3]);
    want.extend_from_slice(BINARY_TRAILER);
    assert_eq!(data.as_ref(), want);
}

#[test]
fn statements() {
    let s = StageSql::new(&target(), 1, false, false);
    assert!(s.update_keeping.as_ref().unwrap().contains("\"a\" = CASE WHEN 2 = ANY (s.decant_keep) THEN t.\"a\" ELSE s.\"a\" END"));
    assert!(s.update.as_ref().unwrap().contains("SET \"a\" = s.\"a\", \"big\" = s.\"big\" FROM"));
    assert!(s.insert.ends_with("ON CONFLICT (\"id\") DO UPDATE SET \"a\" = EXCLUDED.\"a\", \"big\" = EXCLUDED.\"big\""));
    assert!(s.delete.contains("t.\"id\" = s.\"id\""));
    assert!(s.delete.contains("decant_op IN ('D', 'd')"));
    assert_eq!(s.stage, "\"decant_stage_7_1\"");
    assert_eq!(s.copy(&Cells::Text), "COPY \"decant_stage_7_1\" (\"id\", \"a\", \"big\", decant_op, decant_keep) FROM STDIN");
    assert!(s.copy(&Cells::Binary(vec![BinaryType::Int4])).ends_with(BINARY_COPY_OPTIONS));
}

#[test]
fn rules_rule_out_on_conflict_and_key_only_tables_update_nothing() {
    // INSERT or UPDATE rules: existing keys updated, then only missing ones inserted.
    let s = StageSql::new(&target(), 2, true, false);
    assert!(!s.insert.contains("ON CONFLICT"));
    assert!(s.insert.starts_with("UPDATE \"public\".\"t\" t SET"));
    assert!(s.insert.contains("NOT EXISTS (SELECT FROM \"public\".\"t\" t WHERE t.\"id\" = s.\"id\")"));
    // Every column in the key: nothing to update, a conflict does nothing.
    let all_key = Target { key: vec![0, 1, 2], ..target() };
    let s = StageSql::new(&all_key, 3, false, false);
    assert!(s.update.is_none() && s.update_keeping.is_none());
    assert!(s.insert.ends_with("ON CONFLICT (\"id\", \"a\", \"big\") DO NOTHING"));
}

#[test]
fn a_staging_table_is_truncated_once_enough_was_staged_on_that_connection() {
    let s = StageSql::new(&target(), 1, false, true);
    let delete = "DELETE FROM \"decant_stage_7_1\"";
    let truncate = "TRUNCATE \"decant_stage_7_1\"";
    assert_eq!(s.empty(Conn::Main, STAGE_TRUNCATE_BYTES - 2), delete);
    // Each connection has its own temporary table and count.
    assert_eq!(s.empty(Conn::Second, STAGE_TRUNCATE_BYTES - 1), delete);
    assert_eq!(s.empty(Conn::Main, 2), truncate);
    // Counted afresh after a TRUNCATE.
    assert_eq!(s.empty(Conn::Main, 1), delete);
    assert_eq!(s.empty(Conn::Second, 1), truncate);
    // And after the table is created again.
    assert_eq!(s.empty(Conn::Main, STAGE_TRUNCATE_BYTES - 2), delete);
    s.created(Conn::Main);
    assert_eq!(s.empty(Conn::Main, 2), delete);
}
