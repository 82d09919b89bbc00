//! A small, stable, non-cryptographic hash (FNV-1a, 64 bits) for fingerprints and run keys:
//! the same bytes give the same value on every machine and in every version.

/// FNV-1a state.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    const PRIME: u64 = 0x0100_0000_01b3;

    /// Mixes in one value (a byte, or a 32-bit word as the model fingerprint does).
    pub fn write(&mut self, value: u64) {
        self.0 = (self.0 ^ value).wrapping_mul(Self::PRIME);
    }

    /// Mixes in every byte of `bytes`.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write(u64::from(b));
        }
    }

    /// The hash as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_value() {
        let mut h = Fnv1a::default();
        h.write_bytes(b"a");
        assert_eq!(h.hex(), "af63dc4c8601ec8c");
    }
}
