//! Branch-free f32 math the compiler vectorises, for the element-wise kernels, and
//! [`vectorised`], which compiles a kernel for the widest vector unit the CPU has.

use super::spin_pool::for_each_chunk_mut;
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// Elements per parallel task of [`par_rows`]: large enough that the hand-off to another thread is noise.
const TASK_ELEMENTS: usize = 16384;

/// Elements per task: whole rows of `row` elements, about [`TASK_ELEMENTS`] in all.
pub fn task_len(row: usize) -> usize {
    (TASK_ELEMENTS / row.max(1)).max(1) * row.max(1)
}

/// `kernel(input rows, output rows)` over whole rows of `row` elements, in parallel tasks, each
/// run through [`vectorised`] (mark `kernel` `#[inline(always)]`).
pub fn par_rows(input: &[f32], row: usize, kernel: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; input.len()];
    let task = task_len(row);
    for_each_chunk_mut(&mut out, task, crate::threads::count(), |t, o| {
        let i = &input[t * task..t * task + o.len()];
        vectorised(
            #[inline(always)]
            || kernel(i, o),
        )
    });
    out
}

/// [`par_rows`] over two inputs of the same shape: `kernel(a rows, b rows, output rows)`.
pub fn par_rows2(
    a: &[f32],
    b: &[f32],
    row: usize,
    kernel: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    let task = task_len(row);
    for_each_chunk_mut(&mut out, task, crate::threads::count(), |t, o| {
        let range = t * task..t * task + o.len();
        let (a, b) = (&a[range.clone()], &b[range]);
        vectorised(
            #[inline(always)]
            || kernel(a, b, o),
        )
    });
    out
}

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
    p * pow2(n)
}

/// `2^n` for an integer-valued `n` in `-126..=127`, from the bits of `n + 127 + 2^23`, whose low
/// mantissa bits are `n + 127`: no float-to-int conversion, which the compiler would do lane by
/// lane. NaN gives 0.
#[inline(always)]
fn pow2(n: f32) -> f32 {
    f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23)
}

/// The f32 elements of a contiguous CPU tensor; `op` names the caller in the error.
pub fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let Some((from, to)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous");
    };
    Ok(&storage.as_slice::<f32>()?[from..to])
}

/// Runs `f` on the f32 elements of a contiguous CPU tensor, without copying them.
pub fn read_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("this op runs on the CPU");
    };
    Ok(f(contiguous_f32(cpu, layout, "read")?))
}

/// Runs `kernel` compiled for the widest vector unit this CPU has (AVX-512, AVX2 + FMA, or
/// portable code), so that its loops over f32 run eight or sixteen lanes at a time. Mark the
/// closure `#[inline(always)]` and keep it a call of `#[inline(always)]` functions: code that is
/// not inlined into the wrapper compiles for no vector unit at all.
#[inline(always)]
pub fn vectorised<R>(kernel: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { with_avx512(kernel) };
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { with_avx2(kernel) };
    }
    kernel()
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

/// # Safety
/// The CPU must support AVX-512 F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn with_avx512<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow2_is_exact_on_its_range() {
        for n in -126..=127 {
            assert_eq!(pow2(n as f32), 2f32.powi(n), "2^{n}");
        }
        assert_eq!(pow2(f32::NAN), 0.0);
    }

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
