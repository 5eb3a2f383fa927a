//! Relation metadata records and the table filter.

use std::ffi::CStr;

use decant_proto::{Column, ColumnFlags, Record, Relation, ReplicaIdentity};
use pgrx::pg_sys;
use pgrx::PgTupleDesc;

use super::encoding::name_to_utf8;
use super::output::{write_record, Flush};
use super::session::{with_session, ChangeScope};

/// Whether the table filter selects `rel` (cached per session).
pub(super) unsafe fn selected(rel: pg_sys::Relation) -> bool {
    // SAFETY: rel is a valid open relation for the current callback.
    let relid = unsafe { (*rel).rd_id };
    if let Some(known) = with_session(|s| s.relations.get(&relid).and_then(|r| r.selected)) {
        return known;
    }
    // Only tables carry replicated rows: a materialized view's refresh
    // writes rows too, but the destination refreshes its own.
    // SAFETY: as above.
    let is_table = unsafe { (*(*rel).rd_rel).relkind } as u8 == pg_sys::RELKIND_RELATION;
    // Names are read even without include/exclude patterns: schema decant
    // is never emitted (see `table_selected`). Once per relation, cached.
    let selected = is_table && {
        // SAFETY: as above; the namespace name is palloc'd in the current
        // (per-callback) memory context.
        let (schema, name) = unsafe { names(rel) };
        with_session(|s| s.options.table_selected(schema, name))
    };
    with_session(|s| s.relations.entry(relid).or_default().selected = Some(selected));
    selected
}

/// Schema and table name of `rel` in UTF-8 (see encoding.rs), living in
/// the current memory context or the relcache entry.
pub(super) unsafe fn names<'a>(rel: pg_sys::Relation) -> (&'a [u8], &'a [u8]) {
    // SAFETY: rel and its rd_rel are valid; get_namespace_name returns a
    // palloc'd NUL-terminated string (or NULL if the schema vanished, which
    // a historic snapshot makes impossible, but we do not rely on that).
    unsafe {
        let form = (*rel).rd_rel;
        let nsp = pg_sys::get_namespace_name((*form).relnamespace);
        let schema = if nsp.is_null() { &b""[..] } else { CStr::from_ptr(nsp).to_bytes() };
        let name = CStr::from_ptr((*form).relname.data.as_ptr()).to_bytes();
        (name_to_utf8(schema), name_to_utf8(name))
    }
}

/// Writes the relation's metadata record unless this session already sent
/// it and the relation has not changed since.
pub(super) unsafe fn send_if_needed(ctx: *mut pg_sys::LogicalDecodingContext, scope: &ChangeScope, rel: pg_sys::Relation) {
    // SAFETY: rel is valid for the callback.
    let relid = unsafe { (*rel).rd_id };
    if with_session(|s| s.relations.get(&relid).is_some_and(|r| r.sent)) {
        return;
    }
    // SAFETY: as above; everything borrowed lives in the scope's context or
    // in the relcache entry, both alive until the record is written.
    unsafe {
        let (namespace, name) = names(rel);
        let form = (*rel).rd_rel;
        let replica_identity = ReplicaIdentity::from_char((*form).relreplident as u8).unwrap_or(ReplicaIdentity::Default);
        let identity_key = pg_sys::RelationGetIndexAttrBitmap(rel, pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_IDENTITY_KEY);
        let primary_key = pg_sys::RelationGetIndexAttrBitmap(rel, pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_PRIMARY_KEY);
        let desc = PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        let mut columns = Vec::with_capacity(desc.len());
        for att in desc.iter().filter(|a| is_replicated(a)) {
            let member = |set| pg_sys::bms_is_member(i32::from(att.attnum) - pg_sys::FirstLowInvalidHeapAttributeNumber, set);
            let mut flags = 0;
            if member(identity_key) {
                flags |= ColumnFlags::IDENTITY_KEY;
            }
            if member(primary_key) {
                flags |= ColumnFlags::PRIMARY_KEY;
            }
            if att.attnotnull {
                flags |= ColumnFlags::NOT_NULL;
            }
            let type_name = pg_sys::format_type_with_typemod(att.atttypid, att.atttypmod);
            columns.push(Column {
                name: name_to_utf8(CStr::from_ptr(att.attname.data.as_ptr()).to_bytes()),
                type_oid: att.atttypid.to_u32(),
                typmod: att.atttypmod,
                type_name: name_to_utf8(CStr::from_ptr(type_name).to_bytes()),
                flags: ColumnFlags(flags),
            });
        }
        let record = Record::Relation(Relation { oid: relid.to_u32(), namespace, name, replica_identity, columns });
        write_record(ctx, scope, &record, Flush::Later);
    }
    with_session(|s| s.relations.entry(relid).or_default().sent = true);
}

/// Dropped columns do not exist for consumers, and generated columns are
/// computed by the destination.
pub(super) fn is_replicated(att: &pg_sys::FormData_pg_attribute) -> bool {
    !att.attisdropped && att.attgenerated == 0
}
