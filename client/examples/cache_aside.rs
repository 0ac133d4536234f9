//! The README's exact cache-aside fill (`set_if_fresh`, in "Postgres-backed apps"),
//! built by `cargo test` and `cargo build --examples` so that it keeps compiling.
//!
//! Run it against `raftcache dev` and the README's `users` table:
//!
//! ```sh
//! cargo run -p raftcache-client --example cache_aside -- postgres://app:secret@127.0.0.1:5432/app 1
//! ```

use raftcache_client::{Client, ClientConfig, PgSnapshot};
use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "postgres://app:secret@127.0.0.1:5432/app".to_owned());
    let id: i32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1);
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("postgres connection: {e}");
        }
    });
    let cache = Client::connect(ClientConfig::new(["127.0.0.1:7001"])).await?;
    let ttl = Duration::from_secs(600);

    // The README snippet, verbatim (up to the blank line).
    let row = db
        .query_one(
            "SELECT pg_current_snapshot()::text, name FROM users WHERE id = $1",
            &[&id],
        )
        .await?;
    let snapshot: PgSnapshot = row.get::<_, String>(0).parse()?;
    let name: String = row.get(1);
    let outcome = cache
        .set_if_fresh(format!("user:{id}"), name.clone(), &snapshot, Some(ttl))
        .await?;
    // outcome.refused_by == Some(lsn): a newer commit invalidated the key; serve `name`, don't cache it.

    match outcome.refused_by {
        Some(lsn) => println!("serving {name:?} uncached: the key was invalidated at {lsn}"),
        None => println!("cached user:{id} = {name:?} (version {})", outcome.version),
    }
    Ok(())
}
