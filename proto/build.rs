//! Compiles `proto/raftcache/v1/*.proto` with protox (pure Rust, no system protoc)
//! and generates prost messages plus tonic clients and servers into `OUT_DIR` only.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/raftcache/v1/kv.proto",
        "proto/raftcache/v1/raft.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Values and keys are shared without copying between the wire and the store.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
