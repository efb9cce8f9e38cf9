//! async driver
