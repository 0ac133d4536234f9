//! Building a round's requests: versions, xids and watermarks.

#![allow(clippy::unwrap_used)]

use super::*;

fn tx(lsn: u64, xid: u64, end: Option<u64>, keys: &[&str]) -> Work {
    Work::Tx(TxWork {
        lsn: Lsn(lsn),
        xid,
        changes: keys
            .iter()
            .map(|k| {
                let k = Bytes::copy_from_slice(k.as_bytes());
                let change = if k.ends_with(b":") {
                    KeyChange::InvalidatePrefix(k)
                } else {
                    KeyChange::Invalidate(k)
                };
                (change, None)
            })
            .collect(),
        end: end.map(|e| (Lsn(e), 0)),
        rows: 1,
    })
}

/// Keys ending in `0` go to partition 0, others to partition 1.
fn route(key: &[u8]) -> u32 {
    u32::from(key.last() != Some(&b'0'))
}

#[test]
fn every_request_of_a_transaction_carries_its_xid() {
    let batch = [
        tx(0x101, 77, None, &["a0", "a1"]),
        tx(0x140, 77, Some(0x140), &["b0", "p:"]),
        tx(0x180, 78, Some(0x180), &["c1", "d1", "e1"]),
    ];
    let mut pushed = vec![Lsn::ZERO; 3];
    let (requests, end) = requests(9, 2, &batch, Lsn(0x100), &mut pushed, route);
    assert_eq!(end, Some(Lsn(0x180)));
    // a0 | a1 | b0 + p: | p: (p1) | p: (p2) | c1 d1 | e1
    assert_eq!(requests.len(), 7);
    for (_, r) in &requests {
        let want = match r.lsn {
            0x101 | 0x140 => 77,
            0x180 => 78,
            other => panic!("unexpected lsn {other:#x}"),
        };
        assert_eq!(r.xid, want, "{r:?}");
        assert_eq!(r.min_xmin, 0);
        assert_eq!(r.fence, 9);
        assert!(!r.changes.is_empty() && r.changes.len() <= 2);
    }
    // The watermark rides on one request of each partition.
    for p in 0..3 {
        let n = requests
            .iter()
            .filter(|(q, r)| *q == p && r.watermark == 0x100)
            .count();
        assert_eq!(n, 1, "partition {p}");
    }
    assert_eq!(pushed, [Lsn(0x100); 3]);
}

#[test]
fn watermark_only_requests_carry_no_xid() {
    let batch = [Work::Position(Lsn(0x300))];
    let mut pushed = vec![Lsn(0x200), Lsn::ZERO];
    let (requests, end) = requests(9, 100, &batch, Lsn(0x200), &mut pushed, route);
    assert_eq!(end, Some(Lsn(0x300)));
    assert_eq!(requests.len(), 1, "partition 0 already has the watermark");
    let (p, r) = &requests[0];
    assert_eq!(*p, 1);
    assert_eq!((r.lsn, r.watermark, r.xid, r.min_xmin), (0, 0x200, 0, 0));
    assert!(r.changes.is_empty());
}
