//! A PostgreSQL connection in logical replication mode
//! (`replication=database`): the walsender's side of the streaming
//! replication protocol, on the agent's own protocol session
//! ([`crate::connect::wire`]), because tokio-postgres has no replication
//! support. It runs replication commands and streams (`START_REPLICATION`).

use bytes::{Buf, Bytes};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::messages::{parse_server_message, ServerMessage, StatusUpdate};
use crate::connect::sql::{quote_ident, quote_literal};
use crate::connect::wire::{server_error, Incoming, WireSession};
use crate::connect::ConnInfo;

/// The replication client's errors are its session's.
pub use crate::connect::wire::{Row, WireError as ReplicationError};

pub struct ReplicationClient {
    wire: WireSession,
}

impl ReplicationClient {
    /// Connects in `replication=database` mode and authenticates.
    pub async fn connect(info: &ConnInfo, application_name: &str) -> Result<Self, ReplicationError> {
        Ok(ReplicationClient { wire: WireSession::connect(info, application_name, true, "").await? })
    }

    /// The server's `server_version_num`, e.g. 150020.
    pub fn server_version(&self) -> u32 {
        self.wire.server_version()
    }

    /// Runs one command with the simple query protocol and returns its rows.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, ReplicationError> {
        self.wire.simple_query(sql).await
    }

    /// `START_REPLICATION SLOT … LOGICAL lsn (options)`: from here on the
    /// connection streams; use [`Self::recv`] and [`Self::send_status`].
    pub async fn start_replication(
        &mut self,
        slot: &str,
        start: decant_proto::Lsn,
        options: &[(&str, String)],
    ) -> Result<(), ReplicationError> {
        let mut sql = format!("START_REPLICATION SLOT {} LOGICAL {start}", quote_ident(slot));
        if !options.is_empty() {
            let opts: Vec<String> = options.iter().map(|(k, v)| format!("{} {}", quote_ident(k), quote_literal(v))).collect();
            sql.push_str(&format!(" ({})", opts.join(", ")));
        }
        frontend::query(&sql, self.wire.write_buf())?;
        self.wire.flush().await?;
        loop {
            let message = match self.wire.incoming().await? {
                Incoming::CopyBothResponse => return Ok(()),
                Incoming::Message(m) => m,
            };
            if let Message::ErrorResponse(body) = message {
                let err = server_error(&body);
                // Drain to ReadyForQuery so the error is the whole story.
                while !matches!(self.wire.message().await?, Message::ReadyForQuery(_)) {}
                return Err(err);
            }
        }
    }

    /// The next replication message. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Streamed, ReplicationError> {
        loop {
            match self.wire.message().await? {
                Message::CopyData(body) => {
                    let data = body.into_bytes();
                    return match parse_server_message(&data)
                        .map_err(|e| ReplicationError::Protocol(format!("malformed replication message: {e}")))?
                    {
                        ServerMessage::XLogData { wal_start, wal_end, send_time, .. } => {
                            let mut payload = data;
                            payload.advance(25);
                            Ok(Streamed::Data { wal_start, wal_end, send_time, payload })
                        }
                        ServerMessage::Keepalive { wal_end, send_time, reply_requested } => {
                            Ok(Streamed::Keepalive { wal_end, send_time, reply_requested })
                        }
                    };
                }
                Message::CopyDone => return Ok(Streamed::End),
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                Message::NoticeResponse(_) | Message::ParameterStatus(_) => {}
                _ => return Err(ReplicationError::Protocol("unexpected message while streaming".into())),
            }
        }
    }

    /// Sends a standby status update.
    pub async fn send_status(&mut self, status: StatusUpdate) -> Result<(), ReplicationError> {
        frontend::CopyData::new(&status.encode()[..])?.write(self.wire.write_buf());
        self.wire.flush().await?;
        Ok(())
    }

    /// Ends the connection politely.
    pub async fn close(self) {
        self.wire.close().await
    }
}

/// One thing received while streaming.
#[derive(Debug)]
pub enum Streamed {
    /// Plugin output: one decant record.
    Data {
        wal_start: decant_proto::Lsn,
        wal_end: decant_proto::Lsn,
        send_time: i64,
        payload: Bytes,
    },
    Keepalive {
        wal_end: decant_proto::Lsn,
        send_time: i64,
        reply_requested: bool,
    },
    /// The server ended the stream (CopyDone).
    End,
}
