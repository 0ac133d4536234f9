//! Injected wall clocks: [`SystemClock`] in production, [`ManualClock`] in tests.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in milliseconds since the UNIX epoch.
///
/// Deadlines are absolute and shared by every replica of a partition, so the clock is a
/// wall clock rather than a monotonic one. Only the proposer side ([`Engine::prepare`],
/// reads and eviction) consults it; the state machine never does.
///
/// [`Engine::prepare`]: super::Engine::prepare
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since 1970-01-01T00:00:00Z.
    fn now_ms(&self) -> u64;
}

impl std::fmt::Debug for dyn Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock(now_ms = {})", self.now_ms())
    }
}

/// The system wall clock (plus the process's injected offset, normally 0).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

/// Milliseconds added to every [`SystemClock`] reading of this process: the Jepsen
/// harness's `clock` nemesis (through `Admin/InjectFault`, only accepted with
/// `server.fault-injection`) skews one node's wall clock as a wrong NTP would. Every
/// node is its own process, so a process-wide offset is a per-node clock.
static CLOCK_OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Sets the offset added to [`SystemClock`] readings; returns the previous one.
pub fn set_clock_offset_ms(offset_ms: i64) -> i64 {
    CLOCK_OFFSET_MS.swap(offset_ms, Ordering::SeqCst)
}

/// The offset added to [`SystemClock`] readings.
pub fn clock_offset_ms() -> i64 {
    CLOCK_OFFSET_MS.load(Ordering::Relaxed)
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock set before 1970 reads as the epoch itself rather than panicking.
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        let now = u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX);
        let offset = clock_offset_ms();
        if offset >= 0 {
            now.saturating_add(offset.unsigned_abs())
        } else {
            now.saturating_sub(offset.unsigned_abs())
        }
    }
}

/// A clock that only moves when told to, for deterministic tests.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: AtomicU64,
}

impl ManualClock {
    /// A clock reading `start_ms`.
    pub fn new(start_ms: u64) -> Self {
        Self {
            now_ms: AtomicU64::new(start_ms),
        }
    }

    /// Moves the clock forward by `by` (saturating at `u64::MAX` ms).
    pub fn advance(&self, by: Duration) {
        let by_ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        // fetch_update only fails when the closure returns None, which it never does.
        let _ = self
            .now_ms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_add(by_ms))
            });
    }

    /// Sets the clock to `ms` (it may move backwards, like a wall clock can).
    pub fn set(&self, ms: u64) {
        self.now_ms.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(Duration::from_millis(250));
        assert_eq!(clock.now_ms(), 1_250);
        clock.set(5);
        assert_eq!(clock.now_ms(), 5);
        clock.set(u64::MAX - 1);
        clock.advance(Duration::from_secs(1));
        assert_eq!(clock.now_ms(), u64::MAX);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now_ms() > 1_577_836_800_000);
    }
}
