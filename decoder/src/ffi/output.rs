//! Writing records into the walsender's output: one record per message, or
//! (option `max_message_bytes`) the records of a transaction packed into
//! messages of bounded size, and (option `pack_transactions`) those of
//! several transactions while a walsender works through a backlog.

use decant_proto::{encode_into, encoded_len, Record, MAX_RECORD_LEN};
use pgrx::pg_sys;

use super::session::{with_session, ChangeScope};

/// Whether the output must reach the consumer now (end of a transaction, a
/// non-transactional message) or may wait for more records.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Flush {
    Now,
    Later,
}

/// Writes one record. The scope proves the values it borrows are alive.
pub(super) unsafe fn write_record(ctx: *mut pg_sys::LogicalDecodingContext, _scope: &ChangeScope, record: &Record<'_>, flush: Flush) {
    let len = encoded_len(record);
    // PostgreSQL cannot send a message of 1 GB or more.
    if len > MAX_RECORD_LEN {
        pgrx::error!("decant: a {} record of {len} bytes exceeds the 1 GB limit of a PostgreSQL message", record.kind().name());
    }
    let max = with_session(|s| s.options.max_message_bytes) as usize;
    if max == 0 {
        // SAFETY: forwarded from the caller.
        unsafe { write_message(ctx, len, |buf| encode_into(record, buf)) };
        return;
    }
    // Packed: encode into the session's pending buffer (Rust-owned, bounded
    // by max plus one record) and send it when full or when asked to.
    let full = with_session(|s| {
        let start = s.pending.len();
        s.pending.resize(start + len, 0);
        encode_into(record, &mut s.pending[start..]);
        s.pending.len() >= max
    });
    if full || flush == Flush::Now {
        // SAFETY: forwarded from the caller.
        unsafe { send_pending(ctx, max) };
    }
}

/// Sends the records held back, if any.
pub(super) unsafe fn flush_pending(ctx: *mut pg_sys::LogicalDecodingContext) {
    let max = with_session(|s| s.options.max_message_bytes) as usize;
    if max > 0 {
        // SAFETY: forwarded from the caller.
        unsafe { send_pending(ctx, max) };
    }
}

/// Sends the packed records as one message.
unsafe fn send_pending(ctx: *mut pg_sys::LogicalDecodingContext, max: usize) {
    // Taken out of the session so no borrow spans the calls into PostgreSQL.
    let mut pending = with_session(|s| std::mem::take(&mut s.pending));
    if !pending.is_empty() {
        // SAFETY: forwarded from the caller.
        unsafe {
            write_message(ctx, pending.len(), |buf| {
                buf.copy_from_slice(&pending);
                pending.len()
            })
        };
    }
    pending.clear();
    if pending.capacity() > 4 * max {
        pending.shrink_to(max);
    }
    with_session(|s| s.pending = pending);
}

/// One output message of `len` bytes, filled in place by `fill`.
unsafe fn write_message(ctx: *mut pg_sys::LogicalDecodingContext, len: usize, fill: impl FnOnce(&mut [u8]) -> usize) {
    let request = i32::try_from(len).unwrap_or(i32::MAX);
    // SAFETY: ctx is the decoding context of the running callback; between
    // OutputPluginPrepareWrite and OutputPluginWrite, ctx->out is ours.
    // enlargeStringInfo makes room for `len` more bytes plus the NUL that
    // StringInfo keeps after its data (or raises an ERROR).
    unsafe {
        pg_sys::OutputPluginPrepareWrite(ctx, true);
        let out = (*ctx).out;
        pg_sys::enlargeStringInfo(out, request);
        let start = usize::try_from((*out).len).unwrap_or(0);
        let buf = std::slice::from_raw_parts_mut((*out).data.cast::<u8>().add(start), len + 1);
        let written = fill(&mut buf[..len]);
        buf[written] = 0;
        (*out).len += i32::try_from(written).unwrap_or(i32::MAX);
        pg_sys::OutputPluginWrite(ctx, true);
    }
}
