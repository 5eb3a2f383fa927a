//! decant's wire contract.
//!
//! The `decant` output plugin (in `decoder/`) writes one *record* per logical
//! decoding event; the agent and the applier read them. This crate is the one
//! definition of that format: [`record`] describes the events, [`codec`] turns
//! them into bytes and back, and every record carries a CRC-32 that is checked
//! wherever it is decoded. It has no I/O and no PostgreSQL dependency, so the
//! format is unit- and property-tested with plain `cargo test`.
//!
//! The byte layout is specified in `proto/FORMAT.md`.

pub mod codec;
pub mod options;
pub mod pgtext;
pub mod record;
mod varint;

pub use codec::{decode, encode, encoded_len, frame_len, DecodeError, Writer, MAX_RECORD_LEN};
pub use record::*;

/// The record format version written by this build. Stored in the high
/// nibble of every record's head byte; a reader rejects other versions.
pub const FORMAT_VERSION: u8 = 1;
