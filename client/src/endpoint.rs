//! What a configured endpoint must look like, and what actually answers at one whose
//! first cluster-map fetch failed.
//!
//! An operator who points `--endpoints` at the wrong port should read which port and
//! why, not an HTTP/2 error: [`check`] refuses an endpoint without a port (or one that
//! is no address at all) before anything is sent, and [`probe`] tells a port nothing
//! listens on from one that answers something other than HTTP/2 (a node's metrics
//! port speaks HTTP/1, its RESP port the Redis protocol). The probe only runs after a
//! fetch failed, so a healthy connect costs nothing extra.

use crate::error::ClientError;
use raftcache_proto::tonic::transport::Endpoint;
use std::io::ErrorKind;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The HTTP/2 client connection preface followed by an empty SETTINGS frame: an
/// HTTP/2 server answers with a SETTINGS frame of its own.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
/// The frame type of SETTINGS.
const SETTINGS: u8 = 0x04;
/// How long the probe waits for the first bytes of the answer.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest the probe waits for its TCP connection.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks that `endpoint` is `host:port` or `http(s)://host:port`.
///
/// # Errors
/// [`ClientError::InvalidEndpoint`] naming the endpoint and what is wrong.
pub(crate) fn check(endpoint: &str) -> Result<(), ClientError> {
    let invalid = |reason: String| {
        Err(ClientError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason,
        })
    };
    let authority = match endpoint.split_once("://") {
        None => endpoint,
        Some(("http" | "https", rest)) => rest.strip_suffix('/').unwrap_or(rest),
        Some((scheme, _)) => {
            return invalid(format!(
                "unsupported scheme {scheme:?} (expected host:port, e.g. 127.0.0.1:7001)"
            ))
        }
    };
    if authority.is_empty() {
        return invalid("empty (expected host:port, e.g. 127.0.0.1:7001)".into());
    }
    if authority.contains('/') {
        return invalid("a path is not allowed (expected host:port, e.g. 127.0.0.1:7001)".into());
    }
    let port = match authority.strip_prefix('[') {
        // [IPv6]:port
        Some(bracketed) => bracketed.split_once("]:").map(|(_, port)| port),
        None => match authority.split_once(':') {
            Some((_, port)) if !port.contains(':') => Some(port),
            Some(_) => {
                return invalid(
                    "an IPv6 address needs brackets (expected [addr]:port, e.g. [::1]:7001)".into(),
                )
            }
            None => None,
        },
    };
    let Some(port) = port else {
        return invalid("no port (expected host:port, e.g. 127.0.0.1:7001)".into());
    };
    match port.parse::<u16>() {
        Ok(0) => return invalid("port 0 is not a port to connect to".into()),
        Ok(_) => {}
        Err(_) => return invalid(format!("{port:?} is not a port number")),
    }
    let uri = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    if let Err(e) = Endpoint::from_shared(uri) {
        return invalid(crate::error::error_chain(&e));
    }
    Ok(())
}

/// What answers at an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// An HTTP/2 server (a gRPC endpoint, or at least something that might be one).
    Http2,
    /// Something that accepted the connection but does not speak HTTP/2.
    NotHttp2,
    /// The connection was refused: nothing listens there.
    Refused,
    /// Cannot tell (no answer in time, a name that does not resolve, TLS, ...).
    Unknown,
}

/// Connects to `endpoint`, sends the HTTP/2 preface and looks at the first bytes of
/// the answer. Takes at most `min(connect_timeout, 1 s)` plus 1 s.
pub(crate) async fn probe(endpoint: &str, connect_timeout: Duration) -> Probe {
    let authority = match endpoint.split_once("://") {
        None => endpoint,
        Some(("http", rest)) => rest.strip_suffix('/').unwrap_or(rest),
        // TLS (or anything else) cannot be told apart by plain bytes.
        Some(_) => return Probe::Unknown,
    };
    let timeout = connect_timeout.min(MAX_CONNECT_TIMEOUT);
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(authority)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => return Probe::Refused,
        Ok(Err(_)) | Err(_) => return Probe::Unknown,
    };
    match tokio::time::timeout(READ_TIMEOUT, first_bytes(stream)).await {
        Ok(Some(bytes)) => classify(&bytes),
        // A write or read error: the peer reset the connection on the preface.
        Ok(None) => Probe::NotHttp2,
        // Silent: maybe a server that waits for more (or a stuck node).
        Err(_) => Probe::Unknown,
    }
}

/// Sends the preface and reads up to one frame header (9 bytes), or until the peer
/// closes. `None` on an I/O error.
async fn first_bytes(mut stream: TcpStream) -> Option<Vec<u8>> {
    stream.write_all(H2_PREFACE).await.ok()?;
    let mut buf = [0u8; 9];
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) if got > 0 => break,
            Err(_) => return None,
        }
    }
    Some(buf[..got].to_vec())
}

/// An HTTP/2 server's first frame is SETTINGS on stream 0; anything else (an HTTP/1
/// status line, a Redis error, a closed connection) is not HTTP/2.
fn classify(first: &[u8]) -> Probe {
    match first {
        [_, _, _, kind, _, 0, 0, 0, 0] if *kind == SETTINGS => Probe::Http2,
        _ => Probe::NotHttp2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(endpoint: &str) -> String {
        match check(endpoint) {
            Err(ClientError::InvalidEndpoint {
                endpoint: e,
                reason,
            }) => {
                assert_eq!(e, endpoint);
                reason
            }
            other => panic!("{endpoint}: {other:?}"),
        }
    }

    #[test]
    fn endpoints_need_a_host_and_a_port() {
        for ok in [
            "127.0.0.1:7001",
            "localhost:7001",
            "http://node-1:7001",
            "http://node-1:7001/",
            "[::1]:7001",
            "http://[::1]:7001",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        assert!(reason("127.0.0.1").starts_with("no port"));
        assert!(reason("http://node-1").starts_with("no port"));
        assert!(reason("[::1]").starts_with("no port"));
        assert!(reason("").starts_with("empty"));
        assert!(reason("127.0.0.1:70000").contains("not a port number"));
        assert!(reason("127.0.0.1:").contains("not a port number"));
        assert!(reason("127.0.0.1:0").contains("port 0"));
        assert!(reason("::1:7001").contains("brackets"));
        assert!(reason("redis://127.0.0.1:6379").contains("unsupported scheme"));
        assert!(reason("127.0.0.1:7001/x").contains("path"));
        assert!(check("bad host:7001").is_err());
        assert_eq!(
            check("127.0.0.1").unwrap_err().to_string(),
            "invalid endpoint \"127.0.0.1\": no port (expected host:port, e.g. 127.0.0.1:7001)"
        );
    }

    #[test]
    fn only_a_settings_frame_is_http2() {
        assert_eq!(classify(&[0, 0, 6, 4, 0, 0, 0, 0, 0]), Probe::Http2);
        assert_eq!(classify(&[0, 0, 0, 4, 1, 0, 0, 0, 0]), Probe::Http2);
        assert_eq!(classify(b"HTTP/1.1 "), Probe::NotHttp2);
        assert_eq!(classify(b"-ERR unkn"), Probe::NotHttp2);
        assert_eq!(classify(b""), Probe::NotHttp2);
        assert_eq!(classify(&[0, 0, 6, 4, 0, 0, 0, 0, 1]), Probe::NotHttp2);
    }

    async fn serve_once(answer: &'static [u8]) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(answer).await;
        });
        addr
    }

    #[tokio::test]
    async fn the_probe_tells_http1_resp_and_closed_ports_apart() {
        let http1 = serve_once(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        assert_eq!(probe(&http1, Duration::from_secs(1)).await, Probe::NotHttp2);
        let resp = serve_once(b"-ERR unknown command 'PRI'\r\n").await;
        assert_eq!(probe(&resp, Duration::from_secs(1)).await, Probe::NotHttp2);
        let closes = serve_once(b"").await;
        assert_eq!(
            probe(&closes, Duration::from_secs(1)).await,
            Probe::NotHttp2
        );
        let h2 = serve_once(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
        assert_eq!(probe(&h2, Duration::from_secs(1)).await, Probe::Http2);
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        assert_eq!(probe(&free, Duration::from_secs(1)).await, Probe::Refused);
    }
}
