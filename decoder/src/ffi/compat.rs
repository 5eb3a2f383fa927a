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

/// Whether this backend is a walsender (not an SQL session reading a slot).
pub(super) unsafe fn am_walsender() -> bool {
    // SAFETY: set once at backend start, read-only afterwards.
    unsafe {
        #[cfg(feature = "pg13")]
        {
            AM_WALSENDER
        }
        #[cfg(not(feature = "pg13"))]
        {
            pg_sys::am_walsender
        }
    }
}

// pgrx's PostgreSQL 13 bindings leave replication/walsender.h out; the
// variable is there all the same (an exported global of the server).
#[cfg(feature = "pg13")]
extern "C" {
    #[link_name = "am_walsender"]
    static AM_WALSENDER: bool;
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

/// `bytes` converted from the database's `encoding` to UTF-8 by its
/// default conversion `function`; the first byte that has no UTF-8
/// equivalent otherwise. The result is allocated in the current memory
/// context. PostgreSQL 14 added conversions that report instead of raising.
#[cfg(not(feature = "pg13"))]
pub(super) unsafe fn convert_to_utf8<'a>(
    function: pg_sys::Oid,
    encoding: i32,
    bytes: &'a [u8],
) -> Result<&'a [u8], super::encoding::Unconvertible> {
    let Ok(len) = i32::try_from(bytes.len()) else { return Err(super::encoding::Unconvertible(0)) };
    let capacity = bytes.len().saturating_mul(pg_sys::MAX_CONVERSION_GROWTH as usize).saturating_add(1);
    let Ok(capacity_i32) = i32::try_from(capacity) else { return Err(super::encoding::Unconvertible(0)) };
    // SAFETY: dst has room for the longest possible conversion and its NUL;
    // the conversion reads len bytes of src and does not write it.
    unsafe {
        let dst = pg_sys::MemoryContextAllocHuge(pg_sys::CurrentMemoryContext, capacity).cast::<u8>();
        let converted = pg_sys::pg_do_encoding_conversion_buf(
            function,
            encoding,
            pg_sys::pg_enc::PG_UTF8 as i32,
            bytes.as_ptr().cast_mut(),
            len,
            dst,
            capacity_i32,
            true,
        );
        if converted < len {
            return Err(super::encoding::Unconvertible(usize::try_from(converted).unwrap_or(0)));
        }
        Ok(std::ffi::CStr::from_ptr(dst.cast()).to_bytes())
    }
}

/// PostgreSQL 13's conversions raise their own ERROR on a byte without an
/// equivalent (it names the bytes, not the table).
#[cfg(feature = "pg13")]
pub(super) unsafe fn convert_to_utf8<'a>(
    _function: pg_sys::Oid,
    _encoding: i32,
    bytes: &'a [u8],
) -> Result<&'a [u8], super::encoding::Unconvertible> {
    let Ok(len) = i32::try_from(bytes.len()) else { return Err(super::encoding::Unconvertible(0)) };
    // SAFETY: pg_server_to_any reads len bytes and returns them or a
    // NUL-terminated conversion palloc'd in the current context.
    unsafe {
        let out = pg_sys::pg_server_to_any(bytes.as_ptr().cast(), len, pg_sys::pg_enc::PG_UTF8 as i32);
        if out.cast::<u8>().cast_const() == bytes.as_ptr() {
            return Ok(bytes);
        }
        Ok(std::ffi::CStr::from_ptr(out).to_bytes())
    }
}
