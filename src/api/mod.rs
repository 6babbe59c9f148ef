//! The control API: HTTP/1.1 + JSON over a Unix socket. `types` holds every body,
//! `client` is what agentctl speaks, `server` is the daemon's side.

pub mod client;
pub mod server;
pub mod types;
