//! The walsender client and the pgoutput decoder of `raftcache-cdc` against a real,
//! throwaway PostgreSQL ([`PgCluster`]): SCRAM/MD5/cleartext authentication,
//! replication commands, the decoded change stream, confirming progress, keepalives.
//!
//! Every wait is bounded, so a failure is an error and never a hang.

#![allow(clippy::unwrap_used)]

use raftcache_cdc::lsn::Lsn;
use raftcache_cdc::pgoutput::{self, Message, OldKind, TupleValue};
use raftcache_cdc::walsender::{
    pg_time, ConnectConfig, Error, ReplicationConnection, ReplicationMessage, ReplicationStream,
};
use raftcache_tests::pg::PgCluster;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

/// The bound on each phase of a test.
const T: Duration = Duration::from_secs(30);

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(T, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no result within {T:?}"),
    }
}

/// Starts a cluster off the async thread (initdb and pg_ctl block).
async fn start_pg() -> PgCluster {
    tokio::task::spawn_blocking(PgCluster::start)
        .await
        .unwrap()
        .unwrap()
}

async fn connect(url: &str) -> Result<ReplicationConnection, Error> {
    let cfg = ConnectConfig::from_url(url)?;
    within("replication connect", ReplicationConnection::connect(&cfg)).await
}

/// Creates `users` with `REPLICA IDENTITY FULL` and publication `pub_users` for it;
/// returns the table's OID.
async fn create_users(db: &tokio_postgres::Client) -> u32 {
    db.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, email text, name text);
         ALTER TABLE users REPLICA IDENTITY FULL;
         CREATE PUBLICATION pub_users FOR TABLE users;",
    )
    .await
    .unwrap();
    let row = db
        .query_one("SELECT 'users'::regclass::oid", &[])
        .await
        .unwrap();
    row.get::<_, u32>(0)
}

fn pubs() -> Vec<String> {
    vec!["pub_users".to_owned()]
}

/// Reads the stream until `n` non-empty transactions (`Begin ..= Commit`) are
/// decoded, answering keepalives that ask for a reply (without confirming anything).
async fn next_txns(stream: &mut ReplicationStream, n: usize) -> Vec<Vec<Message>> {
    let mut txns = Vec::new();
    let mut current: Option<Vec<Message>> = None;
    while txns.len() < n {
        match stream.next().await.unwrap().expect("stream ended") {
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                if reply_requested {
                    stream
                        .send_status(wal_end, Lsn(0), Lsn(0), false)
                        .await
                        .unwrap();
                }
            }
            ReplicationMessage::XLogData { data, .. } => {
                let msg = pgoutput::decode(&data).unwrap();
                match msg {
                    Message::Begin(_) => {
                        assert!(current.is_none(), "Begin inside a transaction");
                        current = Some(vec![msg]);
                    }
                    Message::Commit(_) => {
                        let mut t = current.take().expect("Commit without Begin");
                        t.push(msg);
                        if t.len() > 2 {
                            txns.push(t);
                        }
                    }
                    other => current
                        .as_mut()
                        .expect("change outside a transaction")
                        .push(other),
                }
            }
        }
    }
    txns
}

fn text(s: &str) -> TupleValue {
    TupleValue::Text(bytes::Bytes::copy_from_slice(s.as_bytes()))
}

fn row(id: &str, email: &str, name: &str) -> Vec<TupleValue> {
    vec![text(id), text(email), text(name)]
}

fn commit_of(txn: &[Message]) -> pgoutput::Commit {
    match txn.last() {
        Some(Message::Commit(c)) => *c,
        other => panic!("transaction does not end in a Commit: {other:?}"),
    }
}

/// Polls until the slot has no walsender (after a client went away).
async fn wait_slot_inactive(db: &tokio_postgres::Client, slot: &str) {
    within("slot to become inactive", async {
        loop {
            let active: bool = db
                .query_one(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .unwrap()
                .get(0);
            if !active {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_connect_and_identify_system() {
    let mut pg = start_pg().await;
    let db = pg.superuser_client().await;
    let expected_id: i64 = db
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await
        .unwrap()
        .get(0);

    // --- SCRAM login (the only method pg_hba.conf allows) + IDENTIFY_SYSTEM
    let mut conn = connect(&pg.url()).await.unwrap();
    assert!(conn.parameter("server_version").is_some());
    let info = within("IDENTIFY_SYSTEM", conn.identify_system())
        .await
        .unwrap();
    assert_eq!(info.systemid, expected_id.to_string());
    assert_eq!(info.timeline, 1);
    assert!(info.xlogpos > Lsn(0));
    assert_eq!(info.dbname.as_deref(), Some("app"));
    let methods: Vec<String> = db
        .query(
            "SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE type = 'host'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(methods, vec!["scram-sha-256".to_owned()]);

    // --- plain SQL and SHOW work on a replication connection too
    let rows = within("SHOW", conn.simple_query("SHOW wal_level"))
        .await
        .unwrap();
    assert_eq!(rows, vec![vec![Some("logical".to_owned())]]);
    let e = within("bad SQL", conn.simple_query("SELECT nope"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("42703"), "{e}");
    conn.close().await;

    // --- the harness restarts in place: same port, same cluster
    tokio::task::block_in_place(|| pg.restart()).unwrap();
    let mut conn = connect(&pg.url()).await.unwrap();
    let again = within("IDENTIFY_SYSTEM", conn.identify_system())
        .await
        .unwrap();
    assert_eq!(again.systemid, info.systemid);
}

#[tokio::test]
async fn streams_decoded_changes() {
    let pg = start_pg().await;
    let db = pg.client().await;
    let oid = create_users(&db).await;

    let mut conn = connect(&pg.url()).await.unwrap();
    let start = within(
        "create slot",
        conn.create_logical_slot("t60_stream", "pgoutput"),
    )
    .await
    .unwrap();
    assert!(start > Lsn(0));
    // A second create is recognisably "already exists" (and the connection survives).
    let dup = within(
        "create slot again",
        conn.create_logical_slot("t60_stream", "pgoutput"),
    )
    .await
    .unwrap_err();
    assert!(dup.is_duplicate_object(), "{dup:?}");
    let mut stream = within(
        "start replication",
        conn.start_replication("t60_stream", start, &pubs()),
    )
    .await
    .unwrap();

    // --- one transaction per statement, then a multi-row transaction
    for sql in [
        "INSERT INTO users VALUES (1, 'a@example.com', 'Ann')",
        "UPDATE users SET email = 'b@example.com' WHERE id = 1",
        "DELETE FROM users WHERE id = 1",
        "TRUNCATE users",
        "BEGIN; INSERT INTO users VALUES (2, 'c@example.com', NULL); \
         INSERT INTO users VALUES (3, 'd@example.com', 'Dee'); COMMIT",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    let txns = within("5 transactions", next_txns(&mut stream, 5)).await;

    // --- shape: Begin, changes, Commit; begin/commit LSNs agree; end LSNs increase
    let mut last_end = start;
    let mut xids = Vec::new();
    for t in &txns {
        let Message::Begin(b) = &t[0] else {
            panic!("transaction does not start with Begin: {t:?}")
        };
        let c = commit_of(t);
        assert_eq!(b.final_lsn, c.commit_lsn);
        assert_eq!(b.commit_ts_us, c.commit_ts_us);
        assert!(
            c.end_lsn > c.commit_lsn && c.end_lsn > last_end,
            "{c:?} after {last_end}"
        );
        last_end = c.end_lsn;
        let age = SystemTime::now()
            .duration_since(pg_time(c.commit_ts_us))
            .unwrap_or_default();
        assert!(age < Duration::from_secs(120), "commit time {age:?} ago");
        xids.push(b.xid);
    }
    xids.dedup();
    assert_eq!(xids.len(), 5, "distinct xids: {xids:?}");

    // --- T1: the relation, then the insert
    let Message::Relation(rel) = &txns[0][1] else {
        panic!("no Relation before the first change: {:?}", txns[0])
    };
    assert_eq!(rel.id, oid);
    assert_eq!(
        (rel.namespace.as_str(), rel.name.as_str()),
        ("public", "users")
    );
    assert_eq!(rel.replica_identity, 'f');
    let cols: Vec<(&str, u32, bool)> = rel
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_oid, c.is_key()))
        .collect();
    // int4 = 23, text = 25; with REPLICA IDENTITY FULL every column is "key".
    assert_eq!(
        cols,
        vec![("id", 23, true), ("email", 25, true), ("name", 25, true)]
    );
    assert_eq!(
        txns[0][2],
        Message::Insert(pgoutput::Insert {
            rel: oid,
            new: row("1", "a@example.com", "Ann")
        })
    );
    assert_eq!(txns[0].len(), 4);
    // Later transactions may describe the table again: pgoutput forgets what it sent
    // whenever the table's relcache entry is invalidated, and TRUNCATE (like any DDL)
    // does that. A repeated description must be the same.
    let changes = |t: &[Message]| -> Vec<Message> {
        t[1..t.len() - 1]
            .iter()
            .filter(|m| match m {
                Message::Relation(r) => {
                    assert_eq!(r, rel, "the table's description changed");
                    false
                }
                _ => true,
            })
            .cloned()
            .collect()
    };

    // --- T2: update with the full old row
    assert_eq!(
        changes(&txns[1]),
        [Message::Update(pgoutput::Update {
            rel: oid,
            old: Some((OldKind::Old, row("1", "a@example.com", "Ann"))),
            new: row("1", "b@example.com", "Ann"),
        })]
    );
    // --- T3: delete with the full old row
    assert_eq!(
        changes(&txns[2]),
        [Message::Delete(pgoutput::Delete {
            rel: oid,
            old: (OldKind::Old, row("1", "b@example.com", "Ann")),
        })]
    );
    // --- T4: truncate
    assert_eq!(
        changes(&txns[3]),
        [Message::Truncate(pgoutput::Truncate {
            options: 0,
            rels: vec![oid]
        })]
    );
    // --- T5: two inserts in one transaction, NULL kept
    assert_eq!(
        changes(&txns[4]),
        [
            Message::Insert(pgoutput::Insert {
                rel: oid,
                new: vec![text("2"), text("c@example.com"), TupleValue::Null]
            }),
            Message::Insert(pgoutput::Insert {
                rel: oid,
                new: row("3", "d@example.com", "Dee")
            }),
        ]
    );
    within("close", stream.close()).await.unwrap();
}

#[tokio::test]
async fn confirmed_flush_is_not_resent() {
    let pg = start_pg().await;
    let db = pg.client().await;
    create_users(&db).await;
    let slot = "t60_confirm";

    let mut conn = connect(&pg.url()).await.unwrap();
    let start = within("create slot", conn.create_logical_slot(slot, "pgoutput"))
        .await
        .unwrap();
    let mut stream = within("start", conn.start_replication(slot, start, &pubs()))
        .await
        .unwrap();

    // --- receive T1, confirm it as flushed
    db.batch_execute("INSERT INTO users VALUES (1, 'a@x', 'A')")
        .await
        .unwrap();
    let t1 = within("T1", next_txns(&mut stream, 1)).await;
    let end1 = commit_of(&t1[0]).end_lsn;
    stream.send_status(end1, end1, end1, false).await.unwrap();
    within("confirmed_flush_lsn to advance", async {
        loop {
            let lsn: String = db
                .query_one(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .unwrap()
                .get(0);
            let lsn: Lsn = lsn.parse().unwrap();
            assert!(lsn <= end1, "confirmed {lsn} beyond what was sent ({end1})");
            if lsn == end1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    within("close", stream.close()).await.unwrap();
    wait_slot_inactive(&db, slot).await;

    // --- restart from the slot (0/0): T1 is not sent again, T2 is
    db.batch_execute("INSERT INTO users VALUES (2, 'b@x', 'B')")
        .await
        .unwrap();
    let conn = connect(&pg.url()).await.unwrap();
    let mut stream = within("restart", conn.start_replication(slot, Lsn(0), &pubs()))
        .await
        .unwrap();
    let t2 = within("T2", next_txns(&mut stream, 1)).await;
    let inserts: Vec<_> = t2[0]
        .iter()
        .filter_map(|m| match m {
            Message::Insert(i) => Some(i.new[0].clone()),
            _ => None,
        })
        .collect();
    assert_eq!(inserts, vec![text("2")], "{:?}", t2[0]);
    // A new session describes the table again before using it.
    assert!(matches!(t2[0][1], Message::Relation(_)), "{:?}", t2[0]);

    // --- without a confirmation, an abrupt disconnect means T2 comes again
    drop(stream);
    wait_slot_inactive(&db, slot).await;
    let conn = connect(&pg.url()).await.unwrap();
    let mut stream = within("restart", conn.start_replication(slot, Lsn(0), &pubs()))
        .await
        .unwrap();
    let again = within("T2 again", next_txns(&mut stream, 1)).await;
    assert_eq!(commit_of(&again[0]), commit_of(&t2[0]));
}

#[tokio::test]
async fn keepalive_replies_keep_the_stream_alive() {
    let pg = start_pg().await;
    let db = pg.client().await;
    create_users(&db).await;
    let su = pg.superuser_client().await;
    // (ALTER SYSTEM cannot run in the implicit transaction of a multi-statement query.)
    su.batch_execute("ALTER SYSTEM SET wal_sender_timeout = '2s'")
        .await
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").await.unwrap();

    // New walsenders pick the setting up once the postmaster has reloaded.
    let mut conn = within("walsender with the new timeout", async {
        loop {
            let mut conn = connect(&pg.url()).await.unwrap();
            let rows = conn.simple_query("SHOW wal_sender_timeout").await.unwrap();
            if rows == vec![vec![Some("2s".to_owned())]] {
                return conn;
            }
            conn.close().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let start = conn
        .create_logical_slot("t60_keepalive", "pgoutput")
        .await
        .unwrap();
    let mut stream = conn
        .start_replication("t60_keepalive", start, &pubs())
        .await
        .unwrap();

    // --- answer keepalives for three timeouts' worth of time
    let began = Instant::now();
    let (mut requested, mut unrequested) = (0, 0);
    let mut first = None;
    while began.elapsed() < Duration::from_secs(7) {
        let m = within("a keepalive", stream.next()).await.unwrap();
        match m.expect("stream ended while replying to keepalives") {
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                first.get_or_insert(began.elapsed());
                if reply_requested {
                    requested += 1;
                    stream
                        .send_status(wal_end, wal_end, wal_end, false)
                        .await
                        .unwrap();
                } else {
                    unrequested += 1;
                }
            }
            ReplicationMessage::XLogData { .. } => {}
        }
    }
    eprintln!(
        "keepalives with wal_sender_timeout=2s over 7s: first after {first:?}, \
         {requested} asking for a reply, {unrequested} not"
    );
    assert!(
        requested >= 2,
        "only {requested} keepalives asked for a reply"
    );

    // --- the stream still delivers changes
    db.batch_execute("INSERT INTO users VALUES (1, 'a@x', 'A')")
        .await
        .unwrap();
    let t = within("insert after keepalives", next_txns(&mut stream, 1)).await;
    assert!(matches!(t[0][t[0].len() - 2], Message::Insert(_)), "{t:?}");

    // --- a client that stops answering is disconnected by the server
    let silent = Instant::now();
    let end = within("the server to give up on a silent client", async {
        loop {
            match stream.next().await {
                Ok(Some(_)) => {}
                Ok(None) => return "closed".to_owned(),
                Err(e) => return e.to_string(),
            }
        }
    })
    .await;
    eprintln!("silent client dropped after {:?}: {end}", silent.elapsed());
    within("the timeout in the server log", async {
        while !pg.log().contains("replication timeout") {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn authentication_methods_and_failures() {
    let pg = start_pg().await;
    let su = pg.superuser_client().await;
    su.batch_execute(
        "SET password_encryption = 'md5';
         CREATE ROLE md5user LOGIN REPLICATION PASSWORD 'md5pw';
         RESET password_encryption;
         CREATE ROLE plainuser LOGIN REPLICATION PASSWORD 'plainpw';
         CREATE ROLE norepl LOGIN PASSWORD 'pw';
         CREATE ROLE \"odd user\" LOGIN REPLICATION PASSWORD 'p@ss:w/rd%?''';",
    )
    .await
    .unwrap();
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "host all md5user 127.0.0.1/32 md5\nhost all plainuser 127.0.0.1/32 password\n{old}"
        ),
    )
    .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let url = |user: &str, pw: &str| format!("postgres://{user}:{pw}@127.0.0.1:{}/app", pg.port());

    // --- MD5 and cleartext (retried until the postmaster has reloaded pg_hba.conf)
    for (user, pw) in [("md5user", "md5pw"), ("plainuser", "plainpw")] {
        within(user, async {
            loop {
                match connect(&url(user, pw)).await {
                    Ok(mut c) => {
                        c.identify_system().await.unwrap();
                        return;
                    }
                    Err(Error::Auth(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(e) => panic!("{user}: {e}"),
                }
            }
        })
        .await;
    }

    // --- percent-encoded credentials
    let mut c = connect(&format!(
        "postgres://odd%20user:p%40ss%3Aw%2Frd%25%3F%27@127.0.0.1:{}/app?sslmode=prefer",
        pg.port()
    ))
    .await
    .unwrap();
    c.identify_system().await.unwrap();

    // --- wrong password, unknown user: a clear authentication error
    for (user, pw) in [
        ("app", "wrong"),
        ("nobody", "x"),
        ("md5user", "wrong"),
        ("plainuser", "wrong"),
    ] {
        let e = connect(&url(user, pw)).await.unwrap_err();
        assert!(
            matches!(&e, Error::Auth(m) if m.contains("password authentication failed")),
            "{user}: {e:?}"
        );
        assert!(e.to_string().starts_with("authentication failed"), "{e}");
    }
    let e = connect(&format!("postgres://app@127.0.0.1:{}/app", pg.port()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Auth(m) if m.contains("none is configured")),
        "{e:?}"
    );

    // --- a role without REPLICATION is refused with its SQLSTATE
    let e = connect(&url("norepl", "pw")).await.unwrap_err();
    assert_eq!(e.code(), Some("42501"), "{e:?}");
}
