//! Tests of the pgoutput decoder: hand-built messages of every type, malformed input,
//! and property tests (encode → decode round trip; arbitrary bytes, truncations and
//! mutations never panic).

#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;

/// Test-only encoder: writes a message the way pgoutput does.
fn encode(m: &Message) -> Vec<u8> {
    let mut b = Vec::new();
    match m {
        Message::Begin(x) => {
            b.push(b'B');
            b.extend(x.final_lsn.0.to_be_bytes());
            b.extend(x.commit_ts_us.to_be_bytes());
            b.extend(x.xid.to_be_bytes());
        }
        Message::Commit(x) => {
            b.push(b'C');
            b.push(x.flags);
            b.extend(x.commit_lsn.0.to_be_bytes());
            b.extend(x.end_lsn.0.to_be_bytes());
            b.extend(x.commit_ts_us.to_be_bytes());
        }
        Message::Origin(x) => {
            b.push(b'O');
            b.extend(x.commit_lsn.0.to_be_bytes());
            cstr(&mut b, &x.name);
        }
        Message::Relation(x) => {
            b.push(b'R');
            b.extend(x.id.to_be_bytes());
            cstr(&mut b, &x.namespace);
            cstr(&mut b, &x.name);
            b.push(u8::try_from(x.replica_identity).unwrap());
            b.extend(i16::try_from(x.columns.len()).unwrap().to_be_bytes());
            for c in &x.columns {
                b.push(c.flags);
                cstr(&mut b, &c.name);
                b.extend(c.type_oid.to_be_bytes());
                b.extend(c.type_modifier.to_be_bytes());
            }
        }
        Message::Type(x) => {
            b.push(b'Y');
            b.extend(x.id.to_be_bytes());
            cstr(&mut b, &x.namespace);
            cstr(&mut b, &x.name);
        }
        Message::Insert(x) => {
            b.push(b'I');
            b.extend(x.rel.to_be_bytes());
            b.push(b'N');
            tuple(&mut b, &x.new);
        }
        Message::Update(x) => {
            b.push(b'U');
            b.extend(x.rel.to_be_bytes());
            if let Some((kind, t)) = &x.old {
                b.push(marker(*kind));
                tuple(&mut b, t);
            }
            b.push(b'N');
            tuple(&mut b, &x.new);
        }
        Message::Delete(x) => {
            b.push(b'D');
            b.extend(x.rel.to_be_bytes());
            b.push(marker(x.old.0));
            tuple(&mut b, &x.old.1);
        }
        Message::Truncate(x) => {
            b.push(b'T');
            b.extend(u32::try_from(x.rels.len()).unwrap().to_be_bytes());
            b.push(x.options);
            for r in &x.rels {
                b.extend(r.to_be_bytes());
            }
        }
        Message::LogicalMessage(x) => {
            b.push(b'M');
            b.push(x.flags);
            b.extend(x.lsn.0.to_be_bytes());
            cstr(&mut b, &x.prefix);
            b.extend(u32::try_from(x.content.len()).unwrap().to_be_bytes());
            b.extend_from_slice(&x.content);
        }
    }
    b
}

fn cstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.push(0);
}

fn marker(k: OldKind) -> u8 {
    match k {
        OldKind::Key => b'K',
        OldKind::Old => b'O',
    }
}

fn tuple(b: &mut Vec<u8>, t: &Tuple) {
    b.extend(i16::try_from(t.len()).unwrap().to_be_bytes());
    for v in t {
        match v {
            TupleValue::Null => b.push(b'n'),
            TupleValue::UnchangedToast => b.push(b'u'),
            TupleValue::Text(x) | TupleValue::Binary(x) => {
                b.push(if matches!(v, TupleValue::Text(_)) {
                    b't'
                } else {
                    b'b'
                });
                b.extend(u32::try_from(x.len()).unwrap().to_be_bytes());
                b.extend_from_slice(x);
            }
        }
    }
}

fn dec(b: &[u8]) -> Result<Message, DecodeError> {
    decode(&Bytes::copy_from_slice(b))
}

fn text(s: &str) -> TupleValue {
    TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
}

// --- hand-built messages, bytes written out as the docs describe them -----------

#[test]
fn begin_and_commit() {
    let mut b = vec![b'B'];
    b.extend(0x0000_0001_0000_00A0u64.to_be_bytes());
    b.extend(777_000_000i64.to_be_bytes());
    b.extend(742u32.to_be_bytes());
    assert_eq!(
        dec(&b).unwrap(),
        Message::Begin(Begin {
            final_lsn: Lsn(0x1_0000_00A0),
            commit_ts_us: 777_000_000,
            xid: 742
        })
    );

    let mut c = vec![b'C', 0];
    c.extend(0x1_0000_00A0u64.to_be_bytes());
    c.extend(0x1_0000_00D8u64.to_be_bytes());
    c.extend((-5i64).to_be_bytes());
    assert_eq!(
        dec(&c).unwrap(),
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(0x1_0000_00A0),
            end_lsn: Lsn(0x1_0000_00D8),
            commit_ts_us: -5
        })
    );
}

#[test]
fn relation_with_key_columns() {
    let mut b = vec![b'R'];
    b.extend(16_385u32.to_be_bytes());
    b.extend(b"public\0users\0f");
    b.extend(3i16.to_be_bytes());
    for (flags, name, oid, typmod) in [
        (1u8, "id", 23u32, -1i32),
        (0, "email", 25, -1),
        (0, "name", 1043, 68),
    ] {
        b.push(flags);
        b.extend(name.as_bytes());
        b.push(0);
        b.extend(oid.to_be_bytes());
        b.extend(typmod.to_be_bytes());
    }
    let Message::Relation(r) = dec(&b).unwrap() else {
        panic!("not a relation")
    };
    assert_eq!(r.id, 16_385);
    assert_eq!((r.namespace.as_str(), r.name.as_str()), ("public", "users"));
    assert_eq!(r.replica_identity, 'f');
    assert_eq!(r.columns.len(), 3);
    assert!(r.columns[0].is_key() && !r.columns[1].is_key());
    assert_eq!(r.columns[2].name, "name");
    assert_eq!(
        (r.columns[2].type_oid, r.columns[2].type_modifier),
        (1043, 68)
    );
}

#[test]
fn insert_with_every_value_kind() {
    let mut b = vec![b'I'];
    b.extend(16_385u32.to_be_bytes());
    b.push(b'N');
    b.extend(4i16.to_be_bytes());
    b.extend(b"t\0\0\0\x0242");
    b.push(b'n');
    b.push(b'u');
    b.extend(b"b\0\0\0\x00");
    assert_eq!(
        dec(&b).unwrap(),
        Message::Insert(Insert {
            rel: 16_385,
            new: vec![
                text("42"),
                TupleValue::Null,
                TupleValue::UnchangedToast,
                TupleValue::Binary(Bytes::new())
            ]
        })
    );
}

#[test]
fn update_with_and_without_old_tuple() {
    let new = vec![text("1"), text("b@x")];
    for old in [
        None,
        Some((OldKind::Key, vec![text("1"), TupleValue::Null])),
        Some((OldKind::Old, vec![text("1"), text("a@x")])),
    ] {
        let m = Message::Update(Update {
            rel: 9,
            old,
            new: new.clone(),
        });
        let bytes = encode(&m);
        assert_eq!(dec(&bytes).unwrap(), m);
    }
    // The raw form of the simplest one, to pin the encoder to the docs.
    let mut b = vec![b'U'];
    b.extend(9u32.to_be_bytes());
    b.extend(b"N\0\x01t\0\0\0\x01x");
    assert_eq!(
        dec(&b).unwrap(),
        Message::Update(Update {
            rel: 9,
            old: None,
            new: vec![text("x")]
        })
    );
    // An old tuple must be followed by 'N'.
    let mut bad = vec![b'U'];
    bad.extend(9u32.to_be_bytes());
    bad.extend(b"K\0\x01nX\0\0");
    assert!(matches!(
        dec(&bad),
        Err(DecodeError::UnexpectedByte { found: b'X', .. })
    ));
}

#[test]
fn delete_key_and_full() {
    let mut b = vec![b'D'];
    b.extend(7u32.to_be_bytes());
    b.extend(b"K\0\x02t\0\0\0\x017n");
    assert_eq!(
        dec(&b).unwrap(),
        Message::Delete(Delete {
            rel: 7,
            old: (OldKind::Key, vec![text("7"), TupleValue::Null])
        })
    );
    b[5] = b'O';
    assert!(matches!(
        dec(&b).unwrap(),
        Message::Delete(Delete {
            old: (OldKind::Old, _),
            ..
        })
    ));
    b[5] = b'N';
    assert!(matches!(
        dec(&b),
        Err(DecodeError::UnexpectedByte {
            found: b'N',
            offset: 5,
            ..
        })
    ));
}

#[test]
fn truncate() {
    let mut b = vec![b'T'];
    b.extend(2u32.to_be_bytes());
    b.push(Truncate::CASCADE | Truncate::RESTART_IDENTITY);
    b.extend(10u32.to_be_bytes());
    b.extend(11u32.to_be_bytes());
    assert_eq!(
        dec(&b).unwrap(),
        Message::Truncate(Truncate {
            options: 3,
            rels: vec![10, 11]
        })
    );
}

#[test]
fn origin_type_and_logical_message() {
    let mut o = vec![b'O'];
    o.extend(5u64.to_be_bytes());
    o.extend(b"pg_16400\0");
    assert_eq!(
        dec(&o).unwrap(),
        Message::Origin(Origin {
            commit_lsn: Lsn(5),
            name: "pg_16400".into()
        })
    );

    let mut y = vec![b'Y'];
    y.extend(16_400u32.to_be_bytes());
    y.extend(b"public\0mood\0");
    assert_eq!(
        dec(&y).unwrap(),
        Message::Type(Type {
            id: 16_400,
            namespace: "public".into(),
            name: "mood".into()
        })
    );

    let mut m = vec![b'M', 1];
    m.extend(0x30u64.to_be_bytes());
    m.extend(b"raftcache\0");
    m.extend(3u32.to_be_bytes());
    m.extend(b"a\0b");
    assert_eq!(
        dec(&m).unwrap(),
        Message::LogicalMessage(LogicalMessage {
            flags: LogicalMessage::TRANSACTIONAL,
            lsn: Lsn(0x30),
            prefix: "raftcache".into(),
            content: Bytes::from_static(b"a\0b")
        })
    );
}

// --- malformed input ---------------------------------------------------------

#[test]
fn malformed_inputs_are_errors() {
    assert_eq!(dec(b""), Err(DecodeError::Empty));
    assert_eq!(dec(b"Z"), Err(DecodeError::UnknownMessage(b'Z')));
    // Streaming (protocol version 2+) messages are not version 1.
    assert_eq!(
        dec(b"S\0\0\0\x01\x01"),
        Err(DecodeError::UnknownMessage(b'S'))
    );
    assert!(matches!(
        dec(b"B\0\0"),
        Err(DecodeError::Truncated {
            what: "final LSN",
            ..
        })
    ));
    // Trailing byte after a complete Begin.
    let mut b = encode(&Message::Begin(Begin {
        final_lsn: Lsn(1),
        commit_ts_us: 2,
        xid: 3,
    }));
    b.push(0);
    assert_eq!(
        dec(&b),
        Err(DecodeError::TrailingBytes {
            kind: 'B',
            count: 1
        })
    );
    // Unterminated and non-UTF-8 strings.
    assert!(matches!(
        dec(b"O\0\0\0\0\0\0\0\x01abc"),
        Err(DecodeError::UnterminatedString { .. })
    ));
    assert!(matches!(
        dec(b"O\0\0\0\0\0\0\0\x01\xff\0"),
        Err(DecodeError::InvalidUtf8 { .. })
    ));
    // Unknown tuple value kind.
    let mut i = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b'x'];
    assert!(matches!(
        dec(&i),
        Err(DecodeError::UnexpectedByte {
            found: b'x',
            offset: 8,
            ..
        })
    ));
    i[8] = b't';
    assert!(matches!(dec(&i), Err(DecodeError::Truncated { .. })));
}

#[test]
fn huge_counts_are_rejected_before_allocating() {
    // 2^31-1 truncated relations in a 10-byte message.
    let mut t = vec![b'T'];
    t.extend(i32::MAX.to_be_bytes());
    t.extend([0, 0, 0, 0, 1]);
    assert!(matches!(
        dec(&t),
        Err(DecodeError::InvalidCount {
            what: "relation count",
            ..
        })
    ));
    // A negative relation count (u32 0xFFFFFFFF read as Int32).
    t[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        dec(&t),
        Err(DecodeError::InvalidCount { value: -1, .. })
    ));
    // A 2 GiB column value.
    let mut i = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
    i.extend(0x7FFF_FFFFu32.to_be_bytes());
    assert!(matches!(
        dec(&i),
        Err(DecodeError::InvalidCount {
            what: "column value length",
            ..
        })
    ));
    // 32767 columns of a relation in a few bytes, and a negative column count.
    let mut r = vec![b'R', 0, 0, 0, 1, 0, b'x', 0, b'd'];
    r.extend(i16::MAX.to_be_bytes());
    assert!(matches!(
        dec(&r),
        Err(DecodeError::InvalidCount {
            what: "column count",
            ..
        })
    ));
    let n = r.len();
    r[n - 2..].copy_from_slice(&(-3i16).to_be_bytes());
    assert!(matches!(
        dec(&r),
        Err(DecodeError::InvalidCount { value: -3, .. })
    ));
}

#[test]
fn values_share_the_input_buffer() {
    let bytes = Bytes::from(encode(&Message::Insert(Insert {
        rel: 1,
        new: vec![text("hello")],
    })));
    let Message::Insert(ins) = decode(&bytes).unwrap() else {
        panic!()
    };
    let TupleValue::Text(v) = &ins.new[0] else {
        panic!()
    };
    let range = bytes.as_ptr_range();
    assert!(range.contains(&v.as_ptr()), "value was copied");
    assert_eq!(ins.new[0].as_str(), Some("hello"));
    assert_eq!(TupleValue::Null.as_str(), None);
}

// --- properties --------------------------------------------------------------

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

fn name() -> impl Strategy<Value = String> {
    // Any UTF-8 without NUL, including the empty string.
    "[^\u{0}]{0,12}"
}

fn value() -> impl Strategy<Value = TupleValue> {
    prop_oneof![
        Just(TupleValue::Null),
        Just(TupleValue::UnchangedToast),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| TupleValue::Text(v.into())),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| TupleValue::Binary(v.into())),
    ]
}

fn tuple_s() -> impl Strategy<Value = Tuple> {
    proptest::collection::vec(value(), 0..6)
}

fn old_kind_s() -> impl Strategy<Value = OldKind> {
    prop_oneof![Just(OldKind::Key), Just(OldKind::Old)]
}

fn message() -> impl Strategy<Value = Message> {
    let column = (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| Column {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    );
    prop_oneof![
        (lsn(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_ts_us, xid)| {
            Message::Begin(Begin {
                final_lsn,
                commit_ts_us,
                xid,
            })
        }),
        (any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_ts_us)| Message::Commit(Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_ts_us
            })
        ),
        (lsn(), name()).prop_map(|(commit_lsn, name)| Message::Origin(Origin { commit_lsn, name })),
        (
            any::<u32>(),
            name(),
            name(),
            prop_oneof![Just('d'), Just('n'), Just('f'), Just('i')],
            proptest::collection::vec(column, 0..5)
        )
            .prop_map(
                |(id, namespace, name, replica_identity, columns)| Message::Relation(Relation {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns
                })
            ),
        (any::<u32>(), name(), name()).prop_map(|(id, namespace, name)| Message::Type(Type {
            id,
            namespace,
            name
        })),
        (any::<u32>(), tuple_s()).prop_map(|(rel, new)| Message::Insert(Insert { rel, new })),
        (
            any::<u32>(),
            proptest::option::of((old_kind_s(), tuple_s())),
            tuple_s()
        )
            .prop_map(|(rel, old, new)| Message::Update(Update { rel, old, new })),
        (any::<u32>(), old_kind_s(), tuple_s())
            .prop_map(|(rel, k, t)| Message::Delete(Delete { rel, old: (k, t) })),
        (any::<u8>(), proptest::collection::vec(any::<u32>(), 0..6))
            .prop_map(|(options, rels)| Message::Truncate(Truncate { options, rels })),
        (
            any::<u8>(),
            lsn(),
            name(),
            proptest::collection::vec(any::<u8>(), 0..20)
        )
            .prop_map(|(flags, lsn, prefix, c)| {
                Message::LogicalMessage(LogicalMessage {
                    flags,
                    lsn,
                    prefix,
                    content: c.into(),
                })
            }),
    ]
}

/// An edit applied to a valid encoding.
#[derive(Debug, Clone)]
enum Mutation {
    /// Keep only the first `n % len` bytes.
    Truncate(usize),
    /// Overwrite the byte at `i % len`.
    Set(usize, u8),
    /// Overwrite 4 bytes at `i % len` (hits length and count fields).
    Set32(usize, u32),
    /// Insert a byte at `i % (len + 1)`.
    Insert(usize, u8),
    /// Remove the byte at `i % len`.
    Remove(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (
            any::<usize>(),
            prop_oneof![
                Just(u32::MAX),
                Just(0x7FFF_FFFF),
                Just(0x8000_0000),
                Just(0x7FFF),
                any::<u32>()
            ]
        )
            .prop_map(|(i, v)| Mutation::Set32(i, v)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
    ]
}

fn apply(b: &mut Vec<u8>, m: &Mutation) {
    if b.is_empty() {
        return;
    }
    let len = b.len();
    match *m {
        Mutation::Truncate(n) => b.truncate(n % len),
        Mutation::Set(i, v) => b[i % len] = v,
        Mutation::Set32(i, v) => {
            for (k, byte) in v.to_be_bytes().into_iter().enumerate() {
                if let Some(x) = b.get_mut(i % len + k) {
                    *x = byte;
                }
            }
        }
        Mutation::Insert(i, v) => b.insert(i % (len + 1), v),
        Mutation::Remove(i) => {
            b.remove(i % len);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn round_trip(m in message()) {
        let bytes = Bytes::from(encode(&m));
        prop_assert_eq!(decode(&bytes).unwrap(), m);
    }

    #[test]
    fn every_proper_prefix_is_an_error(m in message()) {
        let bytes = encode(&m);
        for n in 0..bytes.len() {
            prop_assert!(dec(&bytes[..n]).is_err(), "prefix of {} bytes decoded", n);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(kind in any::<u8>(), rest in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut b = vec![kind];
        b.extend(rest);
        let _ = dec(&b);
    }

    #[test]
    fn mutated_messages_never_panic(m in message(), muts in proptest::collection::vec(mutation(), 1..4)) {
        let mut b = encode(&m);
        for mu in &muts {
            apply(&mut b, mu);
        }
        let _ = dec(&b);
    }
}
