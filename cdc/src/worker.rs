//! The worker: start-up checks, lease, streaming session, reconnects.
//!
//! ```text
//! run ─► check Postgres (read-only: wal_level, REPLICATION, tables, publication, slot's
//!    │   database) ─► permanent error: exit 3 with one line │ transient: back off, again
//!    └─► wait for the lease (standby) ─► session ─► on error: classify (pg_errors):
//!                                          │        permanent ⇒ stop; transient ⇒ back
//!                                          │        off, new session
//!                                          │        on lease lost / fenced: standby
//!          prepare: checks again, publication, slot (lost or new ⇒ reset key spaces)
//!          stream ─► decode (pgoutput) ─► map rows to keys ─► apply (rounds) ─► ack
//! ```
//!
//! Nothing lives only in the worker's memory: the slot's confirmed flush position is
//! the checkpoint, and it only moves past a transaction once the cache committed all of
//! its keys. A crash replays from there; replays are idempotent in the cache.
//!
//! Errors that retrying cannot fix (see [`crate::pg_errors`]) end the worker with a
//! [`Misconfigured`] error: one line naming the cause and the fix. Transient ones are
//! retried with back-off (100 ms doubling to 5 s), counted in
//! `raftcache_cdc_retries_total{cause}`, and warned about once per cause until the
//! worker passes its start-up checks, or a session has streamed for 30 s (later
//! retries of that cause are logged at debug).

use crate::apply::{self, ApplyError, TxWork, Work};
use crate::config::{Config, TableMapping};
use crate::lease::Lease;
use crate::mapping::{Cell, KeyChange, Row};
use crate::metrics as m;
use crate::pg_errors::{self, Cause, Misconfigured, SlotInfo, Target, Verdict};
use crate::pgoutput::{self, Message, OldKind, Relation, Tuple, TupleValue};
use crate::walsender::{quote_ident, ConnectConfig, ReplicationConnection, ReplicationMessage};
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use raftcache_client::{Client, ClientConfig, Lsn};
use raftcache_proto::pg_snapshot::widen_xid;
use raftcache_proto::v1;
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// The first pause after a transient error; it doubles up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A session that streamed at least this long worked: the back-off starts over and
/// the causes warned about are forgotten (a session that keeps failing soon after
/// START_REPLICATION is one failure, warned about once).
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// How long connecting to Postgres (SQL or replication) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Server, user and database of `[postgres] url`, for messages.
    target: Target,
    /// Causes of transient errors already warned about since the worker passed its
    /// start-up checks or last streamed for [`STABLE_SESSION`].
    warned: Mutex<HashSet<Cause>>,
    /// Tables whose replica-identity warning was logged (once per process).
    identity_warned: Mutex<HashSet<String>>,
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
    /// An invalid configuration (a [`Misconfigured`] for an invalid `[postgres] url`) or
    /// cache endpoints that are not raftcache gRPC endpoints. A cache that does not answer
    /// yet is not an error: the client keeps asking, and the worker's cache calls fail and
    /// are retried until it does.
    pub async fn new(config: Config) -> anyhow::Result<Worker> {
        let maps = config.mappings()?;
        let target = Target::from_url(&config.postgres.url)?;
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
            target,
            warned: Mutex::new(HashSet::new()),
            identity_warned: Mutex::new(HashSet::new()),
        })
    }

    /// Runs until `shutdown` is cancelled: checks Postgres, then stands by until the
    /// lease is free, then streams; reconnects after transient errors with bounded
    /// back-off.
    ///
    /// # Errors
    /// Only for errors that retrying cannot fix: a [`Misconfigured`] (wal_level, the
    /// password, a role without REPLICATION, a missing database or mapped table, a slot
    /// of another database, ...), or a fatal error of the stream.
    pub async fn run(&self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // Postgres first, before the lease: a misconfigured standby must fail now, not
        // print "standby" and fail when it takes over.
        if !self.check_until_ok(&shutdown).await? {
            return Ok(());
        }
        let slot = &self.config.postgres.slot;
        let ttl = self.config.worker.lease_ttl;
        let mut announced_standby = false;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let attempt = Lease::try_acquire(&self.client, slot, &self.id, ttl).await;
            if attempt.is_ok() {
                self.recovered_from(&[Cause::Cache], "the cache answers again");
            }
            let lease = match attempt {
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
                    let pause = Duration::from_millis(500);
                    self.retrying(Cause::Cache, &anyhow!(e).context("taking the lease"), pause);
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(pause) => continue,
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

    /// The start-up checks, retried while the errors are transient. `Ok(false)`:
    /// shutdown was requested meanwhile.
    async fn check_until_ok(&self, shutdown: &CancellationToken) -> anyhow::Result<bool> {
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return Ok(false),
                r = self.check_postgres() => r,
            };
            match outcome {
                Ok(()) => {
                    self.recovered("Postgres checks passed");
                    return Ok(true);
                }
                Err(SessionError::Fatal(e)) => return Err(e),
                Err(SessionError::Retry(cause, e)) => self.retrying(cause, &e, backoff),
                Err(SessionError::Fenced(t)) => {
                    // Not produced by the checks; harmless to retry.
                    self.retrying(Cause::Cache, &anyhow!("fenced (token {t})"), backoff);
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(false),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Connects to Postgres and runs the read-only checks ([`Worker::validate`]).
    async fn check_postgres(&self) -> Result<(), SessionError> {
        let sql = connect_sql(&self.config.postgres.url, &self.target).await?;
        self.validate(&sql.client).await.map(drop)
    }

    /// Counts a transient error and warns once per cause (until [`Worker::recovered`]).
    fn retrying(&self, cause: Cause, error: &anyhow::Error, backoff: Duration) {
        m::retry(cause);
        let first = self
            .warned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cause);
        let error = pg_errors::one_line(&format!("{error:#}"));
        if first {
            warn!(
                cause = cause.label(),
                %error,
                ?backoff,
                "{}; retrying with back-off (further retries of this cause are logged at debug \
                 and counted in raftcache_cdc_retries_total)",
                cause.advice()
            );
        } else {
            debug!(cause = cause.label(), %error, ?backoff, "retrying");
        }
    }

    /// Forgets every cause warned about (the next occurrence warns again).
    fn recovered(&self, what: &str) {
        self.recovered_from(&Cause::ALL, what);
    }

    /// Forgets the causes in `causes` that were warned about, saying so once.
    fn recovered_from(&self, causes: &[Cause], what: &str) {
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        let mut gone: Vec<Cause> = causes
            .iter()
            .copied()
            .filter(|c| warned.remove(c))
            .collect();
        if !gone.is_empty() {
            gone.sort();
            let causes: Vec<&str> = gone.into_iter().map(Cause::label).collect();
            info!(?causes, "{what} after retries");
        }
    }

    /// Streams sessions while the lease is held.
    async fn hold(
        &self,
        lease: &Lease,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<SessionEnd> {
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let mut streamed = false;
            let started = std::time::Instant::now();
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
                () = lease.lost.cancelled() => return Ok(SessionEnd::Deposed),
                r = self.session(lease.token, &mut streamed) => r,
            };
            if streamed && started.elapsed() >= STABLE_SESSION {
                backoff = INITIAL_BACKOFF;
                self.warned
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clear();
            }
            match outcome {
                Ok(()) => backoff = INITIAL_BACKOFF,
                Err(SessionError::Fatal(e)) => return Err(e),
                Err(SessionError::Fenced(t)) => {
                    warn!(
                        token = lease.token,
                        partition_token = t,
                        "fenced by a newer worker"
                    );
                    return Ok(SessionEnd::Deposed);
                }
                Err(SessionError::Retry(cause, e)) => {
                    m::reconnect();
                    self.retrying(cause, &e.context("streaming session ended"), backoff);
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
                () = lease.lost.cancelled() => return Ok(SessionEnd::Deposed),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// A session error for an error of a SQL connection.
    fn pg_error(&self, e: tokio_postgres::Error, what: &str) -> SessionError {
        sql_error(e, &self.target, what)
    }

    /// A session error for an error of the replication connection.
    fn ws_error(&self, e: crate::walsender::Error, what: &str) -> SessionError {
        match pg_errors::classify_walsender(&e, &self.target) {
            Verdict::Permanent(m) => SessionError::Fatal(m.into()),
            Verdict::Transient(cause) => {
                SessionError::Retry(cause, anyhow!(e).context(what.to_owned()))
            }
        }
    }

    /// Opens the replication connection, within [`CONNECT_TIMEOUT`].
    async fn replication_connection(&self) -> Result<ReplicationConnection, SessionError> {
        let connect = ConnectConfig::from_url(&self.config.postgres.url)
            .map_err(|e| self.ws_error(e, "the replication connection's settings"))?;
        match tokio::time::timeout(CONNECT_TIMEOUT, ReplicationConnection::connect(&connect)).await
        {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(self.ws_error(e, "replication connection")),
            Err(_) => Err(SessionError::Retry(
                Cause::Connect,
                anyhow!(
                    "replication connection to {} timed out after {CONNECT_TIMEOUT:?}",
                    self.target.server
                ),
            )),
        }
    }

    /// One streaming session: prepare, stream, apply, acknowledge. Sets `streamed` once
    /// streaming started.
    async fn session(&self, fence: u64, streamed: &mut bool) -> Result<(), SessionError> {
        let pg = &self.config.postgres;
        let prepared = self.prepare(fence).await?;
        // The server's WAL position, polled for the lag metric on prepare's connection.
        let (wal_tx, mut wal_rx) = watch::channel(prepared.start);
        let _wal_poller = AbortOnDrop(Some(tokio::spawn(poll_wal_lsn(
            prepared.sql,
            pg.url.clone(),
            wal_tx,
        ))));
        let conn = self.replication_connection().await?;
        let mut stream = conn
            .start_replication(&pg.slot, Lsn::ZERO, std::slice::from_ref(&pg.publication))
            .await
            .map_err(|e| self.ws_error(e, "START_REPLICATION"))?;
        info!(slot = %pg.slot, from = %prepared.start, "streaming");
        event("streaming", &self.id, &pg.slot, Some(prepared.start));
        *streamed = true;

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
                    let msg = msg.map_err(|e| self.ws_error(e, "replication stream"))?;
                    let Some(msg) = msg else {
                        return Err(SessionError::Retry(
                            Cause::Io,
                            anyhow!("the server ended the replication stream"),
                        ));
                    };
                    match msg {
                        ReplicationMessage::XLogData { wal_end, data, .. } => {
                            server_end = server_end.max(wal_end);
                            let message = pgoutput::decode(&data).map_err(|e| {
                                SessionError::Retry(Cause::Protocol, anyhow!(e).context("decoding pgoutput"))
                            })?;
                            let work = decoder
                                .feed(message)
                                .map_err(|e| SessionError::Retry(Cause::Protocol, e))?;
                            for w in work {
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
                                self.send_status(&mut stream, acked).await?;
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
                        self.send_status(&mut stream, acked).await?;
                        m::lag_bytes(server_end, acked);
                    }
                }
                Ok(()) = wal_rx.changed() => {
                    server_end = server_end.max(*wal_rx.borrow_and_update());
                    m::lag_bytes(server_end, acked);
                }
                _ = status.tick() => self.send_status(&mut stream, acked).await?,
            }
        }
    }

    async fn send_status(
        &self,
        stream: &mut crate::walsender::ReplicationStream,
        acked: Lsn,
    ) -> Result<(), SessionError> {
        stream
            .send_status(acked, acked, acked, false)
            .await
            .map_err(|e| self.ws_error(e, "sending the standby status"))
    }

    /// The read-only checks, before standby and at the start of every session:
    /// wal_level, the role's REPLICATION attribute, the mapped tables and key columns
    /// (and a warning, once per table, when the replica identity cannot give old key
    /// values), the publication when the worker may not change it, and an existing
    /// slot's type, database and plugin.
    async fn validate(&self, sql: &tokio_postgres::Client) -> Result<Checked, SessionError> {
        let pg = &self.config.postgres;
        let t = &self.target;
        let fatal = |m: Misconfigured| SessionError::Fatal(m.into());

        // Server settings and the role.
        let row = sql
            .query_one(
                "SELECT current_setting('wal_level'), current_database()::text, \
                 COALESCE((SELECT rolreplication OR rolsuper FROM pg_roles \
                 WHERE rolname = current_user), false)",
                &[],
            )
            .await
            .map_err(|e| self.pg_error(e, "reading wal_level and the role"))?;
        let wal_level: String = column(&row, 0)?;
        let database: String = column(&row, 1)?;
        let can_replicate: bool = column(&row, 2)?;
        pg_errors::check_wal_level(&wal_level, t).map_err(fatal)?;
        pg_errors::check_role(can_replicate, t).map_err(fatal)?;

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
                .map_err(|e| self.pg_error(e, "looking up a mapped table"))?;
            let Some(row) = row else {
                return Err(fatal(pg_errors::missing_table(&map.schema, &map.table, t)));
            };
            let oid: u32 = column(&row, 0)?;
            let ident: String = column(&row, 1)?;
            let columns: Vec<String> = texts(
                sql.query(
                    "SELECT attname::text FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 \
                     AND NOT attisdropped",
                    &[&oid],
                )
                .await
                .map_err(|e| self.pg_error(e, "reading a mapped table's columns"))?,
            )?;
            for tpl in &map.keys {
                for c in tpl.columns() {
                    if !columns.iter().any(|x| x == c) {
                        return Err(fatal(Misconfigured(format!(
                            "key template {:?} of {}.{} names column {c:?}, which the table \
                             does not have: fix the template in the config, or add the column",
                            tpl.source(),
                            map.schema,
                            map.table
                        ))));
                    }
                }
            }
            let name = format!("{}.{}", map.schema, map.table);
            if self
                .identity_warned
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&name)
            {
                continue;
            }
            let identity: Option<Vec<String>> = match ident.as_str() {
                "f" => None,
                "n" => Some(Vec::new()),
                kind => Some(texts(
                    sql.query(
                        "SELECT a.attname::text FROM pg_index i \
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                         WHERE i.indrelid = $1 AND (CASE WHEN $2 = 'i' THEN i.indisreplident ELSE i.indisprimary END)",
                        &[&oid, &kind],
                    )
                    .await
                    .map_err(|e| self.pg_error(e, "reading a replica identity"))?,
                )?),
            };
            let outside = map.columns_outside(identity.as_deref());
            if !outside.is_empty() {
                warn!(
                    table = %name,
                    columns = ?outside,
                    "key columns are not in the table's replica identity: an UPDATE that changes \
                     them cannot invalidate the old key, and a DELETE invalidates the whole key \
                     space of those templates. Run ALTER TABLE {name} REPLICA IDENTITY FULL \
                     (warned once per table)"
                );
                self.identity_warned
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(name);
            }
        }

        // Publication: what it holds (None: it does not exist).
        let exists = sql
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&pg.publication],
            )
            .await
            .map_err(|e| self.pg_error(e, "looking up the publication"))?
            .is_some();
        let publication = if exists {
            let rows = sql
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables \
                     WHERE pubname = $1",
                    &[&pg.publication],
                )
                .await
                .map_err(|e| self.pg_error(e, "reading the publication's tables"))?;
            let mut published = Vec::with_capacity(rows.len());
            for r in &rows {
                published.push((column::<String>(r, 0)?, column::<String>(r, 1)?));
            }
            Some(published)
        } else {
            None
        };
        if !pg.create_publication {
            let Some(published) = &publication else {
                return Err(fatal(Misconfigured(format!(
                    "publication \"{}\" does not exist in database \"{database}\" and \
                     create-publication is false: create it (CREATE PUBLICATION … FOR TABLE …, \
                     every mapped table) or set create-publication = true",
                    pg.publication
                ))));
            };
            for map in &self.maps {
                if !published
                    .iter()
                    .any(|(s, tb)| *s == map.schema && *tb == map.table)
                {
                    return Err(fatal(Misconfigured(format!(
                        "publication \"{}\" does not include {}.{} and create-publication is \
                         false: ALTER PUBLICATION … ADD TABLE {}.{}, or set create-publication = true",
                        pg.publication, map.schema, map.table, map.schema, map.table
                    ))));
                }
            }
        }

        // Slot.
        let row = sql
            .query_opt(
                "SELECT COALESCE(slot_type, ''), database::text, plugin::text, \
                 COALESCE(wal_status, ''), COALESCE(confirmed_flush_lsn::text, '0/0') \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&pg.slot],
            )
            .await
            .map_err(|e| self.pg_error(e, "looking up the replication slot"))?;
        let slot = match row {
            Some(row) => {
                let info = SlotInfo {
                    slot_type: column(&row, 0)?,
                    database: column(&row, 1)?,
                    plugin: column(&row, 2)?,
                };
                pg_errors::check_slot(&pg.slot, &info, &database, t).map_err(fatal)?;
                let wal_status: String = column(&row, 3)?;
                if wal_status == "lost" && !pg.create_slot {
                    return Err(fatal(Misconfigured(format!(
                        "replication slot \"{}\" is lost (Postgres removed WAL it needed, see \
                         max_slot_wal_keep_size) and create-slot is false: drop it \
                         (raftcache-cdc drop-slot) and create it again, or set create-slot = true",
                        pg.slot
                    ))));
                }
                Some(SlotRow {
                    wal_status,
                    confirmed: column(&row, 4)?,
                })
            }
            None if !pg.create_slot => {
                return Err(fatal(Misconfigured(format!(
                    "replication slot \"{}\" does not exist and create-slot is false: create it \
                     (SELECT pg_create_logical_replication_slot('{}', 'pgoutput') in database \
                     \"{database}\") or set create-slot = true",
                    pg.slot, pg.slot
                ))));
            }
            None => None,
        };
        Ok(Checked { publication, slot })
    }

    /// Creates the publication, or adds the mapped tables it lacks (only called with
    /// create-publication true; [`Worker::validate`] refused otherwise).
    async fn ensure_publication(
        &self,
        sql: &tokio_postgres::Client,
        published: Option<&[(String, String)]>,
    ) -> Result<(), SessionError> {
        let pg = &self.config.postgres;
        let fatal = |e: crate::walsender::Error| SessionError::Fatal(e.into());
        let publication = quote_ident(&pg.publication).map_err(fatal)?;
        let Some(published) = published else {
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
                    return Err(self.pg_error(e, "creating the publication"));
                }
            } else {
                info!(publication = %pg.publication, "created the publication");
            }
            return Ok(());
        };
        for map in &self.maps {
            if published
                .iter()
                .any(|(s, t)| *s == map.schema && *t == map.table)
            {
                continue;
            }
            let table = map.sql_name().map_err(fatal)?;
            let stmt = format!("ALTER PUBLICATION {publication} ADD TABLE {table}");
            sql.batch_execute(&stmt)
                .await
                .map_err(|e| self.pg_error(e, "adding a table to the publication"))?;
            info!(table, "added the table to the publication");
        }
        Ok(())
    }

    /// Start-up checks and set-up before streaming: the checks of [`Worker::validate`],
    /// publication, slot; resets the mapped key spaces when the slot is new or lost.
    async fn prepare(&self, fence: u64) -> Result<Prepared, SessionError> {
        let pg = &self.config.postgres;
        let sql = connect_sql(&pg.url, &self.target).await?;
        let checked = self.validate(&sql.client).await?;
        if pg.create_publication {
            self.ensure_publication(&sql.client, checked.publication.as_deref())
                .await?;
        }

        let marker = slot_marker_key(&pg.slot);
        let (start, reset) = match checked.slot {
            Some(slot) if slot.wal_status == "lost" => {
                error!(
                    slot = %pg.slot,
                    "REPLICATION SLOT LOST: Postgres removed WAL the slot still needed \
                     (max_slot_wal_keep_size). Changes were missed; the slot is recreated \
                     and every mapped key space is invalidated before serving again"
                );
                sql.client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&pg.slot])
                    .await
                    .map_err(|e| self.pg_error(e, "dropping the lost slot"))?;
                (self.create_slot(&marker).await?, true)
            }
            Some(slot) => {
                let confirmed: Lsn = slot.confirmed.parse().map_err(|e| {
                    SessionError::Retry(
                        Cause::Protocol,
                        anyhow!("the slot's confirmed_flush_lsn {:?}: {e}", slot.confirmed),
                    )
                })?;
                // A slot created by a worker that died before it finished resetting
                // the key spaces has no "ready" marker: reset now.
                let ready = self
                    .client
                    .get(&marker)
                    .await
                    .map_err(|e| SessionError::Retry(Cause::Cache, e.into()))?
                    .is_some_and(|v| v.value.as_ref() == b"ready");
                (confirmed, !ready)
            }
            None => (self.create_slot(&marker).await?, true),
        };
        // The server's next xid, read after the slot exists: the reference that widens
        // the stream's 32-bit xids, and the bound a fill's snapshot must reach after a
        // reset (every transaction below it has ended, or commits after the slot's start
        // and is decoded by it).
        let next_xid = self.next_xid(&sql.client).await?;
        if reset {
            self.reset_key_spaces(fence, start, next_xid).await?;
            self.client
                .set(&marker, "ready")
                .await
                .map_err(|e| SessionError::Retry(Cause::Cache, e.into()))?;
        }
        Ok(Prepared {
            start,
            next_xid,
            sql,
        })
    }

    /// Creates the slot; the "ready" marker is removed first so that a crash before the
    /// reset completes is noticed by the next session.
    async fn create_slot(&self, marker: &str) -> Result<Lsn, SessionError> {
        let pg = &self.config.postgres;
        self.client
            .delete(marker)
            .await
            .map_err(|e| SessionError::Retry(Cause::Cache, e.into()))?;
        let mut conn = self.replication_connection().await?;
        let point = conn
            .create_logical_slot(&pg.slot, "pgoutput")
            .await
            .map_err(|e| self.ws_error(e, "creating the replication slot"))?;
        info!(slot = %pg.slot, consistent_point = %point, "created the replication slot");
        Ok(point)
    }

    /// The server's next full transaction id (the `xmax` of a snapshot taken now),
    /// without assigning one (`pg_current_xact_id()` would).
    async fn next_xid(&self, sql: &tokio_postgres::Client) -> Result<u64, SessionError> {
        let row = sql
            .query_one(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
                &[],
            )
            .await
            .map_err(|e| self.pg_error(e, "reading the next xid"))?;
        let xmax: i64 = column(&row, 0)?;
        u64::try_from(xmax).ok().filter(|x| *x > 0).ok_or_else(|| {
            SessionError::Retry(Cause::Protocol, anyhow!("the server's next xid is {xmax}"))
        })
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
            .map_err(|e| SessionError::Retry(Cause::Cache, e.into()))?;
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
                Err(e) => return Err(SessionError::Retry(Cause::Cache, e.into())),
            }
        }
        Ok(())
    }
}

/// What `raftcache-cdc drop-slot` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropSlot {
    /// The slot was dropped.
    Dropped {
        /// Its database.
        database: String,
        /// Its `confirmed_flush_lsn` (empty when unknown).
        confirmed: String,
        /// WAL the server kept for it (bytes from its `restart_lsn` to the current WAL
        /// position), now released.
        retained_bytes: i64,
    },
    /// There was no slot of that name.
    Absent {
        /// The database connected to.
        database: String,
    },
    /// Not dropped: the line says why and what to do.
    Refused(String),
}

/// Drops the configured replication slot (`raftcache-cdc drop-slot`): refused while a
/// walsender streams from it, or when it belongs to another database.
///
/// # Errors
/// Cannot connect or query (a [`Misconfigured`] for permanent causes).
pub async fn drop_slot(config: &Config) -> anyhow::Result<DropSlot> {
    let pg = &config.postgres;
    let target = Target::from_url(&pg.url)?;
    let sql = connect_sql(&pg.url, &target)
        .await
        .map_err(SessionError::into_anyhow)?;
    let sql = &sql.client;
    let err = |e: tokio_postgres::Error, what: &str| sql_error(e, &target, what).into_anyhow();
    let row = sql
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(|e| err(e, "reading the database name"))?;
    let database: String = column(&row, 0).map_err(SessionError::into_anyhow)?;
    let row = sql
        .query_opt(
            "SELECT COALESCE(slot_type, ''), database::text, active, active_pid, \
             COALESCE(confirmed_flush_lsn::text, ''), \
             COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&pg.slot],
        )
        .await
        .map_err(|e| err(e, "looking up the replication slot"))?;
    let Some(row) = row else {
        return Ok(DropSlot::Absent { database });
    };
    let slot_type: String = column(&row, 0).map_err(SessionError::into_anyhow)?;
    let slot_db: Option<String> = column(&row, 1).map_err(SessionError::into_anyhow)?;
    let active: bool = column(&row, 2).map_err(SessionError::into_anyhow)?;
    let active_pid: Option<i32> = column(&row, 3).map_err(SessionError::into_anyhow)?;
    let confirmed: String = column(&row, 4).map_err(SessionError::into_anyhow)?;
    let retained_bytes: i64 = column(&row, 5).map_err(SessionError::into_anyhow)?;
    let slot = &pg.slot;
    if slot_type != "logical" || slot_db.as_deref() != Some(database.as_str()) {
        return Ok(DropSlot::Refused(format!(
            "replication slot \"{slot}\" on {} is a {slot_type} slot of database \"{}\", not a \
             slot of \"{database}\" (the database in [postgres] url): not dropped; if nothing \
             uses it, drop it there with SELECT pg_drop_replication_slot('{slot}')",
            target.server,
            slot_db.as_deref().unwrap_or("(none)")
        )));
    }
    let in_use = |said: String| {
        DropSlot::Refused(format!(
            "replication slot \"{slot}\" is active ({said}): a worker is streaming on it; stop \
             the worker first (every raftcache-cdc of this slot, standbys too, since a standby \
             takes over and keeps it), then run drop-slot again"
        ))
    };
    if active {
        return Ok(in_use(match active_pid {
            Some(pid) => format!("walsender pid {pid}"),
            None => "in use".into(),
        }));
    }
    match sql
        .execute("SELECT pg_drop_replication_slot($1)", &[slot])
        .await
    {
        Ok(_) => Ok(DropSlot::Dropped {
            database,
            confirmed,
            retained_bytes,
        }),
        // Postgres: "replication slot … is active for PID …" (55006 object_in_use).
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => Ok(in_use(
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
        )),
        // Dropped by someone else meanwhile.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => {
            Ok(DropSlot::Absent { database })
        }
        Err(e) => Err(err(e, "dropping the replication slot")),
    }
}

/// A SQL connection to `url`, within [`CONNECT_TIMEOUT`].
async fn connect_sql(url: &str, target: &Target) -> Result<SqlConnection, SessionError> {
    let connect = tokio_postgres::connect(url, tokio_postgres::NoTls);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok((client, connection))) => Ok(SqlConnection {
            client,
            _task: spawn_connection(connection),
        }),
        Ok(Err(e)) => Err(sql_error(e, target, "connecting to Postgres")),
        Err(_) => Err(SessionError::Retry(
            Cause::Connect,
            anyhow!(
                "connecting to Postgres at {} timed out after {CONNECT_TIMEOUT:?}",
                target.server
            ),
        )),
    }
}

/// A session error for an error of a SQL connection: [`SessionError::Fatal`] with a
/// [`Misconfigured`] when retrying cannot help.
fn sql_error(e: tokio_postgres::Error, target: &Target, what: &str) -> SessionError {
    match pg_errors::classify_sql(&e, target) {
        Verdict::Permanent(m) => SessionError::Fatal(m.into()),
        Verdict::Transient(cause) => {
            SessionError::Retry(cause, anyhow!(e).context(what.to_owned()))
        }
    }
}

/// Column `i` of a row, as `T` (an error instead of a panic on a type mismatch or an
/// unexpected NULL).
fn column<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    i: usize,
) -> Result<T, SessionError> {
    row.try_get(i).map_err(|e| {
        SessionError::Retry(
            Cause::Protocol,
            anyhow!(e).context(format!("reading column {i} of a Postgres reply")),
        )
    })
}

/// The first column of every row, as text.
fn texts(rows: Vec<tokio_postgres::Row>) -> Result<Vec<String>, SessionError> {
    rows.iter().map(|r| column(r, 0)).collect()
}

/// What [`Worker::validate`] found.
struct Checked {
    /// The publication's tables (schema, table); None when it does not exist.
    publication: Option<Vec<(String, String)>>,
    /// The slot, when it exists (its type, database and plugin are checked).
    slot: Option<SlotRow>,
}

/// The configured slot as `pg_replication_slots` shows it.
struct SlotRow {
    /// `wal_status` (`lost`: Postgres removed WAL it needed).
    wal_status: String,
    /// `confirmed_flush_lsn` as text.
    confirmed: String,
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
    /// Reconnect after a pause; the cause labels the retry metric.
    Retry(Cause, anyhow::Error),
    /// A newer worker holds the lease.
    Fenced(u64),
    /// Stop the worker: retrying cannot help (a [`Misconfigured`] for set-up errors).
    Fatal(anyhow::Error),
}

impl SessionError {
    fn into_anyhow(self) -> anyhow::Error {
        match self {
            SessionError::Retry(_, e) | SessionError::Fatal(e) => e,
            SessionError::Fenced(t) => anyhow!("fenced by a newer CDC worker (token {t})"),
        }
    }
}

impl From<ApplyError> for SessionError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Fenced(t) => SessionError::Fenced(t),
            ApplyError::Refused(e) => {
                SessionError::Retry(Cause::Cache, anyhow!(e).context("applying changes"))
            }
        }
    }
}

async fn send(tx: &mpsc::Sender<Work>, w: Work) -> Result<(), SessionError> {
    tx.send(w)
        .await
        .map_err(|_| SessionError::Retry(Cause::Cache, anyhow!("the applier stopped")))
}

/// Aborts a task when dropped (a session's helpers never outlive it).
struct AbortOnDrop<T>(Option<tokio::task::JoinHandle<T>>);

impl AbortOnDrop<Result<(), ApplyError>> {
    /// Waits for the applier and turns its end into a session error.
    async fn join(&mut self) -> SessionError {
        let stopped = || SessionError::Retry(Cause::Cache, anyhow!("the applier stopped"));
        match self.0.take() {
            Some(handle) => match handle.await {
                Ok(Ok(())) => stopped(),
                Ok(Err(e)) => e.into(),
                Err(e) => {
                    SessionError::Retry(Cause::Cache, anyhow!(e).context("the applier panicked"))
                }
            },
            None => stopped(),
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
