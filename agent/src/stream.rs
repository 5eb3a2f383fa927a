//! The incremental phase on the source side: one session that streams the
//! source slot to the applier and confirms to the source only what the
//! destination has durably committed. `task` runs sessions, again after a
//! failure, within the retry policy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use decant_proto::grpc::agent_message::Body as AgentBody;
use decant_proto::grpc::applier_message::Body as ApplierBody;
use decant_proto::grpc::{AgentMessage, Hello, RecordBatch};
use decant_proto::options::PACKING_BACKLOG_BYTES;
use decant_proto::{decode, peek_kind, DecodeError, Lsn, Record, RecordKind, FORMAT_VERSION};
use tokio::sync::{watch, Notify};

use crate::config::Config;
use crate::connect::clock::pg_now;
use crate::connect::sql::quote_literal;
use crate::connect::ConnInfo;
use crate::metrics::Metrics;
use crate::replication::decoder::{self, Decoder, DecoderChoice, TranslateError, Translator};
use crate::replication::messages::StatusUpdate;
use crate::replication::{ReplicationClient, ReplicationError, Streamed};
use crate::retry::{ErrorClass, Retry};
use crate::transport::client::{open, ApplierStream, StreamError};
use crate::transport::TransportSettings;

mod heartbeat;

use heartbeat::spawn_source_session;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("source: {0}")]
    Source(#[from] ReplicationError),
    #[error("{0}")]
    Applier(#[from] StreamError),
    #[error("source slot {slot:?}: {problem}")]
    Slot { slot: String, problem: String, class: ErrorClass },
    #[error("corrupt record from the source at {lsn}: {error}")]
    Corrupt { lsn: Lsn, error: DecodeError },
    #[error("reading {plugin}'s output at {lsn}: {error}")]
    Translate { plugin: &'static str, lsn: Lsn, error: TranslateError },
    #[error("the applier closed the stream")]
    ApplierClosed,
    #[error(
        "the source is shutting down: its walsender waits for a confirmation of {wal_end}, past a transaction the plugin still \
         holds (pack_transactions); the stream ends so the source can stop, and resumes from the last confirmed position"
    )]
    SourceStopping { wal_end: Lsn },
}

impl SessionError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SessionError::Source(e) if e.is_connection_loss() => ErrorClass::Connection,
            SessionError::Source(e) => match e.code() {
                // bad password / no such role / not allowed by pg_hba,
                // wal_level not logical, plugin missing or not allowed,
                // insufficient privilege, no such database, bad option, a
                // value without an equivalent in UTF-8 (decoding would stop
                // at it again).
                Some("28P01" | "28000" | "55000" | "58P01" | "42501" | "3D000" | "22023" | "42704" | "22P05" | "22021") => {
                    ErrorClass::Fatal
                }
                _ => match e {
                    ReplicationError::Tls(_)
                    | ReplicationError::TlsRefused(_)
                    | ReplicationError::PasswordNeeded(_)
                    | ReplicationError::UnsupportedAuth(_) => ErrorClass::Fatal,
                    _ => ErrorClass::Other,
                },
            },
            SessionError::Applier(e) if e.is_connection_loss() => ErrorClass::Connection,
            SessionError::Applier(StreamError::Status(s))
                if matches!(
                    s.code(),
                    tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
                        | tonic::Code::FailedPrecondition
                ) =>
            {
                ErrorClass::Fatal
            }
            SessionError::Applier(_) => ErrorClass::Other,
            SessionError::Slot { class, .. } => *class,
            SessionError::Corrupt { .. } => ErrorClass::Other,
            // The same WAL would fail the same way.
            SessionError::Translate { error: TranslateError::Protocol(_), .. } => ErrorClass::Fatal,
            SessionError::Translate { .. } => ErrorClass::Other,
            SessionError::SourceStopping { .. } => ErrorClass::Connection,
            SessionError::ApplierClosed => ErrorClass::Connection,
        }
    }
}

/// Size of the messages the plugin packs records into for the agent.
const PACKED_MESSAGE_BYTES: u32 = 64 * 1024;

/// State of one connected session (source slot + applier stream).
pub struct Session<'c> {
    config: &'c Config,
    metrics: &'c Metrics,
    batch: BytesMut,
    batch_count: u32,
    batch_started: Option<Instant>,
    sequence: u64,
    pending: Option<AgentMessage>,
    in_txn: bool,
    last_commit_end: Lsn,
    last_received: Lsn,
    wal_end: Lsn,
    committed: Lsn,
    confirmed: Lsn,
    /// The plugin packs transactions (`pack_transactions`): its keepalive
    /// position may lie past a COMMIT it still holds.
    packing: bool,
    /// Position of the last non-transactional message received: every
    /// transaction committed before it has been received.
    last_marker: Lsn,
    /// The position of a reply-requested keepalive that could not be
    /// confirmed, until data arrives.
    unconfirmed_ping: Option<Lsn>,
    /// Wakes the heartbeat task early (see `nudge_if_held`).
    nudge: Arc<Notify>,
    /// `last_commit_end` when the heartbeat was last woken early.
    nudged_for: Lsn,
    /// Turns a built-in plugin's output into records (None: decant's).
    translator: Option<Translator>,
    /// Position of the last message given to the translator.
    translated_at: Lsn,
    /// Both ends connected and the stream started.
    pub streaming: bool,
}

impl<'c> Session<'c> {
    pub fn new(config: &'c Config, metrics: &'c Metrics) -> Self {
        Session {
            config,
            metrics,
            batch: BytesMut::new(),
            batch_count: 0,
            batch_started: None,
            sequence: 0,
            pending: None,
            in_txn: false,
            last_commit_end: Lsn(0),
            last_received: Lsn(0),
            wal_end: Lsn(0),
            committed: Lsn(0),
            confirmed: Lsn(0),
            packing: false,
            last_marker: Lsn(0),
            unconfirmed_ping: None,
            nudge: Arc::new(Notify::new()),
            nudged_for: Lsn(0),
            translator: None,
            translated_at: Lsn(0),
            streaming: false,
        }
    }

    /// Streams until `shutdown` turns true or something fails.
    pub async fn run(
        &mut self,
        source: &ConnInfo,
        transport: &TransportSettings,
        retry: &mut Retry,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        let config = self.config;
        let slot = config.source.slot.as_str();
        let mut repl = ReplicationClient::connect(source, "decant agent").await?;
        let system = repl.identify_system().await?;
        let decoder = self.ensure_slot(&mut repl, slot).await?;
        let hello = Hello {
            task_id: config.task_id.clone(),
            format_version: u32::from(FORMAT_VERSION),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            source_system_id: system.system_id.clone(),
            source_database: system.database.clone().unwrap_or_default(),
        };
        let mut applier = open(&config.agent.applier_url, transport, hello, config.agent.max_batches_in_flight).await?;
        self.committed = applier.resume_lsn;
        self.confirmed = applier.resume_lsn;
        self.last_commit_end = applier.resume_lsn;
        let options = match decoder {
            Decoder::Decant => {
                let mut options: Vec<(&str, String)> = config.plugin_option_pairs();
                // Records of a transaction packed into messages of up to
                // 64 KiB: far fewer messages for the walsender and for us.
                options.push(("max_message_bytes", PACKED_MESSAGE_BYTES.to_string()));
                // A backlog of small transactions in few messages. Safe
                // only with heartbeats: on an idle stream their positions
                // are what may be confirmed (see `confirmable`).
                self.packing = config.source.heartbeat_seconds > 0;
                if self.packing {
                    options.push(("pack_transactions", "on".to_owned()));
                }
                options
            }
            other => {
                let publication = config.source.publication();
                decoder::start_options(other, publication, repl.server_version())
            }
        };
        let translate_error = |error| SessionError::Translate { plugin: decoder.plugin(), lsn: applier.resume_lsn, error };
        self.translator = Translator::new(decoder, source, config.selection()).await.map_err(translate_error)?;
        repl.start_replication(slot, applier.resume_lsn, &options).await?;
        tracing::info!(slot, resume_lsn = %applier.resume_lsn, system = %system.system_id, plugin = decoder.plugin(), "streaming");
        self.streaming = true;
        let session = spawn_source_session(source.clone(), config.source.heartbeat_seconds, self.nudge.clone());
        let result = self.pump(&mut repl, &mut applier, retry, shutdown).await;
        session.abort();
        if result.is_ok() {
            repl.close().await;
        }
        result
    }

    /// Creates the slot if allowed and missing (with the plugin
    /// `source.decoder` chooses, and pgoutput's publication first); refuses
    /// a slot of a plugin decant cannot read or other than the configured
    /// one; reports who holds a busy slot. Returns the slot's decoder.
    async fn ensure_slot(&self, repl: &mut ReplicationClient, slot: &str) -> Result<Decoder, SessionError> {
        let rows = repl
            .simple_query(&format!(
                "SELECT plugin, active_pid::text, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = {}",
                quote_literal(slot)
            ))
            .await?;
        let problem = |problem: String, class| SessionError::Slot { slot: slot.to_owned(), problem, class };
        let choice = self.config.source.decoder;
        match rows.first() {
            // A migration's slot comes from its snapshot: one made now would
            // miss every change since the copy.
            None if self.config.migrate.has_phases_before_stream() => Err(problem(
                format!(
                    "does not exist on the source: the changes since task {}'s copy are gone; start the task over \
                     (DROP SCHEMA decant CASCADE and the migrated objects in the destination)",
                    self.config.task_id
                ),
                ErrorClass::Fatal,
            )),
            None if self.config.source.create_slot => {
                let (decoder, _) = decoder::create_slot(repl, &self.config.source, false).await.map_err(|e| match e {
                    decoder::PublicationError::Source(e) => SessionError::Source(e),
                    other => problem(format!("cannot be created: {other}"), ErrorClass::Fatal),
                })?;
                Ok(decoder)
            }
            None => Err(problem(
                "does not exist on the source; create it (plugin decant, pgoutput or test_decoding), or set source.create_slot = true"
                    .into(),
                ErrorClass::Fatal,
            )),
            Some(row) => {
                let plugin = row.first().cloned().flatten().unwrap_or_default();
                let Some(decoder) = Decoder::from_plugin(&plugin) else {
                    return Err(problem(
                        format!("uses output plugin {plugin:?}, which decant cannot read (it reads decant, pgoutput and test_decoding); use another slot name"),
                        ErrorClass::Fatal,
                    ));
                };
                if choice != DecoderChoice::Auto && choice.resolve_unchecked() != decoder {
                    return Err(problem(
                        format!(
                            "uses output plugin {plugin}, but source.decoder = \"{}\": a slot's plugin is fixed when it is created; \
                             set source.decoder = \"{plugin}\" (or \"auto\"), or use another slot",
                            choice.name()
                        ),
                        ErrorClass::Fatal,
                    ));
                }
                if let Some(pid) = row.get(1).cloned().flatten() {
                    return Err(problem(
                        format!(
                            "is in use by the source process with PID {pid}: another agent for this slot, or a stale connection \
                             that the source drops after wal_sender_timeout (or end it with pg_terminate_backend({pid}))"
                        ),
                        ErrorClass::Other,
                    ));
                }
                Ok(decoder)
            }
        }
    }

    /// Moves records from the slot to the applier and acks back.
    async fn pump(
        &mut self,
        repl: &mut ReplicationClient,
        applier: &mut ApplierStream,
        retry: &mut Retry,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        let config = self.config;
        let batch_delay = Duration::from_millis(config.agent.batch_max_delay_ms);
        let mut status_tick = tokio::time::interval(Duration::from_secs(config.agent.status_interval_seconds.max(1)));
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.batch_started.map(|s| s + batch_delay);
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                ack = applier.inbound.message() => {
                    match ack {
                        Ok(Some(m)) => {
                            if let Some(ApplierBody::Ack(a)) = m.body {
                                if Lsn(a.committed_lsn) > self.committed {
                                    self.committed = Lsn(a.committed_lsn);
                                    retry.succeeded();
                                    self.send_status(repl, false).await?;
                                }
                            }
                        }
                        Ok(None) => return Err(SessionError::ApplierClosed),
                        Err(status) => return Err(StreamError::Status(status).into()),
                    }
                }
                permit = applier.outbound.reserve(), if self.pending.is_some() => {
                    let permit = permit.map_err(|_| SessionError::ApplierClosed)?;
                    if let Some(msg) = self.pending.take() {
                        permit.send(msg);
                        self.metrics.batches_sent.inc();
                    }
                }
                _ = status_tick.tick() => self.send_status(repl, false).await?,
                _ = sleep_until(deadline), if deadline.is_some() && self.pending.is_none() => self.cut_batch(),
                // Translated records are taken a chunk at a time, like
                // messages: a large held transaction does not swell the batch.
                _ = std::future::ready(()), if self.pending.is_none() && self.translator.as_ref().is_some_and(Translator::has_output) => {
                    self.take_translated()?;
                }
                msg = repl.recv(), if self.pending.is_none() && !self.translator.as_ref().is_some_and(Translator::has_output) => {
                    match msg? {
                        Streamed::Data { wal_start, wal_end, payload, .. } => {
                            self.unconfirmed_ping = None;
                            self.wal_end = self.wal_end.max(wal_end);
                            self.last_received = self.last_received.max(wal_start);
                            match &mut self.translator {
                                None => self.take_records(wal_start, &payload)?,
                                Some(t) => {
                                    let plugin = t.plugin();
                                    t.feed(wal_start, &payload).await.map_err(|error| SessionError::Translate { plugin, lsn: wal_start, error })?;
                                    self.translated_at = wal_start;
                                    self.take_translated()?;
                                }
                            }
                        }
                        Streamed::Keepalive { wal_end, reply_requested, .. } => {
                            self.wal_end = self.wal_end.max(wal_end);
                            self.nudge_if_held(wal_end);
                            self.send_status(repl, reply_requested).await?;
                            if reply_requested {
                                self.check_source_stopping(wal_end)?;
                            }
                        }
                        Streamed::End => return Err(SessionError::Source(ReplicationError::Protocol("the source ended the replication stream".into()))),
                    }
                    self.metrics.source_wal_end.set(self.wal_end.0);
                }
            }
        }
        self.drain_on_shutdown(repl, applier).await
    }

    /// Takes the records of one message (several when the plugin packs
    /// them, see `max_message_bytes`) into the current batch.
    fn take_records(&mut self, at: Lsn, payload: &[u8]) -> Result<(), SessionError> {
        let mut offset = 0;
        // Only BEGIN and COMMIT matter here (and COMMIT is small): the
        // rest pass by their head byte; the applier decodes and checks all.
        while offset < payload.len() {
            let corrupt = |mut error: DecodeError| {
                error.offset += offset;
                SessionError::Corrupt { lsn: at, error }
            };
            let (kind, used) = peek_kind(&payload[offset..]).map_err(corrupt)?;
            match kind {
                RecordKind::Begin => self.in_txn = true,
                RecordKind::Commit => {
                    if let (Record::Commit(c), _) = decode(&payload[offset..]).map_err(corrupt)? {
                        self.in_txn = false;
                        self.last_commit_end = c.end_lsn;
                    }
                }
                RecordKind::Message if !self.in_txn => {
                    if let (Record::Message(m), _) = decode(&payload[offset..]).map_err(corrupt)? {
                        self.last_marker = self.last_marker.max(m.lsn);
                    }
                }
                _ => {}
            }
            self.batch_count += 1;
            offset += used;
        }
        self.metrics.records_received.inc();
        self.metrics.bytes_received.add(payload.len() as u64);
        if self.batch.is_empty() {
            self.batch_started = Some(Instant::now());
        }
        self.batch.extend_from_slice(payload);
        if self.batch.len() >= self.config.agent.batch_max_bytes {
            self.cut_batch();
        }
        Ok(())
    }

    /// The next chunk of translated records into the batch.
    fn take_translated(&mut self) -> Result<(), SessionError> {
        let at = self.translated_at;
        let Some(t) = &mut self.translator else { return Ok(()) };
        let plugin = t.plugin();
        let chunk = t.next_chunk().map_err(|error| SessionError::Translate { plugin, lsn: at, error })?;
        if let Some(chunk) = chunk {
            self.take_records(at, &chunk)?;
        }
        Ok(())
    }

    /// Makes the records read so far the next message to send, unless one
    /// is still waiting to go out (it would be lost).
    fn cut_batch(&mut self) {
        if self.batch.is_empty() || self.pending.is_some() {
            return;
        }
        self.sequence += 1;
        let records = self.batch.split().freeze();
        self.pending = Some(AgentMessage {
            body: Some(AgentBody::Batch(RecordBatch {
                sequence: self.sequence,
                records,
                count: self.batch_count,
                source_wal_end: self.wal_end.0,
                sent_at: pg_now(),
            })),
        });
        self.batch_count = 0;
        self.batch_started = None;
    }

    /// What may be confirmed to the source: what the destination durably
    /// committed, or — when no transaction is in flight — the WAL end the
    /// source reported, so an idle slot keeps moving (with packing, the
    /// position of the last heartbeat instead: the plugin may hold a COMMIT
    /// before the WAL end, never before a heartbeat). Records outside
    /// transactions (heartbeats and other non-transactional messages) do
    /// not count as in flight: the destination has nothing to commit for
    /// them, and counting them would let a heartbeat that always arrives
    /// just before the status update hold the slot back forever.
    fn confirmable(&self) -> Lsn {
        let idle = !self.in_txn && self.committed >= self.last_commit_end;
        if idle {
            self.committed.max(if self.packing { self.last_marker } else { self.wal_end })
        } else {
            self.committed
        }
    }

    /// A walsender that is shutting down asks again and again, at once,
    /// for a confirmation of everything it sent, and exits only then. With
    /// packing, an idle agent confirms only up to the last heartbeat, and no
    /// heartbeat comes during a shutdown: the plugin may hold a COMMIT that
    /// this walsender will never send. Asked twice in a row, with no data in
    /// between, for a position it cannot confirm (a running walsender asks
    /// only after wal_sender_timeout / 2 without status updates), the agent
    /// ends the stream: the source can stop, and the held transaction comes
    /// again after the restart.
    fn check_source_stopping(&mut self, wal_end: Lsn) -> Result<(), SessionError> {
        if !self.packing || self.confirmed >= wal_end {
            self.unconfirmed_ping = None;
            return Ok(());
        }
        if self.unconfirmed_ping == Some(wal_end) {
            return Err(SessionError::SourceStopping { wal_end });
        }
        self.unconfirmed_ping = Some(wal_end);
        Ok(())
    }

    /// With packing, the plugin may hold the last COMMIT of a burst when
    /// the WAL after it holds nothing for the slot (vacuum, another
    /// database): it goes out with the next non-transactional message, the
    /// periodic heartbeat. A keepalive showing the source's WAL at least
    /// `PACKING_BACKLOG_BYTES` past the last COMMIT received is the sign of
    /// a possibly held one: the heartbeat is then sent at once, once per
    /// COMMIT received (so its own message cannot start a loop).
    fn nudge_if_held(&mut self, wal_end: Lsn) {
        if self.packing
            && self.config.source.heartbeat_when_held
            && self.nudged_for != self.last_commit_end
            && wal_end.0 >= self.last_commit_end.0.saturating_add(PACKING_BACKLOG_BYTES)
        {
            self.nudged_for = self.last_commit_end;
            self.nudge.notify_one();
        }
    }

    async fn send_status(&mut self, repl: &mut ReplicationClient, reply_requested_by_server: bool) -> Result<(), SessionError> {
        // Sent on every request and interval even when unchanged: it is also
        // how the source knows this receiver is alive.
        let _ = reply_requested_by_server;
        let confirm = self.confirmable().max(self.confirmed);
        self.confirmed = confirm;
        repl.send_status(StatusUpdate {
            written: self.last_received.max(confirm),
            flushed: confirm,
            applied: confirm,
            clock: pg_now(),
            reply_requested: false,
        })
        .await?;
        self.metrics.confirmed_lsn.set(confirm.0);
        self.metrics.lag_bytes.set(self.wal_end.0.saturating_sub(confirm.0));
        Ok(())
    }

    /// On shutdown: send what was read, wait a little for the applier to
    /// commit it, confirm what it did.
    async fn drain_on_shutdown(&mut self, repl: &mut ReplicationClient, applier: &mut ApplierStream) -> Result<(), SessionError> {
        // The message waiting for room first, then what was read after it.
        for _ in 0..2 {
            if let Some(msg) = self.pending.take() {
                let _ = applier.outbound.send(msg).await;
            }
            self.cut_batch();
        }
        let until = Instant::now() + Duration::from_secs(5);
        while self.committed < self.last_commit_end && Instant::now() < until {
            match tokio::time::timeout_at(until.into(), applier.inbound.message()).await {
                Ok(Ok(Some(m))) => {
                    if let Some(ApplierBody::Ack(a)) = m.body {
                        self.committed = self.committed.max(Lsn(a.committed_lsn));
                    }
                }
                _ => break,
            }
        }
        self.send_status(repl, false).await?;
        tracing::info!(confirmed = %self.confirmed, "agent stopped");
        Ok(())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
