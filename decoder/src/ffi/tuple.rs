//! Heap tuple → column values.
//!
//! Common built-in types get a compact form (see `decant_proto::Value`);
//! every other type, including domains, arrays, enums and composites, goes
//! through its output function, so no type is ever unsupported. Values
//! borrow memory of the callback's [`ChangeScope`].

use std::ffi::CStr;

use decant_proto::pgtext::{pack_numeric, packed_numeric_len};
use decant_proto::{OldTuple, Tuple, Value};
use pgrx::pg_sys;
use pgrx::PgTupleDesc;

use super::encoding::{ascii_literal, to_utf8, Unconvertible};
use super::relation::is_replicated;
use super::session::ChangeScope;

/// The values of every replicated column of `tuple`.
pub(super) unsafe fn row<'s>(scope: &'s ChangeScope, rel: pg_sys::Relation, tuple: pg_sys::HeapTuple) -> Tuple<'s> {
    // SAFETY: forwarded from the caller.
    unsafe { values(scope, rel, tuple, false) }
}

/// The before-image: the whole row under REPLICA IDENTITY FULL, otherwise
/// the identity key columns only.
pub(super) unsafe fn old<'s>(scope: &'s ChangeScope, rel: pg_sys::Relation, tuple: pg_sys::HeapTuple) -> OldTuple<'s> {
    // SAFETY: rel is valid for the callback.
    let full = unsafe { (*(*rel).rd_rel).relreplident as u8 == pg_sys::REPLICA_IDENTITY_FULL };
    if full {
        // SAFETY: forwarded from the caller.
        OldTuple::Row(unsafe { values(scope, rel, tuple, false) })
    } else {
        // SAFETY: forwarded from the caller.
        OldTuple::Key(unsafe { values(scope, rel, tuple, true) })
    }
}

unsafe fn values<'s>(scope: &'s ChangeScope, rel: pg_sys::Relation, tuple: pg_sys::HeapTuple, key_only: bool) -> Tuple<'s> {
    // SAFETY: rel, its descriptor and tuple are valid for the callback; the
    // deformed arrays are allocated in the scope's context.
    unsafe {
        let desc = PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        let natts = desc.len();
        let datums = scope.alloc(natts * std::mem::size_of::<pg_sys::Datum>()).as_mut_ptr().cast::<pg_sys::Datum>();
        let nulls = scope.alloc(natts).as_mut_ptr().cast::<bool>();
        pg_sys::heap_deform_tuple(tuple, (*rel).rd_att, datums, nulls);
        let key = if key_only {
            pg_sys::RelationGetIndexAttrBitmap(rel, pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_IDENTITY_KEY)
        } else {
            std::ptr::null_mut()
        };
        let mut out = Vec::with_capacity(natts);
        for (i, att) in desc.iter().enumerate() {
            if !is_replicated(att) {
                continue;
            }
            if key_only && !pg_sys::bms_is_member(i32::from(att.attnum) - pg_sys::FirstLowInvalidHeapAttributeNumber, key) {
                continue;
            }
            out.push(if *nulls.add(i) {
                Value::Null
            } else {
                match value(scope, att, *datums.add(i)) {
                    Ok(v) => v,
                    Err(e) => unconvertible(rel, att, datums, nulls, e),
                }
            });
        }
        Tuple(out)
    }
}

/// Stops decoding at a value that has no UTF-8 form, naming the table, the
/// column and the row's key (replica identity key, else primary key) as
/// ASCII-only SQL (see [`ascii_literal`]).
unsafe fn unconvertible(
    rel: pg_sys::Relation,
    att: &pg_sys::FormData_pg_attribute,
    datums: *const pg_sys::Datum,
    nulls: *const bool,
    at: Unconvertible,
) -> ! {
    // SAFETY: rel, its descriptor and the deformed arrays are valid for the
    // callback that called values().
    let (table, key) = unsafe {
        let form = (*rel).rd_rel;
        let nsp = pg_sys::get_namespace_name((*form).relnamespace);
        let schema = if nsp.is_null() { &b""[..] } else { CStr::from_ptr(nsp).to_bytes() };
        let name = CStr::from_ptr((*form).relname.data.as_ptr()).to_bytes();
        let table = format!("{}.{}", ascii_literal(schema, '"'), ascii_literal(name, '"'));
        let mut key_set = pg_sys::RelationGetIndexAttrBitmap(rel, pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_IDENTITY_KEY);
        if key_set.is_null() {
            key_set = pg_sys::RelationGetIndexAttrBitmap(rel, pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_PRIMARY_KEY);
        }
        let desc = PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        let mut key = Vec::new();
        for (i, a) in desc.iter().enumerate() {
            if !pg_sys::bms_is_member(i32::from(a.attnum) - pg_sys::FirstLowInvalidHeapAttributeNumber, key_set) {
                continue;
            }
            let column = ascii_literal(CStr::from_ptr(a.attname.data.as_ptr()).to_bytes(), '"');
            let shown = if *nulls.add(i) { "NULL".to_owned() } else { ascii_literal(text_output(a.atttypid, *datums.add(i)), '\'') };
            key.push(format!("{column} = {shown}"));
        }
        (table, if key.is_empty() { "the table has no key".to_owned() } else { key.join(", ") })
    };
    // SAFETY: as above.
    let column = ascii_literal(unsafe { CStr::from_ptr(att.attname.data.as_ptr()).to_bytes() }, '"');
    // SAFETY: a static C string of the server.
    let encoding = unsafe { CStr::from_ptr(pg_sys::GetDatabaseEncodingName()).to_string_lossy() };
    pgrx::ereport!(
        ERROR,
        pgrx::PgSqlErrorCode::ERRCODE_UNTRANSLATABLE_CHARACTER,
        format!(
            "decant: the value of column {column} of table {table} in the row with {key} has a character with no equivalent \
             in UTF8 (database encoding {encoding}, at byte {}): the change cannot be replicated; correct the value on the \
             source and migrate the table again",
            at.0
        )
    );
}

unsafe fn value<'s>(scope: &'s ChangeScope, att: &pg_sys::FormData_pg_attribute, datum: pg_sys::Datum) -> Result<Value<'s>, Unconvertible> {
    use pg_sys::BuiltinOid as T;
    // SAFETY: datum is a non-null value of type att.atttypid from a tuple
    // that, like everything palloc'd here, outlives the scope's borrow.
    unsafe {
        if att.attlen == -1 {
            let ptr = datum.cast_mut_ptr::<pg_sys::varlena>();
            if is_external_on_disk(ptr) {
                // The WAL does not carry values stored out of line that an
                // UPDATE left unchanged.
                return Ok(Value::UnchangedToast);
            }
        }
        let Ok(builtin) = T::try_from(att.atttypid) else { return Ok(Value::Text(to_utf8(text_output(att.atttypid, datum))?)) };
        Ok(match builtin {
            T::BOOLOID => Value::Bool(datum.value() != 0),
            T::INT2OID => Value::Int(i64::from(datum.value() as i16)),
            T::INT4OID => Value::Int(i64::from(datum.value() as i32)),
            T::INT8OID => Value::Int(datum.value() as i64),
            T::FLOAT4OID => Value::Float4(datum.value() as u32),
            T::FLOAT8OID => Value::Float8(datum.value() as u64),
            T::DATEOID => Value::Date(datum.value() as i32),
            T::TIMEOID => Value::Time(datum.value() as i64),
            T::TIMESTAMPOID => Value::Timestamp(datum.value() as i64),
            T::TIMESTAMPTZOID => Value::TimestampTz(datum.value() as i64),
            T::UUIDOID => {
                let mut uuid = [0u8; 16];
                uuid.copy_from_slice(std::slice::from_raw_parts(datum.cast_mut_ptr::<u8>(), 16));
                Value::Uuid(uuid)
            }
            // For these the stored bytes are the text output.
            T::TEXTOID | T::VARCHAROID | T::JSONOID => Value::Text(to_utf8(varlena_bytes(datum))?),
            T::BPCHAROID => {
                let bytes = to_utf8(varlena_bytes(datum))?;
                let kept = bytes.iter().rposition(|&b| b != b' ').map_or(0, |p| p + 1);
                match u32::try_from(bytes.len() - kept) {
                    Ok(pad) => Value::PaddedText(&bytes[..kept], pad),
                    Err(_) => Value::Text(bytes),
                }
            }
            T::BYTEAOID => Value::Bytes(varlena_bytes(datum)),
            T::NUMERICOID => {
                let text = text_output(att.atttypid, datum);
                let buf = scope.alloc(packed_numeric_len(text.len()));
                match pack_numeric(text, buf) {
                    Some(n) => Value::Numeric(&buf[..n]),
                    None => Value::Text(text), // NaN, Infinity, -Infinity
                }
            }
            _ => Value::Text(to_utf8(text_output(att.atttypid, datum))?),
        })
    }
}

/// `VARATT_IS_EXTERNAL_ONDISK`: a TOAST pointer to a value in the toast table.
unsafe fn is_external_on_disk(ptr: *const pg_sys::varlena) -> bool {
    // SAFETY: ptr is a varlena datum; a 1-byte external header is followed
    // by its tag byte.
    unsafe { pgrx::varlena::varatt_is_1b_e(ptr) && *ptr.cast::<u8>().add(1) == pg_sys::vartag_external::VARTAG_ONDISK as u8 }
}

/// The bytes of a varlena datum, decompressed if needed.
unsafe fn varlena_bytes<'s>(datum: pg_sys::Datum) -> &'s [u8] {
    // SAFETY: datum is a varlena that is not an on-disk TOAST pointer;
    // detoasting allocates in the current (scope's) context.
    unsafe {
        let v = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr::<pg_sys::varlena>());
        let len = pgrx::varlena::varsize_any_exhdr(v);
        if len == 0 {
            return &[];
        }
        std::slice::from_raw_parts(pgrx::varlena::vardata_any(v).cast::<u8>(), len)
    }
}

/// The value as its type's output function renders it.
unsafe fn text_output<'s>(type_oid: pg_sys::Oid, datum: pg_sys::Datum) -> &'s [u8] {
    // SAFETY: datum is a valid value of type_oid; the output string is
    // palloc'd in the current (scope's) context.
    unsafe {
        let mut output_fn = pg_sys::InvalidOid;
        let mut is_varlena = false;
        pg_sys::getTypeOutputInfo(type_oid, &mut output_fn, &mut is_varlena);
        let text = pg_sys::OidOutputFunctionCall(output_fn, datum);
        CStr::from_ptr(text).to_bytes()
    }
}
