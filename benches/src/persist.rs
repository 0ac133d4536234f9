//! Pieces of the persistence benchmark (`src/bin/persist-bench.rs`): a child-process
//! guard for `raftcache-node` and `redis-server` runs that survive restarts of the same
//! data directory, a minimal RESP client for Redis' admin commands, the keys and values
//! both stores get, and the bounded write loads.
//!
//! Every child is killed when its guard is dropped (also while a panic unwinds) and gets
//! SIGKILL if the benchmark itself dies (`PR_SET_PDEATHSIG`); every wait and every loop
//! is bounded in time and count.

use crate::load::{load, Load};
use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use raftcache_client::Client;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Child;

pub use raftcache_tests::free_addr;

/// The size of every value.
pub const VALUE_SIZE: usize = 100;
/// How often a ready line, a log line or a server state is polled.
pub const POLL: Duration = Duration::from_millis(5);
/// How long one RESP command may take.
const RESP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per key when filling the cache (the client retries inside each, too).
const FILL_ATTEMPTS: u32 = 3;

/// Key `n` (the same on raftcache and Redis).
pub fn key_of(n: u64) -> String {
    format!("key:{n}")
}

/// Value of key `n`: [`VALUE_SIZE`] pseudo-random alphanumeric bytes seeded by `n`, so
/// both stores get the same, not trivially compressible, bytes and a read can check them.
pub fn value_of(n: u64) -> Bytes {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = SmallRng::seed_from_u64(n ^ 0x7e57_da7a_5eed_0001);
    (0..VALUE_SIZE)
        .map(|_| ALNUM[rng.random_range(0..ALNUM.len())])
        .collect::<Vec<u8>>()
        .into()
}

/// `SET key:{n} value_of(n)` in the RESP protocol (what `redis-cli --pipe` reads).
pub fn resp_set(n: u64, out: &mut Vec<u8>) {
    let key = key_of(n);
    let value = value_of(n);
    out.extend_from_slice(b"*3\r\n$3\r\nSET\r\n");
    out.extend_from_slice(format!("${}\r\n", key.len()).as_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(format!("\r\n${}\r\n", value.len()).as_bytes());
    out.extend_from_slice(&value);
    out.extend_from_slice(b"\r\n");
}

/// `name` as found on `PATH` (or `name` itself when it holds a `/` and is a file).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Bytes of every file under `dir` (0 when it does not exist).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// One child process whose stdout and stderr go to files. Dropping it kills the process
/// (SIGKILL); it also gets SIGKILL when the benchmark dies.
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Its stdout file.
    pub stdout: PathBuf,
    /// Its stderr file.
    pub stderr: PathBuf,
    /// When it was spawned.
    pub spawned_at: Instant,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // An error means that the process has already exited.
        let _ = self.child.start_kill();
        let _ = self.child.try_wait();
    }
}

impl Proc {
    /// Starts `program` with `args` and `env`; its output goes to `<log_dir>/<name>.stdout`
    /// and `<log_dir>/<name>.stderr` (truncated).
    ///
    /// # Errors
    /// When the files cannot be created or the program cannot start.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[OsString],
        env: &[(&str, String)],
        log_dir: &Path,
    ) -> anyhow::Result<Proc> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        let stdout = log_dir.join(format!("{name}.stdout"));
        let stderr = log_dir.join(format!("{name}.stderr"));
        let out = std::fs::File::create(&stdout)
            .with_context(|| format!("creating {}", stdout.display()))?;
        let err = std::fs::File::create(&stderr)
            .with_context(|| format!("creating {}", stderr.display()))?;
        let mut cmd = std::process::Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        raftcache_tests::die_with_parent(&mut cmd);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let spawned_at = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id().context("the child has no pid")?;
        Ok(Proc {
            name: name.to_owned(),
            pid,
            stdout,
            stderr,
            spawned_at,
            child,
        })
    }

    /// Its exit status, if it has exited.
    ///
    /// # Errors
    /// When the status cannot be read.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking on {}", self.name))
    }

    /// Its stdout so far.
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Its stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The last `n` lines of its stderr and stdout.
    pub fn log_tail(&self, n: usize) -> String {
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        format!(
            "--- {} stderr ---\n{}\n--- {} stdout ---\n{}",
            self.name,
            tail(self.stderr_text()),
            self.name,
            tail(self.stdout_text())
        )
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; returns the time from the
    /// signal to the exit. On timeout the process gets SIGKILL and this fails.
    ///
    /// # Errors
    /// When it does not exit in time.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<(Duration, ExitStatus)> {
        let sent = Instant::now();
        raftcache_tests::signal(self.pid, libc::SIGTERM);
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok((
                sent.elapsed(),
                status.with_context(|| format!("waiting for {}", self.name))?,
            )),
            Err(_) => {
                self.kill().await;
                bail!(
                    "{} did not exit within {timeout:?} of SIGTERM (killed); log tail:\n{}",
                    self.name,
                    self.log_tail(20)
                )
            }
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    ///
    /// # Errors
    /// When it does not exit in time (it is then killed).
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.with_context(|| format!("waiting for {}", self.name)),
            Err(_) => {
                self.kill().await;
                bail!("{} did not exit within {timeout:?} (killed)", self.name)
            }
        }
    }

    /// SIGKILL, then reap (at most 5 s).
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// A `raftcache-node` run: the process and what its ready line said.
pub struct NodeRun {
    /// The process.
    pub proc: Proc,
    /// The node id.
    pub node_id: u64,
    /// Its gRPC address.
    pub grpc: String,
    /// From the spawn to the ready line (polled every [`POLL`]).
    pub ready_after: Duration,
}

/// Starts `binary` with `args` (its stdout and stderr in `log_dir` as `<name>.*`) and
/// waits up to `timeout` for its JSON ready line.
///
/// # Errors
/// When it cannot start, exits, or prints no ready line in time.
pub async fn start_node(
    name: &str,
    binary: &Path,
    args: &[OsString],
    log_dir: &Path,
    timeout: Duration,
) -> anyhow::Result<NodeRun> {
    let rust_log =
        std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,raftcache_node=info".to_owned());
    let mut proc = Proc::spawn(name, binary, args, &[("RUST_LOG", rust_log)], log_dir)?;
    let deadline = proc.spawned_at + timeout;
    loop {
        if let Some((node_id, grpc)) = proc.stdout_text().lines().find_map(parse_ready) {
            return Ok(NodeRun {
                ready_after: proc.spawned_at.elapsed(),
                proc,
                node_id,
                grpc,
            });
        }
        if let Some(status) = proc.exited()? {
            bail!(
                "{name} exited before it was ready ({status}); log tail:\n{}",
                proc.log_tail(20)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{name} printed no ready line within {timeout:?}; log tail:\n{}",
                proc.log_tail(20)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `(node, grpc)` of a `{"event":"ready",...}` line.
fn parse_ready(line: &str) -> Option<(u64, String)> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    if v.get("event")?.as_str()? != "ready" {
        return None;
    }
    let node = v.get("node")?.as_u64()?;
    let grpc = v.get("grpc")?.as_str()?.to_owned();
    Some((node, grpc))
}

/// The value of `field=` (a number) on the first line of `log` that contains `message`
/// (tracing's text format: `... message field=value field=value`).
pub fn log_field(log: &str, message: &str, field: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains(message))?;
    let prefix = format!("{field}=");
    line.split_whitespace()
        .find_map(|tok| tok.strip_prefix(&prefix))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

// ---------------------------------------------------------------------------------
// RESP

/// A Redis reply (arrays are not needed here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:1`
    Int(i64),
    /// `$n ...` (`None`: `$-1`)
    Bulk(Option<Vec<u8>>),
}

impl Reply {
    /// The reply as text (errors included, prefixed by `-`).
    pub fn text(&self) -> String {
        match self {
            Reply::Simple(s) => s.clone(),
            Reply::Error(e) => format!("-{e}"),
            Reply::Int(i) => i.to_string(),
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Reply::Bulk(None) => "(nil)".to_owned(),
        }
    }

    /// The integer of an `Int` reply.
    ///
    /// # Errors
    /// For any other reply.
    pub fn int(&self) -> anyhow::Result<i64> {
        match self {
            Reply::Int(i) => Ok(*i),
            other => bail!("expected an integer reply, got {other:?}"),
        }
    }
}

/// A connection to a Redis server speaking RESP, one command at a time.
pub struct Resp {
    stream: BufReader<TcpStream>,
}

impl Resp {
    /// Connects to `addr` (at most 2 s).
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn connect(addr: &str) -> anyhow::Result<Resp> {
        let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr}: timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        Ok(Resp {
            stream: BufReader::new(stream),
        })
    }

    /// Sends one command and reads its reply (at most [`RESP_TIMEOUT`]).
    ///
    /// # Errors
    /// On I/O errors, a timeout or an unexpected reply type.
    pub async fn cmd(&mut self, args: &[&str]) -> anyhow::Result<Reply> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        let name = args.first().copied().unwrap_or_default();
        tokio::time::timeout(RESP_TIMEOUT, async {
            self.stream.get_mut().write_all(&out).await?;
            self.read_reply().await
        })
        .await
        .with_context(|| format!("{name}: no reply within {RESP_TIMEOUT:?}"))?
        .with_context(|| name.to_owned())
    }

    async fn read_reply(&mut self) -> anyhow::Result<Reply> {
        let mut line = String::new();
        let n = self.stream.read_line(&mut line).await?;
        ensure!(n > 0, "the server closed the connection");
        let line = line.trim_end_matches(['\r', '\n']);
        let (kind, rest) = line.split_at(line.len().min(1));
        Ok(match kind {
            "+" => Reply::Simple(rest.to_owned()),
            "-" => Reply::Error(rest.to_owned()),
            ":" => Reply::Int(rest.parse().context("integer reply")?),
            "$" => {
                let len: i64 = rest.parse().context("bulk length")?;
                if len < 0 {
                    Reply::Bulk(None)
                } else {
                    let len = usize::try_from(len).context("bulk length")?;
                    let mut buf = vec![0; len + 2];
                    self.stream.read_exact(&mut buf).await?;
                    buf.truncate(len);
                    Reply::Bulk(Some(buf))
                }
            }
            _ => bail!("unexpected reply {line:?}"),
        })
    }

    /// `INFO section` as `field → value` pairs.
    ///
    /// # Errors
    /// As [`Resp::cmd`], or an error reply.
    pub async fn info(&mut self, section: &str) -> anyhow::Result<Vec<(String, String)>> {
        match self.cmd(&["INFO", section]).await? {
            Reply::Bulk(Some(b)) => Ok(String::from_utf8_lossy(&b)
                .lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
                .collect()),
            other => bail!("INFO {section}: unexpected reply {other:?}"),
        }
    }
}

/// The value of `field` in an `INFO` answer.
pub fn info_field<'a>(info: &'a [(String, String)], field: &str) -> Option<&'a str> {
    info.iter()
        .find(|(k, _)| k == field)
        .map(|(_, v)| v.as_str())
}

/// Writes keys `0..keys` into the Redis at `127.0.0.1:port` with `redis-cli --pipe` (the
/// RESP text is generated here and streamed to its stdin); its output goes to
/// `<log_dir>/redis-cli-pipe.*`. Returns the time it took and the replies it counted.
///
/// # Errors
/// When redis-cli cannot start, fails, reports errors or takes longer than `limit`.
pub async fn redis_pipe(
    redis_cli: &Path,
    port: u16,
    keys: u64,
    log_dir: &Path,
    limit: Duration,
) -> anyhow::Result<(Duration, u64)> {
    let stdout_path = log_dir.join("redis-cli-pipe.stdout");
    let stderr_path = log_dir.join("redis-cli-pipe.stderr");
    let mut cmd = std::process::Command::new(redis_cli);
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&stdout_path).context("creating the redis-cli log")?)
        .stderr(std::fs::File::create(&stderr_path).context("creating the redis-cli log")?);
    raftcache_tests::die_with_parent(&mut cmd);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", redis_cli.display()))?;
    let mut stdin = child.stdin.take().context("redis-cli has no stdin")?;
    let work = async {
        let mut buf = Vec::with_capacity(4 << 20);
        for n in 0..keys {
            resp_set(n, &mut buf);
            if buf.len() >= 4 << 20 {
                stdin.write_all(&buf).await?;
                buf.clear();
            }
        }
        stdin.write_all(&buf).await?;
        stdin.shutdown().await?;
        drop(stdin);
        child.wait().await
    };
    let status = match tokio::time::timeout(limit, work).await {
        Ok(status) => status.context("feeding redis-cli --pipe")?,
        Err(_) => {
            let _ = child.start_kill();
            bail!("redis-cli --pipe took more than {limit:?} (killed)");
        }
    };
    let took = start.elapsed();
    let out = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    ensure!(
        status.success(),
        "redis-cli --pipe failed ({status}): {out}{err}"
    );
    // "errors: 0, replies: 1000000"
    let line = out
        .lines()
        .find(|l| l.contains("replies:"))
        .with_context(|| format!("redis-cli --pipe printed no summary: {out}{err}"))?;
    let number = |name: &str| -> Option<u64> {
        line.split(',')
            .find_map(|part| part.trim().strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let errors = number("errors:").context("no error count in the redis-cli summary")?;
    let replies = number("replies:").context("no reply count in the redis-cli summary")?;
    ensure!(errors == 0, "redis-cli --pipe: {line}");
    Ok((took, replies))
}

// ---------------------------------------------------------------------------------
// Loads

/// Writes keys `0..keys` (`key_of(n)` = `value_of(n)`) with `concurrency` tasks over
/// disjoint strides, each key tried up to [`FILL_ATTEMPTS`] times; at most `limit` in all.
/// Prints progress to stderr every 10 s. Returns the time it took.
///
/// # Errors
/// When a key cannot be written or time runs out.
pub async fn fill(
    client: &Client,
    keys: u64,
    concurrency: usize,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let deadline = start + limit;
    let done = Arc::new(AtomicU64::new(0));
    let stride = concurrency.max(1) as u64;
    let tasks: Vec<_> = (0..stride)
        .map(|t| {
            let client = client.clone();
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                let mut n = t;
                while n < keys {
                    let mut attempt = 0;
                    loop {
                        ensure!(
                            Instant::now() < deadline,
                            "filling {keys} keys took more than {limit:?}"
                        );
                        attempt += 1;
                        match client.set(key_of(n), value_of(n)).await {
                            Ok(_) => break,
                            Err(e) if attempt < FILL_ATTEMPTS => {
                                eprintln!("  set {} failed ({e}); retrying", key_of(n));
                            }
                            Err(e) => {
                                return Err(
                                    anyhow::Error::new(e).context(format!("writing {}", key_of(n)))
                                );
                            }
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    n += stride;
                }
                Ok(())
            })
        })
        .collect();
    let progress = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            // Ends with the fill (aborted below) or at the deadline.
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let n = done.load(Ordering::Relaxed);
                eprintln!(
                    "  {n} of {keys} keys written ({:.0}/s)",
                    n as f64 / start.elapsed().as_secs_f64()
                );
            }
        })
    };
    let results = futures::future::join_all(tasks).await;
    progress.abort();
    for r in results {
        r.context("a fill task panicked")??;
    }
    Ok(start.elapsed())
}

/// `concurrency` tasks write random keys of `0..keys` (`value_of`) back to back for
/// `warmup` + `window`; the writes that start after the warm-up and end within the
/// window are counted and timed.
///
/// # Errors
/// When a task panics or a histogram cannot be built.
pub async fn set_load(
    client: &Client,
    concurrency: usize,
    keys: u64,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<Load> {
    let client = client.clone();
    load(concurrency, keys, warmup, window, move |n| {
        let client = client.clone();
        async move { client.set(key_of(n), value_of(n)).await.map(|_| true) }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_stable_and_sized() {
        assert_eq!(value_of(7), value_of(7));
        assert_ne!(value_of(7), value_of(8));
        assert_eq!(value_of(0).len(), VALUE_SIZE);
        let mut out = Vec::new();
        resp_set(3, &mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        assert!(text.starts_with("*3\r\n$3\r\nSET\r\n$5\r\nkey:3\r\n$100\r\n"));
        assert!(text.ends_with("\r\n"));
    }

    #[test]
    fn reads_tracing_fields() {
        let log = "2026-11-22T21:00:00Z  INFO raftcache_node::cluster::persist: restored from the data directory; catching up from the leaders node=1 groups=17 keys=1000000 snapshots_only=false";
        assert_eq!(
            log_field(log, "restored from the data directory", "keys"),
            Some(1_000_000)
        );
        assert_eq!(
            log_field(log, "restored from the data directory", "groups"),
            Some(17)
        );
        assert_eq!(log_field(log, "nothing like this", "keys"), None);
    }
}
