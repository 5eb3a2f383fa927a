use decant_proto::{OldTuple, Tuple};

use super::super::statements::test_target;
use super::*;

fn target(key: Vec<usize>) -> Target {
    test_target(["id", "a", "b"], key)
}

#[test]
fn values_are_sent_as_text_or_raw_bytea() {
    let batch = Bytes::from_static(b"xxhello");
    let p = params(&[Value::Null, Value::UnchangedToast, Value::Text(&batch[2..]), Value::Int(-5), Value::Bytes(b"\0\x01")], &batch);
    assert!(p[0].is_none() && p[1].is_none());
    let text = p[2].as_ref().unwrap();
    assert_eq!((text.bytes.as_ref(), text.binary), (&b"hello"[..], false));
    // A slice of the batch, not a copy.
    assert_eq!(text.bytes.as_ptr(), batch[2..].as_ptr());
    let int = p[3].as_ref().unwrap();
    assert_eq!((int.bytes.as_ref(), int.binary), (&b"-5"[..], false));
    let bytea = p[4].as_ref().unwrap();
    assert_eq!((bytea.bytes.as_ref(), bytea.binary), (&b"\0\x01"[..], true));
    assert!(matches!(bytea.encode_format(&Type::BYTEA), Format::Binary));
    assert!(matches!(int.encode_format(&Type::INT4), Format::Text));
}

#[test]
fn an_update_sets_what_changed() {
    let t = target(vec![0]);
    let new = Tuple(vec![Value::Int(1), Value::UnchangedToast, Value::Text(b"b")]);
    // The key did not change: it stays out of SET, as do unchanged TOAST values.
    let same_key = Update { relation: 7, old: None, new: new.clone() };
    assert_eq!(update_set(&t, &same_key), [2]);
    // The key changed: it is set.
    let moved = Update { relation: 7, old: Some(OldTuple::Key(Tuple(vec![Value::Int(2)]))), new };
    assert_eq!(update_set(&t, &moved), [0, 2]);
    // Only key columns, unchanged: nothing to set.
    let key_only = Update { relation: 7, old: None, new: Tuple(vec![Value::Int(1), Value::UnchangedToast, Value::UnchangedToast]) };
    assert!(update_set(&t, &key_only).is_empty());
    // No key: every column carried.
    assert_eq!(update_set(&target(vec![]), &key_only), [0]);
}

#[test]
fn referenced_tables_are_emptied_by_delete() {
    let tables = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
    assert_eq!(truncate_sql(&tables, vec![false, true, false], true), "TRUNCATE ONLY a, c RESTART IDENTITY;DELETE FROM ONLY b;");
    assert_eq!(truncate_sql(&tables, vec![false; 3], false), "TRUNCATE ONLY a, b, c;");
    assert_eq!(truncate_sql(&tables, vec![true; 3], true), "DELETE FROM ONLY a;DELETE FROM ONLY b;DELETE FROM ONLY c;");
}

fn in_flight(rows: u64, expects_row: bool) -> InFlight {
    InFlight {
        future: Box::pin(std::future::ready(Ok::<_, tokio_postgres::Error>(rows))),
        op: "UPDATE",
        table: "public.t".into(),
        expects_row,
    }
}

#[tokio::test]
async fn a_missing_row_stops_or_is_counted_by_policy() {
    let metrics = Metrics::default();
    // Zero rows where none was expected (a plain INSERT): nothing missing.
    let mut pipeline: VecDeque<InFlight> = [in_flight(0, false), in_flight(1, true)].into();
    drain(&mut pipeline, 0, ConflictPolicy::Stop, &metrics).await.unwrap();
    assert_eq!(metrics.missing_rows.get(), 0);
    // Overwrite: counted, and the rest collected.
    let mut pipeline: VecDeque<InFlight> = [in_flight(0, true), in_flight(1, true), in_flight(0, true)].into();
    drain(&mut pipeline, 0, ConflictPolicy::Overwrite, &metrics).await.unwrap();
    assert_eq!((metrics.missing_rows.get(), pipeline.len()), (2, 0));
    // Stop: the first missing row ends the apply, with what it was.
    let mut pipeline: VecDeque<InFlight> = [in_flight(1, true), in_flight(0, true), in_flight(1, true)].into();
    match drain(&mut pipeline, 0, ConflictPolicy::Stop, &metrics).await {
        Err(ApplyError::MissingRow { op: "UPDATE", table }) => assert_eq!(table, "public.t"),
        other => panic!("{other:?}"),
    }
    assert_eq!((metrics.missing_rows.get(), pipeline.len()), (2, 1));
}

#[tokio::test]
async fn draining_keeps_the_newest_in_flight() {
    let metrics = Metrics::default();
    let mut pipeline: VecDeque<InFlight> = (0..5).map(|_| in_flight(0, true)).collect();
    drain(&mut pipeline, 3, ConflictPolicy::Overwrite, &metrics).await.unwrap();
    assert_eq!((pipeline.len(), metrics.missing_rows.get()), (3, 2));
    // Nothing to collect below the depth.
    drain(&mut pipeline, 3, ConflictPolicy::Stop, &metrics).await.unwrap();
    assert_eq!(pipeline.len(), 3);
}
