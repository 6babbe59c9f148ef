//! agentd regions, from inside a job: named byte ranges the supervisor materializes
//! lazily. A region is mapped as ordinary memory; the first touch of each page is a
//! fault the supervisor's broker answers (from the region's backing store, as zeros, or
//! from a parent region), through a userfaultfd the job creates and hands over.
//!
//! Rust: `Region::open(name, write)`; C: crates/region-cabi (libagentd_region.so, include/agentd_region.h).

pub mod client;
pub mod proto;
pub mod uffd;

pub use client::{Error, Region};
