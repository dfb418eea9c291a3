//! The upstream side: opening authenticated connections ([`connector`]) and keeping a warm
//! supply of them ([`pool`]).

pub mod connector;
pub mod pool;
