//! agentd: a Linux-native supervisor for AI agent jobs.
//!
//! Modules in the order a job passes through them: `spec` parses and validates the
//! policy, `host` says what the kernel offers, `job` runs the creation pipeline
//! (validate → allocate → guards → publish → start), `cgroup` holds the job's resources,
//! `sandbox` is the child side between clone and execve.

pub mod api;
pub mod audit;
pub mod cgroup;
pub mod daemon;
pub mod error;
pub mod host;
pub mod job;
pub mod mount_api;
pub mod net;
pub mod region;
pub mod sandbox;
pub mod sched;
pub mod spec;
pub mod store;
pub mod telemetry;

pub use error::Error;
pub mod workspace;
