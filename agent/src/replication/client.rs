//! A PostgreSQL connection in logical replication mode
//! (`replication=database`), written on `postgres-protocol` because
//! tokio-postgres has no replication support.
//!
//! It does what the agent needs and nothing more: connect (TCP or Unix
//! socket, TLS per sslmode), authenticate (trust, password, md5,
//! SCRAM-SHA-256 with channel binding over TLS), run replication commands
//! with the simple query protocol, and stream (`START_REPLICATION`).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::messages::{parse_server_message, MessageError, ServerMessage, StatusUpdate};
use crate::connect::sql::{quote_ident, quote_literal};
use crate::connect::tls::{self, TlsError};
use crate::connect::{ConnInfo, Host, SslMode, SESSION_OPTIONS};

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot connect to {target}: {source}")]
    Connect { target: String, source: io::Error },
    #[error("connection to {target} timed out after {secs} s (connect_timeout)")]
    ConnectTimeout { target: String, secs: u64 },
    #[error("connection lost: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("TLS handshake with {target} failed: {source}")]
    TlsHandshake { target: String, source: io::Error },
    #[error("the server does not accept TLS, but sslmode={0} requires it")]
    TlsRefused(&'static str),
    #[error(
        "the server asks for a password for user \"{0}\" and none was given (password in the connection string, PGPASSWORD or ~/.pgpass)"
    )]
    PasswordNeeded(String),
    #[error("the server asks for authentication method {0}, which decant does not support")]
    UnsupportedAuth(String),
    #[error("{severity}: {message} (SQLSTATE {code}){}", detail_hint(.detail, .hint))]
    Server { severity: String, code: String, message: String, detail: Option<String>, hint: Option<String> },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("malformed replication message: {0}")]
    Message(#[from] MessageError),
}

fn detail_hint(detail: &Option<String>, hint: &Option<String>) -> String {
    let mut s = String::new();
    if let Some(d) = detail {
        s.push_str("; detail: ");
        s.push_str(d);
    }
    if let Some(h) = hint {
        s.push_str("; hint: ");
        s.push_str(h);
    }
    s
}

impl ReplicationError {
    /// SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// True for failures of the connection itself (retried for the
    /// connection retry time); false for everything else.
    pub fn is_connection_loss(&self) -> bool {
        match self {
            ReplicationError::Connect { .. } | ReplicationError::ConnectTimeout { .. } | ReplicationError::Io(_) => true,
            // admin_shutdown, crash_shutdown, cannot_connect_now
            ReplicationError::Server { code, .. } => matches!(code.as_str(), "57P01" | "57P02" | "57P03"),
            _ => false,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One row of a simple query result; NULLs are `None`.
pub type Row = Vec<Option<String>>;

pub struct ReplicationClient {
    stream: Box<dyn Stream>,
    read: BytesMut,
    write: BytesMut,
    server_version: u32,
}

impl ReplicationClient {
    /// Connects in `replication=database` mode and authenticates.
    pub async fn connect(info: &ConnInfo, application_name: &str) -> Result<Self, ReplicationError> {
        let target = format!("{}:{}", info.host, info.port);
        let connecting = Self::connect_inner(info, application_name, &target);
        match info.connect_timeout {
            Some(secs) => tokio::time::timeout(Duration::from_secs(secs), connecting)
                .await
                .unwrap_or(Err(ReplicationError::ConnectTimeout { target, secs })),
            None => connecting.await,
        }
    }

    async fn connect_inner(info: &ConnInfo, application_name: &str, target: &str) -> Result<Self, ReplicationError> {
        let connect_err = |source| ReplicationError::Connect { target: target.to_owned(), source };
        let (stream, tls_end_point): (Box<dyn Stream>, Option<Vec<u8>>) = match &info.host {
            Host::Socket(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", info.port));
                (Box::new(UnixStream::connect(&path).await.map_err(connect_err)?), None)
            }
            Host::Tcp(host) => {
                let tcp = TcpStream::connect((host.as_str(), info.port)).await.map_err(connect_err)?;
                tcp.set_nodelay(true)?;
                match tls::client_config(info)? {
                    None => (Box::new(tcp), None),
                    Some(config) => match negotiate_tls(tcp, config, host, target, info.sslmode).await? {
                        Negotiated::Tls(tls, end_point) => (Box::new(tls), end_point),
                        Negotiated::Plain(tcp) => (Box::new(tcp), None),
                    },
                }
            }
        };
        let mut client = ReplicationClient { stream, read: BytesMut::with_capacity(64 * 1024), write: BytesMut::new(), server_version: 0 };
        let options = match &info.options {
            Some(user) => format!("{SESSION_OPTIONS} {user}"),
            None => SESSION_OPTIONS.to_owned(),
        };
        let params = [
            ("user", info.user.as_str()),
            ("database", info.dbname.as_str()),
            ("replication", "database"),
            ("application_name", info.application_name.as_deref().unwrap_or(application_name)),
            ("client_encoding", "UTF8"),
            ("options", options.as_str()),
        ];
        frontend::startup_message(params.iter().copied(), &mut client.write)?;
        client.flush().await?;
        client.authenticate(info, tls_end_point).await?;
        Ok(client)
    }

    /// The server's `server_version_num`, e.g. 150020.
    pub fn server_version(&self) -> u32 {
        self.server_version
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.stream.write_all(&self.write).await?;
        self.write.clear();
        self.stream.flush().await
    }

    /// Reads the next protocol message; cancel-safe (a partial message stays buffered).
    async fn message(&mut self) -> Result<Message, ReplicationError> {
        match self.incoming().await? {
            Incoming::Message(m) => Ok(m),
            Incoming::CopyBothResponse => Err(ReplicationError::Protocol("unexpected CopyBothResponse".into())),
        }
    }

    /// Like [`Self::message`], also recognising CopyBothResponse (`W`),
    /// which postgres-protocol does not parse.
    async fn incoming(&mut self) -> Result<Incoming, ReplicationError> {
        const SMALL_READ: usize = 16 * 1024;
        loop {
            if self.read.first() == Some(&b'W') && self.read.len() >= 5 {
                let len = u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]]) as usize;
                if len < 4 {
                    return Err(ReplicationError::Protocol(format!("CopyBothResponse with length {len}")));
                }
                if self.read.len() > len {
                    self.read.advance(1 + len);
                    return Ok(Incoming::CopyBothResponse);
                }
            } else if let Some(m) = Message::parse(&mut self.read)? {
                return Ok(Incoming::Message(m));
            }
            let n = self.stream.read_buf(&mut self.read).await?;
            if n == 0 {
                return Err(ReplicationError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection")));
            }
            if n < SMALL_READ && self.read.len() < SMALL_READ {
                // A small read: let the stream gather for a moment, so a
                // backlog of small messages is read in a few large reads
                // instead of a wakeup each (at most 1 ms of latency).
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
    }

    async fn authenticate(&mut self, info: &ConnInfo, tls_end_point: Option<Vec<u8>>) -> Result<(), ReplicationError> {
        let password = || info.password.clone().ok_or_else(|| ReplicationError::PasswordNeeded(info.user.clone()));
        loop {
            match self.message().await? {
                Message::AuthenticationOk => break,
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.write)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(info.user.as_bytes(), password()?.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mechanisms: Vec<String> = body.mechanisms().map(|m| Ok(m.to_owned())).collect()?;
                    let (mechanism, binding) = match (&tls_end_point, mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256_PLUS)) {
                        (Some(hash), true) => (sasl::SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(hash.clone())),
                        (Some(_), false) => (sasl::SCRAM_SHA_256, ChannelBinding::unrequested()),
                        (None, _) => (sasl::SCRAM_SHA_256, ChannelBinding::unsupported()),
                    };
                    if !mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256 || m == sasl::SCRAM_SHA_256_PLUS) {
                        return Err(ReplicationError::UnsupportedAuth(mechanisms.join(", ")));
                    }
                    let mut scram = ScramSha256::new(password()?.as_bytes(), binding);
                    frontend::sasl_initial_response(mechanism, scram.message(), &mut self.write)?;
                    self.flush().await?;
                    match self.message().await? {
                        Message::AuthenticationSaslContinue(body) => scram.update(body.data())?,
                        Message::ErrorResponse(body) => return Err(server_error(&body)),
                        _ => return Err(ReplicationError::Protocol("unexpected message during SCRAM authentication".into())),
                    }
                    frontend::sasl_response(scram.message(), &mut self.write)?;
                    self.flush().await?;
                    match self.message().await? {
                        Message::AuthenticationSaslFinal(body) => scram.finish(body.data())?,
                        Message::ErrorResponse(body) => return Err(server_error(&body)),
                        _ => return Err(ReplicationError::Protocol("unexpected message during SCRAM authentication".into())),
                    }
                }
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationSspi => return Err(ReplicationError::UnsupportedAuth("Kerberos/GSS/SSPI".into())),
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => return Err(ReplicationError::Protocol("unexpected message during authentication".into())),
            }
        }
        // Until ReadyForQuery: parameters, key data, notices.
        loop {
            match self.message().await? {
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ParameterStatus(p) if p.name()? == "server_version" => {
                    self.server_version = parse_server_version(p.value()?);
                }
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => {}
            }
        }
    }

    /// Runs one command with the simple query protocol and returns its rows.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, ReplicationError> {
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.message().await? {
                Message::DataRow(row) => {
                    let buf = row.buffer();
                    let values: Vec<Option<String>> = row
                        .ranges()
                        .map(|r| Ok(r.map(|r| String::from_utf8_lossy(buf.get(r).unwrap_or_default()).into_owned())))
                        .collect()?;
                    rows.push(values);
                }
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::ReadyForQuery(_) => break,
                Message::CopyInResponse(_) | Message::CopyOutResponse(_) => {
                    return Err(ReplicationError::Protocol(format!("{sql:?} started a copy")))
                }
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
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
        frontend::query(&sql, &mut self.write)?;
        self.flush().await?;
        loop {
            let message = match self.incoming().await? {
                Incoming::CopyBothResponse => return Ok(()),
                Incoming::Message(m) => m,
            };
            if let Message::ErrorResponse(body) = message {
                let err = server_error(&body);
                // Drain to ReadyForQuery so the error is the whole story.
                while !matches!(self.message().await?, Message::ReadyForQuery(_)) {}
                return Err(err);
            }
        }
    }

    /// The next replication message. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Streamed, ReplicationError> {
        loop {
            match self.message().await? {
                Message::CopyData(body) => {
                    let data = body.into_bytes();
                    return match parse_server_message(&data)? {
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
        frontend::CopyData::new(&status.encode()[..])?.write(&mut self.write);
        self.flush().await?;
        Ok(())
    }

    /// Ends the connection politely.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write);
        let _ = self.flush().await;
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

enum Incoming {
    Message(Message),
    CopyBothResponse,
}

enum Negotiated {
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>, Option<Vec<u8>>),
    Plain(TcpStream),
}

async fn negotiate_tls(
    mut tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    host: &str,
    target: &str,
    mode: SslMode,
) -> Result<Negotiated, ReplicationError> {
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let name = tls::server_name(host).map_err(|e| ReplicationError::TlsHandshake {
                target: target.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|source| ReplicationError::TlsHandshake { target: target.to_owned(), source })?;
            let end_point = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|cert| Sha256::digest(cert.as_ref()).to_vec());
            Ok(Negotiated::Tls(Box::new(tls), end_point))
        }
        b'N' if matches!(mode, SslMode::Prefer | SslMode::Allow) => Ok(Negotiated::Plain(tcp)),
        b'N' => Err(ReplicationError::TlsRefused(mode.name())),
        other => Err(ReplicationError::Protocol(format!("unexpected answer {other:#04x} to the TLS request"))),
    }
}

fn server_error(body: &postgres_protocol::message::backend::ErrorResponseBody) -> ReplicationError {
    let (mut severity, mut code, mut message, mut detail, mut hint) = (String::from("ERROR"), String::new(), String::new(), None, None);
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'V' => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            _ => {}
        }
    }
    ReplicationError::Server { severity, code, message, detail, hint }
}

/// `15.20 (Debian …)` → 150020; `9.6.24` → 90624.
fn parse_server_version(v: &str) -> u32 {
    let numeric: String = v.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let parts: Vec<u32> = numeric.split('.').filter_map(|p| p.parse().ok()).collect();
    match parts.as_slice() {
        [major, minor, ..] if *major >= 10 => major * 10000 + minor,
        [major] if *major >= 10 => major * 10000,
        [major, minor, patch, ..] => major * 10000 + minor * 100 + patch,
        [major, minor] => major * 10000 + minor * 100,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert_eq!(parse_server_version("15.20 (Debian 15.20-0+deb12u1)"), 150020);
        assert_eq!(parse_server_version("18beta1"), 180000);
        assert_eq!(parse_server_version("9.6.24"), 90624);
        assert_eq!(parse_server_version("garbage"), 0);
    }

    #[test]
    fn quoting() {}
}
