//! Tests of the walsender client against a scripted fake server over an in-memory
//! pipe: startup and authentication, simple queries, streaming (including cancel
//! safety under `tokio::select!`), status updates, and malformed server input.
//! SCRAM is covered against a real PostgreSQL in `tests/tests/t60_walsender.rs`.

#![allow(clippy::unwrap_used)]

use super::stream::parse_copy_data;
use super::*;
use bytes::Bytes;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const T: Duration = Duration::from_secs(10);

fn cfg(password: Option<&str>) -> ConnectConfig {
    ConnectConfig {
        host: "fake".into(),
        port: 5432,
        user: "cdc".into(),
        password: password.map(Into::into),
        dbname: "app".into(),
        application_name: "test".into(),
    }
}

/// The server end of the pipe, speaking the backend side of the protocol.
struct Server(DuplexStream);

impl Server {
    async fn startup(&mut self) -> Vec<(String, String)> {
        let len = self.0.read_i32().await.unwrap();
        let mut body = vec![0; usize::try_from(len).unwrap() - 4];
        self.0.read_exact(&mut body).await.unwrap();
        assert_eq!(&body[..4], &0x0003_0000i32.to_be_bytes());
        let parts: Vec<String> = body[4..]
            .split(|&b| b == 0)
            .map(|s| String::from_utf8(s.to_vec()).unwrap())
            .collect();
        parts
            .chunks(2)
            .filter(|c| c.len() == 2 && !c[0].is_empty())
            .map(|c| (c[0].clone(), c[1].clone()))
            .collect()
    }

    async fn recv(&mut self) -> (u8, Vec<u8>) {
        let tag = self.0.read_u8().await.unwrap();
        let len = self.0.read_i32().await.unwrap();
        let mut body = vec![0; usize::try_from(len).unwrap() - 4];
        self.0.read_exact(&mut body).await.unwrap();
        (tag, body)
    }

    async fn send(&mut self, tag: u8, body: &[u8]) {
        self.0.write_all(&frame(tag, body)).await.unwrap();
    }

    async fn auth_ok_ready(&mut self) {
        self.send(b'R', &0i32.to_be_bytes()).await;
        self.send(b'S', b"server_version\x0015.4\x00").await;
        self.send(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]).await;
        self.send(b'N', b"SNOTICE\x00C00000\x00Mhello\x00\x00")
            .await;
        self.send(b'Z', b"I").await;
    }

    async fn error(&mut self, code: &str, message: &str) {
        let body = format!("SFATAL\0VFATAL\0C{code}\0M{message}\0Dsome detail\0\0");
        self.send(b'E', body.as_bytes()).await;
    }

    async fn row(&mut self, cols: &[Option<&str>]) {
        let mut b = i16::try_from(cols.len()).unwrap().to_be_bytes().to_vec();
        for c in cols {
            match c {
                None => b.extend((-1i32).to_be_bytes()),
                Some(s) => {
                    b.extend(i32::try_from(s.len()).unwrap().to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        self.send(b'D', &b).await;
    }
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend(u32::try_from(body.len() + 4).unwrap().to_be_bytes());
    v.extend(body);
    v
}

fn xlog(start: u64, end: u64, time: i64, data: &[u8]) -> Vec<u8> {
    let mut b = vec![b'w'];
    b.extend(start.to_be_bytes());
    b.extend(end.to_be_bytes());
    b.extend(time.to_be_bytes());
    b.extend(data);
    frame(b'd', &b)
}

fn keepalive(end: u64, time: i64, reply: bool) -> Vec<u8> {
    let mut b = vec![b'k'];
    b.extend(end.to_be_bytes());
    b.extend(time.to_be_bytes());
    b.push(u8::from(reply));
    frame(b'd', &b)
}

fn pipe() -> (Box<dyn AsyncStream>, Server) {
    let (a, b) = tokio::io::duplex(1 << 16);
    (Box::new(a), Server(b))
}

/// Runs the client future and the server script together, bounded by [`T`].
async fn run<C, S>(client: C, server: S) -> C::Output
where
    C: std::future::Future,
    S: std::future::Future<Output = ()>,
{
    tokio::time::timeout(T, async { tokio::join!(client, server).0 })
        .await
        .expect("test timed out")
}

#[tokio::test]
async fn cleartext_auth_then_identify_system() {
    let (io, mut srv) = pipe();
    let client = async {
        let mut c = ReplicationConnection::handshake(io, &cfg(Some("secret"))).await?;
        assert_eq!(c.parameter("server_version"), Some("15.4"));
        c.identify_system().await
    };
    let server = async {
        let params = srv.startup().await;
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("user"), Some("cdc"));
        assert_eq!(get("database"), Some("app"));
        assert_eq!(get("replication"), Some("database"));
        assert_eq!(get("application_name"), Some("test"));
        srv.send(b'R', &3i32.to_be_bytes()).await;
        assert_eq!(srv.recv().await, (b'p', b"secret\0".to_vec()));
        srv.auth_ok_ready().await;
        assert_eq!(srv.recv().await, (b'Q', b"IDENTIFY_SYSTEM\0".to_vec()));
        srv.send(b'T', &[0, 0]).await;
        srv.row(&[
            Some("7312345678901234567"),
            Some("1"),
            Some("0/16B3748"),
            Some("app"),
        ])
        .await;
        srv.send(b'C', b"IDENTIFY_SYSTEM\0").await;
        srv.send(b'Z', b"I").await;
    };
    let info = run(client, server).await.unwrap();
    assert_eq!(
        info,
        SystemInfo {
            systemid: "7312345678901234567".into(),
            timeline: 1,
            xlogpos: Lsn(0x16B_3748),
            dbname: Some("app".into())
        }
    );
}

#[tokio::test]
async fn md5_auth() {
    let (io, mut srv) = pipe();
    let config = cfg(Some("pw"));
    let client = ReplicationConnection::handshake(io, &config);
    let server = async {
        srv.startup().await;
        let mut body = 5i32.to_be_bytes().to_vec();
        body.extend([1, 2, 3, 4]);
        srv.send(b'R', &body).await;
        let (tag, got) = srv.recv().await;
        let want = md5_hash(b"cdc", b"pw", [1, 2, 3, 4]);
        assert_eq!((tag, got), (b'p', format!("{want}\0").into_bytes()));
        srv.auth_ok_ready().await;
    };
    run(client, server).await.unwrap();
}

#[tokio::test]
async fn auth_failures_are_auth_errors() {
    // The server rejects the password.
    let (io, mut srv) = pipe();
    let config = cfg(Some("wrong"));
    let client = ReplicationConnection::handshake(io, &config);
    let server = async {
        srv.startup().await;
        srv.send(b'R', &3i32.to_be_bytes()).await;
        srv.recv().await;
        srv.error("28P01", "password authentication failed for user \"cdc\"")
            .await;
    };
    let e = run(client, server).await.unwrap_err();
    assert!(
        matches!(&e, Error::Auth(m) if m.contains("password authentication failed") && m.contains("28P01")),
        "{e:?}"
    );

    // A password is needed and none is configured.
    let (io, mut srv) = pipe();
    let config = cfg(None);
    let client = ReplicationConnection::handshake(io, &config);
    let server = async {
        srv.startup().await;
        srv.send(b'R', &3i32.to_be_bytes()).await;
    };
    let e = run(client, server).await.unwrap_err();
    assert!(
        matches!(&e, Error::Auth(m) if m.contains("none is configured")),
        "{e:?}"
    );

    // Only channel binding is offered.
    let (io, mut srv) = pipe();
    let config = cfg(Some("pw"));
    let client = ReplicationConnection::handshake(io, &config);
    let server = async {
        srv.startup().await;
        let mut body = 10i32.to_be_bytes().to_vec();
        body.extend(b"SCRAM-SHA-256-PLUS\0\0");
        srv.send(b'R', &body).await;
    };
    let e = run(client, server).await.unwrap_err();
    assert!(
        matches!(&e, Error::Auth(m) if m.contains("SCRAM-SHA-256-PLUS")),
        "{e:?}"
    );

    // A bogus SCRAM server-first message.
    let (io, mut srv) = pipe();
    let config = cfg(Some("pw"));
    let client = ReplicationConnection::handshake(io, &config);
    let server = async {
        srv.startup().await;
        let mut body = 10i32.to_be_bytes().to_vec();
        body.extend(b"SCRAM-SHA-256\0\0");
        srv.send(b'R', &body).await;
        let (tag, first) = srv.recv().await;
        assert_eq!(tag, b'p');
        assert!(first.starts_with(b"SCRAM-SHA-256\0"));
        let mut body = 11i32.to_be_bytes().to_vec();
        body.extend(b"garbage");
        srv.send(b'R', &body).await;
    };
    let e = run(client, server).await.unwrap_err();
    assert!(matches!(&e, Error::Auth(m) if m.contains("SCRAM")), "{e:?}");

    // A server that says "OK" without finishing SCRAM is not trusted.
    let (io, mut srv) = pipe();
    let config = cfg(Some("pw"));
    let client = ReplicationConnection::handshake(io, &config);
    let server = async {
        srv.startup().await;
        let mut body = 10i32.to_be_bytes().to_vec();
        body.extend(b"SCRAM-SHA-256\0\0");
        srv.send(b'R', &body).await;
        srv.recv().await;
        srv.send(b'R', &0i32.to_be_bytes()).await;
    };
    let e = run(client, server).await.unwrap_err();
    assert!(
        matches!(&e, Error::Auth(m) if m.contains("without proving")),
        "{e:?}"
    );

    // Other startup errors keep their SQLSTATE.
    let (io, mut srv) = pipe();
    let config = cfg(Some("pw"));
    let client = ReplicationConnection::handshake(io, &config);
    let server = async {
        srv.startup().await;
        srv.error("3D000", "database \"app\" does not exist").await;
    };
    let e = run(client, server).await.unwrap_err();
    assert_eq!(e.code(), Some("3D000"), "{e:?}");
    assert!(
        e.to_string().contains("does not exist") && e.to_string().contains("some detail"),
        "{e}"
    );
}

#[tokio::test]
async fn query_errors_leave_the_connection_usable() {
    let (io, mut srv) = pipe();
    let client = async {
        let mut c = ReplicationConnection::handshake(io, &cfg(Some("pw")))
            .await
            .unwrap();
        let e = c
            .create_logical_slot("my\"slot", "pgoutput")
            .await
            .unwrap_err();
        assert!(e.is_duplicate_object(), "{e:?}");
        let lsn = c.create_logical_slot("s2", "pgoutput").await.unwrap();
        let rows = c.simple_query("SELECT 1, NULL").await.unwrap();
        (lsn, rows)
    };
    let server = async {
        srv.startup().await;
        srv.auth_ok_ready().await;
        let (_, q) = srv.recv().await;
        assert_eq!(
            q,
            b"CREATE_REPLICATION_SLOT \"my\"\"slot\" LOGICAL \"pgoutput\" NOEXPORT_SNAPSHOT\0"
        );
        srv.error("42710", "replication slot \"my\"slot\" already exists")
            .await;
        srv.send(b'Z', b"I").await;
        srv.recv().await;
        srv.send(b'T', &[0, 0]).await;
        srv.row(&[Some("s2"), Some("0/1A2B3C"), None, Some("pgoutput")])
            .await;
        srv.send(b'C', b"CREATE_REPLICATION_SLOT\0").await;
        srv.send(b'Z', b"I").await;
        srv.recv().await;
        srv.send(b'T', &[0, 0]).await;
        srv.row(&[Some("1"), None]).await;
        srv.send(b'C', b"SELECT 1\0").await;
        srv.send(b'Z', b"I").await;
    };
    let (lsn, rows) = run(client, server).await;
    assert_eq!(lsn, Lsn(0x1A_2B3C));
    assert_eq!(rows, vec![vec![Some("1".to_owned()), None]]);
}

/// Handshake, then START_REPLICATION answered with CopyBothResponse.
async fn streaming(io: Box<dyn AsyncStream>, srv: &mut Server) -> ReplicationStream {
    let client = async {
        let c = ReplicationConnection::handshake(io, &cfg(Some("pw")))
            .await
            .unwrap();
        c.start_replication("s\"x", Lsn(0x1_0000_000A), &["p1".into(), "it's".into()])
            .await
            .unwrap()
    };
    let server = async {
        srv.startup().await;
        srv.auth_ok_ready().await;
        let (tag, q) = srv.recv().await;
        assert_eq!(tag, b'Q');
        assert_eq!(
            String::from_utf8(q).unwrap(),
            "START_REPLICATION SLOT \"s\"\"x\" LOGICAL 1/A (\"proto_version\" '1', \"publication_names\" '\"p1\",\"it''s\"')\0"
        );
        srv.send(b'W', &[0, 0, 0]).await;
    };
    run(client, server).await
}

#[tokio::test]
async fn streams_messages_cancel_safely_and_sends_status() {
    let (io, mut srv) = pipe();
    let mut stream = streaming(io, &mut srv).await;

    // The server dribbles its messages out one byte at a time while the client keeps
    // abandoning `next()` in a select!: nothing may be lost or torn.
    let mut wire = xlog(0x10, 0x20, 77, b"Bpayload");
    wire.extend(keepalive(0x20, 78, true));
    wire.extend(xlog(0, 0x30, 79, b""));
    wire.extend(frame(b'N', b"SWARNING\0Mfyi\0\0"));
    wire.extend(frame(b'c', b""));
    let server = async {
        for b in &wire {
            srv.0.write_all(std::slice::from_ref(b)).await.unwrap();
            tokio::task::yield_now().await;
        }
    };
    let client = async {
        let mut got = Vec::new();
        let mut cancelled = 0;
        loop {
            tokio::select! {
                m = stream.next() => match m.unwrap() {
                    Some(m) => got.push(m),
                    None => break,
                },
                () = tokio::task::yield_now() => cancelled += 1,
            }
        }
        assert!(cancelled > 0, "the test never cancelled a read");
        got
    };
    let got = run(client, server).await;
    assert_eq!(
        got,
        vec![
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x10),
                wal_end: Lsn(0x20),
                server_time_us: 77,
                data: Bytes::from_static(b"Bpayload")
            },
            ReplicationMessage::Keepalive {
                wal_end: Lsn(0x20),
                server_time_us: 78,
                reply_requested: true
            },
            ReplicationMessage::XLogData {
                wal_start: Lsn(0),
                wal_end: Lsn(0x30),
                server_time_us: 79,
                data: Bytes::new()
            },
        ]
    );
    // After CopyDone the stream stays ended.
    assert_eq!(stream.next().await.unwrap(), None);

    // A status update is one CopyData 'r' message.
    let before = pg_micros(SystemTime::now());
    stream
        .send_status(Lsn(3), Lsn(2), Lsn(1), true)
        .await
        .unwrap();
    let (tag, body) = srv.recv().await;
    assert_eq!(tag, b'd');
    assert_eq!(body.len(), 34);
    assert_eq!(body[0], b'r');
    let be = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().unwrap());
    assert_eq!((be(1), be(9), be(17)), (3, 2, 1));
    let ts = i64::from_be_bytes(body[25..33].try_into().unwrap());
    assert!(
        ts >= before && ts - before < 10_000_000,
        "timestamp {ts} vs {before}"
    );
    assert_eq!(body[33], 1);
}

#[tokio::test]
async fn close_finishes_the_copy_and_terminates() {
    let (io, mut srv) = pipe();
    let stream = streaming(io, &mut srv).await;
    let server = async {
        srv.0.write_all(&keepalive(1, 1, false)).await.unwrap();
        assert_eq!(srv.recv().await, (b'c', vec![]));
        srv.send(b'c', b"").await;
        srv.send(b'C', b"START_REPLICATION\0").await;
        srv.send(b'Z', b"I").await;
        assert_eq!(srv.recv().await, (b'X', vec![]));
    };
    run(stream.close(), server).await.unwrap();
}

#[tokio::test]
async fn server_errors_and_closes_end_the_stream() {
    // ErrorResponse: an error carrying the SQLSTATE, then the stream has ended.
    let (io, mut srv) = pipe();
    let mut stream = streaming(io, &mut srv).await;
    srv.error("55006", "replication slot \"s\" is active for PID 42")
        .await;
    let e = stream.next().await.unwrap_err();
    assert!(e.is_object_in_use(), "{e:?}");
    assert_eq!(stream.next().await.unwrap(), None);
    assert!(stream
        .send_status(Lsn(1), Lsn(1), Lsn(1), false)
        .await
        .is_err());

    // A clean close between messages: None.
    let (io, mut srv) = pipe();
    let mut stream = streaming(io, &mut srv).await;
    srv.0.write_all(&keepalive(5, 6, false)).await.unwrap();
    drop(srv);
    assert!(matches!(
        stream.next().await.unwrap(),
        Some(ReplicationMessage::Keepalive { .. })
    ));
    assert_eq!(stream.next().await.unwrap(), None);

    // A close in the middle of a message: an I/O error.
    let (io, mut srv) = pipe();
    let mut stream = streaming(io, &mut srv).await;
    let x = xlog(1, 2, 3, b"abc");
    srv.0.write_all(&x[..x.len() - 1]).await.unwrap();
    drop(srv);
    let e = stream.next().await.unwrap_err();
    assert!(
        matches!(&e, Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof),
        "{e:?}"
    );
}

#[tokio::test]
async fn malformed_frames_are_protocol_errors() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // A 4 GiB frame header: refused before allocating.
        ("invalid length", {
            let mut v = vec![b'd'];
            v.extend(0xFFFF_FFF0u32.to_be_bytes());
            v
        }),
        ("invalid length", vec![b'd', 0, 0, 0, 3]),
        ("unknown replication message", frame(b'd', b"zzz")),
        ("too short", frame(b'd', b"w\0\0")),
        (
            "keepalive message of 19",
            frame(b'd', &[&keepalive(1, 2, true)[5..], &[0]].concat()),
        ),
        ("cannot parse", frame(b'?', b"")),
        ("unexpected message", frame(b'Z', b"I")),
    ];
    for (needle, bytes) in cases {
        let (io, mut srv) = pipe();
        let mut stream = streaming(io, &mut srv).await;
        srv.0.write_all(&bytes).await.unwrap();
        let e = tokio::time::timeout(T, stream.next())
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, Error::Protocol(_)), "{needle}: {e:?}");
        assert!(e.to_string().contains(needle), "{needle}: {e}");
    }
}

#[test]
fn copy_data_parsing() {
    let m = parse_copy_data(Bytes::from(xlog(1, 2, -3, b"x")[5..].to_vec())).unwrap();
    assert_eq!(
        m,
        ReplicationMessage::XLogData {
            wal_start: Lsn(1),
            wal_end: Lsn(2),
            server_time_us: -3,
            data: Bytes::from_static(b"x")
        }
    );
    assert!(parse_copy_data(Bytes::new()).is_err());
    assert!(parse_copy_data(Bytes::from_static(b"k\0")).is_err());
}

#[test]
fn quoting_and_time() {
    assert_eq!(quote_ident("a\"b").unwrap(), "\"a\"\"b\"");
    assert!(quote_ident("").is_err() && quote_ident("a\0").is_err());
    assert_eq!(quote_literal("it's \\ x").unwrap(), "'it''s \\ x'");
    assert!(quote_literal("\0").is_err());

    let pg_epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
    assert_eq!(pg_micros(pg_epoch), 0);
    assert_eq!(pg_micros(pg_epoch + Duration::from_micros(5)), 5);
    assert_eq!(pg_micros(UNIX_EPOCH), -946_684_800_000_000);
    for us in [0, 1, -1, 776_000_000_123_456, -5_000_000] {
        assert_eq!(pg_micros(pg_time(us)), us);
    }
}

#[tokio::test]
async fn connect_refused_names_the_address() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let mut c = cfg(None);
    c.host = "127.0.0.1".into();
    c.port = port;
    let e = ReplicationConnection::connect(&c).await.unwrap_err();
    assert!(matches!(e, Error::Io(_)), "{e:?}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
}
