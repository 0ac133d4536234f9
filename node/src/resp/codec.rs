//! RESP (REdis Serialization Protocol) request parser and reply encoder for the
//! Redis-compatible front end.
//!
//! # Requests
//! [`parse_command`] takes one command off the front of a connection's read buffer.
//! It accepts what `redis-server` accepts:
//! - RESP arrays of bulk strings, `*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`. Each element must be
//!   a bulk string. Counts `<= 0` (`*0`, `*-1`) carry no command and are skipped.
//! - Inline commands (a line that does not start with `*`), `PING\r\n` or `set a b\n`.
//!   They are split the way `sdssplitargs` splits them: on spaces and tabs, with double
//!   quotes (`\n \r \t \b \a \\ \" \xHH` escapes), single quotes (`\'`), and the
//!   "unbalanced quotes" error. The line ends at a NUL byte, as in Redis. Empty lines are
//!   skipped.
//!
//! The errors ([`ProtocolError`]) carry Redis's error text. After one, the server replies
//! with it and closes the connection, as Redis does. Malformed input is refused as soon
//! as it can no longer become a valid command, so the parser never waits on garbage.
//!
//! # Bounds
//! [`Limits`] bounds a bulk string, the number of arguments, and the length of an
//! inline line or a header line. The parser never reserves or allocates by a declared
//! length: `*2147483647` or `$999999999` costs nothing until the bytes arrive. A caller
//! grows its read buffer with [`needed_hint`], which at most doubles the buffer per
//! read. Arguments are zero-copy [`Bytes`] slices of the consumed region of the read
//! buffer. Only inline arguments with quotes are copied.
//!
//! The parser keeps no state between calls. An incomplete command is scanned again from
//! its start on the next call. Bulk payloads are skipped by their declared length and
//! never searched, so a rescan costs O(arguments), not O(bytes). For example, a 16 MiB
//! `SET` arriving in 64 KiB reads costs about 256 scans of 4 short header lines.
//!
//! # Replies
//! [`Reply`] is one reply value. [`Reply::encode`] writes it in RESP2 or RESP3
//! ([`Protocol`]), with RESP3-only types downgraded for RESP2 the way Redis downgrades
//! them. It reserves the exact encoded size once, and formats integers and doubles on
//! the stack without allocating.
//
// Why hand-written rather than a crate (e.g. `redis-protocol`): this front end needs,
// all together, zero-copy arguments sliced out of the connection's own `BytesMut`,
// Redis's exact error strings (clients and redis-benchmark compare them), Redis's
// inline-command quoting rules, and buffers bounded against hostile length headers.
// No available crate gives all of these. The wire format is small enough that
// owning it costs less than adapting one.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Default [`Limits::max_bulk`]: 16 MiB of value plus 64 KiB of slack.
pub const DEFAULT_MAX_BULK: usize = 16 * 1024 * 1024 + 64 * 1024;
/// Default [`Limits::max_args`] (Redis 6's hard limit).
pub const DEFAULT_MAX_ARGS: usize = 1024 * 1024;
/// Default [`Limits::max_inline`] (Redis's `PROTO_INLINE_MAX_SIZE`).
pub const DEFAULT_MAX_INLINE: usize = 64 * 1024;

/// [`needed_hint`] never asks for more than this, or the buffer's current length if
/// that is larger. So a declared but unsent length can at most double a read buffer.
const HINT_FLOOR: usize = 64 * 1024;

/// Redis refuses multibulk counts above `INT_MAX`, whatever the configured limit.
const MAX_COUNT: u64 = i32::MAX as u64;

/// A hard cap on a bulk length, whatever the configured limit, so that offset
/// arithmetic (`start + len + 2`) cannot overflow.
const MAX_LEN: u64 = (isize::MAX as u64) / 2;

/// Bounds of one connection's parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest bulk string argument accepted (`$<len>`). Anything larger is a
    /// [`ProtocolError::InvalidBulkLength`], as with Redis's `proto-max-bulk-len`.
    /// It bounds what one argument can make the connection buffer.
    pub max_bulk: usize,
    /// The most arguments one command may have (`*<n>`). More is a
    /// [`ProtocolError::InvalidMultibulkLength`]. It bounds the argument vector.
    pub max_args: usize,
    /// The longest inline command line (no `*` prefix) and the longest header line
    /// (`*123`, `$45`), both without their line ending. Anything longer is
    /// [`ProtocolError::TooBigInline`], [`ProtocolError::TooBigMultibulkCount`] or
    /// [`ProtocolError::TooBigBulkCount`]. This way a line that never ends cannot grow
    /// the buffer forever.
    pub max_inline: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk: DEFAULT_MAX_BULK,
            max_args: DEFAULT_MAX_ARGS,
            max_inline: DEFAULT_MAX_INLINE,
        }
    }
}

/// A request the connection cannot go on from.
///
/// `Display` gives the Redis error text without the leading `-` and the trailing CRLF,
/// e.g. `ERR Protocol error: invalid bulk length`. After one, the server replies with
/// it ([`ProtocolError::reply`]) and closes the connection, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// `*<n>` is not a canonical integer, or `n` exceeds [`Limits::max_args`].
    #[error("ERR Protocol error: invalid multibulk length")]
    InvalidMultibulkLength,
    /// `$<n>` is not a canonical non-negative integer, or `n` exceeds
    /// [`Limits::max_bulk`].
    #[error("ERR Protocol error: invalid bulk length")]
    InvalidBulkLength,
    /// An array element that is not a bulk string (a nested array, `+`, `:`, ...).
    #[error("ERR Protocol error: expected '$', got '{}'", char::from(*.got))]
    ExpectedBulk {
        /// The element's first byte. It is shown as the Latin-1 character of that byte.
        got: u8,
    },
    /// A bulk payload that is not followed by `\r\n`. Redis skips two bytes there
    /// without looking. This parser refuses a frame whose length does not match its
    /// payload.
    #[error("ERR Protocol error: bulk string not terminated by CRLF")]
    UnterminatedBulk,
    /// An inline line longer than [`Limits::max_inline`].
    #[error("ERR Protocol error: too big inline request")]
    TooBigInline,
    /// A `*<n>` line longer than [`Limits::max_inline`].
    #[error("ERR Protocol error: too big mbulk count string")]
    TooBigMultibulkCount,
    /// A `$<n>` line longer than [`Limits::max_inline`].
    #[error("ERR Protocol error: too big bulk count string")]
    TooBigBulkCount,
    /// An inline line with an unterminated quote, or a closing quote followed by
    /// something other than a space.
    #[error("ERR Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    /// A well-formed `$<len>` header over [`Limits::max_bulk`]. Unlike the other
    /// errors the connection can go on: [`parse_command`] consumed the command up to
    /// and including that header (`buf` starts at the bulk's payload), and a
    /// [`Discard`] skips the rest of it (the payload, then the `rest` arguments after
    /// it) as it arrives; the server then answers an error naming the limit.
    #[error(
        "ERR Protocol error: argument {arg} of {len} bytes is over the {limit}-byte bulk limit"
    )]
    BulkTooLarge {
        /// The declared length.
        len: u64,
        /// The argument's index (0 is the command name).
        arg: usize,
        /// Arguments after it, still to skip.
        rest: usize,
        /// [`Limits::max_bulk`].
        limit: usize,
        /// The command name, when the oversized argument is not the name itself.
        command: Option<Bytes>,
    },
}

impl ProtocolError {
    /// Whether the connection can go on after it ([`ProtocolError::BulkTooLarge`]).
    pub fn is_recoverable(&self) -> bool {
        matches!(self, ProtocolError::BulkTooLarge { .. })
    }

    /// The error reply to send before closing the connection.
    pub fn reply(&self) -> Reply {
        Reply::Error(Cow::Owned(self.to_string()))
    }
}

impl From<ProtocolError> for Reply {
    fn from(err: ProtocolError) -> Reply {
        err.reply()
    }
}

/// Parses one command from the front of `buf`.
///
/// - `Ok(Some(args))`: a command. Its bytes were consumed from `buf`, and `args` are
///   zero-copy slices of them.
/// - `Ok(None)`: more bytes are needed. No part of a command was consumed, so the caller
///   reads more and calls again. Leading empty inline lines and `*0`/`*-1` frames, which
///   carry no command, may have been dropped.
///
/// Empty commands are skipped, and parsing goes on with what follows in the same call.
/// Call it in a loop to drain a pipelined buffer.
///
/// # Errors
/// A [`ProtocolError`] when the front of `buf` is not, and cannot become, a valid
/// command within `limits`. The connection should reply with it and close. `buf` is
/// then left in an unspecified state. Except [`ProtocolError::BulkTooLarge`]: `buf`
/// then starts at the oversized payload, for a [`Discard`].
pub fn parse_command(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    loop {
        match scan(buf, limits)? {
            Frame::Partial { .. } => return Ok(None),
            Frame::Skip(len) => buf.advance(len),
            Frame::Oversized {
                payload,
                first,
                len,
                arg,
                rest,
            } => {
                let head = buf.split_to(payload).freeze();
                let command = (arg > 0)
                    .then(|| array_args(head, first, 1).pop())
                    .flatten();
                return Err(ProtocolError::BulkTooLarge {
                    len,
                    arg,
                    rest,
                    limit: limits.max_bulk,
                    command,
                });
            }
            Frame::Array { len, first, argc } => {
                let frame = buf.split_to(len).freeze();
                return Ok(Some(array_args(frame, first, argc)));
            }
            Frame::Inline { len, line } => {
                let frame = buf.split_to(len).freeze();
                let args = split_inline(&frame, line)?;
                if !args.is_empty() {
                    return Ok(Some(args));
                }
            }
        }
    }
}

/// How many bytes are worth reserving in `buf` before the next read.
///
/// Call it after [`parse_command`] returned `Ok(None)`. The result is the number of
/// bytes the front command still needs, as far as the headers in `buf` tell (at least 1).
/// It is capped at `max(buf.len(), 64 KiB)`, so a length that is declared but not sent
/// can at most double the buffer. It returns 0 if `buf` already holds a command or an
/// error, so parse again. Callers usually reserve `max(hint, their read size)`.
pub fn needed_hint(buf: &[u8], limits: &Limits) -> usize {
    match scan(buf, limits) {
        Ok(Frame::Partial { missing }) => missing.clamp(1, buf.len().max(HINT_FLOOR)),
        _ => 0,
    }
}

/// Skips the rest of a command after [`ProtocolError::BulkTooLarge`], as its bytes
/// arrive: the oversized payload and its CRLF, then the arguments after it (each
/// `$<len>\r\n<payload>\r\n`, of any length). It keeps only counters, so skipping
/// costs no memory whatever the sizes; the caller bounds it with
/// [`Discard::declared`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discard {
    /// Payload bytes of the current argument still to skip.
    payload: u64,
    /// CRLF bytes after that payload still to check (2, 1 or 0).
    crlf: u8,
    /// Arguments after the current one still to skip.
    rest: usize,
    /// Payload bytes declared so far (the oversized one included).
    declared: u64,
}

impl Discard {
    /// Starts skipping after a [`ProtocolError::BulkTooLarge`] of `len` bytes with
    /// `rest` arguments after it.
    pub fn new(len: u64, rest: usize) -> Self {
        Discard {
            payload: len,
            crlf: 2,
            rest,
            declared: len,
        }
    }

    /// Payload bytes the skipped command declared so far.
    pub fn declared(&self) -> u64 {
        self.declared
    }

    /// Consumes what it can of the command from the front of `buf`: `Ok(true)` once
    /// the whole command is skipped (what follows in `buf` is the next command),
    /// `Ok(false)` when more bytes are needed.
    ///
    /// # Errors
    /// A [`ProtocolError`] when the rest of the command is malformed (the connection
    /// then closes, as for any protocol error).
    pub fn feed(&mut self, buf: &mut BytesMut, limits: &Limits) -> Result<bool, ProtocolError> {
        loop {
            if self.payload > 0 {
                let n = usize::try_from(self.payload).map_or(buf.len(), |p| p.min(buf.len()));
                buf.advance(n);
                self.payload -= n as u64;
                if self.payload > 0 {
                    return Ok(false);
                }
            }
            while self.crlf > 0 {
                let Some(&b) = buf.first() else {
                    return Ok(false);
                };
                let want = if self.crlf == 2 { b'\r' } else { b'\n' };
                if b != want {
                    return Err(ProtocolError::UnterminatedBulk);
                }
                buf.advance(1);
                self.crlf -= 1;
            }
            if self.rest == 0 {
                return Ok(true);
            }
            match buf.first() {
                None => return Ok(false),
                Some(b'$') => {}
                Some(&got) => return Err(ProtocolError::ExpectedBulk { got }),
            }
            let Some((len, start)) = read_len(buf, 0, Header::Bulk, MAX_LEN, limits.max_inline)?
            else {
                return Ok(false);
            };
            buf.advance(start);
            self.payload = len as u64;
            self.declared = self.declared.saturating_add(len as u64);
            self.crlf = 2;
            self.rest -= 1;
        }
    }
}

/// What the front of a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// An incomplete command that still needs at least `missing` bytes.
    Partial { missing: usize },
    /// `len` bytes that carry no command (`*0`, `*-1`).
    Skip(usize),
    /// A whole array command: `len` bytes, `argc` bulk strings, the first at `first`.
    Array {
        len: usize,
        first: usize,
        argc: usize,
    },
    /// A whole inline line: `len` bytes with the line ending, `line` without it.
    Inline { len: usize, line: usize },
    /// A well-formed bulk header over `max_bulk`: argument `arg` declares `len` bytes,
    /// its payload starts at `payload`, `rest` arguments follow it; the first argument
    /// starts at `first`.
    Oversized {
        payload: usize,
        first: usize,
        len: u64,
        arg: usize,
        rest: usize,
    },
}

fn scan(buf: &[u8], limits: &Limits) -> Result<Frame, ProtocolError> {
    match buf.first() {
        None => Ok(Frame::Partial { missing: 1 }),
        Some(b'*') => scan_array(buf, limits),
        Some(_) => scan_inline(buf, limits),
    }
}

fn scan_inline(buf: &[u8], limits: &Limits) -> Result<Frame, ProtocolError> {
    let window = &buf[..buf.len().min(limits.max_inline.saturating_add(1))];
    match find_byte(window, b'\n') {
        Some(nl) => {
            let line = if nl > 0 && buf[nl - 1] == b'\r' {
                nl - 1
            } else {
                nl
            };
            Ok(Frame::Inline { len: nl + 1, line })
        }
        None if buf.len() > limits.max_inline => Err(ProtocolError::TooBigInline),
        None => Ok(Frame::Partial { missing: 1 }),
    }
}

/// Validates an array frame, skipping each bulk payload by its length, and reports
/// where it ends. It allocates nothing.
fn scan_array(buf: &[u8], limits: &Limits) -> Result<Frame, ProtocolError> {
    let max_args = u64::try_from(limits.max_args).map_or(MAX_COUNT, |n| n.min(MAX_COUNT));
    let max_bulk = u64::try_from(limits.max_bulk).map_or(MAX_LEN, |n| n.min(MAX_LEN));
    // Headers are read up to MAX_LEN: a well-formed one over `max_bulk` is an
    // `Oversized` frame (skipped, answered, the connection goes on), not garbage.
    let Some((argc, first)) = read_len(buf, 0, Header::Multibulk, max_args, limits.max_inline)?
    else {
        return Ok(Frame::Partial { missing: 1 });
    };
    if argc == 0 {
        return Ok(Frame::Skip(first));
    }
    let mut pos = first;
    for arg in 0..argc {
        match buf.get(pos) {
            None => return Ok(Frame::Partial { missing: 1 }),
            Some(b'$') => {}
            Some(&got) => return Err(ProtocolError::ExpectedBulk { got }),
        }
        let Some((len, start)) = read_len(buf, pos, Header::Bulk, MAX_LEN, limits.max_inline)?
        else {
            return Ok(Frame::Partial { missing: 1 });
        };
        if len as u64 > max_bulk {
            return Ok(Frame::Oversized {
                payload: start,
                first,
                len: len as u64,
                arg,
                rest: argc - arg - 1,
            });
        }
        // Cannot overflow: `start <= buf.len() <= isize::MAX` and `len <= MAX_LEN`.
        let end = start + len;
        match buf.get(end..end + 2) {
            Some([b'\r', b'\n']) => pos = end + 2,
            Some(_) => return Err(ProtocolError::UnterminatedBulk),
            None => {
                if buf.get(end).is_some_and(|&b| b != b'\r') {
                    return Err(ProtocolError::UnterminatedBulk);
                }
                return Ok(Frame::Partial {
                    missing: end + 2 - buf.len(),
                });
            }
        }
    }
    Ok(Frame::Array {
        len: pos,
        first,
        argc,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Header {
    /// `*<count>`: a negative count is allowed (and means "no command").
    Multibulk,
    /// `$<len>`.
    Bulk,
}

impl Header {
    fn invalid(self) -> ProtocolError {
        match self {
            Header::Multibulk => ProtocolError::InvalidMultibulkLength,
            Header::Bulk => ProtocolError::InvalidBulkLength,
        }
    }

    fn too_big(self) -> ProtocolError {
        match self {
            Header::Multibulk => ProtocolError::TooBigMultibulkCount,
            Header::Bulk => ProtocolError::TooBigBulkCount,
        }
    }
}

/// Reads the header line whose type byte (`*` or `$`) is at `start`.
///
/// It returns `Ok(Some((value, next)))`, where a negative count reads as 0 and `next`
/// is the index after the `\r\n`. It returns `Ok(None)` if the line is incomplete. The
/// number follows Redis's `string2ll`: no sign other than `-`, no leading zeros, no
/// `-0`, no empty number. Unlike Redis, the line must end in `\r\n`, not `\r` and any
/// byte. The number is refused as soon as a byte or its value rules it out.
#[inline]
fn read_len(
    buf: &[u8],
    start: usize,
    header: Header,
    max: u64,
    max_line: usize,
) -> Result<Option<(usize, usize)>, ProtocolError> {
    let mut i = start + 1;
    let mut value: u64 = 0;
    let mut digits = 0usize;
    let mut negative = false;
    loop {
        let Some(&b) = buf.get(i) else {
            return if i - start > max_line {
                Err(header.too_big())
            } else {
                Ok(None)
            };
        };
        match b {
            b'0'..=b'9' => {
                let leading_zero = digits > 0 && value == 0;
                let minus_zero = negative && digits == 0 && b == b'0';
                if leading_zero || minus_zero {
                    return Err(header.invalid());
                }
                value = value
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(u64::from(b - b'0')))
                    .ok_or_else(|| header.invalid())?;
                let bound = if negative { 1 << 63 } else { max };
                if value > bound {
                    return Err(header.invalid());
                }
                digits += 1;
            }
            b'-' if header == Header::Multibulk && i == start + 1 => negative = true,
            b'\r' => {
                if digits == 0 {
                    return Err(header.invalid());
                }
                return match buf.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') if negative => Ok(Some((0, i + 2))),
                    Some(b'\n') => {
                        let value = usize::try_from(value).map_err(|_| header.invalid())?;
                        Ok(Some((value, i + 2)))
                    }
                    Some(_) => Err(header.invalid()),
                };
            }
            _ => return Err(header.invalid()),
        }
        i += 1;
    }
}

/// Slices the arguments out of an array frame that [`scan_array`] validated.
///
/// Each slice costs a reference-count increment. The last argument takes over the
/// frame's own reference, which saves an increment and a decrement per command.
fn array_args(mut frame: Bytes, mut pos: usize, argc: usize) -> Vec<Bytes> {
    let mut args = Vec::with_capacity(argc);
    for n in 1..=argc {
        // Validated: `frame[pos..]` is `$<digits>\r\n<payload>\r\n`.
        let mut i = pos + 1;
        let mut len = 0usize;
        while let Some(&d @ b'0'..=b'9') = frame.get(i) {
            len = len * 10 + usize::from(d - b'0');
            i += 1;
        }
        let start = i + 2;
        if n == argc {
            frame.truncate(start + len);
            frame.advance(start);
            args.push(frame);
            break;
        }
        args.push(frame.slice(start..start + len));
        pos = start + len + 2;
    }
    args
}

/// C's `isspace`: what separates inline arguments and may follow a closing quote.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// What ends an unquoted inline argument. `\v` and `\f` do not, as in `sdssplitargs`.
fn is_token_end(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Splits the first `line` bytes of `frame` into arguments the way `sdssplitargs`
/// does. Arguments without quotes are zero-copy slices of `frame`.
fn split_inline(frame: &Bytes, line: usize) -> Result<Vec<Bytes>, ProtocolError> {
    let s = &frame[..line];
    // `sdssplitargs` works on a C string: a NUL byte ends the line.
    let s = &s[..find_byte(s, 0).unwrap_or(s.len())];
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while s.get(i).copied().is_some_and(is_space) {
            i += 1;
        }
        if i >= s.len() {
            return Ok(args);
        }
        let start = i;
        while s
            .get(i)
            .is_some_and(|&b| !is_token_end(b) && b != b'"' && b != b'\'')
        {
            i += 1;
        }
        if matches!(s.get(i), Some(b'"' | b'\'')) {
            let (arg, next) = quoted_arg(s, start, i)?;
            args.push(Bytes::from(arg));
            i = next;
        } else {
            args.push(frame.slice(start..i));
            i += 1; // the separator
        }
    }
}

/// The rest of an inline argument that began at `start` and meets a quote at `i`.
/// It returns the argument and the index after it.
fn quoted_arg(s: &[u8], start: usize, mut i: usize) -> Result<(Vec<u8>, usize), ProtocolError> {
    #[derive(Clone, Copy)]
    enum Mode {
        Plain,
        Double,
        Single,
    }
    // A closing quote must be followed by a space or the end of the line.
    let closing = |i: usize| match s.get(i + 1) {
        Some(&next) if !is_space(next) => Err(ProtocolError::UnbalancedQuotes),
        _ => Ok((i + 1).min(s.len())),
    };
    let mut arg = s[start..i].to_vec();
    let mut mode = Mode::Plain;
    loop {
        let b = s.get(i).copied();
        match mode {
            Mode::Plain => match b {
                None => return Ok((arg, i)),
                Some(c) if is_token_end(c) => return Ok((arg, i + 1)),
                Some(b'"') => mode = Mode::Double,
                Some(b'\'') => mode = Mode::Single,
                Some(c) => arg.push(c),
            },
            Mode::Double => match b {
                None => return Err(ProtocolError::UnbalancedQuotes),
                Some(b'\\') => match (s.get(i + 1), s.get(i + 2), s.get(i + 3)) {
                    (Some(b'x'), Some(&hi), Some(&lo))
                        if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() =>
                    {
                        arg.push((hex_value(hi) << 4) | hex_value(lo));
                        i += 3;
                    }
                    (Some(&escaped), _, _) => {
                        arg.push(match escaped {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 0x08,
                            b'a' => 0x07,
                            other => other,
                        });
                        i += 1;
                    }
                    // A backslash ending the line: the quote is never closed.
                    (None, _, _) => arg.push(b'\\'),
                },
                Some(b'"') => return Ok((arg, closing(i)?)),
                Some(c) => arg.push(c),
            },
            Mode::Single => match b {
                None => return Err(ProtocolError::UnbalancedQuotes),
                Some(b'\\') if s.get(i + 1) == Some(&b'\'') => {
                    arg.push(b'\'');
                    i += 1;
                }
                Some(b'\'') => return Ok((arg, closing(i)?)),
                Some(c) => arg.push(c),
            },
        }
        i += 1;
    }
}

fn hex_value(h: u8) -> u8 {
    match h {
        b'0'..=b'9' => h - b'0',
        b'a'..=b'f' => h - b'a' + 10,
        b'A'..=b'F' => h - b'A' + 10,
        _ => 0, // callers check `is_ascii_hexdigit` first
    }
}

/// The index of the first `needle` in `hay`. It tests a word (8 bytes) at a time. Only
/// inline lines and NUL checks use it, never bulk payloads.
fn find_byte(hay: &[u8], needle: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let pattern = LO * u64::from(needle);
    let (words, tail) = hay.as_chunks::<8>();
    for (n, word) in words.iter().enumerate() {
        let x = u64::from_le_bytes(*word) ^ pattern;
        // The lowest set bit marks the first zero byte of `x` (higher bits may be
        // false positives, but never the lowest one).
        let zero = x.wrapping_sub(LO) & !x & HI;
        if zero != 0 {
            return Some(n * 8 + (zero.trailing_zeros() / 8) as usize);
        }
    }
    let base = words.len() * 8;
    tail.iter().position(|&b| b == needle).map(|p| base + p)
}

/// The protocol a connection speaks (`HELLO 3` switches to RESP3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// RESP2, what every connection starts with.
    #[default]
    Resp2,
    /// RESP3, after `HELLO 3`.
    Resp3,
}

/// One reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `+OK`.
    Ok,
    /// A simple string `+...`. CR and LF are replaced by spaces when encoded.
    Simple(Cow<'static, str>),
    /// An error. The text is the whole message, e.g. `ERR unknown command 'foo', with
    /// args beginning with: ` or `WRONGTYPE ...`, encoded `-<text>\r\n` with CR and LF
    /// replaced by spaces.
    Error(Cow<'static, str>),
    /// An integer `:<n>`.
    Int(i64),
    /// A bulk string `$<len>`.
    Bulk(Bytes),
    /// A null bulk string: `$-1` in RESP2, `_` in RESP3.
    Nil,
    /// A null array: `*-1` in RESP2, `_` in RESP3.
    NilArray,
    /// An array `*<n>`.
    Array(Vec<Reply>),
    /// A RESP3 map `%<n>`. In RESP2 it is a flat array of `2n` elements.
    Map(Vec<(Reply, Reply)>),
    /// A RESP3 set `~<n>`. In RESP2 it is an array.
    Set(Vec<Reply>),
    /// A RESP3 double `,<d>`. In RESP2 it is a bulk string of the same text. The text
    /// is what Redis prints: `1.5`, `3`, `-0`, `1e+20`, `inf`, `nan`.
    Double(f64),
    /// A RESP3 boolean `#t`/`#f`. In RESP2 it is the integer 1 or 0.
    Bool(bool),
    /// A RESP3 verbatim string `=<len>\r\ntxt:<text>`, which INFO uses. In RESP2 it is
    /// a bulk string of the text.
    Verbatim(Bytes),
    /// Already-encoded bytes, appended as they are. An example is a reply forwarded
    /// from another node in this connection's protocol.
    Raw(Bytes),
}

impl Reply {
    /// An error reply. `text` is the whole message, e.g. `"ERR syntax error"`.
    pub fn error(text: impl Into<Cow<'static, str>>) -> Reply {
        Reply::Error(text.into())
    }

    /// A simple string reply.
    pub fn simple(text: impl Into<Cow<'static, str>>) -> Reply {
        Reply::Simple(text.into())
    }

    /// A bulk string reply.
    pub fn bulk(value: impl Into<Bytes>) -> Reply {
        Reply::Bulk(value.into())
    }

    /// Appends the encoding of this reply to `out`, reserving the exact size once.
    pub fn encode(&self, proto: Protocol, out: &mut BytesMut) {
        out.reserve(self.encoded_len(proto));
        self.write(proto, out);
    }

    /// The exact number of bytes [`Reply::encode`] appends.
    pub fn encoded_len(&self, proto: Protocol) -> usize {
        let resp3 = proto == Protocol::Resp3;
        match self {
            Reply::Ok => 5,
            Reply::Simple(text) | Reply::Error(text) => text.len() + 3,
            Reply::Int(n) => usize::from(*n < 0) + dec_len(n.unsigned_abs()) + 3,
            Reply::Bulk(value) => bulk_len(value.len()),
            Reply::Nil | Reply::NilArray => {
                if resp3 {
                    3
                } else {
                    5
                }
            }
            Reply::Array(items) | Reply::Set(items) => {
                header_len(items.len()) + items.iter().map(|r| r.encoded_len(proto)).sum::<usize>()
            }
            Reply::Map(pairs) => {
                let count = if resp3 { pairs.len() } else { pairs.len() * 2 };
                header_len(count)
                    + pairs
                        .iter()
                        .map(|(k, v)| k.encoded_len(proto) + v.encoded_len(proto))
                        .sum::<usize>()
            }
            Reply::Double(d) => {
                let text = format_double(*d);
                if resp3 {
                    text.len + 3
                } else {
                    bulk_len(text.len)
                }
            }
            Reply::Bool(_) => 4,
            Reply::Verbatim(text) => {
                if resp3 {
                    bulk_len(text.len() + 4)
                } else {
                    bulk_len(text.len())
                }
            }
            Reply::Raw(raw) => raw.len(),
        }
    }

    fn write(&self, proto: Protocol, out: &mut BytesMut) {
        let resp3 = proto == Protocol::Resp3;
        match self {
            Reply::Ok => out.put_slice(b"+OK\r\n"),
            Reply::Simple(text) => put_line(out, b'+', text),
            Reply::Error(text) => put_line(out, b'-', text),
            Reply::Int(n) => put_number_line(out, b':', *n < 0, n.unsigned_abs()),
            Reply::Bulk(value) => put_bulk(out, value),
            Reply::Nil => out.put_slice(if resp3 { b"_\r\n" } else { b"$-1\r\n" }),
            Reply::NilArray => out.put_slice(if resp3 { b"_\r\n" } else { b"*-1\r\n" }),
            Reply::Array(items) => {
                put_header(out, b'*', items.len());
                items.iter().for_each(|r| r.write(proto, out));
            }
            Reply::Set(items) => {
                put_header(out, if resp3 { b'~' } else { b'*' }, items.len());
                items.iter().for_each(|r| r.write(proto, out));
            }
            Reply::Map(pairs) => {
                if resp3 {
                    put_header(out, b'%', pairs.len());
                } else {
                    put_header(out, b'*', pairs.len() * 2);
                }
                for (k, v) in pairs {
                    k.write(proto, out);
                    v.write(proto, out);
                }
            }
            Reply::Double(d) => {
                let text = format_double(*d);
                if resp3 {
                    out.put_u8(b',');
                    out.put_slice(text.as_bytes());
                    out.put_slice(b"\r\n");
                } else {
                    put_bulk(out, text.as_bytes());
                }
            }
            Reply::Bool(b) => out.put_slice(match (resp3, *b) {
                (true, true) => b"#t\r\n",
                (true, false) => b"#f\r\n",
                (false, true) => b":1\r\n",
                (false, false) => b":0\r\n",
            }),
            Reply::Verbatim(text) => {
                if resp3 {
                    put_header(out, b'=', text.len() + 4);
                    out.put_slice(b"txt:");
                    out.put_slice(text);
                    out.put_slice(b"\r\n");
                } else {
                    put_bulk(out, text);
                }
            }
            Reply::Raw(raw) => out.put_slice(raw),
        }
    }
}

/// Encodes `reply` into a fresh buffer of exactly its size.
pub fn encode_to_bytes(reply: &Reply, proto: Protocol) -> Bytes {
    let mut out = BytesMut::with_capacity(reply.encoded_len(proto));
    reply.write(proto, &mut out);
    out.freeze()
}

/// The number of decimal digits of `n`.
fn dec_len(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |l| l as usize + 1)
}

fn header_len(n: usize) -> usize {
    1 + dec_len(n as u64) + 2
}

fn bulk_len(n: usize) -> usize {
    header_len(n) + n + 2
}

/// Writes `<prefix>[-]<n>\r\n` in one `put_slice`, formatted on the stack.
#[inline]
fn put_number_line(out: &mut BytesMut, prefix: u8, negative: bool, mut n: u64) {
    // The prefix, a sign, 20 digits (u64::MAX) and CRLF.
    let mut buf = [0u8; 24];
    let mut i = buf.len() - 2;
    buf[i..].copy_from_slice(b"\r\n");
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if negative {
        i -= 1;
        buf[i] = b'-';
    }
    i -= 1;
    buf[i] = prefix;
    out.put_slice(&buf[i..]);
}

#[inline]
fn put_header(out: &mut BytesMut, prefix: u8, n: usize) {
    if n < 10 {
        out.put_slice(&[prefix, b'0' + n as u8, b'\r', b'\n']);
    } else {
        put_number_line(out, prefix, false, n as u64);
    }
}

#[inline]
fn put_bulk(out: &mut BytesMut, value: &[u8]) {
    put_header(out, b'$', value.len());
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// Writes `<prefix><text>\r\n`, with CR and LF in `text` replaced by spaces.
fn put_line(out: &mut BytesMut, prefix: u8, text: &str) {
    out.put_u8(prefix);
    let bytes = text.as_bytes();
    if bytes.iter().any(|&b| b == b'\r' || b == b'\n') {
        out.extend(
            bytes
                .iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
    } else {
        out.put_slice(bytes);
    }
    out.put_slice(b"\r\n");
}

/// A short text formatted on the stack.
struct StackText {
    buf: [u8; 40],
    len: usize,
}

impl StackText {
    fn new() -> Self {
        StackText {
            buf: [0; 40],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn push(&mut self, bytes: &[u8]) {
        // Callers stay far below the capacity (at most 25 bytes). Anything beyond it
        // would be dropped rather than panic.
        let end = (self.len + bytes.len()).min(self.buf.len());
        let n = end - self.len;
        self.buf[self.len..end].copy_from_slice(&bytes[..n]);
        self.len = end;
    }
}

impl fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.len + s.len() > self.buf.len() {
            return Err(fmt::Error);
        }
        self.push(s.as_bytes());
        Ok(())
    }
}

/// A double as Redis prints it (`d2string`). `nan`, `inf`, `-inf`, `0` and `-0` are
/// literal. An integral value within ±2^62 prints as an integer. Any other value
/// prints like `fpconv_dtoa`: the shortest round-trip digits, plain for moderate
/// exponents, else `d.ddde±X`.
fn format_double(d: f64) -> StackText {
    const LIMIT: f64 = 4_611_686_018_427_387_904.0; // 2^62, (double)(LLONG_MAX / 2)
    let mut text = StackText::new();
    if d.is_nan() {
        text.push(b"nan");
    } else if d.is_infinite() {
        text.push(if d < 0.0 { b"-inf" } else { b"inf" });
    } else if d == 0.0 {
        text.push(if d.is_sign_negative() { b"-0" } else { b"0" });
    } else if (-LIMIT..=LIMIT).contains(&d) && d.fract() == 0.0 {
        // Exact: an integral double within ±2^62 converts to i64 without loss.
        let n = d as i64;
        if n < 0 {
            text.push(b"-");
        }
        let mut v = n.unsigned_abs();
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        text.push(&buf[i..]);
    } else {
        push_fpconv(&mut text, d);
    }
    text
}

/// Emulates `fpconv_dtoa` (its `emit_digits`) on Rust's shortest round-trip digits.
fn push_fpconv(text: &mut StackText, d: f64) {
    // `{:e}` gives the shortest round-trip digits and the decimal exponent: "1.2345e-7".
    let mut sci = StackText::new();
    let _ = write!(sci, "{:e}", d.abs());
    let sci = sci.as_bytes();
    let e_at = sci.iter().position(|&b| b == b'e').unwrap_or(sci.len());
    let mut digits = [0u8; 24];
    let mut nd = 0usize;
    for &b in sci[..e_at].iter().filter(|b| b.is_ascii_digit()) {
        if nd < digits.len() {
            digits[nd] = b;
            nd += 1;
        }
    }
    let digits = &digits[..nd];
    let exp_text = sci.get(e_at + 1..).unwrap_or_default();
    let (exp_negative, exp_digits) = match exp_text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, exp_text),
    };
    let exp = exp_digits
        .iter()
        .fold(0i32, |e, &b| e * 10 + i32::from(b.wrapping_sub(b'0')));
    let exp10 = if exp_negative { -exp } else { exp };
    let nd = nd as i32; // at most 24
    let k = exp10 - (nd - 1); // the value is digits * 10^k
    let negative = d < 0.0;
    if negative {
        text.push(b"-");
    }
    if k >= 0 && exp < nd + 7 {
        text.push(digits);
        (0..k).for_each(|_| text.push(b"0"));
    } else if k < 0 && (k > -7 || exp < 4) {
        let offset = nd + k;
        if offset <= 0 {
            text.push(b"0.");
            (0..-offset).for_each(|_| text.push(b"0"));
            text.push(digits);
        } else {
            let (int, frac) = digits.split_at(offset as usize);
            text.push(int);
            text.push(b".");
            text.push(frac);
        }
    } else {
        let shown = digits.len().min(18 - usize::from(negative));
        text.push(&digits[..1]);
        if shown > 1 {
            text.push(b".");
            text.push(&digits[1..shown]);
        }
        text.push(if exp10 < 0 { b"e-" } else { b"e+" });
        let _ = write!(text, "{exp}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Encodes a request the way clients do (independent of the reply encoder).
    fn request(args: &[&[u8]]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    fn strs(args: &[&str]) -> Vec<Bytes> {
        args.iter()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    fn parse(input: &[u8]) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        parse_command(&mut BytesMut::from(input), &Limits::default())
    }

    /// All commands in `buf`, until more bytes are needed.
    fn drain(buf: &mut BytesMut, limits: &Limits) -> Result<Vec<Vec<Bytes>>, ProtocolError> {
        let mut commands = Vec::new();
        while let Some(cmd) = parse_command(buf, limits)? {
            commands.push(cmd);
        }
        Ok(commands)
    }

    fn error_text(input: &[u8], limits: &Limits) -> String {
        match parse_command(&mut BytesMut::from(input), limits) {
            Err(e) => e.to_string(),
            other => panic!(
                "{:?}: expected an error, got {other:?}",
                String::from_utf8_lossy(input)
            ),
        }
    }

    fn enc(reply: &Reply, proto: Protocol) -> Vec<u8> {
        let mut out = BytesMut::new();
        reply.encode(proto, &mut out);
        assert_eq!(out.len(), reply.encoded_len(proto), "{reply:?}");
        assert_eq!(encode_to_bytes(reply, proto), out, "{reply:?}");
        out.to_vec()
    }

    fn small_limits() -> Limits {
        Limits {
            max_bulk: 1024,
            max_args: 64,
            max_inline: 256,
        }
    }

    // ---- requests: frames

    #[test]
    fn parses_array_of_bulks_zero_copy() {
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\nrest"[..]);
        let base = buf.as_ptr() as usize;
        let cmd = parse_command(&mut buf, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(cmd, strs(&["GET", "key"]));
        assert_eq!(
            cmd[0].as_ptr() as usize,
            base + 8,
            "GET is a slice of the buffer"
        );
        assert_eq!(
            cmd[1].as_ptr() as usize,
            base + 17,
            "key is a slice of the buffer"
        );
        assert_eq!(&buf[..], b"rest");
    }

    #[test]
    fn parses_binary_and_empty_bulks() {
        let value: &[u8] = b"a\r\nb\0\xff*$";
        let cmd = parse(&request(&[b"SET", b"", value])).unwrap().unwrap();
        assert_eq!(
            cmd,
            vec![
                Bytes::from_static(b"SET"),
                Bytes::new(),
                Bytes::copy_from_slice(value)
            ]
        );
    }

    #[test]
    fn parses_inline_commands() {
        let cases: &[(&[u8], &[&str])] = &[
            (b"PING\r\n", &["PING"]),
            (b"set a b\n", &["set", "a", "b"]),
            (b"  set\t\ta   b  \r\n", &["set", "a", "b"]),
            (b"GET k\xffx\n", &[]), // checked below (non-UTF-8)
            (b"a\x0bb c\n", &["a\x0bb", "c"]),
        ];
        for (input, want) in cases {
            let cmd = parse(input).unwrap().unwrap();
            if want.is_empty() {
                assert_eq!(
                    cmd,
                    vec![Bytes::from_static(b"GET"), Bytes::from_static(b"k\xffx")]
                );
            } else {
                assert_eq!(cmd, strs(want), "{:?}", String::from_utf8_lossy(input));
            }
        }
        // A `$` at the top level starts an inline command, as in Redis.
        assert_eq!(parse(b"$3\r\n").unwrap().unwrap(), strs(&["$3"]));
        // A NUL byte ends an inline line (sdssplitargs works on a C string).
        assert_eq!(
            parse(b"set a\0b c\r\n").unwrap().unwrap(),
            strs(&["set", "a"])
        );
    }

    #[test]
    fn inline_unquoted_args_are_zero_copy() {
        let mut buf = BytesMut::from(&b"set key value\r\n"[..]);
        let base = buf.as_ptr() as usize;
        let cmd = parse_command(&mut buf, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(cmd[1].as_ptr() as usize, base + 4);
        assert_eq!(cmd[2].as_ptr() as usize, base + 8);
    }

    #[test]
    fn inline_quotes_and_escapes() {
        let cases: &[(&[u8], &[&[u8]])] = &[
            (b"set \"a b\" 'c d'\r\n", &[b"set", b"a b", b"c d"]),
            (
                br#""\x41\x4a\x4A\n\r\t\b\a\\\"\q""#,
                &[b"AJJ\n\r\t\x08\x07\\\"q"],
            ),
            (br#""\xff\x00\xZZ\x4""#, &[b"\xff\x00xZZx4"]),
            (br"'it\'s' 'a\nb' '\x41'", &[b"it's", b"a\\nb", b"\\x41"]),
            (b"ab\"c d\"\t'e'f' x", &[b"abc d"]), // checked below: closing quote then 'f'
            (b"\"\" ''", &[b"", b""]),
            (b"a\"b c\" d", &[b"ab c", b"d"]),
            (b"\"a\"\x0b\"b\"", &[b"a", b"b"]), // \v may follow a closing quote
        ];
        for (line, want) in cases {
            let mut input = line.to_vec();
            input.extend_from_slice(b"\r\n");
            let got = parse(&input);
            if line.starts_with(b"ab\"c") {
                assert_eq!(got, Err(ProtocolError::UnbalancedQuotes));
                continue;
            }
            let want: Vec<Bytes> = want.iter().map(|a| Bytes::copy_from_slice(a)).collect();
            assert_eq!(
                got.unwrap().unwrap(),
                want,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn unbalanced_quotes() {
        let l = Limits::default();
        for input in [
            &b"\"unbalanced\r\n"[..],
            b"set 'abc\n",
            b"set \"a\"b\n",
            b"set 'a'b\n",
            b"set \"abc\\\"\n",
            b"set \"abc\\\n",
            b"set \"a\0\"\n",
        ] {
            assert_eq!(
                error_text(input, &l),
                "ERR Protocol error: unbalanced quotes in request",
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn skips_empty_lines_and_empty_arrays() {
        let mut buf = BytesMut::from(&b"\r\n\n  \t \r\n*0\r\n*-1\r\n*-7\r\nPING\r\n\r\n*0\r\n"[..]);
        let l = Limits::default();
        assert_eq!(
            parse_command(&mut buf, &l).unwrap().unwrap(),
            strs(&["PING"])
        );
        assert_eq!(parse_command(&mut buf, &l).unwrap(), None);
        assert!(buf.is_empty(), "trailing empties are consumed: {buf:?}");
    }

    #[test]
    fn pipelined_sixteen_commands_one_by_one() {
        let mut input = Vec::new();
        let mut want = Vec::new();
        for i in 0..16 {
            let key = format!("key:{i}");
            if i % 2 == 0 {
                input.extend(request(&[b"SET", key.as_bytes(), b"xxx"]));
                want.push(strs(&["SET", &key, "xxx"]));
            } else if i % 5 == 0 {
                input.extend(format!("GET {key}\r\n").into_bytes());
                want.push(strs(&["GET", &key]));
            } else {
                input.extend(request(&[b"GET", key.as_bytes()]));
                want.push(strs(&["GET", &key]));
            }
        }
        let mut buf = BytesMut::from(&input[..]);
        let l = Limits::default();
        for (n, want) in want.iter().enumerate() {
            let cmd = parse_command(&mut buf, &l).unwrap().unwrap();
            assert_eq!(&cmd, want, "command {n}");
        }
        assert_eq!(parse_command(&mut buf, &l).unwrap(), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_frames_at_every_split_point() {
        let l = Limits::default();
        let frames: Vec<Vec<u8>> = vec![
            request(&[b"SET", b"key", b"value\r\nwith crlf"]),
            b"set \"quoted \\x41\" plain\r\n".to_vec(),
            request(&[b"GET", b""]),
            b"PING\n".to_vec(),
            request(&[b"MSET", b"a", b"1", b"bb", b"22", b"ccc", b"333"]),
        ];
        for frame in &frames {
            let whole = parse(frame).unwrap().unwrap();
            for split in 0..frame.len() {
                let mut buf = BytesMut::from(&frame[..split]);
                assert_eq!(parse_command(&mut buf, &l).unwrap(), None, "split {split}");
                assert_eq!(&buf[..], &frame[..split], "split {split}: nothing consumed");
                assert!(needed_hint(&buf, &l) >= 1);
                buf.extend_from_slice(&frame[split..]);
                assert_eq!(
                    parse_command(&mut buf, &l).unwrap().unwrap(),
                    whole,
                    "split {split}"
                );
                assert!(buf.is_empty());
            }
        }
    }

    // ---- requests: errors and bounds

    #[test]
    fn exact_redis_error_strings() {
        let l = Limits::default();
        let cases: &[(&[u8], &str)] = &[
            (b"*abc\r\n", "ERR Protocol error: invalid multibulk length"),
            (b"*\r\n", "ERR Protocol error: invalid multibulk length"),
            (b"*01\r\n", "ERR Protocol error: invalid multibulk length"),
            (b"*+1\r\n", "ERR Protocol error: invalid multibulk length"),
            (b"*-0\r\n", "ERR Protocol error: invalid multibulk length"),
            (b"*1\rX", "ERR Protocol error: invalid multibulk length"),
            (
                b"*2147483648\r\n",
                "ERR Protocol error: invalid multibulk length",
            ),
            (b"*2\r\n$x\r\n", "ERR Protocol error: invalid bulk length"),
            (b"*1\r\n$-1\r\n", "ERR Protocol error: invalid bulk length"),
            (
                b"*1\r\n$03\r\nabc\r\n",
                "ERR Protocol error: invalid bulk length",
            ),
            (b"*1\r\n$\r\n", "ERR Protocol error: invalid bulk length"),
            (
                b"*1\r\n$99999999999999999999999\r\n",
                "ERR Protocol error: invalid bulk length",
            ),
            (b"*1\r\n:5\r\n", "ERR Protocol error: expected '$', got ':'"),
            (
                b"*1\r\n*1\r\n$1\r\na\r\n",
                "ERR Protocol error: expected '$', got '*'",
            ),
            (
                b"*1\r\n+OK\r\n",
                "ERR Protocol error: expected '$', got '+'",
            ),
            (
                b"*1\r\n$3\r\nfooXY",
                "ERR Protocol error: bulk string not terminated by CRLF",
            ),
            (
                b"*1\r\n$3\r\nfooX",
                "ERR Protocol error: bulk string not terminated by CRLF",
            ),
            (
                b"*1\r\n$3\r\nfoo\rX",
                "ERR Protocol error: bulk string not terminated by CRLF",
            ),
            (
                b"\"unbalanced\r\n",
                "ERR Protocol error: unbalanced quotes in request",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                &error_text(input, &l),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        // The reply a server sends before closing.
        let reply = ProtocolError::InvalidBulkLength.reply();
        assert_eq!(
            enc(&reply, Protocol::Resp2),
            b"-ERR Protocol error: invalid bulk length\r\n"
        );
    }

    #[test]
    fn bulk_over_max_bulk() {
        let l = small_limits();
        let at_limit = request(&[b"SET", b"k", &[b'v'; 1024]]);
        assert_eq!(
            parse_command(&mut BytesMut::from(&at_limit[..]), &l)
                .unwrap()
                .unwrap()[2]
                .len(),
            1024
        );
        // Reported at the header, before any payload arrives: recoverable, with the
        // command consumed up to the payload.
        let mut buf = BytesMut::from(&b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1025\r\nvv"[..]);
        let e = parse_command(&mut buf, &l).unwrap_err();
        assert!(e.is_recoverable());
        assert_eq!(
            e,
            ProtocolError::BulkTooLarge {
                len: 1025,
                arg: 2,
                rest: 1,
                limit: 1024,
                command: Some(Bytes::from_static(b"SET")),
            }
        );
        assert_eq!(&buf[..], b"vv");
        // The rest of the command is skipped as it arrives; the next one parses.
        let mut skip = Discard::new(1025, 1);
        assert_eq!(skip.feed(&mut buf, &l), Ok(false));
        buf.extend_from_slice(&[b'v'; 1023]);
        buf.extend_from_slice(b"\r\n$200");
        assert_eq!(skip.feed(&mut buf, &l), Ok(false));
        buf.extend_from_slice(b"0\r\n");
        assert_eq!(skip.feed(&mut buf, &l), Ok(false));
        assert_eq!(skip.declared(), 1025 + 2000);
        buf.extend_from_slice(&[b'x'; 2000]);
        buf.extend_from_slice(b"\r\n*1\r\n$4\r\nPING\r\n");
        assert_eq!(skip.feed(&mut buf, &l), Ok(true));
        assert_eq!(
            parse_command(&mut buf, &l).unwrap().unwrap(),
            strs(&["PING"])
        );
        // A payload without its CRLF is still a protocol error.
        let mut skip = Discard::new(2, 0);
        assert_eq!(
            skip.feed(&mut BytesMut::from(&b"abX"[..]), &l),
            Err(ProtocolError::UnterminatedBulk)
        );
        let e = parse_command(&mut BytesMut::from(&b"*1\r\n$1025\r\n"[..]), &l).unwrap_err();
        assert!(matches!(
            e,
            ProtocolError::BulkTooLarge {
                arg: 0,
                command: None,
                ..
            }
        ));
        assert!(matches!(
            parse_command(
                &mut BytesMut::from(&b"*1\r\n$2147483647\r\n"[..]),
                &Limits::default()
            ),
            Err(ProtocolError::BulkTooLarge {
                len: 2_147_483_647,
                ..
            })
        ));
        // An incomplete header waits.
        assert_eq!(parse(b"*1\r\n$1025"), Ok(None));
    }

    #[test]
    fn args_over_max_args() {
        let l = small_limits();
        let args: Vec<&[u8]> = vec![b"x"; 64];
        assert_eq!(
            parse_command(&mut BytesMut::from(&request(&args)[..]), &l)
                .unwrap()
                .unwrap()
                .len(),
            64
        );
        assert_eq!(
            error_text(b"*65\r\n", &l),
            "ERR Protocol error: invalid multibulk length"
        );
        assert_eq!(
            error_text(b"*650", &l),
            "ERR Protocol error: invalid multibulk length"
        );
        assert_eq!(
            error_text(b"*1048577\r\n", &Limits::default()),
            "ERR Protocol error: invalid multibulk length"
        );
    }

    #[test]
    fn inline_over_max_inline() {
        let l = small_limits();
        // Exactly max_inline bytes without a newline: it may still end.
        let mut buf = BytesMut::from(&[b'a'; 256][..]);
        assert_eq!(parse_command(&mut buf, &l).unwrap(), None);
        buf.extend_from_slice(b"\n");
        assert_eq!(parse_command(&mut buf, &l).unwrap().unwrap()[0].len(), 256);
        // One more byte and no newline: refused now, not waited on forever.
        let mut buf = BytesMut::from(&[b'a'; 257][..]);
        assert_eq!(
            parse_command(&mut buf, &l),
            Err(ProtocolError::TooBigInline)
        );
        assert_eq!(
            ProtocolError::TooBigInline.to_string(),
            "ERR Protocol error: too big inline request"
        );
        // A line that is too long is refused even if its newline is already there.
        let mut line = vec![b'a'; 300];
        line.push(b'\n');
        assert_eq!(
            parse_command(&mut BytesMut::from(&line[..]), &l),
            Err(ProtocolError::TooBigInline)
        );
    }

    #[test]
    fn header_line_over_max_inline() {
        let tiny = Limits {
            max_inline: 3,
            ..Limits::default()
        };
        assert_eq!(
            parse_command(&mut BytesMut::from(&b"*12"[..]), &tiny),
            Ok(None)
        );
        assert_eq!(
            error_text(b"*123", &tiny),
            "ERR Protocol error: too big mbulk count string"
        );
        assert_eq!(
            error_text(b"*1\r\n$123", &tiny),
            "ERR Protocol error: too big bulk count string"
        );
        assert_eq!(
            parse_command(&mut BytesMut::from(&b"*1\r\n$1\r\na\r\n"[..]), &tiny)
                .unwrap()
                .unwrap(),
            strs(&["a"])
        );
    }

    #[test]
    fn header_bombs_do_not_allocate() {
        let huge = Limits {
            max_bulk: usize::MAX,
            max_args: usize::MAX,
            max_inline: DEFAULT_MAX_INLINE,
        };
        let started = std::time::Instant::now();
        for input in [
            &b"*2147483647\r\n"[..],
            b"*2147483647\r\n$3\r\nfoo\r\n",
            b"*1\r\n$2147483647\r\n",
            b"*1\r\n$999999999999\r\nabc",
        ] {
            let mut buf = BytesMut::with_capacity(64);
            buf.extend_from_slice(input);
            let capacity = buf.capacity();
            assert_eq!(parse_command(&mut buf, &huge), Ok(None));
            assert_eq!(&buf[..], input, "nothing consumed");
            assert_eq!(buf.capacity(), capacity, "the parser reserved nothing");
            // The hint grows the buffer sensibly, not to the declared size.
            let hint = needed_hint(&buf, &huge);
            assert!((1..=HINT_FLOOR).contains(&hint), "hint {hint}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // With the default limits the same headers are refused outright.
        assert_eq!(
            error_text(b"*2147483647\r\n", &Limits::default()),
            "ERR Protocol error: invalid multibulk length"
        );
    }

    #[test]
    fn needed_hint_reports_missing_bytes() {
        let l = Limits::default();
        assert_eq!(needed_hint(b"", &l), 1);
        assert_eq!(needed_hint(b"*1\r\n$10\r\nabc", &l), 9); // 7 payload + CRLF
        assert_eq!(needed_hint(b"*1\r\n$10\r\n0123456789\r", &l), 1);
        assert_eq!(
            needed_hint(b"*1\r\n$3\r\nabc\r\n", &l),
            0,
            "a whole command"
        );
        assert_eq!(needed_hint(b"*x", &l), 0, "an error");
        assert_eq!(needed_hint(b"*1\r\n$1000000\r\n", &l), HINT_FLOOR);
    }

    #[test]
    fn large_value_in_64k_reads() {
        let l = Limits::default();
        let value: Vec<u8> = (0..16 * 1024 * 1024)
            .map(|i: u32| (i % 251) as u8)
            .collect();
        let input = request(&[b"SET", b"big", &value]);
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut calls = 0;
        let cmd = loop {
            if let Some(cmd) = parse_command(&mut buf, &l).unwrap() {
                break cmd;
            }
            calls += 1;
            let hint = needed_hint(&buf, &l);
            assert!(hint >= 1 && hint <= buf.len().max(HINT_FLOOR));
            buf.reserve(hint.max(64 * 1024));
            let n = (input.len() - fed).min(64 * 1024);
            buf.extend_from_slice(&input[fed..fed + n]);
            fed += n;
        };
        assert_eq!(fed, input.len());
        assert!(calls <= input.len() / (64 * 1024) + 2, "{calls} calls");
        assert_eq!(cmd[0], "SET");
        assert_eq!(cmd[2], value);
        assert!(buf.is_empty());
    }

    // ---- replies

    #[test]
    fn encodes_scalars_in_both_protocols() {
        use Protocol::{Resp2, Resp3};
        let cases: Vec<(Reply, &[u8], &[u8])> = vec![
            (Reply::Ok, b"+OK\r\n", b"+OK\r\n"),
            (Reply::simple("PONG"), b"+PONG\r\n", b"+PONG\r\n"),
            (Reply::simple("a\r\nb"), b"+a  b\r\n", b"+a  b\r\n"),
            (
                Reply::error("ERR bad\nthing"),
                b"-ERR bad thing\r\n",
                b"-ERR bad thing\r\n",
            ),
            (
                Reply::error(String::from("WRONGTYPE x")),
                b"-WRONGTYPE x\r\n",
                b"-WRONGTYPE x\r\n",
            ),
            (Reply::Int(0), b":0\r\n", b":0\r\n"),
            (Reply::Int(-1), b":-1\r\n", b":-1\r\n"),
            (
                Reply::Int(i64::MAX),
                b":9223372036854775807\r\n",
                b":9223372036854775807\r\n",
            ),
            (
                Reply::Int(i64::MIN),
                b":-9223372036854775808\r\n",
                b":-9223372036854775808\r\n",
            ),
            (Reply::bulk("hello"), b"$5\r\nhello\r\n", b"$5\r\nhello\r\n"),
            (Reply::bulk(""), b"$0\r\n\r\n", b"$0\r\n\r\n"),
            (
                Reply::bulk(vec![b'x'; 12]),
                b"$12\r\nxxxxxxxxxxxx\r\n",
                b"$12\r\nxxxxxxxxxxxx\r\n",
            ),
            (Reply::Nil, b"$-1\r\n", b"_\r\n"),
            (Reply::NilArray, b"*-1\r\n", b"_\r\n"),
            (Reply::Bool(true), b":1\r\n", b"#t\r\n"),
            (Reply::Bool(false), b":0\r\n", b"#f\r\n"),
            (Reply::Double(1.5), b"$3\r\n1.5\r\n", b",1.5\r\n"),
            (Reply::Double(f64::INFINITY), b"$3\r\ninf\r\n", b",inf\r\n"),
            (
                Reply::Verbatim(Bytes::from_static(b"# Server")),
                b"$8\r\n# Server\r\n",
                b"=12\r\ntxt:# Server\r\n",
            ),
            (
                Reply::Raw(Bytes::from_static(b"+FWD\r\n")),
                b"+FWD\r\n",
                b"+FWD\r\n",
            ),
        ];
        for (reply, resp2, resp3) in &cases {
            assert_eq!(enc(reply, Resp2), *resp2, "{reply:?} RESP2");
            assert_eq!(enc(reply, Resp3), *resp3, "{reply:?} RESP3");
        }
    }

    #[test]
    fn encodes_aggregates_in_both_protocols() {
        use Protocol::{Resp2, Resp3};
        let array = Reply::Array(vec![
            Reply::bulk("a"),
            Reply::Int(2),
            Reply::Nil,
            Reply::Array(vec![]),
        ]);
        assert_eq!(enc(&array, Resp2), b"*4\r\n$1\r\na\r\n:2\r\n$-1\r\n*0\r\n");
        assert_eq!(enc(&array, Resp3), b"*4\r\n$1\r\na\r\n:2\r\n_\r\n*0\r\n");
        let map = Reply::Map(vec![
            (Reply::bulk("k1"), Reply::Int(1)),
            (Reply::simple("k2"), Reply::Double(0.25)),
        ]);
        assert_eq!(
            enc(&map, Resp2),
            b"*4\r\n$2\r\nk1\r\n:1\r\n+k2\r\n$4\r\n0.25\r\n"
        );
        assert_eq!(
            enc(&map, Resp3),
            b"%2\r\n$2\r\nk1\r\n:1\r\n+k2\r\n,0.25\r\n"
        );
        let set = Reply::Set(vec![Reply::bulk("x"), Reply::Bool(true)]);
        assert_eq!(enc(&set, Resp2), b"*2\r\n$1\r\nx\r\n:1\r\n");
        assert_eq!(enc(&set, Resp3), b"~2\r\n$1\r\nx\r\n#t\r\n");
        let long = Reply::Array(vec![Reply::Int(7); 12]);
        let mut want = b"*12\r\n".to_vec();
        (0..12).for_each(|_| want.extend_from_slice(b":7\r\n"));
        assert_eq!(enc(&long, Resp2), want);
        assert_eq!(enc(&Reply::Map(vec![]), Resp2), b"*0\r\n");
        assert_eq!(enc(&Reply::Map(vec![]), Resp3), b"%0\r\n");
        // encode appends.
        let mut out = BytesMut::from(&b"+A\r\n"[..]);
        Reply::Ok.encode(Resp2, &mut out);
        assert_eq!(&out[..], b"+A\r\n+OK\r\n");
    }

    #[test]
    fn doubles_print_like_redis() {
        let cases: &[(f64, &str)] = &[
            (1.5, "1.5"),
            (0.0, "0"),
            (-0.0, "-0"),
            (3.0, "3"),
            (-42.0, "-42"),
            (0.1, "0.1"),
            (0.001, "0.001"),
            (0.000_001, "0.000001"),
            (1e-7, "1e-7"),
            (1.25e-10, "1.25e-10"),
            (123.456, "123.456"),
            (-123.456, "-123.456"),
            (3.14159e10, "31415900000"),
            (4_611_686_018_427_387_904.0, "4611686018427387904"),
            (1e19, "1e+19"),
            (1e20, "1e+20"),
            (1.2345678901234567e19, "12345678901234567000"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (1234.567890123, "1234.567890123"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (f64::NAN, "nan"),
        ];
        for &(d, want) in cases {
            let got = enc(&Reply::Double(d), Protocol::Resp3);
            assert_eq!(
                String::from_utf8(got).unwrap(),
                format!(",{want}\r\n"),
                "{d:e}"
            );
            let got = enc(&Reply::Double(d), Protocol::Resp2);
            assert_eq!(
                String::from_utf8(got).unwrap(),
                format!("${}\r\n{want}\r\n", want.len())
            );
        }
    }

    // ---- properties

    /// Could `b`, from which no command could be parsed, still grow into a valid
    /// command within `l`? A reference written independently of the parser.
    fn could_be_prefix(b: &[u8], l: &Limits) -> bool {
        let Some((&first, mut rest)) = b.split_first() else {
            return true;
        };
        if first != b'*' {
            return !b.contains(&b'\n') && b.len() <= l.max_inline;
        }
        let count = match number_prefix(rest, true, l.max_args) {
            Number::Partial => return true,
            Number::Invalid => return false,
            Number::Whole(n, r) => {
                rest = r;
                n
            }
        };
        if count <= 0 {
            return false; // a whole empty frame: it should have been skipped
        }
        for _ in 0..count {
            match rest.split_first() {
                None => return true,
                Some((b'$', r)) => rest = r,
                Some(_) => return false,
            }
            // Any well-formed length is a valid prefix; one over `max_bulk` is
            // reported (recoverable) as soon as its header is whole.
            let len = match number_prefix(rest, false, MAX_LEN as usize) {
                Number::Partial => return true,
                Number::Invalid => return false,
                Number::Whole(n, _) if n as u64 > l.max_bulk as u64 => return false,
                Number::Whole(n, r) => {
                    rest = r;
                    usize::try_from(n).unwrap()
                }
            };
            if rest.len() < len + 2 {
                return rest.len() <= len || rest[len] == b'\r';
            }
            if &rest[len..len + 2] != b"\r\n" {
                return false;
            }
            rest = &rest[len + 2..];
        }
        false // a whole command: it should have been returned
    }

    enum Number<'a> {
        Partial,
        Invalid,
        Whole(i64, &'a [u8]),
    }

    /// A header number: canonical means it prints back the same (no '+', no leading
    /// zeros, no "-0").
    fn number_prefix(s: &[u8], allow_negative: bool, max: usize) -> Number<'_> {
        let cr = s.iter().position(|&c| c == b'\r');
        let Ok(text) = std::str::from_utf8(&s[..cr.unwrap_or(s.len())]) else {
            return Number::Invalid;
        };
        let valid = |t: &str| {
            t.parse::<i64>().ok().filter(|n| {
                n.to_string() == t
                    && (*n < 0 || *n as u64 <= max as u64)
                    && (allow_negative || *n >= 0)
            })
        };
        match cr {
            None if text.is_empty() || (allow_negative && text == "-") => Number::Partial,
            None => match valid(text) {
                Some(_) => Number::Partial,
                None => Number::Invalid,
            },
            Some(cr) => match (valid(text), s.get(cr + 1)) {
                (None, _) => Number::Invalid,
                (Some(_), None) => Number::Partial,
                (Some(n), Some(b'\n')) => Number::Whole(n, &s[cr + 2..]),
                (Some(_), Some(_)) => Number::Invalid,
            },
        }
    }

    /// Feeds `input` in chunks of the given sizes, draining commands after each chunk.
    fn feed(input: &[u8], chunks: &[usize], l: &Limits) -> (Vec<Vec<Bytes>>, BytesMut) {
        let mut buf = BytesMut::new();
        let mut commands = Vec::new();
        let mut pos = 0;
        let mut sizes = chunks.iter().cycle();
        while pos < input.len() {
            let n = (*sizes.next().unwrap()).min(input.len() - pos);
            buf.extend_from_slice(&input[pos..pos + n]);
            pos += n;
            commands.extend(drain(&mut buf, l).unwrap());
        }
        (commands, buf)
    }

    fn binary_commands() -> impl Strategy<Value = Vec<Vec<Vec<u8>>>> {
        prop::collection::vec(
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..20),
            1..6,
        )
    }

    fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(1usize..400, 1..50)
    }

    /// Bytes that often look like RESP: mostly protocol characters, some anything.
    fn resp_like_bytes() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            3 => prop::sample::select(b"*$\r\n-0123456789:+\"' \t\\x".to_vec()),
            1 => any::<u8>(),
        ];
        prop::collection::vec(byte, 0..2000)
    }

    /// Valid requests with a few bytes flipped, inserted or deleted.
    fn mutated_requests() -> impl Strategy<Value = Vec<u8>> {
        (
            binary_commands(),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..4),
        )
            .prop_map(|(commands, edits)| {
                let mut input: Vec<u8> = commands
                    .iter()
                    .flat_map(|c| request(&c.iter().map(Vec::as_slice).collect::<Vec<_>>()))
                    .collect();
                for (at, byte, op) in edits {
                    let i = at.index(input.len() + 1);
                    match op {
                        0 if i < input.len() => input[i] = byte,
                        1 => input.insert(i, byte),
                        _ if i < input.len() => {
                            input.remove(i);
                        }
                        _ => {}
                    }
                }
                input
            })
    }

    fn printable_word() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_:.,@#%&=+/-]{1,12}"
    }

    /// Quotes `arg` for an inline command, escaping with `\xHH` where needed.
    fn quote(arg: &[u8]) -> Vec<u8> {
        let mut out = vec![b'"'];
        for &b in arg {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                0x20..=0x7e => out.push(b),
                _ => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            }
        }
        out.push(b'"');
        out
    }

    fn reply_tree() -> impl Strategy<Value = Reply> {
        let leaf = prop_oneof![
            Just(Reply::Ok),
            "[ -~\r\n]{0,20}".prop_map(Reply::simple),
            "[ -~\r\n]{0,20}".prop_map(Reply::error),
            any::<i64>().prop_map(Reply::Int),
            prop::collection::vec(any::<u8>(), 0..40).prop_map(Reply::bulk),
            Just(Reply::Nil),
            Just(Reply::NilArray),
            any::<f64>().prop_map(Reply::Double),
            any::<bool>().prop_map(Reply::Bool),
            prop::collection::vec(any::<u8>(), 0..40).prop_map(|v| Reply::Verbatim(v.into())),
        ];
        leaf.prop_recursive(3, 40, 12, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..12).prop_map(Reply::Array),
                prop::collection::vec(inner.clone(), 0..12).prop_map(Reply::Set),
                prop::collection::vec((inner.clone(), inner), 0..6).prop_map(Reply::Map),
            ]
        })
    }

    proptest! {
        /// Pipelined binary commands fed in arbitrary chunks parse back exactly.
        #[test]
        fn prop_round_trip_in_chunks(commands in binary_commands(), chunks in chunk_sizes()) {
            let input: Vec<u8> = commands
                .iter()
                .flat_map(|c| request(&c.iter().map(Vec::as_slice).collect::<Vec<_>>()))
                .collect();
            let (parsed, rest) = feed(&input, &chunks, &Limits::default());
            let want: Vec<Vec<Bytes>> = commands
                .iter()
                .map(|c| c.iter().map(|a| Bytes::copy_from_slice(a)).collect())
                .collect();
            prop_assert_eq!(parsed, want);
            prop_assert!(rest.is_empty());
        }

        /// Garbage never panics. The parser waits (`Ok(None)`) only while the buffer can
        /// still become a valid command within the limits, and it refuses only buffers
        /// that cannot. So what it holds stays bounded by the limits.
        #[test]
        fn prop_garbage_is_bounded(
            input in prop_oneof![resp_like_bytes(), mutated_requests()],
            chunks in chunk_sizes(),
        ) {
            let l = small_limits();
            let mut buf = BytesMut::new();
            let mut sizes = chunks.iter().cycle();
            let mut pos = 0;
            'feed: while pos < input.len() {
                let n = (*sizes.next().unwrap()).min(input.len() - pos);
                buf.extend_from_slice(&input[pos..pos + n]);
                pos += n;
                loop {
                    let before = buf.clone();
                    match parse_command(&mut buf, &l) {
                        Ok(Some(cmd)) => {
                            prop_assert!(!cmd.is_empty() && cmd.len() <= l.max_args);
                            prop_assert!(cmd.iter().all(|a| a.len() <= l.max_bulk.max(l.max_inline)));
                        }
                        Ok(None) => {
                            prop_assert!(
                                could_be_prefix(&buf, &l),
                                "waits on a buffer that can never parse: {:?}",
                                String::from_utf8_lossy(&buf)
                            );
                            prop_assert!(needed_hint(&buf, &l) >= 1);
                            break;
                        }
                        Err(_) => {
                            prop_assert!(
                                !could_be_prefix(&before, &l),
                                "refuses a valid prefix: {:?}",
                                String::from_utf8_lossy(&before)
                            );
                            break 'feed;
                        }
                    }
                }
            }
        }

        /// Inline commands of printable words, however spaced, parse back.
        #[test]
        fn prop_inline_words_round_trip(
            lines in prop::collection::vec(
                (prop::collection::vec(printable_word(), 1..8), "[ \t]{1,3}", "[ \t]{0,2}", prop::bool::ANY),
                1..6,
            ),
            chunks in chunk_sizes(),
        ) {
            let mut input = Vec::new();
            for (words, sep, lead, crlf) in &lines {
                input.extend_from_slice(lead.as_bytes());
                input.extend_from_slice(words.join(sep).as_bytes());
                input.extend_from_slice(if *crlf { b"\r\n" } else { b"\n" });
            }
            let (parsed, rest) = feed(&input, &chunks, &Limits::default());
            let want: Vec<Vec<Bytes>> = lines
                .iter()
                .map(|(words, ..)| words.iter().map(|w| Bytes::copy_from_slice(w.as_bytes())).collect())
                .collect();
            prop_assert_eq!(parsed, want);
            prop_assert!(rest.is_empty());
        }

        /// Arbitrary binary arguments survive inline double-quoting with escapes.
        #[test]
        fn prop_quoted_inline_round_trip(args in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..30), 1..6)) {
            let mut input = Vec::new();
            for (i, arg) in args.iter().enumerate() {
                if i > 0 {
                    input.push(b' ');
                }
                input.extend(quote(arg));
            }
            input.extend_from_slice(b"\r\n");
            let cmd = parse(&input).unwrap().unwrap();
            prop_assert_eq!(cmd, args.iter().map(|a| Bytes::copy_from_slice(a)).collect::<Vec<_>>());
        }

        /// `encoded_len` is exact for any reply, and an array of bulks encodes to a
        /// request the parser reads back.
        #[test]
        fn prop_replies_encode_consistently(
            reply in reply_tree(),
            args in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..50), 1..10),
        ) {
            for proto in [Protocol::Resp2, Protocol::Resp3] {
                let mut out = BytesMut::new();
                reply.encode(proto, &mut out);
                prop_assert_eq!(out.len(), reply.encoded_len(proto));
                prop_assert!(out.ends_with(b"\r\n"));
            }
            let array = Reply::Array(args.iter().map(|a| Reply::bulk(a.clone())).collect());
            let mut buf = BytesMut::from(&encode_to_bytes(&array, Protocol::Resp2)[..]);
            let cmd = parse_command(&mut buf, &Limits::default()).unwrap().unwrap();
            prop_assert_eq!(cmd, args.iter().map(|a| Bytes::copy_from_slice(a)).collect::<Vec<_>>());
            prop_assert!(buf.is_empty());
        }
    }
}
