use decant_proto::ReplicaIdentity;

use super::super::cells::BinaryType;
use super::super::stage::staging_data;
use super::super::statements::test_target;
use super::*;

fn t(s: &str) -> Text {
    Some(Cell::copy_from(s.as_bytes()))
}

fn target() -> Target {
    test_target(["id", "a", "big"], vec![0])
}

fn keyless() -> Target {
    Target { oid: 8, key: vec![], identity: ReplicaIdentity::Full, ..target() }
}

/// The staging rows of `b`, sorted.
fn lines(b: Buffer) -> Vec<String> {
    let [(data, _)]: [_; 1] = staging_data(b, &target(), 1).try_into().unwrap();
    let mut l: Vec<String> = String::from_utf8(data.to_vec()).unwrap().lines().map(str::to_owned).collect();
    l.sort();
    l
}

/// The staging rows of what `f` holds for the test table.
fn held(f: &mut Folding) -> Vec<String> {
    let (appends, buffer) = f.take(target().oid);
    assert!(appends.is_none());
    buffer.map(lines).unwrap_or_default()
}

fn row<'a>(values: &[&'a str]) -> Tuple<'a> {
    Tuple(values.iter().map(|v| if *v == "TOAST" { Value::UnchangedToast } else { Value::Text(v.as_bytes()) }).collect())
}

fn update<'a>(old: Option<OldTuple<'a>>, new: &[&'a str]) -> Update<'a> {
    Update { relation: 7, old, new: row(new) }
}

#[test]
fn folds_to_the_net_effect() {
    let mut b = Buffer::default();
    b.insert(vec![t("1")], vec![t("1"), t("a"), t("x")]);
    b.update(None, vec![t("1")], vec![t("1"), t("b"), None], vec![false, false, true]).unwrap();
    b.update(None, vec![t("2")], vec![t("2"), t("c"), None], vec![false, false, true]).unwrap();
    b.delete(vec![t("3")]);
    b.insert(vec![t("4")], vec![t("4"), t("tab\there"), t("back\\slash")]);
    b.delete(vec![t("4")]);
    assert_eq!(
        lines(b),
        [
            "1\tb\tx\ti\t\\N",     // insert then update: the new image, TOAST value carried over
            "2\tc\t\\N\tu\t{3}",   // update of a row only on the destination: keep column 3
            "3\t\\N\t\\N\tD\t\\N", // a delete that expects the row
            "4\t\\N\t\\N\td\t\\N", // inserted then deleted: nothing to count
        ]
    );
}

#[test]
fn key_changes_and_what_cannot_fold() {
    let mut b = Buffer::default();
    b.update(Some(vec![t("1")]), vec![t("9")], vec![t("9"), t("a"), t("x")], vec![false; 3]).unwrap();
    assert!(b.update(Some(vec![t("5")]), vec![t("6")], vec![t("6"), t("a"), None], vec![false, false, true]).is_err());
    b.delete(vec![t("7")]);
    assert!(b.update(None, vec![t("7")], vec![t("7"), t("a"), t("x")], vec![false; 3]).is_err());
    // The key change is a delete plus an insert; what could not fold left nothing.
    assert_eq!(lines(b), ["1\t\\N\t\\N\tD\t\\N", "7\t\\N\t\\N\tD\t\\N", "9\ta\tx\ti\t\\N"]);
}

#[test]
fn unchanged_toast_is_carried_through_successive_updates() {
    let mut b = Buffer::default();
    // Two updates of a row only on the destination, neither touching `big`:
    // it stays the destination's.
    b.update(None, vec![t("1")], vec![t("1"), t("a"), None], vec![false, false, true]).unwrap();
    b.update(None, vec![t("1")], vec![t("1"), t("b"), None], vec![false, false, true]).unwrap();
    // The first update sets `big`, the second leaves it: the first's value.
    b.update(None, vec![t("2")], vec![t("2"), t("a"), t("y")], vec![]).unwrap();
    b.update(None, vec![t("2")], vec![t("2"), t("b"), None], vec![false, false, true]).unwrap();
    // An inserted row whose key then changes takes its values along.
    b.insert(vec![t("3")], vec![t("3"), t("a"), t("z")]);
    b.update(Some(vec![t("3")]), vec![t("4")], vec![t("4"), t("b"), None], vec![false, false, true]).unwrap();
    assert_eq!(
        lines(b),
        [
            "1\tb\t\\N\tu\t{3}",
            "2\tb\ty\tu\t\\N",
            "3\t\\N\t\\N\td\t\\N", // inserted in these changes: its deletion is not counted
            "4\tb\tz\ti\t\\N",
        ]
    );
}

#[test]
fn a_first_appended_row_that_does_not_fit_leaves_an_empty_binary_copy() {
    let cells = Cells::Binary(vec![BinaryType::Int4]);
    let mut out = BytesMut::new();
    let mut scratch = BytesMut::new();
    assert_eq!(append_row(&mut out, &cells, &[Value::Text(b"1")], &mut scratch), Err(Mismatch));
    finish_appends(&mut out, &cells);
    // Header and trailer: a COPY of no rows, which PostgreSQL accepts.
    assert_eq!(out.as_ref(), [BINARY_HEADER, BINARY_TRAILER].concat());
}

#[test]
fn which_tables_fold() {
    assert!(folds(&target(), ConflictPolicy::Overwrite));
    // The stop policy reports the first offending row: row by row.
    assert!(!folds(&target(), ConflictPolicy::Stop));
    // No key: nothing to fold by.
    assert!(!folds(&keyless(), ConflictPolicy::Overwrite));
    // A unique index besides the key: source order.
    assert!(!folds(&Target { source_order: true, ..target() }, ConflictPolicy::Overwrite));
}

#[test]
fn records_fold_per_key() {
    let (batch, mut scratch) = (Bytes::new(), BytesMut::new());
    let mut f = Folding::new(ConflictPolicy::Overwrite);
    let tg = target();
    assert_eq!(f.fold_insert(&tg, &row(&["1", "a", "x"]), &batch, &mut scratch), Ok(true));
    assert_eq!(f.fold_update(&tg, &update(None, &["1", "b", "TOAST"]), &batch, &mut scratch), Ok(true));
    // The key changes from 2 to 3 (the old key logged).
    let moved = update(Some(OldTuple::Key(row(&["2"]))), &["3", "c", "w"]);
    assert_eq!(f.fold_update(&tg, &moved, &batch, &mut scratch), Ok(true));
    // REPLICA IDENTITY FULL: the key is taken from the old row.
    assert_eq!(f.fold_delete(&tg, Some(&OldTuple::Row(row(&["5", "a", "x"]))), &batch, &mut scratch), Ok(true));
    // REPLICA IDENTITY NOTHING: the delete does not say which row.
    assert_eq!(f.fold_delete(&tg, None, &batch, &mut scratch), Ok(false));
    // A NULL key cannot serve as one.
    let null_key = Tuple(vec![Value::Null, Value::Text(b"a"), Value::Text(b"x")]);
    assert_eq!(f.fold_insert(&tg, &null_key, &batch, &mut scratch), Ok(false));
    // An update of a row deleted in these changes is applied row by row.
    assert_eq!(f.fold_update(&tg, &update(None, &["5", "b", "y"]), &batch, &mut scratch), Ok(false));
    assert!(f.bytes() > 0);
    assert_eq!(f.tables(), [7]);
    assert_eq!(held(&mut f), ["1\tb\tx\ti\t\\N", "2\t\\N\t\\N\tD\t\\N", "3\tc\tw\ti\t\\N", "5\t\\N\t\\N\tD\t\\N"]);
    // Taking a table's changes releases their memory.
    assert_eq!(f.bytes(), 0);
    assert!(f.tables().is_empty());
}

#[test]
fn the_stop_policy_folds_nothing_but_appends() {
    let (batch, mut scratch) = (Bytes::new(), BytesMut::new());
    let mut f = Folding::new(ConflictPolicy::Stop);
    assert_eq!(f.fold_insert(&target(), &row(&["1", "a", "x"]), &batch, &mut scratch), Ok(false));
    assert_eq!(f.fold_update(&target(), &update(None, &["1", "b", "x"]), &batch, &mut scratch), Ok(false));
    assert_eq!(f.fold_delete(&target(), Some(&OldTuple::Key(row(&["1"]))), &batch, &mut scratch), Ok(false));
    assert_eq!((f.bytes(), f.tables()), (0, vec![]));
    // INSERTs into a table without a key are copied in, whatever the policy.
    let kl = keyless();
    assert_eq!(f.fold_insert(&kl, &row(&["1", "tab\there", "x"]), &batch, &mut scratch), Ok(true));
    assert_eq!(f.fold_insert(&kl, &Tuple(vec![Value::Int(2), Value::Null, Value::Text(b"y")]), &batch, &mut scratch), Ok(true));
    assert_eq!(f.bytes(), "1\ttab\\there\tx\n2\t\\N\ty\n".len());
    // Their UPDATEs and DELETEs never fold.
    assert_eq!(f.fold_delete(&kl, Some(&OldTuple::Row(row(&["1", "a", "x"]))), &batch, &mut scratch), Ok(false));
    let (appends, buffer) = f.take(kl.oid);
    assert!(buffer.is_none());
    let appends = appends.unwrap();
    assert_eq!(appends.rows, 2);
    assert_eq!(appends.finish(&Cells::Text).as_ref(), b"1\ttab\\there\tx\n2\t\\N\ty\n");
    assert_eq!(f.bytes(), 0);
}

#[test]
fn a_value_that_does_not_fit_its_binary_column_folds_nothing() {
    let (batch, mut scratch) = (Bytes::new(), BytesMut::new());
    let mut f = Folding::new(ConflictPolicy::Overwrite);
    let binary = Cells::Binary(vec![BinaryType::Int4, BinaryType::Text, BinaryType::Text]);
    let tg = Target { cells: binary.clone(), ..target() };
    assert_eq!(f.fold_insert(&tg, &row(&["1", "a", "x"]), &batch, &mut scratch), Err(Mismatch));
    assert_eq!((f.bytes(), f.tables()), (0, vec![]));
    // A table without a key keeps an (empty) entry: merging it copies no
    // rows before the table turns to text.
    let kl = Target { cells: binary, ..keyless() };
    assert_eq!(f.fold_insert(&kl, &row(&["1", "a", "x"]), &batch, &mut scratch), Err(Mismatch));
    assert_eq!(f.tables(), [kl.oid]);
    // The binary header it holds is counted, and released when taken.
    assert_eq!(f.bytes(), BINARY_HEADER.len());
    let (appends, _) = f.take(kl.oid);
    assert_eq!(appends.map(|a| a.rows), Some(0));
    assert_eq!(f.bytes(), 0);
}

#[test]
fn folded_memory_is_counted_and_released() {
    let mut scratch = BytesMut::new();
    let mut f = Folding::new(ConflictPolicy::Overwrite);
    let tg = target();
    let big = Bytes::from(vec![b'v'; 1 << 20]);
    let mut n = 0;
    while !f.is_large() {
        let key = n.to_string();
        let new = Tuple(vec![Value::Text(key.as_bytes()), Value::Text(b"a"), Value::Text(&big)]);
        assert_eq!(f.fold_insert(&tg, &new, &big, &mut scratch), Ok(true));
        n += 1;
    }
    // Large: a merge inside the transaction, only past the group bound.
    assert!(f.bytes() >= BULK_FLUSH_BYTES);
    assert_eq!(n, BULK_FLUSH_BYTES / (1 << 20));
    // An update of an existing key adds its new image.
    let before = f.bytes();
    assert_eq!(f.fold_update(&tg, &update(None, &["0", "b", "c"]), &big, &mut scratch), Ok(true));
    assert!(f.bytes() > before);
    let (appends, buffers) = f.take_all();
    assert!(appends.is_empty());
    assert_eq!(buffers[&7].len(), n);
    assert_eq!(f.bytes(), 0);
    assert!(!f.is_large());
    // Clearing (a rolled-back group) drops it all.
    assert_eq!(f.fold_delete(&tg, Some(&OldTuple::Key(row(&["1"]))), &big, &mut scratch), Ok(true));
    f.clear();
    assert_eq!((f.bytes(), f.tables()), (0, vec![]));
}
