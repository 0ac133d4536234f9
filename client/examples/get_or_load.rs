//! The README's `get_or_load` snippet ("Client resilience"), built by `cargo test` and
//! `cargo build --examples` so that it keeps compiling.
//!
//! Run it against `raftcache dev` — or with no cache running at all: the client then
//! starts without a cluster map and `get_or_load` calls the loader (degraded mode):
//!
//! ```sh
//! cargo run -p raftcache-client --example get_or_load
//! ```

use raftcache_client::{Bytes, Client, ClientConfig, LoadOptions};
use std::time::Duration;

/// Stands for the application's database query.
async fn load_user_row(id: u64) -> anyhow::Result<String> {
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(format!("{{\"id\":{id},\"name\":\"Ada\"}}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The README snippet, verbatim (up to the blank line).
    let client = Client::connect(ClientConfig::new(["127.0.0.1:7001"])).await?;
    let options = LoadOptions::ttl(Duration::from_secs(60)) // fresh for 60 s,
        .stale_while_revalidate(Duration::from_secs(10)); // then served stale 10 s more
    let user = client
        .get_or_load("user:42", options, || async {
            let row: String = load_user_row(42).await?; // your query: runs once
            Ok(Bytes::from(row)) // loaders return Bytes
        })
        .await?; // user.value, user.source

    println!(
        "user:42 = {} (from {:?})",
        String::from_utf8_lossy(&user.value),
        user.source
    );
    Ok(())
}
