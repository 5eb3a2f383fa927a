//! Precheck of the source server: the connection (with its TLS), the
//! versions of the server and of pg_dump, what logical decoding needs
//! (`wal_level`, free slots and wal senders, the plugin and
//! `output_plugin_libraries`, the task's slot, the REPLICATION
//! privilege), transactions that hold up the creation of the slot,
//! settings that end a long copy or stream, and a standby source. The
//! selected tables are checked in `tables`.

use std::collections::HashMap;

use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::server::{Connected, Server};
use super::tables::{self, Selection};
use super::{Check, Findings, TaskState};
use crate::config::decoder::{Decoder, DecoderChoice};
use crate::config::{Config, DdlPolicy, MigrationType};
use crate::connect::sql::{quote_ident, quote_literal};
use crate::migrate::schema::PgDump;

/// A transaction that writes and is older than this is reported: creating
/// the slot waits for it.
const LONG_TRANSACTION_SECONDS: i64 = 10;

pub(super) struct Source {
    client: Client,
    _connection: JoinHandle<()>,
    pub server: Server,
}

impl Source {
    /// Connects as the task will; a failure is the `source.connect` error
    /// and ends the source's checks.
    pub(super) async fn connect(config: &Config, f: &mut Findings) -> Option<Source> {
        let Connected { client, connection, server, .. } =
            Connected::open(&config.source.dsn, "source.dsn", "source", Check::SourceConnect, f).await?;
        Some(Source { client, _connection: connection, server })
    }

    /// Every source check of the task; returns the selection, which the
    /// destination is compared with.
    pub(super) async fn check(&self, config: &Config, state: &TaskState, f: &mut Findings) -> Result<Selection, tokio_postgres::Error> {
        let m = &config.migrate;
        let incremental = m.has(MigrationType::Incremental);
        self.version(incremental, f);
        if m.has(MigrationType::Schema) {
            self.pg_dump(config, f);
        }
        let settings = self.settings().await?;
        if incremental {
            match settings.get("wal_level") {
                Some("logical") => f.pass(Check::SourceWalLevel, "wal_level", "wal_level is logical"),
                other => f.error(
                    Check::SourceWalLevel,
                    "wal_level",
                    format!("wal_level is {}: logical decoding, which the incremental phase reads, needs logical", other.unwrap_or("?")),
                    "in the source's postgresql.conf: wal_level = logical (or ALTER SYSTEM SET wal_level = logical), then restart the server",
                ),
            }
            let slot_exists = self.slot(config, state, f).await?;
            self.slots_and_senders(config, state, slot_exists, &settings, f).await?;
            super::decoder::check(&self.client, &self.server, config, settings.get("output_plugin_libraries"), f).await?;
            self.ddl_capture(config, f).await?;
            if self.server.superuser || self.server.replication {
                f.pass(Check::SourceReplicationPrivilege, &self.server.user, "may open replication connections (REPLICATION or superuser)");
            } else {
                f.error(
                    Check::SourceReplicationPrivilege,
                    &self.server.user,
                    format!(
                        "role {} has neither REPLICATION nor superuser: it can neither create the slot nor stream from it",
                        self.server.user
                    ),
                    format!("ALTER ROLE {} REPLICATION;", quote_ident(&self.server.user)),
                );
            }
            if !slot_exists {
                self.transactions(f).await?;
            }
            self.wal_sender_timeout(config, &settings, f);
            if m.has(MigrationType::Full) {
                self.max_slot_wal_keep_size(&settings, f);
            }
        }
        if m.has(MigrationType::Full) {
            self.timeouts(&settings, f);
        }
        self.standby(config, &settings, f);
        tables::check(&self.client, config, &self.server, f).await
    }

    /// Whether DDL run on the source during the stream reaches the
    /// destination: the capture's event trigger in the source database.
    async fn ddl_capture(&self, config: &Config, f: &mut Findings) -> Result<(), tokio_postgres::Error> {
        let check = Check::SourceDdlCapture;
        let policy = config.migrate.ddl;
        if policy == DdlPolicy::Skip {
            f.pass(check, "migrate.ddl", "DDL on the source is not applied to the destination (migrate.ddl = \"skip\")");
            return Ok(());
        }
        let row = self
            .client
            .query_one(
                "SELECT (SELECT evtenabled::text FROM pg_event_trigger WHERE evtname = 'decant_ddl_end'),
                        EXISTS (SELECT FROM pg_extension WHERE extname = 'decant')",
                &[],
            )
            .await?;
        let (enabled, extension): (Option<String>, bool) = (row.get(0), row.get(1));
        let by = if extension { "the decant extension" } else { "the script of decant ddl-capture-sql" };
        match enabled.as_deref() {
            Some("O" | "A") => f.pass(
                check,
                "decant_ddl_end",
                format!(
                    "DDL on the source is captured ({by}) and {} (migrate.ddl = \"{}\")",
                    if policy == DdlPolicy::Apply { "applied at its place in the stream" } else { "stops the task" },
                    policy.name()
                ),
            ),
            Some(_) => f.warn(
                check,
                "decant_ddl_end",
                "the event trigger decant_ddl_end that captures DDL is disabled (or fires only for replicas): DDL on the source \
                 would not reach the destination, and the stream would stop at the next change of a table it altered",
                "ALTER EVENT TRIGGER decant_ddl_end ENABLE; ALTER EVENT TRIGGER decant_ddl_drop ENABLE;",
            ),
            None => f.warn(
                check,
                "decant_ddl_end",
                "DDL on the source is not captured (no decant extension in the source database): DDL run during the stream \
                 would not reach the destination, and the stream would stop at the next change of a table it altered",
                "in the source database, as a superuser: CREATE EXTENSION decant; (or, where the extension cannot be installed: \
                 decant ddl-capture-sql | psql -1 <source>)",
            ),
        }
        Ok(())
    }

    fn version(&self, incremental: bool, f: &mut Findings) {
        let s = &self.server;
        if incremental && s.version_num < 90400 {
            f.error(
                Check::SourceVersion,
                "source",
                format!("PostgreSQL {}: logical decoding, which the incremental phase reads, needs PostgreSQL 9.4 or later", s.version),
                "upgrade the source, or migrate without incremental: migrate.types = [\"schema\", \"full\"]",
            );
        } else {
            f.pass(Check::SourceVersion, "source", format!("PostgreSQL {}", s.version));
        }
    }

    fn pg_dump(&self, config: &Config, f: &mut Findings) {
        let major = self.server.version_num / 10000;
        match PgDump::locate(&config.migrate.pg_dump, major) {
            Ok(p) => f.pass(
                Check::SourcePgDump,
                "pg_dump",
                format!("{} (version {}), not older than the source", p.path().display(), p.version().unwrap_or_default()),
            ),
            Err(e) => f.error(
                Check::SourcePgDump,
                "pg_dump",
                e.to_string(),
                format!(
                    "install postgresql-client-{major} (or newer), or set migrate.pg_dump = \"/usr/lib/postgresql/{major}/bin/pg_dump\""
                ),
            ),
        }
    }

    async fn settings(&self) -> Result<Settings, tokio_postgres::Error> {
        let names = [
            "wal_level",
            "max_replication_slots",
            "max_wal_senders",
            "output_plugin_libraries",
            "max_slot_wal_keep_size",
            "wal_sender_timeout",
            "hot_standby_feedback",
            "statement_timeout",
            "idle_in_transaction_session_timeout",
        ];
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let rows = self.client.query("SELECT name::text, setting::text FROM pg_settings WHERE name = ANY($1)", &[&names]).await?;
        Ok(Settings(rows.iter().map(|r| (r.get(0), r.get(1))).collect()))
    }

    /// The task's slot: free to create, or this task's. Returns whether it
    /// exists.
    async fn slot(&self, config: &Config, state: &TaskState, f: &mut Findings) -> Result<bool, tokio_postgres::Error> {
        let slot = &config.source.slot;
        let wal_status = if self.server.version_num >= 130000 { "coalesce(wal_status, '')" } else { "''" };
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT slot_type::text, coalesce(plugin::text, ''), coalesce(database::text, ''), active_pid, {wal_status},
                            current_database()::text
                       FROM pg_replication_slots WHERE slot_name = $1"
                ),
                &[slot],
            )
            .await?;
        let object = format!("slot {slot:?}");
        let phases = config.migrate.has_phases_before_stream();
        let start_over = "start the task over: DROP SCHEMA decant CASCADE and the migrated objects in the destination";
        let Some(row) = row else {
            match state {
                TaskState::Planned(phase) if phases => f.error(
                    Check::SourceSlot,
                    object,
                    format!(
                        "slot {slot:?} does not exist on the source, but task {} is planned (phase {phase}): the changes since its \
                         copy began are gone",
                        config.task_id
                    ),
                    start_over,
                ),
                _ if phases || config.source.create_slot => {
                    f.pass(Check::SourceSlot, object, format!("slot {slot:?} is free; the task creates it"))
                }
                _ => f.error(
                    Check::SourceSlot,
                    object,
                    format!("slot {slot:?} does not exist on the source, and source.create_slot is false"),
                    format!(
                        "source.create_slot = true, or create it: SELECT pg_create_logical_replication_slot({}, 'decant')",
                        quote_literal(slot)
                    ),
                ),
            }
            return Ok(false);
        };
        let (kind, plugin, database): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let (active, wal_status, current): (Option<i32>, String, String) = (row.get(3), row.get(4), row.get(5));
        let other_name = format!(
            "set source.slot to another name, or drop it if nothing uses it: SELECT pg_drop_replication_slot({})",
            quote_literal(slot)
        );
        let readable = Decoder::from_plugin(&plugin);
        let wanted = config.source.decoder;
        if kind != "logical" || readable.is_none() {
            let what = if kind == "logical" { format!("output plugin {plugin}") } else { format!("a {kind} slot") };
            f.error(Check::SourceSlot, object, format!("slot {slot:?} exists with {what}, which decant cannot read"), other_name);
        } else if wanted != DecoderChoice::Auto && Some(wanted.resolve_unchecked()) != readable {
            f.error(
                Check::SourceSlot,
                object,
                format!("slot {slot:?} uses output plugin {plugin}, but source.decoder = \"{}\"", wanted.name()),
                format!("set source.decoder = \"{plugin}\" (or \"auto\"): a slot's plugin is fixed when it is created; or {other_name}"),
            );
        } else if database != current {
            f.error(Check::SourceSlot, object, format!("slot {slot:?} belongs to database {database}, not {current}"), other_name);
        } else if wal_status == "lost" {
            f.error(
                Check::SourceSlot,
                object,
                format!("slot {slot:?} has lost WAL it needs (wal_status lost, see max_slot_wal_keep_size): the task cannot resume"),
                start_over,
            );
        } else if phases && *state == TaskState::New {
            f.error(
                Check::SourceSlot,
                object,
                format!("slot {slot:?} already exists, but the destination has no plan for task {}", config.task_id),
                format!("{other_name} (an earlier start of this task that stopped before its plan was stored leaves one)"),
            );
        } else if let Some(pid) = active {
            f.warn(
                Check::SourceSlot,
                object,
                format!(
                    "slot {slot:?} is in use by the source process with PID {pid}: another agent of this slot, or a stale \
                     connection the source drops after wal_sender_timeout (the agent retries meanwhile)"
                ),
                format!("stop the other agent, or end it: SELECT pg_terminate_backend({pid})"),
            );
        } else if wal_status == "unreserved" {
            f.warn(
                Check::SourceSlot,
                object,
                format!("slot {slot:?} is about to lose WAL it needs (wal_status unreserved, see max_slot_wal_keep_size)"),
                "start the agent at once, or raise max_slot_wal_keep_size on the source (reload)",
            );
        } else {
            f.pass(Check::SourceSlot, object, format!("slot {slot:?} exists with plugin decant: the task resumes from it"));
        }
        Ok(true)
    }

    async fn slots_and_senders(
        &self,
        config: &Config,
        state: &TaskState,
        slot_exists: bool,
        settings: &Settings,
        f: &mut Findings,
    ) -> Result<(), tokio_postgres::Error> {
        let row = self
            .client
            .query_one(
                "SELECT (SELECT count(*) FROM pg_replication_slots), (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')",
                &[],
            )
            .await?;
        let (slots, senders): (i64, i64) = (row.get(0), row.get(1));
        // A copy resumed after a restart takes its snapshot from a
        // temporary slot besides the task's.
        let resumes_copy =
            config.migrate.has(MigrationType::Full) && matches!(state, TaskState::Planned(p) if p == "schema" || p == "copy");
        let needed = i64::from(!slot_exists) + i64::from(resumes_copy);
        let int = |name: &str| settings.get(name).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        for (check, name, used, needed, what) in [
            (Check::SourceReplicationSlots, "max_replication_slots", slots, needed, "replication slots"),
            (Check::SourceWalSenders, "max_wal_senders", senders, 1, "wal senders (replication connections)"),
        ] {
            let max = int(name);
            let message = format!("{name} is {max}, {used} in use; the task needs {needed} more {what}");
            if max - used >= needed {
                f.pass(check, name, message);
            } else {
                f.error(
                    check,
                    name,
                    message,
                    format!("in the source's postgresql.conf: {name} = {} (or more), then restart the server", used + needed),
                );
            }
        }
        Ok(())
    }

    /// Transactions that creating the slot waits for: every transaction
    /// that writes when it starts, prepared ones included.
    async fn transactions(&self, f: &mut Findings) -> Result<(), tokio_postgres::Error> {
        let long = self
            .client
            .query(
                "SELECT pid, coalesce(usename::text, ''), coalesce(datname::text, ''), coalesce(state, ''),
                        extract(epoch FROM now() - xact_start)::int8
                   FROM pg_stat_activity
                  WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() AND xact_start < now() - make_interval(secs => $1)
                  ORDER BY xact_start",
                &[&(LONG_TRANSACTION_SECONDS as f64)],
            )
            .await?;
        for r in &long {
            let (pid, user, db, state, age): (i32, String, String, String, i64) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            f.warn(
                Check::SourceLongTransactions,
                format!("pid {pid}"),
                format!(
                    "a transaction of {user} on database {db} ({state}) has been open for {}: creating the task's slot waits \
                     until it ends (the slot's snapshot waits for every transaction writing when it starts)",
                    age_text(age)
                ),
                format!("let it finish, or end it: SELECT pg_terminate_backend({pid})"),
            );
        }
        if long.is_empty() {
            f.pass(
                Check::SourceLongTransactions,
                "source",
                format!("no writing transaction older than {LONG_TRANSACTION_SECONDS} s (as far as this user sees pg_stat_activity)"),
            );
        }
        let prepared = self
            .client
            .query(
                "SELECT gid, owner::text, database::text, extract(epoch FROM now() - prepared)::int8 FROM pg_prepared_xacts ORDER BY prepared",
                &[],
            )
            .await?;
        for r in &prepared {
            let (gid, owner, db, age): (String, String, String, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
            f.warn(
                Check::SourcePreparedTransactions,
                format!("prepared transaction {gid:?}"),
                format!(
                    "prepared by {owner} on database {db} {} ago: creating the task's slot waits until it is committed or \
                     rolled back",
                    age_text(age)
                ),
                format!("on database {db}: COMMIT PREPARED {0}; or ROLLBACK PREPARED {0};", quote_literal(&gid)),
            );
        }
        if prepared.is_empty() {
            f.pass(Check::SourcePreparedTransactions, "source", "no prepared transactions");
        }
        Ok(())
    }

    fn wal_sender_timeout(&self, config: &Config, settings: &Settings, f: &mut Findings) {
        let ms: i64 = settings.get("wal_sender_timeout").and_then(|v| v.parse().ok()).unwrap_or(0);
        let interval = config.agent.status_interval_seconds.max(1) as i64;
        if ms > 0 && ms < 2 * interval * 1000 {
            f.warn(
                Check::SourceWalSenderTimeout,
                "wal_sender_timeout",
                format!(
                    "wal_sender_timeout is {ms} ms, less than twice agent.status_interval_seconds ({interval} s): the source may \
                     end the stream as unresponsive between two of the agent's status updates"
                ),
                format!(
                    "in the source's postgresql.conf: wal_sender_timeout = 60s, then SELECT pg_reload_conf(); or agent.status_interval_seconds = {}",
                    (ms / 3000).max(1)
                ),
            );
        } else {
            let value = if ms == 0 { "off".to_owned() } else { format!("{ms} ms") };
            f.pass(Check::SourceWalSenderTimeout, "wal_sender_timeout", format!("wal_sender_timeout is {value}"));
        }
    }

    fn max_slot_wal_keep_size(&self, settings: &Settings, f: &mut Findings) {
        match settings.get("max_slot_wal_keep_size").and_then(|v| v.parse::<i64>().ok()) {
            Some(mb) if mb >= 0 => f.warn(
                Check::SourceMaxSlotWalKeepSize,
                "max_slot_wal_keep_size",
                format!(
                    "max_slot_wal_keep_size is {mb} MB: the slot is created before the copy and moves only once the stream \
                     starts; if the source writes more WAL than that during the copy, it invalidates the slot and the task \
                     must start over"
                ),
                "in the source's postgresql.conf: max_slot_wal_keep_size = -1 (or more than the WAL written during the copy), then SELECT pg_reload_conf()",
            ),
            _ => f.pass(Check::SourceMaxSlotWalKeepSize, "max_slot_wal_keep_size", "slots keep all the WAL they need (max_slot_wal_keep_size = -1)"),
        }
    }

    /// Session timeouts (server, database or role settings, as this user's
    /// sessions get them) that end the copy's long statements or its
    /// snapshot, which stays idle in its transaction for the whole copy.
    fn timeouts(&self, settings: &Settings, f: &mut Findings) {
        let mut found = false;
        for (name, what) in [
            ("statement_timeout", "the copy of a large table is one statement, and would be cancelled"),
            (
                "idle_in_transaction_session_timeout",
                "the session holding the task's snapshot stays idle in its transaction for the whole copy, and would be ended",
            ),
        ] {
            let ms: i64 = settings.get(name).and_then(|v| v.parse().ok()).unwrap_or(0);
            if ms > 0 {
                found = true;
                f.warn(
                    Check::SourceTimeouts,
                    name,
                    format!("{name} is {ms} ms for {}'s sessions: {what}", self.server.user),
                    format!("ALTER ROLE {} SET {name} = 0;", quote_ident(&self.server.user)),
                );
            }
        }
        if !found {
            f.pass(Check::SourceTimeouts, "source", "no statement_timeout or idle_in_transaction_session_timeout for the copy's sessions");
        }
    }

    fn standby(&self, config: &Config, settings: &Settings, f: &mut Findings) {
        let s = &self.server;
        if !s.in_recovery {
            f.pass(Check::SourceStandby, "source", "the source is a primary (not in recovery)");
            return;
        }
        let feedback = settings.get("hot_standby_feedback") == Some("on");
        let feedback_fix = "in the standby's postgresql.conf: hot_standby_feedback = on (with primary_slot_name set to a physical slot on the primary), then SELECT pg_reload_conf()";
        let m = &config.migrate;
        if m.has(MigrationType::Incremental) && s.version_num < 160000 {
            f.error(
                Check::SourceStandby,
                "source",
                format!(
                    "the source is a standby running PostgreSQL {}: logical decoding on a standby needs PostgreSQL 16 or later",
                    s.version
                ),
                "set source.dsn to the primary, or upgrade the standby and its primary to PostgreSQL 16 or later",
            );
        } else if !feedback && (m.has(MigrationType::Incremental) || m.has(MigrationType::Full)) {
            let what = if m.has(MigrationType::Incremental) {
                "the primary's VACUUM may remove rows the slot still needs, which invalidates the slot"
            } else {
                "recovery conflicts may cancel the copy's long queries"
            };
            f.warn(
                Check::SourceStandby,
                "hot_standby_feedback",
                format!("the source is a standby without hot_standby_feedback: {what}"),
                feedback_fix,
            );
        } else {
            f.pass(Check::SourceStandby, "source", "the source is a standby, which this task can read");
        }
    }
}

/// Server settings as this session sees them.
struct Settings(HashMap<String, String>);

impl Settings {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// `3 min 20 s`.
fn age_text(seconds: i64) -> String {
    match seconds {
        s if s >= 3600 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{s} s"),
    }
}
