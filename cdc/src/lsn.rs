//! [`Lsn`]: a PostgreSQL WAL position (log sequence number).
//!
//! This is the same type as [`raftcache_client::Lsn`], re-exported: the CDC worker
//! stamps the LSNs it reads from Postgres on the cache writes it makes through the
//! client, so both sides must share one type rather than convert between two.
//!
//! It is `Copy`, ordered as the WAL is, displays as Postgres prints it
//! (`16/B374D848`: the high and low 32 bits in upper-case hex), parses that form
//! case-insensitively ([`ParseLsnError`] on anything else), and serializes with serde
//! as that string.

pub use raftcache_client::lsn::{Lsn, ParseLsnError};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The contract the walsender and pgoutput code rely on, checked here so that a
    /// change to the shared type shows up in this crate's tests too.
    #[test]
    fn contract() {
        let l = Lsn(0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("16/b374d848".parse::<Lsn>().unwrap(), l);
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn::default(), Lsn(0));
        assert!("1/0".parse::<Lsn>().unwrap() > "0/FFFFFFFF".parse::<Lsn>().unwrap());
        for bad in ["", "x/1", "1/2/3", "100000000/0", "+1/0", " 1/ 2", "1"] {
            let e: ParseLsnError = bad.parse::<Lsn>().unwrap_err();
            assert!(e.to_string().contains("invalid LSN"), "{bad:?}: {e}");
        }
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(json, "\"16/B374D848\"");
        assert_eq!(serde_json::from_str::<Lsn>(&json).unwrap(), l);
        assert!(serde_json::from_str::<Lsn>("\"nope\"").is_err());
        let mut set = std::collections::HashSet::new();
        set.insert(l);
        assert!(set.contains(&Lsn(0x16_B374_D848)));
    }
}
