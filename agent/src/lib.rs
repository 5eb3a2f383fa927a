//! decant's agent-side library: the commands of the `decant` binary.

pub mod cli;
pub mod inspect;
