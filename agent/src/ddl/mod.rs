//! DDL captured on the source and replayed on the destination: the SQL
//! that captures it (installed by `CREATE EXTENSION decant`, printed by
//! `decant ddl-capture-sql`), the message that capture writes into the WAL
//! ([`command`]), and the rules of the statements' text ([`text`]).

pub mod command;
pub mod text;

pub use command::{DdlCommand, Origin};

/// The prefix of the transactional logical messages the capture writes.
pub const MESSAGE_PREFIX: &[u8] = b"decant.ddl";

/// The event triggers and the functions they call: the very file the
/// extension installs.
const CAPTURE_SQL: &str = include_str!("../../../decoder/sql/ddl_capture.sql");

/// The capture as a script for a server where the extension cannot be
/// installed (PostgreSQL 10 and later; a superuser runs it once in each
/// source database). Without the extension's `decant.ddl_statement`, the
/// capture sends the client's whole query string, which the destination
/// replays only when it holds one statement.
pub fn capture_script() -> String {
    format!(
        "-- decant DDL capture for a source database without the decant extension.\n\
         -- Run it as a superuser in the source database (psql -1 -f). Remove it with:\n\
         --   DROP EVENT TRIGGER decant_ddl_end; DROP EVENT TRIGGER decant_ddl_drop; DROP EVENT TRIGGER decant_ddl_start;\n\
         --   DROP FUNCTION decant.capture_ddl(), decant.capture_drop(), decant.emit_ddl(text, text, boolean),\n\
         --                 decant.capture_ddl_start(), decant.emit_ddl_start(text), decant.ddl_object_names(oid, oid);\n\
         CREATE SCHEMA IF NOT EXISTS decant;\n\n{CAPTURE_SQL}"
    )
}
