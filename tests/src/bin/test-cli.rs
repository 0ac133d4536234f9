//! The `raftcache` CLI under a name the process tests can find (`CARGO_BIN_EXE_test-cli`).
fn main() -> std::process::ExitCode {
    raftcache_client::cli::main()
}
