//! decant's agent-side library: the commands of the `decant` binary.

pub mod alert;
pub mod applier;
pub mod cli;
pub mod config;
pub mod connect;
pub mod cutover;
pub mod ddl;
pub mod error;
pub mod inspect;
pub mod metrics;
pub mod migrate;
pub mod precheck;
pub mod quote;
pub mod replication;
pub mod retry;
pub mod secrets;
pub mod status;
pub mod stream;
pub mod task;
pub mod throttle;
pub mod transport;
pub mod verify;
