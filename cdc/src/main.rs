//! `raftcache-cdc --config cdc.toml`: see [`raftcache_cdc::cli`].

fn main() -> std::process::ExitCode {
    raftcache_cdc::cli::main()
}
