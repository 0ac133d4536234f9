//! Limits with clear errors on every interface, and internal keys outside the user's
//! keyspace, on real node processes:
//! - RESP: a value over `storage.max-value-size` (20 MiB, from redis-cli and from a raw
//!   socket) or a key over `max-key-size` gets an error naming the limit, and the same
//!   connection keeps working; RESP commands appear in `raftcache_ops_total`.
//! - gRPC: the client refuses a 100 MiB value unsent, at once, with `ValueTooLarge`.
//! - CLI: `raftcache set KEY --stdin` / `--file` store binary values byte for byte.
//! - `__raftcache:` keys: not counted by DBSIZE / INFO keyspace, not reachable by RESP
//!   commands, not hot keys, kept by FLUSHALL; FLUSHALL refused unless
//!   `resp.allow-flushall`.

#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use raftcache_client::{Client, ClientConfig, ClientError};
use raftcache_tests::{
    bins, connect_settled, output_within, run_cli, runtime, scrape_metrics, NodeProc,
};

/// One node at a time: the machine is small and the values are large.
static SERIAL: Mutex<()> = Mutex::new(());

const PARTITIONS: usize = 4;
const SETTLE: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const MIB: usize = 1 << 20;
const INTERNAL: &str = "__raftcache:cdc:lease:t74";

/// A one-node cluster with RESP, settled.
fn start(extra: &[&str]) -> NodeProc {
    let bins = bins!();
    let mut args = vec!["--partitions=4", "--resp-addr=127.0.0.1:0"];
    args.extend_from_slice(extra);
    let node = NodeProc::start(&bins, &args).expect("node starts");
    runtime()
        .block_on(connect_settled(
            vec![node.endpoint()],
            PARTITIONS,
            1,
            SETTLE,
        ))
        .unwrap();
    node
}

fn resp_addr(node: &NodeProc) -> SocketAddr {
    node.resp.expect("the node printed its RESP address")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn shell(script: &str) -> Output {
    output_within(Command::new("bash").arg("-c").arg(script), IO_TIMEOUT).expect("bash runs")
}

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

/// A raw RESP connection reading simple replies (lines, integers, bulk strings).
struct Resp {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Resp {
    fn connect(addr: SocketAddr) -> Resp {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Resp {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The length of the complete reply at the front of the buffer, if there is one.
    fn complete(&self) -> Option<usize> {
        let cr = self.buf.windows(2).position(|w| w == b"\r\n")?;
        if self.buf[0] != b'$' {
            return Some(cr + 2);
        }
        let n: i64 = std::str::from_utf8(&self.buf[1..cr]).ok()?.parse().ok()?;
        let end = if n < 0 {
            cr + 2
        } else {
            cr + 2 + n as usize + 2
        };
        (self.buf.len() >= end).then_some(end)
    }

    /// One reply as the bytes the server sent.
    fn reply(&mut self) -> Vec<u8> {
        loop {
            if let Some(end) = self.complete() {
                return self.buf.drain(..end).collect();
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("connection closed; partial reply {:?}", text(&self.buf)),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("reading a reply: {e}; partial {:?}", text(&self.buf)),
            }
        }
    }

    fn call(&mut self, args: &[&[u8]]) -> String {
        self.send(&encode(args));
        text(&self.reply())
    }
}

/// The value of the metric line `name{labels}` (labels as the exporter writes them).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn resp_oversized_value_and_key_get_errors_and_the_connection_goes_on() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let node = start(&[]);
    let addr = resp_addr(&node);
    let want =
        "ERR value of 20971520 bytes is over the 16777216-byte limit (storage.max-value-size)";

    // redis-cli, value piped from a file: the error, not "Connection reset by peer".
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big");
    std::fs::write(&file, vec![b'x'; 20 * MIB]).unwrap();
    let out = shell(&format!(
        "redis-cli -h 127.0.0.1 -p {} -x set big < {}",
        addr.port(),
        file.display()
    ));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        said.contains(want),
        "redis-cli -x set of 20 MiB said {said:?}"
    );
    assert!(
        !said.contains("reset"),
        "redis-cli -x set of 20 MiB said {said:?}"
    );

    // One socket: the big SET, then PING (sent without waiting), then more commands.
    let mut c = Resp::connect(addr);
    let mut request = encode(&[b"SET", b"big", &vec![b'y'; 20 * MIB]]);
    request.extend_from_slice(&encode(&[b"PING"]));
    let mut writer = c.stream.try_clone().unwrap();
    let sent = std::thread::spawn(move || writer.write_all(&request).is_ok());
    let started = Instant::now();
    assert_eq!(text(&c.reply()), format!("-{want}\r\n"));
    assert_eq!(text(&c.reply()), "+PONG\r\n", "PING after the refused SET");
    assert!(sent.join().unwrap(), "the server read the whole request");
    eprintln!(
        "20 MiB SET refused and PING answered in {:?}",
        started.elapsed()
    );
    assert_eq!(c.call(&[b"EXISTS", b"big"]), ":0\r\n", "nothing written");
    assert_eq!(c.call(&[b"SET", b"small", b"v"]), "+OK\r\n");
    assert_eq!(c.call(&[b"GET", b"small"]), "$1\r\nv\r\n");

    // A value just over the limit (under the parser's bulk bound), a key over
    // max-key-size, and a key over the bulk bound: the same kind of error.
    let over = vec![b'z'; 16 * MIB + 1];
    assert_eq!(
        c.call(&[b"SET", b"over", &over]),
        "-ERR value of 16777217 bytes is over the 16777216-byte limit (storage.max-value-size)\r\n"
    );
    let key = vec![b'k'; 20 * 1024];
    assert_eq!(
        c.call(&[b"SET", &key, b"v"]),
        "-ERR key of 20480 bytes is over the 16384-byte limit (storage.max-key-size)\r\n"
    );
    assert_eq!(
        c.call(&[b"GET", &key]),
        "-ERR key of 20480 bytes is over the 16384-byte limit (storage.max-key-size)\r\n"
    );
    let huge_key = vec![b'k'; 17 * MIB];
    assert_eq!(
        c.call(&[b"GET", &huge_key]),
        "-ERR key of 17825792 bytes is over the 16384-byte limit (storage.max-key-size)\r\n"
    );
    assert_eq!(c.call(&[b"PING"]), "+PONG\r\n");

    // Past max-query-buffer (64 MiB) the connection may close: it answers first.
    let mut c2 = Resp::connect(addr);
    c2.send(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$999999999\r\n");
    let got = text(&c2.reply());
    assert!(
        got.starts_with("-ERR Protocol error:") && got.contains("resp.max-query-buffer"),
        "{got:?}"
    );

    // Counted, with a HELP line; RESP commands are ops.
    let m = scrape_metrics(node.metrics).unwrap();
    assert!(
        m.contains("# HELP raftcache_resp_too_large_total"),
        "no HELP"
    );
    let values = metric(
        &m,
        "raftcache_resp_too_large_total{limit=\"max-value-size\"}",
    )
    .unwrap_or(0.0);
    assert!(values >= 3.0, "max-value-size refusals counted: {values}");
    let keys = metric(&m, "raftcache_resp_too_large_total{limit=\"max-key-size\"}").unwrap_or(0.0);
    assert!(keys >= 3.0, "max-key-size refusals counted: {keys}");
    assert!(
        metric(
            &m,
            "raftcache_resp_too_large_total{limit=\"max-query-buffer\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    // The node's log names the refusal (rate-limited: once here).
    let log = node.log();
    assert_eq!(
        log.matches("refused a command with an oversized argument")
            .count(),
        1,
        "log:\n{log}"
    );
}

#[test]
fn resp_commands_appear_in_ops_metrics() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let node = start(&[]);
    let mut c = Resp::connect(resp_addr(&node));
    assert_eq!(c.call(&[b"SET", b"m", b"1"]), "+OK\r\n");
    assert_eq!(c.call(&[b"GET", b"m"]), "$1\r\n1\r\n");
    assert_eq!(c.call(&[b"GET", b"m"]), "$1\r\n1\r\n");
    assert_eq!(c.call(&[b"INCR", b"m"]), ":2\r\n");
    assert!(c.call(&[b"NOSUCH"]).starts_with("-ERR unknown command"));
    // A pipeline counts each command.
    let mut pipeline = encode(&[b"GET", b"m"]);
    pipeline.extend_from_slice(&encode(&[b"GET", b"m"]));
    c.send(&pipeline);
    c.reply();
    c.reply();
    let m = scrape_metrics(node.metrics).unwrap();
    let ops = |op: &str, result: &str| {
        metric(
            &m,
            &format!("raftcache_ops_total{{op=\"{op}\",result=\"{result}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(ops("resp_set", "ok"), 1.0, "{m}");
    assert_eq!(ops("resp_get", "ok"), 4.0);
    assert_eq!(ops("resp_incr", "ok"), 1.0);
    assert_eq!(ops("resp_unknown", "ERR"), 1.0);
    assert!(
        m.contains("raftcache_request_duration_seconds_count{op=\"resp_get\"} 4"),
        "no latency histogram for resp_get"
    );
    assert!(m.contains("# HELP raftcache_ops_total") && m.contains("resp_<command>"));
}

#[test]
fn grpc_client_refuses_oversized_values_at_once() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let node = start(&[]);
    runtime().block_on(async {
        let client = Client::connect(ClientConfig::new([node.endpoint()]))
            .await
            .unwrap();
        let started = Instant::now();
        let e = client
            .set("big", vec![0u8; 100 * MIB])
            .await
            .expect_err("a 100 MiB value is refused");
        let took = started.elapsed();
        assert_eq!(
            e,
            ClientError::ValueTooLarge {
                size: 100 * MIB as u64,
                limit: 16 * MIB as u64
            }
        );
        assert_eq!(
            e.to_string(),
            "value is 104857600 bytes, over the 16777216-byte limit"
        );
        assert!(!e.is_transient());
        assert!(took < Duration::from_secs(2), "refused after {took:?}");
        let e = client.set(vec![b'k'; 20 * 1024], "v").await.unwrap_err();
        assert_eq!(
            e,
            ClientError::KeyTooLarge {
                size: 20 * 1024,
                limit: 16 * 1024
            }
        );
        // Unsent: the node served no set at all.
        let m = scrape_metrics(node.metrics).unwrap();
        assert!(!m.contains("op=\"set\""), "a set reached the node");
        // The limit is the config's: a client told of a larger node limit sends (and
        // the node answers for itself, at once too).
        let config = ClientConfig {
            max_value_bytes: 32 * MIB,
            ..ClientConfig::new([node.endpoint()])
        };
        let client = Client::connect(config).await.unwrap();
        let started = Instant::now();
        let e = client.set("big", vec![0u8; 20 * MIB]).await.unwrap_err();
        let took = started.elapsed();
        eprintln!("20 MiB to a 16 MiB node: {e:?} after {took:?}");
        assert!(!e.is_transient(), "{e:?}");
        assert!(took < Duration::from_secs(2), "{e:?} after {took:?}");
        // Larger still (the node stops reading early): an answer, not a retried reset.
        let config = ClientConfig {
            max_value_bytes: 60 * MIB,
            ..ClientConfig::new([node.endpoint()])
        };
        let client = Client::connect(config).await.unwrap();
        let started = Instant::now();
        let e = client.set("big", vec![0u8; 60 * MIB]).await.unwrap_err();
        let took = started.elapsed();
        eprintln!("60 MiB to a 16 MiB node: {e:?} after {took:?}");
        assert!(!e.is_transient(), "{e:?}");
        assert!(took < Duration::from_secs(2), "{e:?} after {took:?}");
        client.set("ok", vec![1u8; MIB]).await.unwrap();
    });
}

#[test]
fn cli_set_reads_binary_values_from_stdin_and_files() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let node = start(&[]);
    let bins = bins!();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bytes");
    let value: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    std::fs::write(&file, &value).unwrap();
    let ep = node.endpoint();
    let out = shell(&format!(
        "exec {} --endpoints {ep} set bin:stdin --stdin < {}",
        bins.cli.display(),
        file.display()
    ));
    assert!(out.status.success(), "set --stdin: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "OK\n");
    let out = run_cli(
        &bins,
        &ep,
        &["set", "bin:file", "--file", &file.display().to_string()],
        IO_TIMEOUT,
    )
    .unwrap();
    assert!(out.status.success(), "set --file: {}", text(&out.stderr));
    for key in ["bin:stdin", "bin:file"] {
        let out = run_cli(&bins, &ep, &["get", key], IO_TIMEOUT).unwrap();
        assert!(out.status.success(), "get {key}: {}", text(&out.stderr));
        let mut want = value.clone();
        want.push(b'\n');
        assert!(out.stdout == want, "{key} read back as {:?}", out.stdout);
    }
    // The positional form is unchanged; missing or conflicting inputs are refused.
    let out = run_cli(&bins, &ep, &["set", "plain", "hello"], IO_TIMEOUT).unwrap();
    assert!(out.status.success());
    let out = run_cli(&bins, &ep, &["get", "plain"], IO_TIMEOUT).unwrap();
    assert_eq!(text(&out.stdout), "hello\n");
    let out = run_cli(&bins, &ep, &["set", "k", "v", "--stdin"], IO_TIMEOUT).unwrap();
    assert!(!out.status.success());
    let out = run_cli(
        &bins,
        &ep,
        &["set", "k", "--file", "/nonexistent/t74"],
        IO_TIMEOUT,
    )
    .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("/nonexistent/t74"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn internal_keys_live_outside_the_resp_keyspace() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let node = start(&[]);
    let addr = resp_addr(&node);
    runtime().block_on(async {
        let client = Client::connect(ClientConfig::new([node.endpoint()]))
            .await
            .unwrap();
        client.set(INTERNAL, "worker-1").await.unwrap();
        let mut c = Resp::connect(addr);
        assert_eq!(c.call(&[b"DBSIZE"]), ":0\r\n", "an internal key counted");
        assert_eq!(c.call(&[b"SET", b"user", b"1"]), "+OK\r\n");
        assert_eq!(c.call(&[b"DBSIZE"]), ":1\r\n");
        let info = c.call(&[b"INFO", b"keyspace"]);
        assert!(info.contains("db0:keys=1,expires=0"), "{info:?}");
        // With a deadline (the CDC lease has one): not an "expires" either.
        client
            .set_with(
                "__raftcache:cdc:slot:t74",
                "0/0",
                raftcache_client::SetOptions {
                    ttl: Some(Duration::from_secs(60)),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let info = c.call(&[b"INFO", b"keyspace"]);
        assert!(info.contains("db0:keys=1,expires=0"), "{info:?}");

        // RESP commands cannot read or write them.
        for args in [
            &[&b"GET"[..], INTERNAL.as_bytes()][..],
            &[b"SET", INTERNAL.as_bytes(), b"stolen"],
            &[b"DEL", INTERNAL.as_bytes()],
            &[b"EXPIRE", INTERNAL.as_bytes(), b"1"],
        ] {
            let got = c.call(args);
            assert!(
                got.starts_with("-ERR keys starting with '__raftcache:' are reserved"),
                "{args:?}: {got:?}"
            );
        }
        // MGET reads it as missing.
        assert_eq!(c.call(&[b"MGET", INTERNAL.as_bytes(), b"user"]), "*2\r\n");
        assert_eq!(text(&c.reply()), "$-1\r\n");
        assert_eq!(text(&c.reply()), "$1\r\n1\r\n");
        // gRPC still reaches them, untouched.
        let v = client.get(INTERNAL).await.unwrap().expect("kept");
        assert_eq!(&v.value[..], b"worker-1");

        // Never a hot key, however often it is read.
        for _ in 0..200 {
            client.get(INTERNAL).await.unwrap();
        }
        client.get("user").await.unwrap();
        let stats = client.stats().await.unwrap();
        let hot: Vec<_> = stats.iter().flat_map(|s| &s.hot_keys).collect();
        assert!(hot.iter().any(|h| &h.key[..] == b"user"), "{hot:?}");
        assert!(
            hot.iter().all(|h| !h.key.starts_with(b"__raftcache:")),
            "{hot:?}"
        );

        // FLUSHALL is refused by default, with how to enable it.
        let got = c.call(&[b"FLUSHALL"]);
        assert!(
            got.starts_with("-ERR FLUSHALL and FLUSHDB are disabled")
                && got.contains("allow-flushall = true"),
            "{got:?}"
        );
        let got = c.call(&[b"FLUSHDB"]);
        assert!(got.contains("allow-flushall"), "{got:?}");
        assert_eq!(c.call(&[b"DBSIZE"]), ":1\r\n");
    });
}

#[test]
fn flushall_when_allowed_keeps_internal_keys() {
    let _one = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "[resp]\nallow-flushall = true\n").unwrap();
    let node = start(&[&format!("--config={}", config.display())]);
    let mut c = Resp::connect(resp_addr(&node));
    runtime().block_on(async {
        let client = Client::connect(ClientConfig::new([node.endpoint()]))
            .await
            .unwrap();
        client.set(INTERNAL, "worker-1").await.unwrap();
        for i in 0..500 {
            let k = format!("k{i}");
            assert_eq!(c.call(&[b"SET", k.as_bytes(), b"v"]), "+OK\r\n");
        }
        assert_eq!(c.call(&[b"DBSIZE"]), ":500\r\n");
        assert_eq!(c.call(&[b"FLUSHALL"]), "+OK\r\n");
        assert_eq!(c.call(&[b"DBSIZE"]), ":0\r\n");
        assert_eq!(c.call(&[b"GET", b"k1"]), "$-1\r\n");
        let v = client
            .get(INTERNAL)
            .await
            .unwrap()
            .expect("internal key kept");
        assert_eq!(&v.value[..], b"worker-1");
        assert_eq!(c.call(&[b"SET", b"after", b"v"]), "+OK\r\n");
        assert_eq!(c.call(&[b"FLUSHDB"]), "+OK\r\n");
        assert_eq!(c.call(&[b"DBSIZE"]), ":0\r\n");
        assert!(client.get(INTERNAL).await.unwrap().is_some());
    });
}
