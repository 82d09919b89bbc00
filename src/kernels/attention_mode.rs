//! Which attention a layer runs: dense soft attention (no entry), or an approximation that keeps
//! only some keys per query ([`ApproxAttention`]); stored per layer in the model's structure
//! (`axcompress.structure.layers[i].attention_mode` of `config.json`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// How the kept keys of a query are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum KeySelector {
    /// The K keys whose signs match the query's in the most of the head's dimensions
    /// (Nagarajan et al., v1): `d − popcount(sign(q) XOR sign(k))` on packed sign bits.
    SignMatch,
    /// The k keys with the largest true scores `q·k/√d` (AxFormer's hard attention).
    HardTopk,
}

impl KeySelector {
    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            KeySelector::SignMatch => "sign-match",
            KeySelector::HardTopk => "hard-topk",
        }
    }
}

/// How many keys a query keeps: a number, or a fraction of the unpadded sequence length
/// (rounded up, at least one). A JSON / TOML integer is a number, a float a fraction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Keep {
    /// At most this many keys.
    Count(usize),
    /// This fraction of the unpadded keys, in (0, 1].
    Fraction(f64),
}

impl Keep {
    /// Parses `4` (a number of keys) or `0.25` (a fraction: the value has a decimal point).
    pub fn parse(text: &str) -> Result<Keep, String> {
        let keep = if text.contains('.') {
            text.parse().map(Keep::Fraction).map_err(|_| ())
        } else {
            text.parse().map(Keep::Count).map_err(|_| ())
        };
        keep.ok()
            .filter(Keep::is_valid)
            .ok_or_else(|| format!("expected a number of keys ≥ 1 (e.g. 4) or a fraction in (0, 1] with a decimal point (e.g. 0.25), got `{text}`"))
    }

    /// True for a count of at least one or a fraction in (0, 1].
    pub fn is_valid(&self) -> bool {
        match *self {
            Keep::Count(k) => k >= 1,
            Keep::Fraction(f) => f > 0.0 && f <= 1.0,
        }
    }

    /// Keys kept out of `len` unpadded keys (between 1 and `len` when `len > 0`).
    pub fn keys(self, len: usize) -> usize {
        let k = match self {
            Keep::Count(k) => k,
            Keep::Fraction(f) => (f * len as f64).ceil() as usize,
        };
        k.clamp(1, len.max(1)).min(len)
    }
}

impl fmt::Display for Keep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keep::Count(k) => write!(f, "{k}"),
            Keep::Fraction(x) => write!(f, "{x:?}"),
        }
    }
}

/// An approximate attention: per query, only the keys `method` keeps (padding never) enter the
/// softmax and the weighted sum of values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproxAttention {
    /// How keys are chosen.
    pub method: KeySelector,
    /// How many.
    pub k: Keep,
}

impl fmt::Display for ApproxAttention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} k={}", self.method.name(), self.k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counts_and_fractions() {
        assert_eq!(Keep::parse("4"), Ok(Keep::Count(4)));
        assert_eq!(Keep::parse("0.25"), Ok(Keep::Fraction(0.25)));
        assert_eq!(Keep::parse("1.0"), Ok(Keep::Fraction(1.0)));
        for bad in ["0", "0.0", "1.5", "-2", "x", ""] {
            assert!(Keep::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_round_up_and_stay_in_range() {
        assert_eq!(Keep::Fraction(0.25).keys(10), 3);
        assert_eq!(Keep::Fraction(0.01).keys(10), 1);
        assert_eq!(Keep::Fraction(1.0).keys(10), 10);
        assert_eq!(Keep::Count(4).keys(3), 3);
        assert_eq!(Keep::Count(4).keys(0), 0);
    }

    #[test]
    fn json_integer_is_a_count_and_float_a_fraction() {
        let a: ApproxAttention =
            serde_json::from_str(r#"{"method": "hard-topk", "k": 4}"#).unwrap();
        assert_eq!(a.k, Keep::Count(4));
        let b: ApproxAttention =
            serde_json::from_str(r#"{"method": "sign-match", "k": 0.5}"#).unwrap();
        assert_eq!(b.k, Keep::Fraction(0.5));
        assert_eq!(b.to_string(), "sign-match k=0.5");
        assert_eq!(serde_json::to_value(a).unwrap()["k"], 4);
    }
}
