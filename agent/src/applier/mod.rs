//! The destination side: applying the stream's records exactly once, and
//! running the schema steps and copied ranges of a migration.
//!
//! The stream: `apply` reads records and dispatches each change; `fold`
//! nets a group's changes per key; `stage` and `merge` apply them set-based
//! through staging tables; `rowwise` applies what cannot fold, in source
//! order; `commit` groups source transactions into destination
//! transactions and decides what may be acknowledged; `progress` keeps the
//! position in the same transaction as the data. `cells` and `statements`
//! are the per-table shapes they share. `migration` runs the schema steps
//! and copied ranges. `service` answers the gRPC server's calls with all
//! this; the server itself is plumbing in `transport`.

pub mod apply;
pub mod cells;
pub mod commit;
pub mod fold;
pub mod merge;
pub mod migration;
pub mod progress;
pub mod rowwise;
pub mod service;
pub mod stage;
pub mod statements;

pub use service::Service;

/// The `application_name`s of a task's applier sessions on the
/// destination (the main one, and the second of `split_merges`), by which
/// `decant cutover` ends them.
pub fn session_names(task_id: &str) -> [String; 2] {
    [format!("decant applier {task_id}"), format!("decant applier {task_id} (second)")]
}
