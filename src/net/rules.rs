//! Egress rules: which destinations a job's proxy may connect to.
//!
//! A destination is allowed when a domain pattern matches its name and port, and every
//! address it connects to is public (unless `allow_private`). Patterns:
//!
//!   `example.org`          exactly that name, ports 80 and 443
//!   `*.example.org`        any name below example.org (not example.org itself), 80 and 443
//!   `example.org:8443`     that name, that port only
//!   `example.org:*`        that name, any port
//!
//! Names are compared lower-case without a trailing dot. Bare addresses are never matched
//! by a pattern: a job reaches an address only through a name (the proxy resolves it, or
//! the job's resolver answered it for an allowed name), so an allowlist of names cannot be
//! side-stepped by connecting to an IP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Ports a pattern without `:PORT` allows: the web.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];

/// One allowed-domain pattern, with the rule that granted it (for reports and audit).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomainRule {
    /// The pattern as written (normalized to lower case).
    pub pattern: String,
    /// "POLICY:network.allow_domains[I]" or "command line: --allow-domain".
    pub rule: String,
}

/// A parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern<'a> {
    /// For `*.example.org`: ".example.org"; else the exact name.
    name: &'a str,
    wildcard: bool,
    /// None: any port (`:*`); empty: the default ports.
    ports: Option<Vec<u16>>,
}

/// Checks a pattern's syntax; the error says what was expected.
pub fn validate_pattern(text: &str) -> Result<String, String> {
    let lower = text.trim().to_ascii_lowercase();
    parse(&lower)?;
    Ok(lower)
}

fn parse(text: &str) -> Result<Pattern<'_>, String> {
    let expected = "expected a domain pattern like \"example.org\", \"*.example.org\", \"example.org:8443\" or \"example.org:*\"";
    let (host, ports) = match text.rsplit_once(':') {
        Some((h, "*")) => (h, None),
        Some((h, p)) => match p.parse::<u16>() {
            Ok(port) if port != 0 => (h, Some(vec![port])),
            _ => {
                return Err(format!(
                    "\"{text}\": \"{p}\" is not a port (1-65535 or *); {expected}"
                ));
            }
        },
        None => (text, Some(DEFAULT_PORTS.to_vec())),
    };
    let (name, wildcard) = match host.strip_prefix("*.") {
        Some(rest) => (&host[1..], {
            check_name(rest).map_err(|m| format!("\"{text}\": {m}; {expected}"))?;
            true
        }),
        None => {
            check_name(host).map_err(|m| format!("\"{text}\": {m}; {expected}"))?;
            (host, false)
        }
    };
    if host.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "\"{text}\" is an address: egress rules name domains (a name in /etc/hosts works)"
        ));
    }
    Ok(Pattern {
        name,
        wildcard,
        ports,
    })
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("empty or too long name".into());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !label.starts_with('-');
        if !ok {
            return Err(format!("\"{label}\" is not a domain label"));
        }
    }
    Ok(())
}

/// Lower case, without a trailing dot: how names are compared.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The first rule whose pattern matches `name` on `port` (any port when None: the
/// resolver's question, which has no port).
pub fn matching<'r>(
    rules: &'r [DomainRule],
    name: &str,
    port: Option<u16>,
) -> Option<&'r DomainRule> {
    let name = normalize(name);
    rules.iter().find(|r| {
        let Ok(p) = parse(&r.pattern) else {
            return false;
        };
        let name_ok = if p.wildcard {
            name.ends_with(p.name) && name.len() > p.name.len()
        } else {
            name == p.name
        };
        let port_ok = match (port, &p.ports) {
            (None, _) | (_, None) => true,
            (Some(port), Some(list)) => list.contains(&port),
        };
        name_ok && port_ok
    })
}

/// Why an address is not public, or None when it is. Private, loopback, link-local,
/// shared (CGNAT), unspecified, multicast and broadcast addresses are all "private" for
/// egress: a job reaches them only with `allow_private`.
pub fn private_kind(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(a) => private_v4(a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => private_v4(v4),
            None => private_v6(a),
        },
    }
}

fn private_v4(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    if a.is_loopback() {
        Some("loopback")
    } else if a.is_private() {
        Some("private")
    } else if a.is_link_local() {
        Some("link-local")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared (carrier-grade NAT)")
    } else if o[0] == 0 {
        Some("unspecified")
    } else if a.is_multicast() || a.is_broadcast() || o[0] >= 240 {
        Some("multicast or reserved")
    } else {
        None
    }
}

fn private_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    if a.is_loopback() {
        Some("loopback")
    } else if a.is_unspecified() {
        Some("unspecified")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("private (unique local)")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if a.is_multicast() {
        Some("multicast")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(patterns: &[&str]) -> Vec<DomainRule> {
        patterns
            .iter()
            .enumerate()
            .map(|(i, p)| DomainRule {
                pattern: validate_pattern(p).unwrap(),
                rule: format!("t:network.allow_domains[{i}]"),
            })
            .collect()
    }

    #[test]
    fn exact_wildcard_and_ports() {
        let r = rules(&[
            "pypi.org",
            "*.pythonhosted.org",
            "git.example:2222",
            "any.example:*",
        ]);
        assert!(matching(&r, "pypi.org", Some(443)).is_some());
        assert!(matching(&r, "PyPI.org.", Some(80)).is_some());
        assert!(matching(&r, "pypi.org", Some(22)).is_none());
        assert!(matching(&r, "evil-pypi.org", Some(443)).is_none());
        assert!(matching(&r, "files.pythonhosted.org", Some(443)).is_some());
        assert!(matching(&r, "pythonhosted.org", Some(443)).is_none());
        assert!(matching(&r, "xpythonhosted.org", Some(443)).is_none());
        assert!(matching(&r, "git.example", Some(2222)).is_some());
        assert!(matching(&r, "git.example", Some(443)).is_none());
        assert!(matching(&r, "any.example", Some(9)).is_some());
        assert!(matching(&r, "git.example", None).is_some());
        assert_eq!(
            matching(&r, "files.pythonhosted.org", Some(443))
                .unwrap()
                .rule,
            "t:network.allow_domains[1]"
        );
    }

    #[test]
    fn bad_patterns_say_what_was_expected() {
        for bad in [
            "",
            "exa mple.org",
            "example.org:0",
            "example.org:http",
            "10.0.0.1",
            "*.",
            "-a.org",
        ] {
            let e = validate_pattern(bad).unwrap_err();
            assert!(
                e.contains("expected") || e.contains("address"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn private_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "224.0.0.1",
        ] {
            assert!(private_kind(a.parse().unwrap()).is_some(), "{a}");
        }
        for a in ["198.51.100.7", "8.8.8.8", "2001:db8::1", "::ffff:8.8.8.8"] {
            assert!(private_kind(a.parse().unwrap()).is_none(), "{a}");
        }
    }
}
