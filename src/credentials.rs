//! Generations: everything needed to open an authenticated upstream connection.
//!
//! Any change of endpoint, TLS material or credential makes a new [`Generation`]; every upstream
//! connection remembers the generation it was opened with, so a rotation can tell old connections
//! from new ones. The current generation is published through an [`ArcSwap`]: readers take the
//! latest one per connection, lock-free.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use secrecy::SecretString;

use crate::config::{Config, SecretError, UpstreamUrl};
use crate::tls::{self, TlsError, UpstreamTls};

/// Where and how to reach the upstream.
#[derive(Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// TLS config and the name to verify, or None for plain TCP.
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.as_ref().map(|(_, name)| name))
            .finish()
    }
}

/// An upstream credential: the username and its password.
#[derive(Clone)]
pub struct Credential {
    /// None means the `default` user (`AUTH <password>`).
    pub username: Option<String>,
    /// None means the upstream needs no authentication.
    pub password: Option<SecretString>,
}

impl Credential {
    /// The username for logs and status ("default" when none is configured).
    pub fn display_user(&self) -> &str {
        self.username.as_deref().unwrap_or("default")
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.display_user())
            .field(
                "password",
                &if self.password.is_some() {
                    "<redacted>"
                } else {
                    "<none>"
                },
            )
            .finish()
    }
}

/// Everything needed to open an upstream connection, numbered.
#[derive(Debug)]
pub struct Generation {
    pub id: u64,
    pub endpoint: Endpoint,
    pub credential: Credential,
}

/// Why the first generation could not be built from the config.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error("upstream TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("credentials.password: {0}")]
    Secret(#[from] SecretError),
}

impl Generation {
    /// Builds generation 1 from the config: reads the TLS files and resolves the password.
    pub fn from_config(config: &Config) -> Result<Generation, GenerationError> {
        let url: UpstreamUrl = config.upstream_url();
        let tls = if url.tls {
            let up = &config.upstream;
            let client_cert = match (&up.client_cert, &up.client_key) {
                (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                _ => None,
            };
            let tls_config = tls::upstream_client_config(&UpstreamTls {
                ca_file: up.ca_file.clone(),
                insecure_skip_verify: up.insecure_skip_verify,
                client_cert,
            })?;
            let name = tls::server_name(up.server_name.as_deref().unwrap_or(&url.host))?;
            Some((tls_config, name))
        } else {
            None
        };
        let password = match &config.credentials.password {
            Some(reference) => Some(reference.resolve()?),
            None => None,
        };
        Ok(Generation {
            id: 1,
            endpoint: Endpoint {
                host: url.host,
                port: url.port,
                tls,
            },
            credential: Credential {
                username: config.credentials.username.clone(),
                password,
            },
        })
    }
}

/// The generation new upstream connections are opened with.
pub struct Generations {
    current: ArcSwap<Generation>,
}

impl Generations {
    pub fn new(first: Generation) -> Self {
        Self {
            current: ArcSwap::from_pointee(first),
        }
    }

    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Publishes a new generation; connections opened from now on use it.
    pub fn publish(&self, generation: Generation) {
        self.current.store(Arc::new(generation));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let c = Credential {
            username: Some("app".into()),
            password: Some(SecretString::from("very-secret-pw".to_string())),
        };
        let shown = format!("{c:?}");
        assert!(
            shown.contains("app") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(!shown.contains("very-secret-pw"));
    }
}
