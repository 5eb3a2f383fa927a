//! Connection settings shared by every PostgreSQL connection decant makes:
//! libpq-compatible connection strings, the password file, and TLS.

pub mod conninfo;
pub mod sql;
pub mod tls;

pub use conninfo::{ConnInfo, ConnInfoError, Host, ProcessEnv, SslMode};
