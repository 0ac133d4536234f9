//! `raftcache-node` under a name the process tests can find (`CARGO_BIN_EXE_test-node`).
fn main() -> std::process::ExitCode {
    raftcache_node::cli::main()
}
