//! The agent ⇄ applier channel: tonic over HTTP/2, with TLS or mutual TLS,
//! a shared token, and optional zstd compression.

pub mod client;
pub mod server;

use tonic::codec::CompressionEncoding;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

use crate::config::{Compression, Config, ConfigError};

/// Largest gRPC message accepted: a batch holds whole records, and one
/// record can be as large as PostgreSQL's 1 GB output limit.
pub const MAX_MESSAGE_BYTES: usize = 1280 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read {what} {path}: {source}")]
    File { what: &'static str, path: String, source: std::io::Error },
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("gRPC transport: {0}")]
    Tonic(#[from] tonic::transport::Error),
    #[error("applier URL {0:?}: {1}")]
    Url(String, String),
}

/// Transport settings, read from the configuration once.
#[derive(Clone)]
pub struct TransportSettings {
    pub token: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    ca: Option<String>,
    domain: Option<String>,
    pub compression: Option<Compression>,
}

fn read(what: &'static str, path: &str) -> Result<Option<String>, TransportError> {
    if path.is_empty() {
        return Ok(None);
    }
    std::fs::read_to_string(path).map(Some).map_err(|source| TransportError::File { what, path: path.to_owned(), source })
}

impl TransportSettings {
    pub fn from_config(config: &Config) -> Result<Self, TransportError> {
        let t = &config.transport;
        Ok(TransportSettings {
            token: config.token()?,
            cert: read("transport.tls_cert", &t.tls_cert)?,
            key: read("transport.tls_key", &t.tls_key)?,
            ca: read("transport.tls_ca", &t.tls_ca)?,
            domain: (!t.tls_domain.is_empty()).then(|| t.tls_domain.clone()),
            compression: t.compression,
        })
    }

    pub fn server_tls_enabled(&self) -> bool {
        self.cert.is_some()
    }

    /// The applier's TLS: its certificate, and a client CA for mutual TLS.
    pub fn server_tls(&self) -> Result<Option<ServerTlsConfig>, TransportError> {
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else { return Ok(None) };
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &self.ca {
            tls = tls.client_ca_root(Certificate::from_pem(ca));
        }
        Ok(Some(tls))
    }

    /// The agent's TLS: the CA to trust, and a client certificate for mutual TLS.
    pub fn client_tls(&self, host: &str) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new().domain_name(self.domain.clone().unwrap_or_else(|| host.to_owned()));
        if let Some(ca) = &self.ca {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        tls
    }
}

fn compression(t: &TransportSettings) -> Option<CompressionEncoding> {
    match t.compression {
        Some(Compression::Zstd) => Some(CompressionEncoding::Zstd),
        _ => None,
    }
}

/// Refuses requests without the shared token (compared in constant time).
fn check_token(req: Request<()>, token: Option<&str>) -> Result<Request<()>, Status> {
    let Some(expected) = token else { return Ok(req) };
    let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    let same = given.len() == expected.len() && given.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if same {
        Ok(req)
    } else {
        Err(Status::unauthenticated("the agent's token does not match the applier's (transport.token)"))
    }
}
