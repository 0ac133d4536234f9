//! The RESP listener: one task per connection.
//!
//! A connection reads what is there, parses every complete command in it, runs them and
//! answers them all with one write (pipelining costs one read and one write per batch,
//! not per command). Within a batch, consecutive single-key commands run concurrently
//! unless one writes a key another one reads or writes (then the batch waits for the
//! earlier ones first), and replies go out in request order; any other command runs
//! alone, after everything before it. So a pipeline sees its own writes, as with Redis.
//!
//! Bounds: at most `max-clients` connections (more get `-ERR max number of clients
//! reached` and are closed), `max-query-buffer` bytes of unanswered requests per
//! connection, the parser's [`Limits`](super::codec::Limits). A protocol error is
//! answered and the connection closed, as Redis does. An argument over the bulk limit
//! (a value over `storage.max-value-size`) is not: the rest of its command is read and
//! dropped as it arrives ([`Discard`], bounded by `max-query-buffer`), then answered
//! with an error naming the limit, and the connection goes on.

use super::codec::{parse_command, Discard, ProtocolError, Reply};
use super::command::{self, Cmd};
use super::exec::{record_command, Conn, Frontend};
use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Most commands of one read run as one batch (the rest wait for the next round).
const MAX_BATCH: usize = 1024;
/// Most single-key commands running at once in a batch.
const MAX_CONCURRENT: usize = 128;
/// Reply bytes after which a batch's replies are written before it goes on.
const FLUSH_BYTES: usize = 256 * 1024;
/// The read buffer's usual size.
const READ_CHUNK: usize = 16 * 1024;

/// Accepts connections until `cancel`.
pub async fn serve(
    listener: TcpListener,
    frontend: Arc<Frontend>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    warn!(error = %e, "RESP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let counters = &frontend.counters;
        counters.connections.fetch_add(1, Ordering::Relaxed);
        if counters.connected.load(Ordering::Relaxed) as usize >= frontend.settings().max_clients {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            tasks.spawn(async move {
                let mut stream = stream;
                let _ = stream
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
            });
            continue;
        }
        counters.connected.fetch_add(1, Ordering::Relaxed);
        let frontend = frontend.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let local = stream
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let mut conn = frontend.connect(peer.to_string(), local);
            if let Err(e) = connection(stream, &frontend, &mut conn, cancel).await {
                debug!(peer = %peer, error = %e, "RESP connection ended");
            }
            frontend.counters.connected.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Serves one connection until it closes, sends `QUIT`, breaks the protocol, or the
/// node stops.
async fn connection(
    mut stream: TcpStream,
    frontend: &Frontend,
    conn: &mut Conn,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let settings = frontend.settings();
    let limits = settings.limits;
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut wbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut batch: Vec<Vec<Bytes>> = Vec::new();
    // The command being skipped after an oversized argument, with its error.
    let mut skipping: Option<(Discard, ProtocolError)> = None;
    let max_query = u64::try_from(settings.max_query_buffer).unwrap_or(u64::MAX);
    loop {
        let mut failure = None;
        let mut started_skip = false;
        if let Some((skip, oversized)) = &mut skipping {
            match skip.feed(&mut rbuf, &limits) {
                Ok(true) => {
                    frontend
                        .oversized(oversized)
                        .encode(conn.protocol, &mut wbuf);
                    skipping = None;
                }
                Ok(false) if skip.declared() > max_query => {
                    crate::metrics::record_resp_too_large("max-query-buffer");
                    failure = Some(Reply::error(format!(
                        "ERR Protocol error: a command of {} bytes is over the {}-byte query buffer limit (resp.max-query-buffer)",
                        skip.declared(),
                        settings.max_query_buffer
                    )));
                }
                Ok(false) => {}
                Err(e) => failure = Some(e.reply()),
            }
        }
        // Every complete command in the buffer.
        while skipping.is_none() && failure.is_none() && batch.len() < MAX_BATCH {
            match parse_command(&mut rbuf, &limits) {
                Ok(Some(args)) => batch.push(args),
                Ok(None) => break,
                Err(e @ ProtocolError::BulkTooLarge { len, rest, .. }) if len <= max_query => {
                    skipping = Some((Discard::new(len, rest), e));
                    started_skip = true;
                }
                Err(ProtocolError::BulkTooLarge { len, .. }) => {
                    crate::metrics::record_resp_too_large("max-query-buffer");
                    failure = Some(Reply::error(format!(
                        "ERR Protocol error: an argument of {len} bytes is over the {}-byte query buffer limit (resp.max-query-buffer)",
                        settings.max_query_buffer
                    )));
                }
                Err(e) => failure = Some(e.reply()),
            }
        }
        let full = batch.len() >= MAX_BATCH;
        if !batch.is_empty() {
            run_batch(frontend, conn, &mut batch, &mut wbuf, &mut stream).await?;
        }
        if let Some(reply) = failure {
            reply.encode(conn.protocol, &mut wbuf);
            write(frontend, &mut stream, &mut wbuf).await?;
            return Ok(());
        }
        if !wbuf.is_empty() {
            write(frontend, &mut stream, &mut wbuf).await?;
        }
        if conn.quit {
            return Ok(());
        }
        if full || started_skip {
            // MAX_BATCH stopped the parse: the buffer may hold more whole commands; or
            // a skip started: the buffer may hold more of the skipped command.
            continue;
        }
        if rbuf.len() > settings.max_query_buffer {
            Reply::error("ERR Protocol error: query buffer limit reached (resp.max-query-buffer)")
                .encode(conn.protocol, &mut wbuf);
            write(frontend, &mut stream, &mut wbuf).await?;
            return Ok(());
        }
        // Grow for a large frame, or give back a large buffer between frames.
        if rbuf.is_empty() && rbuf.capacity() > 4 * READ_CHUNK {
            rbuf = BytesMut::with_capacity(READ_CHUNK);
        }
        if rbuf.capacity() - rbuf.len() < READ_CHUNK / 2 {
            let grow = rbuf.len().clamp(READ_CHUNK, 8 * 1024 * 1024);
            rbuf.reserve(grow);
        }
        let n = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            n = stream.read_buf(&mut rbuf) => n?,
        };
        if n == 0 {
            return Ok(());
        }
        frontend
            .counters
            .net_in
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn write(
    frontend: &Frontend,
    stream: &mut TcpStream,
    wbuf: &mut BytesMut,
) -> std::io::Result<()> {
    stream.write_all(wbuf).await?;
    frontend
        .counters
        .net_out
        .fetch_add(wbuf.len() as u64, Ordering::Relaxed);
    wbuf.clear();
    if wbuf.capacity() > 4 * FLUSH_BYTES {
        *wbuf = BytesMut::with_capacity(READ_CHUNK);
    }
    Ok(())
}

type Running<'a> = Pin<Box<dyn Future<Output = Reply> + Send + 'a>>;

/// Runs a batch in order (see the module docs) and encodes the replies into `wbuf`.
async fn run_batch(
    frontend: &Frontend,
    conn: &mut Conn,
    batch: &mut Vec<Vec<Bytes>>,
    wbuf: &mut BytesMut,
    stream: &mut TcpStream,
) -> std::io::Result<()> {
    frontend
        .counters
        .commands
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    // One command (no pipelining): run it in place.
    if batch.len() == 1 {
        if let Some(args) = batch.pop() {
            let reply = run_one(frontend, conn, args).await;
            reply.encode(conn.protocol, wbuf);
        }
        return Ok(());
    }
    let protocol = conn.protocol;
    let mut running: Vec<Running<'_>> = Vec::new();
    let mut touched: Vec<(Bytes, bool)> = Vec::new();
    for args in batch.drain(..) {
        if conn.quit {
            break;
        }
        match command::parse(&args) {
            Ok(Cmd::Key { key, op }) => {
                let write = op.is_write();
                let conflict = touched.iter().any(|(t, w)| *t == key && (write || *w));
                if conflict || running.len() >= MAX_CONCURRENT {
                    finish(&mut running, &mut touched, protocol, wbuf).await;
                }
                touched.push((key.clone(), write));
                running.push(Box::pin(async move {
                    let started = Instant::now();
                    let reply = frontend.run_key(&key, &op, &args, protocol).await;
                    record_command(args.first().map_or(&[][..], |a| &a[..]), &reply, started);
                    reply
                }));
            }
            other => {
                finish(&mut running, &mut touched, protocol, wbuf).await;
                let started = Instant::now();
                let reply = match other {
                    Ok(cmd) => frontend.run(conn, cmd, &args).await,
                    Err(reply) => reply,
                };
                record_command(args.first().map_or(&[][..], |a| &a[..]), &reply, started);
                reply.encode(conn.protocol, wbuf);
            }
        }
        if wbuf.len() >= FLUSH_BYTES {
            write(frontend, stream, wbuf).await?;
        }
    }
    finish(&mut running, &mut touched, protocol, wbuf).await;
    Ok(())
}

/// Waits for the running commands and encodes their replies in order.
async fn finish(
    running: &mut Vec<Running<'_>>,
    touched: &mut Vec<(Bytes, bool)>,
    protocol: super::codec::Protocol,
    wbuf: &mut BytesMut,
) {
    touched.clear();
    if running.is_empty() {
        return;
    }
    for reply in join_all(running.drain(..)).await {
        reply.encode(protocol, wbuf);
    }
}

/// One command, parsed and run.
async fn run_one(frontend: &Frontend, conn: &mut Conn, args: Vec<Bytes>) -> Reply {
    let started = Instant::now();
    let reply = match command::parse(&args) {
        Ok(cmd) => frontend.run(conn, cmd, &args).await,
        Err(reply) => reply,
    };
    record_command(args.first().map_or(&[][..], |a| &a[..]), &reply, started);
    reply
}
