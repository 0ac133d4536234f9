//! Decoder of the `pgoutput` logical decoding plugin's messages, protocol version 1:
//! the `data` of each XLogData message a logical walsender streams (see
//! [`crate::walsender`]).
//!
//! One XLogData payload is one message. [`decode`] turns it into a [`Message`]:
//!
//! ```text
//! Begin ─► [Origin] ─► (Relation | Type)* ─► (Insert | Update | Delete | Truncate | LogicalMessage)* ─► Commit
//! ```
//!
//! A `Relation` message describes a table (its columns, which of them form the
//! replica identity) before the first change to it in a session, and again whenever
//! it changed; row changes name the table by its OID only, so a consumer keeps a map
//! from OID to the last `Relation` seen.
//!
//! Every read is checked: truncated, malformed or trailing input is a
//! [`DecodeError`], never a panic, and no length or count field is trusted for an
//! allocation before it has been checked against the bytes actually there. Column
//! values are slices of the input [`Bytes`] (no copy).
//!
//! Format reference: PostgreSQL docs, "Logical Replication Message Formats".

use crate::lsn::Lsn;
use bytes::Bytes;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Start of a transaction (`B`).
    Begin(Begin),
    /// End of a transaction (`C`).
    Commit(Commit),
    /// The transaction came from another replication origin (`O`).
    Origin(Origin),
    /// Description of a table (`R`).
    Relation(Relation),
    /// Description of a non-built-in data type used by a following relation (`Y`).
    Type(Type),
    /// A row was inserted (`I`).
    Insert(Insert),
    /// A row was updated (`U`).
    Update(Update),
    /// A row was deleted (`D`).
    Delete(Delete),
    /// Tables were truncated (`T`).
    Truncate(Truncate),
    /// A message written with `pg_logical_emit_message` (`M`); only sent when the
    /// `messages` option of `START_REPLICATION` is on.
    LogicalMessage(LogicalMessage),
}

/// Start of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record (equals [`Commit::commit_lsn`]).
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 00:00 UTC (Postgres's epoch).
    pub commit_ts_us: i64,
    /// Transaction id.
    pub xid: u32,
}

/// End of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Flags; currently always 0.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: the position to confirm as flushed once the
    /// transaction is durably applied, so that it is not sent again.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 00:00 UTC.
    pub commit_ts_us: i64,
}

/// The replication origin a transaction came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// LSN of the commit on the origin server.
    pub commit_lsn: Lsn,
    /// Name of the origin.
    pub name: String,
}

/// Description of a table, sent before the first change to it in a session and after
/// its definition changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's OID, which row-change messages refer to.
    pub id: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// `REPLICA IDENTITY` setting: `'d'` default (primary key), `'n'` nothing,
    /// `'f'` full (all columns), `'i'` index.
    pub replica_identity: char,
    /// The published columns, in the order tuples carry them.
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Bit 0 ([`Column::KEY`]): the column is part of the replica identity.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
}

impl Column {
    /// The flag bit marking a replica identity ("key") column.
    pub const KEY: u8 = 1;

    /// Whether the column is part of the replica identity. With `REPLICA IDENTITY
    /// FULL` every column is.
    pub fn is_key(&self) -> bool {
        self.flags & Self::KEY != 0
    }
}

/// Description of a data type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type {
    /// The type's OID.
    pub id: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// A row was inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// OID of the table (see [`Relation::id`]).
    pub rel: u32,
    /// The new row.
    pub new: Tuple,
}

/// A row was updated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// OID of the table.
    pub rel: u32,
    /// The old row, when the server sends it: the old key ([`OldKind::Key`]) when the
    /// replica identity columns changed, the whole old row ([`OldKind::Old`]) with
    /// `REPLICA IDENTITY FULL`, absent otherwise (then the key is unchanged and can be
    /// read from `new`).
    pub old: Option<(OldKind, Tuple)>,
    /// The new row. Unchanged TOASTed values are [`TupleValue::UnchangedToast`].
    pub new: Tuple,
}

/// A row was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// OID of the table.
    pub rel: u32,
    /// The deleted row's key ([`OldKind::Key`]; non-key columns are null) or, with
    /// `REPLICA IDENTITY FULL`, the whole old row ([`OldKind::Old`]).
    pub old: (OldKind, Tuple),
}

/// What an old tuple in an update or delete holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// `K`: only the replica identity columns (others are null).
    Key,
    /// `O`: the whole old row (`REPLICA IDENTITY FULL`).
    Old,
}

/// Tables were truncated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Bit 0 ([`Truncate::CASCADE`]): `CASCADE`; bit 1 ([`Truncate::RESTART_IDENTITY`]):
    /// `RESTART IDENTITY`.
    pub options: u8,
    /// OIDs of the truncated tables.
    pub rels: Vec<u32>,
}

impl Truncate {
    /// Option bit: `TRUNCATE ... CASCADE`.
    pub const CASCADE: u8 = 1;
    /// Option bit: `TRUNCATE ... RESTART IDENTITY`.
    pub const RESTART_IDENTITY: u8 = 2;
}

/// A logical decoding message (`pg_logical_emit_message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Bit 0 ([`LogicalMessage::TRANSACTIONAL`]): the message is part of a transaction.
    pub flags: u8,
    /// LSN of the message.
    pub lsn: Lsn,
    /// The prefix given when emitting it.
    pub prefix: String,
    /// The content, as emitted.
    pub content: Bytes,
}

impl LogicalMessage {
    /// Flag bit: transactional message.
    pub const TRANSACTIONAL: u8 = 1;
}

/// The column values of a row, in the order of [`Relation::columns`].
pub type Tuple = Vec<TupleValue>;

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value that the server did not send (updates only).
    UnchangedToast,
    /// `t`: the value in the type's text output format.
    Text(Bytes),
    /// `b`: the value in the type's binary format (only with the `binary` option).
    Binary(Bytes),
}

impl TupleValue {
    /// The text of a [`TupleValue::Text`] value as UTF-8, if it is one and valid.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            TupleValue::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

/// Why a pgoutput message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload is empty.
    #[error("empty pgoutput message")]
    Empty,
    /// The first byte is not a protocol version 1 message type.
    #[error("unknown pgoutput message type {0:#04x}")]
    UnknownMessage(u8),
    /// The message ends before a field does.
    #[error("pgoutput message truncated: {what} at offset {offset} needs {needed} bytes, {available} left")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Offset of the field in the message.
        offset: usize,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the message.
        available: usize,
    },
    /// A string field has no terminating NUL byte.
    #[error("pgoutput message: {what} at offset {offset} has no terminating NUL")]
    UnterminatedString {
        /// The field being read.
        what: &'static str,
        /// Offset of the field in the message.
        offset: usize,
    },
    /// A string field is not UTF-8.
    #[error("pgoutput message: {what} at offset {offset} is not UTF-8")]
    InvalidUtf8 {
        /// The field being read.
        what: &'static str,
        /// Offset of the field in the message.
        offset: usize,
    },
    /// A count or length is negative or larger than the rest of the message can hold.
    #[error(
        "pgoutput message: {what} {value} at offset {offset} is invalid ({available} bytes left)"
    )]
    InvalidCount {
        /// The field being read.
        what: &'static str,
        /// The value found.
        value: i64,
        /// Offset of the field in the message.
        offset: usize,
        /// Bytes left in the message after the field.
        available: usize,
    },
    /// A one-byte marker has a value that is not allowed where it is.
    #[error("pgoutput message: unexpected {what} {found:#04x} at offset {offset}")]
    UnexpectedByte {
        /// What the byte should have been.
        what: &'static str,
        /// The byte found.
        found: u8,
        /// Offset of the byte in the message.
        offset: usize,
    },
    /// Bytes are left after the message.
    #[error("pgoutput message type {kind:?}: {count} trailing bytes")]
    TrailingBytes {
        /// The message type byte, as a character.
        kind: char,
        /// How many bytes are left over.
        count: usize,
    },
}

/// Decodes one pgoutput (protocol version 1) message: the `data` of one XLogData.
///
/// The returned values share `data`'s buffer.
///
/// # Errors
/// [`DecodeError`] when `data` is not exactly one well-formed message.
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let mut r = Reader::new(data);
    let kind = *data.first().ok_or(DecodeError::Empty)?;
    r.pos = 1;
    let msg = match kind {
        b'B' => Message::Begin(Begin {
            final_lsn: Lsn(r.u64("final LSN")?),
            commit_ts_us: r.i64("commit timestamp")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: Lsn(r.u64("commit LSN")?),
            end_lsn: Lsn(r.u64("end LSN")?),
            commit_ts_us: r.i64("commit timestamp")?,
        }),
        b'O' => Message::Origin(Origin {
            commit_lsn: Lsn(r.u64("origin commit LSN")?),
            name: r.string("origin name")?,
        }),
        b'R' => Message::Relation(relation(&mut r)?),
        b'Y' => Message::Type(Type {
            id: r.u32("type OID")?,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        }),
        b'I' => {
            let rel = r.u32("relation OID")?;
            r.expect(b'N', "new tuple marker 'N'")?;
            Message::Insert(Insert {
                rel,
                new: tuple(&mut r)?,
            })
        }
        b'U' => {
            let rel = r.u32("relation OID")?;
            let at = r.pos;
            let old = match r.u8("tuple marker")? {
                b'N' => None,
                m @ (b'K' | b'O') => {
                    let old = (old_kind(m), tuple(&mut r)?);
                    r.expect(b'N', "new tuple marker 'N'")?;
                    Some(old)
                }
                found => {
                    return Err(DecodeError::UnexpectedByte {
                        what: "tuple marker 'K', 'O' or 'N'",
                        found,
                        offset: at,
                    })
                }
            };
            Message::Update(Update {
                rel,
                old,
                new: tuple(&mut r)?,
            })
        }
        b'D' => {
            let rel = r.u32("relation OID")?;
            let at = r.pos;
            let kind = match r.u8("tuple marker")? {
                m @ (b'K' | b'O') => old_kind(m),
                found => {
                    return Err(DecodeError::UnexpectedByte {
                        what: "old tuple marker 'K' or 'O'",
                        found,
                        offset: at,
                    })
                }
            };
            Message::Delete(Delete {
                rel,
                old: (kind, tuple(&mut r)?),
            })
        }
        b'T' => {
            let n = r.count_i32("relation count", 4)?;
            let options = r.u8("truncate options")?;
            let mut rels = Vec::with_capacity(n);
            for _ in 0..n {
                rels.push(r.u32("relation OID")?);
            }
            Message::Truncate(Truncate { options, rels })
        }
        b'M' => {
            let flags = r.u8("message flags")?;
            let lsn = Lsn(r.u64("message LSN")?);
            let prefix = r.string("message prefix")?;
            let len = r.count_i32("message length", 1)?;
            Message::LogicalMessage(LogicalMessage {
                flags,
                lsn,
                prefix,
                content: r.bytes(len, "message content")?,
            })
        }
        other => return Err(DecodeError::UnknownMessage(other)),
    };
    if r.remaining() > 0 {
        return Err(DecodeError::TrailingBytes {
            kind: char::from(kind),
            count: r.remaining(),
        });
    }
    Ok(msg)
}

fn old_kind(marker: u8) -> OldKind {
    if marker == b'K' {
        OldKind::Key
    } else {
        OldKind::Old
    }
}

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = r.u32("relation OID")?;
    let namespace = r.string("relation namespace")?;
    let name = r.string("relation name")?;
    let replica_identity = char::from(r.u8("replica identity")?);
    // flags (1) + name (at least its NUL, 1) + type OID (4) + type modifier (4).
    let n = r.count_i16("column count", 10)?;
    let mut columns = Vec::with_capacity(n);
    for _ in 0..n {
        columns.push(Column {
            flags: r.u8("column flags")?,
            name: r.string("column name")?,
            type_oid: r.u32("column type OID")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn tuple(r: &mut Reader<'_>) -> Result<Tuple, DecodeError> {
    // Each column takes at least its kind byte.
    let n = r.count_i16("tuple column count", 1)?;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let at = r.pos;
        let value = match r.u8("column kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => {
                let len = r.count_i32("column value length", 1)?;
                TupleValue::Text(r.bytes(len, "column value")?)
            }
            b'b' => {
                let len = r.count_i32("column value length", 1)?;
                TupleValue::Binary(r.bytes(len, "column value")?)
            }
            found => {
                return Err(DecodeError::UnexpectedByte {
                    what: "column kind 'n', 'u', 't' or 'b'",
                    found,
                    offset: at,
                })
            }
        };
        values.push(value);
    }
    Ok(values)
}

/// A checked cursor over one message.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The next `n` bytes, advancing past them.
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let buf: &'a [u8] = self.buf;
        match self
            .pos
            .checked_add(n)
            .and_then(|end| buf.get(self.pos..end))
        {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(DecodeError::Truncated {
                what,
                offset: self.pos,
                needed: n,
                available: self.remaining(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.array(what).map(i16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    fn expect(&mut self, want: u8, what: &'static str) -> Result<(), DecodeError> {
        let at = self.pos;
        match self.u8(what)? {
            b if b == want => Ok(()),
            found => Err(DecodeError::UnexpectedByte {
                what,
                found,
                offset: at,
            }),
        }
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let at = self.pos;
        let rest = self.buf.get(at..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::UnterminatedString { what, offset: at })?;
        let s = self.take(len, what)?;
        self.pos += 1; // the NUL, known to be there
        std::str::from_utf8(s)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { what, offset: at })
    }

    /// `n` bytes as a slice of the message buffer.
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, what)?;
        Ok(self.buf.slice(start..self.pos))
    }

    /// An `Int16` count of items that take at least `min_item` bytes each, checked
    /// against the bytes left so it is safe to allocate for.
    fn count_i16(&mut self, what: &'static str, min_item: usize) -> Result<usize, DecodeError> {
        let at = self.pos;
        let v = self.i16(what)?;
        self.check_count(what, i64::from(v), at, min_item)
    }

    /// As [`count_i16`](Self::count_i16), for an `Int32` count or length.
    fn count_i32(&mut self, what: &'static str, min_item: usize) -> Result<usize, DecodeError> {
        let at = self.pos;
        let v = self.i32(what)?;
        self.check_count(what, i64::from(v), at, min_item)
    }

    fn check_count(
        &self,
        what: &'static str,
        value: i64,
        offset: usize,
        min_item: usize,
    ) -> Result<usize, DecodeError> {
        let available = self.remaining();
        match usize::try_from(value) {
            Ok(n) if n.saturating_mul(min_item) <= available => Ok(n),
            _ => Err(DecodeError::InvalidCount {
                what,
                value,
                offset,
                available,
            }),
        }
    }
}

#[cfg(test)]
#[path = "pgoutput/pgoutput_test.rs"]
mod tests;
