//! One gRPC channel per node address, created on first use and shared afterwards.
//!
//! A tonic [`Channel`] multiplexes every request to a node over one HTTP/2
//! connection and reconnects by itself, so the client never connects per request.
//! Channels are created lazily: a node that is never routed to is never dialled.

use crate::config::ClientConfig;
use crate::error::error_chain;
use raftcache_proto::tonic::transport::{Channel, Endpoint};
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// How often a near cache's watch connection pings its node (HTTP/2 keepalive) ...
const WATCH_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// ... and how long a ping may go unanswered before the connection counts as dead,
/// failing its streams: a dead or frozen node is noticed within about 5 s.
const WATCH_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// The channels of a client, keyed by URI.
#[derive(Debug)]
pub(crate) struct Pool {
    connect_timeout: Duration,
    channels: Mutex<HashMap<String, Channel>>,
    /// The near cache's `Watch` streams, on connections of their own with keepalive
    /// pings: a stream that just waits for events would never notice a dead node, and
    /// the pings' timeout must not cut the request connections of a slow node.
    watch_channels: Mutex<HashMap<String, Channel>>,
}

impl Pool {
    pub(crate) fn new(config: &ClientConfig) -> Pool {
        Pool {
            connect_timeout: config.connect_timeout,
            channels: Mutex::new(HashMap::new()),
            watch_channels: Mutex::new(HashMap::new()),
        }
    }

    /// The channel to `addr` (`host:port`, scheme optional), created if new.
    ///
    /// Must run inside a tokio runtime: a new channel spawns its worker task.
    ///
    /// # Errors
    /// When `addr` is not a valid URI; the message says why.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, String> {
        let uri = to_uri(addr);
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(&uri) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(uri.clone())
            .map_err(|e| error_chain(&e))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(uri, channel.clone());
        Ok(channel)
    }
}

impl Pool {
    /// The channel for `Watch` streams to `addr`, created if new: its own connection,
    /// with HTTP/2 keepalive pings.
    ///
    /// Must run inside a tokio runtime.
    ///
    /// # Errors
    /// When `addr` is not a valid URI.
    pub(crate) fn watch_channel(&self, addr: &str) -> Result<Channel, String> {
        let uri = to_uri(addr);
        let mut channels = self
            .watch_channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(&uri) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(uri.clone())
            .map_err(|e| error_chain(&e))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(WATCH_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(WATCH_KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_lazy();
        channels.insert(uri, channel.clone());
        Ok(channel)
    }
}

/// `host:port` becomes `http://host:port`; an address with a scheme stays as it is.
fn to_uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_is_optional() {
        assert_eq!(to_uri("127.0.0.1:7001"), "http://127.0.0.1:7001");
        assert_eq!(to_uri("http://node-1:7001"), "http://node-1:7001");
        assert_eq!(to_uri("https://node-1:7001"), "https://node-1:7001");
    }

    #[tokio::test]
    async fn channels_are_reused_per_address() {
        let pool = Pool::new(&ClientConfig::default());
        pool.channel("127.0.0.1:7001").unwrap();
        pool.channel("http://127.0.0.1:7001").unwrap();
        pool.channel("127.0.0.1:7002").unwrap();
        assert_eq!(pool.channels.lock().unwrap().len(), 2);
        assert!(pool.channel("bad address with spaces:1").is_err());
    }
}
