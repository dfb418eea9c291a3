//! TLS configuration for both sides of the proxy, built with rustls (aws-lc-rs provider).
//!
//! Upstream configs are built once per generation and shared; a new CA bundle or client
//! certificate makes a new generation with a new config, so connections opened before keep
//! their own (see [`crate::tls_reload`]). The listener's certificate sits behind a
//! [`ListenerCert`] resolver instead, and the CAs of its clients' certificates behind a
//! [`ClientCa`] verifier, so renewed ones serve the next handshake.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::UpstreamConfig;

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
    #[error("{cert} and {key} do not belong together: the key is not the certificate's")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
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
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub session_resumption: bool,
}

impl UpstreamTls {
    pub fn from_config(up: &UpstreamConfig) -> UpstreamTls {
        let client_cert = match (&up.client_cert, &up.client_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            _ => None,
        };
        UpstreamTls {
            ca_file: up.ca_file.clone(),
            insecure_skip_verify: up.insecure_skip_verify,
            client_cert,
            session_resumption: up.tls_session_resumption,
        }
    }

    /// The files this TLS material is read from (none: system roots, no client certificate).
    pub fn files(&self) -> Vec<&Path> {
        let mut files: Vec<&Path> = self.ca_file.iter().map(PathBuf::as_path).collect();
        if let Some((cert, key)) = &self.client_cert {
            files.push(cert);
            files.push(key);
        }
        files
    }

    /// The client certificate as it is on disk now, for status output.
    pub fn client_cert_summary(&self) -> Option<CertSummary> {
        let (cert, _) = self.client_cert.as_ref()?;
        let chain = load_certs("upstream client certificate", cert).ok()?;
        CertSummary::of(chain.first()?)
    }
}

/// Sessions kept for resumption: every upstream connection goes to one server name, and rustls
/// keeps up to 8 TLS 1.3 tickets per name, each used once (a resumed connection brings new ones).
const RESUMPTION_SESSIONS: usize = 64;

/// Builds the client-side config used for upstream connections. New material (a CA, a client
/// certificate) is always a new config, and takes effect on its very first handshake: rustls
/// resumes a session only under the verifier and client certificate it was made with, and each
/// config has a session store of its own besides.
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
        Some((cert, key)) => builder
            .with_client_auth_cert(
                load_certs("upstream client certificate", cert)?,
                load_key("upstream client key", key)?,
            )
            .map_err(|e| pair_error(e, cert, key))?,
        None => builder.with_no_client_auth(),
    };
    config.resumption = if opts.session_resumption {
        rustls::client::Resumption::in_memory_sessions(RESUMPTION_SESSIONS)
    } else {
        rustls::client::Resumption::disabled()
    };
    Ok(Arc::new(config))
}

/// The parts of a TLS client listener that can be replaced while it runs: the certificate it
/// presents, and (with `listener.tls.client_ca`) the CAs client certificates must come from. A
/// replacement serves the next handshake; connections already open keep what they had.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub cert: Arc<ListenerCert>,
    pub client_ca: Option<Arc<ClientCa>>,
}

/// Builds the server-side config for a TLS client listener, and the parts of it that can be
/// replaced later. With `client_ca`, every client must present a certificate issued by one of
/// its CAs (Redis's `tls-auth-clients yes`).
pub fn listener_server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    required: bool,
) -> Result<(Arc<ServerConfig>, ListenerTls), TlsError> {
    let resolver = Arc::new(ListenerCert(ArcSwap::from_pointee(load_listener_cert(
        cert, key,
    )?)));
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let (builder, client_ca) = match client_ca {
        Some(path) => {
            let verifier = Arc::new(ClientCa(ArcSwap::from_pointee(load_client_ca(
                path, required,
            )?)));
            (
                builder.with_client_cert_verifier(verifier.clone()),
                Some(verifier),
            )
        }
        None => (builder.with_no_client_auth(), None),
    };
    let config = builder.with_cert_resolver(resolver.clone());
    let parts = ListenerTls {
        cert: resolver,
        client_ca,
    };
    Ok((Arc::new(config), parts))
}

/// Reads the CAs a listener's clients must have their certificates from (`required`: every
/// client must present one; otherwise only a certificate presented is checked).
pub fn load_client_ca(path: &Path, required: bool) -> Result<CaVerifier, TlsError> {
    const WHAT: &str = "listener client CA file";
    let mut roots = RootCertStore::empty();
    for cert in load_certs(WHAT, path)? {
        roots.add(cert).map_err(|e| TlsError::Invalid {
            what: WHAT,
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    let mut builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if !required {
        builder = builder.allow_unauthenticated();
    }
    let verifier = builder.build().map_err(|e| TlsError::Invalid {
        what: WHAT,
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(CaVerifier(verifier))
}

/// A check of client certificates against a set of CAs.
#[derive(Debug)]
pub struct CaVerifier(Arc<dyn ClientCertVerifier>);

/// The listener's check of client certificates; [`ClientCa::replace`] takes effect at the next
/// handshake.
///
/// It names no CAs to the client (an empty `certificate_authorities` list, which TLS allows):
/// the names would have to change with a reload, and clients send the certificate they were
/// given whatever the list says.
#[derive(Debug)]
pub struct ClientCa(ArcSwap<CaVerifier>);

impl ClientCa {
    pub fn replace(&self, verifier: CaVerifier) {
        self.0.store(Arc::new(verifier));
    }
}

impl ClientCertVerifier for ClientCa {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.load().0.client_auth_mandatory()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .load()
            .0
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.load().0.supported_verify_schemes()
    }
}

/// Reads the listener's certificate chain and key, and checks that they belong together.
pub fn load_listener_cert(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    CertifiedKey::from_der(
        load_certs("listener certificate", cert)?,
        load_key("listener key", key)?,
        &provider(),
    )
    .map_err(|e| pair_error(e, cert, key))
}

/// Whether the certificate file and the key file hold a pair (both readable, the key the
/// certificate's).
pub fn cert_and_key_match(cert: &Path, key: &Path) -> bool {
    read_file("certificate", cert).is_ok_and(|pem| cert_pem_matches_key(&pem, key))
}

/// Whether the PEM certificate chain `cert_pem` and the key file hold a pair.
pub fn cert_pem_matches_key(cert_pem: &[u8], key: &Path) -> bool {
    let chain = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>();
    match (chain, load_key("key", key)) {
        (Ok(chain), Ok(key)) if !chain.is_empty() => {
            CertifiedKey::from_der(chain, key, &provider()).is_ok()
        }
        _ => false,
    }
}

/// A certificate and key rustls would not pair, in the words of the files involved.
fn pair_error(err: rustls::Error, cert: &Path, key: &Path) -> TlsError {
    match err {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        },
        other => other.into(),
    }
}

/// The certificate the client listener presents; [`ListenerCert::replace`] takes effect at the
/// next handshake, and connections already open keep theirs.
#[derive(Debug)]
pub struct ListenerCert(ArcSwap<CertifiedKey>);

impl ListenerCert {
    pub fn replace(&self, key: CertifiedKey) {
        self.0.store(Arc::new(key));
    }

    pub fn summary(&self) -> Option<CertSummary> {
        CertSummary::of(self.0.load().cert.first()?)
    }
}

impl ResolvesServerCert for ListenerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// What an operator wants to know about a certificate in use. Nothing in it is secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertSummary {
    pub subject: String,
    pub issuer: String,
    /// The serial number in hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

impl CertSummary {
    /// None if the certificate cannot be parsed (rustls accepted it, so that would be odd).
    pub fn of(cert: &CertificateDer<'_>) -> Option<CertSummary> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        Some(CertSummary {
            subject: parsed.subject().to_string(),
            issuer: parsed.issuer().to_string(),
            serial: parsed
                .raw_serial_as_string()
                .replace(':', "")
                .to_uppercase(),
            not_after: parsed.validity().not_after.timestamp(),
        })
    }
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
        // What a server that speaks plain text may answer to a ClientHello: an error line,
        // which is not a TLS record. (Redis 7.0 answers nothing, and the handshake times out:
        // `ConnectError::TlsTimeout` gives the same advice.)
        rustls::Error::InvalidMessage(_) => format!(
            "the server did not answer in TLS ({inner}): if it takes plain TCP on this port, use a redis:// URL"
        ),
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

#[cfg(test)]
mod tests {
    use super::explain_handshake_error;

    fn rustls_io_error(err: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, err)
    }

    /// What a plain-TCP port answers to a ClientHello (an error line) reads as a record of no
    /// known type: the message names the other scheme.
    #[test]
    fn an_answer_that_is_not_tls_names_the_plain_scheme() {
        let text = explain_handshake_error(&rustls_io_error(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        )));
        assert!(text.contains("did not answer in TLS"), "{text}");
        assert!(text.contains("use a redis:// URL"), "{text}");
        let text = explain_handshake_error(&rustls_io_error(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        )));
        assert!(text.contains("unknown issuer"), "{text}");
        assert!(!text.contains("redis://"), "{text}");
    }
}
