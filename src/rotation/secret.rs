//! New secrets, from the operating system's CSPRNG.
//!
//! Every generated password has at least one upper-case letter, one lower-case letter, one digit
//! and one special character (the seed policy of most password rules, Redis Cloud's included),
//! and its length respects the server's limits.

use secrecy::SecretString;

const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const DIGITS: &[u8] = b"0123456789";
/// Specials that need no quoting in a shell, a TOML string, JSON or a Redis inline command.
const SPECIAL: &[u8] = b"!#%*+,-.:;=?@^_~";

/// Shortest password the proxy generates.
pub const MIN_LENGTH: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum SecretGenError {
    #[error("password length {0} is below the minimum of {MIN_LENGTH}")]
    TooShort(usize),
    #[error("the operating system's random generator failed: {0}")]
    Rng(String),
}

/// `bytes` random bytes from the OS as lowercase hex: ids and names, not secrets.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Generates a password of `length` characters.
pub fn generate_password(length: usize) -> Result<SecretString, SecretGenError> {
    if length < MIN_LENGTH {
        return Err(SecretGenError::TooShort(length));
    }
    let all: Vec<u8> = [UPPER, LOWER, DIGITS, SPECIAL].concat();
    let mut out = Vec::with_capacity(length);
    // One of each class first, the rest from the whole alphabet, then a shuffle so the classes
    // are not at predictable positions.
    for class in [UPPER, LOWER, DIGITS, SPECIAL] {
        out.push(class[uniform(class.len())?]);
    }
    while out.len() < length {
        out.push(all[uniform(all.len())?]);
    }
    for i in (1..out.len()).rev() {
        let j = uniform(i + 1)?;
        out.swap(i, j);
    }
    Ok(SecretString::from(
        String::from_utf8(out).expect("the alphabet is ASCII"),
    ))
}

/// A uniformly random index below `n` (rejection sampling: no modulo bias).
fn uniform(n: usize) -> Result<usize, SecretGenError> {
    debug_assert!(n > 0 && n <= 256);
    let limit = 256 - (256 % n);
    loop {
        let mut b = [0u8; 1];
        getrandom::fill(&mut b).map_err(|e| SecretGenError::Rng(e.to_string()))?;
        if (b[0] as usize) < limit {
            return Ok(b[0] as usize % n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn every_password_meets_the_policy() {
        for len in [8, 9, 32, 49, 128] {
            for _ in 0..50 {
                let p = generate_password(len).unwrap();
                let p = p.expose_secret();
                assert_eq!(p.len(), len);
                assert!(p.bytes().any(|b| b.is_ascii_uppercase()));
                assert!(p.bytes().any(|b| b.is_ascii_lowercase()));
                assert!(p.bytes().any(|b| b.is_ascii_digit()));
                assert!(p.bytes().any(|b| SPECIAL.contains(&b)));
                assert!(!p.contains(' ') && !p.contains('"') && !p.contains('\\'));
            }
        }
    }

    #[test]
    fn passwords_differ_and_short_ones_are_refused() {
        let a = generate_password(32).unwrap();
        let b = generate_password(32).unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert!(matches!(
            generate_password(7),
            Err(SecretGenError::TooShort(7))
        ));
    }
}
