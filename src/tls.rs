//! TLS configuration for both sides of the proxy, built with rustls (aws-lc-rs provider).
//!
//! Configs are built once per generation and shared; a new CA bundle or client certificate makes a
//! new generation with a new config, so connections opened before keep their own.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no usable PEM {kind}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{what} {path}: {message}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("no trusted root certificates: the system store is empty; set upstream.ca_file")]
    NoRoots,
    #[error("invalid TLS server name `{0}`")]
    ServerName(String),
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Reads every certificate of a PEM file.
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let certs = CertificateDer::pem_reader_iter(&mut BufReader::new(pem.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            what,
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            kind: "certificate",
        });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1). The key's bytes are never
/// formatted into an error.
pub fn load_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(what, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::Empty {
        what,
        path: path.to_path_buf(),
        kind: "private key",
    })
}

/// What the proxy needs to open TLS connections to the upstream.
pub struct UpstreamTls {
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Builds the client-side config used for upstream connections. Session resumption is off: a
/// rotation to a new CA or client certificate must take effect on the very next handshake.
pub fn upstream_client_config(opts: &UpstreamTls) -> Result<Arc<ClientConfig>, TlsError> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = if opts.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
    } else {
        let mut roots = RootCertStore::empty();
        match &opts.ca_file {
            Some(path) => {
                for cert in load_certs("upstream CA file", path)? {
                    roots.add(cert).map_err(|e| TlsError::Invalid {
                        what: "upstream CA file",
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for err in &found.errors {
                    tracing::warn!(error = %err, "while loading system root certificates");
                }
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(TlsError::NoRoots);
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match &opts.client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(
            load_certs("upstream client certificate", cert)?,
            load_key("upstream client key", key)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Builds the server-side config for a TLS client listener.
pub fn listener_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            load_certs("listener certificate", cert)?,
            load_key("listener key", key)?,
        )?;
    Ok(Arc::new(config))
}

/// Parses the name used for SNI and certificate verification.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))
}

/// Turns a handshake failure into words an operator can act on (which CA, which name, expired).
pub fn explain_handshake_error(err: &std::io::Error) -> String {
    let Some(inner) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return err.to_string();
    };
    use rustls::CertificateError as C;
    match inner {
        rustls::Error::InvalidCertificate(cert) => match cert {
            C::UnknownIssuer => "upstream certificate is not signed by a trusted CA (unknown issuer): check upstream.ca_file".to_string(),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "upstream certificate is not valid for the server name: check upstream.server_name".to_string()
            }
            C::Expired | C::ExpiredContext { .. } => "upstream certificate has expired".to_string(),
            C::NotValidYet | C::NotValidYetContext { .. } => "upstream certificate is not valid yet (check the clock)".to_string(),
            C::Revoked => "upstream certificate is revoked".to_string(),
            other => format!("upstream certificate rejected: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => {
            format!("upstream refused the TLS handshake (alert {alert:?}): a client certificate may be required or not trusted")
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// Accepts any server certificate. Only used when `upstream.insecure_skip_verify` is set, which is
/// logged as a warning at every start.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
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
