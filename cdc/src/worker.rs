//! The worker: lease, start-up checks, streaming session, reconnects.
//!
//! ```text
//! run ─► wait for the lease (standby) ─► session ─► on error: back off, new session
//!                                          │        on lease lost / fenced: standby
//!          prepare: publication, slot (lost or new ⇒ reset key spaces), identity checks
//!          stream ─► decode (pgoutput) ─► map rows to keys ─► apply (rounds) ─► ack
//! ```
//!
//! Nothing lives only in the worker's memory: the slot's confirmed flush position is
//! the checkpoint, and it only moves past a transaction once the cache committed all of
//! its keys. A crash replays from there; replays are idempotent in the cache.

use crate::apply::{self, ApplyError, TxWork, Work};
use crate::config::{Config, TableMapping};
use crate::lease::Lease;
use crate::mapping::{Cell, KeyChange, Row};
use crate::metrics as m;
use crate::pgoutput::{self, Message, OldKind, Relation, Tuple, TupleValue};
use crate::walsender::{quote_ident, ConnectConfig, ReplicationConnection, ReplicationMessage};
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use raftcache_client::{Client, ClientConfig, Lsn};
use raftcache_proto::pg_snapshot::widen_xid;
use raftcache_proto::v1;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// The cache key that records that the key spaces were reset for the current slot.
fn slot_marker_key(slot: &str) -> String {
    format!("__raftcache:cdc:slot:{slot}")
}

/// Prints one JSON line on stdout for scripts and tests:
/// `{"event":"standby"|"streaming","worker":…,"slot":…,"from":"0/16B3748"}`.
fn event(kind: &str, worker: &str, slot: &str, from: Option<Lsn>) {
    let mut line = serde_json::json!({ "event": kind, "worker": worker, "slot": slot });
    if let Some(from) = from {
        line["from"] = serde_json::Value::String(from.to_string());
    }
    println!("{line}");
}

/// The worker.
pub struct Worker {
    config: Config,
    maps: Vec<TableMapping>,
    client: Client,
    id: String,
}

/// How a session ended.
enum SessionEnd {
    /// Lost the lease or was fenced: go back to standby.
    Deposed,
    /// Shutdown requested.
    Shutdown,
}

impl Worker {
    /// Connects to the cache.
    ///
    /// # Errors
    /// An invalid configuration or no reachable cache node.
    pub async fn new(config: Config) -> anyhow::Result<Worker> {
        let maps = config.mappings()?;
        let client = Client::connect(ClientConfig::new(config.cache.endpoints.clone()))
            .await
            .context("connecting to the cache")?;
        let id = config.worker.id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "worker".to_owned());
            format!("{host}-{}", std::process::id())
        });
        Ok(Worker {
            config,
            maps,
            client,
            id,
        })
    }

    /// Runs until `shutdown` is cancelled: standby until the lease is free, then stream;
    /// reconnect after errors with bounded back-off.
    ///
    /// # Errors
    /// Only for errors that retrying cannot fix (a mapping that names a missing table,
    /// a slot that must not be created, ...).
    pub async fn run(&self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let slot = &self.config.postgres.slot;
        let ttl = self.config.worker.lease_ttl;
        let mut announced_standby = false;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let lease = match Lease::try_acquire(&self.client, slot, &self.id, ttl).await {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    if !announced_standby {
                        info!(worker = %self.id, slot, "standby: another worker holds the lease");
                        event("standby", &self.id, slot, None);
                        announced_standby = true;
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(ttl / 4) => continue,
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot reach the cache for the lease; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            announced_standby = false;
            info!(worker = %self.id, token = lease.token, slot, "took the CDC lease");
            m::active(true);
            let end = self.hold(&lease, &shutdown).await;
            m::active(false);
            match end {
                Ok(SessionEnd::Shutdown) => {
                    lease.release().await;
                    return Ok(());
                }
                Ok(SessionEnd::Deposed) => {
                    warn!(worker = %self.id, "stepped down; back to standby");
                }
                Err(e) => {
                    lease.release().await;
                    return Err(e);
                }
            }
        }
    }

    /// Streams sessions while the lease is held.
    async fn hold(
        &self,
        lease: &Lease,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<SessionEnd> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
                () = lease.lost.cancelled() => return Ok(SessionEnd::Deposed),
                r = self.session(lease.token) => r,
            };
            match outcome {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(SessionError::Fatal(e)) => return Err(e),
                Err(SessionError::Fenced(t)) => {
                    warn!(
                        token = lease.token,
                        partition_token = t,
                        "fenced by a newer worker"
                    );
                    return Ok(SessionEnd::Deposed);
                }
                Err(SessionError::Retry(e)) => {
                    m::reconnect();
                    warn!(
                        error = format!("{e:#}"),
                        ?backoff,
                        "streaming session ended; reconnecting"
                    );
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
                () = lease.lost.cancelled() => return Ok(SessionEnd::Deposed),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One streaming session: prepare, stream, apply, acknowledge.
    async fn session(&self, fence: u64) -> Result<(), SessionError> {
        let pg = &self.config.postgres;
        let prepared = self.prepare(fence).await?;
        // The server's WAL position, polled for the lag metric on prepare's connection.
        let (wal_tx, mut wal_rx) = watch::channel(prepared.start);
        let _wal_poller = AbortOnDrop(Some(tokio::spawn(poll_wal_lsn(
            prepared.sql,
            pg.url.clone(),
            wal_tx,
        ))));
        let connect =
            ConnectConfig::from_url(&pg.url).map_err(|e| SessionError::Fatal(e.into()))?;
        let conn = ReplicationConnection::connect(&connect)
            .await
            .map_err(|e| SessionError::Retry(anyhow!(e).context("replication connection")))?;
        let mut stream = conn
            .start_replication(&pg.slot, Lsn::ZERO, std::slice::from_ref(&pg.publication))
            .await
            .map_err(|e| SessionError::Retry(anyhow!(e).context("START_REPLICATION")))?;
        info!(slot = %pg.slot, from = %prepared.start, "streaming");
        event("streaming", &self.id, &pg.slot, Some(prepared.start));

        let (work_tx, work_rx) = mpsc::channel::<Work>(1024);
        let (acked_tx, mut acked_rx) = watch::channel(prepared.start);
        let applier = tokio::spawn(apply::run(
            self.client.clone(),
            fence,
            self.config.worker.batch_max_changes,
            work_rx,
            acked_tx,
        ));
        let mut applier = AbortOnDrop(Some(applier));
        let mut decoder = Decoder::new(
            &self.maps,
            self.config.worker.tx_max_buffered,
            prepared.next_xid,
        );
        let mut status = tokio::time::interval(pg.status_interval);
        let mut acked = prepared.start;
        let mut last_position = prepared.start;
        // The server's WAL position: polled (`pg_current_wal_lsn()`, which counts WAL the
        // walsender has not decoded yet), or the stream's if that is further.
        let mut server_end = prepared.start;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let msg = msg.map_err(|e| SessionError::Retry(anyhow!(e).context("replication stream")))?;
                    let Some(msg) = msg else {
                        return Err(SessionError::Retry(anyhow!("the server ended the replication stream")));
                    };
                    match msg {
                        ReplicationMessage::XLogData { wal_end, data, .. } => {
                            server_end = server_end.max(wal_end);
                            let message = pgoutput::decode(&data)
                                .map_err(|e| SessionError::Retry(anyhow!(e).context("decoding pgoutput")))?;
                            for w in decoder.feed(message).map_err(SessionError::Retry)? {
                                send(&work_tx, w).await?;
                            }
                        }
                        ReplicationMessage::Keepalive { wal_end, reply_requested, .. } => {
                            server_end = server_end.max(wal_end);
                            if !decoder.in_transaction() && wal_end > last_position {
                                last_position = wal_end;
                                send(&work_tx, Work::Position(wal_end)).await?;
                            }
                            if reply_requested {
                                send_status(&mut stream, acked).await?;
                            }
                        }
                    }
                    m::lag_bytes(server_end, acked);
                }
                changed = acked_rx.changed() => {
                    if changed.is_err() {
                        // The applier stopped: find out why.
                        return Err(applier.join().await);
                    }
                    let now = *acked_rx.borrow_and_update();
                    if now > acked {
                        acked = now;
                        send_status(&mut stream, acked).await?;
                        m::lag_bytes(server_end, acked);
                    }
                }
                Ok(()) = wal_rx.changed() => {
                    server_end = server_end.max(*wal_rx.borrow_and_update());
                    m::lag_bytes(server_end, acked);
                }
                _ = status.tick() => send_status(&mut stream, acked).await?,
            }
        }
    }

    /// Start-up checks and set-up before streaming: tables and replica identities,
    /// publication, slot; resets the mapped key spaces when the slot is new or lost.
    async fn prepare(&self, fence: u64) -> Result<Prepared, SessionError> {
        let pg = &self.config.postgres;
        let (sql, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
            .await
            .map_err(|e| SessionError::Retry(anyhow!(e).context("connecting to Postgres")))?;
        let sql_task = spawn_connection(connection);
        let retry = |e: tokio_postgres::Error| SessionError::Retry(anyhow!(e));

        // Tables, columns and replica identities.
        for map in &self.maps {
            let row = sql
                .query_opt(
                    "SELECT c.oid, c.relreplident::text FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                    &[&map.schema, &map.table],
                )
                .await
                .map_err(retry)?;
            let Some(row) = row else {
                return Err(SessionError::Fatal(anyhow!(
                    "mapped table {}.{} does not exist in Postgres",
                    map.schema,
                    map.table
                )));
            };
            let oid: u32 = row.get(0);
            let ident: String = row.get(1);
            let columns: Vec<String> = sql
                .query(
                    "SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 \
                     AND NOT attisdropped",
                    &[&oid],
                )
                .await
                .map_err(retry)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for t in &map.keys {
                for c in t.columns() {
                    if !columns.iter().any(|x| x == c) {
                        return Err(SessionError::Fatal(anyhow!(
                            "key template {:?} of {}.{} names column {c:?}, which the table does not have",
                            t.source(),
                            map.schema,
                            map.table
                        )));
                    }
                }
            }
            let identity: Option<Vec<String>> = match ident.as_str() {
                "f" => None,
                "n" => Some(Vec::new()),
                kind => Some(
                    sql.query(
                        "SELECT a.attname::text FROM pg_index i \
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                         WHERE i.indrelid = $1 AND (CASE WHEN $2 = 'i' THEN i.indisreplident ELSE i.indisprimary END)",
                        &[&oid, &kind],
                    )
                    .await
                    .map_err(retry)?
                    .iter()
                    .map(|r| r.get(0))
                    .collect(),
                ),
            };
            let outside = map.columns_outside(identity.as_deref());
            if !outside.is_empty() {
                warn!(
                    table = format!("{}.{}", map.schema, map.table),
                    columns = ?outside,
                    "key columns are not in the table's replica identity: an UPDATE that changes \
                     them cannot invalidate the old key, and a DELETE invalidates the whole key \
                     space of those templates. Run ALTER TABLE … REPLICA IDENTITY FULL"
                );
            }
        }

        // Publication.
        let exists = sql
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&pg.publication],
            )
            .await
            .map_err(retry)?
            .is_some();
        let fatal = |e: crate::walsender::Error| SessionError::Fatal(e.into());
        let publication = quote_ident(&pg.publication).map_err(fatal)?;
        if !exists {
            if !pg.create_publication {
                return Err(SessionError::Fatal(anyhow!(
                    "publication {:?} does not exist and create-publication is false",
                    pg.publication
                )));
            }
            let tables = self
                .maps
                .iter()
                .map(TableMapping::sql_name)
                .collect::<Result<Vec<_>, _>>()
                .map_err(fatal)?;
            let stmt = format!(
                "CREATE PUBLICATION {publication} FOR TABLE {}",
                tables.join(", ")
            );
            if let Err(e) = sql.batch_execute(&stmt).await {
                // Another worker may have created it at the same moment.
                if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) {
                    return Err(SessionError::Retry(
                        anyhow!(e).context("creating the publication"),
                    ));
                }
            } else {
                info!(publication = %pg.publication, "created the publication");
            }
        } else {
            let published: Vec<(String, String)> = sql
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                    &[&pg.publication],
                )
                .await
                .map_err(retry)?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            for map in &self.maps {
                if published
                    .iter()
                    .any(|(s, t)| *s == map.schema && *t == map.table)
                {
                    continue;
                }
                if !pg.create_publication {
                    return Err(SessionError::Fatal(anyhow!(
                        "publication {:?} does not include {}.{} and create-publication is false",
                        pg.publication,
                        map.schema,
                        map.table
                    )));
                }
                let table = map.sql_name().map_err(fatal)?;
                let stmt = format!("ALTER PUBLICATION {publication} ADD TABLE {table}");
                sql.batch_execute(&stmt).await.map_err(retry)?;
                info!(table, "added the table to the publication");
            }
        }

        // Slot.
        let slot = sql
            .query_opt(
                "SELECT COALESCE(wal_status, ''), plugin::text, \
                 COALESCE(confirmed_flush_lsn::text, '0/0') \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&pg.slot],
            )
            .await
            .map_err(retry)?;
        let marker = slot_marker_key(&pg.slot);
        let (start, reset) = match slot {
            Some(row) => {
                let wal_status: String = row.get(0);
                let plugin: String = row.get(1);
                let confirmed: String = row.get(2);
                if plugin != "pgoutput" {
                    return Err(SessionError::Fatal(anyhow!(
                        "slot {:?} uses plugin {plugin:?}; raftcache-cdc needs pgoutput",
                        pg.slot
                    )));
                }
                if wal_status == "lost" {
                    error!(
                        slot = %pg.slot,
                        "REPLICATION SLOT LOST: Postgres removed WAL the slot still needed \
                         (max_slot_wal_keep_size). Changes were missed; the slot is recreated \
                         and every mapped key space is invalidated before serving again"
                    );
                    if !pg.create_slot {
                        return Err(SessionError::Fatal(anyhow!(
                            "slot {:?} is lost and create-slot is false: drop and recreate it",
                            pg.slot
                        )));
                    }
                    sql.execute("SELECT pg_drop_replication_slot($1)", &[&pg.slot])
                        .await
                        .map_err(retry)?;
                    (self.create_slot(&marker).await?, true)
                } else {
                    let confirmed: Lsn = confirmed
                        .parse()
                        .map_err(|e| SessionError::Retry(anyhow!("{e}")))?;
                    // A slot created by a worker that died before it finished resetting
                    // the key spaces has no "ready" marker: reset now.
                    let ready = self
                        .client
                        .get(&marker)
                        .await
                        .map_err(|e| SessionError::Retry(e.into()))?
                        .is_some_and(|v| v.value.as_ref() == b"ready");
                    (confirmed, !ready)
                }
            }
            None => {
                if !pg.create_slot {
                    return Err(SessionError::Fatal(anyhow!(
                        "replication slot {:?} does not exist and create-slot is false",
                        pg.slot
                    )));
                }
                (self.create_slot(&marker).await?, true)
            }
        };
        // The server's next xid, read after the slot exists: the reference that widens
        // the stream's 32-bit xids, and the bound a fill's snapshot must reach after a
        // reset (every transaction below it has ended, or commits after the slot's start
        // and is decoded by it).
        let next_xid = next_xid(&sql).await?;
        if reset {
            self.reset_key_spaces(fence, start, next_xid).await?;
            self.client
                .set(&marker, "ready")
                .await
                .map_err(|e| SessionError::Retry(e.into()))?;
        }
        Ok(Prepared {
            start,
            next_xid,
            sql: SqlConnection {
                client: sql,
                _task: sql_task,
            },
        })
    }

    /// Creates the slot; the "ready" marker is removed first so that a crash before the
    /// reset completes is noticed by the next session.
    async fn create_slot(&self, marker: &str) -> Result<Lsn, SessionError> {
        let pg = &self.config.postgres;
        self.client
            .delete(marker)
            .await
            .map_err(|e| SessionError::Retry(e.into()))?;
        let connect =
            ConnectConfig::from_url(&pg.url).map_err(|e| SessionError::Fatal(e.into()))?;
        let mut conn = ReplicationConnection::connect(&connect)
            .await
            .map_err(|e| SessionError::Retry(anyhow!(e).context("replication connection")))?;
        let point = conn
            .create_logical_slot(&pg.slot, "pgoutput")
            .await
            .map_err(|e| {
                SessionError::Retry(anyhow!(e).context("creating the replication slot"))
            })?;
        info!(slot = %pg.slot, consistent_point = %point, "created the replication slot");
        Ok(point)
    }

    /// Invalidates every mapped key space at `lsn` on every partition (a new or lost
    /// slot: changes before it may have been missed) and sets the watermark there. The
    /// changes stand for unknown transactions (no xid): a fill under these prefixes needs
    /// a snapshot whose xmin is at least `min_xmin`, the server's next xid read after the
    /// slot was created (taken after every transaction below it ended).
    async fn reset_key_spaces(
        &self,
        fence: u64,
        lsn: Lsn,
        min_xmin: u64,
    ) -> Result<(), SessionError> {
        warn!(at = %lsn, "invalidating every mapped key space (new or recreated slot)");
        let mut changes: Vec<v1::Change> = Vec::new();
        for map in &self.maps {
            for change in map.on_truncate() {
                if let KeyChange::InvalidatePrefix(prefix) = change {
                    changes.push(v1::Change {
                        kind: v1::ChangeKind::InvalidatePrefix as i32,
                        key: prefix,
                        value: Bytes::new(),
                        ttl_ms: 0,
                    });
                }
            }
        }
        let map = self
            .client
            .cluster_map()
            .await
            .map_err(|e| SessionError::Retry(e.into()))?;
        for p in 0..map.partition_count {
            let request = v1::ApplyChangesRequest {
                route: None,
                lsn: lsn.0,
                watermark: lsn.0,
                fence,
                changes: changes.clone(),
                xid: 0,
                min_xmin,
            };
            match self.client.apply_changes(p, request).await {
                Ok(_) => {}
                Err(raftcache_client::ClientError::Fenced { current }) => {
                    return Err(SessionError::Fenced(current))
                }
                Err(e) => return Err(SessionError::Retry(e.into())),
            }
        }
        Ok(())
    }
}

/// What [`Worker::prepare`] found.
struct Prepared {
    /// Where streaming resumes (the slot's confirmed flush position).
    start: Lsn,
    /// The server's next full (64-bit) xid, read after the slot was made ready.
    next_xid: u64,
    /// The SQL connection prepare used; the session keeps it to poll the WAL position.
    sql: SqlConnection,
}

/// A plain SQL connection and the task that drives it (aborted with it).
struct SqlConnection {
    client: tokio_postgres::Client,
    _task: AbortOnDrop<()>,
}

/// Drives a SQL connection in a task, aborted when the guard is dropped.
fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>) -> AbortOnDrop<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    AbortOnDrop(Some(tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "SQL connection ended");
        }
    })))
}

/// The server's next full transaction id (the `xmax` of a snapshot taken now), without
/// assigning one (`pg_current_xact_id()` would).
async fn next_xid(sql: &tokio_postgres::Client) -> Result<u64, SessionError> {
    let row = sql
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await
        .map_err(|e| SessionError::Retry(anyhow!(e).context("reading the next xid")))?;
    let xmax: i64 = row
        .try_get(0)
        .map_err(|e| SessionError::Retry(anyhow!(e).context("reading the next xid")))?;
    u64::try_from(xmax)
        .ok()
        .filter(|x| *x > 0)
        .ok_or_else(|| SessionError::Retry(anyhow!("the server's next xid is {xmax}")))
}

/// How often the lag metric's WAL position is polled.
const WAL_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Polls `pg_current_wal_lsn()` every [`WAL_POLL_INTERVAL`] into `out` until aborted
/// (with its session) or the session stops listening. Errors are logged at debug and the
/// last value kept; a closed connection is reopened (from `url`) at the next poll.
async fn poll_wal_lsn(sql: SqlConnection, url: String, out: watch::Sender<Lsn>) {
    let mut sql = Some(sql);
    let mut tick = tokio::time::interval(WAL_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if out.is_closed() {
            return;
        }
        if sql.as_ref().is_none_or(|c| c.client.is_closed()) {
            sql = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((client, connection)) => Some(SqlConnection {
                    client,
                    _task: spawn_connection(connection),
                }),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot connect to poll pg_current_wal_lsn()");
                    None
                }
            };
        }
        let Some(c) = &sql else { continue };
        match current_wal_lsn(&c.client).await {
            Ok(lsn) => {
                out.send_if_modified(|last| {
                    let newer = lsn > *last;
                    if newer {
                        *last = lsn;
                    }
                    newer
                });
            }
            Err(e) => tracing::debug!(error = format!("{e:#}"), "polling pg_current_wal_lsn()"),
        }
    }
}

async fn current_wal_lsn(sql: &tokio_postgres::Client) -> anyhow::Result<Lsn> {
    let row = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?;
    let text: String = row.try_get(0)?;
    Ok(text.parse()?)
}

/// Why a session ended.
enum SessionError {
    /// Reconnect after a pause.
    Retry(anyhow::Error),
    /// A newer worker holds the lease.
    Fenced(u64),
    /// Stop the worker: retrying cannot help.
    Fatal(anyhow::Error),
}

impl From<ApplyError> for SessionError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Fenced(t) => SessionError::Fenced(t),
            ApplyError::Refused(e) => SessionError::Retry(anyhow!(e).context("applying changes")),
        }
    }
}

async fn send(tx: &mpsc::Sender<Work>, w: Work) -> Result<(), SessionError> {
    tx.send(w)
        .await
        .map_err(|_| SessionError::Retry(anyhow!("the applier stopped")))
}

async fn send_status(
    stream: &mut crate::walsender::ReplicationStream,
    acked: Lsn,
) -> Result<(), SessionError> {
    stream
        .send_status(acked, acked, acked, false)
        .await
        .map_err(|e| SessionError::Retry(anyhow!(e).context("sending the standby status")))
}

/// Aborts a task when dropped (a session's helpers never outlive it).
struct AbortOnDrop<T>(Option<tokio::task::JoinHandle<T>>);

impl AbortOnDrop<Result<(), ApplyError>> {
    /// Waits for the applier and turns its end into a session error.
    async fn join(&mut self) -> SessionError {
        match self.0.take() {
            Some(handle) => match handle.await {
                Ok(Ok(())) => SessionError::Retry(anyhow!("the applier stopped")),
                Ok(Err(e)) => e.into(),
                Err(e) => SessionError::Retry(anyhow!(e).context("the applier panicked")),
            },
            None => SessionError::Retry(anyhow!("the applier stopped")),
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// A mapped relation as the stream described it.
struct RelationInfo {
    /// Which mapping (None: the table is not mapped).
    map: Option<usize>,
    /// Column names in tuple order.
    columns: Vec<String>,
    /// Which columns are in the replica identity.
    key: Vec<bool>,
}

/// Most distinct keys remembered per transaction for [`Decoder::seen`]; past it, every
/// write of the transaction becomes an invalidation.
const MAX_SEEN_KEYS: usize = 100_000;

/// Turns the pgoutput messages of one session into [`Work`].
///
/// # Versions
/// The changes of a complete transaction carry its COMMIT's `end_lsn` (the position
/// just past the commit record), not `Begin.final_lsn` (where the commit record starts):
/// a reader can take `pg_current_wal_lsn()` once the commit record is written, before
/// the commit is visible, read the old row, and fill it with that LSN, which is above
/// `final_lsn` but not above `end_lsn` unless other WAL followed meanwhile. (That
/// remaining window is why `source_lsn` fills are not exact; snapshot fills, judged by
/// the xid every batch carries, are.)
///
/// A large transaction is sent ahead in pieces before its COMMIT message arrives
/// ([`Decoder::push`]), when `end_lsn` is not known yet. Those pieces carry
/// `final_lsn + 1`:
/// - strictly above every earlier transaction's `end_lsn`: pgoutput (without streaming)
///   sends transactions in commit order, and this commit record, starting at
///   `final_lsn`, cannot start before the previous commit record ended;
/// - strictly below this transaction's `end_lsn` (a commit record is longer than one
///   byte), so a later piece or the last one, at `end_lsn`, still wins per key.
///
/// The acknowledged position is unaffected: it only moves to a COMMIT's `end_lsn`
/// ([`TxWork::end`]) or a keepalive's position.
struct Decoder<'a> {
    maps: &'a [TableMapping],
    relations: HashMap<u32, RelationInfo>,
    /// The open transaction: its buffered changes (its `lsn` is `final_lsn + 1`, the
    /// stamp of pieces sent ahead; the last piece gets `end_lsn` at COMMIT).
    open: Option<TxWork>,
    max_buffered: usize,
    /// The last widened xid (at first, the server's next xid when the session started):
    /// the reference that widens the next BEGIN's 32-bit xid. Xids in the stream stay
    /// within 2^31 of each other, so the nearest 64-bit value is the right one.
    xid_reference: u64,
    /// Keys the open transaction already changed. Changes of one piece share its LSN,
    /// and the cache skips a write whose LSN equals the key's (a replay), so a second
    /// write of one key in one transaction could be dropped and leave the first value
    /// cached: it is sent as an invalidation instead (safe: a miss). Kept across the
    /// pieces of a transaction (pieces sent ahead share `final_lsn + 1`).
    seen: std::collections::HashSet<Bytes>,
    /// The transaction touched more than [`MAX_SEEN_KEYS`] keys: invalidate only.
    invalidate_only: bool,
}

impl<'a> Decoder<'a> {
    /// `xid_reference`: a 64-bit xid near the stream's (the server's next xid when the
    /// session started).
    fn new(maps: &'a [TableMapping], max_buffered: usize, xid_reference: u64) -> Self {
        Decoder {
            maps,
            relations: HashMap::new(),
            open: None,
            max_buffered,
            xid_reference,
            seen: std::collections::HashSet::new(),
            invalidate_only: false,
        }
    }

    fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Feeds one message; returns the work it completes.
    fn feed(&mut self, message: Message) -> anyhow::Result<Vec<Work>> {
        let mut out = Vec::new();
        match message {
            Message::Begin(b) => {
                if self.open.is_some() {
                    bail!("BEGIN inside an open transaction");
                }
                self.seen.clear();
                self.invalidate_only = false;
                let xid = widen_xid(b.xid, self.xid_reference);
                self.xid_reference = xid;
                self.open = Some(TxWork {
                    // Pieces sent ahead of the COMMIT (see the type's doc).
                    lsn: Lsn(b.final_lsn.0.saturating_add(1)),
                    xid,
                    changes: Vec::new(),
                    end: None,
                    rows: 0,
                });
            }
            Message::Commit(c) => {
                let mut tx = self
                    .open
                    .take()
                    .ok_or_else(|| anyhow!("COMMIT without BEGIN"))?;
                if c.end_lsn.0 <= tx.lsn.0 {
                    bail!(
                        "COMMIT ends at {} but the transaction's commit record starts at {}",
                        c.end_lsn,
                        Lsn(tx.lsn.0 - 1)
                    );
                }
                tx.lsn = c.end_lsn;
                tx.end = Some((c.end_lsn, c.commit_ts_us));
                out.push(Work::Tx(tx));
            }
            Message::Relation(r) => self.relation(r),
            Message::Insert(i) => {
                let changes =
                    self.with_map(i.rel, |map, info| map.on_insert(&row(info, &i.new, false)))?;
                self.push(changes, &mut out)?;
            }
            Message::Update(u) => {
                let changes = self.with_map(u.rel, |map, info| {
                    let old = u
                        .old
                        .as_ref()
                        .map(|(kind, t)| row(info, t, *kind == OldKind::Key));
                    map.on_update(old.as_ref(), &row(info, &u.new, false))
                })?;
                self.push(changes, &mut out)?;
            }
            Message::Delete(d) => {
                let changes = self.with_map(d.rel, |map, info| {
                    map.on_delete(&row(info, &d.old.1, d.old.0 == OldKind::Key))
                })?;
                self.push(changes, &mut out)?;
            }
            Message::Truncate(t) => {
                for rel in t.rels {
                    let changes = self.with_map(rel, |map, _| map.on_truncate())?;
                    self.push(changes, &mut out)?;
                }
            }
            Message::Origin(_) | Message::Type(_) | Message::LogicalMessage(_) => {}
        }
        Ok(out)
    }

    fn relation(&mut self, r: Relation) {
        let map = self
            .maps
            .iter()
            .position(|m| m.schema == r.namespace && m.table == r.name);
        self.relations.insert(
            r.id,
            RelationInfo {
                map,
                columns: r.columns.iter().map(|c| c.name.clone()).collect(),
                key: r.columns.iter().map(|c| c.is_key()).collect(),
            },
        );
    }

    /// Runs `f` on the mapping of relation `rel`; `None` for an unmapped table.
    fn with_map(
        &self,
        rel: u32,
        f: impl FnOnce(&TableMapping, &RelationInfo) -> Vec<KeyChange>,
    ) -> anyhow::Result<Option<(Vec<KeyChange>, Option<Duration>)>> {
        let info = self
            .relations
            .get(&rel)
            .ok_or_else(|| anyhow!("change for relation {rel} before its description"))?;
        Ok(info.map.map(|i| {
            let map = &self.maps[i];
            (f(map, info), map.ttl)
        }))
    }

    /// Adds a row's changes to the open transaction; a large transaction is sent ahead
    /// in pieces (its changes are committed data already; only the ack waits for COMMIT).
    fn push(
        &mut self,
        changes: Option<(Vec<KeyChange>, Option<Duration>)>,
        out: &mut Vec<Work>,
    ) -> anyhow::Result<()> {
        let Some((changes, ttl)) = changes else {
            return Ok(());
        };
        let tx = self
            .open
            .as_mut()
            .ok_or_else(|| anyhow!("row change outside a transaction"))?;
        tx.rows += 1;
        for change in changes {
            let change = match change {
                KeyChange::Put(key, value) => {
                    if self.seen.len() >= MAX_SEEN_KEYS {
                        self.invalidate_only = true;
                        self.seen.clear();
                    }
                    if self.invalidate_only || !self.seen.insert(key.clone()) {
                        KeyChange::Invalidate(key)
                    } else {
                        KeyChange::Put(key, value)
                    }
                }
                other => {
                    if !self.invalidate_only && self.seen.len() < MAX_SEEN_KEYS {
                        self.seen.insert(other.key().clone());
                    }
                    other
                }
            };
            tx.changes.push((change, ttl));
        }
        if tx.changes.len() >= self.max_buffered {
            let piece = TxWork {
                lsn: tx.lsn,
                xid: tx.xid,
                changes: std::mem::take(&mut tx.changes),
                end: None,
                rows: std::mem::take(&mut tx.rows),
            };
            out.push(Work::Tx(piece));
        }
        Ok(())
    }
}

/// A tuple as a [`Row`]. In a key-only old tuple (`key_only`), non-identity columns are
/// unknown (the server sends them as NULL).
fn row<'t>(info: &'t RelationInfo, tuple: &'t Tuple, key_only: bool) -> Row<'t> {
    Row::new(info.columns.iter().enumerate().map(|(i, name)| {
        let cell = match tuple.get(i) {
            _ if key_only && !info.key.get(i).copied().unwrap_or(false) => Cell::Unknown,
            Some(TupleValue::Null) => Cell::Null,
            Some(TupleValue::Text(t)) | Some(TupleValue::Binary(t)) => Cell::Text(t),
            Some(TupleValue::UnchangedToast) | None => Cell::Unknown,
        };
        (name.as_str(), cell)
    }))
}

#[cfg(test)]
#[path = "worker/worker_test.rs"]
mod tests;
