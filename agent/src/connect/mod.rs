//! Connection settings shared by every PostgreSQL connection decant makes:
//! libpq-compatible connection strings, the password file, and TLS.

pub mod clock;
pub mod conninfo;
pub mod sql;
pub mod tls;
pub mod wire;

pub use conninfo::{ConnInfo, ConnInfoError, Host, ProcessEnv, SslMode};

/// Settings every decant session sends at startup (replication and SQL
/// alike), so that values rendered as text by the source's plugin and read
/// by the destination mean the same on every side.
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c IntervalStyle=postgres -c TimeZone=UTC -c extra_float_digits=3 -c bytea_output=hex";
