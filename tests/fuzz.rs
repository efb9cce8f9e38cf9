//! Fuzz targets for everything moat parses from a client or an operator: the command parser and SASL
//! decoding, command-line framing and the DATA/BDAT decoder, the session state machine under random command
//! sequences, the MIME/attachment/zip scan, and the rules and users files.
//!
//! Each target is a bolero `check!`: under `cargo test` (stable Rust) it runs a fixed number of random
//! inputs, so CI fuzzes on every run within a few seconds per target; `BOLERO_RANDOM_ITERATIONS=N` runs more
//! (the long runs in docs/testing.md), and a failure prints the `BOLERO_RANDOM_SEED` that replays it. Where
//! a nightly toolchain and cargo-bolero exist, `cargo bolero test --test fuzz <module>::<target>` runs the
//! same target under libFuzzer (coverage-guided). Inputs are structured (tokens of the grammar under test,
//! plus raw bytes), so random cases reach past the first syntax check.
//!
//! Properties: no panic; work and memory bounded by the input (output sizes, buffers and lists checked
//! against the input or the module's constant); round trips where a printer exists (command lines, dot
//! stuffing, SASL PLAIN); and the state machine's invariants (no DATA without a recipient, no relay for
//! strangers, the error limit closes the session).

#[path = "fuzz/content.rs"]
mod content;
#[path = "fuzz/files.rs"]
mod files;
#[path = "fuzz/session.rs"]
mod session;
#[path = "fuzz/smtp.rs"]
mod smtp;
