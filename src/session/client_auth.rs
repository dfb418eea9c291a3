//! How clients authenticate to the proxy. Their AUTH never reaches the upstream: the upstream
//! credential is the proxy's own.

use secrecy::{ExposeSecret, SecretString};

use crate::config::{ClientAuthConfig, ClientAuthMode, SecretError};

pub struct ClientAuth {
    /// None: any AUTH is accepted (applications migrating from a direct connection still send
    /// their old password). Some: any of these user/password pairs is accepted.
    users: Option<Vec<(String, SecretString)>>,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let users: Option<Vec<&str>> = self
            .users
            .as_ref()
            .map(|u| u.iter().map(|(name, _)| name.as_str()).collect());
        f.debug_struct("ClientAuth").field("users", &users).finish()
    }
}

impl ClientAuth {
    pub fn from_config(config: &ClientAuthConfig) -> Result<Self, SecretError> {
        let users = match config.mode {
            ClientAuthMode::None => None,
            ClientAuthMode::Password => Some(
                config
                    .users
                    .iter()
                    .map(|u| Ok((u.username.clone(), u.password.resolve()?)))
                    .collect::<Result<_, SecretError>>()?,
            ),
        };
        Ok(Self { users })
    }

    /// Whether clients must authenticate before running commands.
    pub fn required(&self) -> bool {
        self.users.is_some()
    }

    /// Checks a username/password pair. Every configured entry is compared in full, so timing
    /// does not reveal which user matched or how much of a password was right.
    pub fn check(&self, username: &[u8], password: &[u8]) -> bool {
        let Some(users) = &self.users else {
            return true;
        };
        let mut ok = false;
        for (user, secret) in users {
            let user_ok = constant_time_eq(user.as_bytes(), username);
            let pass_ok = constant_time_eq(secret.expose_secret().as_bytes(), password);
            ok |= user_ok & pass_ok;
        }
        ok
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(pairs: &[(&str, &str)]) -> ClientAuth {
        ClientAuth {
            users: Some(
                pairs
                    .iter()
                    .map(|(u, p)| (u.to_string(), SecretString::from(p.to_string())))
                    .collect(),
            ),
        }
    }

    #[test]
    fn any_listed_pair_is_accepted() {
        let a = auth(&[("default", "old"), ("default", "new"), ("app", "x")]);
        assert!(a.check(b"default", b"old"));
        assert!(a.check(b"default", b"new"));
        assert!(a.check(b"app", b"x"));
        assert!(!a.check(b"app", b"old"));
        assert!(!a.check(b"default", b"ol"));
        assert!(!format!("{a:?}").contains("old"));
    }

    #[test]
    fn mode_none_accepts_anything() {
        let a = ClientAuth { users: None };
        assert!(!a.required());
        assert!(a.check(b"whoever", b"whatever"));
    }
}
