//! The `raftcache-node` binary; everything lives in the library.

fn main() -> std::process::ExitCode {
    raftcache_node::cli::main()
}
