//! The [`Decoder`]: versions (commit end LSN; `final_lsn + 1` for pieces sent ahead of
//! the COMMIT), 64-bit xids, and one change per key per version.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::config::Config;
use crate::pgoutput::{Begin, Column, Commit, Insert, Update};

const REL: u32 = 16_384;
const EPOCH3: u64 = 3 << 32;

/// `public.users (id, email)` mapped to `user:{id}` in `mode`.
fn maps(mode: &str) -> Vec<TableMapping> {
    let text = format!(
        r#"
        [postgres]
        url = "postgres://app@127.0.0.1:5432/app"
        [cache]
        endpoints = ["127.0.0.1:7001"]
        [[table]]
        name = "users"
        keys = ["user:{{id}}"]
        mode = "{mode}"
        "#
    );
    Config::parse(&text).unwrap().mappings().unwrap()
}

fn relation() -> Message {
    let column = |name: &str, flags| Column {
        flags,
        name: name.into(),
        type_oid: 25,
        type_modifier: -1,
    };
    Message::Relation(Relation {
        id: REL,
        namespace: "public".into(),
        name: "users".into(),
        replica_identity: 'd',
        columns: vec![column("id", Column::KEY), column("email", 0)],
    })
}

fn begin(final_lsn: u64, xid: u32) -> Message {
    Message::Begin(Begin {
        final_lsn: Lsn(final_lsn),
        commit_ts_us: 7,
        xid,
    })
}

fn commit(final_lsn: u64, end_lsn: u64) -> Message {
    Message::Commit(Commit {
        flags: 0,
        commit_lsn: Lsn(final_lsn),
        end_lsn: Lsn(end_lsn),
        commit_ts_us: 7,
    })
}

fn tuple(id: &str, email: &str) -> Tuple {
    vec![
        TupleValue::Text(Bytes::copy_from_slice(id.as_bytes())),
        TupleValue::Text(Bytes::copy_from_slice(email.as_bytes())),
    ]
}

fn insert(id: &str, email: &str) -> Message {
    Message::Insert(Insert {
        rel: REL,
        new: tuple(id, email),
    })
}

fn update(id: &str, email: &str) -> Message {
    Message::Update(Update {
        rel: REL,
        old: None,
        new: tuple(id, email),
    })
}

/// Feeds `messages`; returns every transaction piece they complete.
fn feed(decoder: &mut Decoder<'_>, messages: Vec<Message>) -> Vec<TxWork> {
    let mut out = Vec::new();
    for m in messages {
        for w in decoder.feed(m).unwrap() {
            match w {
                Work::Tx(tx) => out.push(tx),
                Work::Position(p) => panic!("the decoder sent a position {p}"),
            }
        }
    }
    out
}

fn keys(tx: &TxWork) -> Vec<(&'static str, String)> {
    tx.changes
        .iter()
        .map(|(c, _)| {
            let kind = match c {
                KeyChange::Put(..) => "put",
                KeyChange::Invalidate(_) => "invalidate",
                KeyChange::InvalidatePrefix(_) => "prefix",
            };
            (kind, String::from_utf8_lossy(c.key()).into_owned())
        })
        .collect()
}

#[test]
fn complete_transactions_carry_the_end_lsn_and_the_widened_xid() {
    let maps = maps("invalidate");
    // The session started in epoch 3; the first transaction's xid is from just before
    // the wrap into it, the second from after.
    let mut d = Decoder::new(&maps, 1000, EPOCH3 + 10);
    let txs = feed(
        &mut d,
        vec![
            relation(),
            begin(0x1000, u32::MAX - 1),
            insert("1", "a@x"),
            commit(0x1000, 0x1038),
            begin(0x1038, 20),
            insert("2", "b@x"),
            update("1", "c@x"),
            commit(0x1038, 0x1070),
        ],
    );
    assert_eq!(txs.len(), 2);
    let (a, b) = (&txs[0], &txs[1]);
    assert_eq!(
        a.lsn,
        Lsn(0x1038),
        "stamped with the commit's end, not final_lsn"
    );
    assert_eq!(
        a.end,
        Some((Lsn(0x1038), 7)),
        "the acked position is unchanged"
    );
    assert_eq!(a.xid, EPOCH3 - 2, "epoch 2: before the wrap");
    assert_eq!(keys(a), [("invalidate", "user:1".to_owned())]);
    assert_eq!(b.lsn, Lsn(0x1070));
    assert_eq!(b.end, Some((Lsn(0x1070), 7)));
    // Widened against the previous transaction's xid (epoch 2), which is within 2^31.
    assert_eq!(b.xid, EPOCH3 + 20);
    assert_eq!(b.rows, 2);
    assert!(!d.in_transaction());
}

#[test]
fn pieces_sent_ahead_carry_final_lsn_plus_one_and_the_xid() {
    let maps = maps("update");
    let mut d = Decoder::new(&maps, 3, 500);
    let mut txs = feed(
        &mut d,
        vec![
            relation(),
            // A small transaction first: its end LSN is where the next one's commit
            // record starts.
            begin(0x2000, 400),
            insert("9", "z@x"),
            commit(0x2000, 0x2040),
            begin(0x2040, 401),
            insert("1", "a@x"),
            insert("2", "b@x"),
            insert("3", "c@x"),
        ],
    );
    assert!(d.in_transaction());
    txs.extend(feed(
        &mut d,
        vec![
            insert("4", "d@x"),
            // Key 1 again, in the last piece: an invalidation, at the end LSN.
            update("1", "d@x"),
            commit(0x2040, 0x2080),
        ],
    ));
    assert_eq!(txs.len(), 3);
    let (small, piece, last) = (&txs[0], &txs[1], &txs[2]);
    assert_eq!(small.lsn, Lsn(0x2040));
    assert_eq!(small.xid, 400);

    assert_eq!(piece.lsn, Lsn(0x2041), "final_lsn + 1");
    assert!(
        piece.lsn > small.lsn,
        "above every earlier transaction's end LSN"
    );
    assert_eq!(piece.xid, 401);
    assert_eq!(piece.end, None, "nothing to acknowledge before the COMMIT");
    assert_eq!(piece.rows, 3);
    assert_eq!(
        keys(piece),
        [
            ("put", "user:1".to_owned()),
            ("put", "user:2".to_owned()),
            ("put", "user:3".to_owned())
        ]
    );

    assert_eq!(
        last.lsn,
        Lsn(0x2080),
        "the last piece is stamped at the COMMIT"
    );
    assert!(last.lsn > piece.lsn, "so it wins over the pieces per key");
    assert_eq!(last.xid, 401);
    assert_eq!(last.end, Some((Lsn(0x2080), 7)));
    assert_eq!(last.rows, 2);
    assert_eq!(
        keys(last),
        [
            ("put", "user:4".to_owned()),
            ("invalidate", "user:1".to_owned())
        ]
    );
}

#[test]
fn a_second_write_of_a_key_in_one_piece_is_an_invalidation() {
    let maps = maps("update");
    let mut d = Decoder::new(&maps, 1000, 500);
    let txs = feed(
        &mut d,
        vec![
            relation(),
            begin(0x3000, 450),
            insert("1", "a@x"),
            update("1", "b@x"),
            commit(0x3000, 0x3030),
        ],
    );
    assert_eq!(txs.len(), 1);
    assert_eq!(txs[0].lsn, Lsn(0x3030));
    assert_eq!(
        keys(&txs[0]),
        [
            ("put", "user:1".to_owned()),
            ("invalidate", "user:1".to_owned())
        ]
    );
}

#[test]
fn a_commit_ending_before_its_record_starts_is_an_error() {
    let maps = maps("invalidate");
    let mut d = Decoder::new(&maps, 1000, 500);
    feed(&mut d, vec![relation(), begin(0x4000, 460)]);
    assert!(d.feed(commit(0x4000, 0x4000)).is_err());
    let mut d = Decoder::new(&maps, 1000, 500);
    assert!(
        d.feed(commit(0x4000, 0x4040)).is_err(),
        "COMMIT without BEGIN"
    );
}
