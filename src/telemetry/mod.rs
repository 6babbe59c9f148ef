//! What the daemon knows about its own runtime objects: object classes with accounting,
//! quotas and export rules (`classes`).

pub mod classes;
