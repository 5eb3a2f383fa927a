//! Names and text values leave the plugin in UTF-8, whatever the source
//! database's encoding: that is what the agent reads and what its
//! destination sessions send (`client_encoding = UTF8`), and the
//! destination's server converts them on to its own encoding, as it does
//! for pgoutput's output and for the full copy.
//!
//! A UTF-8 database, and ASCII text in any server encoding (every server
//! encoding is a superset of ASCII), pass through untouched: the common
//! cases cost one scan. A SQL_ASCII database declares no encoding, so its
//! bytes are passed on when they are valid UTF-8. A value that cannot be
//! represented in UTF-8 (a WIN1252 byte without a character, invalid UTF-8
//! in a SQL_ASCII database) stops decoding with an ERROR that names the
//! table, the column and the row's key: sending it would either corrupt the
//! value or make the destination refuse it somewhere less clear.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use super::session::with_session;

/// How this session's database encoding becomes UTF-8; decided at the first
/// conversion (it needs catalog access, which a callback has).
#[derive(Clone, Copy, Debug)]
pub(super) enum Conversion {
    /// UTF-8 already.
    None,
    /// SQL_ASCII: bytes of no declared encoding; valid UTF-8 passes.
    Validate,
    /// The default conversion function from `encoding` to UTF-8.
    Proc { function: pg_sys::Oid, encoding: i32 },
}

/// The first byte that could not be converted, as an offset into the value.
#[derive(Debug)]
pub(super) struct Unconvertible(pub usize);

fn conversion() -> Conversion {
    if let Some(c) = with_session(|s| s.conversion) {
        return c;
    }
    // SAFETY: plain catalog lookups in a callback, inside its transaction.
    let c = unsafe {
        let encoding = pg_sys::GetDatabaseEncoding();
        if encoding == pg_sys::pg_enc::PG_UTF8 as i32 {
            Conversion::None
        } else if encoding == pg_sys::pg_enc::PG_SQL_ASCII as i32 {
            Conversion::Validate
        } else {
            let function = pg_sys::FindDefaultConversionProc(encoding, pg_sys::pg_enc::PG_UTF8 as i32);
            if function == pg_sys::InvalidOid {
                let name = CStr::from_ptr(pg_sys::GetDatabaseEncodingName()).to_string_lossy();
                ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION,
                    format!("decant: no conversion from the database encoding {name} to UTF8 exists")
                );
            }
            Conversion::Proc { function, encoding }
        }
    };
    with_session(|s| s.conversion = Some(c));
    c
}

/// `bytes` (in the database encoding) in UTF-8; the result lives in the
/// current memory context (the callback's scope) or is `bytes` itself.
pub(super) unsafe fn to_utf8<'a>(bytes: &'a [u8]) -> Result<&'a [u8], Unconvertible> {
    if bytes.is_ascii() {
        return Ok(bytes);
    }
    match conversion() {
        Conversion::None => Ok(bytes),
        Conversion::Validate => std::str::from_utf8(bytes).map(|_| bytes).map_err(|e| Unconvertible(e.valid_up_to())),
        // SAFETY: forwarded from the caller; the function is the database
        // encoding's conversion to UTF-8.
        Conversion::Proc { function, encoding } => unsafe { super::compat::convert_to_utf8(function, encoding, bytes) },
    }
}

/// A name (of a schema, table, column or type) in UTF-8. Names in the
/// catalogs were valid in the database encoding when created, and every
/// server encoding but SQL_ASCII converts to UTF-8 whole; a SQL_ASCII
/// name that is not UTF-8 is an ERROR that shows its bytes.
pub(super) unsafe fn name_to_utf8<'a>(name: &'a [u8]) -> &'a [u8] {
    // SAFETY: forwarded from the caller.
    match unsafe { to_utf8(name) } {
        Ok(n) => n,
        Err(Unconvertible(at)) => {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_UNTRANSLATABLE_CHARACTER,
                format!(
                    "decant: the name {} cannot be converted to UTF8 (at byte {at}); rename the object on the source",
                    ascii_literal(name, '"')
                )
            );
        }
    }
}

/// Text in the database encoding shown as an ASCII-only SQL token that
/// PostgreSQL reads back as the same text: `"name"` or `'value'` when it is
/// ASCII, else a Unicode-escape form (`U&"tabl\00e9"`) when it converts to
/// UTF-8, else its bytes (`'\x81'::bytea`). Error messages use it: the
/// server converts a message to the client's encoding, and ASCII is the
/// one text that reads the same in every encoding.
pub(super) fn ascii_literal(bytes: &[u8], quote: char) -> String {
    let quoted = |s: &str| {
        let doubled: String = s.chars().flat_map(|c| if c == quote { vec![c, c] } else { vec![c] }).collect();
        format!("{quote}{doubled}{quote}")
    };
    if bytes.is_ascii() {
        return quoted(&String::from_utf8_lossy(bytes));
    }
    // SAFETY: the conversion runs inside a callback of the session.
    match unsafe { to_utf8(bytes) }.ok().and_then(|b| std::str::from_utf8(b).ok()) {
        Some(text) => {
            let mut out = String::new();
            for c in text.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    c if c == quote => {
                        out.push(c);
                        out.push(c)
                    }
                    c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
                    c if (c as u32) <= 0xFFFF => out.push_str(&format!("\\{:04x}", c as u32)),
                    c => out.push_str(&format!("\\+{:06x}", c as u32)),
                }
            }
            format!("U&{quote}{out}{quote}")
        }
        None => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!("'\\x{hex}'::bytea")
        }
    }
}
