//! How a [`Client`](crate::Client) connects: seed endpoints, timeouts, message size.

use std::time::Duration;

/// The endpoint a client uses when none is given: the first node of `raftcache dev`.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7001";

/// Settings of a [`Client`](crate::Client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Seed nodes, `host:port` with an optional `http://` scheme. The client asks them
    /// in order for the cluster map; after that it talks to the nodes the map lists.
    pub endpoints: Vec<String>,
    /// How long opening a TCP connection to a node may take.
    pub connect_timeout: Duration,
    /// How long one request may take, connecting included; past it the call fails
    /// with [`ClientError::Timeout`](crate::ClientError::Timeout).
    pub request_timeout: Duration,
    /// The largest gRPC message sent or accepted, in bytes. Above the node's 16 MiB
    /// value limit so that the largest values (and multi-gets of them) pass.
    pub max_message_bytes: usize,
}

impl ClientConfig {
    /// The default settings with these seed endpoints.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> ClientConfig {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..ClientConfig::default()
        }
    }
}

impl Default for ClientConfig {
    /// [`DEFAULT_ENDPOINT`], a 2 s connect timeout, a 5 s request timeout and 64 MiB
    /// messages.
    fn default() -> Self {
        ClientConfig {
            endpoints: vec![DEFAULT_ENDPOINT.to_owned()],
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            max_message_bytes: 64 << 20,
        }
    }
}
