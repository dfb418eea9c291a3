//! The upstream side: opening authenticated connections ([`connector`]) and keeping a warm
//! supply of them ([`pool`]), and what the proxy knows of the server ([`server_facts`]).

pub mod connector;
pub mod pool;
pub mod server_facts;
