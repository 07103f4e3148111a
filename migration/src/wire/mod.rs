//! The migration stream: checksummed [`frame`]s, the typed [`message`]s they carry, and
//! the [`transport`]s that carry them, each connection held as a [`conn::Conn`] and
//! authenticated by [`auth`].

pub mod auth;
pub mod conn;
pub mod frame;
pub mod message;
pub mod tls;
pub mod transport;
