//! Shared test harness: an in-process fake upstream, moat started on loopback, real peers (Postfix),
//! external programs run with a deadline.
#![allow(dead_code)]
// The real-peer helpers (Postfix, external programs) poll child processes from plain threads, off any
// runtime, so `std::thread::sleep` (disallowed in clippy.toml for async code) is deliberate here.
#![allow(clippy::disallowed_methods)]

pub mod conformance;
pub mod dnsmasq;
pub mod fake;
pub mod fleet;
pub mod haproxy;
pub mod moat;
pub mod moat_process;
pub mod postfix;
pub mod process;
pub mod redis;
