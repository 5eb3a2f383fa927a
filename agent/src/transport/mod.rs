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
    #[error(
        "the applier would serve {listen} to any client, and it runs the schema SQL and changes it is sent as the destination \
         user: set a shared token on both sides (transport.token = \"<a long random secret>\", or transport.token_file), or \
         mutual TLS (transport.tls_cert, transport.tls_key and transport.tls_ca), or, on a network only the agent can reach, \
         transport.insecure = true"
    )]
    Unauthenticated { listen: String },
    #[error(
        "agent.applier_url {url} is plain http to {host}, which is not a loopback address: the token would cross the network \
         unencrypted. Use TLS (agent.applier_url = \"https://...\" with transport.tls_ca, and transport.tls_cert and \
         transport.tls_key on the applier), or set transport.insecure = true to send it anyway"
    )]
    TokenInClearText { url: String, host: String },
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
    /// `transport.insecure`: the checks below are waived.
    pub insecure: bool,
    /// `decant migrate`: the applier in this process, which takes the full
    /// copy's data without the network.
    pub in_process: Option<std::sync::Arc<dyn server::InProcessCopy>>,
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
            insecure: t.insecure,
            in_process: None,
        })
    }

    /// The applier knows its clients: by the shared token, or by the
    /// certificate mutual TLS requires.
    pub fn authenticates_clients(&self) -> bool {
        self.token.is_some() || (self.cert.is_some() && self.ca.is_some())
    }

    /// Refuses to serve `listen` to anyone who reaches it, unless
    /// `transport.insecure` says so.
    pub fn check_server(&self, listen: &str) -> Result<(), TransportError> {
        if self.authenticates_clients() {
            return Ok(());
        }
        if !self.insecure {
            return Err(TransportError::Unauthenticated { listen: listen.to_owned() });
        }
        tracing::warn!(%listen, "transport.insecure = true: the applier accepts any client that reaches it");
        Ok(())
    }

    /// Refuses to send the token in clear text to another host, unless
    /// `transport.insecure` says so.
    pub fn check_client(&self, url: &str) -> Result<(), TransportError> {
        if self.token.is_none() {
            return Ok(());
        }
        match token_in_clear_text_to(url)? {
            None => Ok(()),
            Some(host) if self.insecure => {
                tracing::warn!(%url, %host, "transport.insecure = true: the token goes unencrypted to a host that is not loopback");
                Ok(())
            }
            Some(host) => Err(TransportError::TokenInClearText { url: url.to_owned(), host }),
        }
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

/// The host a token sent to `url` would reach unencrypted over the
/// network: `None` for https and for loopback addresses.
fn token_in_clear_text_to(url: &str) -> Result<Option<String>, TransportError> {
    let uri = url.parse::<tonic::transport::Uri>().map_err(|e| TransportError::Url(url.to_owned(), e.to_string()))?;
    if uri.scheme_str() == Some("https") {
        return Ok(None);
    }
    let host = uri.host().unwrap_or_default();
    Ok((!is_loopback(host)).then(|| host.to_owned()))
}

/// `localhost`, 127.0.0.0/8, ::1, and ::ffff:127.x.
fn is_loopback(host: &str) -> bool {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    match bare.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => a.is_loopback(),
        Ok(std::net::IpAddr::V6(a)) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|a| a.is_loopback()),
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    }
}

fn compression(t: &TransportSettings) -> Option<CompressionEncoding> {
    match t.compression {
        Some(Compression::Zstd) => Some(CompressionEncoding::Zstd),
        _ => None,
    }
}

/// Refuses requests without the shared token (compared in constant time).
/// Marks the status with which an applier refuses a task that was cut
/// over, so the agent can tell the end of a task from a failure.
const CUT_OVER: &str = "decant-cut-over";

/// The refusal of a stream for a task that was cut over.
pub fn cut_over_status(message: String) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(CUT_OVER, tonic::metadata::MetadataValue::from_static("1"));
    Status::with_metadata(tonic::Code::FailedPrecondition, message, metadata)
}

/// Whether `status` says the task was cut over.
pub fn is_cut_over(status: &Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition && status.metadata().contains_key(CUT_OVER)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_in_clear_text_only_to_loopback() {
        let to = |url: &str| token_in_clear_text_to(url).unwrap();
        for url in
            ["http://127.0.0.1:7480", "http://127.3.4.5:1", "http://localhost:7480", "http://[::1]:7480", "http://[::ffff:127.0.0.1]:1"]
        {
            assert_eq!(to(url), None, "{url}");
        }
        for url in ["https://10.0.0.5:7480", "https://applier.example:7480", "https://192.0.2.2"] {
            assert_eq!(to(url), None, "{url}");
        }
        assert_eq!(to("http://10.0.0.5:7480").as_deref(), Some("10.0.0.5"));
        assert_eq!(to("http://applier.example:7480").as_deref(), Some("applier.example"));
        assert_eq!(to("http://[fd00::2]:7480").as_deref(), Some("[fd00::2]"));
        assert_eq!(to("http://127.0.0.1.example:1").as_deref(), Some("127.0.0.1.example"));
        assert_eq!(to("http://0.0.0.0:1").as_deref(), Some("0.0.0.0"));
    }

    fn settings(config: &str) -> TransportSettings {
        TransportSettings::from_config(&Config::parse(config, "x", &[]).unwrap()).unwrap()
    }

    #[test]
    fn the_applier_needs_a_token_or_mutual_tls_or_insecure() {
        let e = settings("").check_server("0.0.0.0:7480").unwrap_err().to_string();
        assert!(e.contains("transport.token = ") && e.contains("transport.insecure = true") && e.contains("0.0.0.0:7480"), "{e}");
        assert!(settings("[transport]\ntoken = \"t\"").check_server("x").is_ok());
        assert!(settings("[transport]\ninsecure = true").check_server("x").is_ok());
        // TLS without a client CA encrypts but lets anyone in.
        let tls = TransportSettings { cert: Some("c".into()), key: Some("k".into()), ..settings("") };
        assert!(tls.check_server("x").is_err());
        assert!(TransportSettings { ca: Some("ca".into()), ..tls }.check_server("x").is_ok());
    }

    #[test]
    fn the_agent_keeps_its_token_off_plain_networks() {
        let with_token = settings("[transport]\ntoken = \"t\"");
        let e = with_token.check_client("http://10.0.0.5:7480").unwrap_err().to_string();
        assert!(e.contains("10.0.0.5") && e.contains("https://") && e.contains("transport.insecure = true"), "{e}");
        assert!(with_token.check_client("http://127.0.0.1:7480").is_ok());
        assert!(with_token.check_client("https://10.0.0.5:7480").is_ok());
        assert!(settings("[transport]\ntoken = \"t\"\ninsecure = true").check_client("http://10.0.0.5:7480").is_ok());
        // No token, nothing to give away.
        assert!(settings("").check_client("http://10.0.0.5:7480").is_ok());
    }
}
