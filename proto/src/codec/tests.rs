use super::*;
use proptest::prelude::*;

fn samples() -> Vec<Record<'static>> {
    let tuple = Tuple(vec![
        Value::Null,
        Value::UnchangedToast,
        Value::Text("grüße".as_bytes()),
        Value::PaddedText(b"ab", 82),
        Value::Int(-1),
        Value::Int(i64::MIN),
        Value::Bool(true),
        Value::Bool(false),
        Value::Bytes(&[0, 10, 255]),
        Value::Float4(f32::NAN.to_bits()),
        Value::Float8((-0.0f64).to_bits()),
        Value::Date(i32::MIN),
        Value::Time(86_400_000_000),
        Value::Timestamp(i64::MAX),
        Value::TimestampTz(-5),
        Value::Uuid([7; 16]),
        Value::Numeric(&[0x12, 0xA5]),
    ]);
    vec![
        Record::Begin(Begin { xid: 735, final_lsn: Lsn(0x1_6B3_F28), commit_time: 850_000_000_000_000 }),
        Record::Commit(Commit { end_lsn: Lsn(u64::MAX), commit_time: -1 }),
        Record::Relation(Relation {
            oid: 16385,
            namespace: b"public",
            name: b"t",
            replica_identity: ReplicaIdentity::Index,
            columns: vec![
                Column { name: b"id", type_oid: 23, typmod: -1, type_name: b"integer", flags: ColumnFlags(3) },
                Column { name: b"v", type_oid: 1043, typmod: 14, type_name: b"character varying(10)", flags: ColumnFlags(0) },
            ],
        }),
        Record::Insert(Insert { relation: 16385, new: tuple.clone() }),
        Record::Update(Update { relation: 1, old: None, new: tuple.clone() }),
        Record::Update(Update { relation: 1, old: Some(OldTuple::Key(Tuple(vec![Value::Int(3)]))), new: tuple.clone() }),
        Record::Delete(Delete { relation: 2, old: Some(OldTuple::Row(tuple)) }),
        Record::Delete(Delete { relation: 2, old: None }),
        Record::Truncate(Truncate { relations: vec![1, 2, u32::MAX], cascade: true, restart_identity: false }),
        Record::Message(Message { transactional: false, lsn: Lsn(42), prefix: b"decant.heartbeat", content: b"\n\0" }),
    ]
}

#[test]
fn every_record_kind_round_trips() {
    for rec in samples() {
        let mut buf = Vec::new();
        encode(&rec, &mut buf);
        assert_eq!(buf.len(), encoded_len(&rec));
        assert_eq!(frame_len(&buf), Ok(Some(buf.len())));
        let (back, used) = decode(&buf).unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(back, rec);
    }
}

#[test]
fn concatenated_frames_decode_one_by_one() {
    let mut buf = Vec::new();
    for rec in samples() {
        encode(&rec, &mut buf);
    }
    let mut at = 0;
    let mut n = 0;
    while at < buf.len() {
        let (_, used) = decode(&buf[at..]).unwrap();
        at += used;
        n += 1;
    }
    assert_eq!(n, samples().len());
}

#[test]
fn every_flipped_bit_is_detected() {
    let rec = &samples()[3];
    let mut buf = Vec::new();
    encode(rec, &mut buf);
    for i in 0..buf.len() * 8 {
        let mut bad = buf.clone();
        bad[i / 8] ^= 1 << (i % 8);
        match decode(&bad) {
            Err(_) => {}
            // A flip inside the length prefix can only shrink or grow the
            // frame; it must never decode to the same record silently.
            Ok((r, _)) => panic!("bit {i} flipped, still decoded: {r:?}"),
        }
    }
}

#[test]
fn crc_mismatch_names_the_offset() {
    let mut buf = Vec::new();
    encode(&samples()[0], &mut buf);
    let last = buf.len() - 5;
    buf[last] ^= 0x40;
    let err = decode(&buf).unwrap_err();
    assert!(matches!(err.kind, DecodeErrorKind::CrcMismatch { .. }), "{err}");
    assert_eq!(err.offset, buf.len() - 4);
}

#[test]
fn every_truncation_is_an_error() {
    for rec in samples() {
        let mut buf = Vec::new();
        encode(&rec, &mut buf);
        for cut in 0..buf.len() {
            let err = decode(&buf[..cut]).unwrap_err();
            assert!(matches!(err.kind, DecodeErrorKind::Truncated { .. }), "cut {cut}: {err}");
        }
    }
}

#[test]
fn peek_kind_reads_the_head_byte_and_the_length() {
    for r in samples() {
        let mut bytes = Vec::new();
        encode(&r, &mut bytes);
        assert_eq!(peek_kind(&bytes).unwrap(), (r.kind(), bytes.len()));
        assert!(peek_kind(&bytes[..bytes.len() - 1]).is_err(), "a truncated frame");
        let mut other_version = bytes.clone();
        other_version[varint_len(&bytes)] ^= 0x30;
        assert!(matches!(peek_kind(&other_version).unwrap_err().kind, DecodeErrorKind::UnsupportedVersion(_)));
    }
    assert!(peek_kind(&framed(&[])).is_err(), "an empty body");
}

fn varint_len(frame: &[u8]) -> usize {
    frame.iter().position(|b| b & 0x80 == 0).unwrap() + 1
}

#[test]
fn absurd_length_is_refused_before_allocating() {
    let err = decode(&[0xFF, 0xFF, 0xFF, 0xFF, 0x7F]).unwrap_err();
    assert!(matches!(err.kind, DecodeErrorKind::TooLong(_)), "{err}");
}

/// A frame with a valid CRC around a body that is not a valid record.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut buf = vec![body.len() as u8];
    buf.extend_from_slice(body);
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

#[test]
fn malformed_bodies_are_errors() {
    let cases: &[(&[u8], &str)] = &[
        (&[0x21], "version 2"),
        (&[0x1F], "unknown kind"),
        (&[0x14, 0x01, 0x01, 0x63], "unknown value tag"),
        (&[0x14, 0x01, 0x05, 0x00], "count larger than the rest"),
        (&[0x11, 0x01], "begin cut short"),
        (&[0x12, 0x01, 0x02, 0x03], "left-over bytes"),
        (&[0x15, 0x01, b'x'], "old tuple kind"),
    ];
    for (body, what) in cases {
        assert!(decode(&framed(body)).is_err(), "{what}");
    }
}

fn arb_value() -> impl Strategy<Value = Value<'static>> {
    // Byte strings are leaked so the values can borrow them for 'static;
    // fine in a test process.
    let bytes = proptest::collection::vec(any::<u8>(), 0..40).prop_map(|v| &*Box::leak(v.into_boxed_slice()));
    prop_oneof![
        Just(Value::Null),
        Just(Value::UnchangedToast),
        bytes.clone().prop_map(Value::Text),
        (bytes.clone(), any::<u32>()).prop_map(|(b, p)| Value::PaddedText(b, p)),
        any::<i64>().prop_map(Value::Int),
        any::<bool>().prop_map(Value::Bool),
        bytes.prop_map(Value::Bytes),
        any::<u32>().prop_map(Value::Float4),
        any::<u64>().prop_map(Value::Float8),
        any::<i32>().prop_map(Value::Date),
        any::<i64>().prop_map(Value::Time),
        any::<i64>().prop_map(Value::Timestamp),
        any::<i64>().prop_map(Value::TimestampTz),
        any::<[u8; 16]>().prop_map(Value::Uuid),
        "-?[0-9]{1,30}(\\.[0-9]{1,20})?".prop_map(|t| {
            let mut buf = vec![0; crate::pgtext::packed_numeric_len(t.len())];
            let n = crate::pgtext::pack_numeric(t.as_bytes(), &mut buf).unwrap();
            buf.truncate(n);
            Value::Numeric(Box::leak(buf.into_boxed_slice()))
        }),
    ]
}

proptest! {
    #[test]
    fn arbitrary_changes_round_trip(values in proptest::collection::vec(arb_value(), 0..20),
                                    key in proptest::collection::vec(arb_value(), 0..3),
                                    relation in any::<u32>(), which in 0..3u8) {
        let rec = match which {
            0 => Record::Insert(Insert { relation, new: Tuple(values) }),
            1 => Record::Update(Update { relation, old: Some(OldTuple::Key(Tuple(key))), new: Tuple(values) }),
            _ => Record::Delete(Delete { relation, old: Some(OldTuple::Row(Tuple(values))) }),
        };
        let mut buf = Vec::new();
        encode(&rec, &mut buf);
        prop_assert_eq!(buf.len(), encoded_len(&rec));
        let (back, used) = decode(&buf).unwrap();
        prop_assert_eq!(used, buf.len());
        prop_assert_eq!(back, rec);
    }

    #[test]
    fn garbage_never_panics(garbage in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = decode(&garbage);
        let _ = frame_len(&garbage);
    }

    #[test]
    fn garbage_with_a_valid_crc_never_panics(body in proptest::collection::vec(any::<u8>(), 0..120)) {
        let mut body = body;
        if let Some(first) = body.first_mut() {
            *first = 0x10 | (*first & 0x0F);
        }
        let _ = decode(&framed(&body));
    }
}
