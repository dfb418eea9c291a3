//! `rotaproxy probe live|ready`: asks a running proxy's admin listener whether it is alive or
//! ready, for container health checks.
//!
//! In a pod the admin listener stays on loopback (the pod shares it), where the kubelet's HTTP
//! probes, sent to the pod's address, cannot reach it; an exec probe runs inside the container
//! and can. The image has no HTTP client, so the binary is its own.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// What a probe asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Check {
    /// `GET /healthz`: the process serves.
    Live,
    /// `GET /readyz`: an upstream connection can be authenticated, and no stop has begun.
    Ready,
}

impl Check {
    fn path(self) -> &'static str {
        match self {
            Check::Live => "/healthz",
            Check::Ready => "/readyz",
        }
    }
}

/// The answer: whether it passed, and the admin listener's words (or why there were none).
#[derive(Debug)]
pub struct Outcome {
    pub passed: bool,
    pub message: String,
}

/// Asks the admin listener at `admin` (an unspecified address, `0.0.0.0` or `::`, is asked on
/// loopback), waiting at most `timeout` for each step.
pub fn probe(admin: SocketAddr, check: Check, timeout: Duration) -> Outcome {
    match ask(reachable(admin), check.path(), timeout) {
        Ok((status, body)) => Outcome {
            passed: status == 200,
            message: body.trim_end().to_string(),
        },
        Err(error) => Outcome {
            passed: false,
            message: format!("cannot reach the admin listener at {admin}: {error}"),
        },
    }
}

fn reachable(admin: SocketAddr) -> SocketAddr {
    match admin.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), admin.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), admin.port())
        }
        _ => admin,
    }
}

/// One HTTP/1.1 GET: the status code and the body.
fn ask(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    // The answers are a line of text; a bound keeps a stranger on the port from flooding us.
    stream.take(64 * 1024).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(invalid)?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(invalid)?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_admin_address_is_asked_on_loopback() {
        let v4: SocketAddr = "0.0.0.0:9180".parse().unwrap();
        let v6: SocketAddr = "[::]:9180".parse().unwrap();
        let own: SocketAddr = "10.1.2.3:9180".parse().unwrap();
        assert_eq!(reachable(v4), "127.0.0.1:9180".parse().unwrap());
        assert_eq!(reachable(v6), "[::1]:9180".parse().unwrap());
        assert_eq!(reachable(own), own);
    }

    #[test]
    fn nobody_listening_fails_with_the_reason() {
        // A port just freed by this test: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        let outcome = probe(addr, Check::Ready, Duration::from_secs(2));
        assert!(!outcome.passed);
        assert!(
            outcome.message.contains("cannot reach the admin listener"),
            "{}",
            outcome.message
        );
    }
}
