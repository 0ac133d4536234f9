//! The RESP (Redis protocol) listener on real node processes: redis-py, redis-cli and
//! redis-benchmark, used unchanged against a 3-node cluster, get the replies the Redis
//! documentation specifies; garbage, frame bombs and oversize values on a raw socket
//! get protocol errors, never a hang, a crash or unbounded memory.
//!
//! `tests/resp/test_commands.py` is the command-by-command suite; it also passes
//! against a real `redis-server` (see its docstring), which is how its expectations are
//! known to be Redis's. It needs python3 with venv and pip (and PyPI the first time);
//! the redis-cli tests need `redis-tools`.

#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use raftcache_tests::{
    bins, connect_settled, output_within, process_alive, rss_bytes, runtime, Cluster, NodeProc,
};

/// One cluster at a time: each test runs three nodes and a busy client process.
static SERIAL: Mutex<()> = Mutex::new(());

const PARTITIONS: usize = 8;
const SETTLE: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const MIB: usize = 1 << 20;

/// Starts a settled 3-node cluster whose nodes all listen for RESP.
fn start(extra: &[&str]) -> Cluster {
    let bins = bins!();
    let mut args = vec!["--partitions=8", "--resp-addr=127.0.0.1:0"];
    args.extend_from_slice(extra);
    let cluster = Cluster::start(&bins, 3, &args).expect("cluster starts");
    runtime()
        .block_on(connect_settled(cluster.endpoints(), PARTITIONS, 3, SETTLE))
        .unwrap();
    cluster
}

fn resp_addr(node: &NodeProc) -> SocketAddr {
    node.resp
        .unwrap_or_else(|| panic!("node {} printed no \"resp\" address", node.pid))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Panics with the command's output unless it exited 0.
fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------
// Redis tools.

/// Fails (rather than skips) when a Redis tool is missing: these tests are the proof
/// that unchanged Redis clients work.
fn need(tool: &str) {
    let found = output_within(Command::new(tool).arg("--version"), IO_TIMEOUT)
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: install redis-tools (apt-get install redis-tools)"
    );
}

/// `redis-cli -h 127.0.0.1 -p PORT ARGS..` to completion.
fn redis_cli(addr: SocketAddr, args: &[&str]) -> Output {
    let port = addr.port().to_string();
    let out = output_within(
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(args),
        Duration::from_secs(30),
    )
    .expect("redis-cli runs");
    assert_ok(&format!("redis-cli {args:?}"), &out);
    out
}

/// The trimmed stdout of `redis-cli ARGS..`.
fn redis_cli_out(addr: SocketAddr, args: &[&str]) -> String {
    text(&redis_cli(addr, args).stdout).trim().to_string()
}

/// The requests per second that `redis-benchmark -q` printed for `test` (`SET`, `GET`).
fn requests_per_second(output: &str, test: &str) -> Option<f64> {
    let prefix = format!("{test}: ");
    output
        .split(['\r', '\n'])
        .map(str::trim)
        .filter(|l| l.contains("requests per second"))
        .find_map(|l| {
            l.strip_prefix(&prefix)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

// ---------------------------------------------------------------------------------
// Raw RESP on a TcpStream.

/// `args` as a RESP array of bulk strings.
fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The length of the complete reply at `buf[at..]`, or `None` while it is incomplete.
/// A line that is not a well-formed header counts as a reply of its own.
fn frame_end(buf: &[u8], at: usize) -> Option<usize> {
    let cr = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
    let next = cr + 2;
    let n: Option<i64> = std::str::from_utf8(&buf[at + 1..cr])
        .ok()
        .and_then(|s| s.parse().ok());
    let Some(n) = n.filter(|n| *n >= 0) else {
        return Some(next);
    };
    let n = usize::try_from(n).ok()?;
    match buf[at] {
        b'$' | b'=' | b'!' => {
            let end = next.checked_add(n)?.checked_add(2)?;
            (buf.len() >= end).then_some(end)
        }
        b'*' | b'~' | b'>' | b'%' => {
            let items = if buf[at] == b'%' {
                n.checked_mul(2)?
            } else {
                n
            };
            (0..items).try_fold(next, |pos, _| frame_end(buf, pos))
        }
        _ => Some(next),
    }
}

/// A client connection that reads whole replies.
struct Resp {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Resp {
    fn connect(addr: SocketAddr) -> Resp {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect to RESP {addr}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Resp {
            stream,
            buf: Vec::new(),
        }
    }

    /// One complete reply, as the bytes the server sent.
    fn reply(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(end) = frame_end(&self.buf, 0) {
                return self.buf.drain(..end).collect();
            }
            assert!(Instant::now() < deadline, "no complete reply in time");
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("connection closed; partial reply {:?}", text(&self.buf)),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("reading a reply: {e}; partial {:?}", text(&self.buf)),
            }
        }
    }

    fn call(&mut self, args: &[&[u8]]) -> Vec<u8> {
        self.stream.write_all(&encode(args)).unwrap();
        self.reply()
    }
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// EOF or reset by the server.
    Closed,
    /// Still open when the wait was over.
    Open,
}

/// Connects, writes `payload` (on a thread, so a server that answers and closes early
/// cannot block the test), and reads whatever comes back until the server closes or
/// `wait` passes (at most 1 MiB kept). Then closes the connection.
fn blast(addr: SocketAddr, payload: Vec<u8>, wait: Duration) -> (Vec<u8>, End) {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let wrote = std::thread::spawn(move || writer.write_all(&payload).is_ok());
    let deadline = Instant::now() + wait;
    let (mut got, mut reader) = (Vec::new(), &stream);
    let end = loop {
        if Instant::now() >= deadline {
            break End::Open;
        }
        let mut chunk = [0u8; 64 * 1024];
        match reader.read(&mut chunk) {
            Ok(0) => break End::Closed,
            Ok(n) if got.len() < MIB => got.extend_from_slice(&chunk[..n]),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break End::Closed, // reset
        }
    };
    // Unblocks the writer when the server neither reads nor closes.
    let _ = stream.shutdown(Shutdown::Both);
    let _ = wrote.join();
    (got, end)
}

/// A deterministic byte stream (xorshift64) standing in for random garbage.
fn garbage(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed.to_le_bytes()[0]
        })
        .collect()
}

fn assert_pong(addr: SocketAddr, what: &str) {
    let mut c = Resp::connect(addr);
    assert_eq!(text(&c.call(&[b"PING"])), "+PONG\r\n", "PING after {what}");
}

fn assert_alive(cluster: &Cluster, what: &str) {
    for n in &cluster.nodes {
        assert!(process_alive(n.pid), "node {} died after {what}", n.pid);
    }
    assert_pong(resp_addr(&cluster.nodes[0]), what);
}

// ---------------------------------------------------------------------------------
// Tests.

#[test]
fn redis_py_drives_every_command() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    // The suite runs FLUSHALL, which nodes refuse unless resp.allow-flushall is set.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "[resp]\nallow-flushall = true\n").unwrap();
    let config_arg = format!("--config={}", config.display());
    let cluster = start(&[&config_arg]);
    let (a, b) = (resp_addr(&cluster.nodes[0]), resp_addr(&cluster.nodes[2]));
    let out = output_within(
        Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/resp/run.sh"))
            .env("RESP_ADDR", a.to_string())
            .env("RESP_ADDR2", b.to_string())
            .env("RESP_TARGET", "raftcache")
            .env("CARGO_TARGET_TMPDIR", env!("CARGO_TARGET_TMPDIR")),
        // The first run creates the venv and installs redis-py and pytest.
        Duration::from_secs(300),
    )
    .expect("tests/resp/run.sh runs");
    eprintln!("{}", text(&out.stdout));
    assert_ok("tests/resp/run.sh (redis-py suite)", &out);
    assert_alive(&cluster, "the redis-py suite");
}

#[test]
fn redis_cli_pipe_mass_insert() {
    need("redis-cli");
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let cluster = start(&[]);
    let (n1, n2) = (resp_addr(&cluster.nodes[0]), resp_addr(&cluster.nodes[1]));

    const N: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mass-insert.resp");
    let mut data = Vec::new();
    for i in 0..N {
        let (k, v) = (format!("key:{i}"), format!("value:{i}"));
        data.extend(encode(&[b"SET", k.as_bytes(), v.as_bytes()]));
    }
    std::fs::write(&file, data).unwrap();

    let out = output_within(
        Command::new("sh")
            .args([
                "-c",
                r#"exec redis-cli -h 127.0.0.1 -p "$1" --pipe < "$2""#,
                "sh",
            ])
            .arg(n2.port().to_string())
            .arg(&file),
        Duration::from_secs(120),
    )
    .expect("redis-cli --pipe runs");
    assert_ok("redis-cli --pipe", &out);
    let summary = text(&out.stdout);
    assert!(
        summary.contains(&format!("errors: 0, replies: {N}")),
        "redis-cli --pipe summary: {summary}\n{}",
        text(&out.stderr)
    );

    for i in [0, 1, 1234, 5000, N - 1] {
        let got = redis_cli_out(n1, &["GET", &format!("key:{i}")]);
        assert_eq!(got, format!("value:{i}"), "GET key:{i} through node 1");
    }
    // Replicas apply what the leaders acknowledged a moment later: poll briefly.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let size = redis_cli_out(n1, &["DBSIZE"]);
        if size == N.to_string() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "DBSIZE through node 1: {size}, want {N}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_alive(&cluster, "the mass insert");
}

#[test]
fn redis_cli_works_unchanged() {
    need("redis-cli");
    need("redis-benchmark");
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let cluster = start(&[]);
    let p = resp_addr(&cluster.nodes[0]);

    assert_eq!(redis_cli_out(p, &["PING"]), "PONG");
    assert_eq!(redis_cli_out(p, &["SET", "a", "1"]), "OK");
    assert_eq!(redis_cli_out(p, &["GET", "a"]), "1");
    assert_eq!(redis_cli_out(p, &["GET", "nosuchkey"]), "");
    assert_eq!(redis_cli_out(p, &["INCR", "a"]), "2");
    let info = redis_cli_out(p, &["INFO", "server"]);
    assert!(info.contains("redis_version:"), "INFO server: {info}");
    assert_eq!(
        redis_cli_out(p, &["--no-raw", "MGET", "a", "b"]),
        "1) \"2\"\n2) (nil)"
    );
    // Through another node, and redis-cli's own error rendering.
    let p3 = resp_addr(&cluster.nodes[2]);
    assert_eq!(redis_cli_out(p3, &["GET", "a"]), "2");
    let err = redis_cli_out(p3, &["--no-raw", "GET"]);
    assert_eq!(
        err,
        "(error) ERR wrong number of arguments for 'get' command"
    );

    let port = p.port().to_string();
    let out = output_within(
        Command::new("redis-benchmark").args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "get,set",
            "-n",
            "2000",
            "-c",
            "10",
            "-q",
        ]),
        Duration::from_secs(120),
    )
    .expect("redis-benchmark runs");
    assert_ok("redis-benchmark", &out);
    let report = text(&out.stdout);
    for test in ["SET", "GET"] {
        let rps = requests_per_second(&report, test);
        assert!(
            rps.is_some_and(|r| r > 0.0),
            "redis-benchmark: no {test} requests per second in {report:?}\n{}",
            text(&out.stderr)
        );
    }
    assert_alive(&cluster, "redis-benchmark");
}

#[test]
fn garbage_and_bombs_do_not_hurt_the_node() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let cluster = start(&["--max-value-size=1MiB"]);
    let node = &cluster.nodes[0];
    let addr = resp_addr(node);
    let wait = Duration::from_secs(5);

    // (1) A bulk length no server accepts: protocol error, then the server closes.
    let (got, end) = blast(addr, b"*1\r\n$999999999999\r\n".to_vec(), wait);
    assert!(
        got.starts_with(b"-ERR Protocol error"),
        "huge bulk length: {:?}",
        text(&got)
    );
    assert_eq!(end, End::Closed, "huge bulk length: connection left open");
    assert_alive(&cluster, "a huge bulk length");

    // (2) An array header announcing 2^31 - 1 elements, one element, then close. The
    // server may refuse it or wait for the rest, but must not allocate for it.
    let (got, _) = blast(
        addr,
        b"*2147483647\r\n$1\r\na\r\n".to_vec(),
        Duration::from_secs(1),
    );
    assert!(
        got.is_empty() || got.starts_with(b"-ERR Protocol error"),
        "array header bomb: {:?}",
        text(&got)
    );
    assert_alive(&cluster, "an array header bomb");

    // (3) Nested arrays, 100,000 deep: commands are arrays of bulk strings only.
    let (got, end) = blast(addr, b"*1\r\n".repeat(100_000), wait);
    assert!(
        got.starts_with(b"-ERR Protocol error: expected '$', got '*'"),
        "nested arrays: {:?}",
        text(&got)
    );
    assert_eq!(end, End::Closed, "nested arrays: connection left open");
    assert_alive(&cluster, "nested arrays");

    // (4) 1 MiB of binary garbage: error replies or a close, never silence.
    let (got, end) = blast(addr, garbage(MIB, 0x9e37_79b9_7f4a_7c15), wait);
    assert!(
        got.first() == Some(&b'-') || (got.is_empty() && end == End::Closed),
        "binary garbage: {end:?} after {:?}",
        text(&got[..got.len().min(200)])
    );
    assert_alive(&cluster, "binary garbage");

    // (5) Half a frame, then close: nothing is written.
    let (got, _) = blast(
        addr,
        b"*3\r\n$3\r\nSET\r\n$8\r\nhalf:key\r\n$100\r\nabc".to_vec(),
        Duration::from_millis(500),
    );
    assert!(got.is_empty(), "half a frame answered {:?}", text(&got));
    assert_alive(&cluster, "half a frame");
    let mut c = Resp::connect(addr);
    assert_eq!(text(&c.call(&[b"GET", b"half:key"])), "$-1\r\n");

    // (6) An inline line of 100 KiB without a newline.
    let (got, _) = blast(addr, vec![b'A'; 100 * 1024], wait);
    assert!(
        got.starts_with(b"-ERR Protocol error: too big inline request"),
        "long inline line: {:?}",
        text(&got)
    );
    assert_alive(&cluster, "a long inline line");

    // Bounded memory: 8 connections each announce a 16 MB bulk, send 1 MiB of it and
    // stop; then they close.
    let before = rss_bytes(node.pid).unwrap();
    let mut header = b"*1\r\n$16000000\r\n".to_vec();
    header.extend(vec![b'x'; MIB]);
    let open: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap();
            s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
            let _ = s.write_all(&header); // the server may refuse and close early
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = rss_bytes(node.pid).unwrap();
    drop(open);
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_bytes(node.pid).unwrap();
    eprintln!(
        "node RSS: {} MiB before, {} MiB with 8 half-sent 16 MB bulks, {} MiB after",
        before >> 20,
        during >> 20,
        after >> 20
    );
    for (when, rss) in [("while open", during), ("after close", after)] {
        assert!(rss < 300 << 20, "RSS {when}: {} MiB (limit 300)", rss >> 20);
    }
    assert_alive(&cluster, "half-sent 16 MB bulks");

    // A value of exactly --max-value-size still works, through another node too.
    let big = garbage(MIB, 7);
    let mut c = Resp::connect(addr);
    assert_eq!(text(&c.call(&[b"SET", b"big:ok", &big])), "+OK\r\n");
    let mut want = format!("${MIB}\r\n").into_bytes();
    want.extend_from_slice(&big);
    want.extend_from_slice(b"\r\n");
    assert!(c.call(&[b"GET", b"big:ok"]) == want, "GET of a 1 MiB value");
    let mut c3 = Resp::connect(resp_addr(&cluster.nodes[2]));
    assert!(
        c3.call(&[b"GET", b"big:ok"]) == want,
        "GET of a 1 MiB value via node 3"
    );

    // One byte more is refused with an error reply and not written.
    let mut over = big.clone();
    over.push(b'x');
    let (got, _) = blast(addr, encode(&[b"SET", b"big:over", &over]), wait);
    assert!(
        got.first() == Some(&b'-'),
        "SET of {} bytes over a {MIB}-byte limit answered {:?}",
        MIB + 1,
        text(&got[..got.len().min(200)])
    );
    let mut c = Resp::connect(addr);
    assert_eq!(
        text(&c.call(&[b"EXISTS", b"big:over"])),
        ":0\r\n",
        "the oversize value was written"
    );
    assert_alive(&cluster, "an oversize value");
}

mod helpers {
    use super::*;

    #[test]
    fn frame_end_finds_whole_replies() {
        assert_eq!(frame_end(b"+OK\r\n", 0), Some(5));
        assert_eq!(frame_end(b"+OK\r", 0), None);
        assert_eq!(frame_end(b"$-1\r\n", 0), Some(5));
        assert_eq!(frame_end(b"$3\r\nabc\r\n:1\r\n", 0), Some(9));
        assert_eq!(frame_end(b"$3\r\nab", 0), None);
        assert_eq!(frame_end(b"*2\r\n$1\r\na\r\n$-1\r\n", 0), Some(16));
        assert_eq!(frame_end(b"*2\r\n$1\r\na\r\n", 0), None);
        assert_eq!(frame_end(b"%1\r\n+a\r\n:1\r\n", 0), Some(12));
        assert_eq!(frame_end(b"-ERR x\r\n", 0), Some(8));
        assert_eq!(frame_end(b"$x\r\n", 0), Some(4));
    }

    #[test]
    fn benchmark_output_is_parsed() {
        let out = "SET: rps=0.0 (overall: 0.0) avg_msec=-nan\r      \rSET: 41666.67 requests per second, p50=0.119 msec\n   \rGET: 50000.00 requests per second, p50=0.111 msec\n";
        assert_eq!(requests_per_second(out, "SET"), Some(41666.67));
        assert_eq!(requests_per_second(out, "GET"), Some(50000.0));
        assert_eq!(requests_per_second(out, "INCR"), None);
    }
}
