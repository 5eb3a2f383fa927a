//! Ordinary (SQL) connections with tokio-postgres, from the same
//! connection strings and TLS settings as the replication client.

use std::time::Duration;

use tokio::task::JoinHandle;

use super::conninfo::{ConnInfo, Host, SslMode};
use super::tls::{self, TlsError};
use super::SESSION_OPTIONS;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("cannot connect to {target}: {source}{}", sqlstate(.source))]
    Postgres { target: String, source: tokio_postgres::Error },
}

/// ` (SQLSTATE 28P01)`: the code names the cause exactly (the message may
/// be translated), as the replication client's errors do.
fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| format!(" (SQLSTATE {})", c.code())).unwrap_or_default()
}

impl ConnectError {
    pub fn postgres(&self) -> Option<&tokio_postgres::Error> {
        match self {
            ConnectError::Postgres { source, .. } => Some(source),
            ConnectError::Tls(_) => None,
        }
    }
}

pub use crate::quote::{quote_ident, quote_literal};

/// ` ("a", "b")`: a column list for COPY and INSERT, or nothing for a table
/// without columns (legal, and it holds rows: `()` is not).
pub fn column_list(columns: &[String]) -> String {
    if columns.is_empty() {
        return String::new();
    }
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    format!(" ({})", cols.join(", "))
}

/// SQL condition on a `pg_type` row `t`: the type can travel in binary COPY
/// between two servers. It is built in (so both sides have the same type
/// under the same OID) and has both a send and a receive function, and so
/// has its element type if it has one (an array's `array_send` calls the
/// element's send, which `aclitem` and types defined with text I/O only
/// lack). Other types (user types, domains, enums, composites) go as text.
pub const BINARY_IO: &str = "(t.oid < 16384 AND t.typsend::oid <> 0 AND t.typreceive::oid <> 0
      AND (t.typelem = 0 OR EXISTS (SELECT FROM pg_type e WHERE e.oid = t.typelem AND e.typsend::oid <> 0 AND e.typreceive::oid <> 0)))";

/// Whether `e` means the session is gone (closed, never answered, or ended
/// by the server: admin shutdown, connection exceptions), as opposed to a
/// statement the server refused.
pub fn is_connection_loss(e: &tokio_postgres::Error) -> bool {
    e.is_closed() || e.as_db_error().is_none() || e.code().is_some_and(|c| c.code().starts_with("57P") || c.code().starts_with("08"))
}

/// Connects and spawns the connection task; the task ends when the client
/// is dropped or the connection fails.
pub async fn connect(
    info: &ConnInfo,
    application_name: &str,
    extra_options: &str,
) -> Result<(tokio_postgres::Client, JoinHandle<()>), ConnectError> {
    let mut config = tokio_postgres::Config::new();
    match &info.host {
        Host::Tcp(h) => config.host(h),
        Host::Socket(dir) => config.host_path(dir),
    };
    config.port(info.port).user(&info.user).dbname(&info.dbname);
    config.application_name(info.application_name.as_deref().unwrap_or(application_name));
    if let Some(p) = &info.password {
        config.password(p);
    }
    if let Some(t) = info.connect_timeout {
        config.connect_timeout(Duration::from_secs(t));
    }
    let mut options = SESSION_OPTIONS.to_owned();
    if !extra_options.is_empty() {
        options.push(' ');
        options.push_str(extra_options);
    }
    if let Some(user) = &info.options {
        options.push(' ');
        options.push_str(user);
    }
    config.options(&options);
    config.keepalives(true).keepalives_idle(Duration::from_secs(30));
    let target = format!("{}:{}/{}", info.host, info.port, info.dbname);
    let tls_config = if matches!(info.host, Host::Socket(_)) { None } else { tls::client_config(info)? };
    config.ssl_mode(match (info.sslmode, &tls_config) {
        (_, None) | (SslMode::Disable, _) => tokio_postgres::config::SslMode::Disable,
        (SslMode::Allow | SslMode::Prefer, _) => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    let err = |source| ConnectError::Postgres { target: target.clone(), source };
    match tls_config {
        Some(tls_config) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls_config).clone());
            let (client, connection) = config.connect(tls).await.map_err(err)?;
            Ok((
                client,
                tokio::spawn(async move {
                    let _ = connection.await;
                }),
            ))
        }
        None => {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(err)?;
            Ok((
                client,
                tokio::spawn(async move {
                    let _ = connection.await;
                }),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(column_list(&["a".into(), "b\"".into()]), " (\"a\", \"b\"\"\")");
        assert_eq!(column_list(&[]), "");
    }
}
