//! Redis commands as typed values: [`parse`] checks a command's name, arity and
//! options the way Redis does and answers Redis's exact error text when they are wrong.
//! Pure code (no I/O, no clock): every rule here is unit-tested.

use super::codec::Reply;
use crate::storage::{Condition, ExpireCondition, Expiry};
use bytes::Bytes;
use std::borrow::Cow;

/// A parsed command.
#[derive(Debug, Clone, PartialEq)]
pub enum Cmd {
    /// `PING [message]`.
    Ping(Option<Bytes>),
    /// `ECHO message`.
    Echo(Bytes),
    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`.
    Hello {
        /// The protocol asked for (2 or 3), if any.
        protover: Option<i64>,
        /// `SETNAME`.
        setname: Option<Bytes>,
        /// Whether `AUTH` was given (there is no auth: refused).
        auth: bool,
    },
    /// `AUTH ...` (no auth is configured).
    Auth,
    /// `SELECT index`.
    Select(i64),
    /// `QUIT`.
    Quit,
    /// `RESET`.
    Reset,
    /// `CLIENT SETNAME name`.
    ClientSetName(Bytes),
    /// `CLIENT GETNAME`.
    ClientGetName,
    /// `CLIENT ID`.
    ClientId,
    /// `CLIENT INFO`.
    ClientInfo,
    /// `CLIENT SETINFO LIB-NAME|LIB-VER value` (sent by redis-py and others on connect).
    ClientSetInfo,
    /// `COMMAND [COUNT|DOCS|INFO|LIST ...]`.
    Command(CommandSub),
    /// `INFO [section ...]`.
    Info(Vec<String>),
    /// `DBSIZE`.
    DbSize,
    /// `RAFTCACHE.KEYSPACE`: `[keys, keys with a deadline]` of the partitions this node
    /// leads (what `INFO keyspace` asks every node).
    Keyspace,
    /// `FLUSHALL [ASYNC|SYNC]` / `FLUSHDB`.
    FlushAll,
    /// `TIME`.
    Time,
    /// `CONFIG GET pattern ...` (read-only: a few Redis parameters with their values
    /// here, for tools such as redis-benchmark).
    ConfigGet(Vec<String>),
    /// `CONFIG SET|RESETSTAT|REWRITE ...`: refused.
    ConfigOther,
    /// A command on one key.
    Key {
        /// The key.
        key: Bytes,
        /// What to do with it.
        op: KeyOp,
    },
    /// `MGET key ...`.
    MGet(Vec<Bytes>),
    /// `MSET key value ...` (each key is written on its own: not atomic across
    /// partitions).
    MSet(Vec<(Bytes, Bytes)>),
    /// `DEL`/`UNLINK` with several keys.
    Del(Vec<Bytes>),
    /// `EXISTS` with several keys.
    Exists(Vec<Bytes>),
}

/// `COMMAND`'s subcommands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandSub {
    /// `COMMAND` and `COMMAND INFO [name ...]` (empty: all).
    Info(Vec<String>),
    /// `COMMAND COUNT`.
    Count,
    /// `COMMAND DOCS [name ...]`.
    Docs,
    /// `COMMAND LIST`.
    List,
}

/// How a `SET` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetReply {
    /// `OK`, or nil when the condition did not hold (`SET`, `SETEX`, `PSETEX`).
    Ok,
    /// 1 or 0 (`SETNX`).
    Int,
    /// The old value (`SET ... GET`, `GETSET`).
    Old,
}

/// What a [`Cmd::Key`] does.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyOp {
    /// `GET`.
    Get,
    /// `SET` and its variants.
    Set {
        /// The value.
        value: Bytes,
        /// `EX`/`PX`/`EXAT`/`PXAT` (or `SETEX`/`PSETEX`).
        expiry: Expiry,
        /// `KEEPTTL`.
        keep_ttl: bool,
        /// `NX`/`XX`.
        condition: Condition,
        /// The reply's shape.
        reply: SetReply,
    },
    /// `GETDEL`.
    GetDel,
    /// `GETEX` with an option (`None`: a plain read).
    GetEx(Option<Expiry>),
    /// `INCR`, `INCRBY`, `DECR`, `DECRBY`.
    Incr(i64),
    /// `APPEND`.
    Append(Bytes),
    /// `STRLEN`.
    Strlen,
    /// `EXPIRE`, `PEXPIRE`, `EXPIREAT`, `PEXPIREAT` with `NX|XX|GT|LT`.
    Expire {
        /// The new expiry.
        expiry: Expiry,
        /// The condition given, if any.
        condition: Option<ExpireCondition>,
    },
    /// `PERSIST`.
    Persist,
    /// `TTL` (`false`) or `PTTL` (`true`).
    Ttl {
        /// Milliseconds.
        ms: bool,
    },
    /// `TYPE`.
    Type,
    /// `EXISTS` of one key.
    Exists,
    /// `DEL`/`UNLINK` of one key.
    Del,
}

impl KeyOp {
    /// Whether the op writes (goes through Raft).
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            KeyOp::Get
                | KeyOp::GetEx(None)
                | KeyOp::Strlen
                | KeyOp::Ttl { .. }
                | KeyOp::Type
                | KeyOp::Exists
        )
    }

    /// Whether a retried forward of this write may carry a request id: only writes
    /// whose outcome holds no value (the partition keeps outcomes of request ids for
    /// a while; values there could be large).
    pub fn exactly_once(&self) -> bool {
        self.is_write()
            && !matches!(
                self,
                KeyOp::GetDel
                    | KeyOp::GetEx(_)
                    | KeyOp::Set {
                        reply: SetReply::Old,
                        ..
                    }
            )
    }
}

/// The `op` label of a command in `raftcache_ops_total`: `resp_<name>` for the
/// commands of [`COMMANDS`] (any case), `resp_unknown` otherwise.
pub fn op_label(name: &[u8]) -> &'static str {
    static LABELS: std::sync::OnceLock<Vec<(&'static str, &'static str)>> =
        std::sync::OnceLock::new();
    let labels = LABELS.get_or_init(|| {
        COMMANDS
            .iter()
            .map(|(n, ..)| {
                let label: &'static str = Box::leak(format!("resp_{n}").into_boxed_str());
                (*n, label)
            })
            .collect()
    });
    labels
        .iter()
        .find(|(n, _)| name.eq_ignore_ascii_case(n.as_bytes()))
        .map_or("resp_unknown", |(_, label)| label)
}

/// `(name, arity, flags, first key, last key, step)` as `COMMAND INFO` shows them.
pub type CommandSpec = (&'static str, i64, &'static [&'static str], i64, i64, i64);

/// Every command name [`parse`] knows, with Redis's arity (negative: at least that
/// many), flags and first key, for `COMMAND` (what redis-cli needs for hints and
/// cluster-unaware routing).
pub const COMMANDS: &[CommandSpec] = &[
    ("append", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    (
        "auth",
        -2,
        &["noscript", "loading", "stale", "fast"],
        0,
        0,
        0,
    ),
    (
        "client",
        -2,
        &["admin", "noscript", "loading", "stale"],
        0,
        0,
        0,
    ),
    ("command", -1, &["random", "loading", "stale"], 0, 0, 0),
    (
        "config",
        -2,
        &["admin", "noscript", "loading", "stale"],
        0,
        0,
        0,
    ),
    ("dbsize", 1, &["readonly", "fast"], 0, 0, 0),
    ("decr", 2, &["write", "denyoom", "fast"], 1, 1, 1),
    ("decrby", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("del", -2, &["write"], 1, -1, 1),
    ("echo", 2, &["fast"], 0, 0, 0),
    ("exists", -2, &["readonly", "fast"], 1, -1, 1),
    ("expire", -3, &["write", "fast"], 1, 1, 1),
    ("expireat", -3, &["write", "fast"], 1, 1, 1),
    ("flushall", -1, &["write"], 0, 0, 0),
    ("flushdb", -1, &["write"], 0, 0, 0),
    ("get", 2, &["readonly", "fast"], 1, 1, 1),
    ("getdel", 2, &["write", "fast"], 1, 1, 1),
    ("getex", -2, &["write", "fast"], 1, 1, 1),
    ("getset", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    (
        "hello",
        -1,
        &["noscript", "loading", "stale", "fast"],
        0,
        0,
        0,
    ),
    ("incr", 2, &["write", "denyoom", "fast"], 1, 1, 1),
    ("incrby", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("info", -1, &["loading", "stale"], 0, 0, 0),
    ("mget", -2, &["readonly", "fast"], 1, -1, 1),
    ("mset", -3, &["write", "denyoom"], 1, -1, 2),
    ("persist", 2, &["write", "fast"], 1, 1, 1),
    ("pexpire", -3, &["write", "fast"], 1, 1, 1),
    ("pexpireat", -3, &["write", "fast"], 1, 1, 1),
    ("ping", -1, &["fast"], 0, 0, 0),
    ("psetex", 4, &["write", "denyoom"], 1, 1, 1),
    ("pttl", 2, &["readonly", "random", "fast"], 1, 1, 1),
    (
        "quit",
        -1,
        &["noscript", "loading", "stale", "fast"],
        0,
        0,
        0,
    ),
    (
        "reset",
        1,
        &["noscript", "loading", "stale", "fast"],
        0,
        0,
        0,
    ),
    ("select", 2, &["loading", "stale", "fast"], 0, 0, 0),
    ("set", -3, &["write", "denyoom"], 1, 1, 1),
    ("setex", 4, &["write", "denyoom"], 1, 1, 1),
    ("setnx", 3, &["write", "denyoom", "fast"], 1, 1, 1),
    ("strlen", 2, &["readonly", "fast"], 1, 1, 1),
    ("time", 1, &["random", "loading", "stale", "fast"], 0, 0, 0),
    ("ttl", 2, &["readonly", "random", "fast"], 1, 1, 1),
    ("type", 2, &["readonly", "fast"], 1, 1, 1),
    ("unlink", -2, &["write", "fast"], 1, -1, 1),
];

/// Redis's reply to an unknown command: `ERR unknown command 'x', with args beginning
/// with: 'a' 'b' ` (quoted, each arg cut at 128 bytes as Redis does).
pub fn unknown_command(args: &[Bytes]) -> Reply {
    let mut text = format!(
        "ERR unknown command '{}', with args beginning with: ",
        shown(args.first().map_or(&[][..], |a| &a[..]))
    );
    for a in args.iter().skip(1) {
        if text.len() > 512 {
            break;
        }
        text.push('\'');
        text.push_str(&shown(a));
        text.push_str("' ");
    }
    Reply::error(text)
}

/// An argument as Redis shows it in an error (lossy UTF-8, at most 128 bytes, no
/// CR/LF).
fn shown(arg: &[u8]) -> String {
    let cut = &arg[..arg.len().min(128)];
    String::from_utf8_lossy(cut).replace(['\r', '\n'], " ")
}

fn wrong_arity(name: &str) -> Reply {
    Reply::error(format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

fn syntax() -> Reply {
    Reply::error("ERR syntax error")
}

fn not_integer() -> Reply {
    Reply::error("ERR value is not an integer or out of range")
}

fn invalid_expire(name: &str) -> Reply {
    Reply::error(format!("ERR invalid expire time in '{name}' command"))
}

/// Parses a decimal `i64` exactly as Redis's `string2ll` (no sign on zero, no spaces,
/// no leading zeros besides "0").
pub fn parse_int(arg: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(arg).ok()?;
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
        || s == "-0"
    {
        return None;
    }
    s.parse().ok()
}

fn int_arg(arg: &[u8]) -> Result<i64, Reply> {
    parse_int(arg).ok_or_else(not_integer)
}

/// The largest relative expiry in ms: Redis refuses one whose deadline (now + ms)
/// overflows an `i64`; this uses the year 2100 as "now", so the rule does not depend on
/// the clock. (The store caps deadlines at 100 years anyway.)
const MAX_RELATIVE_MS: i64 = i64::MAX - 4_102_444_800_000;

/// A relative or absolute expiry given in seconds or milliseconds, checked as Redis's
/// `SET`/`GETEX` do (positive, no overflow when made ms or added to now).
fn set_expiry(name: &str, amount: &[u8], unit_ms: i64, absolute: bool) -> Result<Expiry, Reply> {
    let n = int_arg(amount)?;
    if n <= 0 {
        return Err(invalid_expire(name));
    }
    let ms = n.checked_mul(unit_ms).ok_or_else(|| invalid_expire(name))?;
    if !absolute && ms > MAX_RELATIVE_MS {
        return Err(invalid_expire(name));
    }
    Ok(if absolute {
        Expiry::At(ms as u64)
    } else {
        Expiry::In(ms as u64)
    })
}

/// Upper-cased ASCII of a command name or option (short, so a copy is cheap).
fn upper(arg: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(arg) {
        Ok(s) if !s.bytes().any(|b| b.is_ascii_lowercase()) => Cow::Borrowed(s),
        Ok(s) => Cow::Owned(s.to_ascii_uppercase()),
        Err(_) => Cow::Owned(String::from_utf8_lossy(arg).to_ascii_uppercase()),
    }
}

/// Lower-cased ASCII of a command name, subcommand or section (lossy UTF-8).
fn lowercase(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).to_ascii_lowercase()
}

fn key_cmd(key: &Bytes, op: KeyOp) -> Result<Cmd, Reply> {
    Ok(Cmd::Key {
        key: key.clone(),
        op,
    })
}

/// Parses `args` (the command name first). `Err` is the reply to send instead.
pub fn parse(args: &[Bytes]) -> Result<Cmd, Reply> {
    let Some(name) = args.first() else {
        return Err(unknown_command(args));
    };
    // The hot commands first, without allocating.
    if name.eq_ignore_ascii_case(b"get") {
        return match args {
            [_, key] => key_cmd(key, KeyOp::Get),
            _ => Err(wrong_arity("get")),
        };
    }
    if name.eq_ignore_ascii_case(b"set") {
        return parse_set(args);
    }
    let lower = lowercase(name);
    let n = args.len();
    let arity = |want: usize| -> Result<(), Reply> {
        if n == want {
            Ok(())
        } else {
            Err(wrong_arity(&lower))
        }
    };
    let at_least = |want: usize| -> Result<(), Reply> {
        if n >= want {
            Ok(())
        } else {
            Err(wrong_arity(&lower))
        }
    };
    match lower.as_str() {
        "ping" => match args {
            [_] => Ok(Cmd::Ping(None)),
            [_, m] => Ok(Cmd::Ping(Some(m.clone()))),
            _ => Err(wrong_arity("ping")),
        },
        "echo" => {
            arity(2)?;
            Ok(Cmd::Echo(args[1].clone()))
        }
        "hello" => parse_hello(args),
        "auth" => {
            at_least(2)?;
            if n > 3 {
                return Err(syntax());
            }
            Ok(Cmd::Auth)
        }
        "select" => {
            arity(2)?;
            Ok(Cmd::Select(int_arg(&args[1])?))
        }
        "quit" => Ok(Cmd::Quit),
        "reset" => {
            arity(1)?;
            Ok(Cmd::Reset)
        }
        "client" => parse_client(args),
        "command" => parse_command_cmd(args),
        "info" => Ok(Cmd::Info(args[1..].iter().map(|a| lowercase(a)).collect())),
        "dbsize" => {
            arity(1)?;
            Ok(Cmd::DbSize)
        }
        "raftcache.keyspace" => {
            arity(1)?;
            Ok(Cmd::Keyspace)
        }
        "flushall" | "flushdb" => {
            if n > 2 {
                return Err(syntax());
            }
            if let Some(mode) = args.get(1) {
                if !(mode.eq_ignore_ascii_case(b"async") || mode.eq_ignore_ascii_case(b"sync")) {
                    return Err(syntax());
                }
            }
            Ok(Cmd::FlushAll)
        }
        "time" => {
            arity(1)?;
            Ok(Cmd::Time)
        }
        "config" => {
            at_least(2)?;
            if args[1].eq_ignore_ascii_case(b"get") {
                at_least(3)?;
                Ok(Cmd::ConfigGet(
                    args[2..].iter().map(|a| lowercase(a)).collect(),
                ))
            } else {
                Ok(Cmd::ConfigOther)
            }
        }
        "setnx" => {
            arity(3)?;
            key_cmd(
                &args[1],
                KeyOp::Set {
                    value: args[2].clone(),
                    expiry: Expiry::Never,
                    keep_ttl: false,
                    condition: Condition::IfAbsent,
                    reply: SetReply::Int,
                },
            )
        }
        "setex" | "psetex" => {
            arity(4)?;
            let unit = if lower == "setex" { 1000 } else { 1 };
            let expiry = set_expiry(&lower, &args[2], unit, false)?;
            key_cmd(
                &args[1],
                KeyOp::Set {
                    value: args[3].clone(),
                    expiry,
                    keep_ttl: false,
                    condition: Condition::Always,
                    reply: SetReply::Ok,
                },
            )
        }
        "getset" => {
            arity(3)?;
            key_cmd(
                &args[1],
                KeyOp::Set {
                    value: args[2].clone(),
                    expiry: Expiry::Never,
                    keep_ttl: false,
                    condition: Condition::Always,
                    reply: SetReply::Old,
                },
            )
        }
        "getdel" => {
            arity(2)?;
            key_cmd(&args[1], KeyOp::GetDel)
        }
        "getex" => parse_getex(args),
        "mget" => {
            at_least(2)?;
            Ok(Cmd::MGet(args[1..].to_vec()))
        }
        "mset" => {
            if n < 3 || n.is_multiple_of(2) {
                return Err(wrong_arity("mset"));
            }
            Ok(Cmd::MSet(
                args[1..]
                    .chunks_exact(2)
                    .map(|kv| (kv[0].clone(), kv[1].clone()))
                    .collect(),
            ))
        }
        "del" | "unlink" => {
            at_least(2)?;
            match args {
                [_, key] => key_cmd(key, KeyOp::Del),
                _ => Ok(Cmd::Del(args[1..].to_vec())),
            }
        }
        "exists" => {
            at_least(2)?;
            match args {
                [_, key] => key_cmd(key, KeyOp::Exists),
                _ => Ok(Cmd::Exists(args[1..].to_vec())),
            }
        }
        "incr" | "decr" => {
            arity(2)?;
            key_cmd(&args[1], KeyOp::Incr(if lower == "incr" { 1 } else { -1 }))
        }
        "incrby" | "decrby" => {
            arity(3)?;
            let by = int_arg(&args[2])?;
            let delta = if lower == "incrby" {
                by
            } else {
                by.checked_neg()
                    .ok_or_else(|| Reply::error("ERR decrement would overflow"))?
            };
            key_cmd(&args[1], KeyOp::Incr(delta))
        }
        "append" => {
            arity(3)?;
            key_cmd(&args[1], KeyOp::Append(args[2].clone()))
        }
        "strlen" => {
            arity(2)?;
            key_cmd(&args[1], KeyOp::Strlen)
        }
        "expire" | "pexpire" | "expireat" | "pexpireat" => {
            at_least(3)?;
            let condition = expire_condition(&args[3..])?;
            let amount = int_arg(&args[2])?;
            let unit: i64 = if lower.starts_with('p') { 1 } else { 1000 };
            let ms = amount
                .checked_mul(unit)
                .filter(|ms| lower.ends_with("at") || *ms <= MAX_RELATIVE_MS)
                .ok_or_else(|| invalid_expire(&lower))?;
            let expiry = if lower.ends_with("at") {
                Expiry::At(ms.max(0) as u64)
            } else if ms <= 0 {
                // A TTL that is not positive deletes the key, as in Redis.
                Expiry::At(0)
            } else {
                Expiry::In(ms as u64)
            };
            key_cmd(&args[1], KeyOp::Expire { expiry, condition })
        }
        "persist" => {
            arity(2)?;
            key_cmd(&args[1], KeyOp::Persist)
        }
        "ttl" | "pttl" => {
            arity(2)?;
            key_cmd(
                &args[1],
                KeyOp::Ttl {
                    ms: lower == "pttl",
                },
            )
        }
        "type" => {
            arity(2)?;
            key_cmd(&args[1], KeyOp::Type)
        }
        _ => Err(unknown_command(args)),
    }
}

/// `EXPIRE`'s `NX|XX|GT|LT` options, with Redis's rules and errors.
fn expire_condition(options: &[Bytes]) -> Result<Option<ExpireCondition>, Reply> {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for opt in options {
        match upper(opt).as_ref() {
            "NX" => nx = true,
            "XX" => xx = true,
            "GT" => gt = true,
            "LT" => lt = true,
            _ => {
                return Err(Reply::error(format!(
                    "ERR Unsupported option {}",
                    shown(opt)
                )))
            }
        }
    }
    if nx && (xx || gt || lt) {
        return Err(Reply::error(
            "ERR NX and XX, GT or LT options at the same time are not compatible",
        ));
    }
    if gt && lt {
        return Err(Reply::error(
            "ERR GT and LT options at the same time are not compatible",
        ));
    }
    Ok(match (nx, xx, gt, lt) {
        (true, ..) => Some(ExpireCondition::NoDeadline),
        // A key without a deadline is never "later than" (GT implies XX).
        (_, _, true, _) => Some(ExpireCondition::Later),
        (_, true, _, true) => Some(ExpireCondition::EarlierDeadline),
        (_, _, _, true) => Some(ExpireCondition::Earlier),
        (_, true, ..) => Some(ExpireCondition::HasDeadline),
        _ => None,
    })
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`, with Redis's
/// option rules.
fn parse_set(args: &[Bytes]) -> Result<Cmd, Reply> {
    let [_, key, value, options @ ..] = args else {
        return Err(wrong_arity("set"));
    };
    let mut condition = Condition::Always;
    let mut expiry = Expiry::Never;
    // The expiry option given (`EX`, `PX`, `EXAT`, `PXAT`); Redis accepts the same
    // option twice (the last wins) but not two different ones.
    let mut expiry_kind: Option<String> = None;
    let mut keep_ttl = false;
    let mut get = false;
    let mut i = 0;
    while i < options.len() {
        let opt = upper(&options[i]);
        let next = options.get(i + 1);
        match (opt.as_ref(), next) {
            ("NX", _) if condition != Condition::IfPresent => condition = Condition::IfAbsent,
            ("XX", _) if condition != Condition::IfAbsent => condition = Condition::IfPresent,
            ("GET", _) => get = true,
            ("KEEPTTL", _) if expiry_kind.is_none() => keep_ttl = true,
            ("EX" | "PX" | "EXAT" | "PXAT", Some(amount))
                if !keep_ttl && expiry_kind.as_deref().is_none_or(|k| k == opt.as_ref()) =>
            {
                let unit = if opt.starts_with('P') { 1 } else { 1000 };
                expiry = set_expiry("set", amount, unit, opt.ends_with("AT"))?;
                expiry_kind = Some(opt.into_owned());
                i += 1;
            }
            _ => return Err(syntax()),
        }
        i += 1;
    }
    Ok(Cmd::Key {
        key: key.clone(),
        op: KeyOp::Set {
            value: value.clone(),
            expiry,
            keep_ttl,
            condition,
            reply: if get { SetReply::Old } else { SetReply::Ok },
        },
    })
}

/// `GETEX key [EX s|PX ms|EXAT s|PXAT ms|PERSIST]`.
fn parse_getex(args: &[Bytes]) -> Result<Cmd, Reply> {
    let [_, key, options @ ..] = args else {
        return Err(wrong_arity("getex"));
    };
    let op = match options {
        [] => KeyOp::GetEx(None),
        [opt] if opt.eq_ignore_ascii_case(b"persist") => KeyOp::GetEx(Some(Expiry::Never)),
        [opt, amount] => {
            let opt = upper(opt);
            let (unit, absolute) = match opt.as_ref() {
                "EX" => (1000, false),
                "PX" => (1, false),
                "EXAT" => (1000, true),
                "PXAT" => (1, true),
                _ => return Err(syntax()),
            };
            KeyOp::GetEx(Some(set_expiry("getex", amount, unit, absolute)?))
        }
        _ => return Err(syntax()),
    };
    key_cmd(key, op)
}

/// `HELLO [protover [AUTH username password] [SETNAME clientname]]`.
fn parse_hello(args: &[Bytes]) -> Result<Cmd, Reply> {
    let mut protover = None;
    let mut setname = None;
    let mut auth = false;
    if let Some(v) = args.get(1) {
        let Some(v) = parse_int(v) else {
            return Err(Reply::error(
                "ERR Protocol version is not an integer or out of range",
            ));
        };
        protover = Some(v);
        let mut i = 2;
        while i < args.len() {
            let opt = upper(&args[i]);
            match opt.as_ref() {
                "AUTH" if i + 2 < args.len() => {
                    auth = true;
                    i += 3;
                }
                "SETNAME" if i + 1 < args.len() => {
                    setname = Some(args[i + 1].clone());
                    i += 2;
                }
                _ => {
                    return Err(Reply::error(format!(
                        "ERR Syntax error in HELLO option '{}'",
                        shown(&args[i])
                    )))
                }
            }
        }
    }
    Ok(Cmd::Hello {
        protover,
        setname,
        auth,
    })
}

/// `CLIENT SETNAME|GETNAME|ID|INFO|SETINFO`.
fn parse_client(args: &[Bytes]) -> Result<Cmd, Reply> {
    let Some(sub) = args.get(1) else {
        return Err(wrong_arity("client"));
    };
    let sub = upper(sub);
    let arity = |want: usize| -> Result<(), Reply> {
        if args.len() == want {
            Ok(())
        } else {
            Err(wrong_arity(&format!("client|{}", sub.to_ascii_lowercase())))
        }
    };
    match sub.as_ref() {
        "SETNAME" => {
            arity(3)?;
            let name = &args[2];
            if name.iter().any(|&b| b <= b' ' || b > b'~') {
                return Err(Reply::error(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                ));
            }
            Ok(Cmd::ClientSetName(name.clone()))
        }
        "GETNAME" => {
            arity(2)?;
            Ok(Cmd::ClientGetName)
        }
        "ID" => {
            arity(2)?;
            Ok(Cmd::ClientId)
        }
        "INFO" => {
            arity(2)?;
            Ok(Cmd::ClientInfo)
        }
        "SETINFO" => {
            arity(4)?;
            Ok(Cmd::ClientSetInfo)
        }
        _ => Err(Reply::error(format!(
            "ERR unknown subcommand '{}'. Try CLIENT HELP.",
            shown(&args[1])
        ))),
    }
}

/// `COMMAND [COUNT|DOCS|INFO|LIST]`.
fn parse_command_cmd(args: &[Bytes]) -> Result<Cmd, Reply> {
    let Some(sub) = args.get(1) else {
        return Ok(Cmd::Command(CommandSub::Info(Vec::new())));
    };
    let names = || args[2..].iter().map(|a| lowercase(a)).collect();
    match upper(sub).as_ref() {
        "COUNT" => Ok(Cmd::Command(CommandSub::Count)),
        "DOCS" => Ok(Cmd::Command(CommandSub::Docs)),
        "INFO" => Ok(Cmd::Command(CommandSub::Info(names()))),
        "LIST" => Ok(Cmd::Command(CommandSub::List)),
        _ => Err(Reply::error(format!(
            "ERR unknown subcommand '{}'. Try COMMAND HELP.",
            shown(sub)
        ))),
    }
}

/// `COMMAND INFO` of one command, in Redis 7's shape (name, arity, flags, first key,
/// last key, step, ACL categories, tips, key specs, subcommands).
pub fn command_info(name: &str) -> Reply {
    let Some(&(name, arity, flags, first, last, step)) = COMMANDS.iter().find(|(n, ..)| *n == name)
    else {
        return Reply::NilArray;
    };
    Reply::Array(vec![
        Reply::Bulk(Bytes::from_static(name.as_bytes())),
        Reply::Int(arity),
        Reply::Set(
            flags
                .iter()
                .map(|f| Reply::Simple(Cow::Borrowed(f)))
                .collect(),
        ),
        Reply::Int(first),
        Reply::Int(last),
        Reply::Int(step),
        Reply::Set(Vec::new()),
        Reply::Set(Vec::new()),
        Reply::Array(Vec::new()),
        Reply::Array(Vec::new()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<Bytes> {
        words
            .iter()
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect()
    }

    fn parsed(words: &[&str]) -> Cmd {
        parse(&args(words)).unwrap()
    }

    fn error(words: &[&str]) -> String {
        match parse(&args(words)) {
            Err(Reply::Error(e)) => e.into_owned(),
            other => panic!("{words:?}: expected an error, got {other:?}"),
        }
    }

    fn set_op(words: &[&str]) -> KeyOp {
        match parsed(words) {
            Cmd::Key { op, .. } => op,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn set_options_follow_redis() {
        assert_eq!(
            set_op(&["set", "k", "v", "nx", "px", "150", "get"]),
            KeyOp::Set {
                value: Bytes::from_static(b"v"),
                expiry: Expiry::In(150),
                keep_ttl: false,
                condition: Condition::IfAbsent,
                reply: SetReply::Old,
            }
        );
        assert_eq!(
            set_op(&["SET", "k", "v", "EXAT", "2000000000"]),
            KeyOp::Set {
                value: Bytes::from_static(b"v"),
                expiry: Expiry::At(2_000_000_000_000),
                keep_ttl: false,
                condition: Condition::Always,
                reply: SetReply::Ok,
            }
        );
        assert_eq!(error(&["set", "k", "v", "nx", "xx"]), "ERR syntax error");
        assert!(parse(&args(&["set", "k", "v", "nx", "nx", "ex", "1", "ex", "2"])).is_ok());
        assert_eq!(
            error(&["set", "k", "v", "px", "9223372036854775807"]),
            "ERR invalid expire time in 'set' command"
        );
        assert_eq!(
            error(&["pexpire", "k", "9223372036854775807"]),
            "ERR invalid expire time in 'pexpire' command"
        );
        assert_eq!(
            error(&["set", "k", "v", "ex", "1", "px", "1"]),
            "ERR syntax error"
        );
        assert_eq!(
            error(&["set", "k", "v", "keepttl", "ex", "1"]),
            "ERR syntax error"
        );
        assert_eq!(error(&["set", "k", "v", "ex"]), "ERR syntax error");
        assert_eq!(
            error(&["set", "k", "v", "ex", "0"]),
            "ERR invalid expire time in 'set' command"
        );
        assert_eq!(
            error(&["set", "k", "v", "ex", "x"]),
            "ERR value is not an integer or out of range"
        );
        assert_eq!(
            error(&["set", "k", "v", "ex", "9223372036854775807"]),
            "ERR invalid expire time in 'set' command"
        );
        assert_eq!(
            error(&["getex", "k", "px", "9223372036854775807"]),
            "ERR invalid expire time in 'getex' command"
        );
        assert_eq!(
            error(&["psetex", "k", "9223372036854775807", "v"]),
            "ERR invalid expire time in 'psetex' command"
        );
        assert_eq!(
            error(&["set", "k"]),
            "ERR wrong number of arguments for 'set' command"
        );
    }

    #[test]
    fn unknown_commands_and_arity_have_redis_text() {
        assert_eq!(
            error(&["foo", "a", "b"]),
            "ERR unknown command 'foo', with args beginning with: 'a' 'b' "
        );
        assert_eq!(
            error(&["foo"]),
            "ERR unknown command 'foo', with args beginning with: "
        );
        assert_eq!(
            error(&["GET"]),
            "ERR wrong number of arguments for 'get' command"
        );
        assert_eq!(
            error(&["incrby", "k", "1.5"]),
            "ERR value is not an integer or out of range"
        );
        assert_eq!(
            error(&["client", "nope"]),
            "ERR unknown subcommand 'nope'. Try CLIENT HELP."
        );
        assert_eq!(
            error(&["mset", "a", "1", "b"]),
            "ERR wrong number of arguments for 'mset' command"
        );
    }

    #[test]
    fn key_commands_map_to_ops() {
        assert_eq!(set_op(&["decrby", "k", "5"]), KeyOp::Incr(-5));
        let expire = |expiry, condition| KeyOp::Expire { expiry, condition };
        assert_eq!(set_op(&["pexpire", "k", "-1"]), expire(Expiry::At(0), None));
        assert_eq!(
            set_op(&["expire", "k", "10"]),
            expire(Expiry::In(10_000), None)
        );
        assert_eq!(
            set_op(&["expireat", "k", "1"]),
            expire(Expiry::At(1000), None)
        );
        assert_eq!(
            set_op(&["expire", "k", "10", "xx", "lt"]),
            expire(Expiry::In(10_000), Some(ExpireCondition::EarlierDeadline))
        );
        assert_eq!(
            set_op(&["expire", "k", "10", "gt"]),
            expire(Expiry::In(10_000), Some(ExpireCondition::Later))
        );
        assert_eq!(
            error(&["expire", "k", "10", "nx", "gt"]),
            "ERR NX and XX, GT or LT options at the same time are not compatible"
        );
        assert_eq!(
            error(&["expire", "k", "10", "gt", "lt"]),
            "ERR GT and LT options at the same time are not compatible"
        );
        assert_eq!(
            error(&["expire", "k", "10", "bogus"]),
            "ERR Unsupported option bogus"
        );
        assert_eq!(
            set_op(&["getex", "k", "persist"]),
            KeyOp::GetEx(Some(Expiry::Never))
        );
        assert_eq!(set_op(&["getex", "k"]), KeyOp::GetEx(None));
        assert_eq!(set_op(&["del", "k"]), KeyOp::Del);
        assert_eq!(
            parsed(&["del", "a", "b"]),
            Cmd::Del(vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")])
        );
        assert!(!KeyOp::Get.is_write());
        assert!(KeyOp::GetDel.is_write() && !KeyOp::GetDel.exactly_once());
        assert!(KeyOp::Incr(1).exactly_once());
    }

    #[test]
    fn op_labels_name_the_command() {
        assert_eq!(op_label(b"GET"), "resp_get");
        assert_eq!(op_label(b"set"), "resp_set");
        assert_eq!(op_label(b"FlushAll"), "resp_flushall");
        assert_eq!(op_label(b"nosuchcommand"), "resp_unknown");
        assert_eq!(op_label(b""), "resp_unknown");
    }

    #[test]
    fn integers_parse_like_redis() {
        assert_eq!(parse_int(b"-12"), Some(-12));
        assert_eq!(parse_int(b"0"), Some(0));
        for bad in [
            &b"01"[..],
            b"-0",
            b"+1",
            b" 1",
            b"",
            b"-",
            b"9223372036854775808",
        ] {
            assert_eq!(parse_int(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn every_listed_command_parses_with_its_arity() {
        for (name, arity, ..) in COMMANDS {
            let n = arity.unsigned_abs() as usize;
            let mut words = vec![*name];
            let fill = ["k", "1", "v", "2", "x", "3"];
            words.extend(fill.iter().take(n.saturating_sub(1)));
            let r = parse(&args(&words));
            if let Err(Reply::Error(e)) = &r {
                assert!(!e.starts_with("ERR unknown command"), "{name}: {e}");
                assert!(!e.starts_with("ERR wrong number"), "{name}: {e}");
            }
        }
    }
}
