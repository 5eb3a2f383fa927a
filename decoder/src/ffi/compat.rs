//! The places where PostgreSQL versions differ, one function each.

use pgrx::pg_sys;

/// The transaction's commit time, microseconds since 2000-01-01 UTC.
pub(super) unsafe fn commit_time(txn: *const pg_sys::ReorderBufferTXN) -> i64 {
    // SAFETY: txn is valid for the callback.
    unsafe {
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        {
            (*txn).commit_time
        }
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        {
            (*txn).xact_time.commit_time
        }
    }
}

/// The heap tuple of a change's old or new tuple, if there is one.
/// PostgreSQL 17 stores a HeapTuple directly; older versions wrap it.
#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
pub(super) unsafe fn tuple_of(buf: *mut pg_sys::ReorderBufferTupleBuf) -> Option<pg_sys::HeapTuple> {
    // SAFETY: buf is null or a valid tuple buffer of the current change.
    unsafe { (!buf.is_null()).then(|| &raw mut (*buf).tuple) }
}

#[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16")))]
pub(super) unsafe fn tuple_of(tuple: pg_sys::HeapTuple) -> Option<pg_sys::HeapTuple> {
    (!tuple.is_null()).then_some(tuple)
}

/// Tells the walsender that decoding progressed without output, so it can
/// confirm the position and keep wal_sender_timeout from firing.
/// `skipped_xact`: a whole transaction was filtered out (PostgreSQL 15+
/// uses it to decide whether to send a keepalive).
pub(super) unsafe fn update_progress(ctx: *mut pg_sys::LogicalDecodingContext, skipped_xact: bool) {
    // SAFETY: ctx is the decoding context of the running callback.
    unsafe {
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        {
            let _ = skipped_xact;
            pg_sys::OutputPluginUpdateProgress(ctx);
        }
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        pg_sys::OutputPluginUpdateProgress(ctx, skipped_xact);
    }
}

/// How much WAL beyond `lsn` is already flushed: what a walsender that has
/// just decoded up to `lsn` has left to decode at once. Always 0 during
/// recovery (a standby's walsender reads up to another position).
pub(super) unsafe fn wal_flushed_beyond(lsn: pg_sys::XLogRecPtr) -> u64 {
    // SAFETY: both read shared memory under their own locks; valid in any backend.
    unsafe {
        if pg_sys::RecoveryInProgress() {
            return 0;
        }
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        let flushed = pg_sys::GetFlushRecPtr();
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        let flushed = pg_sys::GetFlushRecPtr(std::ptr::null_mut());
        flushed.saturating_sub(lsn)
    }
}
