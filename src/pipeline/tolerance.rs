//! The one tolerance of a run: how far the selection metric may fall below the *original*
//! model's, whatever stage is running.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An allowed metric drop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxDrop {
    /// In metric points (1.0 = 0.01 of a metric in [0, 1]).
    Points(f64),
    /// A fraction of the baseline metric (`2%` is 0.02).
    Relative(f64),
}

impl MaxDrop {
    /// Parses `1.0` (points) or `2%` (relative).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (number, relative) = match s.trim().strip_suffix('%') {
            Some(n) => (n, true),
            None => (s, false),
        };
        let v: f64 = number.trim().parse().map_err(|_| {
            format!("`{s}` is not a number (use e.g. 1.0 for one point, or 2% for relative)")
        })?;
        Self::checked(v, relative).ok_or_else(|| format!("`{s}` must be a non-negative number"))
    }

    fn checked(v: f64, relative: bool) -> Option<Self> {
        (v.is_finite() && v >= 0.0).then_some(if relative {
            MaxDrop::Relative(v / 100.0)
        } else {
            MaxDrop::Points(v)
        })
    }

    /// The allowed drop in points for a split where the original scores `baseline`.
    pub fn points_at(self, baseline: f64) -> f64 {
        (baseline - self.floor(baseline)) * 100.0
    }

    /// The lowest acceptable metric given the original model's `baseline`.
    pub fn floor(self, baseline: f64) -> f64 {
        match self {
            MaxDrop::Points(p) => baseline - p / 100.0,
            MaxDrop::Relative(r) => baseline * (1.0 - r),
        }
    }
}

impl std::fmt::Display for MaxDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaxDrop::Points(p) => write!(f, "{p}"),
            MaxDrop::Relative(r) => write!(f, "{}%", r * 100.0),
        }
    }
}

impl Serialize for MaxDrop {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MaxDrop::Points(p) => s.serialize_f64(*p),
            MaxDrop::Relative(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for MaxDrop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        let parsed = match Raw::deserialize(d)? {
            Raw::Number(v) => Self::checked(v, false)
                .ok_or_else(|| format!("`{v}` must be a non-negative number")),
            Raw::Text(s) => Self::parse(&s),
        };
        parsed.map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_and_percent() {
        assert_eq!(MaxDrop::parse("1.0"), Ok(MaxDrop::Points(1.0)));
        assert_eq!(MaxDrop::parse("2%"), Ok(MaxDrop::Relative(0.02)));
        assert!(MaxDrop::parse("-1").is_err());
        assert!(MaxDrop::parse("abc").is_err());
        assert!((MaxDrop::Points(1.0).floor(0.9) - 0.89).abs() < 1e-12);
        assert!((MaxDrop::Relative(0.1).floor(0.9) - 0.81).abs() < 1e-12);
        assert_eq!(
            serde_json::to_string(&MaxDrop::Relative(0.02)).unwrap(),
            "\"2%\""
        );
        let d: MaxDrop = serde_json::from_str("1").unwrap();
        assert_eq!(d, MaxDrop::Points(1.0));
    }
}
