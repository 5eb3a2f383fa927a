//! Connecting to either server as the task will, and what a precheck
//! reads on connecting: the version, the session's user and privileges,
//! the database's encoding and collation, and whether the connection uses
//! TLS; and the fix for a connection that cannot be made.

use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::{Check, Findings};
use crate::connect::sql::connect;
use crate::connect::{ConnInfo, ProcessEnv};

/// A precheck's connection to one side.
pub(super) struct Connected {
    pub client: Client,
    pub connection: JoinHandle<()>,
    pub info: ConnInfo,
    pub server: Server,
}

impl Connected {
    /// Connects with the DSN of setting `key` (`source.dsn`…) as the task
    /// will. A failure is the `check` error about `side`, and ends that
    /// side's checks; a success is its pass line.
    pub(super) async fn open(dsn: &str, key: &str, side: &str, check: Check, f: &mut Findings) -> Option<Connected> {
        let info = match ConnInfo::parse(dsn, &ProcessEnv) {
            Ok(info) => info,
            Err(e) => {
                f.error(check, key, format!("the connection string is not valid: {e}"), connect_fix(key));
                return None;
            }
        };
        let (client, connection) = match connect(&info, "decant precheck", "").await {
            Ok(c) => c,
            Err(e) => {
                f.error(check, side, crate::error::report(&e), connect_fix(key));
                return None;
            }
        };
        let server = match Server::read(&client).await {
            Ok(s) => s,
            Err(e) => {
                f.query_failed(check, &e);
                return None;
            }
        };
        f.pass(check, side, format!("connected to {}:{}/{} as {} ({})", info.host, info.port, info.dbname, server.user, server.tls_text()));
        Some(Connected { client, connection, info, server })
    }
}

/// The server and the session, from one query.
pub(super) struct Server {
    pub version_num: u32,
    pub version: String,
    pub in_recovery: bool,
    pub user: String,
    pub superuser: bool,
    pub replication: bool,
    pub encoding: String,
    pub collate: String,
    pub ctype: String,
    /// The TLS version of this connection; empty without TLS.
    pub tls: String,
}

impl Server {
    pub(super) async fn read(client: &Client) -> Result<Server, tokio_postgres::Error> {
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num')::int4, current_setting('server_version'), pg_is_in_recovery(),
                        current_user::text, r.rolsuper, r.rolreplication,
                        pg_encoding_to_char(d.encoding)::text, d.datcollate::text, d.datctype::text,
                        coalesce((SELECT s.version FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid() AND s.ssl), '')
                   FROM pg_roles r, pg_database d
                  WHERE r.rolname = current_user AND d.datname = current_database()",
                &[],
            )
            .await?;
        Ok(Server {
            version_num: row.get::<_, i32>(0) as u32,
            version: row.get(1),
            in_recovery: row.get(2),
            user: row.get(3),
            superuser: row.get(4),
            replication: row.get(5),
            encoding: row.get(6),
            collate: row.get(7),
            ctype: row.get(8),
            tls: row.get(9),
        })
    }

    pub(super) fn tls_text(&self) -> String {
        if self.tls.is_empty() {
            "not encrypted".into()
        } else {
            format!("TLS {}", self.tls)
        }
    }
}

/// The fix for a connection that cannot be made, per side.
fn connect_fix(key: &str) -> String {
    format!(
        "correct {key} (host, port, dbname, user; the password in it, PGPASSWORD or ~/.pgpass; sslmode, sslrootcert, \
         sslcert, sslkey) or the server's pg_hba.conf"
    )
}
