//! [`PeerLogLimit`]: at most one "peer unreachable" line per peer per interval, with the
//! number of failures it stands for. Pure; the caller passes the time.
//!
//! Without it a node whose peers are down logs every failed batch (and openraft logs
//! every failed replication and heartbeat of every group: ~175 lines a second with 16
//! partitions), which buries everything else in the log.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often a peer's failures may be logged.
pub const PEER_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Failure counts per peer since its last logged line.
#[derive(Debug, Default)]
pub struct PeerLogLimit {
    peers: HashMap<String, (Instant, u64)>,
}

impl PeerLogLimit {
    /// Notes one failure of `peer` at `now`. Returns `Some(n)` when a line should be
    /// logged now, standing for `n` failures (this one included) since the last line;
    /// `None` while the peer's interval runs.
    pub fn failed(&mut self, peer: &str, now: Instant) -> Option<u64> {
        match self.peers.get_mut(peer) {
            Some((last, count)) if now.duration_since(*last) < PEER_LOG_INTERVAL => {
                *count += 1;
                None
            }
            Some((last, count)) => {
                let n = *count + 1;
                *last = now;
                *count = 0;
                Some(n)
            }
            None => {
                self.peers.insert(peer.to_owned(), (now, 0));
                Some(1)
            }
        }
    }

    /// Notes that `peer` answered: its next failure is logged at once.
    pub fn recovered(&mut self, peer: &str) -> bool {
        self.peers.remove(peer).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_peer_per_interval_with_the_count() {
        let t0 = Instant::now();
        let mut limit = PeerLogLimit::default();
        assert_eq!(
            limit.failed("a", t0),
            Some(1),
            "the first failure is logged"
        );
        for i in 1..=174u64 {
            let at = t0 + Duration::from_millis(i * 50);
            assert_eq!(limit.failed("a", at), None, "within the interval");
        }
        assert_eq!(limit.failed("b", t0), Some(1), "peers are counted apart");
        let later = t0 + PEER_LOG_INTERVAL;
        assert_eq!(
            limit.failed("a", later),
            Some(175),
            "174 held back + this one"
        );
        assert_eq!(limit.failed("a", later + Duration::from_secs(1)), None);
        assert!(limit.recovered("a"));
        assert!(!limit.recovered("a"));
        assert_eq!(
            limit.failed("a", later + Duration::from_secs(2)),
            Some(1),
            "after recovering, the next failure is logged at once"
        );
    }
}
