//! Fused kernels: sequences of tensor ops done in one pass, each a candle custom op with a CPU
//! implementation (Rust, rayon) and a CUDA one (the `.cu` files beside this one, compiled to PTX
//! by `build.rs` when the `cuda` feature is on). Inputs in F32, F16 or BF16; arithmetic in F32.
//!
//! Each op replaces several candle ops, each of which is a kernel launch on CUDA and a pass over
//! memory on the CPU (`cxrgen bench` counts them, see [`crate::opcount`]).
//!
//! Two exceptions, CPU only: `conv_cpu`, the convolution and its gradients as blocked matrix
//! products in F32 (on CUDA, candle's convolution runs through cuBLAS already), most 3×3 ones
//! through `winograd`, and `linear_cpu`, a linear layer as one op; both add their bias inside
//! the product.

pub mod attention;
pub mod bias;
pub mod conv_cpu;
pub mod device_check;
pub mod geglu;
pub(crate) mod linear_cpu;
pub mod norm;
#[cfg(test)]
pub(crate) mod testing;
pub(crate) mod weighted;
pub(crate) mod winograd;

use candle_core::{CpuStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16};

/// A storage type the kernels read and write, converted to and from F32 for the arithmetic.
pub(crate) trait Float: WithDType {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;

    /// The elements as F32 without a copy, when they are F32.
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }

    /// F32 results in this type (no copy for F32).
    fn from_f32_vec(v: Vec<f32>) -> Vec<Self> {
        v.into_iter().map(Self::from_f32).collect()
    }
}

impl Float for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn from_f32_vec(v: Vec<f32>) -> Vec<Self> {
        v
    }
}

/// F16 and BF16 through `half`'s conversions.
macro_rules! half_float {
    ($t:ty) => {
        impl Float for $t {
            #[inline(always)]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                <$t>::from_f32(v)
            }
        }
    };
}
half_float!(f16);
half_float!(bf16);

/// Runs `f` compiled for AVX-512 (x86-64-v4) or else AVX2 and FMA when the CPU has them, else as
/// the rest of the binary is. Called through [`vectorized!`], which marks the closure
/// `#[inline(always)]`: a closure with two callers would otherwise stay one function, compiled
/// for the baseline.
///
/// A release build targets the x86-64 baseline (SSE2: four F32 lanes), so that it runs on any
/// x86-64 CPU; the kernels' element-wise loops, inlined into `f`, get sixteen or eight lanes
/// here, chosen at run time as PyTorch's CPU kernels are. The results are the same bit for bit:
/// Rust never fuses a multiply and an add on its own, and every loop's order of additions is
/// written out.
#[inline(always)]
pub(crate) fn run_vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        use std::is_x86_feature_detected as has;
        let avx2_fma = has!("avx2") && has!("fma");
        if avx2_fma && has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
            // SAFETY: this CPU has the features `avx512` is compiled for.
            return unsafe { avx512(f) };
        }
        if avx2_fma {
            // SAFETY: this CPU has the features `avx2` is compiled for.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// `vectorized!(|| body)`: the body compiled for AVX-512 or AVX2 and FMA where the CPU has them
/// ([`run_vectorized`]). Functions the body calls are sure to be inlined into it (and so compiled
/// for those features too) only if they are `#[inline(always)]`.
macro_rules! vectorized {
    ($($closure:tt)*) => {
        $crate::model::kernels::run_vectorized(#[inline(always)] $($closure)*)
    };
}
pub(crate) use vectorized;

/// Σ x over eight interleaved partial sums: independent additions the compiler vectorises (one
/// running sum waits on every addition before it).
#[inline(always)]
pub(crate) fn sum_lanes(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (acc, &v) in lanes.iter_mut().zip(chunk) {
            *acc += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Σ a·b over eight interleaved partial sums, as [`sum_lanes`].
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in ca.zip(cb) {
        for ((acc, a), b) in lanes.iter_mut().zip(a).zip(b) {
            *acc += a * b;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// A matrix operand of [`matmul`]: its first element and its (row, column) strides.
pub(crate) type Strided = (*const f32, usize, usize);

/// dst [m, n] (row stride `dst.1`, columns adjacent) = (`acc` ? dst : 0) + `scale` · lhs [m, k]
/// · rhs [k, n], with the `gemm` crate (whose kernels choose their SIMD width at run time).
///
/// # Safety
/// Every (row, column) the strides reach for these sizes lies inside the buffer its pointer
/// points into, and nothing else reads or writes `dst`'s elements while this runs.
pub(crate) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize),
    acc: bool,
    (lhs, rhs): (Strided, Strided),
    scale: f32,
    threads: gemm::Parallelism,
) {
    // SAFETY: the caller's contract, forwarded.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            1,
            dst.1 as isize,
            acc,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs.2 as isize,
            rhs.1 as isize,
            if acc { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            threads,
        )
    }
}

/// gemm's threads: rayon's pool, or none inside a rayon task of one thread.
pub(crate) fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `len` F32 values that `write` writes, every one, through the pointer to the first it is
/// handed: an output that products overwrite (`acc` false) needs no zeroing pass first (such
/// passes were about 3 % of a CPU training micro-batch's `perf` samples).
///
/// # Safety
/// `write` writes each of the `len` elements before it returns, and reads none it has not
/// written.
pub(crate) unsafe fn overwritten(len: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v = Vec::<f32>::with_capacity(len);
    write(v.as_mut_ptr());
    // SAFETY: the capacity is len, and the caller's contract says that all of it is written.
    unsafe { v.set_len(len) };
    v
}

/// [`matmul`] with gemm's threads (rayon's) and no scale: `dst` [m, n] with row stride `dst_rs`.
///
/// # Safety
/// As [`matmul`]'s.
pub(crate) unsafe fn matmul_par(
    dims: (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    acc: bool,
    lhs: Strided,
    rhs: Strided,
) {
    // SAFETY: the caller's contract, forwarded.
    unsafe { matmul(dims, (dst, dst_rs), acc, (lhs, rhs), 1.0, parallelism()) }
}

/// Whether every tensor is on the CPU in F32: where the CPU-only kernels (the convolution and
/// the linear layer as blocked products, their biases inside) run.
pub(crate) fn on_cpu_f32(tensors: &[&candle_core::Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// e^x to about one unit in the last place (Cephes' `expf`: x = n·ln 2 + r, a degree-6
/// polynomial for e^r, 2^n from the exponent bits), 0 below −87.33 and for −∞. Written without
/// branches or library calls so that loops over slices of it vectorise: the softmax and SiLU
/// passes spent most of their time in libm's scalar `expf`.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n · LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    // e^−87.33 is just above the smallest normal number.
    let tiny = x < -87.33;
    let x = x.clamp(-87.33, 88.7);
    // t = 1.5 · 2^23 + n exactly, so n is also in t's low mantissa bits.
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = p * r * r + r + 1.0;
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    // Near and below the smallest normal number the result is flushed to 0.
    if tiny {
        0.0
    } else {
        e_r * scale
    }
}

/// erf(x) to 6e-7 (Abramowitz and Stegun 7.1.26, as PyTorch's vectorised CPU erf: 1.5e-7, plus
/// F32 rounding): 1 − (a₁t + … + a₅t⁵)·e^(−x²) with t = 1/(1 + p|x|), and x's sign. Without
/// branches or library calls, so that loops over it vectorise (libm's `erff` is a scalar call).
#[inline(always)]
pub(crate) fn fast_erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
    (1.0 - poly * fast_exp(-a * a)).copysign(x)
}

/// Calls `$f::<T>($args)` with `T` the Rust type of `$dtype` (F32, F16 or BF16), or fails
/// naming `$op`.
macro_rules! float_dispatch {
    ($dtype:expr, $op:expr, $f:ident($($args:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($args),*),
            candle_core::DType::F16 => $f::<half::f16>($($args),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($args),*),
            other => candle_core::bail!("{}: F32, F16 or BF16 input expected, not {other:?}", $op),
        }
    };
}
pub(crate) use float_dispatch;

/// The elements of a contiguous CPU tensor.
pub(crate) fn cpu_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input is not contiguous")))?;
    Ok(&storage.as_slice::<T>()?[start..end])
}

/// Fails unless every tensor has `dtype`, naming `op`.
pub(crate) fn same_dtype(op: &str, dtype: DType, others: &[DType]) -> Result<()> {
    match others.iter().find(|d| **d != dtype) {
        Some(d) => {
            candle_core::bail!("{op}: inputs of one dtype expected, got {dtype:?} and {d:?}")
        }
        None => Ok(()),
    }
}

/// Launching our PTX kernels through candle's CUDA device.
#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig};
    use candle_core::cuda::{CudaDType, CudaDevice};
    use candle_core::{CudaStorage, DType, Layout, Result, WithDType};

    /// One compiled `.cu` file.
    pub struct Module {
        pub name: &'static str,
        pub ptx: &'static str,
    }

    pub const NORM: Module = Module {
        name: "cxrgen_norm",
        ptx: include_str!(concat!(env!("OUT_DIR"), "/norm.ptx")),
    };
    pub const ATTENTION: Module = Module {
        name: "cxrgen_attention",
        ptx: include_str!(concat!(env!("OUT_DIR"), "/attention.ptx")),
    };
    pub const BIAS: Module = Module {
        name: "cxrgen_bias",
        ptx: include_str!(concat!(env!("OUT_DIR"), "/bias.ptx")),
    };
    pub const GEGLU: Module = Module {
        name: "cxrgen_geglu",
        ptx: include_str!(concat!(env!("OUT_DIR"), "/geglu.ptx")),
    };

    /// A storage type of the kernels on CUDA: a [`super::Float`] with a device representation.
    pub trait CudaFloat: super::Float + CudaDType + DeviceRepr {}
    impl<T: super::Float + CudaDType + DeviceRepr> CudaFloat for T {}

    /// `{kernel}_{f32|f16|bf16}`: the name of the kernel's instance for `dtype`.
    pub fn kernel_name(kernel: &str, dtype: DType) -> Result<String> {
        let suffix = match dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            other => candle_core::bail!("{kernel}: no kernel for {other:?}"),
        };
        Ok(format!("{kernel}_{suffix}"))
    }

    /// Launches kernel `$kernel` (for `$dtype`) of module `$module` on `$dev`'s stream with
    /// launch configuration `$cfg` and the arguments, each given as a reference (device views
    /// and slices, or scalars bound to locals) in the order of the kernel's parameters.
    macro_rules! launch {
        ($dev:expr, $module:expr, $kernel:expr, $dtype:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
            use candle_core::cuda::cudarc::driver::PushKernelArg as _;
            use candle_core::cuda::WrapErr as _;
            let module: &$crate::model::kernels::cuda::Module = $module;
            let name = $crate::model::kernels::cuda::kernel_name($kernel, $dtype)?;
            let func = $dev.get_or_load_custom_func(&name, module.name, module.ptx)?;
            let mut builder = func.builder();
            $(builder.arg($arg);)*
            // SAFETY: the arguments match the kernel's parameters in number, order and type, and
            // every buffer holds the elements the launch configuration lets the kernel touch.
            unsafe { builder.launch($cfg) }.w()?;
        }};
    }
    pub(crate) use launch;

    /// The elements of a contiguous CUDA tensor.
    pub fn view<'a, T: CudaDType + WithDType>(
        storage: &'a CudaStorage,
        layout: &Layout,
        op: &str,
    ) -> Result<CudaView<'a, T>> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input is not contiguous")))?;
        Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
    }

    /// A fresh buffer of `len` elements, every one of which the kernel about to be launched
    /// writes.
    pub fn output<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the caller's kernel writes every element before anything reads it.
        unsafe { dev.alloc::<T>(len) }
    }

    /// `blocks` blocks of `threads` threads.
    pub fn blocks(blocks: usize, threads: u32) -> Result<LaunchConfig> {
        let blocks = u32::try_from(blocks).map_err(|_| {
            candle_core::Error::Msg(format!("{blocks} blocks: too many for one launch"))
        })?;
        Ok(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    /// A grid-stride elementwise launch over `total` elements: 256 threads per block, at most
    /// 65,535 blocks.
    pub fn elementwise(total: u64) -> Result<LaunchConfig> {
        blocks(total.div_ceil(256).clamp(1, 65_535) as usize, 256)
    }

    /// Threads per block for a row of `n` elements: a power of two from 32 to 1024.
    pub fn row_threads(n: usize) -> u32 {
        n.next_power_of_two().clamp(32, 1024) as u32
    }

    /// `n` as a kernel's u32 argument, or an error naming what it counts.
    pub fn arg_u32(n: usize, what: &str) -> Result<u32> {
        u32::try_from(n)
            .map_err(|_| candle_core::Error::Msg(format!("{what} = {n} is too large for a kernel")))
    }
}

#[cfg(test)]
mod tests {
    use super::{fast_erf, fast_exp};

    #[test]
    fn fast_erf_is_within_6e7_of_erf() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -6.0 + i as f32 * 6e-5;
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            worst = worst.max((fast_erf(x) as f64 - want).abs());
        }
        assert!(worst < 6e-7, "{worst}");
        assert_eq!(fast_erf(f32::INFINITY), 1.0);
        assert_eq!(fast_erf(f32::NEG_INFINITY), -1.0);
    }

    /// The vector copies (sixteen or eight lanes) and the baseline (four) give the same bits:
    /// SiLU and its gradient's sigmoid, as the norm kernels compute them, over a slice, inside
    /// and outside [`vectorized!`].
    #[test]
    fn vectorized_loops_give_the_same_bits() {
        let xs: Vec<f32> = (0..10_000).map(|i| -95.0 + i as f32 * 0.0191).collect();
        let mut plain = vec![0f32; xs.len()];
        for (y, &x) in plain.iter_mut().zip(&xs) {
            *y = x / (1.0 + fast_exp(-x)) + 0.5 * x * x - 3.0;
        }
        let mut wide = vec![0f32; xs.len()];
        vectorized!(|| {
            for (y, &x) in wide.iter_mut().zip(&xs) {
                *y = x / (1.0 + fast_exp(-x)) + 0.5 * x * x - 3.0;
            }
        });
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&plain), bits(&wide));
    }

    #[test]
    fn fast_exp_is_within_two_ulp_of_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -100.0 + i as f32 * 1e-3 * 0.94;
            let (got, want) = (fast_exp(x) as f64, (x as f64).exp());
            if want < 2.0 * f32::MIN_POSITIVE as f64 {
                assert!(got < 2.0 * f32::MIN_POSITIVE as f64, "{x}: {got}");
                continue;
            }
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "{worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
    }
}
