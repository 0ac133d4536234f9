//! [`ReplicationStream`]: the CopyBoth phase after `START_REPLICATION`.

use super::conn::{db_error, log_notice, Backend, Conn};
use super::error::{Error, Result};
use super::{pg_now_us, Lsn};
use bytes::{BufMut, Bytes};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// `w`: a chunk of decoded WAL, for pgoutput one message (see
    /// [`crate::pgoutput::decode`]).
    XLogData {
        /// WAL position the data starts at (0 for some messages, e.g. pgoutput's
        /// Commit carries its own LSNs).
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Server clock at sending, microseconds since 2000-01-01 UTC.
        server_time_us: i64,
        /// The payload.
        data: Bytes,
    },
    /// `k`: primary keepalive.
    Keepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Server clock at sending, microseconds since 2000-01-01 UTC.
        server_time_us: i64,
        /// The server asks for a status update ([`ReplicationStream::send_status`])
        /// now; it disconnects a client that stays silent for `wal_sender_timeout`.
        reply_requested: bool,
    },
}

/// A streaming logical replication connection, from
/// [`ReplicationConnection::start_replication`](super::ReplicationConnection::start_replication).
///
/// Read it with [`next`](Self::next) and confirm progress with
/// [`send_status`](Self::send_status); dropping it closes the socket.
pub struct ReplicationStream {
    conn: Conn,
    /// The server ended the COPY (CopyDone) or the connection (EOF, error):
    /// `next` returns `None` from then on.
    ended: bool,
    /// The socket is gone or unusable: nothing more to send or read.
    broken: bool,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("ended", &self.ended)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl ReplicationStream {
    pub(crate) fn new(conn: Conn) -> Self {
        ReplicationStream {
            conn,
            ended: false,
            broken: false,
        }
    }

    /// The next message, or `None` once the server ended the stream (CopyDone) or
    /// closed the connection cleanly.
    ///
    /// Cancel safety: cancel-safe. Bytes read are kept in the stream's buffer and a
    /// message is parsed only when complete, so using this in a `tokio::select!` loop
    /// loses no data.
    ///
    /// # Errors
    /// [`Error::Db`] when the server reports an error (the stream has then ended),
    /// [`Error::Io`] when the socket fails or closes mid-message, and
    /// [`Error::Protocol`] for malformed or unexpected messages.
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>> {
        while !self.ended {
            let read = self.conn.read().await;
            let backend = match read {
                Ok(Some(b)) => b,
                Ok(None) => {
                    (self.ended, self.broken) = (true, true);
                    return Ok(None);
                }
                Err(e) => {
                    (self.ended, self.broken) = (true, true);
                    return Err(e);
                }
            };
            match backend {
                Backend::Message(Message::CopyData(body)) => {
                    return parse_copy_data(body.into_bytes()).map(Some);
                }
                Backend::Message(Message::CopyDone) => self.ended = true,
                Backend::Message(Message::ErrorResponse(body)) => {
                    (self.ended, self.broken) = (true, true);
                    return Err(db_error(&body));
                }
                Backend::Message(Message::NoticeResponse(body)) => log_notice(&body),
                Backend::Message(Message::ParameterStatus(_)) => {}
                _ => {
                    (self.ended, self.broken) = (true, true);
                    return Err(Error::protocol(
                        "unexpected message during replication streaming",
                    ));
                }
            }
        }
        Ok(None)
    }

    /// Sends a standby status update (`r`): WAL up to `write` is received, up to
    /// `flush` durably applied (the server advances the slot's
    /// `confirmed_flush_lsn` to it and never sends transactions that committed
    /// before it again), up to `apply` applied. Pass a [`Commit::end_lsn`]
    /// (or a keepalive's `wal_end` when nothing is pending) as the positions.
    /// `reply_requested` asks the server for a keepalive in return.
    ///
    /// Cancel safety: a dropped call leaves the rest of the update queued, and it is
    /// sent before the next one; the stream is never left with a torn message.
    ///
    /// # Errors
    /// [`Error::Io`] when the socket fails.
    ///
    /// [`Commit::end_lsn`]: crate::pgoutput::Commit::end_lsn
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<()> {
        if self.broken {
            return Err(closed());
        }
        encode_status(
            self.conn.wbuf(),
            write,
            flush,
            apply,
            pg_now_us(),
            reply_requested,
        );
        self.conn.send().await
    }

    /// Ends streaming politely: sends CopyDone, reads (and drops) what the server
    /// still sends until it is ready for a new command, then terminates the session.
    /// The server releases the slot right away, so it can be used again; dropping the
    /// stream instead leaves that to the server noticing the closed socket.
    ///
    /// # Errors
    /// [`Error::Io`] when the socket fails, [`Error::Db`] when the server reports an
    /// error while finishing.
    pub async fn close(mut self) -> Result<()> {
        if self.broken {
            return Ok(());
        }
        frontend::copy_done(self.conn.wbuf());
        self.conn.send().await?;
        let mut error = None;
        loop {
            match self.conn.read().await? {
                None => break,
                Some(Backend::Message(Message::ReadyForQuery(_))) => break,
                Some(Backend::Message(Message::ErrorResponse(body))) => {
                    error = Some(db_error(&body));
                }
                Some(_) => {}
            }
        }
        frontend::terminate(self.conn.wbuf());
        self.conn.shutdown().await;
        error.map_or(Ok(()), Err)
    }
}

fn closed() -> Error {
    Error::Io(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "the replication stream has ended",
    ))
}

/// Appends a CopyData frame holding a standby status update.
pub(crate) fn encode_status(
    buf: &mut bytes::BytesMut,
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    now_us: i64,
    reply_requested: bool,
) {
    const PAYLOAD: i32 = 1 + 8 + 8 + 8 + 8 + 1;
    buf.put_u8(b'd');
    buf.put_i32(4 + PAYLOAD);
    buf.put_u8(b'r');
    buf.put_u64(write.0);
    buf.put_u64(flush.0);
    buf.put_u64(apply.0);
    buf.put_i64(now_us);
    buf.put_u8(u8::from(reply_requested));
}

/// Parses the payload of one CopyData of the replication stream.
pub(crate) fn parse_copy_data(data: Bytes) -> Result<ReplicationMessage> {
    let be64 = |at: usize| -> Option<u64> {
        let b: [u8; 8] = data.get(at..at + 8)?.try_into().ok()?;
        Some(u64::from_be_bytes(b))
    };
    let short = |what: &str| {
        Error::protocol(format!(
            "{what} message of {} bytes is too short",
            data.len()
        ))
    };
    match data.first() {
        Some(b'w') => {
            let (Some(start), Some(end), Some(time)) = (be64(1), be64(9), be64(17)) else {
                return Err(short("XLogData"));
            };
            Ok(ReplicationMessage::XLogData {
                wal_start: Lsn(start),
                wal_end: Lsn(end),
                server_time_us: time.cast_signed(),
                data: data.slice(25..),
            })
        }
        Some(b'k') => {
            let (Some(end), Some(time), Some(&reply)) = (be64(1), be64(9), data.get(17)) else {
                return Err(short("keepalive"));
            };
            if data.len() != 18 {
                return Err(Error::protocol(format!(
                    "keepalive message of {} bytes (expected 18)",
                    data.len()
                )));
            }
            Ok(ReplicationMessage::Keepalive {
                wal_end: Lsn(end),
                server_time_us: time.cast_signed(),
                reply_requested: reply != 0,
            })
        }
        Some(&other) => Err(Error::protocol(format!(
            "unknown replication message type {:?}",
            char::from(other)
        ))),
        None => Err(Error::protocol("empty CopyData in replication stream")),
    }
}
