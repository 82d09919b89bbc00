//! Branch-free f32 math the compiler vectorises, for the inference kernels.

/// `e^y` for `y ≤ 0` (larger inputs are not needed here), relative error ≈ 1e-7; NaN stays NaN.
#[inline(always)]
pub fn exp_nonpositive(y: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Below −87, e^y is under f32's smallest normal; −87 keeps 2^n a normal number.
    let y = if y < -87.0 { -87.0 } else { y };
    let n = (y * std::f32::consts::LOG2_E + 0.5).floor();
    let r = y - n * LN2_HI - n * LN2_LO;
    // Taylor series to r^7: |r| ≤ ln2/2 leaves a truncation error below 5e-9.
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulps_of_std_and_keeps_nan() {
        let mut y = -87.0f32;
        while y <= 0.0 {
            let (ours, std) = (exp_nonpositive(y), y.exp());
            assert!(
                (ours - std).abs() <= 2.0 * f32::EPSILON * std,
                "exp({y}) = {ours}, not {std}"
            );
            y += 1.0 / 1024.0;
        }
        assert!(exp_nonpositive(f32::NAN).is_nan());
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }
}
