//! The destination side: applying records, and the gRPC server that
//! receives them from the agent.

pub mod apply;
pub mod progress;
pub mod statements;
