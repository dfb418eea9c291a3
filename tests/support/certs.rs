//! Test PKI made with rcgen: a CA, a server certificate and a client certificate signed by it,
//! and a second, unrelated CA (with its own server and client certificates) for "wrong CA" tests.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// PEM files written by [`Certs::generate`].
pub struct Certs {
    pub dir: PathBuf,
    /// The test CA (`ca.pem`): trust this to accept `server` and `client`.
    pub ca: PathBuf,
    /// Server certificate for `localhost`, `127.0.0.1` and `::1`, signed by `ca`.
    pub server: CertFiles,
    /// Client certificate (CN `rotaproxy-test-client`) signed by `ca`, for mutual TLS.
    pub client: CertFiles,
    /// A second CA that signed nothing above (`other-ca.pem`).
    pub other_ca: PathBuf,
    /// Server certificate for the same names, signed by `other_ca` (a server nobody should trust).
    pub other_server: CertFiles,
    /// Client certificate signed by `other_ca` (a client Redis must reject under mTLS).
    pub other_client: CertFiles,
    ca_issuer: Issuer<'static, KeyPair>,
}

/// The names every server certificate covers.
pub const SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

impl Certs {
    /// Generates the whole set into `dir` (created if missing).
    pub fn generate(dir: &Path) -> Certs {
        fs::create_dir_all(dir).expect("create cert dir");
        let (ca_pem, ca_issuer) = new_ca("rotaproxy test CA");
        let (other_ca_pem, other_issuer) = new_ca("rotaproxy unrelated CA");
        let ca = write(dir, "ca.pem", &ca_pem);
        let other_ca = write(dir, "other-ca.pem", &other_ca_pem);

        let server = issue(dir, "server", &ca_issuer, &SERVER_NAMES, true);
        let client = issue(dir, "client", &ca_issuer, &["rotaproxy-test-client"], false);
        let other_server = issue(dir, "other-server", &other_issuer, &SERVER_NAMES, true);
        let other_client = issue(
            dir,
            "other-client",
            &other_issuer,
            &["rotaproxy-other-client"],
            false,
        );

        Certs {
            dir: dir.to_path_buf(),
            ca,
            server,
            client,
            other_ca,
            other_server,
            other_client,
            ca_issuer,
        }
    }

    /// Issues another server certificate from the test CA (e.g. for a certificate rotation), as
    /// `<name>.pem` / `<name>-key.pem`.
    pub fn issue_server(&self, name: &str, sans: &[&str]) -> CertFiles {
        issue(&self.dir, name, &self.ca_issuer, sans, true)
    }

    /// A self-signed client certificate (what one registers with a Redis Cloud database's
    /// `clientTlsCertificates`), as `<name>.pem` / `<name>-key.pem`.
    pub fn self_signed_client(&self, name: &str) -> CertFiles {
        // Made a while ago: a month of its life left.
        self.self_signed_client_expiring_in(name, time::Duration::days(30))
    }

    /// [`Certs::self_signed_client`] with `left` of its life left.
    pub fn self_signed_client_expiring_in(&self, name: &str, left: time::Duration) -> CertFiles {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(60);
        params.not_after = now + left;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-sign");
        CertFiles {
            cert: write(&self.dir, &format!("{name}.pem"), &cert.pem()),
            key: write_key(&self.dir, &format!("{name}-key.pem"), &key.serialize_pem()),
        }
    }

    /// Issues another client certificate from the test CA (e.g. for a client-cert rotation).
    pub fn issue_client(&self, name: &str) -> CertFiles {
        issue(&self.dir, name, &self.ca_issuer, &[name], false)
    }
}

fn new_ca(cn: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("ca key");
    let cert = params.self_signed(&key).expect("self-sign ca");
    (cert.pem(), Issuer::new(params, key))
}

fn issue(
    dir: &Path,
    name: &str,
    issuer: &Issuer<'static, KeyPair>,
    sans: &[&str],
    server: bool,
) -> CertFiles {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = if server {
        // Redis uses the server certificate as its client certificate too (replication,
        // cluster bus) unless told otherwise: allow both.
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    CertFiles {
        cert: write(dir, &format!("{name}.pem"), &cert.pem()),
        key: write_key(dir, &format!("{name}-key.pem"), &key.serialize_pem()),
    }
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, pem).expect("write pem");
    p
}

fn write_key(dir: &Path, name: &str, pem: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = write(dir, name, pem);
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).expect("chmod key");
    p
}
