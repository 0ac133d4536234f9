//! [`Error`]: what can go wrong talking to a walsender.

/// The result of a walsender call.
pub type Result<T> = std::result::Result<T, Error>;

/// An error from the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket failed (connection refused, reset, unexpected end of stream, ...).
    #[error("I/O error talking to PostgreSQL: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent something this client does not understand or did not expect.
    #[error("PostgreSQL protocol error: {0}")]
    Protocol(String),
    /// The server answered with an `ErrorResponse`.
    #[error("{}", db_message(severity, code, message, detail.as_deref(), hint.as_deref()))]
    Db {
        /// Severity (`ERROR`, `FATAL`, `PANIC`), not localized.
        severity: String,
        /// The SQLSTATE code, e.g. `42710` for "already exists".
        code: String,
        /// The primary message.
        message: String,
        /// The optional detail line.
        detail: Option<String>,
        /// The optional hint line.
        hint: Option<String>,
    },
    /// Authentication failed: the server rejected the credentials (SQLSTATE class
    /// `28`), asked for a method this client does not implement, or SCRAM failed.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The connection settings are invalid or ask for something not supported.
    #[error("invalid connection settings: {0}")]
    Config(String),
}

fn db_message(
    severity: &str,
    code: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> String {
    let mut s = format!("PostgreSQL {severity} {code}: {message}");
    if let Some(d) = detail {
        s.push_str(" (detail: ");
        s.push_str(d);
        s.push(')');
    }
    if let Some(h) = hint {
        s.push_str(" (hint: ");
        s.push_str(h);
        s.push(')');
    }
    s
}

impl Error {
    /// The SQLSTATE code of a [`Error::Db`].
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Db { code, .. } => Some(code),
            _ => None,
        }
    }

    /// SQLSTATE `42710` duplicate_object: e.g. the replication slot already exists.
    pub fn is_duplicate_object(&self) -> bool {
        self.code() == Some("42710")
    }

    /// SQLSTATE `42704` undefined_object: e.g. the replication slot does not exist.
    pub fn is_undefined_object(&self) -> bool {
        self.code() == Some("42704")
    }

    /// SQLSTATE `55006` object_in_use: e.g. another walsender still streams from the
    /// slot (it can take a moment after a disconnect until the old one exits).
    pub fn is_object_in_use(&self) -> bool {
        self.code() == Some("55006")
    }

    pub(crate) fn protocol(msg: impl Into<String>) -> Error {
        Error::Protocol(msg.into())
    }
}
