//! The fault-injecting TCP proxy every peer link of the cluster under test goes through.
//!
//! # Model
//! Node `i` reaches node `j` only through a listener dedicated to the *directed link*
//! `i → j` (the node is told to dial that listener instead of `j`'s address), so `n`
//! nodes use `n·(n−1)` listeners. A connection accepted on link `i → j` is connected to
//! `j`'s real address; the bytes node `i` writes are the *forward* direction and carry
//! traffic `i → j`, the replies are the *reverse* direction and carry traffic `j → i`.
//!
//! Faults are set per ordered pair `(from, to)` and mean "packets from `from` to
//! `to`", so a fault on `(a, b)` acts on the forward pumps of link `a → b` and on the
//! reverse pumps of link `b → a`:
//! - **block**: the direction *stalls*: the proxy stops reading and holds what it has
//!   already read. It never discards: dropping bytes inside a TCP stream would corrupt
//!   the HTTP/2 framing, whereas real packet loss on a TCP connection shows up to the
//!   application as delay (retransmission) and finally as the peer's keepalive timeout.
//!   When the block is lifted the held bytes flow again, in order. New connections on a
//!   blocked link are accepted but stall the same way, like a dropped SYN/ACK.
//! - **delay** `d ± jitter`: a chunk read at `t` is written no earlier than
//!   `t + d + U[0, jitter]`, in order. A reader task and a writer future joined by a
//!   bounded channel pipeline the chunks, so latency is about `d`, not `d` per chunk.
//! - **loss** `p`: like TCP shows it: with probability `p` a chunk is held an extra
//!   [`RETRANSMIT_DELAY`], and the chunks behind it wait too.
//! - **reset**: closes the open connections of every link touching a node.
//!
//! Fault changes go through a `tokio::sync::watch` channel, so stalled and sleeping
//! pumps re-evaluate at once (no polling). Reads are at most [`MAX_CHUNK`] bytes and each
//! direction buffers at most [`CHANNEL_CHUNKS`] chunks, so a stalled direction pushes
//! back on the sender through TCP.
//!
//! Close semantics: EOF on one side shuts down the write half of the other side once
//! the pending bytes are delivered; an error on either side closes both; a failed
//! connect to the target closes the accepted connection at once. Every connection is a
//! single task whose abort handle the [`Net`] keeps: [`Net::reset`] aborts some, dropping
//! the last clone of the [`Net`] (or [`Net::shutdown`]) aborts all listeners and
//! connections, which closes their sockets.

use super::partition;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// The extra hold of a "lost" chunk: the retransmission timeout TCP would wait.
pub const RETRANSMIT_DELAY: Duration = Duration::from_millis(200);
/// The largest chunk read at once, in bytes.
pub const MAX_CHUNK: usize = 64 * 1024;
/// How many chunks one direction of one connection buffers before it stops reading.
pub const CHANNEL_CHUNKS: usize = 64;
/// How long the proxy waits to connect to a link's target.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest delay and jitter [`Net::set_delay`] accepts (larger values are clamped).
pub const MAX_DELAY: Duration = Duration::from_secs(3600);

/// An ordered pair of nodes: traffic from `.0` to `.1`.
type Dir = (usize, usize);

/// The current faults, per ordered pair of nodes.
#[derive(Debug, Clone, Default)]
struct Faults {
    blocked: BTreeSet<Dir>,
    /// (delay, jitter)
    delay: BTreeMap<Dir, (Duration, Duration)>,
    loss: BTreeMap<Dir, f64>,
}

/// What one direction needs to know of the faults.
#[derive(Clone, Copy)]
struct DirFaults {
    blocked: bool,
    delay: Duration,
    jitter: Duration,
    loss: f64,
}

impl Faults {
    fn of(&self, dir: Dir) -> DirFaults {
        let (delay, jitter) = self.delay.get(&dir).copied().unwrap_or_default();
        DirFaults {
            blocked: self.blocked.contains(&dir),
            delay,
            jitter,
            loss: self.loss.get(&dir).copied().unwrap_or(0.0),
        }
    }
}

/// Counters of the proxy, for the nemesis log and for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Links (listeners) added.
    pub links: u64,
    /// Connections accepted on all links since the start.
    pub accepted: u64,
    /// Connections currently open (accepted and not yet closed).
    pub open: u64,
    /// Accepted connections closed because the target could not be reached.
    pub connect_failures: u64,
    /// Bytes delivered, both directions, all links.
    pub bytes_forwarded: u64,
    /// Chunks read from one side and not yet written to the other (held by a block, a
    /// delay or a loss, or just in flight).
    pub held_chunks: u64,
    /// Connections closed by [`Net::reset`] / [`Net::reset_all`].
    pub reset_connections: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    connect_failures: AtomicU64,
    bytes_forwarded: AtomicU64,
    held_chunks: AtomicU64,
    reset_connections: AtomicU64,
}

struct Link {
    target: SocketAddr,
}

struct Conn {
    link: Dir,
    abort: AbortHandle,
}

#[derive(Default)]
struct Registry {
    closed: bool,
    next_id: u64,
    links: BTreeMap<Dir, Link>,
    listeners: Vec<AbortHandle>,
    conns: HashMap<u64, Conn>,
}

/// State shared by the [`Net`] handle and its tasks.
struct Shared {
    faults: watch::Sender<Faults>,
    registry: Mutex<Registry>,
    counters: Counters,
    rng: Mutex<SmallRng>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Aborts every listener and connection; later links and connections are refused.
    fn close(&self) {
        let handles: Vec<AbortHandle> = {
            let mut reg = self.registry();
            reg.closed = true;
            let mut v: Vec<AbortHandle> = reg.listeners.drain(..).collect();
            v.extend(reg.conns.drain().map(|(_, c)| c.abort));
            v
        };
        for h in handles {
            h.abort();
        }
    }

    /// Spawns the task of an accepted connection; false once the proxy is closed.
    fn spawn_conn(self: &Arc<Self>, link: Dir, inbound: TcpStream) -> bool {
        let mut reg = self.registry();
        if reg.closed {
            return false;
        }
        let id = reg.next_id;
        reg.next_id += 1;
        // Spawned under the lock so that the task's own deregistration (which takes the
        // lock) cannot run before this registration.
        let task = tokio::spawn(serve_conn(Arc::clone(self), id, link, inbound));
        reg.conns.insert(
            id,
            Conn {
                link,
                abort: task.abort_handle(),
            },
        );
        true
    }

    /// Per-chunk randomness: the jitter fraction and whether the chunk is "lost".
    fn sample(&self, f: DirFaults) -> (f64, bool) {
        if f.jitter.is_zero() && f.loss <= 0.0 {
            return (0.0, false);
        }
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let frac = if f.jitter.is_zero() {
            0.0
        } else {
            rng.random::<f64>()
        };
        let lost = f.loss > 0.0 && rng.random_bool(f.loss.min(1.0));
        (frac, lost)
    }
}

/// Removes a connection from the registry when its task ends.
struct ConnGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.shared.registry().conns.remove(&self.id);
    }
}

/// The owner of the shared state: its drop (the last [`Net`] clone) closes everything.
struct Owner {
    shared: Arc<Shared>,
    seed: u64,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// The fault-injecting proxy: all directed links and their faults.
///
/// Cheap to clone; the clones share the links. Dropping the last clone stops every
/// listener and closes every connection.
#[derive(Clone)]
pub struct Net {
    owner: Arc<Owner>,
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("seed", &self.owner.seed)
            .field("faults", &self.describe())
            .field("stats", &self.stats())
            .finish()
    }
}

impl Net {
    /// A proxy without links whose jitter and loss draw from a time-seeded RNG (see
    /// [`seed`](Self::seed)). Needs no runtime; [`add_link`](Self::add_link) does.
    pub fn new() -> Net {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self::with_seed(seed)
    }

    /// A proxy without links whose jitter and loss draw from an RNG seeded with `seed`.
    pub fn with_seed(seed: u64) -> Net {
        let shared = Shared {
            faults: watch::Sender::new(Faults::default()),
            registry: Mutex::default(),
            counters: Counters::default(),
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
        };
        Net {
            owner: Arc::new(Owner {
                shared: Arc::new(shared),
                seed,
            }),
        }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.owner.shared
    }

    /// The RNG seed, to log and replay a run.
    pub fn seed(&self) -> u64 {
        self.owner.seed
    }

    /// Starts the listener of the directed link `from → to` on `127.0.0.1:0`,
    /// forwarding to `target` (node `to`'s real address); returns the listener's
    /// address, which node `from` must dial instead of `target`.
    ///
    /// # Errors
    /// When binding fails, `from == to`, the link exists already or the proxy is shut
    /// down.
    pub async fn add_link(
        &self,
        from: usize,
        to: usize,
        target: SocketAddr,
    ) -> io::Result<SocketAddr> {
        if from == to {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("link {from}→{from} to itself"),
            ));
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = self.shared();
        let mut reg = shared.registry();
        if reg.closed {
            return Err(io::Error::other("proxy shut down"));
        }
        if reg.links.contains_key(&(from, to)) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("link {from}→{to} exists"),
            ));
        }
        reg.links.insert((from, to), Link { target });
        let task = tokio::spawn(listen(Arc::clone(shared), (from, to), listener));
        reg.listeners.push(task.abort_handle());
        tracing::debug!(from, to, %addr, %target, "proxy link");
        Ok(addr)
    }

    /// Points every link into node `to` at `target` (a node restarted on another
    /// address). Affects new connections only.
    pub fn retarget(&self, to: usize, target: SocketAddr) {
        for (_, link) in self
            .shared()
            .registry()
            .links
            .iter_mut()
            .filter(|((_, t), _)| *t == to)
        {
            link.target = target;
        }
    }

    fn modify(&self, f: impl FnOnce(&mut Faults)) {
        self.shared().faults.send_modify(f);
    }

    /// Blocks traffic from `from` to `to` (one direction), on open and new connections.
    pub fn block(&self, from: usize, to: usize) {
        self.modify(|f| {
            f.blocked.insert((from, to));
        });
    }

    /// Lifts the block of traffic from `from` to `to`; the held bytes flow again.
    pub fn unblock(&self, from: usize, to: usize) {
        self.modify(|f| {
            f.blocked.remove(&(from, to));
        });
    }

    /// Replaces the set of blocked directions by `cuts` at once (e.g. the output of
    /// [`partition::cuts`]); delays and losses stay.
    pub fn block_all(&self, cuts: &[(usize, usize)]) {
        self.modify(|f| f.blocked = cuts.iter().copied().collect());
    }

    /// The blocked directions, sorted.
    pub fn blocked(&self) -> Vec<(usize, usize)> {
        self.shared()
            .faults
            .borrow()
            .blocked
            .iter()
            .copied()
            .collect()
    }

    /// Delays traffic from `from` to `to` by `delay` plus a uniform random jitter in
    /// `[0, jitter]` per chunk, order preserved. Zero and zero removes the delay. Both
    /// are clamped to [`MAX_DELAY`].
    pub fn set_delay(&self, from: usize, to: usize, delay: Duration, jitter: Duration) {
        let (delay, jitter) = (delay.min(MAX_DELAY), jitter.min(MAX_DELAY));
        self.modify(|f| {
            if delay.is_zero() && jitter.is_zero() {
                f.delay.remove(&(from, to));
            } else {
                f.delay.insert((from, to), (delay, jitter));
            }
        });
    }

    /// Makes each chunk from `from` to `to` "lost" with probability `p` (clamped to
    /// `[0, 1]`; 0 removes the loss): held an extra [`RETRANSMIT_DELAY`], with the chunks
    /// behind it.
    pub fn set_loss(&self, from: usize, to: usize, p: f64) {
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        self.modify(|f| {
            if p > 0.0 {
                f.loss.insert((from, to), p);
            } else {
                f.loss.remove(&(from, to));
            }
        });
    }

    /// Lifts every block, delay and loss at once; held bytes flow again.
    pub fn heal_all(&self) {
        self.modify(|f| *f = Faults::default());
    }

    /// Closes every open connection of every link from or to `node` (both sides).
    pub fn reset(&self, node: usize) {
        self.reset_where(|(a, b)| a == node || b == node);
    }

    /// Closes every open connection of every link.
    pub fn reset_all(&self) {
        self.reset_where(|_| true);
    }

    fn reset_where(&self, pick: impl Fn(Dir) -> bool) {
        let shared = self.shared();
        let mut victims = Vec::new();
        shared.registry().conns.retain(|_, c| {
            let hit = pick(c.link);
            if hit {
                victims.push(c.abort.clone());
            }
            !hit
        });
        shared
            .counters
            .reset_connections
            .fetch_add(victims.len() as u64, Relaxed);
        for v in victims {
            v.abort();
        }
    }

    /// Stops every listener and closes every connection now, as dropping the last clone
    /// does; later [`add_link`](Self::add_link) calls fail.
    pub fn shutdown(&self) {
        self.shared().close();
    }

    /// The current faults in one line for the nemesis log, e.g.
    /// `"blocked {0} x {1,2}; delay 3→1 50ms±10ms; loss 2→3 10%"`, or `"no faults"`.
    pub fn describe(&self) -> String {
        let f = self.shared().faults.borrow().clone();
        let mut parts = Vec::new();
        if !f.blocked.is_empty() {
            let cuts: Vec<Dir> = f.blocked.iter().copied().collect();
            parts.push(format!("blocked {}", partition::describe(&cuts)));
        }
        if !f.delay.is_empty() {
            let ds: Vec<String> = f
                .delay
                .iter()
                .map(|(&(a, b), &(d, j))| {
                    if j.is_zero() {
                        format!("{a}→{b} {d:?}")
                    } else {
                        format!("{a}→{b} {d:?}±{j:?}")
                    }
                })
                .collect();
            parts.push(format!("delay {}", ds.join(" ")));
        }
        if !f.loss.is_empty() {
            let ls: Vec<String> = f
                .loss
                .iter()
                .map(|(&(a, b), &p)| format!("{a}→{b} {}%", (p * 1000.0).round() / 10.0))
                .collect();
            parts.push(format!("loss {}", ls.join(" ")));
        }
        if parts.is_empty() {
            "no faults".into()
        } else {
            parts.join("; ")
        }
    }

    /// The proxy's counters now.
    pub fn stats(&self) -> NetStats {
        let shared = self.shared();
        let (links, open) = {
            let reg = shared.registry();
            (reg.links.len() as u64, reg.conns.len() as u64)
        };
        let c = &shared.counters;
        NetStats {
            links,
            accepted: c.accepted.load(Relaxed),
            open,
            connect_failures: c.connect_failures.load(Relaxed),
            bytes_forwarded: c.bytes_forwarded.load(Relaxed),
            held_chunks: c.held_chunks.load(Relaxed),
            reset_connections: c.reset_connections.load(Relaxed),
        }
    }
}

/// The accept loop of link `link`.
async fn listen(shared: Arc<Shared>, link: Dir, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((inbound, _)) => {
                shared.counters.accepted.fetch_add(1, Relaxed);
                if !shared.spawn_conn(link, inbound) {
                    return;
                }
            }
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::warn!(from = link.0, to = link.1, "proxy accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One accepted connection on `link`: connect to the target, then pump both ways.
async fn serve_conn(shared: Arc<Shared>, id: u64, link: Dir, inbound: TcpStream) {
    let _guard = ConnGuard {
        shared: &shared,
        id,
    };
    let target = shared.registry().links.get(&link).map(|l| l.target);
    let Some(target) = target else { return };
    let outbound = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return connect_failed(&shared, link, &e.to_string()),
        Err(_) => return connect_failed(&shared, link, "timed out"),
    };
    // Small HTTP/2 frames must not wait for Nagle.
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_r, in_w) = inbound.into_split();
    let (out_r, out_w) = outbound.into_split();
    let (from, to) = link;
    // On an error the other pump is dropped with its halves: both sockets close.
    if let Err(e) = tokio::try_join!(
        pump(&shared, in_r, out_w, (from, to)),
        pump(&shared, out_r, in_w, (to, from)),
    ) {
        tracing::debug!(from, to, "proxy connection closed: {e}");
    }
}

fn connect_failed(shared: &Shared, link: Dir, why: &str) {
    shared.counters.connect_failures.fetch_add(1, Relaxed);
    tracing::debug!(from = link.0, to = link.1, "proxy connect failed: {why}");
}

/// Counts a chunk as held while it lives.
struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Relaxed);
        Held(counter)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

struct Chunk<'a> {
    data: Vec<u8>,
    read_at: Instant,
    _held: Held<'a>,
}

fn proxy_gone() -> io::Error {
    io::Error::other("proxy shut down")
}

/// One direction of one connection, carrying traffic `dir`: a reader and a writer joined
/// by a bounded channel.
async fn pump(
    shared: &Shared,
    src: OwnedReadHalf,
    dst: OwnedWriteHalf,
    dir: Dir,
) -> io::Result<()> {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    tokio::try_join!(
        read_side(shared, src, tx, dir),
        write_side(shared, rx, dst, dir)
    )?;
    Ok(())
}

async fn read_side<'a>(
    shared: &'a Shared,
    mut src: OwnedReadHalf,
    tx: mpsc::Sender<Chunk<'a>>,
    dir: Dir,
) -> io::Result<()> {
    let mut faults = shared.faults.subscribe();
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        // A blocked direction stops reading: the sender's TCP window fills up.
        while faults.borrow_and_update().of(dir).blocked {
            faults.changed().await.map_err(|_| proxy_gone())?;
        }
        let n = src.read(&mut buf).await?;
        if n == 0 {
            return Ok(()); // EOF: dropping `tx` lets the writer finish and shut down.
        }
        let chunk = Chunk {
            data: buf[..n].to_vec(),
            read_at: Instant::now(),
            _held: Held::new(&shared.counters.held_chunks),
        };
        if tx.send(chunk).await.is_err() {
            return Ok(()); // the writer is gone, so is this pump
        }
    }
}

async fn write_side(
    shared: &Shared,
    mut rx: mpsc::Receiver<Chunk<'_>>,
    mut dst: OwnedWriteHalf,
    dir: Dir,
) -> io::Result<()> {
    let mut faults = shared.faults.subscribe();
    while let Some(chunk) = rx.recv().await {
        let head_since = Instant::now();
        let now_faults = faults.borrow_and_update().of(dir);
        let (frac, lost) = shared.sample(now_faults);
        hold(&mut faults, dir, chunk.read_at, head_since, frac, lost).await?;
        dst.write_all(&chunk.data).await?;
        shared
            .counters
            .bytes_forwarded
            .fetch_add(chunk.data.len() as u64, Relaxed);
    }
    dst.shutdown().await
}

/// Waits until a chunk read at `read_at`, at the head of its queue since `head_since`,
/// may be written under the faults of `dir`, re-evaluating whenever they change.
async fn hold(
    faults: &mut watch::Receiver<Faults>,
    dir: Dir,
    read_at: Instant,
    head_since: Instant,
    frac: f64,
    lost: bool,
) -> io::Result<()> {
    loop {
        let f = faults.borrow_and_update().of(dir);
        if f.blocked {
            faults.changed().await.map_err(|_| proxy_gone())?;
            continue;
        }
        let mut due = head_since.max(read_at + f.delay + f.jitter.mul_f64(frac));
        if lost && f.loss > 0.0 {
            due += RETRANSMIT_DELAY;
        }
        if due <= Instant::now() {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep_until(due) => return Ok(()),
            r = faults.changed() => r.map_err(|_| proxy_gone())?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{bail, ensure, Context, Result};
    use std::future::Future;

    const TEST_BOUND: Duration = Duration::from_secs(20);
    const QUIET: Duration = Duration::from_millis(300);
    const PROMPT: Duration = Duration::from_secs(5);

    async fn bounded<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(TEST_BOUND, f)
            .await
            .context("test timed out")?
    }

    /// A server that echoes every connection.
    async fn echo_server() -> Result<SocketAddr> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Ok(addr)
    }

    /// A server that hands its accepted connections to the test.
    async fn sink_server() -> Result<(SocketAddr, mpsc::UnboundedReceiver<TcpStream>)> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                if tx.send(s).is_err() {
                    break;
                }
            }
        });
        Ok((addr, rx))
    }

    /// A link 0→1 in front of a sink; returns (net, client side, server side).
    async fn sink_pair() -> Result<(Net, TcpStream, TcpStream)> {
        let (addr, mut accepted) = sink_server().await?;
        let net = Net::with_seed(7);
        let via = net.add_link(0, 1, addr).await?;
        let client = TcpStream::connect(via).await?;
        let server = accepted.recv().await.context("no connection")?;
        Ok((net, client, server))
    }

    async fn read_n(s: &mut TcpStream, n: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0; n];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    }

    async fn assert_quiet(s: &mut TcpStream) -> Result<()> {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(QUIET, s.read(&mut buf)).await {
            Err(_) => Ok(()),
            Ok(r) => bail!("expected a stall, read {r:?}"),
        }
    }

    async fn assert_closed(s: &mut TcpStream) -> Result<()> {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(PROMPT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
            Ok(Ok(n)) => bail!("read {n} bytes from a closed connection"),
            Err(_) => bail!("connection not closed"),
        }
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Result<()> {
        s.write_all(msg).await?;
        ensure!(read_n(s, msg.len()).await? == msg, "echo differs");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwards_one_mib_intact() -> Result<()> {
        bounded(async {
            let net = Net::with_seed(1);
            let via = net.add_link(0, 1, echo_server().await?).await?;
            let (mut r, mut w) = TcpStream::connect(via).await?.into_split();
            let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
            let mut got = Vec::new();
            let (sent, read) = tokio::join!(
                async {
                    w.write_all(&data).await?;
                    w.shutdown().await
                },
                r.read_to_end(&mut got)
            );
            sent?;
            read?;
            ensure!(got == data, "echo differs ({} bytes back)", got.len());
            let s = net.stats();
            ensure!(s.accepted == 1 && s.links == 1, "{s:?}");
            ensure!(s.bytes_forwarded >= 2 << 20, "{s:?}");
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_forward_holds_bytes_until_heal() -> Result<()> {
        bounded(async {
            let (net, mut client, mut server) = sink_pair().await?;
            client.write_all(b"a").await?;
            ensure!(read_n(&mut server, 1).await? == b"a");
            net.block(0, 1);
            let mut expected = Vec::new();
            for i in 0..10 {
                let m = format!("m{i};");
                client.write_all(m.as_bytes()).await?;
                expected.extend_from_slice(m.as_bytes());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_quiet(&mut server).await?;
            // Traffic 1→0 (the reverse direction of this link) still flows.
            server.write_all(b"pong").await?;
            ensure!(read_n(&mut client, 4).await? == b"pong");
            ensure!(net.describe() == "blocked 0→1", "{}", net.describe());
            net.heal_all();
            ensure!(read_n(&mut server, expected.len()).await? == expected);
            ensure!(net.describe() == "no faults");
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_of_reverse_pair_stalls_reverse_pump() -> Result<()> {
        bounded(async {
            let (net, mut client, mut server) = sink_pair().await?;
            net.block(1, 0);
            client.write_all(b"ping").await?;
            ensure!(read_n(&mut server, 4).await? == b"ping");
            server.write_all(b"pong").await?;
            assert_quiet(&mut client).await?;
            net.unblock(1, 0);
            ensure!(read_n(&mut client, 4).await? == b"pong");
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_connection_while_blocked_stalls_then_works() -> Result<()> {
        bounded(async {
            let net = Net::with_seed(3);
            let via = net.add_link(0, 1, echo_server().await?).await?;
            net.block_all(&[(0, 1), (1, 0)]);
            ensure!(net.describe() == "blocked {0} x {1}", "{}", net.describe());
            let mut c = TcpStream::connect(via).await?;
            c.write_all(b"hello").await?;
            assert_quiet(&mut c).await?;
            net.block_all(&[]);
            ensure!(read_n(&mut c, 5).await? == b"hello");
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delay_is_a_lower_bound_on_latency() -> Result<()> {
        bounded(async {
            let net = Net::with_seed(4);
            let via = net.add_link(0, 1, echo_server().await?).await?;
            let mut c = TcpStream::connect(via).await?;
            roundtrip(&mut c, b"warm").await?;
            net.set_delay(0, 1, Duration::from_millis(100), Duration::ZERO);
            let t0 = Instant::now();
            roundtrip(&mut c, b"x").await?;
            ensure!(
                t0.elapsed() >= Duration::from_millis(100),
                "{:?}",
                t0.elapsed()
            );
            net.set_delay(1, 0, Duration::from_millis(50), Duration::from_millis(20));
            ensure!(net.describe() == "delay 0→1 100ms 1→0 50ms±20ms");
            let t0 = Instant::now();
            roundtrip(&mut c, b"y").await?;
            ensure!(
                t0.elapsed() >= Duration::from_millis(150),
                "{:?}",
                t0.elapsed()
            );
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delay_is_pipelined_and_keeps_order() -> Result<()> {
        bounded(async {
            let (net, client, mut server) = sink_pair().await?;
            let delay = Duration::from_millis(50);
            net.set_delay(0, 1, delay, Duration::from_millis(30));
            let (_r, mut w) = client.into_split();
            let t0 = Instant::now();
            let writer = tokio::spawn(async move {
                for i in 0..200u32 {
                    w.write_all(&i.to_be_bytes()).await?;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                io::Result::Ok(w)
            });
            let got = read_n(&mut server, 800).await?;
            let took = t0.elapsed();
            let _w = writer.await??;
            let want: Vec<u8> = (0..200u32).flat_map(u32::to_be_bytes).collect();
            ensure!(got == want, "order or content differs");
            ensure!(took >= delay, "{took:?}");
            ensure!(took < delay * 100, "not pipelined: {took:?}");
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loss_one_holds_every_chunk_and_zero_does_not() -> Result<()> {
        bounded(async {
            let (net, mut client, mut server) = sink_pair().await?;
            net.set_loss(0, 1, 1.0);
            ensure!(net.describe() == "loss 0→1 100%", "{}", net.describe());
            for msg in [b"a", b"b"] {
                let t0 = Instant::now();
                client.write_all(msg).await?;
                ensure!(read_n(&mut server, 1).await? == msg);
                ensure!(t0.elapsed() >= RETRANSMIT_DELAY, "{:?}", t0.elapsed());
            }
            net.set_loss(0, 1, 0.0);
            ensure!(net.describe() == "no faults");
            client.write_all(b"c").await?;
            ensure!(read_n(&mut server, 1).await? == b"c");
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reset_closes_open_connections_of_the_node() -> Result<()> {
        bounded(async {
            let net = Net::with_seed(5);
            let via = net.add_link(0, 1, echo_server().await?).await?;
            let mut c = TcpStream::connect(via).await?;
            roundtrip(&mut c, b"one").await?;
            net.reset(2); // not on this link
            roundtrip(&mut c, b"two").await?;
            ensure!(net.stats().open == 1, "{:?}", net.stats());
            net.reset(1);
            assert_closed(&mut c).await?;
            let mut c2 = TcpStream::connect(via).await?;
            roundtrip(&mut c2, b"three").await?;
            net.reset_all();
            assert_closed(&mut c2).await?;
            let s = net.stats();
            ensure!(s.reset_connections == 2 && s.accepted == 2, "{s:?}");
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn eof_is_propagated_as_half_close() -> Result<()> {
        bounded(async {
            let (_net, mut client, mut server) = sink_pair().await?;
            client.write_all(b"last").await?;
            client.shutdown().await?;
            let mut got = Vec::new();
            server.read_to_end(&mut got).await?;
            ensure!(got == b"last");
            server.write_all(b"bye").await?;
            drop(server);
            let mut back = Vec::new();
            client.read_to_end(&mut back).await?;
            ensure!(back == b"bye");
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_target_closes_accepted_connection() -> Result<()> {
        bounded(async {
            let dead = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
            let net = Net::with_seed(6);
            let via = net.add_link(2, 1, dead).await?;
            let mut c = TcpStream::connect(via).await?;
            assert_closed(&mut c).await?;
            ensure!(net.stats().connect_failures == 1, "{:?}", net.stats());
            net.retarget(1, echo_server().await?);
            let mut c = TcpStream::connect(via).await?;
            roundtrip(&mut c, b"alive").await?;
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_net_closes_listeners_and_connections() -> Result<()> {
        bounded(async {
            let net = Net::with_seed(8);
            let via = net.add_link(0, 1, echo_server().await?).await?;
            let mut c = TcpStream::connect(via).await?;
            roundtrip(&mut c, b"hi").await?;
            let clone = net.clone();
            let weak = Arc::downgrade(net.shared());
            drop(net);
            roundtrip(&mut c, b"still").await?; // a clone keeps it alive
            drop(clone);
            assert_closed(&mut c).await?;
            let deadline = Instant::now() + PROMPT;
            loop {
                match TcpStream::connect(via).await {
                    Err(_) => break,
                    Ok(mut s) => assert_closed(&mut s).await?,
                }
                ensure!(Instant::now() < deadline, "listener still accepting");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Every task (listener, connection) has ended and released the state.
            while weak.upgrade().is_some() {
                ensure!(Instant::now() < deadline, "proxy tasks still alive");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn add_link_rejects_bad_links() -> Result<()> {
        bounded(async {
            let net = Net::new();
            let target = echo_server().await?;
            net.add_link(0, 1, target).await?;
            let dup = net.add_link(0, 1, target).await;
            ensure!(matches!(dup, Err(e) if e.kind() == io::ErrorKind::AlreadyExists));
            let selfie = net.add_link(2, 2, target).await;
            ensure!(matches!(selfie, Err(e) if e.kind() == io::ErrorKind::InvalidInput));
            net.shutdown();
            ensure!(net.add_link(1, 0, target).await.is_err());
            Ok(())
        })
        .await
    }

    #[test]
    fn fault_bookkeeping_and_describe() {
        let net = Net::with_seed(9);
        assert_eq!(net.describe(), "no faults");
        net.block_all(&[(0, 1), (1, 0), (0, 2), (2, 0)]);
        net.block_all(&[(2, 3)]);
        assert_eq!(net.blocked(), vec![(2, 3)]);
        net.block(1, 2);
        net.set_loss(2, 3, 0.1);
        net.set_loss(1, 3, 7.0);
        assert_eq!(net.describe(), "blocked 1→2 2→3; loss 1→3 100% 2→3 10%");
        net.heal_all();
        assert_eq!(net.describe(), "no faults");
        assert_eq!(net.stats(), NetStats::default());
    }
}
