//! Writing records into the walsender's output buffer.

use decant_proto::{encode, Record, Writer};
use pgrx::pg_sys;

use super::session::ChangeScope;

/// `ctx->out`, PostgreSQL's output StringInfo, as a record writer.
struct OutputBuffer(pg_sys::StringInfo);

impl Writer for OutputBuffer {
    fn write(&mut self, bytes: &[u8]) {
        // A record is at most decant_proto::MAX_RECORD_LEN (< 1 GB) long,
        // and appendBinaryStringInfo raises an ERROR itself beyond that.
        let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        // SAFETY: self.0 is ctx->out between OutputPluginPrepareWrite and
        // OutputPluginWrite; bytes is valid for len bytes.
        unsafe { pg_sys::appendBinaryStringInfo(self.0, bytes.as_ptr().cast(), len) };
    }
}

/// Writes one record as one output message. The scope proves the values the
/// record borrows are still alive.
pub(super) unsafe fn write_record(ctx: *mut pg_sys::LogicalDecodingContext, _scope: &ChangeScope, record: &Record<'_>) {
    // SAFETY: ctx is the decoding context of the running callback.
    unsafe {
        pg_sys::OutputPluginPrepareWrite(ctx, true);
        encode(record, &mut OutputBuffer((*ctx).out));
        pg_sys::OutputPluginWrite(ctx, true);
    }
}
