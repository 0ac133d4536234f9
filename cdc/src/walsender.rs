//! A PostgreSQL logical replication client: connects to a walsender
//! (`replication=database`), runs replication commands and streams a slot.
//!
//! Written on `postgres-protocol` (message encoding, authentication) and tokio, since
//! `tokio-postgres` cannot open replication connections. Plain TCP only for now.
//!
//! ```text
//! ConnectConfig ─connect─► ReplicationConnection ─start_replication─► ReplicationStream
//!   (from_url)               simple_query, identify_system,            next() ─► XLogData ─► pgoutput::decode
//!                            create_logical_slot, drop_slot            send_status(write, flush, apply)
//! ```
//!
//! # Layout
//! - `config`: [`ConnectConfig`] and its URL parser.
//! - `conn`: framed, cancel-safe socket I/O; knows the `W` (CopyBothResponse)
//!   message `postgres-protocol` does not.
//! - `stream`: [`ReplicationStream`] and [`ReplicationMessage`].
//! - `error`: [`Error`].
//! - this file: [`ReplicationConnection`] (startup, authentication, commands).
//!
//! # Example
//! ```no_run
//! # async fn f() -> Result<(), raftcache_cdc::walsender::Error> {
//! use raftcache_cdc::walsender::{ConnectConfig, ReplicationConnection, ReplicationMessage};
//! let cfg = ConnectConfig::from_url("postgres://cdc:secret@127.0.0.1:5432/app")?;
//! let mut conn = ReplicationConnection::connect(&cfg).await?;
//! let start = match conn.create_logical_slot("cache", "pgoutput").await {
//!     Ok(consistent_point) => consistent_point,
//!     Err(e) if e.is_duplicate_object() => raftcache_cdc::lsn::Lsn(0), // resume the slot
//!     Err(e) => return Err(e),
//! };
//! let mut stream = conn.start_replication("cache", start, &["cache_pub".into()]).await?;
//! while let Some(msg) = stream.next().await? {
//!     match msg {
//!         ReplicationMessage::XLogData { data, .. } => { /* pgoutput::decode(&data) */ }
//!         ReplicationMessage::Keepalive { wal_end, reply_requested: true, .. } => {
//!             stream.send_status(wal_end, wal_end, wal_end, false).await?;
//!         }
//!         ReplicationMessage::Keepalive { .. } => {}
//!     }
//! }
//! # Ok(()) }
//! ```

mod config;
mod conn;
mod error;
mod stream;

pub use crate::lsn::Lsn;
pub use config::{ConnectConfig, DEFAULT_APPLICATION_NAME};
pub use conn::MAX_FRAME_LEN;
pub use error::{Error, Result};
pub use stream::{ReplicationMessage, ReplicationStream};

use conn::{db_error, log_notice, AsyncStream, Backend, Conn};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{DataRowBody, Message};
use postgres_protocol::message::frontend;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds from the Unix epoch to PostgreSQL's epoch, 2000-01-01 00:00 UTC.
pub const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// Microseconds since PostgreSQL's epoch (2000-01-01 UTC) of a system time, as the
/// replication protocol dates messages. Times before 2000 are negative.
pub fn pg_micros(t: SystemTime) -> i64 {
    let pg_epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
    match t.duration_since(pg_epoch) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_micros()).map_or(i64::MIN, |v| -v),
    }
}

/// The system time of a PostgreSQL timestamp (microseconds since 2000-01-01 UTC),
/// e.g. a commit time or a keepalive's server time.
pub fn pg_time(micros: i64) -> SystemTime {
    let pg_epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
    let d = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 {
        pg_epoch + d
    } else {
        pg_epoch - d
    }
}

/// Now, as [`pg_micros`].
pub(crate) fn pg_now_us() -> i64 {
    pg_micros(SystemTime::now())
}

/// What `IDENTIFY_SYSTEM` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    /// The cluster's unique system identifier (a decimal number as text). It changes
    /// when the cluster is re-created, which invalidates every stored LSN.
    pub systemid: String,
    /// The current timeline.
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlogpos: Lsn,
    /// The database connected to (`None` for a physical replication connection).
    pub dbname: Option<String>,
}

/// A replication connection in command mode: run replication commands, then turn
/// it into a [`ReplicationStream`] with [`start_replication`](Self::start_replication).
pub struct ReplicationConnection {
    conn: Conn,
    /// ParameterStatus values the server reported (`server_version`, ...).
    params: Vec<(String, String)>,
}

impl std::fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl ReplicationConnection {
    /// Connects over TCP, starts a logical replication session (`replication=database`)
    /// and authenticates (cleartext, MD5 or SCRAM-SHA-256 without channel binding),
    /// waiting until the server is ready for commands. There is no built-in timeout:
    /// wrap the call in `tokio::time::timeout`.
    ///
    /// # Errors
    /// [`Error::Config`] for invalid settings, [`Error::Io`] when the server cannot be
    /// reached, [`Error::Auth`] when authentication fails, [`Error::Db`] for other
    /// server errors (e.g. the database does not exist, or too many walsenders).
    pub async fn connect(config: &ConnectConfig) -> Result<Self> {
        config.validate()?;
        let tcp = tokio::net::TcpStream::connect((config.host.as_str(), config.port))
            .await
            .map_err(|e| {
                Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("connect to {}:{}: {e}", config.host, config.port),
                ))
            })?;
        tcp.set_nodelay(true)?;
        Self::handshake(Box::new(tcp), config).await
    }

    /// Startup and authentication over an established byte stream.
    pub(crate) async fn handshake(
        io: Box<dyn AsyncStream>,
        config: &ConnectConfig,
    ) -> Result<Self> {
        config.validate()?;
        let mut conn = Conn::new(io);
        conn.queue(|buf| {
            frontend::startup_message(
                [
                    ("user", config.user.as_str()),
                    ("database", config.dbname.as_str()),
                    ("replication", "database"),
                    ("application_name", config.application_name.as_str()),
                    // Column values and names come in the client encoding.
                    ("client_encoding", "UTF8"),
                ],
                buf,
            )
        })?;
        conn.send().await?;
        let password = || {
            config.password.as_deref().ok_or_else(|| {
                Error::Auth(format!(
                    "the server asks for a password for user {:?} and none is configured",
                    config.user
                ))
            })
        };
        let mut scram: Option<ScramSha256> = None;
        let mut scram_done = false;
        let mut params = Vec::new();
        loop {
            let Backend::Message(msg) = conn.read_required().await? else {
                return Err(Error::protocol(
                    "unexpected CopyBothResponse during startup",
                ));
            };
            match msg {
                Message::AuthenticationOk => {
                    if scram.is_some() && !scram_done {
                        return Err(Error::Auth(
                            "server ended SCRAM authentication without proving it knows the password"
                                .into(),
                        ));
                    }
                }
                Message::AuthenticationCleartextPassword => {
                    let pw = password()?;
                    conn.queue(|buf| frontend::password_message(pw.as_bytes(), buf))?;
                    conn.send().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash =
                        md5_hash(config.user.as_bytes(), password()?.as_bytes(), body.salt());
                    conn.queue(|buf| frontend::password_message(hash.as_bytes(), buf))?;
                    conn.send().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut offered = Vec::new();
                    let mut mechanisms = body.mechanisms();
                    while let Some(m) = mechanisms.next().map_err(|e| {
                        Error::protocol(format!("malformed SASL mechanism list: {e}"))
                    })? {
                        offered.push(m.to_owned());
                    }
                    if !offered.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(Error::Auth(format!(
                            "the server offers SASL mechanisms {offered:?}; this client supports only \
                             {SCRAM_SHA_256} without channel binding"
                        )));
                    }
                    let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    conn.queue(|buf| {
                        frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), buf)
                    })?;
                    conn.send().await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| Error::protocol("SASLContinue before SASL started"))?;
                    s.update(body.data())
                        .map_err(|e| Error::Auth(format!("SCRAM exchange failed: {e}")))?;
                    conn.queue(|buf| frontend::sasl_response(s.message(), buf))?;
                    conn.send().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| Error::protocol("SASLFinal before SASL started"))?;
                    s.finish(body.data()).map_err(|e| {
                        Error::Auth(format!("SCRAM server signature did not verify: {e}"))
                    })?;
                    scram_done = true;
                }
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationGssContinue(_)
                | Message::AuthenticationSspi => {
                    return Err(Error::Auth(
                        "the server asks for an authentication method this client does not \
                         support (only password, md5 and scram-sha-256 are)"
                            .into(),
                    ));
                }
                Message::ErrorResponse(body) => {
                    return Err(match db_error(&body) {
                        Error::Db { code, message, .. } if code.starts_with("28") => {
                            Error::Auth(format!("{message} (SQLSTATE {code})"))
                        }
                        e => e,
                    });
                }
                Message::ParameterStatus(body) => {
                    if let (Ok(name), Ok(value)) = (body.name(), body.value()) {
                        params.push((name.to_owned(), value.to_owned()));
                    }
                }
                Message::BackendKeyData(_) => {}
                Message::NoticeResponse(body) => log_notice(&body),
                Message::ReadyForQuery(_) => break,
                _ => return Err(Error::protocol("unexpected message during startup")),
            }
        }
        tracing::debug!(host = %config.host, port = config.port, user = %config.user, "replication connection ready");
        Ok(ReplicationConnection { conn, params })
    }

    /// A parameter the server reported at startup, e.g. `server_version`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Runs `sql` with the simple query protocol (replication commands, or plain SQL)
    /// and returns the rows of the last result set as text columns (`None` = NULL).
    ///
    /// # Errors
    /// [`Error::Db`] when the server reports an error (the connection stays usable),
    /// [`Error::Config`] when `sql` contains a NUL byte, [`Error::Protocol`] when the
    /// command starts a COPY (the connection is then unusable), [`Error::Io`].
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        self.conn.queue(|buf| frontend::query(sql, buf))?;
        self.conn.send().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let Backend::Message(msg) = self.conn.read_required().await? else {
                return Err(Error::protocol(
                    "unexpected CopyBothResponse to a simple query",
                ));
            };
            match msg {
                Message::RowDescription(_) => rows.clear(),
                Message::DataRow(body) => rows.push(text_row(&body)?),
                Message::CommandComplete(_) | Message::EmptyQueryResponse => {}
                Message::ErrorResponse(body) => error = Some(db_error(&body)),
                Message::NoticeResponse(body) => log_notice(&body),
                Message::ParameterStatus(body) => {
                    if let (Ok(name), Ok(value)) = (body.name(), body.value()) {
                        self.params.push((name.to_owned(), value.to_owned()));
                    }
                }
                Message::ReadyForQuery(_) => break,
                _ => {
                    return Err(Error::protocol(
                        "unexpected message in reply to a simple query (COPY is not supported)",
                    ))
                }
            }
        }
        error.map_or(Ok(rows), Err)
    }

    /// `IDENTIFY_SYSTEM`.
    ///
    /// # Errors
    /// As [`simple_query`](Self::simple_query), and [`Error::Protocol`] when the reply
    /// does not have the documented shape.
    pub async fn identify_system(&mut self) -> Result<SystemInfo> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = single_row(&rows, 4, "IDENTIFY_SYSTEM")?;
        let systemid = required(row, 0, "systemid")?.to_owned();
        let timeline = required(row, 1, "timeline")?
            .parse()
            .map_err(|_| Error::protocol("IDENTIFY_SYSTEM: timeline is not a number"))?;
        let xlogpos = parse_lsn(required(row, 2, "xlogpos")?, "IDENTIFY_SYSTEM xlogpos")?;
        Ok(SystemInfo {
            systemid,
            timeline,
            xlogpos,
            dbname: row.get(3).cloned().flatten(),
        })
    }

    /// Creates a logical replication slot `name` with output plugin `plugin`
    /// (`pgoutput`), without exporting a snapshot, and returns its consistent point:
    /// the LSN from which the slot can stream.
    ///
    /// # Errors
    /// [`Error::Db`] with [`Error::is_duplicate_object`] when the slot exists; other
    /// errors as [`simple_query`](Self::simple_query).
    pub async fn create_logical_slot(&mut self, name: &str, plugin: &str) -> Result<Lsn> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL {} NOEXPORT_SNAPSHOT",
            quote_ident(name)?,
            quote_ident(plugin)?
        );
        let rows = self.simple_query(&sql).await?;
        let row = single_row(&rows, 2, "CREATE_REPLICATION_SLOT")?;
        parse_lsn(
            required(row, 1, "consistent_point")?,
            "CREATE_REPLICATION_SLOT consistent_point",
        )
    }

    /// Drops the replication slot `name`; with `wait`, waits for a walsender still
    /// using it to let go instead of failing.
    ///
    /// # Errors
    /// [`Error::Db`] with [`Error::is_undefined_object`] when there is no such slot,
    /// [`Error::is_object_in_use`] when it is in use and `wait` is false.
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<()> {
        let sql = format!(
            "DROP_REPLICATION_SLOT {}{}",
            quote_ident(name)?,
            if wait { " WAIT" } else { "" }
        );
        self.simple_query(&sql).await.map(drop)
    }

    /// Starts streaming the logical slot `slot` from `start` with pgoutput protocol
    /// version 1 for `publications` (exact publication names, case-sensitive).
    /// `Lsn(0)` starts where the slot's `confirmed_flush_lsn` is; the server also never
    /// goes back before it whatever `start` says.
    ///
    /// # Errors
    /// [`Error::Config`] with no publications or a name containing a NUL byte,
    /// [`Error::Db`] when the server refuses (no such slot: `42704`; slot in use by
    /// another walsender: `55006`), [`Error::Protocol`], [`Error::Io`].
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publications: &[String],
    ) -> Result<ReplicationStream> {
        if publications.is_empty() {
            return Err(Error::Config("at least one publication is needed".into()));
        }
        let names = publications
            .iter()
            .map(|p| quote_ident(p))
            .collect::<Result<Vec<_>>>()?
            .join(",");
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (\"proto_version\" '1', \"publication_names\" {})",
            quote_ident(slot)?,
            quote_literal(&names)?
        );
        tracing::debug!(%sql, "starting replication");
        self.conn.queue(|buf| frontend::query(&sql, buf))?;
        self.conn.send().await?;
        loop {
            match self.conn.read_required().await? {
                Backend::CopyBoth => return Ok(ReplicationStream::new(self.conn)),
                Backend::Message(Message::ErrorResponse(body)) => return Err(db_error(&body)),
                Backend::Message(Message::NoticeResponse(body)) => log_notice(&body),
                Backend::Message(Message::ParameterStatus(_)) => {}
                Backend::Message(_) => {
                    return Err(Error::protocol(
                        "unexpected reply to START_REPLICATION (expected CopyBothResponse)",
                    ))
                }
            }
        }
    }

    /// Ends the session (Terminate) and closes the socket.
    pub async fn close(mut self) {
        frontend::terminate(self.conn.wbuf());
        self.conn.shutdown().await;
    }
}

fn text_row(body: &DataRowBody) -> Result<Vec<Option<String>>> {
    let buf = body.buffer();
    let mut ranges = body.ranges();
    let mut row = Vec::new();
    while let Some(range) = ranges
        .next()
        .map_err(|e| Error::protocol(format!("malformed DataRow: {e}")))?
    {
        row.push(match range {
            None => None,
            Some(r) => {
                let bytes = buf
                    .get(r)
                    .ok_or_else(|| Error::protocol("DataRow column out of bounds"))?;
                Some(
                    std::str::from_utf8(bytes)
                        .map_err(|_| Error::protocol("DataRow column is not UTF-8"))?
                        .to_owned(),
                )
            }
        });
    }
    Ok(row)
}

fn single_row<'a>(
    rows: &'a [Vec<Option<String>>],
    min_cols: usize,
    what: &str,
) -> Result<&'a [Option<String>]> {
    match rows {
        [row] if row.len() >= min_cols => Ok(row),
        _ => Err(Error::protocol(format!(
            "{what}: expected one row of at least {min_cols} columns, got {rows:?}"
        ))),
    }
}

fn required<'a>(row: &'a [Option<String>], i: usize, what: &str) -> Result<&'a str> {
    row.get(i)
        .and_then(|c| c.as_deref())
        .ok_or_else(|| Error::protocol(format!("column {what} is missing or NULL")))
}

fn parse_lsn(s: &str, what: &str) -> Result<Lsn> {
    s.parse()
        .map_err(|e| Error::protocol(format!("{what}: {e}")))
}

/// Quotes an identifier for the replication command grammar: `"` doubled inside
/// double quotes (the replication scanner knows no other escapes).
pub fn quote_ident(name: &str) -> Result<String> {
    if name.is_empty() || name.contains('\0') {
        return Err(Error::Config(format!("invalid identifier {name:?}")));
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// Quotes a string literal for the replication command grammar: `'` doubled inside
/// single quotes (backslashes are not escapes there, and `E''` is not accepted).
pub fn quote_literal(value: &str) -> Result<String> {
    if value.contains('\0') {
        return Err(Error::Config(format!("invalid literal {value:?}")));
    }
    Ok(format!("'{}'", value.replace('\'', "''")))
}

#[cfg(test)]
#[path = "walsender/walsender_test.rs"]
mod tests;
