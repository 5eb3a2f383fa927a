//! Everything that touches PostgreSQL's C API: the output plugin callbacks,
//! the decoding session's state, tuple → value conversion, output writing
//! and the per-version differences. The only module with `unsafe`.
//!
//! Every callback runs its work inside a [`ChangeScope`]: a memory context
//! that is reset when the scope ends, on every exit path (including an ERROR,
//! which pgrx turns into an unwinding panic and back), and every record is
//! written as soon as it is built, so memory stays bounded whatever the size
//! of a transaction.

use std::ffi::{c_char, c_int, CStr};

use decant_proto::options::PACKING_BACKLOG_BYTES;
use decant_proto::{Begin, Commit, Delete, Insert, Lsn, Message, OldTuple, Record, Truncate, Update};
use pgrx::pg_sys;
use pgrx::prelude::*;

mod compat;
mod encoding;
mod output;
mod relation;
mod session;
mod statement;
mod tuple;

use output::{flush_pending, write_record, Flush};
use session::{with_session, ChangeScope, Session};

::pgrx::pg_module_magic!(name, version);

/// The extension's version, e.g. `0.1.0`.
#[pg_extern(immutable, parallel_safe)]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Logs a snapshot of the running transactions, as the background writer
/// does every 15 seconds, if WAL moved since this session last logged one;
/// returns whether it logged one. Decoding sessions move their slot's
/// restart point to such snapshots once their consumer confirmed what came
/// before: the agent calls this every second, so a restarted stream decodes
/// again a second or two of WAL rather than up to twenty, and the source
/// keeps that much less. (PostgreSQL 16 has `pg_log_standby_snapshot()`,
/// which logs one whether or not anything happened.)
#[pg_extern(volatile, parallel_unsafe)]
fn log_standby_snapshot() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    // Per backend, like the background writer's own record of it.
    static LAST_IMPORTANT: AtomicU64 = AtomicU64::new(0);
    // SAFETY: plain calls into PostgreSQL from a SQL function; each raises
    // an ERROR (not a crash) if it cannot work.
    unsafe {
        if pg_sys::RecoveryInProgress() {
            pgrx::error!("decant.log_standby_snapshot() cannot run during recovery; call it on the primary");
        }
        let important = pg_sys::GetLastImportantRecPtr();
        if important == LAST_IMPORTANT.load(Ordering::Relaxed) {
            return false;
        }
        pg_sys::LogStandbySnapshot();
        LAST_IMPORTANT.store(important, Ordering::Relaxed);
    }
    true
}

/// Entry point PostgreSQL looks up when the library is used as an output plugin.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    // SAFETY: PostgreSQL passes a valid, zeroed callbacks struct.
    let cb = unsafe { &mut *cb };
    cb.startup_cb = Some(startup);
    cb.begin_cb = Some(begin);
    cb.change_cb = Some(change);
    cb.truncate_cb = Some(truncate);
    cb.commit_cb = Some(commit);
    cb.message_cb = Some(message);
    cb.filter_by_origin_cb = Some(filter_by_origin);
    cb.shutdown_cb = Some(shutdown);
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(ctx: *mut pg_sys::LogicalDecodingContext, opt: *mut pg_sys::OutputPluginOptions, _is_init: bool) {
    // SAFETY: PostgreSQL passes valid pointers for the duration of the call.
    unsafe {
        (*opt).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_BINARY_OUTPUT;
        (*opt).receive_rewrites = false;
        let options = session::parse_options((*ctx).output_plugin_options);
        Session::start(ctx, options);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown(_ctx: *mut pg_sys::LogicalDecodingContext) {
    Session::end();
}

#[pg_guard]
unsafe extern "C-unwind" fn filter_by_origin(_ctx: *mut pg_sys::LogicalDecodingContext, origin_id: pg_sys::RepOriginId) -> bool {
    with_session(|s| s.skips_origin(origin_id))
}

#[pg_guard]
unsafe extern "C-unwind" fn begin(_ctx: *mut pg_sys::LogicalDecodingContext, txn: *mut pg_sys::ReorderBufferTXN) {
    // SAFETY: txn is valid for the call.
    let begin = unsafe { Begin { xid: (*txn).xid.into_inner(), final_lsn: Lsn((*txn).final_lsn), commit_time: compat::commit_time(txn) } };
    // BEGIN is written lazily, with the transaction's first emitted change,
    // so transactions whose changes are all filtered out cost nothing.
    with_session(|s| s.pending_begin = Some(begin));
}

#[pg_guard]
unsafe extern "C-unwind" fn commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    _commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: txn is valid for the call.
    let end_lsn = unsafe { (*txn).end_lsn };
    // With pack_transactions, a walsender with a backlog keeps the COMMIT in
    // the message with the next transactions (see output.rs). Not for the
    // last stretch of WAL: a commit followed only by unrelated WAL would
    // wait for the next heartbeat.
    // SAFETY: am_walsender is set once at backend start.
    let hold = with_session(|s| s.options.pack_transactions)
        && unsafe { compat::am_walsender() && compat::wal_flushed_beyond(end_lsn) >= PACKING_BACKLOG_BYTES };
    let began = with_session(|s| s.pending_begin.take().is_none());
    if !began {
        // Nothing was emitted: send what is held if decoding caught up, and
        // let the walsender confirm progress anyway.
        // SAFETY: ctx is valid for the call.
        unsafe {
            if !hold {
                flush_pending(ctx);
            }
            compat::update_progress(ctx, true);
        }
        return;
    }
    // SAFETY: txn is valid for the call.
    let commit = unsafe { Commit { end_lsn: Lsn(end_lsn), commit_time: compat::commit_time(txn) } };
    let scope = ChangeScope::enter();
    // SAFETY: ctx is valid for the call.
    unsafe { write_record(ctx, &scope, &Record::Commit(commit), if hold { Flush::Later } else { Flush::Now }) };
}

/// Writes the transaction's BEGIN if it has not been written yet.
unsafe fn flush_begin(ctx: *mut pg_sys::LogicalDecodingContext, scope: &ChangeScope) {
    if let Some(begin) = with_session(|s| s.pending_begin.take()) {
        // SAFETY: ctx is valid for the callback that called us.
        unsafe { write_record(ctx, scope, &Record::Begin(begin), Flush::Later) };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    rel: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    let scope = ChangeScope::enter();
    // SAFETY: all pointers are valid for the duration of the callback; the
    // values built below borrow memory of `scope`, which outlives them.
    unsafe {
        if !relation::selected(rel) {
            if with_session(|s| s.count_filtered()) {
                compat::update_progress(ctx, false);
            }
            return;
        }
        flush_begin(ctx, &scope);
        relation::send_if_needed(ctx, &scope, rel);
        let relid = (*rel).rd_id.to_u32();
        let tp = (*change).data.tp;
        let record = match (*change).action {
            pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_INSERT => {
                let Some(new) = compat::tuple_of(tp.newtuple) else { return };
                Record::Insert(Insert { relation: relid, new: tuple::row(&scope, rel, new) })
            }
            pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_UPDATE => {
                let Some(new) = compat::tuple_of(tp.newtuple) else { return };
                let old = compat::tuple_of(tp.oldtuple).map(|old| tuple::old(&scope, rel, old));
                Record::Update(Update { relation: relid, old, new: tuple::row(&scope, rel, new) })
            }
            pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_DELETE => {
                let old: Option<OldTuple<'_>> = compat::tuple_of(tp.oldtuple).map(|old| tuple::old(&scope, rel, old));
                Record::Delete(Delete { relation: relid, old })
            }
            // Other actions (speculative inserts are confirmed as INSERTs)
            // never reach an output plugin's change callback.
            _ => return,
        };
        write_record(ctx, &scope, &record, Flush::Later);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn truncate(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: c_int,
    relations: *mut pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    let scope = ChangeScope::enter();
    // SAFETY: PostgreSQL passes `nrelations` valid relations.
    unsafe {
        let rels = std::slice::from_raw_parts(relations, usize::try_from(nrelations).unwrap_or(0));
        let selected: Vec<pg_sys::Relation> = rels.iter().copied().filter(|&r| relation::selected(r)).collect();
        if selected.is_empty() {
            return;
        }
        flush_begin(ctx, &scope);
        for &rel in &selected {
            relation::send_if_needed(ctx, &scope, rel);
        }
        let t = (*change).data.truncate;
        let record = Record::Truncate(Truncate {
            relations: selected.iter().map(|&r| (*r).rd_id.to_u32()).collect(),
            cascade: t.cascade,
            restart_identity: t.restart_seqs,
        });
        write_record(ctx, &scope, &record, Flush::Later);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn message(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    message_lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const c_char,
    message_size: pg_sys::Size,
    message: *const c_char,
) {
    if !with_session(|s| s.options.include_messages) {
        if !transactional {
            // Still a point where held records go out (pack_transactions).
            // SAFETY: ctx is valid for the call.
            unsafe { flush_pending(ctx) };
        }
        return;
    }
    let scope = ChangeScope::enter();
    // SAFETY: prefix is a NUL-terminated string and message points to
    // message_size bytes, both valid for the call.
    unsafe {
        if transactional {
            flush_begin(ctx, &scope);
        }
        let content: &[u8] = if message_size == 0 { &[] } else { std::slice::from_raw_parts(message.cast::<u8>(), message_size) };
        let prefix = encoding::name_to_utf8(CStr::from_ptr(prefix).to_bytes());
        let record = Record::Message(Message { transactional, lsn: Lsn(message_lsn), prefix, content });
        write_record(ctx, &scope, &record, if transactional { Flush::Later } else { Flush::Now });
    }
}
