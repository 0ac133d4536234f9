//! What can go wrong in a client call, and the one mapping from a gRPC status to it.
//!
//! A node puts an [`ErrorDetail`] with a machine-readable code into every error
//! status it returns; [`ClientError::from_status`] turns that code (and the sizes and
//! limits the detail carries) into a variant with fields. Statuses without a detail
//! come from the transport or from tonic itself and keep their gRPC code.

use raftcache_proto::tonic::{Code, ConnectError, Status};
use raftcache_proto::v1::{ErrorCode, ErrorDetail};
use std::time::Duration;

/// The result of a client call.
pub type Result<T> = std::result::Result<T, ClientError>;

/// An error from a client call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The node that answered does not lead the key's partition (or no leader is
    /// known yet). The client goes to the hinted leader, or refreshes its cluster map,
    /// and retries by itself within its attempt and time budget.
    #[error("{}", not_leader_message(*partition, *leader_id, leader_addr.as_deref()))]
    NotLeader {
        /// The partition concerned, when known.
        partition: Option<u32>,
        /// The leader's node id, when the node knows it.
        leader_id: Option<u64>,
        /// The leader's client address, when the node knows it.
        leader_addr: Option<String>,
    },
    /// The request was routed with a cluster-map epoch the node does not accept.
    /// The client refreshes its cluster map and retries by itself within its attempt
    /// and time budget.
    #[error("{}", wrong_epoch_message(*epoch))]
    WrongEpoch {
        /// The node's current epoch, when it said.
        epoch: Option<u64>,
    },
    /// The node was removed from its cluster and serves no keys (the message names it
    /// and the cluster). The client refreshes its map from its configured endpoints,
    /// skipping that node, and retries by itself within its attempt and time budget.
    #[error("{0}")]
    Removed(String),
    /// The node belongs to another cluster than the map the request was routed with
    /// (the cluster was restarted on the same addresses, or a leftover node of an old
    /// cluster answered). The client refreshes its map from its configured endpoints
    /// and retries by itself within its attempt and time budget.
    #[error("{0}")]
    WrongCluster(String),
    /// The key is longer than the node accepts.
    #[error("key is {size} bytes, over the {limit}-byte limit")]
    KeyTooLarge {
        /// The key's length in bytes.
        size: u64,
        /// The node's `max-key-size`.
        limit: u64,
    },
    /// The value is longer than the node accepts.
    #[error("value is {size} bytes, over the {limit}-byte limit")]
    ValueTooLarge {
        /// The value's length in bytes.
        size: u64,
        /// The node's `max-value-size`.
        limit: u64,
    },
    /// Keys must be at least one byte long.
    #[error("key is empty")]
    EmptyKey,
    /// The node reached its memory limit under the `noeviction` policy.
    #[error("node is out of memory: the {limit}-byte max-memory limit is reached and the policy is noeviction")]
    OutOfMemory {
        /// The node's `max-memory` in bytes.
        limit: u64,
    },
    /// `incr` on a value that is not a base-10 signed 64-bit integer.
    #[error("value is not an integer")]
    NotAnInteger,
    /// `incr` would leave the signed 64-bit range.
    #[error("increment would overflow a signed 64-bit integer")]
    IncrOverflow,
    /// A TTL too long for the node to represent.
    #[error("TTL is out of range, over the {limit_ms} ms limit")]
    TtlOutOfRange {
        /// The longest TTL the node accepts, in milliseconds.
        limit_ms: u64,
    },
    /// A `min_lsn` read: CDC had not applied Postgres up to that position on the
    /// key's partition within the deadline (is `raftcache-cdc` running?).
    #[error("{}", lsn_not_reached_message(*partition, *watermark))]
    LsnNotReached {
        /// The partition concerned, when known.
        partition: Option<u32>,
        /// The partition's CDC watermark when the node gave up, when it said.
        watermark: Option<crate::Lsn>,
    },
    /// A CDC batch carried a fencing token older than one the partition already
    /// accepted: another `raftcache-cdc` worker took over the lease.
    #[error("fenced: a newer CDC worker holds the lease (partition token {current})")]
    Fenced {
        /// The partition's current fencing token.
        current: u64,
    },
    /// The node rejected the request as malformed; the message says why.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The node is shutting down or not ready yet, or the connection broke while the
    /// request was under way (so it may or may not have been applied).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// No connection to the node could be made: the request was never sent.
    #[error("node unreachable: {0}")]
    Unreachable(String),
    /// No answer came within the request timeout.
    #[error("request timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// A write's outcome is unknown: an earlier attempt may have applied (it timed out
    /// or its connection broke after sending), and the last attempt, refused for routing,
    /// says nothing about it. The write's request id makes it apply at most once.
    #[error("outcome unknown: an earlier attempt may have applied; the last one failed: {0}")]
    MaybeApplied(Box<ClientError>),
    /// The node's circuit breaker is open (it failed repeatedly just now): the
    /// request was not sent. See [`BreakerConfig`](crate::breaker::BreakerConfig).
    #[error("circuit breaker open for node {0}: it failed repeatedly, not asking it for now")]
    CircuitOpen(String),
    /// Connecting to an endpoint (and fetching its cluster map) failed.
    #[error("cannot connect to {endpoint}: {message}")]
    Connect {
        /// The endpoint as configured.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// The configuration lists no endpoint to connect to.
    #[error("no endpoints configured")]
    NoEndpoints,
    /// A configured endpoint is not a usable `host:port` (no port, an unparsable
    /// address): a configuration error, reported by [`Client::connect`] at once.
    ///
    /// [`Client::connect`]: crate::Client::connect
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Something answers at the endpoint, but not raftcache's gRPC (HTTP/2) service:
    /// an HTTP/1 server (a node's metrics port), a Redis-protocol port, anything else.
    /// A configuration error, reported by [`Client::connect`] at once.
    ///
    /// [`Client::connect`]: crate::Client::connect
    #[error("{0} is not a raftcache gRPC endpoint (is it the RESP or metrics port?)")]
    NotGrpcEndpoint(String),
    /// Nothing accepts connections at the endpoint (connection refused).
    #[error("nothing listens on {0}")]
    NothingListens(String),
    /// A node's answer breaks the protocol (an unusable cluster map, a multi-get
    /// answer of the wrong length, ...).
    #[error("invalid response from the cluster: {0}")]
    InvalidResponse(String),
    /// Any other gRPC error.
    #[error("server error ({code:?}): {message}")]
    Server {
        /// The gRPC status code.
        code: Code,
        /// The status message.
        message: String,
    },
}

impl ClientError {
    /// Maps a status from a node (or from the transport) to a client error: by the
    /// code of its [`ErrorDetail`] when it has one, else by its gRPC code.
    ///
    /// A size or range detail that lacks its figures keeps the node's own message
    /// as a [`ClientError::Server`] rather than showing made-up numbers.
    pub fn from_status(status: &Status) -> ClientError {
        let message = status_message(status);
        let server = |message: String| ClientError::Server {
            code: status.code(),
            message,
        };
        let Some(detail) = ErrorDetail::from_status(status) else {
            return match status.code() {
                Code::Unavailable if is_connect_failure(status) => {
                    ClientError::Unreachable(message)
                }
                Code::Unavailable => ClientError::Unavailable(message),
                // A connection that broke under the request (reset by a node that died):
                // tonic reports it as `Unknown`. The node may or may not have applied it.
                Code::Unknown if is_transport_failure(status) => ClientError::Unavailable(message),
                // The connection was closed by an HTTP/2 protocol error (e.g. a starved
                // node's `too_many_resets` GOAWAY): not the request's fault, and it may
                // or may not have been applied.
                _ if status.message().starts_with("h2 protocol error") => {
                    ClientError::Unavailable(message)
                }
                _ => server(message),
            };
        };
        match detail.code() {
            ErrorCode::NotLeader => ClientError::NotLeader {
                partition: detail.partition,
                leader_id: detail.leader_id.filter(|&id| id != 0),
                leader_addr: detail.leader_addr.filter(|a| !a.is_empty()),
            },
            ErrorCode::WrongEpoch => ClientError::WrongEpoch {
                epoch: detail.epoch,
            },
            ErrorCode::KeyTooLarge => match (detail.actual, detail.limit) {
                (Some(size), Some(limit)) => ClientError::KeyTooLarge { size, limit },
                _ => server(message),
            },
            ErrorCode::ValueTooLarge => match (detail.actual, detail.limit) {
                (Some(size), Some(limit)) => ClientError::ValueTooLarge { size, limit },
                _ => server(message),
            },
            ErrorCode::EmptyKey => ClientError::EmptyKey,
            ErrorCode::OutOfMemory => match detail.limit {
                Some(limit) => ClientError::OutOfMemory { limit },
                None => server(message),
            },
            ErrorCode::NotAnInteger => ClientError::NotAnInteger,
            ErrorCode::IncrOverflow => ClientError::IncrOverflow,
            ErrorCode::TtlOutOfRange => match detail.limit {
                Some(limit_ms) => ClientError::TtlOutOfRange { limit_ms },
                None => server(message),
            },
            ErrorCode::LsnNotReached => ClientError::LsnNotReached {
                partition: detail.partition,
                watermark: detail.actual.map(crate::Lsn),
            },
            ErrorCode::Fenced => ClientError::Fenced {
                current: detail.limit.unwrap_or(0),
            },
            ErrorCode::Removed => ClientError::Removed(message),
            ErrorCode::WrongCluster => ClientError::WrongCluster(message),
            ErrorCode::InvalidArgument => ClientError::InvalidArgument(message),
            ErrorCode::Unavailable => ClientError::Unavailable(message),
            ErrorCode::Internal | ErrorCode::Unspecified => server(message),
        }
    }

    /// Whether a fresher cluster map may make the same request succeed.
    pub fn is_routing(&self) -> bool {
        matches!(
            self,
            ClientError::NotLeader { .. }
                | ClientError::WrongEpoch { .. }
                | ClientError::Removed(_)
                | ClientError::WrongCluster(_)
        )
    }

    /// Whether the node that answered is no member of the cluster the client routes
    /// for (`REMOVED`, `WRONG_CLUSTER`): the next map must come from the configured
    /// endpoints, not from that node.
    pub fn is_foreign_node(&self) -> bool {
        matches!(self, ClientError::Removed(_) | ClientError::WrongCluster(_))
    }

    /// Whether the request surely had no effect: a node refused it for routing
    /// (`NOT_LEADER`, `WRONG_EPOCH`) or it was never sent (no connection). Such a
    /// failure may be retried even for a write that must not apply twice.
    pub fn is_unapplied(&self) -> bool {
        self.is_routing()
            || matches!(
                self,
                ClientError::Unreachable(_) | ClientError::CircuitOpen(_)
            )
    }

    /// Whether retrying the same request later (after a map refresh) may succeed:
    /// [`ClientError::is_unapplied`] failures, an unavailable node, a timeout. The
    /// request may have been applied when this is true but `is_unapplied` is not.
    pub fn is_transient(&self) -> bool {
        self.is_unapplied()
            || matches!(
                self,
                ClientError::Unavailable(_)
                    | ClientError::Timeout(_)
                    | ClientError::MaybeApplied(_)
            )
    }
}

/// Whether `status` is tonic's report of a broken connection rather than an answer
/// from a node (a transport error in its source chain, or its message says so).
fn is_transport_failure(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<raftcache_proto::tonic::transport::Error>()
            .is_some()
        {
            return true;
        }
        source = cause.source();
    }
    status.message().starts_with("transport error")
}

/// Whether `status` comes from failing to connect (tonic's `ConnectError` is in its
/// source chain), as opposed to a connection that broke under a request.
fn is_connect_failure(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        if cause.downcast_ref::<ConnectError>().is_some() {
            return true;
        }
        source = cause.source();
    }
    false
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        ClientError::from_status(&status)
    }
}

/// The status message, followed by its error sources (a transport failure's message
/// is often just "transport error"; the cause is in the source chain).
fn status_message(status: &Status) -> String {
    let message = with_sources(
        status.message().to_owned(),
        std::error::Error::source(status),
    );
    if message.is_empty() {
        status.code().description().to_owned()
    } else {
        message
    }
}

/// An error and its sources on one line, `outer: inner: innermost`, skipping a
/// source whose text the line already holds.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    with_sources(error.to_string(), error.source())
}

fn with_sources(mut line: String, mut source: Option<&dyn std::error::Error>) -> String {
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

fn lsn_not_reached_message(partition: Option<u32>, watermark: Option<crate::Lsn>) -> String {
    let mut m = match partition {
        Some(p) => format!("CDC has not reached the requested LSN on partition {p}"),
        None => "CDC has not reached the requested LSN".to_owned(),
    };
    if let Some(w) = watermark {
        m.push_str(&format!(" (it is at {w})"));
    }
    m.push_str("; is raftcache-cdc running?");
    m
}

fn not_leader_message(
    partition: Option<u32>,
    leader_id: Option<u64>,
    leader_addr: Option<&str>,
) -> String {
    let mut m = match partition {
        Some(p) => format!("not the leader of partition {p}"),
        None => "not the leader of the partition".to_owned(),
    };
    match (leader_id, leader_addr) {
        (Some(id), Some(addr)) => m.push_str(&format!("; the leader is node {id} at {addr}")),
        (Some(id), None) => m.push_str(&format!("; the leader is node {id}")),
        (None, Some(addr)) => m.push_str(&format!("; the leader is at {addr}")),
        (None, None) => m.push_str("; no leader is known"),
    }
    m
}

fn wrong_epoch_message(epoch: Option<u64>) -> String {
    match epoch {
        Some(e) => format!("stale cluster map: the node is at epoch {e}"),
        None => "stale cluster map: the node is at another epoch".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_connection_is_transient_but_not_surely_unapplied() {
        let e = ClientError::from_status(&Status::unknown(
            "transport error: connection error: connection reset",
        ));
        assert!(matches!(e, ClientError::Unavailable(_)), "{e:?}");
        assert!(e.is_transient() && !e.is_unapplied());
        // Any other `Unknown` from a node stays a server error.
        let e = ClientError::from_status(&Status::unknown("boom"));
        assert!(matches!(e, ClientError::Server { .. }), "{e:?}");
        assert!(!e.is_transient());
        // A connection closed by an HTTP/2 protocol error (seen on a starved node).
        let e = ClientError::from_status(&Status::resource_exhausted(
            "h2 protocol error: error reading a body from connection: too_many_resets",
        ));
        assert!(matches!(e, ClientError::Unavailable(_)), "{e:?}");
        assert!(e.is_transient() && !e.is_unapplied());
        let e = ClientError::from_status(&Status::resource_exhausted("quota"));
        assert!(matches!(e, ClientError::Server { .. }), "{e:?}");
    }

    fn status_with(detail: ErrorDetail, message: &str) -> Status {
        detail.into_status(message)
    }

    fn detail(code: ErrorCode) -> ErrorDetail {
        ErrorDetail::of(code)
    }

    #[test]
    fn size_errors_carry_size_and_limit() {
        let mut d = detail(ErrorCode::KeyTooLarge);
        d.actual = Some(20000);
        d.limit = Some(16384);
        let e = ClientError::from_status(&status_with(d, "key too large"));
        assert_eq!(
            e,
            ClientError::KeyTooLarge {
                size: 20000,
                limit: 16384
            }
        );
        assert_eq!(
            e.to_string(),
            "key is 20000 bytes, over the 16384-byte limit"
        );

        let mut d = detail(ErrorCode::ValueTooLarge);
        d.actual = Some(17_000_000);
        d.limit = Some(16_777_216);
        assert_eq!(
            ClientError::from_status(&status_with(d, "value too large")).to_string(),
            "value is 17000000 bytes, over the 16777216-byte limit"
        );
    }

    #[test]
    fn a_size_error_without_figures_keeps_the_node_message() {
        let e = ClientError::from_status(&status_with(detail(ErrorCode::KeyTooLarge), "too big"));
        assert_eq!(
            e,
            ClientError::Server {
                code: Code::InvalidArgument,
                message: "too big".into()
            }
        );
    }

    #[test]
    fn not_leader_keeps_the_hint() {
        let mut d = detail(ErrorCode::NotLeader);
        d.partition = Some(3);
        d.leader_id = Some(2);
        d.leader_addr = Some("127.0.0.1:7002".into());
        let e = ClientError::from_status(&status_with(d, "not leader"));
        assert_eq!(
            e,
            ClientError::NotLeader {
                partition: Some(3),
                leader_id: Some(2),
                leader_addr: Some("127.0.0.1:7002".into())
            }
        );
        assert!(e.is_routing());
        assert_eq!(
            e.to_string(),
            "not the leader of partition 3; the leader is node 2 at 127.0.0.1:7002"
        );

        // A zero id or an empty address is "unknown", not a node to go to.
        let mut d = detail(ErrorCode::NotLeader);
        d.leader_id = Some(0);
        d.leader_addr = Some(String::new());
        assert_eq!(
            ClientError::from_status(&status_with(d, "")),
            ClientError::NotLeader {
                partition: None,
                leader_id: None,
                leader_addr: None
            }
        );
    }

    #[test]
    fn removed_and_wrong_cluster_are_unapplied_routing_errors() {
        let msg = "node 4 was removed from cluster 00000000000000aa; it can be shut down";
        let e = ClientError::from_status(&status_with(detail(ErrorCode::Removed), msg));
        assert_eq!(e, ClientError::Removed(msg.into()));
        assert_eq!(e.to_string(), msg);
        let w = ClientError::from_status(&status_with(detail(ErrorCode::WrongCluster), "w"));
        assert_eq!(w, ClientError::WrongCluster("w".into()));
        for e in [e, w] {
            assert!(e.is_routing() && e.is_unapplied() && e.is_transient());
            assert!(e.is_foreign_node());
        }
        assert!(!ClientError::WrongEpoch { epoch: None }.is_foreign_node());
    }

    #[test]
    fn wrong_epoch_and_the_plain_codes() {
        let mut d = detail(ErrorCode::WrongEpoch);
        d.epoch = Some(7);
        let e = ClientError::from_status(&status_with(d, "wrong epoch"));
        assert_eq!(e, ClientError::WrongEpoch { epoch: Some(7) });
        assert!(e.is_routing());

        let cases = [
            (ErrorCode::EmptyKey, ClientError::EmptyKey),
            (ErrorCode::NotAnInteger, ClientError::NotAnInteger),
            (ErrorCode::IncrOverflow, ClientError::IncrOverflow),
            (
                ErrorCode::InvalidArgument,
                ClientError::InvalidArgument("msg".into()),
            ),
            (
                ErrorCode::Unavailable,
                ClientError::Unavailable("msg".into()),
            ),
            (
                ErrorCode::Internal,
                ClientError::Server {
                    code: Code::Internal,
                    message: "msg".into(),
                },
            ),
        ];
        for (code, want) in cases {
            let got = ClientError::from_status(&status_with(detail(code), "msg"));
            assert_eq!(got, want, "{code:?}");
            assert!(!got.is_routing());
        }
        assert_eq!(
            ClientError::NotAnInteger.to_string(),
            "value is not an integer"
        );
    }

    #[test]
    fn limits_are_named() {
        let mut d = detail(ErrorCode::OutOfMemory);
        d.limit = Some(1 << 20);
        let e = ClientError::from_status(&status_with(d, "oom"));
        assert_eq!(e, ClientError::OutOfMemory { limit: 1 << 20 });
        assert!(e.to_string().contains("1048576-byte max-memory limit"));

        let mut d = detail(ErrorCode::TtlOutOfRange);
        d.limit = Some(3_155_760_000_000);
        let e = ClientError::from_status(&status_with(d, "ttl"));
        assert_eq!(
            e.to_string(),
            "TTL is out of range, over the 3155760000000 ms limit"
        );
    }

    #[test]
    fn statuses_without_detail_keep_their_code() {
        assert_eq!(
            ClientError::from_status(&Status::unavailable("connection refused")),
            ClientError::Unavailable("connection refused".into())
        );
        assert_eq!(
            ClientError::from_status(&Status::resource_exhausted("message too large")),
            ClientError::Server {
                code: Code::ResourceExhausted,
                message: "message too large".into()
            }
        );
        // No message at all: the code's description stands in.
        let e = ClientError::from_status(&Status::new(Code::Internal, ""));
        assert!(matches!(e, ClientError::Server { ref message, .. } if !message.is_empty()));
    }

    #[test]
    fn timeout_names_the_duration() {
        assert_eq!(
            ClientError::Timeout(Duration::from_millis(1500)).to_string(),
            "request timed out after 1s 500ms"
        );
    }
}
