//! Live migration for hugevisor: the wire protocol ([`protocol`]) and transports
//! ([`transport`]). The pre-copy and post-copy state machines drive these from the VMM.

pub mod protocol;
pub mod transport;

pub use protocol::{
    is_zero, Error, Frame, FrameKind, FrameReader, FrameWriter, Hello, PageData, PROTOCOL_VERSION,
};
pub use transport::{Listener, Stream, Uri};
