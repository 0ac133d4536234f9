//! Which Postgres errors the worker retries and which stop it, and the one line an
//! operator reads when it stops. Pure: no I/O, unit-tested below.
//!
//! ```text
//! tokio_postgres::Error ─┐                       ┌─► Permanent(Misconfigured): one line
//!                        ├─► SQLSTATE + message ─┤   (cause + fix), exit EXIT_MISCONFIGURED
//! walsender::Error ──────┘   or I/O kind         └─► Transient(Cause): back off, retry,
//!                                                    raftcache_cdc_retries_total{cause}
//! read-only checks (wal_level, REPLICATION, tables, slot's database) ─► Misconfigured
//! ```
//!
//! | SQLSTATE / error | verdict |
//! |---|---|
//! | `28P01` invalid_password, `28000` invalid_authorization_specification, other class 28 | permanent |
//! | `42501` insufficient_privilege (no REPLICATION, not the tables' owner, ...) | permanent |
//! | `55000` "logical decoding requires wal_level >= logical" | permanent |
//! | `55000` "replication slot … was not created in this database" | permanent |
//! | `3D000` invalid_catalog_name (no such database) | permanent |
//! | an invalid connection URL, an authentication method this client cannot do | permanent |
//! | connection refused / timed out | transient `connect` |
//! | other I/O, connection closed, class `08` | transient `io` |
//! | `57P01` admin_shutdown, `57P02` crash_shutdown | transient `shutdown` |
//! | `57P03` cannot_connect_now (starting up, in recovery) | transient `starting` |
//! | `53300` too_many_connections, `53400` configuration_limit_exceeded | transient `limits` |
//! | `55006` object_in_use (the slot's old walsender has not exited yet) | transient `slot_in_use` |
//! | anything else from the server | transient `server` |

use crate::walsender::{self, ConnectConfig};
use std::io::ErrorKind;

/// The worker's exit code for a configuration or set-up error that retrying cannot
/// fix: the config file, or Postgres (wal_level, authentication, REPLICATION, the
/// database, a slot of another database, a missing mapped table, ...). Restarting the
/// worker does not help until the operator acts (systemd: `RestartPreventExitStatus=3`).
pub const EXIT_MISCONFIGURED: u8 = 3;

/// A permanent error: its text is the single line the worker prints on stderr before
/// exiting with [`EXIT_MISCONFIGURED`], naming the cause and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Misconfigured(pub String);

/// Why a transient error happened: the `cause` label of
/// `raftcache_cdc_retries_total`, and the key of the once-per-cause warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    /// Postgres cannot be reached (connection refused, timed out).
    Connect,
    /// A connection broke (reset, closed, unexpected end of stream).
    Io,
    /// Postgres is shutting down or crashed (`57P01`, `57P02`).
    Shutdown,
    /// Postgres is starting up or in recovery (`57P03`).
    Starting,
    /// Connection or slot limits (`53300`, `53400`).
    Limits,
    /// The slot is still used by another walsender (`55006`).
    SlotInUse,
    /// Another error from the server.
    Server,
    /// A reply or the replication stream could not be understood.
    Protocol,
    /// The cache cannot be reached or refused a change.
    Cache,
}

impl Cause {
    /// Every cause.
    pub const ALL: [Cause; 9] = [
        Cause::Connect,
        Cause::Io,
        Cause::Shutdown,
        Cause::Starting,
        Cause::Limits,
        Cause::SlotInUse,
        Cause::Server,
        Cause::Protocol,
        Cause::Cache,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Cause::Connect => "connect",
            Cause::Io => "io",
            Cause::Shutdown => "shutdown",
            Cause::Starting => "starting",
            Cause::Limits => "limits",
            Cause::SlotInUse => "slot_in_use",
            Cause::Server => "server",
            Cause::Protocol => "protocol",
            Cause::Cache => "cache",
        }
    }

    /// What the once-per-cause warning tells the operator.
    pub fn advice(self) -> &'static str {
        match self {
            Cause::Connect => {
                "Postgres is not reachable (down, or wrong host/port in [postgres] url)"
            }
            Cause::Io => "the connection to Postgres broke",
            Cause::Shutdown => "Postgres is shutting down or restarting",
            Cause::Starting => "Postgres is starting up or in recovery",
            Cause::Limits => {
                "Postgres is at a limit (max_connections, max_wal_senders or \
                 max_replication_slots): free one or raise the setting"
            }
            Cause::SlotInUse => {
                "the replication slot is still in use by another walsender (an old session \
                 that has not exited yet, or a worker outside this cache's lease)"
            }
            Cause::Server => "Postgres reported an error",
            Cause::Protocol => {
                "an unexpected reply from Postgres (also how the replication connection \
                 reports the server ending the stream, e.g. when it shuts down)"
            }
            Cause::Cache => "the cache cannot be reached or refused a write",
        }
    }
}

/// What to do about an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Retrying cannot help: stop with this line.
    Permanent(Misconfigured),
    /// Back off and retry.
    Transient(Cause),
}

/// Where and as whom the worker connects, for the messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port`.
    pub server: String,
    /// The role.
    pub user: String,
    /// The database.
    pub database: String,
}

impl Target {
    /// From the `[postgres] url`.
    ///
    /// # Errors
    /// An invalid URL, as a permanent error.
    pub fn from_url(url: &str) -> Result<Target, Misconfigured> {
        let c = ConnectConfig::from_url(url)
            .map_err(|e| Misconfigured(format!("[postgres] url is invalid: {e}")))?;
        Ok(Target {
            server: format!("{}:{}", c.host, c.port),
            user: c.user,
            database: c.dbname,
        })
    }
}

/// Classifies an error the server sent (`ErrorResponse`): its SQLSTATE and primary
/// message. Message text is only used to tell apart kinds of `55000` and `42501`, on
/// the parts that are the same in every supported Postgres version (13-17):
/// `wal_level`, `not created in this database`, `replication`, `WAL sender`.
pub fn classify_server(code: &str, message: &str, t: &Target) -> Verdict {
    let permanent = |s: String| Verdict::Permanent(Misconfigured(s));
    let user = &t.user;
    let db = &t.database;
    let server = &t.server;
    match code {
        "28P01" => permanent(format!(
            "Postgres at {server} rejected the password of user \"{user}\" (28P01 \
             invalid_password: {message}): fix the password in [postgres] url, or set it \
             with ALTER ROLE {user} PASSWORD '…'"
        )),
        "28000" if message.contains("does not exist") => permanent(format!(
            "Postgres at {server} has no role \"{user}\" (28000: {message}): create it with \
             CREATE ROLE {user} LOGIN REPLICATION PASSWORD '…', or fix the user in [postgres] url"
        )),
        "28000" => permanent(format!(
            "Postgres at {server} refused user \"{user}\" for database \"{db}\" (28000 \
             invalid_authorization_specification: {message}): add a pg_hba.conf line such as \
             `host {db} {user} <worker address>/32 scram-sha-256` (logical replication \
             connections match database lines) and reload Postgres, or fix [postgres] url"
        )),
        c if c.starts_with("28") => permanent(format!(
            "Postgres at {server} did not authenticate user \"{user}\" ({c}: {message}): \
             fix the user or password in [postgres] url, or pg_hba.conf"
        )),
        "42501" if mentions_replication(message) => permanent(no_replication(t, message)),
        "42501" => permanent(format!(
            "user \"{user}\" lacks a privilege the worker needs on {server}/{db} (42501 \
             insufficient_privilege: {message}): grant it, or create the publication as the \
             tables' owner (CREATE PUBLICATION … FOR TABLE …) and set create-publication = false"
        )),
        "55000" if message.contains("wal_level") => permanent(wal_level_message(t, None)),
        "55000" if message.contains("not created in this database") => permanent(format!(
            "{message} (55000): the slot belongs to another database than \"{db}\": give this \
             worker its own slot name in [postgres] slot, or drop the other slot if nothing \
             uses it (SELECT pg_drop_replication_slot('…'))"
        )),
        "3D000" => permanent(format!(
            "database \"{db}\" does not exist on {server} (3D000 invalid_catalog_name: \
             {message}): create it, or fix the database in [postgres] url"
        )),
        "57P01" | "57P02" => Verdict::Transient(Cause::Shutdown),
        "57P03" => Verdict::Transient(Cause::Starting),
        "53300" | "53400" => Verdict::Transient(Cause::Limits),
        "55006" => Verdict::Transient(Cause::SlotInUse),
        c if c.starts_with("08") => Verdict::Transient(Cause::Io),
        _ => Verdict::Transient(Cause::Server),
    }
}

/// Postgres 13-15: "must be superuser or replication role to start walsender" / "… to
/// use replication slots"; 16+: "permission denied to start WAL sender" / "permission
/// denied to use replication slots".
fn mentions_replication(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("replication") || m.contains("wal sender") || m.contains("walsender")
}

fn no_replication(t: &Target, server_said: &str) -> String {
    let said = if server_said.is_empty() {
        String::new()
    } else {
        format!(" (42501: {server_said})")
    };
    format!(
        "user \"{}\" may not use logical replication on {}{said}: give it the REPLICATION \
         attribute as a superuser: ALTER ROLE {} REPLICATION",
        t.user, t.server, t.user
    )
}

fn wal_level_message(t: &Target, current: Option<&str>) -> String {
    let has = current.map_or_else(
        || "runs with wal_level below logical".to_owned(),
        |v| format!("has wal_level={v}"),
    );
    format!(
        "Postgres at {} {has}; logical decoding needs wal_level=logical: run ALTER SYSTEM SET \
         wal_level = logical and restart Postgres",
        t.server
    )
}

/// The transient cause of an I/O error.
pub fn io_cause(kind: ErrorKind) -> Cause {
    match kind {
        ErrorKind::ConnectionRefused
        | ErrorKind::TimedOut
        | ErrorKind::AddrNotAvailable
        | ErrorKind::HostUnreachable
        | ErrorKind::NetworkUnreachable => Cause::Connect,
        _ => Cause::Io,
    }
}

/// Classifies an error of a plain SQL connection (`tokio-postgres`).
pub fn classify_sql(e: &tokio_postgres::Error, t: &Target) -> Verdict {
    if let Some(db) = e.as_db_error() {
        return classify_server(db.code().code(), db.message(), t);
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Verdict::Transient(io_cause(io.kind()));
        }
        source = s.source();
    }
    if e.is_closed() {
        return Verdict::Transient(Cause::Io);
    }
    // tokio-postgres keeps its error kind private; its Display is the kind's fixed text
    // ("authentication error", "invalid connection string", "invalid configuration",
    // "timeout waiting for server", ...), which is what is matched here.
    let text = e.to_string();
    let full = chain(e);
    if text.starts_with("authentication error") {
        Verdict::Permanent(Misconfigured(format!(
            "cannot authenticate user \"{}\" to Postgres at {} ({full}): set the password in \
             [postgres] url, or allow scram-sha-256/md5/password for it in pg_hba.conf",
            t.user, t.server
        )))
    } else if text.starts_with("invalid connection string")
        || text.starts_with("invalid configuration")
    {
        Verdict::Permanent(Misconfigured(format!("[postgres] url is invalid: {full}")))
    } else if text.starts_with("timeout") {
        Verdict::Transient(Cause::Connect)
    } else {
        Verdict::Transient(Cause::Protocol)
    }
}

/// Classifies an error of the replication connection ([`walsender`]).
pub fn classify_walsender(e: &walsender::Error, t: &Target) -> Verdict {
    match e {
        walsender::Error::Db { code, message, .. } => classify_server(code, message, t),
        // The walsender turns server errors of SQLSTATE class 28 into `Auth` with only the
        // message, to which it appends "(SQLSTATE <code>)": that code is read back here.
        // Its other `Auth` errors (no password configured, an unsupported method, a
        // failed SCRAM exchange) are permanent too.
        walsender::Error::Auth(message) => match auth_sqlstate(message) {
            Some((message, code)) => classify_server(code, message, t),
            None => Verdict::Permanent(Misconfigured(format!(
                "cannot authenticate user \"{}\" to Postgres at {} ({message}): fix the \
                 password in [postgres] url, or pg_hba.conf",
                t.user, t.server
            ))),
        },
        walsender::Error::Io(io) => Verdict::Transient(io_cause(io.kind())),
        walsender::Error::Protocol(_) => Verdict::Transient(Cause::Protocol),
        walsender::Error::Config(message) => Verdict::Permanent(Misconfigured(format!(
            "[postgres] url cannot be used for replication: {message}"
        ))),
    }
}

/// `("password authentication failed for user \"app\"", "28P01")` from the walsender's
/// `"… (SQLSTATE 28P01)"`.
fn auth_sqlstate(message: &str) -> Option<(&str, &str)> {
    let rest = message.strip_suffix(')')?;
    let at = rest.rfind(" (SQLSTATE ")?;
    let code = rest.get(at + " (SQLSTATE ".len()..)?;
    (code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| (&message[..at], code))
}

/// An error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = c.source();
    }
    one_line(&s)
}

/// `text` on one line: every run of white space (newlines too) becomes one space.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `current_setting('wal_level')` must be `logical`.
///
/// # Errors
/// Any other level.
pub fn check_wal_level(wal_level: &str, t: &Target) -> Result<(), Misconfigured> {
    if wal_level == "logical" {
        Ok(())
    } else {
        Err(Misconfigured(wal_level_message(t, Some(wal_level))))
    }
}

/// The role must have REPLICATION (or be a superuser).
///
/// # Errors
/// When it has neither.
pub fn check_role(can_replicate: bool, t: &Target) -> Result<(), Misconfigured> {
    if can_replicate {
        Ok(())
    } else {
        Err(Misconfigured(no_replication(t, "")))
    }
}

/// A row of `pg_replication_slots` for the configured slot name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// `logical` or `physical`.
    pub slot_type: String,
    /// The database a logical slot belongs to.
    pub database: Option<String>,
    /// The output plugin of a logical slot.
    pub plugin: Option<String>,
}

/// An existing slot must be a logical `pgoutput` slot of `database` (the one the
/// worker is connected to).
///
/// # Errors
/// Otherwise, naming the slot's database or plugin and the fix.
pub fn check_slot(
    slot: &str,
    found: &SlotInfo,
    database: &str,
    t: &Target,
) -> Result<(), Misconfigured> {
    if found.slot_type != "logical" {
        return Err(Misconfigured(format!(
            "replication slot \"{slot}\" on {} is a {} slot; the worker needs a logical one: \
             choose another name in [postgres] slot",
            t.server, found.slot_type
        )));
    }
    match found.database.as_deref() {
        Some(d) if d == database => {}
        other => {
            return Err(Misconfigured(format!(
                "replication slot \"{slot}\" on {} belongs to database \"{}\", not \"{database}\" \
                 (the database in [postgres] url): give this worker its own slot name in \
                 [postgres] slot, or, if nothing uses the old slot, drop it (raftcache-cdc \
                 drop-slot with that database's config, or SELECT pg_drop_replication_slot('{slot}'))",
                t.server,
                other.unwrap_or("(none)")
            )))
        }
    }
    match found.plugin.as_deref() {
        Some("pgoutput") => Ok(()),
        other => Err(Misconfigured(format!(
            "replication slot \"{slot}\" uses output plugin \"{}\"; raftcache-cdc needs \
             pgoutput: drop the slot (raftcache-cdc drop-slot) so the worker creates it again, \
             or choose another name in [postgres] slot",
            other.unwrap_or("(none)")
        ))),
    }
}

/// A mapped table that is not in the database.
pub fn missing_table(schema: &str, table: &str, t: &Target) -> Misconfigured {
    Misconfigured(format!(
        "mapped table {schema}.{table} does not exist in database \"{}\" on {}: create it, or \
         fix its [[table]] name (schema.table) in the config",
        t.database, t.server
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn target() -> Target {
        Target::from_url("postgres://app:secret@127.0.0.1:5432/app").unwrap()
    }

    fn permanent(v: Verdict) -> String {
        match v {
            Verdict::Permanent(Misconfigured(m)) => {
                assert!(!m.contains('\n'), "one line: {m}");
                m
            }
            Verdict::Transient(c) => panic!("expected permanent, got {c:?}"),
        }
    }

    #[test]
    fn configuration_errors_are_permanent_with_the_fix() {
        let t = target();
        let m = permanent(classify_server(
            "28P01",
            "password authentication failed for user \"app\"",
            &t,
        ));
        assert!(
            m.contains("password") && m.contains("[postgres] url"),
            "{m}"
        );
        let m = permanent(classify_server(
            "28000",
            "no pg_hba.conf entry for replication connection from host \"127.0.0.1\"",
            &t,
        ));
        assert!(m.contains("pg_hba.conf"), "{m}");
        let m = permanent(classify_server("28000", "role \"app\" does not exist", &t));
        assert!(m.contains("CREATE ROLE app"), "{m}");
        for said in [
            "must be superuser or replication role to start walsender",
            "permission denied to start WAL sender",
            "must be superuser or replication role to use replication slots",
        ] {
            let m = permanent(classify_server("42501", said, &t));
            assert!(m.contains("ALTER ROLE app REPLICATION"), "{m}");
        }
        let m = permanent(classify_server("42501", "must be owner of table users", &t));
        assert!(m.contains("create-publication = false"), "{m}");
        for said in [
            "logical decoding requires wal_level >= logical",
            "logical decoding requires \"wal_level\" >= \"logical\"",
        ] {
            let m = permanent(classify_server("55000", said, &t));
            assert!(m.contains("ALTER SYSTEM SET wal_level = logical"), "{m}");
        }
        let m = permanent(classify_server(
            "55000",
            "replication slot \"raftcache\" was not created in this database",
            &t,
        ));
        assert!(m.contains("[postgres] slot"), "{m}");
        let m = permanent(classify_server(
            "3D000",
            "database \"app\" does not exist",
            &t,
        ));
        assert!(m.contains("create it"), "{m}");
        assert!(Target::from_url("mysql://x").is_err());
    }

    #[test]
    fn outages_are_transient() {
        let t = target();
        for (code, cause) in [
            ("57P01", Cause::Shutdown),
            ("57P02", Cause::Shutdown),
            ("57P03", Cause::Starting),
            ("53300", Cause::Limits),
            ("55006", Cause::SlotInUse),
            ("08006", Cause::Io),
            ("55000", Cause::Server), // e.g. an invalidated slot: prepare recreates it
            ("XX000", Cause::Server),
        ] {
            assert_eq!(
                classify_server(code, "whatever", &t),
                Verdict::Transient(cause),
                "{code}"
            );
        }
        assert_eq!(io_cause(ErrorKind::ConnectionRefused), Cause::Connect);
        assert_eq!(io_cause(ErrorKind::ConnectionReset), Cause::Io);
        assert_eq!(io_cause(ErrorKind::UnexpectedEof), Cause::Io);
        let labels: std::collections::HashSet<_> = Cause::ALL.iter().map(|c| c.label()).collect();
        assert_eq!(labels.len(), Cause::ALL.len());
    }

    #[test]
    fn walsender_errors() {
        let t = target();
        let auth = walsender::Error::Auth(
            "password authentication failed for user \"app\" (SQLSTATE 28P01)".into(),
        );
        let m = permanent(classify_walsender(&auth, &t));
        assert!(m.contains("28P01"), "{m}");
        assert!(!m.contains("SQLSTATE"), "{m}");
        let m = permanent(classify_walsender(
            &walsender::Error::Auth("the server asks for a password".into()),
            &t,
        ));
        assert!(m.contains("cannot authenticate"), "{m}");
        let db = walsender::Error::Db {
            severity: "FATAL".into(),
            code: "42501".into(),
            message: "must be superuser or replication role to start walsender".into(),
            detail: None,
            hint: None,
        };
        permanent(classify_walsender(&db, &t));
        let io = walsender::Error::Io(std::io::Error::new(ErrorKind::ConnectionRefused, "no"));
        assert_eq!(
            classify_walsender(&io, &t),
            Verdict::Transient(Cause::Connect)
        );
        assert_eq!(
            classify_walsender(&walsender::Error::Protocol("x".into()), &t),
            Verdict::Transient(Cause::Protocol)
        );
        assert_eq!(auth_sqlstate("x (SQLSTATE 28000)"), Some(("x", "28000")));
        assert_eq!(auth_sqlstate("x (SQLSTATE 28)"), None);
        assert_eq!(auth_sqlstate("no code"), None);
    }

    #[test]
    fn checks() {
        let t = target();
        assert!(check_wal_level("logical", &t).is_ok());
        let m = check_wal_level("replica", &t).unwrap_err().0;
        assert!(
            m.contains("wal_level=replica")
                && m.contains("ALTER SYSTEM SET wal_level = logical and restart Postgres"),
            "{m}"
        );
        assert!(check_role(true, &t).is_ok());
        assert!(check_role(false, &t)
            .unwrap_err()
            .0
            .contains("ALTER ROLE app REPLICATION"));
        let slot = |ty: &str, db: Option<&str>, plugin: Option<&str>| SlotInfo {
            slot_type: ty.into(),
            database: db.map(Into::into),
            plugin: plugin.map(Into::into),
        };
        assert!(check_slot(
            "s",
            &slot("logical", Some("app"), Some("pgoutput")),
            "app",
            &t
        )
        .is_ok());
        let m = check_slot(
            "s",
            &slot("logical", Some("other"), Some("pgoutput")),
            "app",
            &t,
        )
        .unwrap_err()
        .0;
        assert!(m.contains("\"other\"") && m.contains("drop-slot"), "{m}");
        assert!(check_slot("s", &slot("physical", None, None), "app", &t).is_err());
        assert!(check_slot(
            "s",
            &slot("logical", Some("app"), Some("wal2json")),
            "app",
            &t
        )
        .is_err());
        let m = missing_table("public", "nope", &t).0;
        assert!(m.contains("public.nope") && m.contains("\"app\""), "{m}");
    }
}
