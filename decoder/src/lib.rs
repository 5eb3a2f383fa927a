//! The `decant` PostgreSQL extension and logical decoding output plugin.
//!
//! `CREATE EXTENSION decant` installs the SQL part (schema `decant`); the
//! same shared library is the output plugin `decant`, which writes one
//! compact binary record per decoding event in the format defined by the
//! `decant-proto` crate. Everything that touches PostgreSQL's C API lives in
//! [`ffi`], the only module allowed `unsafe`.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod ffi;
mod sql;
