//! [`Conn`]: framed, cancel-safe message I/O over one socket.
//!
//! Reads go into a buffer owned by the connection and a message is parsed only once
//! its whole frame is there, so a read future dropped half-way (in `tokio::select!`)
//! loses nothing: the next read carries on from the buffer. Writes go through a
//! buffer too and [`Conn::send`] advances it as bytes leave, so a dropped send leaves
//! the rest of its frame queued for the next one instead of a torn frame.

use super::error::{Error, Result};
use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{self, ErrorResponseBody};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The byte stream under a connection: TCP in production, an in-memory pipe in tests.
pub(crate) trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// The largest backend frame accepted. PostgreSQL caps a field at 1 GiB, so a larger
/// length header is corruption, not data, and is refused before anything is
/// allocated for it.
pub const MAX_FRAME_LEN: usize = 1 << 30;

/// How much buffer space is reserved ahead of one read at most; a large frame grows
/// the buffer as its bytes actually arrive.
const READ_RESERVE_MAX: usize = 64 * 1024;

/// One message from the server.
pub(crate) enum Backend {
    /// A message `postgres-protocol` parses.
    Message(backend::Message),
    /// `W` CopyBothResponse (which `postgres-protocol` does not know): the server
    /// switched to streaming replication.
    CopyBoth,
}

pub(crate) struct Conn {
    io: Box<dyn AsyncStream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Conn {
    pub(crate) fn new(io: Box<dyn AsyncStream>) -> Conn {
        Conn {
            io,
            rbuf: BytesMut::with_capacity(8 * 1024),
            wbuf: BytesMut::with_capacity(1024),
        }
    }

    /// Appends a frontend message built by `f` to the write buffer; when `f` fails
    /// (a string with a NUL byte, say) nothing of it stays queued.
    pub(crate) fn queue(
        &mut self,
        f: impl FnOnce(&mut BytesMut) -> std::io::Result<()>,
    ) -> Result<()> {
        let before = self.wbuf.len();
        f(&mut self.wbuf).map_err(|e| {
            self.wbuf.truncate(before);
            Error::Config(format!("cannot encode message: {e}"))
        })
    }

    /// The write buffer, for messages that cannot fail to encode.
    pub(crate) fn wbuf(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Writes out everything queued.
    ///
    /// Cancel safety: bytes are removed from the queue only once written, so if this
    /// future is dropped the remainder goes out with the next `send`.
    pub(crate) async fn send(&mut self) -> Result<()> {
        while self.wbuf.has_remaining() {
            let n = self.io.write_buf(&mut self.wbuf).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
        }
        self.io.flush().await?;
        Ok(())
    }

    /// The next message, or `None` when the server closed the connection cleanly
    /// (between two messages).
    ///
    /// Cancel safety: cancel-safe (see the module docs).
    pub(crate) async fn read(&mut self) -> Result<Option<Backend>> {
        loop {
            if let Some(m) = self.try_parse()? {
                return Ok(Some(m));
            }
            let n = self.io.read_buf(&mut self.rbuf).await?;
            if n == 0 {
                if self.rbuf.is_empty() {
                    return Ok(None);
                }
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "server closed the connection in the middle of a message ({} bytes buffered)",
                        self.rbuf.len()
                    ),
                )
                .into());
            }
        }
    }

    /// As [`read`](Self::read), but the end of the connection is an error.
    pub(crate) async fn read_required(&mut self) -> Result<Backend> {
        self.read().await?.ok_or_else(|| {
            Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ))
        })
    }

    /// Splits one complete frame off the read buffer and parses it.
    fn try_parse(&mut self) -> Result<Option<Backend>> {
        let Some(header) = self.rbuf.get(..5) else {
            return Ok(None);
        };
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if !(4..=MAX_FRAME_LEN).contains(&len) {
            return Err(Error::protocol(format!(
                "backend message {:?} has invalid length {len} (must be 4..={MAX_FRAME_LEN})",
                char::from(tag)
            )));
        }
        let total = len + 1;
        if self.rbuf.len() < total {
            let missing = total - self.rbuf.len();
            self.rbuf.reserve(missing.min(READ_RESERVE_MAX));
            return Ok(None);
        }
        let mut frame = self.rbuf.split_to(total);
        if tag == b'W' {
            check_copy_both(&frame[5..])?;
            return Ok(Some(Backend::CopyBoth));
        }
        match backend::Message::parse(&mut frame) {
            Ok(Some(m)) => Ok(Some(Backend::Message(m))),
            Ok(None) => Err(Error::protocol("incomplete backend frame")),
            Err(e) => Err(Error::protocol(format!(
                "cannot parse backend message {:?}: {e}",
                char::from(tag)
            ))),
        }
    }

    /// Closes the write side after sending what is queued; errors are ignored (the
    /// connection is going away).
    pub(crate) async fn shutdown(&mut self) {
        let _ = self.send().await;
        let _ = self.io.shutdown().await;
    }
}

/// CopyBothResponse: Int8 overall format, Int16 column count, Int16 format per column.
fn check_copy_both(body: &[u8]) -> Result<()> {
    let bad = || Error::protocol(format!("malformed CopyBothResponse ({} bytes)", body.len()));
    let (&[format, n1, n2], cols) = body.split_first_chunk::<3>().ok_or_else(bad)?;
    let n = usize::from(u16::from_be_bytes([n1, n2]));
    if format > 1 || cols.len() != 2 * n {
        return Err(bad());
    }
    Ok(())
}

/// Turns an ErrorResponse into [`Error::Db`].
pub(crate) fn db_error(body: &ErrorResponseBody) -> Error {
    let (mut severity, mut localized, mut code, mut message) = (None, None, None, None);
    let (mut detail, mut hint) = (None, None);
    let mut fields = body.fields();
    loop {
        match fields.next() {
            Ok(Some(f)) => {
                let v = Some(String::from_utf8_lossy(f.value_bytes()).into_owned());
                match f.type_() {
                    b'V' => severity = v,
                    b'S' => localized = v,
                    b'C' => code = v,
                    b'M' => message = v,
                    b'D' => detail = v,
                    b'H' => hint = v,
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(e) => {
                return Error::protocol(format!("malformed ErrorResponse: {e}"));
            }
        }
    }
    Error::Db {
        severity: severity.or(localized).unwrap_or_else(|| "ERROR".into()),
        code: code.unwrap_or_else(|| "XX000".into()),
        message: message.unwrap_or_default(),
        detail,
        hint,
    }
}

/// Logs a NoticeResponse.
pub(crate) fn log_notice(body: &backend::NoticeResponseBody) {
    let mut fields = body.fields();
    let mut message = String::new();
    while let Ok(Some(f)) = fields.next() {
        if f.type_() == b'M' {
            message = String::from_utf8_lossy(f.value_bytes()).into_owned();
        }
    }
    tracing::debug!(%message, "PostgreSQL notice");
}
