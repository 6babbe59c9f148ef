//! Small TOML value types that accept more than one spelling ("512M" or 536870912,
//! "auto" or 1000, "/usr" or { path = "/usr", optional = true }) and say what they
//! expected when they get something else. Hand-written visitors instead of
//! `#[serde(untagged)]`, whose error ("did not match any variant") names nothing.

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use std::fmt;

/// A number that may be written as an integer or a float (`cpu = 1` or `cpu = 0.5`).
#[derive(Debug, Clone, Copy)]
pub struct Number(pub f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Number;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of CPUs like 0.5 or 2")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Number, E> {
                Ok(Number(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A size or duration written as a string with a unit, or as a bare integer.
#[derive(Debug, Clone)]
pub enum UnitValue {
    Int(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for UnitValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = UnitValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string with a unit like \"512M\" or \"30s\", or an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<UnitValue, E> {
                Ok(UnitValue::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<UnitValue, E> {
                Ok(UnitValue::Int(v.min(i64::MAX as u64) as i64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<UnitValue, E> {
                Ok(UnitValue::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A user or group id: "auto" or a number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IdChoice {
    #[default]
    Auto,
    Id(i64),
}

impl<'de> Deserialize<'de> for IdChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IdChoice;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"auto\" or a numeric id")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IdChoice, E> {
                Ok(IdChoice::Id(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IdChoice, E> {
                Ok(IdChoice::Id(v.min(i64::MAX as u64) as i64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IdChoice, E> {
                match v {
                    "auto" => Ok(IdChoice::Auto),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// One entry of a filesystem grant list: "/usr", or { path = "/lib64", optional = true }
/// for a path that some distributions lack.
#[derive(Debug, Clone)]
pub struct PathEntry {
    pub path: String,
    pub optional: bool,
}

impl<'de> Deserialize<'de> for PathEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PathEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an absolute path, or a table { path = \"/p\", optional = true }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PathEntry, E> {
                Ok(PathEntry {
                    path: v.to_owned(),
                    optional: false,
                })
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<PathEntry, M::Error> {
                let mut path = None;
                let mut optional = false;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "path" => path = Some(map.next_value::<String>()?),
                        "optional" => optional = map.next_value::<bool>()?,
                        other => {
                            return Err(de::Error::unknown_field(other, &["path", "optional"]));
                        }
                    }
                }
                let path = path.ok_or_else(|| de::Error::missing_field("path"))?;
                Ok(PathEntry { path, optional })
            }
        }
        d.deserialize_any(V)
    }
}
