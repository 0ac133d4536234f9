//! `raftcache-jepsen`: see `raftcache_tests::jepsen::cli`.
fn main() -> std::process::ExitCode {
    raftcache_tests::jepsen::cli::main()
}
