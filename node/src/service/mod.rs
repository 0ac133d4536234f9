//! gRPC front end of the node: the `raftcache.v1.Cache` service and the single
//! error-to-status mapping.
//!
//! ```text
//! tonic ──► kv::CacheService ──► storage::Engine
//!                 │
//!                 └─ errors ──► status::to_status ──► tonic::Status + ErrorDetail
//! ```

pub mod kv;
pub mod raft;
pub mod status;

pub use kv::CacheService;
pub use raft::RaftService;
