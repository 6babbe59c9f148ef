//! `[regions]`: which regions a job of this policy may be given (`agentctl run --region
//! NAME[:rw]`), each read-only or read-write. Nothing by default: a region is the
//! operator's data, and userfaultfd is kernel surface a job gets only with one.

use serde::Deserialize;
use toml::Spanned;

/// One `allow` entry: a name, or a prefix ending in `*`, read-only unless `:rw`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RegionRule {
    pub pattern: String,
    pub write: bool,
    /// The rule's id in reports and operation rows: `regions.allow[N]`.
    pub rule: String,
}

impl RegionRule {
    pub fn matches(&self, name: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == self.pattern,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegions {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
}

impl RawRegions {
    pub(super) fn parse(
        &self,
    ) -> Result<Vec<RegionRule>, (std::ops::Range<usize>, &'static str, String)> {
        let mut rules = Vec::new();
        for (i, entry) in self.allow.iter().enumerate() {
            let text = entry.get_ref();
            let (pattern, write) = match text.rsplit_once(':') {
                Some((p, "rw")) => (p, true),
                Some((p, "ro")) => (p, false),
                Some(_) => {
                    return Err((
                        entry.span(),
                        "regions.allow",
                        format!("{text:?}: expected NAME, NAME:ro or NAME:rw (NAME may end in *)"),
                    ));
                }
                None => (text.as_str(), false),
            };
            let name = pattern.strip_suffix('*').unwrap_or(pattern);
            if !(pattern == "*" || crate::region::check_name(name).is_ok()) || name.contains('*') {
                return Err((
                    entry.span(),
                    "regions.allow",
                    format!(
                        "{text:?}: expected a region name (letters, digits, '.', '_', '-'), optionally ending in *"
                    ),
                ));
            }
            rules.push(RegionRule {
                pattern: pattern.to_owned(),
                write,
                rule: format!("regions.allow[{i}]"),
            });
        }
        Ok(rules)
    }
}

/// The first rule that gives `name` with the access asked for; None: not granted.
pub fn granting<'a>(rules: &'a [RegionRule], name: &str, write: bool) -> Option<&'a RegionRule> {
    rules
        .iter()
        .find(|r| r.matches(name) && (r.write || !write))
}
