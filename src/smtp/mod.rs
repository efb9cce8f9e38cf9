//! The SMTP protocol, pure: line framing and DATA decoding, command parsing, replies, the session state
//! machine and the relay policy it applies. Nothing here does I/O; the async driver ([`crate::conn`])
//! feeds it from a socket.

pub mod codec;
pub mod command;
pub mod relay;
pub mod reply;
pub mod session;

pub use reply::Reply;
