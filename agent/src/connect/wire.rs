//! A PostgreSQL protocol session written on `postgres-protocol`, for what
//! tokio-postgres cannot do, or does at a cost: the streaming replication
//! protocol (tokio-postgres has no replication support), and COPY data
//! passed from one server to another as the servers frame it (`copy`).
//!
//! It connects (TCP or Unix socket, TLS per sslmode), authenticates (trust,
//! password, md5, SCRAM-SHA-256 with channel binding over TLS) and runs
//! commands with the simple query protocol.

pub mod copy;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::tls::{self, TlsError};
use super::{ConnInfo, Host, SslMode, SESSION_OPTIONS};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
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

impl WireError {
    /// SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            WireError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// True for failures of the connection itself (retried for the
    /// connection retry time); false for everything else.
    pub fn is_connection_loss(&self) -> bool {
        match self {
            WireError::Connect { .. } | WireError::ConnectTimeout { .. } | WireError::Io(_) => true,
            // admin_shutdown, crash_shutdown, cannot_connect_now
            WireError::Server { code, .. } => matches!(code.as_str(), "57P01" | "57P02" | "57P03"),
            _ => false,
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One row of a simple query result; NULLs are `None`.
pub type Row = Vec<Option<String>>;

/// One session with a server.
pub struct WireSession {
    stream: Box<dyn Stream>,
    read: BytesMut,
    write: BytesMut,
    server_version: u32,
}

impl WireSession {
    /// Connects and authenticates; `replication` opens a walsender
    /// session (`replication=database`). `extra_options` are more `-c`
    /// settings for the session.
    pub async fn connect(info: &ConnInfo, application_name: &str, replication: bool, extra_options: &str) -> Result<Self, WireError> {
        let target = format!("{}:{}", info.host, info.port);
        let connecting = Self::connect_inner(info, application_name, replication, extra_options, &target);
        match info.connect_timeout {
            Some(secs) => {
                tokio::time::timeout(Duration::from_secs(secs), connecting).await.unwrap_or(Err(WireError::ConnectTimeout { target, secs }))
            }
            None => connecting.await,
        }
    }

    async fn connect_inner(
        info: &ConnInfo,
        application_name: &str,
        replication: bool,
        extra_options: &str,
        target: &str,
    ) -> Result<Self, WireError> {
        let connect_err = |source| WireError::Connect { target: target.to_owned(), source };
        let (stream, tls_end_point): (Box<dyn Stream>, Option<Vec<u8>>) = match &info.host {
            Host::Socket(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", info.port));
                (Box::new(UnixStream::connect(&path).await.map_err(connect_err)?), None)
            }
            Host::Tcp(host) => {
                let tcp = TcpStream::connect((host.as_str(), info.port)).await.map_err(connect_err)?;
                tcp.set_nodelay(true)?;
                // A peer gone without a word (a cut network) is noticed
                // within minutes, not never.
                socket2::SockRef::from(&tcp).set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(Duration::from_secs(30)))?;
                match tls::client_config(info)? {
                    None => (Box::new(tcp), None),
                    Some(config) => match negotiate_tls(tcp, config, host, target, info.sslmode).await? {
                        Negotiated::Tls(tls, end_point) => (Box::new(tls), end_point),
                        Negotiated::Plain(tcp) => (Box::new(tcp), None),
                    },
                }
            }
        };
        let mut client = WireSession { stream, read: BytesMut::with_capacity(64 * 1024), write: BytesMut::new(), server_version: 0 };
        let mut options = format!("{SESSION_OPTIONS} {extra_options}");
        if let Some(user) = &info.options {
            options = format!("{options} {user}");
        }
        let mut params = vec![
            ("user", info.user.as_str()),
            ("database", info.dbname.as_str()),
            ("application_name", info.application_name.as_deref().unwrap_or(application_name)),
            ("client_encoding", "UTF8"),
            ("options", options.trim_end()),
        ];
        if replication {
            params.push(("replication", "database"));
        }
        frontend::startup_message(params.iter().copied(), &mut client.write)?;
        client.flush().await?;
        client.authenticate(info, tls_end_point).await?;
        Ok(client)
    }

    /// The buffer frontend messages are written into before [`Self::flush`].
    pub(crate) fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.write
    }

    /// The server's `server_version_num`, e.g. 150020.
    pub fn server_version(&self) -> u32 {
        self.server_version
    }

    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        self.stream.write_all(&self.write).await?;
        self.write.clear();
        self.stream.flush().await
    }

    /// Reads the next protocol message; cancel-safe (a partial message stays buffered).
    pub(crate) async fn message(&mut self) -> Result<Message, WireError> {
        match self.incoming().await? {
            Incoming::Message(m) => Ok(m),
            Incoming::CopyBothResponse => Err(WireError::Protocol("unexpected CopyBothResponse".into())),
        }
    }

    /// Like [`Self::message`], also recognising CopyBothResponse (`W`),
    /// which postgres-protocol does not parse.
    pub(crate) async fn incoming(&mut self) -> Result<Incoming, WireError> {
        const SMALL_READ: usize = 16 * 1024;
        loop {
            if self.read.first() == Some(&b'W') && self.read.len() >= 5 {
                let len = u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]]) as usize;
                if len < 4 {
                    return Err(WireError::Protocol(format!("CopyBothResponse with length {len}")));
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
                return Err(closed());
            }
            if n < SMALL_READ && self.read.len() < SMALL_READ {
                // A small read: let the stream gather for a moment, so a
                // backlog of small messages is read in a few large reads
                // instead of a wakeup each (at most 1 ms of latency).
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
    }

    async fn authenticate(&mut self, info: &ConnInfo, tls_end_point: Option<Vec<u8>>) -> Result<(), WireError> {
        let password = || info.password.clone().ok_or_else(|| WireError::PasswordNeeded(info.user.clone()));
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
                        return Err(WireError::UnsupportedAuth(mechanisms.join(", ")));
                    }
                    let mut scram = ScramSha256::new(password()?.as_bytes(), binding);
                    frontend::sasl_initial_response(mechanism, scram.message(), &mut self.write)?;
                    self.flush().await?;
                    match self.message().await? {
                        Message::AuthenticationSaslContinue(body) => scram.update(body.data())?,
                        Message::ErrorResponse(body) => return Err(server_error(&body)),
                        _ => return Err(WireError::Protocol("unexpected message during SCRAM authentication".into())),
                    }
                    frontend::sasl_response(scram.message(), &mut self.write)?;
                    self.flush().await?;
                    match self.message().await? {
                        Message::AuthenticationSaslFinal(body) => scram.finish(body.data())?,
                        Message::ErrorResponse(body) => return Err(server_error(&body)),
                        _ => return Err(WireError::Protocol("unexpected message during SCRAM authentication".into())),
                    }
                }
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationSspi => return Err(WireError::UnsupportedAuth("Kerberos/GSS/SSPI".into())),
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => return Err(WireError::Protocol("unexpected message during authentication".into())),
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
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, WireError> {
        Ok(self.run(sql).await?.0)
    }

    /// Runs one command with the simple query protocol and returns the
    /// number of rows it affected (its command tag's count).
    pub async fn execute(&mut self, sql: &str) -> Result<u64, WireError> {
        Ok(self.run(sql).await?.1)
    }

    async fn run(&mut self, sql: &str) -> Result<(Vec<Row>, u64), WireError> {
        frontend::query(sql, &mut self.write)?;
        self.flush().await?;
        let (mut rows, mut count) = (Vec::new(), 0);
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
                // "INSERT 0 5", "UPDATE 5", "SELECT 5": the count is last.
                Message::CommandComplete(body) => count = body.tag()?.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0),
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::ReadyForQuery(_) => break,
                Message::CopyInResponse(_) | Message::CopyOutResponse(_) => {
                    return Err(WireError::Protocol(format!("{sql:?} started a copy")))
                }
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok((rows, count)),
        }
    }

    /// Ends the session politely.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write);
        let _ = self.flush().await;
    }
}

fn closed() -> WireError {
    WireError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection"))
}

pub(crate) enum Incoming {
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
) -> Result<Negotiated, WireError> {
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let name = tls::server_name(host).map_err(|e| WireError::TlsHandshake {
                target: target.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|source| WireError::TlsHandshake { target: target.to_owned(), source })?;
            let end_point = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|cert| Sha256::digest(cert.as_ref()).to_vec());
            Ok(Negotiated::Tls(Box::new(tls), end_point))
        }
        b'N' if matches!(mode, SslMode::Prefer | SslMode::Allow) => Ok(Negotiated::Plain(tcp)),
        b'N' => Err(WireError::TlsRefused(mode.name())),
        other => Err(WireError::Protocol(format!("unexpected answer {other:#04x} to the TLS request"))),
    }
}

pub(crate) fn server_error(body: &postgres_protocol::message::backend::ErrorResponseBody) -> WireError {
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
    WireError::Server { severity, code, message, detail, hint }
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
}
