//! `raftcache-cdc` under a name the process tests can find (`CARGO_BIN_EXE_test-cdc`).
fn main() -> std::process::ExitCode {
    raftcache_cdc::cli::main()
}
