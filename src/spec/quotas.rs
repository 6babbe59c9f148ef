//! `[quotas]`: how much of the daemon's memory a job may make it hold, per object class
//! (see telemetry::classes). A job past a quota is refused the next object (HTTP 429
//! and an operation row), so a job cannot run the daemon out of memory.

use super::values::UnitValue;
use crate::telemetry::classes::Quota;
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// The most any quota may grant per job: the daemon's memory is shared by every job.
pub const MAX_QUOTA_BYTES: u64 = 1 << 30;

/// A job's quotas on the classes it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quotas {
    pub tool_calls: Quota,
    pub context: Quota,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            tool_calls: Quota {
                objects: Some(10_000),
                bytes: Some(16 << 20),
            },
            context: Quota {
                objects: Some(1024),
                bytes: Some(64 << 20),
            },
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuotas {
    tool_calls: Option<Spanned<i64>>,
    tool_call_bytes: Option<Spanned<UnitValue>>,
    context_segments: Option<Spanned<i64>>,
    context_bytes: Option<Spanned<UnitValue>>,
}

impl RawQuotas {
    /// Validates; an error is (span, key, message).
    pub(super) fn parse(&self) -> Result<Quotas, (std::ops::Range<usize>, &'static str, String)> {
        let mut q = Quotas::default();
        let count = |key: &'static str, v: &Spanned<i64>| match *v.get_ref() {
            n if (1..=1_000_000).contains(&n) => Ok(n as u64),
            n => Err((
                v.span(),
                key,
                format!("expected 1 to 1000000 objects, got {n}"),
            )),
        };
        let size = |key: &'static str, v: &Spanned<UnitValue>| {
            let bytes = match v.get_ref() {
                UnitValue::Int(n) if *n >= 0 => Ok(*n as u64),
                UnitValue::Int(n) => Err(format!("{n} is negative")),
                UnitValue::Text(t) => super::parse_size(t),
            };
            match bytes {
                Ok(b) if (1..=MAX_QUOTA_BYTES).contains(&b) => Ok(b),
                Ok(b) => Err((
                    v.span(),
                    key,
                    format!("{b} bytes: expected 1 byte to 1G (the daemon's memory is shared)"),
                )),
                Err(m) => Err((v.span(), key, m)),
            }
        };
        if let Some(v) = &self.tool_calls {
            q.tool_calls.objects = Some(count("quotas.tool_calls", v)?);
        }
        if let Some(v) = &self.tool_call_bytes {
            q.tool_calls.bytes = Some(size("quotas.tool_call_bytes", v)?);
        }
        if let Some(v) = &self.context_segments {
            q.context.objects = Some(count("quotas.context_segments", v)?);
        }
        if let Some(v) = &self.context_bytes {
            q.context.bytes = Some(size("quotas.context_bytes", v)?);
        }
        Ok(q)
    }
}

/// The policy key that sets a class's bound ("objects" or "bytes").
pub fn key_of(class: crate::telemetry::classes::Class, bound: &str) -> &'static str {
    use crate::telemetry::classes::Class;
    match (class, bound) {
        (Class::ToolCall, "objects") => "quotas.tool_calls",
        (Class::ToolCall, _) => "quotas.tool_call_bytes",
        (Class::ContextSegment, "objects") => "quotas.context_segments",
        (Class::ContextSegment, _) => "quotas.context_bytes",
        _ => "quotas",
    }
}
