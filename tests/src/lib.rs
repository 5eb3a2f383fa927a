//! decant integration-test support: the throwaway-cluster harness shared by
//! the tests under `tests/tests/`.

mod cluster;

pub use cluster::Cluster;
pub mod certs;
pub mod process;
pub mod slot;
pub mod task;
pub mod versions;
