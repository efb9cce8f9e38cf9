//! moat: an inline SMTP filtering proxy that stands in front of an MTA (Postfix first).
//!
//! The modules follow a connection:
//!
//! 1. [`server`] binds the listeners, admits connections (global and per-IP permits) and spawns one task each;
//!    [`shutdown`] drains them.
//! 2. [`tls`] terminates TLS (STARTTLS or implicit) with rustls.
//! 3. [`conn`] drives one connection: it feeds the pure SMTP core in [`smtp`] (`codec`, `command`, `reply`,
//!    `session`) from the socket and carries out what it asks for.
//! 4. [`pipeline`] gives verdicts on the connection, envelope and message, driven by the [`rules`] files.
//! 5. [`spool`] holds message data with bounded memory until the verdict.
//! 6. [`upstream`] relays accepted mail to the MTA, passing the client's identity (XCLIENT or PROXY v2), and
//!    its replies come back to the client.
//! 7. [`metrics`] and [`audit`] record what happened; [`quarantine`] keeps the messages rules held,
//!    [`archive`] copies of accepted mail.
//!
//! [`config`] holds the typed configuration all of these read.
#![forbid(unsafe_code)]

pub mod archive;
pub mod audit;
pub mod auth;
pub mod client_key;
pub mod config;
pub mod conn;
pub mod cores;
pub mod dkim;
pub mod dns;
pub mod fleet;
pub mod headers;
pub mod health;
pub mod metrics;
pub mod pipeline;
pub mod proxy_protocol;
pub mod quarantine;
pub mod rules;
pub mod server;
pub mod shutdown;
pub mod smtp;
pub mod spool;
pub mod state;
pub mod timefmt;
pub mod tls;
pub mod trace;
pub mod upstream;
pub mod watch;
