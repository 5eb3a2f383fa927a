//! TLS to PostgreSQL with libpq's `sslmode` semantics, on rustls.
//!
//! - `require` (and `prefer`/`allow` when the server offers TLS): encrypted,
//!   certificate not checked, unless a root certificate is available, in
//!   which case it is checked like `verify-ca` (as libpq does).
//! - `verify-ca`: the chain must lead to `sslrootcert`.
//! - `verify-full`: that, and the certificate must name the host.
//!
//! A client certificate (`sslcert` + `sslkey`) is offered when given; an
//! encrypted PKCS#8 key is decrypted with `sslpassword`.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::conninfo::{ConnInfo, SslMode};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("sslmode={0} needs a root certificate: set sslrootcert (or PGSSLROOTCERT) to the CA certificate file that signed the server's certificate")]
    NoRootCert(&'static str),
    #[error("cannot read {what} \"{path}\": {reason}")]
    File { what: &'static str, path: String, reason: String },
    #[error("sslcert and sslkey must be given together (sslcert: {cert}, sslkey: {key})")]
    HalfClientCert { cert: String, key: String },
    #[error("the client key \"{0}\" is encrypted: give its password with sslpassword")]
    KeyNeedsPassword(String),
    #[error("cannot decrypt the client key \"{0}\" with the given sslpassword")]
    KeyPassword(String),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_error(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File { what, path: path.display().to_string(), reason: reason.to_string() }
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(what, path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(what, path, e))?;
    if certs.is_empty() {
        return Err(file_error(what, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn load_key(path: &Path, password: Option<&str>) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read_to_string(path).map_err(|e| file_error("client key (sslkey)", path, e))?;
    if pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        let password = password.ok_or_else(|| TlsError::KeyNeedsPassword(path.display().to_string()))?;
        let (_, doc) = pkcs8::SecretDocument::from_pem(&pem).map_err(|e| file_error("client key (sslkey)", path, e))?;
        let encrypted = pkcs8::EncryptedPrivateKeyInfo::try_from(doc.as_bytes()).map_err(|e| file_error("client key (sslkey)", path, e))?;
        let plain = encrypted.decrypt(password).map_err(|_| TlsError::KeyPassword(path.display().to_string()))?;
        return Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(plain.as_bytes().to_vec())));
    }
    if pem.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(file_error(
            "client key (sslkey)",
            path,
            "legacy OpenSSL-encrypted keys are not supported; convert it with `openssl pkcs8 -topk8 -v2 aes-256-cbc`",
        ));
    }
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| file_error("client key (sslkey)", path, e))
}

/// The rustls configuration for `info`, or `None` for `sslmode=disable`.
pub fn client_config(info: &ConnInfo) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    if info.sslmode == SslMode::Disable {
        return Ok(None);
    }
    let provider = provider();
    let root = match &info.sslrootcert {
        Some(p) if p.exists() || matches!(info.sslmode, SslMode::VerifyCa | SslMode::VerifyFull) => Some(p.as_path()),
        _ => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (info.sslmode, root) {
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => return Err(TlsError::NoRootCert(info.sslmode.name())),
        (mode, Some(root)) => {
            let mut store = RootCertStore::empty();
            for cert in load_certs("root certificate (sslrootcert)", root)? {
                store.add(cert).map_err(|e| file_error("root certificate (sslrootcert)", root, e))?;
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                .build()
                .map_err(|e| file_error("root certificate (sslrootcert)", root, e))?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
        (_, None) => Arc::new(Unverified(provider.clone())),
    };
    let builder = ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    let mut config = match (&info.sslcert, &info.sslkey) {
        (Some(cert), Some(key)) => {
            builder.with_client_auth_cert(load_certs("client certificate (sslcert)", cert)?, load_key(key, info.sslpassword.as_deref())?)?
        }
        (None, None) => builder.with_no_client_auth(),
        (cert, key) => {
            let show = |p: &Option<std::path::PathBuf>| p.as_ref().map_or("not set".to_owned(), |p| p.display().to_string());
            return Err(TlsError::HalfClientCert { cert: show(cert), key: show(key) });
        }
    };
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// The name rustls checks the certificate against (only with verify-full).
pub fn server_name(host: &str) -> Result<ServerName<'static>, rustls::pki_types::InvalidDnsNameError> {
    ServerName::try_from(host.to_owned())
}

/// `verify-ca`: the chain is checked, the host name is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` without a root certificate: encrypted, but whoever answers is
/// accepted (libpq's meaning of require). Handshake signatures are still
/// verified, so the session key belongs to the certificate presented.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
