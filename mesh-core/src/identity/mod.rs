//! Identity rules: key fingerprints and the OpenSSH text formats that carry keys.
//!
//! Parsing and matching live here; reading and writing the files is the caller's.

pub mod fingerprint;
pub mod known_hosts;
pub mod public_key;
