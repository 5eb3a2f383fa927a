//! Precheck of the destination server on its own, as `decant applier`
//! can make it: the connection (with its TLS), the version, and what the
//! applier needs whatever the task moves: `session_replication_role`
//! (every applier session sets it), creating its own schema `decant`, and
//! replication origins. Also what the destination holds of this task (its
//! plan) and its free disk space, which `compare` weighs against the
//! source.

use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::server::{Connected, Server};
use super::{Check, Findings, TaskState};
use crate::config::{Config, MigrationType};
use crate::connect::sql::quote_ident;
use crate::connect::{ConnInfo, Host};

pub(super) struct Destination {
    pub client: Client,
    _connection: JoinHandle<()>,
    pub info: ConnInfo,
    pub server: Server,
}

/// Free space where the destination keeps the database's tables.
pub(super) enum Disk {
    /// Measured (df) in `path`.
    Measured { path: String, free: i64 },
    /// Why it could not be measured from here.
    Unknown(String),
}

impl Destination {
    /// Connects as the applier will; a failure is the `destination.connect`
    /// error and ends the destination's checks.
    pub(super) async fn connect(config: &Config, f: &mut Findings) -> Option<Destination> {
        let Connected { client, connection, info, server } =
            Connected::open(&config.destination.dsn, "destination.dsn", "destination", Check::DestinationConnect, f).await?;
        Some(Destination { client, _connection: connection, info, server })
    }

    /// The task's plan in the destination, if there is one.
    pub(super) async fn task_state(&self, task_id: &str) -> Result<TaskState, tokio_postgres::Error> {
        let planned: bool = self.client.query_one("SELECT to_regclass('decant.task') IS NOT NULL", &[]).await?.get(0);
        if !planned {
            return Ok(TaskState::New);
        }
        let phase = self.client.query_opt("SELECT phase FROM decant.task WHERE task_id = $1", &[&task_id]).await?;
        Ok(phase.map_or(TaskState::New, |r| TaskState::Planned(r.get(0))))
    }

    /// The checks of the destination alone; `source` is the source server
    /// when it was reached.
    pub(super) async fn check(&self, config: &Config, source: Option<&Server>, f: &mut Findings) -> Result<(), tokio_postgres::Error> {
        let s = &self.server;
        match source {
            Some(src) if config.migrate.has(MigrationType::Schema) && s.version_num / 10000 < src.version_num / 10000 => f.warn(
                Check::DestinationVersion,
                "destination",
                format!(
                    "PostgreSQL {}, older than the source ({}): the schema is dumped by a pg_dump for the source's version, \
                     whose SQL an older server may reject",
                    s.version, src.version
                ),
                "migrate into a destination of the source's major version or later",
            ),
            _ => f.pass(Check::DestinationVersion, "destination", format!("PostgreSQL {}", s.version)),
        }
        let parameter = if s.version_num >= 150000 { "has_parameter_privilege('session_replication_role', 'SET')" } else { "false" };
        let origins = if s.version_num >= 180000 { "max_active_replication_origins" } else { "max_replication_slots" };
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT has_database_privilege(current_database(), 'CREATE'),
                            (SELECT has_schema_privilege(n.oid, 'CREATE') FROM pg_namespace n WHERE n.nspname = 'decant'),
                            {parameter},
                            (SELECT bool_and(has_function_privilege(p.oid, 'EXECUTE')) FROM pg_proc p
                              WHERE p.proname IN ('pg_replication_origin_create', 'pg_replication_origin_session_setup')),
                            coalesce(current_setting('{origins}', true), '0'), current_database()::text"
                ),
                &[],
            )
            .await?;
        let (create_db, decant_schema, set_srr): (bool, Option<bool>, bool) = (row.get(0), row.get(1), row.get(2));
        let (origin_functions, origin_slots, database): (Option<bool>, String, String) = (row.get(3), row.get(4), row.get(5));
        let user = quote_ident(&s.user);
        if s.superuser || set_srr {
            f.pass(Check::DestinationSessionReplicationRole, &s.user, "may set session_replication_role");
        } else {
            let fix = if s.version_num >= 150000 {
                format!("GRANT SET ON PARAMETER session_replication_role TO {user}; (or make it a superuser)")
            } else {
                format!("ALTER ROLE {user} SUPERUSER; (before PostgreSQL 15 only superusers may set it)")
            };
            f.error(
                Check::DestinationSessionReplicationRole,
                &s.user,
                format!(
                    "{} may not set session_replication_role, which every applier session sets to replica (so that \
                     triggers and foreign keys do not act again on replicated rows)",
                    s.user
                ),
                fix,
            );
        }
        match decant_schema {
            Some(true) => f.pass(Check::DestinationCreate, "schema decant", "decant's schema exists and the user may create in it"),
            None if create_db || s.superuser => {
                f.pass(Check::DestinationCreate, format!("database {database}"), "may create decant's schema (CREATE on the database)")
            }
            Some(false) => f.error(
                Check::DestinationCreate,
                "schema decant",
                format!("{} may not create in schema decant, where the applier keeps the task's plan and progress", s.user),
                format!("GRANT CREATE ON SCHEMA decant TO {user};"),
            ),
            None => f.error(
                Check::DestinationCreate,
                format!("database {database}"),
                format!(
                    "{} may not create schemas in database {database} (CREATE), and the applier keeps the task's plan and \
                     progress in a schema decant it creates",
                    s.user
                ),
                format!("GRANT CREATE ON DATABASE {} TO {user};", quote_ident(&database)),
            ),
        }
        let may_use = s.superuser || (s.version_num >= 140000 && origin_functions == Some(true));
        let slots: i64 = origin_slots.parse().unwrap_or(0);
        if !may_use {
            let fix = if s.version_num >= 140000 {
                format!("GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), pg_replication_origin_session_setup(text) TO {user}; (as a superuser)")
            } else {
                format!("ALTER ROLE {user} SUPERUSER; (before PostgreSQL 14 only superusers may use replication origins)")
            };
            f.warn(
                Check::DestinationReplicationOrigin,
                &s.user,
                format!(
                    "{} may not use replication origins: applied changes are not marked with the origin decant_{}, so a \
                     reverse stream (origin = none) cannot tell them from local writes, and nothing keeps a second applier \
                     of the task out (the position is kept in decant.progress either way)",
                    s.user, config.task_id
                ),
                fix,
            );
        } else if slots < 2 {
            f.warn(
                Check::DestinationReplicationOrigin,
                origins,
                format!("{origins} is {slots}: the applier's two sessions cannot each take a replication origin"),
                format!("in the destination's postgresql.conf: {origins} = {} (or more), then restart the server", slots.max(0) + 2),
            );
        } else {
            f.pass(Check::DestinationReplicationOrigin, &s.user, format!("may use replication origins (decant_{})", config.task_id));
        }
        Ok(())
    }

    /// Free space where the database's tables go, measured with `df` when
    /// the destination runs on this host and its directory is visible
    /// here: PostgreSQL has no SQL function for free disk space.
    pub(super) async fn disk(&self) -> Result<Disk, tokio_postgres::Error> {
        let local = match &self.info.host {
            Host::Socket(_) => true,
            Host::Tcp(h) => h == "localhost" || h == "::1" || h.starts_with("127."),
        };
        if !local {
            return Ok(Disk::Unknown(format!("the destination runs on another host ({})", self.info.host)));
        }
        // The database's tablespace, else the data directory (which only
        // superusers and pg_read_all_settings may read).
        let row = self
            .client
            .query_one(
                "SELECT pg_tablespace_location(d.dattablespace), (SELECT setting FROM pg_settings WHERE name = 'data_directory')
                   FROM pg_database d WHERE d.datname = current_database()",
                &[],
            )
            .await?;
        let (location, data_directory): (String, Option<String>) = (row.get(0), row.get(1));
        let path = if !location.is_empty() { Some(location) } else { data_directory };
        let Some(path) = path else {
            return Ok(Disk::Unknown(format!(
                "{} may not read data_directory (superuser or pg_read_all_settings), so where the data goes is unknown",
                self.server.user
            )));
        };
        if std::fs::metadata(&path).is_err() {
            return Ok(Disk::Unknown(format!("its directory {path} is not visible from here")));
        }
        let out = tokio::process::Command::new("df").args(["-P", "-k"]).arg(&path).output().await;
        let free = out.ok().filter(|o| o.status.success()).and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().nth(1)?.split_whitespace().nth(3)?.parse::<i64>().ok()
        });
        Ok(match free {
            Some(kb) => Disk::Measured { path, free: kb * 1024 },
            None => Disk::Unknown(format!("df -P -k {path} failed")),
        })
    }
}
