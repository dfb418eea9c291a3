//! RESP wire handling: finding frame boundaries without building values ([`scanner`]), reading
//! the few command names and arguments the proxy must understand ([`command`]) and the little it
//! reads inside replies ([`reply`]).

pub mod command;
pub mod reply;
pub mod scanner;
