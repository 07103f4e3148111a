//! One connection of a migration as both ends hold it: a handle to shut it down, a frame
//! writer and a message reader over the same socket. Made once per connection, so the
//! bytes the reader buffered during authentication are the ones it goes on with.

use std::time::Duration;

use crate::error::{Error, Step};
use crate::wire::frame::FrameWriter;
use crate::wire::message::{Layout, Message, MessageReader};
use crate::wire::transport::Channel;

pub struct Conn {
    /// A handle on the connection, to shut it down from anywhere.
    pub channel: Box<dyn Channel>,
    pub writer: FrameWriter<Box<dyn Channel>>,
    pub reader: MessageReader<Box<dyn Channel>>,
    /// The I/O timeout the channel was opened with (for the errors it names).
    pub io: Duration,
}

impl Conn {
    pub fn new(channel: Box<dyn Channel>, layout: Layout, io: Duration) -> std::io::Result<Conn> {
        Ok(Conn {
            writer: FrameWriter::new(channel.try_clone()?),
            reader: MessageReader::new(channel.try_clone()?, layout),
            channel,
            io,
        })
    }

    /// Sends `m` and writes it out at once (the peer may wait for it).
    pub fn send(&mut self, step: Step, m: &Message) -> Result<(), Error> {
        m.send(&mut self.writer)
            .and_then(|()| self.writer.flush())
            .map_err(Error::wire(step, self.io))
    }

    /// The next message, handed to `take` (its page data borrows the frame).
    pub fn recv<T>(&mut self, step: Step, take: impl FnOnce(Message<'_>) -> T) -> Result<T, Error> {
        let frame = self.reader.recv().map_err(Error::wire(step, self.io))?;
        let msg = self
            .reader
            .decode(&frame)
            .map_err(Error::wire(step, self.io))?;
        Ok(take(msg))
    }

    /// Tells the peer why (best effort) and closes.
    pub fn refuse(mut self, reason: &str) {
        let abort = Message::Abort {
            reason: reason.to_string(),
        };
        let _ = abort
            .send(&mut self.writer)
            .and_then(|()| self.writer.flush());
        self.channel.shutdown();
    }

    pub fn shutdown(&self) {
        self.channel.shutdown();
    }
}
