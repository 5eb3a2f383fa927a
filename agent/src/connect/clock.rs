//! PostgreSQL's clock: microseconds since 2000-01-01 UTC, the unit of the
//! replication protocol's timestamps and of the commit times in records.

/// Microseconds since 2000-01-01 UTC, PostgreSQL's clock.
pub fn pg_now() -> i64 {
    const UNIX_TO_PG_EPOCH_SECS: i64 = 946_684_800;
    let since_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    since_unix.as_micros() as i64 - UNIX_TO_PG_EPOCH_SECS * 1_000_000
}
