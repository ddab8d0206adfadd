//! TLS settings: `[client_tls]` (clients to pgsluice) and `[server_tls]` (pgsluice to
//! PostgreSQL), read into rustls configurations when the configuration loads, so a reload
//! picks up rotated certificate files and a bad file is refused with the old one kept.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use serde::Deserialize;

/// ALPN protocol name of PostgreSQL (required for direct TLS since PostgreSQL 17).
pub const ALPN: &[u8] = b"postgresql";

/// Whether clients may or must use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    /// SSLRequest is answered 'N'; direct TLS is refused.
    #[default]
    Disable,
    /// TLS when the client asks for it, plain TCP otherwise.
    Allow,
    /// Plain-TCP clients are refused (28000).
    Require,
}

/// Whether and how pgsluice uses TLS towards PostgreSQL (libpq's `sslmode` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    Disable,
    /// TLS if the server offers it, without checking its certificate.
    #[default]
    Prefer,
    /// TLS or no connection, without checking the certificate.
    Require,
    /// TLS, and the certificate must chain to `ca_file`.
    VerifyCa,
    /// `verify-ca`, and the certificate must name the host (or `server_name`).
    VerifyFull,
}

impl ServerTlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerTlsMode::Disable => "disable",
            ServerTlsMode::Prefer => "prefer",
            ServerTlsMode::Require => "require",
            ServerTlsMode::VerifyCa => "verify-ca",
            ServerTlsMode::VerifyFull => "verify-full",
        }
    }
}

/// `[client_tls]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// Default: `allow` when a certificate is configured, else `disable`.
    #[serde(default)]
    pub mode: Option<ClientTlsMode>,
    /// PEM certificate chain presented to clients (leaf first).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the certificate (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// `[server_tls]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    #[serde(default)]
    pub mode: ServerTlsMode,
    /// PEM file of trusted CA certificates (for example the RDS global bundle).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Name checked in `verify-full` instead of each database's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// The client-facing side, loaded.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    pub mode: ClientTlsMode,
    pub config: Option<Arc<rustls::ServerConfig>>,
}

/// The upstream side, loaded.
#[derive(Debug, Clone, Default)]
pub struct UpstreamTls {
    pub mode: ServerTlsMode,
    pub config: Option<Arc<rustls::ClientConfig>>,
    pub server_name: Option<String>,
}

impl PartialEq for UpstreamTls {
    /// Same settings; the rustls configuration is derived from them.
    fn eq(&self, other: &Self) -> bool {
        self.mode == other.mode
            && self.server_name == other.server_name
            && match (&self.config, &other.config) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

impl UpstreamTls {
    /// libpq's default: TLS if the server offers it.
    pub fn prefer() -> UpstreamTls {
        load_server_side(&ServerTlsConfig::default()).expect("prefer needs no files")
    }

    /// The name a server's certificate must carry, for `host`.
    pub fn name_for(&self, host: &str) -> Result<ServerName<'static>, String> {
        let name = self.server_name.as_deref().unwrap_or(host);
        ServerName::try_from(name.to_owned())
            .map_err(|_| format!("{name:?} is not a valid TLS server name"))
    }
}

/// Both sides, as one configuration load made them.
#[derive(Debug, Clone, Default)]
pub struct Contexts {
    pub client: ClientTls,
    pub server: UpstreamTls,
}

/// Reads certificate files and builds the rustls configurations. Errors are (key, reason).
pub fn load(
    client: &ClientTlsConfig,
    server: &ServerTlsConfig,
) -> Result<Contexts, (String, String)> {
    Ok(Contexts {
        client: load_client_side(client)?,
        server: load_server_side(server)?,
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn load_client_side(c: &ClientTlsConfig) -> Result<ClientTls, (String, String)> {
    let mode = c.mode.unwrap_or(if c.cert_file.is_some() {
        ClientTlsMode::Allow
    } else {
        ClientTlsMode::Disable
    });
    let (cert, key) = match (&c.cert_file, &c.key_file) {
        (Some(cert), Some(key)) => (cert, key),
        (None, None) if mode == ClientTlsMode::Disable => {
            return Ok(ClientTls { mode, config: None })
        }
        (Some(_), None) => {
            return Err(err(
                "client_tls.key_file",
                "is required with client_tls.cert_file",
            ))
        }
        _ => {
            return Err(err(
                "client_tls.cert_file",
                format!("client_tls.mode = {mode:?} needs cert_file and key_file").to_lowercase(),
            ))
        }
    };
    let certs = read_certs(cert).map_err(|r| err("client_tls.cert_file", r))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        err(
            "client_tls.key_file",
            format!("{}: no usable private key: {e}", key.display()),
        )
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("client_tls", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            err(
                "client_tls.key_file",
                format!("does not match the certificate: {e}"),
            )
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // PostgreSQL turns session resumption off; no client expects it.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(ClientTls {
        mode,
        config: (mode != ClientTlsMode::Disable).then(|| Arc::new(config)),
    })
}

fn load_server_side(s: &ServerTlsConfig) -> Result<UpstreamTls, (String, String)> {
    let verifier: Arc<dyn ServerCertVerifier> = match s.mode {
        ServerTlsMode::Disable => {
            return Ok(UpstreamTls {
                mode: s.mode,
                config: None,
                server_name: s.server_name.clone(),
            })
        }
        ServerTlsMode::Prefer | ServerTlsMode::Require => Arc::new(AnyCertificate(provider())),
        ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull => {
            let file = s.ca_file.as_ref().ok_or_else(|| {
                err(
                    "server_tls.ca_file",
                    "is required with server_tls.mode = verify-ca or verify-full",
                )
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(file).map_err(|r| err("server_tls.ca_file", r))? {
                roots
                    .add(cert)
                    .map_err(|e| err("server_tls.ca_file", format!("{}: {e}", file.display())))?;
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| err("server_tls.ca_file", e.to_string()))?;
            if s.mode == ServerTlsMode::VerifyFull {
                webpki
            } else {
                Arc::new(AnyName(webpki))
            }
        }
    };
    if let Some(name) = &s.server_name {
        ServerName::try_from(name.clone()).map_err(|_| {
            err(
                "server_tls.server_name",
                "is not a valid DNS name or IP address",
            )
        })?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("server_tls", e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    // PostgreSQL never resumes sessions: keep no tickets.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(UpstreamTls {
        mode: s.mode,
        config: Some(Arc::new(config)),
        server_name: s.server_name.clone(),
    })
}

fn err(key: &str, reason: impl Into<String>) -> (String, String) {
    (key.to_owned(), reason.into())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// `prefer` and `require`: encryption without checking who answers (libpq's meaning),
/// though the handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted CA; the name is not checked.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
