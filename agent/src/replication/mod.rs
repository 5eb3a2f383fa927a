//! The walsender side: our own streaming replication client, the messages
//! of the replication sub-protocol, and slot commands.

pub mod client;
pub mod decoder;
pub mod messages;
pub mod slot;

pub use client::{ReplicationClient, ReplicationError, Streamed};
