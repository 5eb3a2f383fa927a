//! State of one decoding session (from the startup to the shutdown callback).
//!
//! The state is Rust-owned and lives in a thread-local (a backend runs one
//! decoding session at a time). It is dropped by a reset callback on the
//! decoding context's memory context, so it is freed whether the session
//! ends normally or by an ERROR, and a later session never sees it.
//! Borrows of it are short and never span a call into PostgreSQL, because
//! PostgreSQL may call back into us (relcache invalidations) during any call.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};

use decant_proto::options::{OriginFilter, PluginOptions};
use decant_proto::Begin;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// How many filtered-out changes in a row before the walsender is told about
/// progress, so a long stretch of filtered changes does not let
/// wal_sender_timeout fire (the figure PostgreSQL's own pgoutput uses).
const FILTERED_CHANGES_PER_PROGRESS_UPDATE: u32 = 100;

pub(super) struct Session {
    pub options: PluginOptions,
    /// Reset after every callback; see [`ChangeScope`].
    change_cx: pg_sys::MemoryContext,
    /// Per relation OID: whether its metadata was sent in this session and
    /// whether the table filter selects it. Cleared by relcache invalidation.
    pub relations: HashMap<pg_sys::Oid, RelationState>,
    /// The current transaction's BEGIN, until its first emitted change.
    pub pending_begin: Option<Begin>,
    /// Records not yet sent (option max_message_bytes).
    pub pending: Vec<u8>,
    filtered_in_a_row: u32,
    /// How names and text reach UTF-8 (see encoding.rs); set on first use.
    pub conversion: Option<super::encoding::Conversion>,
}

#[derive(Clone, Copy, Default)]
pub(super) struct RelationState {
    pub sent: bool,
    pub selected: Option<bool>,
}

thread_local! {
    static SESSION: RefCell<Option<Session>> = const { RefCell::new(None) };
}

static RELCACHE_CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Runs `f` on the current session. `f` must not call into PostgreSQL.
pub(super) fn with_session<R>(f: impl FnOnce(&mut Session) -> R) -> R {
    SESSION.with(|cell| {
        let mut guard = cell.borrow_mut();
        let session = guard.as_mut().expect("decant: a decoding callback ran outside a decoding session (startup sets it up)");
        f(session)
    })
}

impl Session {
    /// Sets up the session for a decoding context.
    pub unsafe fn start(ctx: *mut pg_sys::LogicalDecodingContext, options: PluginOptions) {
        // SAFETY: ctx is valid; the memory context and callback struct are
        // allocated in ctx->context and live exactly as long as the session.
        unsafe {
            let change_cx = pg_sys::AllocSetContextCreateExtended(
                (*ctx).context,
                c"decant change".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            );
            let reset = pg_sys::MemoryContextAllocZero((*ctx).context, std::mem::size_of::<pg_sys::MemoryContextCallback>())
                .cast::<pg_sys::MemoryContextCallback>();
            (*reset).func = Some(forget_session);
            pg_sys::MemoryContextRegisterResetCallback((*ctx).context, reset);
            if !RELCACHE_CALLBACK_REGISTERED.swap(true, Ordering::Relaxed) {
                // Registered once per backend; it cannot be unregistered, so
                // it tolerates there being no session.
                pg_sys::CacheRegisterRelcacheCallback(Some(relcache_invalidated), pg_sys::Datum::from(0));
            }
            SESSION.with(|cell| {
                *cell.borrow_mut() = Some(Session {
                    options,
                    change_cx,
                    relations: HashMap::new(),
                    pending_begin: None,
                    pending: Vec::new(),
                    filtered_in_a_row: 0,
                    conversion: None,
                })
            });
        }
    }

    pub fn end() {
        SESSION.with(|cell| cell.borrow_mut().take());
    }

    pub fn skips_origin(&self, origin: pg_sys::RepOriginId) -> bool {
        self.options.origin == OriginFilter::None && u32::from(origin) != pg_sys::InvalidRepOriginId
    }

    /// Counts a filtered-out change; true when it is time to report progress.
    pub fn count_filtered(&mut self) -> bool {
        self.filtered_in_a_row += 1;
        if self.filtered_in_a_row >= FILTERED_CHANGES_PER_PROGRESS_UPDATE {
            self.filtered_in_a_row = 0;
            true
        } else {
            false
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_session(_arg: *mut std::ffi::c_void) {
    Session::end();
}

#[pg_guard]
unsafe extern "C-unwind" fn relcache_invalidated(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    SESSION.with(|cell| {
        // A borrow can only be held by our own code between two calls into
        // PostgreSQL, never across one, so this cannot fail; if it somehow
        // did, resending metadata for every relation is the safe answer.
        let Ok(mut guard) = cell.try_borrow_mut() else { return };
        if let Some(session) = guard.as_mut() {
            if relid == pg_sys::InvalidOid {
                session.relations.clear();
            } else {
                session.relations.remove(&relid);
            }
        }
    });
}

/// Reads the plugin options from the decoding context's DefElem list,
/// raising an ERROR that names the option when one is unknown or bad.
pub(super) unsafe fn parse_options(list: *mut pg_sys::List) -> PluginOptions {
    let mut pairs: Vec<(String, Option<String>)> = Vec::new();
    // SAFETY: list is ctx->output_plugin_options, a List of DefElem.
    unsafe {
        let elems = pgrx::PgList::<pg_sys::DefElem>::from_pg(list);
        for elem in elems.iter_ptr() {
            let name = CStr::from_ptr((*elem).defname).to_string_lossy().into_owned();
            let value =
                if (*elem).arg.is_null() { None } else { Some(CStr::from_ptr(pg_sys::defGetString(elem)).to_string_lossy().into_owned()) };
            pairs.push((name, value));
        }
    }
    match PluginOptions::parse(pairs.iter().map(|(n, v)| (n.as_str(), v.as_deref()))) {
        Ok(options) => options,
        Err(e) => {
            ereport!(ERROR, PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string());
        }
    }
}

/// The memory context of one callback: switched to on entry, switched away
/// from and reset on drop, whichever way the callback ends. Values built
/// during the callback borrow from it (`&'scope ChangeScope`).
pub(super) struct ChangeScope {
    cx: pg_sys::MemoryContext,
    previous: pg_sys::MemoryContext,
}

impl ChangeScope {
    pub fn enter() -> ChangeScope {
        let cx = with_session(|s| s.change_cx);
        // SAFETY: cx is a live child of the decoding context.
        let previous = unsafe { pg_sys::MemoryContextSwitchTo(cx) };
        ChangeScope { cx, previous }
    }

    /// Allocates `len` bytes that live until the scope ends. Every call
    /// returns a fresh allocation, so the `&mut` never aliases.
    #[allow(clippy::mut_from_ref)]
    pub fn alloc(&self, len: usize) -> &mut [u8] {
        if len == 0 {
            return &mut [];
        }
        // SAFETY: palloc returns len writable bytes (or raises an ERROR),
        // valid until self.cx is reset, which happens after self is dropped.
        unsafe { std::slice::from_raw_parts_mut(pg_sys::MemoryContextAlloc(self.cx, len).cast::<u8>(), len) }
    }
}

impl Drop for ChangeScope {
    fn drop(&mut self) {
        // SAFETY: both contexts are alive; nothing borrowed from cx outlives
        // the scope (values borrow &self).
        unsafe {
            pg_sys::MemoryContextSwitchTo(self.previous);
            pg_sys::MemoryContextReset(self.cx);
        }
    }
}
