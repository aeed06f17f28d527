//! The SSH operator endpoint: a russh server that authenticates users by key and
//! runs one mesh command per `exec` request (see `docs/ssh-protocol.md`).

pub mod command;
pub mod limits;
pub mod server;

pub use server::{Endpoint, JoinRequest, SshServer};
