//! The statement a DDL event trigger fires for, cut out of the client's
//! query string. `current_query()` returns the whole string, which may hold
//! several statements (`ALTER TABLE t ADD c int; INSERT INTO t …`): the
//! destination must replay the DDL and never the DML beside it. The parser
//! recorded where each statement of the string starts and how long it is;
//! the running portal's plan carries those numbers.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

/// The text of the running top-level statement when its command tag is
/// `tag` (the event trigger's `TG_TAG`), in the database's encoding. NULL
/// when the running portal is another statement: the DDL was run by a
/// function, a DO block or a procedure (their own statement is then the
/// portal's), and its text alone is not what the source did.
#[pg_extern(volatile, parallel_unsafe)]
fn ddl_statement(tag: &str) -> Option<Vec<u8>> {
    // SAFETY: ActivePortal is the backend's running portal (or NULL); its
    // fields and the nodes of its plan list are valid while it runs, which
    // is for the whole of this call (an event trigger runs inside the
    // statement). Each pointer is checked before it is followed.
    unsafe {
        let portal = pg_sys::ActivePortal;
        if portal.is_null() || (*portal).sourceText.is_null() {
            return None;
        }
        let stmts = (*portal).stmts;
        if stmts.is_null() || (*stmts).length != 1 {
            return None;
        }
        let planned = (*(*stmts).elements).ptr_value.cast::<pg_sys::PlannedStmt>();
        if planned.is_null()
            || (*planned).type_ != pg_sys::NodeTag::T_PlannedStmt
            || (*planned).commandType != pg_sys::CmdType::CMD_UTILITY
            || (*planned).utilityStmt.is_null()
        {
            return None;
        }
        let running = CStr::from_ptr(pg_sys::GetCommandTagName(pg_sys::CreateCommandTag((*planned).utilityStmt)));
        if running.to_bytes() != tag.as_bytes() {
            return None;
        }
        let text = CStr::from_ptr((*portal).sourceText).to_bytes();
        Some(cut(text, (*planned).stmt_location as i64, (*planned).stmt_len as i64).to_vec())
    }
}

/// The statement at `location` (-1: unknown, the whole text) of `len`
/// bytes (0: to the end of the text), as the parser records them.
fn cut(text: &[u8], location: i64, len: i64) -> &[u8] {
    let start = usize::try_from(location).unwrap_or(0).min(text.len());
    let end = match usize::try_from(len) {
        Ok(n) if n > 0 => start.saturating_add(n).min(text.len()),
        _ => text.len(),
    };
    &text[start..end]
}
