//! Shared test harness: an in-process fake upstream, moat started on loopback, real peers (Postfix).
#![allow(dead_code)]

pub mod fake;
pub mod moat;
pub mod postfix;
