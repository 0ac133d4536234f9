"""redis-py, unchanged, against a RESP listener: every supported command, with the
replies the Redis documentation specifies (values, types, nil vs empty, error text).

The same module passes against a real Redis, which is how its expectations are
checked to be Redis's own:

    redis-server --port 7390 --save '' --appendonly no &
    RESP_ADDR=127.0.0.1:7390 RESP_TARGET=redis bash tests/resp/run.sh

Environment:
- RESP_ADDR    host:port of the server under test (required).
- RESP_ADDR2   another node of the same raftcache cluster (any node serves any key);
               defaults to RESP_ADDR.
- RESP_TARGET  "raftcache" (default) or "redis": only for the few places where a real
               Redis legitimately differs (each says why).

Error replies are compared in full through `Raw`, a small socket client that returns
the reply exactly as sent: redis-py strips the "ERR " prefix from exception texts.
"""

import os
import socket
import time
import uuid

import pytest
import redis


def _addr(value):
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


if not os.environ.get("RESP_ADDR"):
    raise RuntimeError("set RESP_ADDR=host:port of the RESP server under test")
ADDR = _addr(os.environ["RESP_ADDR"])
ADDR2 = _addr(os.environ.get("RESP_ADDR2") or os.environ["RESP_ADDR"])
TARGET = os.environ.get("RESP_TARGET", "raftcache")
assert TARGET in ("raftcache", "redis"), f"RESP_TARGET={TARGET!r}"

TIMEOUT = 10.0
I64_MAX = 2**63 - 1
I64_MIN = -(2**63)

ERR_INT = "ERR value is not an integer or out of range"
ERR_SYNTAX = "ERR syntax error"
ERR_OVERFLOW = "ERR increment or decrement would overflow"


# ---------------------------------------------------------------------------------
# A raw RESP connection: exact bytes in, parsed (or exact) replies out.


class Status(str):
    """A simple-string reply (+OK)."""


class Error(str):
    """An error reply (-ERR ...), without the leading '-'."""


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Raw:
    def __init__(self, addr=ADDR, timeout=TIMEOUT):
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def call(self, *args):
        """Sends one command and returns its parsed reply."""
        self.send(encode(*args))
        return self.read()

    def call_bytes(self, *args):
        """Sends one command and returns its reply exactly as sent."""
        self.send(encode(*args))
        return self.read_frame()

    def _fill(self):
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            self._fill()
        data, end, self.buf = self.buf[:n], self.buf[n : n + 2], self.buf[n + 2 :]
        assert end == b"\r\n", f"bulk not terminated by CRLF: {end!r}"
        return data

    def read_frame(self):
        """One complete reply, as the bytes the server sent."""
        self.read()
        return self._last_frame

    def read(self):
        self._frame_parts = []
        value = self._read()
        self._last_frame = b"".join(self._frame_parts)
        return value

    def _rec_line(self):
        line = self._line()
        self._frame_parts.append(line + b"\r\n")
        return line

    def _rec_exact(self, n):
        data = self._exact(n)
        self._frame_parts.append(data + b"\r\n")
        return data

    def _read(self):
        line = self._rec_line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return Status(rest.decode())
        if kind == b"-":
            return Error(rest.decode())
        if kind in (b":", b"("):
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._rec_exact(n)
        if kind in (b"*", b"~", b">"):
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        if kind == b"%":
            return {self._read(): self._read() for _ in range(int(rest))}
        if kind == b"_":
            return None
        if kind == b"#":
            return rest == b"t"
        if kind == b",":
            return float(rest)
        if kind == b"=":
            return self._rec_exact(int(rest))[4:]
        if kind == b"!":
            return Error(self._rec_exact(int(rest)).decode())
        raise AssertionError(f"not a RESP reply: {line[:80]!r}")

    def err(self, *args):
        """Sends one command that must fail; returns the error text (without '-')."""
        reply = self.call(*args)
        assert isinstance(reply, Error), f"{args!r}: expected an error, got {reply!r}"
        return str(reply)


# ---------------------------------------------------------------------------------
# Fixtures.


def client(addr=ADDR, **kw):
    kw.setdefault("decode_responses", True)
    return redis.Redis(
        host=addr[0], port=addr[1], socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, **kw
    )


@pytest.fixture
def r():
    c = client()
    yield c
    c.close()


@pytest.fixture
def rb():
    """Bytes in, bytes out."""
    c = client(decode_responses=False)
    yield c
    c.close()


@pytest.fixture
def r2():
    c = client(ADDR2)
    yield c
    c.close()


@pytest.fixture
def raw():
    c = Raw()
    yield c
    c.close()


@pytest.fixture
def key(request):
    """Unique key names for this test: key("a") -> "t:<test>:<run>:a"."""
    run = uuid.uuid4().hex[:8]
    return lambda suffix="": f"t:{request.node.name}:{run}:{suffix}"


def now_s():
    return int(time.time())


def wait_for(what, fn, want, timeout=1.0):
    """`fn()` until it returns `want`, for at most `timeout` seconds; returns the last."""
    deadline = time.monotonic() + timeout
    got = fn()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.02)
        got = fn()
    assert got == want, f"{what}: want {want!r}, got {got!r}"
    return got


# ---------------------------------------------------------------------------------
# Connection commands.


def test_ping(r, raw):
    assert r.ping() is True
    assert raw.call_bytes("PING") == b"+PONG\r\n"
    # With an argument PING is a bulk string echo, not a status.
    assert raw.call_bytes("PING", "hello") == b"$5\r\nhello\r\n"
    assert raw.call_bytes("ping", "") == b"$0\r\n\r\n"
    assert raw.err("PING", "a", "b") == "ERR wrong number of arguments for 'ping' command"


def test_echo(r, rb, raw):
    assert r.echo("hello world") == "hello world"
    assert rb.echo(b"\x00\xff\r\n") == b"\x00\xff\r\n"
    assert raw.call_bytes("ECHO", "") == b"$0\r\n\r\n"
    assert raw.err("ECHO") == "ERR wrong number of arguments for 'echo' command"
    assert raw.err("ECHO", "a", "b") == "ERR wrong number of arguments for 'echo' command"


HELLO_KEYS = {"server", "version", "proto", "id", "mode", "role", "modules"}


def check_hello(h, proto):
    h = {(k.decode() if isinstance(k, bytes) else k): v for k, v in h.items()}
    assert HELLO_KEYS <= set(h), h
    assert h["proto"] == proto, h
    assert isinstance(h["id"], int) and h["id"] > 0, h
    assert h["mode"] in ("standalone", "cluster", "sentinel", b"standalone", b"cluster"), h
    assert h["role"] in ("master", "replica", b"master", b"replica"), h
    assert isinstance(h["modules"], list), h
    version = h["version"].decode() if isinstance(h["version"], bytes) else h["version"]
    assert len(version.split(".")) == 3, h
    return h


def test_hello_3_switches_to_resp3(key):
    # redis-py sends HELLO 3 itself on connect and refuses a server that answers
    # anything but proto=3.
    r3 = client(protocol=3)
    try:
        h = r3.execute_command("HELLO", 3)
        assert isinstance(h, dict), f"HELLO 3 must be a RESP3 map: {h!r}"
        check_hello(h, 3)
        k = key("k")
        assert r3.get(k) is None
        assert r3.set(k, "v") is True
        assert r3.get(k) == "v"
        assert r3.mget([k, key("missing")]) == ["v", None]
        assert r3.exists(k, key("missing")) == 1
        assert r3.incr(key("n")) == 1
        assert r3.ttl(k) == -1
        info = r3.info()
        assert "redis_version" in info
        assert r3.client_id() > 0
    finally:
        r3.close()

    raw = Raw()
    try:
        # On the wire: a map (%), then RESP3 null (_) for a missing key.
        raw.send(encode("HELLO", "3"))
        assert raw.read_frame().startswith(b"%7\r\n")
        assert raw.call_bytes("GET", key("missing")) == b"_\r\n"
        assert raw.call_bytes("MGET", key("missing")) == b"*1\r\n_\r\n"
        # HELLO 2 goes back: a flat array of field/value pairs, nulls as $-1.
        h2 = raw.call("HELLO", "2")
        assert isinstance(h2, list) and len(h2) % 2 == 0, h2
        check_hello(dict(zip(h2[::2], h2[1::2])), 2)
        assert raw.call_bytes("GET", key("missing")) == b"$-1\r\n"
        assert raw.call_bytes("MGET", key("missing")) == b"*1\r\n$-1\r\n"
    finally:
        raw.close()


def test_hello_2_and_without_version(r, raw):
    h = r.execute_command("HELLO", 2)
    assert isinstance(h, list) and len(h) % 2 == 0, h
    check_hello(dict(zip(h[::2], h[1::2])), 2)
    # Without a version HELLO answers in the connection's current protocol.
    h = raw.call("HELLO")
    check_hello(dict(zip(h[::2], h[1::2])), 2)
    assert raw.err("HELLO", "4") == "NOPROTO unsupported protocol version"
    assert raw.err("HELLO", "1") == "NOPROTO unsupported protocol version"


def test_protocol_3_client_with_name():
    r3 = client(protocol=3, client_name="resp3-client")
    try:
        assert r3.client_getname() == "resp3-client"
    finally:
        r3.close()


def test_auth_without_password(r, raw):
    # Redis without requirepass refuses AUTH; redis-py raises AuthenticationError.
    with pytest.raises(redis.RedisError) as e:
        r.auth("secret")
    assert str(e.value).startswith("AUTH"), str(e.value)
    msg = raw.err("AUTH", "secret")
    assert msg.startswith("ERR AUTH"), msg
    assert msg == (
        "ERR AUTH <password> called without any password configured for the default user. "
        "Are you sure your configuration is correct?"
    )
    assert raw.call_bytes("PING") == b"+PONG\r\n"


def test_select(raw):
    assert raw.call_bytes("SELECT", "0") == b"+OK\r\n"
    assert raw.err("SELECT", "16") == "ERR DB index is out of range"
    assert raw.err("SELECT", "-1") == "ERR DB index is out of range"
    assert raw.err("SELECT", "abc") == ERR_INT
    # raftcache has one database, like a Redis started with `--databases 1`. A stock
    # redis-server has 16, so SELECT 1 only fails there when it was configured so.
    if TARGET == "redis" and int(raw.call("CONFIG", "GET", "databases")[1]) > 1:
        assert raw.call_bytes("SELECT", "1") == b"+OK\r\n"
        assert raw.call_bytes("SELECT", "0") == b"+OK\r\n"
    else:
        assert raw.err("SELECT", "1") == "ERR DB index is out of range"
    assert raw.call_bytes("PING") == b"+PONG\r\n"


def test_client_setname_getname_id(r, raw):
    other = client()
    try:
        assert r.client_getname() is None
        assert r.client_setname("worker-1") is True
        assert r.client_getname() == "worker-1"
        a, b = r.client_id(), other.client_id()
        assert isinstance(a, int) and isinstance(b, int) and a > 0 and b > 0
        assert a != b
        assert r.client_id() == a, "CLIENT ID is stable for a connection"
    finally:
        other.close()
    assert raw.call_bytes("CLIENT", "GETNAME") == b"$-1\r\n"
    assert raw.call_bytes("CLIENT", "SETNAME", "raw") == b"+OK\r\n"
    assert raw.call_bytes("CLIENT", "GETNAME") == b"$3\r\nraw\r\n"
    assert raw.err("CLIENT", "SETNAME", "has space") == (
        "ERR Client names cannot contain spaces, newlines or special characters."
    )
    assert raw.call("CLIENT", "ID") > 0


def test_quit_closes_connection():
    raw = Raw()
    try:
        assert raw.call_bytes("PING") == b"+PONG\r\n"
        raw.send(encode("QUIT"))
        assert raw.read_frame() == b"+OK\r\n"
        # Then the server closes the connection: EOF (or a reset), never more data.
        raw.sock.settimeout(5)
        try:
            rest = raw.buf + raw.sock.recv(1024)
        except ConnectionResetError:
            rest = b""
        assert rest == b"", f"data after QUIT: {rest!r}"
    finally:
        raw.close()


def test_unknown_command_and_wrong_arity(r, raw):
    # Redis 7's exact shape: every argument quoted, each followed by a space.
    assert (
        raw.call_bytes("foo", "a", "b")
        == b"-ERR unknown command 'foo', with args beginning with: 'a' 'b' \r\n"
    )
    assert raw.call_bytes("foo") == b"-ERR unknown command 'foo', with args beginning with: \r\n"
    with pytest.raises(redis.ResponseError) as e:
        r.execute_command("foo", "a", "b")
    assert str(e.value) == "unknown command 'foo', with args beginning with: 'a' 'b' "
    assert (
        raw.call_bytes("GET") == b"-ERR wrong number of arguments for 'get' command\r\n"
    )
    # The name in the arity error is the command's own (lower case), whatever was sent.
    assert raw.err("Get", "a", "b") == "ERR wrong number of arguments for 'get' command"
    assert raw.err("SET", "a") == "ERR wrong number of arguments for 'set' command"
    assert raw.err("MGET") == "ERR wrong number of arguments for 'mget' command"
    assert raw.err("MSET", "a") == "ERR wrong number of arguments for 'mset' command"
    assert raw.err("MSET", "a", "1", "b") == "ERR wrong number of arguments for 'mset' command"
    assert raw.err("DEL") == "ERR wrong number of arguments for 'del' command"
    assert raw.err("INCR") == "ERR wrong number of arguments for 'incr' command"
    with pytest.raises(redis.ResponseError) as e:
        r.execute_command("GET")
    assert str(e.value) == "wrong number of arguments for 'get' command"
    # The connection is still usable after errors.
    assert raw.call_bytes("PING") == b"+PONG\r\n"


def test_inline_commands(key):
    raw = Raw()
    try:
        raw.send(b"PING\r\n")
        assert raw.read_frame() == b"+PONG\r\n"
        raw.send(b"ECHO hi\r\n")
        assert raw.read_frame() == b"$2\r\nhi\r\n"
        k = key("inline")
        raw.send(f"SET {k} v1\r\nGET {k}\r\nEXISTS {k} {k}\r\n".encode())
        assert raw.read_frame() == b"+OK\r\n"
        assert raw.read_frame() == b"$2\r\nv1\r\n"
        assert raw.read_frame() == b":2\r\n"
        # An empty inline line is ignored; the next command still answers.
        raw.send(b"\r\nPING\r\n")
        assert raw.read_frame() == b"+PONG\r\n"
    finally:
        raw.close()


# ---------------------------------------------------------------------------------
# Strings: GET / SET and friends.


def test_get_set(r, raw, key):
    k = key("k")
    assert r.get(k) is None
    assert raw.call_bytes("GET", k) == b"$-1\r\n"
    assert r.set(k, "v1") is True
    assert raw.call_bytes("SET", k, "v2") == b"+OK\r\n"
    assert r.get(k) == "v2"
    # Empty string is a value, not nil.
    assert r.set(k, "") is True
    assert raw.call_bytes("GET", k) == b"$0\r\n\r\n"
    assert r.exists(k) == 1
    # "The empty string is also a valid key" (Redis docs, keys). raftcache refuses
    # empty keys in every API (gRPC's EMPTY_KEY); a documented difference.
    if TARGET == "redis":
        assert raw.call_bytes("SET", "", "empty-key") == b"+OK\r\n"
        assert raw.call_bytes("GET", "") == b"$9\r\nempty-key\r\n"
        assert raw.call_bytes("DEL", "") == b":1\r\n"
    else:
        assert raw.call_bytes("SET", "", "empty-key").startswith(b"-ERR ")
        assert raw.call_bytes("GET", "").startswith(b"-ERR ")


def test_set_expiry_options(r, key):
    k = key("k")
    assert r.set(k, "v", ex=100) is True
    assert 98 <= r.ttl(k) <= 100
    assert r.set(k, "v", px=100_000) is True
    assert 97_000 <= r.pttl(k) <= 100_000
    assert r.set(k, "v", exat=now_s() + 100) is True
    assert 97 <= r.ttl(k) <= 101
    assert r.set(k, "v", pxat=int(time.time() * 1000) + 100_000) is True
    assert 97_000 <= r.pttl(k) <= 100_000
    # A plain SET clears the TTL; KEEPTTL keeps it.
    assert r.set(k, "v") is True
    assert r.ttl(k) == -1
    assert r.set(k, "v", ex=100) is True
    assert r.set(k, "v2", keepttl=True) is True
    assert r.get(k) == "v2"
    assert 98 <= r.ttl(k) <= 100
    # A key set with PX really expires.
    e = key("short")
    assert r.set(e, "v", px=150) is True
    assert r.get(e) == "v"
    time.sleep(0.4)
    assert r.get(e) is None
    assert r.exists(e) == 0
    assert r.ttl(e) == -2


def test_set_nx_xx_get(r, raw, key):
    k = key("k")
    # XX on a missing key: nil, nothing written.
    assert r.set(k, "v", xx=True) is None
    assert raw.call_bytes("SET", k, "v", "XX") == b"$-1\r\n"
    assert r.exists(k) == 0
    # NX on a missing key sets; then NX fails (nil) and XX succeeds.
    assert r.set(k, "v1", nx=True) is True
    assert raw.call_bytes("SET", k, "other", "NX") == b"$-1\r\n"
    assert r.get(k) == "v1"
    assert r.set(k, "v2", xx=True) is True
    assert r.get(k) == "v2"
    # GET returns the old value (nil when there was none) and still sets.
    assert r.set(k, "v3", get=True) == "v2"
    assert r.get(k) == "v3"
    g = key("g")
    assert r.set(g, "first", get=True) is None
    assert r.get(g) == "first"
    # NX + GET (Redis >= 7.0): old value back, no write when the key exists...
    assert r.set(k, "v4", nx=True, get=True) == "v3"
    assert r.get(k) == "v3"
    # ... and nil with a write when it does not.
    n = key("nxget")
    assert r.set(n, "new", nx=True, get=True) is None
    assert r.get(n) == "new"
    # XX + GET on a missing key: nil, nothing written.
    x = key("xxget")
    assert r.set(x, "v", xx=True, get=True) is None
    assert r.exists(x) == 0
    # XX + GET on an existing key: old value, written.
    assert r.set(k, "v5", xx=True, get=True) == "v3"
    assert r.get(k) == "v5"
    # GET + EX together.
    assert r.set(k, "v6", ex=100, get=True) == "v5"
    assert 98 <= r.ttl(k) <= 100


def test_set_errors(raw, key):
    k = key("k")
    assert raw.err("SET", k, "v", "EX", "0") == "ERR invalid expire time in 'set' command"
    assert raw.err("SET", k, "v", "EX", "-5") == "ERR invalid expire time in 'set' command"
    assert raw.err("SET", k, "v", "PX", "0") == "ERR invalid expire time in 'set' command"
    assert raw.err("SET", k, "v", "EX", "notanumber") == ERR_INT
    assert raw.err("SET", k, "v", "PX", "1.5") == ERR_INT
    # A TTL whose expiry time overflows is an invalid expire time too.
    assert raw.err("SET", k, "v", "PX", str(I64_MAX)) == "ERR invalid expire time in 'set' command"
    assert raw.err("SET", k, "v", "EX", str(I64_MAX // 100)) == (
        "ERR invalid expire time in 'set' command"
    )
    assert raw.err("SET", k, "v", "NX", "XX") == ERR_SYNTAX
    assert raw.err("SET", k, "v", "EX", "10", "PX", "100") == ERR_SYNTAX
    assert raw.err("SET", k, "v", "EX", "10", "KEEPTTL") == ERR_SYNTAX
    assert raw.err("SET", k, "v", "EX") == ERR_SYNTAX
    assert raw.err("SET", k, "v", "BOGUS") == ERR_SYNTAX
    # None of those wrote anything.
    assert raw.call("EXISTS", k) == 0
    # Options are case-insensitive.
    assert raw.call_bytes("set", k, "v", "ex", "100", "nx") == b"+OK\r\n"


def test_setnx_setex_psetex(r, raw, key):
    k = key("k")
    assert raw.call_bytes("SETNX", k, "a") == b":1\r\n"
    assert raw.call_bytes("SETNX", k, "b") == b":0\r\n"
    assert r.setnx(k, "c") is False
    assert r.get(k) == "a"

    s = key("setex")
    assert r.setex(s, 100, "v") is True
    assert r.get(s) == "v"
    assert 98 <= r.ttl(s) <= 100
    assert raw.err("SETEX", s, "0", "v") == "ERR invalid expire time in 'setex' command"
    assert raw.err("SETEX", s, "-1", "v") == "ERR invalid expire time in 'setex' command"
    assert raw.err("SETEX", s, "x", "v") == ERR_INT

    p = key("psetex")
    assert r.psetex(p, 100_000, "v") is True
    assert r.get(p) == "v"
    assert 97_000 <= r.pttl(p) <= 100_000
    assert raw.err("PSETEX", p, "0", "v") == "ERR invalid expire time in 'psetex' command"
    assert raw.err("PSETEX", p, str(I64_MAX), "v") == (
        "ERR invalid expire time in 'psetex' command"
    )


def test_getset_getdel(r, raw, key):
    k = key("k")
    assert r.getset(k, "a") is None
    assert r.get(k) == "a"
    assert r.getset(k, "b") == "a"
    # GETSET discards the TTL, like SET.
    r.expire(k, 100)
    assert r.getset(k, "c") == "b"
    assert r.ttl(k) == -1

    assert r.getdel(k) == "c"
    assert r.exists(k) == 0
    assert r.getdel(k) is None
    assert raw.call_bytes("GETDEL", k) == b"$-1\r\n"


def test_getex(r, raw, key):
    k = key("k")
    assert r.getex(key("missing"), ex=10) is None
    r.set(k, "v")
    assert r.getex(k) == "v"
    assert r.ttl(k) == -1
    assert r.getex(k, ex=100) == "v"
    assert 98 <= r.ttl(k) <= 100
    assert r.getex(k, px=50_000) == "v"
    assert 47_000 <= r.pttl(k) <= 50_000
    assert r.getex(k, exat=now_s() + 200) == "v"
    assert 197 <= r.ttl(k) <= 201
    assert r.getex(k, pxat=int(time.time() * 1000) + 300_000) == "v"
    assert 297_000 <= r.pttl(k) <= 300_000
    assert r.getex(k, persist=True) == "v"
    assert r.ttl(k) == -1
    assert raw.err("GETEX", k, "EX", "0") == "ERR invalid expire time in 'getex' command"
    assert raw.err("GETEX", k, "EX", "abc") == ERR_INT
    assert raw.err("GETEX", k, "PX", str(I64_MAX)) == "ERR invalid expire time in 'getex' command"
    assert raw.err("GETEX", k, "PERSIST", "EX", "10") == ERR_SYNTAX
    assert raw.err("GETEX", k, "BOGUS") == ERR_SYNTAX
    assert r.ttl(k) == -1


def test_mget_mset_many_keys(r, r2, raw, key):
    keys = [key(f"m{i}") for i in range(64)]
    present = keys[::2]
    assert r.mset({k: f"val-{k}" for k in present}) is True
    got = r.mget(keys)
    assert got == [f"val-{k}" if k in present else None for k in keys]
    # On the wire: one array, nil bulk strings for the missing keys.
    frame = raw.call_bytes("MGET", keys[0], keys[1])
    assert frame == b"*2\r\n$%d\r\nval-%s\r\n$-1\r\n" % (len(f"val-{keys[0]}"), keys[0].encode())
    # The same key twice answers twice.
    assert r.mget([keys[0], keys[0]]) == [f"val-{keys[0]}"] * 2
    assert raw.call_bytes("MSET", keys[1], "x", keys[3], "y") == b"+OK\r\n"
    # MSET overwrites and, like SET, clears the TTL.
    r.expire(keys[0], 100)
    assert r.mset({keys[0]: "again"}) is True
    assert r.ttl(keys[0]) == -1
    # Written through one node, read through another (any node serves any key).
    assert r2.mget(keys[:4]) == ["again", "x", f"val-{keys[2]}", "y"]


def test_written_through_one_node_read_through_another(r, r2, key):
    keys = [key(f"x{i}") for i in range(60)]
    for i, k in enumerate(keys):
        assert r.set(k, f"v{i}") is True
    assert r2.mget(keys) == [f"v{i}" for i in range(len(keys))]
    assert r2.get(keys[7]) == "v7"
    assert r2.delete(*keys[:10]) == 10
    assert r.exists(*keys[:10]) == 0
    assert r2.incr(key("counter")) == 1
    assert r.incr(key("counter")) == 2
    assert r2.set(keys[20], "from-2", ex=100) is True
    assert r.get(keys[20]) == "from-2"
    assert 98 <= r.ttl(keys[20]) <= 100


def test_del_unlink_exists(r, raw, key):
    a, b, c = key("a"), key("b"), key("c")
    r.mset({a: "1", b: "2", c: "3"})
    assert r.exists(a) == 1
    # Every argument counts, the same key twice counts twice.
    assert r.exists(a, a, b, key("missing")) == 3
    assert raw.call_bytes("EXISTS", key("missing")) == b":0\r\n"
    assert r.delete(a, b, key("missing")) == 2
    assert r.exists(a, b, c) == 1
    assert raw.call_bytes("DEL", a) == b":0\r\n"
    r.mset({a: "1", b: "2"})
    assert r.unlink(a, b, c, key("missing")) == 3
    assert r.exists(a, b, c) == 0
    assert raw.call_bytes("UNLINK", a) == b":0\r\n"
    assert raw.err("EXISTS") == "ERR wrong number of arguments for 'exists' command"
    assert raw.err("UNLINK") == "ERR wrong number of arguments for 'unlink' command"


def test_incr_decr(r, raw, key):
    k = key("n")
    assert r.incr(k) == 1
    assert raw.call_bytes("INCR", k) == b":2\r\n"
    assert r.incrby(k, 10) == 12
    assert r.decr(k) == 11
    assert r.decrby(k, 5) == 6
    assert r.incrby(k, -10) == -4
    assert r.decrby(k, -4) == 0
    assert r.get(k) == "0"
    assert r.decr(key("fresh")) == -1
    # INCR keeps the TTL.
    r.set(k, "41", ex=100)
    assert r.incr(k) == 42
    assert 98 <= r.ttl(k) <= 100

    bad = key("bad")
    for value in ("abc", "1.5", " 1", "1 ", "", "99999999999999999999", "0x10"):
        r.set(bad, value)
        assert raw.err("INCR", bad) == ERR_INT, value
        assert r.get(bad) == value
    assert raw.err("INCRBY", k, "notint") == ERR_INT
    assert raw.err("DECRBY", k, "1.0") == ERR_INT
    assert raw.err("INCRBY", k, "99999999999999999999") == ERR_INT

    big = key("big")
    r.set(big, str(I64_MAX))
    assert raw.err("INCR", big) == ERR_OVERFLOW
    assert raw.err("INCRBY", big, "1") == ERR_OVERFLOW
    assert r.get(big) == str(I64_MAX)
    r.set(big, str(I64_MIN))
    assert raw.err("DECR", big) == ERR_OVERFLOW
    assert raw.err("DECRBY", big, "1") == ERR_OVERFLOW
    assert raw.err("INCRBY", big, "-1") == ERR_OVERFLOW
    assert r.get(big) == str(I64_MIN)
    with pytest.raises(redis.ResponseError) as e:
        r.incr(big, -1)
    assert str(e.value) == "increment or decrement would overflow"


def test_append_strlen(r, raw, key):
    k = key("k")
    assert r.strlen(k) == 0
    assert raw.call_bytes("STRLEN", k) == b":0\r\n"
    assert r.append(k, "Hello") == 5
    assert r.get(k) == "Hello"
    assert raw.call_bytes("APPEND", k, " World") == b":11\r\n"
    assert r.get(k) == "Hello World"
    assert r.strlen(k) == 11
    assert r.append(k, "") == 11
    # APPEND keeps the TTL.
    r.expire(k, 100)
    assert r.append(k, "!") == 12
    assert 98 <= r.ttl(k) <= 100
    assert r.strlen(k) == 12


def test_expire_ttl_pttl_persist(r, raw, key):
    k = key("k")
    missing = key("missing")
    assert r.ttl(missing) == -2
    assert r.pttl(missing) == -2
    assert raw.call_bytes("TTL", missing) == b":-2\r\n"
    r.set(k, "v")
    assert r.ttl(k) == -1
    assert r.pttl(k) == -1
    assert raw.call_bytes("EXPIRE", k, "100") == b":1\r\n"
    assert raw.call_bytes("EXPIRE", missing, "100") == b":0\r\n"
    assert r.expire(missing, 100) is False
    assert 98 <= r.ttl(k) <= 100
    assert r.pexpire(k, 200_000) is True
    assert 197_000 <= r.pttl(k) <= 200_000
    assert r.pexpire(missing, 1000) is False
    assert r.persist(k) is True
    assert r.ttl(k) == -1
    assert raw.call_bytes("PERSIST", k) == b":0\r\n"
    assert raw.call_bytes("PERSIST", missing) == b":0\r\n"
    assert r.expireat(k, now_s() + 100) is True
    assert 97 <= r.ttl(k) <= 101
    assert r.pexpireat(k, int(time.time() * 1000) + 100_000) is True
    assert 97_000 <= r.pttl(k) <= 100_000
    assert raw.err("EXPIRE", k, "abc") == ERR_INT
    assert raw.err("PEXPIRE", k, "1.5") == ERR_INT
    assert raw.err("PEXPIRE", k, str(I64_MAX)) == "ERR invalid expire time in 'pexpire' command"
    assert raw.err("EXPIRE", k, str(I64_MAX)) == "ERR invalid expire time in 'expire' command"
    # A non-positive timeout deletes the key (and answers 1).
    z = key("zero")
    r.set(z, "v")
    assert raw.call_bytes("EXPIRE", z, "0") == b":1\r\n"
    assert r.exists(z) == 0
    r.set(z, "v")
    assert r.pexpire(z, -1) is True
    assert r.get(z) is None
    # A short PEXPIRE really expires.
    s = key("short")
    r.set(s, "v")
    assert r.pexpire(s, 150) is True
    time.sleep(0.4)
    assert r.exists(s) == 0
    assert r.pttl(s) == -2


def test_expire_options(r, raw, key):
    # NX / XX / GT / LT (Redis >= 7.0). A key without a TTL counts as an infinite TTL
    # for GT and LT. A condition that does not hold answers 0 and changes nothing.
    k = key("k")
    r.set(k, "v")
    assert r.expire(k, 100, xx=True) is False
    assert r.expire(k, 100, gt=True) is False
    assert r.ttl(k) == -1
    assert r.expire(k, 100, nx=True) is True
    assert 98 <= r.ttl(k) <= 100
    assert r.expire(k, 500, nx=True) is False
    assert r.expire(k, 50, gt=True) is False
    assert r.expire(k, 200, gt=True) is True
    assert 198 <= r.ttl(k) <= 200
    assert r.expire(k, 300, lt=True) is False
    assert r.expire(k, 150, lt=True) is True
    assert 148 <= r.ttl(k) <= 150
    assert r.expire(k, 400, xx=True) is True
    assert 398 <= r.ttl(k) <= 400
    assert r.pexpire(k, 100_000, lt=True) is True
    assert 97_000 <= r.pttl(k) <= 100_000
    assert r.expireat(k, now_s() + 1000, gt=True) is True
    assert 997 <= r.ttl(k) <= 1001
    p = key("persistent")
    r.set(p, "v")
    assert r.expire(p, 100, lt=True) is True
    assert raw.call_bytes("EXPIRE", key("missing"), "10", "NX") == b":0\r\n"
    assert raw.err("EXPIRE", k, "10", "NX", "XX") == (
        "ERR NX and XX, GT or LT options at the same time are not compatible"
    )
    assert raw.err("EXPIRE", k, "10", "GT", "LT") == (
        "ERR GT and LT options at the same time are not compatible"
    )
    assert raw.err("EXPIRE", k, "10", "BOGUS") == "ERR Unsupported option BOGUS"


def test_expireat_in_the_past_deletes(r, raw, key):
    k = key("k")
    r.set(k, "v")
    assert raw.call_bytes("EXPIREAT", k, str(now_s() - 100)) == b":1\r\n"
    assert r.exists(k) == 0
    assert r.get(k) is None
    assert r.ttl(k) == -2
    r.set(k, "v")
    assert r.pexpireat(k, 1) is True
    assert r.exists(k) == 0
    assert raw.call_bytes("EXPIREAT", k, str(now_s() + 100)) == b":0\r\n"


def test_type(r, raw, key):
    k = key("k")
    r.set(k, "v")
    assert r.type(k) == "string"
    assert raw.call_bytes("TYPE", k) == b"+string\r\n"
    assert r.type(key("missing")) == "none"
    assert raw.call_bytes("TYPE", key("missing")) == b"+none\r\n"
    r.set(key("n"), 12)
    assert r.type(key("n")) == "string"


# ---------------------------------------------------------------------------------
# Server commands.


def test_flushall_dbsize_keyspace(r, raw, key):
    assert r.flushall() is True
    # raftcache applies the flush and the writes on every replica through Raft; the
    # node answering may apply them a moment after the leader acknowledged them, so
    # the counts are polled briefly (Redis has them at once).
    wait_for("DBSIZE after FLUSHALL", r.dbsize, 0)
    assert raw.call_bytes("DBSIZE") == b":0\r\n"
    n = 37
    for i in range(n):
        r.set(key(f"k{i}"), i)
    r.set(key("k0"), "overwritten, not a new key")
    wait_for("DBSIZE after sets", r.dbsize, n)
    db0 = wait_for(
        "INFO keyspace db0 keys",
        lambda: r.info("keyspace").get("db0", {}).get("keys"),
        n,
    )
    assert db0 == n
    r.set(key("ttl"), "v", ex=100)
    # expires: the number of keys with a TTL.
    wait_for(
        "INFO keyspace db0",
        lambda: {k: v for k, v in r.info("keyspace").get("db0", {}).items() if k != "avg_ttl"},
        {"keys": n + 1, "expires": 1},
    )
    assert raw.call_bytes("FLUSHALL") == b"+OK\r\n"
    wait_for("DBSIZE after FLUSHALL", r.dbsize, 0)
    assert r.get(key("k1")) is None
    assert "db0" not in r.info("keyspace")


def test_info(r, key):
    info = r.info()
    for field in ("redis_version", "connected_clients", "used_memory", "keyspace_hits", "role"):
        assert field in info, f"INFO lacks {field}: {sorted(info)}"
    assert info["role"] == "master"
    assert isinstance(info["connected_clients"], int) and info["connected_clients"] >= 1
    assert isinstance(info["used_memory"], int) and info["used_memory"] > 0

    server = r.info("server")
    assert len(str(server["redis_version"]).split(".")) == 3, server
    assert "used_memory" not in server, "INFO server shows only its section"
    assert isinstance(server.get("uptime_in_seconds"), int), server
    assert isinstance(server.get("tcp_port"), int), server

    clients = r.info("clients")
    assert clients["connected_clients"] >= 1
    assert "redis_version" not in clients

    memory = r.info("memory")
    assert isinstance(memory["used_memory"], int) and memory["used_memory"] > 0

    replication = r.info("replication")
    assert replication["role"] == "master"

    k = key("hit")
    r.set(k, "v")
    stats = r.info("stats")
    hits, misses = stats["keyspace_hits"], stats["keyspace_misses"]
    assert isinstance(hits, int) and isinstance(misses, int)
    assert r.get(k) == "v"
    assert r.get(key("miss")) is None
    stats = r.info("stats")
    assert stats["keyspace_hits"] >= hits + 1, (hits, stats["keyspace_hits"])
    assert stats["keyspace_misses"] >= misses + 1, (misses, stats["keyspace_misses"])
    assert isinstance(stats.get("total_commands_processed"), int), stats
    assert isinstance(stats.get("total_connections_received"), int), stats

    # An unknown section is empty, not an error.
    assert r.info("nosuchsection") == {}
    assert isinstance(r.info("keyspace"), dict)
    # A connection counted in connected_clients.
    before = r.info("clients")["connected_clients"]
    extra = client()
    try:
        extra.ping()
        assert r.info("clients")["connected_clients"] >= before + 1
    finally:
        extra.close()


def test_command(r, raw):
    count = r.command_count()
    assert isinstance(count, int) and count > 0
    assert raw.call_bytes("COMMAND", "COUNT") == b":%d\r\n" % count
    # redis-cli asks for COMMAND DOCS at start-up: an array (or map), maybe empty.
    docs = raw.call("COMMAND", "DOCS")
    assert isinstance(docs, list), docs
    docs = raw.call("COMMAND", "DOCS", "get")
    assert isinstance(docs, list), docs
    # COMMAND lists one entry per command: [name, arity, flags, first, last, step, ...].
    table = raw.call("COMMAND")
    assert isinstance(table, list) and len(table) == count, (len(table), count)
    names = {e[0].decode().lower() for e in table}
    for name in ("get", "set", "mget", "del", "ping", "info", "expire", "incr"):
        assert name in names, f"COMMAND lacks {name}"
    get = next(e for e in table if e[0].decode().lower() == "get")
    assert get[1] == 2, f"GET arity: {get!r}"
    info = raw.call("COMMAND", "INFO", "get", "nosuchcommand")
    assert len(info) == 2 and info[1] is None and info[0][0] == b"get", info


# ---------------------------------------------------------------------------------
# Pipelines, binary safety, big values.


def test_pipeline_1000(r, key):
    keys = [key(f"p{i}") for i in range(1000)]
    pipe = r.pipeline(transaction=False)
    for i, k in enumerate(keys):
        pipe.set(k, f"value-{i}")
    assert pipe.execute() == [True] * 1000
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.get(k)
    pipe.get(key("missing"))
    assert pipe.execute() == [f"value-{i}" for i in range(1000)] + [None]
    pipe = r.pipeline(transaction=False)
    pipe.incr(key("pc"))
    pipe.incr(key("pc"))
    pipe.execute_command("NOSUCHCOMMAND")
    pipe.get(key("pc"))
    out = pipe.execute(raise_on_error=False)
    assert out[:2] == [1, 2] and out[3] == "2", out
    assert isinstance(out[2], redis.ResponseError), out
    assert r.delete(*keys) == 1000


def test_raw_pipeline_in_one_write(raw, key):
    k = key("k")
    raw.send(encode("SET", k, "1") + encode("INCR", k) + encode("GET", k) + encode("BOGUS"))
    assert raw.read_frame() == b"+OK\r\n"
    assert raw.read_frame() == b":2\r\n"
    assert raw.read_frame() == b"$1\r\n2\r\n"
    assert raw.read_frame().startswith(b"-ERR unknown command 'BOGUS'")


def test_binary_safe_keys_and_values(rb, key):
    value = bytes(range(256))
    k = key("bin").encode() + b"\x00\r\n\xff"
    assert rb.set(k, value) is True
    assert rb.get(k) == value
    assert rb.strlen(k) == 256
    assert rb.exists(k) == 1
    assert rb.get(k[:-1]) is None, "keys are compared byte by byte"
    assert rb.append(k, b"\x00") == 257
    assert rb.get(k) == value + b"\x00"
    assert rb.mget([k, b"\xff\xfe"]) == [value + b"\x00", None]
    assert rb.delete(k) == 1


def test_one_mib_value(rb, key):
    big = os.urandom(1 << 20)
    k = key("big")
    assert rb.set(k, big) is True
    assert rb.get(k) == big
    assert rb.strlen(k) == len(big)
    assert rb.getdel(k) == big
    assert rb.exists(k) == 0


def test_one_mib_value_through_another_node(rb, key):
    big = os.urandom(1 << 20)
    k = key("big")
    other = client(ADDR2, decode_responses=False)
    try:
        assert rb.set(k, big) is True
        assert other.get(k) == big
    finally:
        other.close()
