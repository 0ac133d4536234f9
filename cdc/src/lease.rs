//! The worker lease: at most one worker streams a slot at a time.
//!
//! The lease is a key in the cache itself, `__raftcache:cdc:lease:<slot>`, holding the
//! holder's id with a TTL. A worker takes it with `Set IF_ABSENT` and renews it every
//! third of the TTL with `Set IF_VERSION` (so a renewal of a lease that expired and was
//! taken by another worker fails). The **fencing token** is the key's version when it was
//! taken: versions are Raft log indexes of the key's partition, so a later holder always
//! has a larger token. Every `ApplyChanges` carries the token and each partition refuses
//! tokens older than the largest it has seen, so a worker that lost its lease (paused,
//! partitioned) cannot write behind its successor's back.

use bytes::Bytes;
use raftcache_client::{Client, Condition, SetOptions};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The cache key of the lease of `slot`.
pub fn lease_key(slot: &str) -> String {
    format!("__raftcache:cdc:lease:{slot}")
}

/// A held lease. Dropping it stops the renewal task (the lease then expires by itself;
/// [`Lease::release`] gives it up at once).
pub struct Lease {
    /// The fencing token: the version of the lease key when it was taken.
    pub token: u64,
    /// Cancelled when the lease is lost (renewal refused, or not renewed in time).
    pub lost: CancellationToken,
    renew: tokio::task::JoinHandle<()>,
    client: Client,
    key: String,
    version: Arc<std::sync::atomic::AtomicU64>,
}

impl Lease {
    /// Tries once to take the lease of `slot` for `holder`; `None` when someone holds it.
    ///
    /// # Errors
    /// Cache errors.
    pub async fn try_acquire(
        client: &Client,
        slot: &str,
        holder: &str,
        ttl: Duration,
    ) -> raftcache_client::Result<Option<Lease>> {
        let key = lease_key(slot);
        let options = SetOptions {
            ttl: Some(ttl),
            condition: Condition::IfAbsent,
            ..SetOptions::default()
        };
        let taken_at = Instant::now();
        let version = match client
            .set_with(&key, Bytes::from(holder.to_owned()), options)
            .await
        {
            Ok(outcome) if outcome.applied => Some(outcome.version),
            Ok(_) => None,
            Err(e) => return Err(e),
        };
        let Some(version) = version else {
            // Our own earlier attempt may have applied with its answer lost.
            match client.get(&key).await? {
                Some(v) if v.value.as_ref() == holder.as_bytes() => {
                    return Ok(Some(Lease::start(
                        client, key, holder, ttl, v.version, taken_at,
                    )))
                }
                _ => return Ok(None),
            }
        };
        Ok(Some(Lease::start(
            client, key, holder, ttl, version, taken_at,
        )))
    }

    fn start(
        client: &Client,
        key: String,
        holder: &str,
        ttl: Duration,
        version: u64,
        taken_at: Instant,
    ) -> Lease {
        let lost = CancellationToken::new();
        let current = Arc::new(std::sync::atomic::AtomicU64::new(version));
        let renew = tokio::spawn(renew_loop(
            client.clone(),
            key.clone(),
            holder.to_owned(),
            ttl,
            current.clone(),
            taken_at,
            lost.clone(),
        ));
        Lease {
            token: version,
            lost,
            renew,
            client: client.clone(),
            key,
            version: current,
        }
    }

    /// Gives the lease up now (a standby may take it at once).
    pub async fn release(self) {
        self.renew.abort();
        let version = self.version.load(std::sync::atomic::Ordering::SeqCst);
        // Only delete it if it is still ours: overwrite-if-version with a 1 ms TTL.
        let options = SetOptions {
            ttl: Some(Duration::from_millis(1)),
            condition: Condition::IfVersion(version),
            ..SetOptions::default()
        };
        if let Err(e) = self.client.set_with(&self.key, "", options).await {
            tracing::debug!(error = %e, "could not release the lease; it will expire");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
    }
}

async fn renew_loop(
    client: Client,
    key: String,
    holder: String,
    ttl: Duration,
    version: Arc<std::sync::atomic::AtomicU64>,
    mut valid_from: Instant,
    lost: CancellationToken,
) {
    use std::sync::atomic::Ordering;
    let every = ttl / 3;
    loop {
        tokio::time::sleep(every).await;
        let attempt_at = Instant::now();
        let options = SetOptions {
            ttl: Some(ttl),
            condition: Condition::IfVersion(version.load(Ordering::SeqCst)),
            ..SetOptions::default()
        };
        // Retries of one renewal carry one request id: applied at most once, and a
        // retry answers the first outcome.
        let renewed = client
            .set_with(&key, Bytes::from(holder.clone()), options)
            .await
            .map(|o| (o.applied, o.version));
        match renewed {
            Ok((true, renewed_version)) => {
                version.store(renewed_version, Ordering::SeqCst);
                valid_from = attempt_at;
            }
            Ok(_) => {
                tracing::warn!(key, "CDC lease lost: another worker holds it now");
                lost.cancel();
                return;
            }
            Err(e) => {
                // Keep trying while the lease may still be ours; stop well before it
                // could have expired (with a margin for clock rates).
                if attempt_at.duration_since(valid_from) + every >= ttl.mul_f32(0.8) {
                    tracing::warn!(key, error = %e, "CDC lease not renewed in time; stepping down");
                    lost.cancel();
                    return;
                }
                tracing::debug!(key, error = %e, "lease renewal failed; retrying");
            }
        }
    }
}
