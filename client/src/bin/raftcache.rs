//! The `raftcache` command line; everything lives in [`raftcache_client::cli`].

fn main() -> std::process::ExitCode {
    raftcache_client::cli::main()
}
