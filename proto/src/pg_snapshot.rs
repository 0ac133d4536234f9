//! Postgres MVCC snapshots and transaction ids, as a cache-aside fill and the CDC worker
//! see them. Pure and synchronous.
//!
//! A fill that carries the snapshot its row was read under (`pg_current_snapshot()`,
//! text form `xmin:xmax:xip,…`) lets a node decide *exactly* whether that row could
//! predate an invalidation it has seen: the invalidating transaction's xid is either
//! visible in the snapshot or not ([`PgSnapshot::sees`]), with no timing assumption.
//!
//! Transaction ids: `pg_current_snapshot()` gives 64-bit "full" xids (epoch in the high
//! 32 bits); pgoutput's `Begin` carries the 32-bit xid. [`widen_xid`] restores the 64-bit
//! form from any nearby full xid, as Postgres itself does (live xids are always within
//! 2^31 of the next xid, or the server stops assigning them).

use std::fmt;
use std::str::FromStr;

/// The most in-progress xids a snapshot may list. Postgres lists at most one per backend
/// and prepared transaction (`max_connections` + `max_prepared_transactions`, plus
/// subtransactions when they overflow into the list), so 65,536 is far above any real
/// server; it bounds what one request can make a node keep.
pub const MAX_XIP: usize = 65_536;

/// A Postgres snapshot: every transaction with xid `< xmin` had ended when it was taken,
/// none with xid `>= xmax` had started, and `xip` lists those in between still running.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PgSnapshot {
    xmin: u64,
    xmax: u64,
    /// Sorted, distinct, each in `xmin..xmax`.
    xip: Vec<u64>,
}

/// Why a snapshot is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotError(String);

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SnapshotError {}

impl PgSnapshot {
    /// A snapshot from its parts; `xip` may come in any order (Postgres sorts it, but a
    /// hand-written one need not).
    ///
    /// # Errors
    /// `xmin` is 0 or above `xmax`, an xip is outside `xmin..xmax` or listed twice, or
    /// there are more than [`MAX_XIP`].
    pub fn new(xmin: u64, xmax: u64, mut xip: Vec<u64>) -> Result<PgSnapshot, SnapshotError> {
        if xmin == 0 {
            return Err(SnapshotError(
                "snapshot xmin must be a transaction id (> 0)".into(),
            ));
        }
        if xmin > xmax {
            return Err(SnapshotError(format!(
                "snapshot xmin {xmin} is above its xmax {xmax}"
            )));
        }
        if xip.len() > MAX_XIP {
            return Err(SnapshotError(format!(
                "snapshot lists {} running transactions; at most {MAX_XIP}",
                xip.len()
            )));
        }
        xip.sort_unstable();
        if let Some(w) = xip.windows(2).find(|w| w[0] == w[1]) {
            return Err(SnapshotError(format!(
                "snapshot lists transaction {} twice",
                w[0]
            )));
        }
        if let Some(x) = xip.iter().find(|x| **x < xmin || **x >= xmax) {
            return Err(SnapshotError(format!(
                "snapshot running transaction {x} is outside xmin..xmax ({xmin}..{xmax})"
            )));
        }
        Ok(PgSnapshot { xmin, xmax, xip })
    }

    /// The oldest transaction still running when the snapshot was taken (or the next xid).
    pub fn xmin(&self) -> u64 {
        self.xmin
    }

    /// The first xid not yet assigned when the snapshot was taken.
    pub fn xmax(&self) -> u64 {
        self.xmax
    }

    /// The transactions running when the snapshot was taken, sorted.
    pub fn xip(&self) -> &[u64] {
        &self.xip
    }

    /// Whether a *committed* transaction `xid` (64-bit) is visible in this snapshot: it
    /// ended before the snapshot was taken. Postgres's rule (`XidInMVCCSnapshot`): below
    /// `xmin` visible, at or above `xmax` not, in between visible unless listed in `xip`.
    pub fn sees(&self, xid: u64) -> bool {
        if xid < self.xmin {
            return true;
        }
        xid < self.xmax && self.xip.binary_search(&xid).is_err()
    }

    /// Bytes a node keeps for this snapshot beyond its fixed part.
    pub fn heap_bytes(&self) -> usize {
        self.xip.len() * std::mem::size_of::<u64>()
    }

    /// The wire form (`raftcache.v1.PgSnapshot`).
    pub fn to_wire(&self) -> crate::v1::PgSnapshot {
        crate::v1::PgSnapshot {
            xmin: self.xmin,
            xmax: self.xmax,
            xip: self.xip.clone(),
        }
    }

    /// Validates the wire form.
    ///
    /// # Errors
    /// As [`PgSnapshot::new`].
    pub fn from_wire(w: &crate::v1::PgSnapshot) -> Result<PgSnapshot, SnapshotError> {
        PgSnapshot::new(w.xmin, w.xmax, w.xip.clone())
    }
}

/// `xmin:xmax:xip1,xip2,…`: the text form of Postgres's `pg_snapshot` (and
/// `txid_snapshot`), as `SELECT pg_current_snapshot()::text` prints it.
impl FromStr for PgSnapshot {
    type Err = SnapshotError;

    fn from_str(s: &str) -> Result<PgSnapshot, SnapshotError> {
        let bad = || {
            SnapshotError(format!(
                "{s:?} is not a Postgres snapshot: expected xmin:xmax:xip,… as printed by \
                 SELECT pg_current_snapshot()"
            ))
        };
        let mut parts = s.trim().splitn(3, ':');
        let (Some(xmin), Some(xmax), Some(xip)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let num = |t: &str| t.trim().parse::<u64>().map_err(|_| bad());
        let xip = if xip.trim().is_empty() {
            Vec::new()
        } else {
            xip.split(',').map(num).collect::<Result<Vec<_>, _>>()?
        };
        PgSnapshot::new(num(xmin)?, num(xmax)?, xip)
    }
}

impl fmt::Display for PgSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, x) in self.xip.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

/// The 64-bit xid whose low 32 bits are `xid` and which is nearest to `reference` (a
/// 64-bit xid known to be within 2^31 of it: the last widened xid, or the `xmax` of a
/// snapshot taken at connect time). Postgres guarantees every live xid is within 2^31 of
/// the next one, so this is exact. Returns `xid` itself (epoch 0) when the nearest
/// candidate would be negative.
pub fn widen_xid(xid: u32, reference: u64) -> u64 {
    let epoch = reference >> 32;
    let candidate = (epoch << 32) | u64::from(xid);
    let half = 1u64 << 31;
    if candidate > reference && candidate - reference > half && epoch > 0 {
        candidate - (1u64 << 32)
    } else if candidate < reference && reference - candidate > half {
        candidate + (1u64 << 32)
    } else {
        candidate
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn snap(s: &str) -> PgSnapshot {
        s.parse().unwrap()
    }

    #[test]
    fn visibility_follows_postgres() {
        let s = snap("100:110:100,104,107");
        assert!(s.sees(1));
        assert!(s.sees(99));
        assert!(!s.sees(100), "running at xmin");
        assert!(s.sees(101));
        assert!(!s.sees(104));
        assert!(s.sees(105));
        assert!(!s.sees(107));
        assert!(s.sees(109), "ended before the snapshot, below xmax");
        assert!(!s.sees(110), "xmax is not yet assigned");
        assert!(!s.sees(u64::MAX));
    }

    #[test]
    fn empty_running_list() {
        let s = snap("100:100:");
        assert!(s.sees(99));
        assert!(!s.sees(100));
        assert_eq!(s.to_string(), "100:100:");
    }

    #[test]
    fn text_round_trips_and_sorts() {
        let s = snap(" 5:9:8,6 ");
        assert_eq!(s.xip(), &[6, 8]);
        assert_eq!(s.to_string(), "5:9:6,8");
        assert_eq!(snap(&s.to_string()), s);
        assert_eq!(PgSnapshot::from_wire(&s.to_wire()).unwrap(), s);
    }

    #[test]
    fn malformed_snapshots_are_refused() {
        for bad in [
            "", "1:2", "a:2:", "0:5:", "9:5:", "5:9:4", "5:9:9", "5:9:6,6", "5:9:6,,7", "-1:3:",
        ] {
            assert!(bad.parse::<PgSnapshot>().is_err(), "{bad:?} accepted");
        }
        let many: Vec<u64> = (10..10 + MAX_XIP as u64 + 1).collect();
        assert!(PgSnapshot::new(10, 10 + MAX_XIP as u64 + 5, many).is_err());
    }

    #[test]
    fn widening_across_the_32_bit_wrap() {
        let epoch1 = 1u64 << 32;
        // Plain case: same epoch.
        assert_eq!(widen_xid(1000, 2000), 1000);
        assert_eq!(widen_xid(1000, epoch1 + 5), epoch1 + 1000);
        // The reference just wrapped into epoch 1; an xid from just before the wrap
        // belongs to epoch 0.
        assert_eq!(
            widen_xid(u32::MAX - 3, epoch1 + 10),
            u64::from(u32::MAX - 3)
        );
        // The reference is just before the wrap; an xid just after it is in epoch 1.
        assert_eq!(widen_xid(7, u64::from(u32::MAX) - 2), epoch1 + 7);
        // Nearest in both directions up to 2^31.
        let r = epoch1 * 3 + 100;
        assert_eq!(widen_xid(100 + (1 << 30), r), r + (1 << 30));
        assert_eq!(widen_xid(100u32.wrapping_sub(1 << 30), r), r - (1 << 30));
        // Epoch 0 never goes negative.
        assert_eq!(widen_xid(u32::MAX, 5), u64::from(u32::MAX));
    }

    #[test]
    fn widened_xids_compare_with_full_snapshots() {
        // A snapshot taken in epoch 2, and an invalidating transaction whose 32-bit xid
        // wrapped just before it.
        let epoch2 = 2u64 << 32;
        let s = PgSnapshot::new(epoch2 + 3, epoch2 + 9, vec![epoch2 + 4]).unwrap();
        let x = widen_xid(u32::MAX, s.xmax());
        assert_eq!(x, epoch2 - 1);
        assert!(s.sees(x));
        let y = widen_xid(4, s.xmax());
        assert!(!s.sees(y), "running in the snapshot");
    }
}
