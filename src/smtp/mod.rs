//! The SMTP protocol: a pure core (line framing, DATA decoding, command parsing, replies, the session state
//! machine) that does no I/O, and the async driver in `conn` that feeds it from a socket.

pub mod codec;
pub mod command;
pub mod conn;
pub mod reply;
pub mod session;

pub use reply::Reply;
