//! Regions: named, sized byte ranges a job maps as memory and the supervisor fills
//! lazily, one page fault at a time, through userfaultfd (the way Firecracker restores
//! a snapshot and CRIU restores lazily).
//!
//! A region's content is a base (a file, the content-addressed chunks of a publish, or
//! zeros) and, over it, a layer of pages that writable handles changed. A clone starts
//! with its parent's base and layer as its own inherited content: serving those pages is
//! the copy-on-write outcome, and its writes go to its own layer, never to the parent.
//! `publish` folds a region's content into chunks (shared between regions by hash) and
//! bumps its generation; `revoke` bumps it and refuses new opens. A handle serves the
//! generation it opened: once that moves on, its next fault fails with a typed reason.
//!
//! - `stats`: per-region and per-job counters (faults by outcome, bytes, latency).
//! - `store`: the chunk store, manifests, layers on disk.
//! - `content`: which bytes a page holds and where they come from.
//! - `broker`: one handle's fault service (read-ahead, retries, failures, write-back).

pub mod broker;
pub mod cat;
pub mod content;
pub mod gc;
pub mod session;
pub mod stats;
pub mod store;

use serde::{Deserialize, Serialize};

/// Bytes per chunk of a published region (the unit of sharing).
pub const CHUNK: u64 = 64 << 10;
pub const PAGE: u64 = agentd_region::uffd::PAGE_SIZE;
/// The largest region agentd makes (zero regions and clones; files are what they are).
pub const MAX_SIZE: u64 = 1 << 40;

/// What a region's pages come from, below its layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Base {
    /// A file on the host, read as it is when a page is first touched.
    File {
        path: String,
    },
    /// A published manifest: chunks by sha256 (`store::Manifest`).
    Chunks {
        manifest: String,
    },
    Zero,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionState {
    Active,
    Revoked,
}

/// A region as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionInfo {
    pub name: String,
    pub size: u64,
    /// Bumped by publish and revoke: handles of an older generation fail.
    pub generation: u64,
    pub state: RegionState,
    pub base: Base,
    /// The base is the parent's (a clone not yet published): serving it is copy-on-write.
    #[serde(default)]
    pub base_inherited: bool,
    /// Pages of its own (or inherited) over the base: `store::Layer`.
    #[serde(default)]
    pub layer_pages: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
    /// The uid that created it.
    pub owner_uid: u32,
}

impl RegionInfo {
    pub fn pages(&self) -> u64 {
        self.size.div_ceil(PAGE)
    }
}

/// A region name: 1 to 64 of letters, digits, `.`, `_`, `-`, starting with a letter or
/// digit (it names files in the state directory).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "region name {name:?}: expected 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        ))
    }
}

/// `NAME` or `NAME:rw` (`NAME:ro` too), as `agentctl run --region` takes it.
pub fn parse_grant_request(s: &str) -> Result<(String, bool), String> {
    let (name, write) = match s.rsplit_once(':') {
        Some((n, "rw")) => (n, true),
        Some((n, "ro")) => (n, false),
        Some((_, other)) => {
            return Err(format!(
                "region {s:?}: expected NAME, NAME:ro or NAME:rw, not :{other}"
            ));
        }
        None => (s, false),
    };
    check_name(name)?;
    Ok((name.to_owned(), write))
}

/// What a job was given: a region, its access, and the policy rule that allowed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionGrant {
    pub name: String,
    pub write: bool,
    pub rule: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_grant_requests() {
        assert!(check_name("ctx-1.v2_a").is_ok());
        for bad in ["", "-x", "a/b", "../x", &"a".repeat(65), "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_grant_request("idx").unwrap(), ("idx".into(), false));
        assert_eq!(parse_grant_request("idx:rw").unwrap(), ("idx".into(), true));
        assert_eq!(
            parse_grant_request("idx:ro").unwrap(),
            ("idx".into(), false)
        );
        assert!(parse_grant_request("idx:wr").is_err());
        assert!(parse_grant_request("a/b:rw").is_err());
    }
}
