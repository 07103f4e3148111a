//! The migration stream: checksummed [`frame`]s, the typed [`message`]s they carry, and
//! the [`transport`]s that carry them.

pub mod frame;
pub mod message;
pub mod transport;
