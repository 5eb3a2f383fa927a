//! The destination side: applying the stream's records exactly once, and
//! running the schema steps and copied ranges of a migration. `service`
//! answers the gRPC server's calls with this work; the server itself is
//! plumbing in `transport`.

pub mod apply;
pub mod bulk;
pub mod cells;
pub mod migration;
pub mod progress;
pub mod service;
pub mod statements;

pub use service::Service;
