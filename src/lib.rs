//! rotaproxy: a RESP-aware TLS sidecar for Redis that owns the upstream credential.
//!
//! Applications connect to the proxy as if it were Redis. The proxy forwards their commands over
//! TLS to the upstream, authenticated with a credential only it holds, and keeps enough state per
//! connection to move it to another upstream connection without the application noticing.
//!
//! Layout, following the path of a command:
//! - [`server`] starts everything and one [`session`] per client accepted by [`listener`];
//! - [`session`] keeps a client's connection state, answers client AUTH, forwards the rest;
//! - [`resp`] finds frame boundaries ([`resp::scanner`]) and reads the few commands the proxy
//!   must understand;
//! - [`upstream`] opens authenticated connections and keeps a warm pool of them;
//! - [`credentials`] defines generations (endpoint + TLS material + credential);
//! - [`tls`] builds rustls configs; [`net`] is the stream type shared by both sides, reading
//!   into buffers lent from [`read_buffers`] while there are bytes to hold;
//! - [`tls_reload`] follows renewed certificates, keys and CA bundles, with [`watch`];
//! - [`admin`] and [`metrics`] are for operators; [`config`] is the TOML file.

pub mod admin;
pub mod cloud;
pub mod config;
pub mod credentials;
pub mod files;
pub mod hangup;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod probe;
pub mod read_buffers;
pub mod resp;
pub mod rotation;
pub mod secrets;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod tls;
pub mod tls_reload;
pub mod upstream;
pub mod watch;
