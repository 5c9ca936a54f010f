//! Where the networks run (`--device cpu|cuda|cuda:N|auto`), how much memory they took and how
//! much is left.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::Device;

use crate::config::Precision;

/// A `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 when this binary was built with CUDA and a GPU answers; the CPU otherwise.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("'{s}' is not a device: use cpu, cuda, cuda:N or auto")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Fixes candle's CPU thread count for the whole process, and makes the main thread a worker of
/// rayon's global pool. Unless `RAYON_NUM_THREADS` holds a positive count, candle 0.11.1 works
/// its count out afresh at every matrix product, reading `/proc/cpuinfo` on a machine like ours:
/// a third of a small model's CPU training step went to those reads (docs/performance.md). The
/// count set is the one candle would have found; the pool, which reads the same variable, is
/// built first so that it keeps its own size (logical CPUs, within the process's CPU set).
///
/// Every CPU kernel is a rayon parallel loop, and one started from a thread outside the pool
/// hands its work to the pool and sleeps until it is done: two thread switches per tensor
/// operation, thousands per training step. Started from a worker, the loop runs on that thread
/// and the other workers steal from it. The main thread itself joins the pool (rather than the
/// command moving to a worker) so that it keeps its stack and glibc's main arena, whose freed
/// memory [`keep_freed_memory`] keeps (a thread's own arena serves blocks above 64 MiB by mmap).
/// With one thread: training micro-batch of the paper config 1,755/1,472 → 1,323/1,284 ms,
/// guided sampling step 214/226 → 207/181 ms (docs/performance.md).
pub fn use_cpu_threads() {
    let set = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > 0);
    // An error only means that the pool exists already.
    let _ = rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global();
    if !set {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            candle_core::utils::get_num_threads().to_string(),
        );
    }
}

/// Keeps the memory that tensors free for the next ones instead of handing it back to the kernel.
/// glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB with
/// use) by a fresh `mmap` and unmaps it when freed, so each tensor operation that allocates its
/// output has the kernel map and zero new pages: a fifth of the paper config's CPU training
/// micro-batch went to that (`perf`: `clear_page_erms` and page faults; docs/performance.md).
/// Served from the heap, never trimmed, the pages are reused. The process keeps its peak
/// memory until it exits. Other C libraries are left as they are.
pub fn keep_freed_memory() {
    // SAFETY: mallopt only tunes the allocator; main calls it before any other thread starts.
    // A setting glibc refuses leaves its default, which is only slower.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Opens the device `choice` names. An explicit CUDA device that cannot be opened is an error
/// that says why; `auto` falls back to the CPU, with a note on stderr when a CUDA build finds no
/// GPU.
pub fn open(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(n) => {
            if !CUDA_BUILT {
                bail!(
                    "--device {choice}: this cxrgen was built without CUDA; build the CUDA binary \
                     with scripts/build-cuda.sh, or use --device cpu"
                );
            }
            Device::new_cuda(n).map_err(without_backtrace).with_context(|| {
                format!("--device {choice}: cannot open CUDA device {n} (is there an NVIDIA GPU with that number and a working driver?)")
            })
        }
        DeviceChoice::Auto if CUDA_BUILT => match Device::new_cuda(0) {
            Ok(d) => Ok(d),
            Err(e) => {
                eprintln!(
                    "no usable CUDA device ({}); running on the CPU",
                    without_backtrace(e)
                );
                Ok(Device::Cpu)
            }
        },
        DeviceChoice::Auto => Ok(Device::Cpu),
    }
}

/// The error itself: a user needs the driver's answer, not candle's stack trace.
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => *inner,
        other => other,
    }
}

/// The precision to compute in on `device`: `requested` when given, else `on_cuda` on CUDA and
/// F32 on the CPU. BF16 cannot run on the CPU: candle has no BF16 convolution there.
pub fn precision_on(
    device: &Device,
    requested: Option<Precision>,
    on_cuda: Precision,
) -> Result<Precision> {
    let p = requested.unwrap_or(if device.is_cuda() {
        on_cuda
    } else {
        Precision::F32
    });
    if p == Precision::Bf16 && device.is_cpu() {
        bail!("precision bf16 cannot run on the CPU (candle has no BF16 convolution there): use f32, or --device cuda");
    }
    Ok(p)
}

/// `cpu` or `cuda:N`, for logs and JSON.
pub fn name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        Device::Metal(_) => "metal".into(),
    }
}

/// Peak memory in MiB since the last [`reset_peak`]: on the CPU the process's peak resident set
/// (Linux VmHWM); on CUDA the high-water mark of memory allocated from the device's pool (what
/// `torch.cuda.max_memory_allocated` reports).
pub fn peak_memory_mib(device: &Device) -> Option<f64> {
    match device {
        Device::Cuda(_) => cuda::high_water_bytes(device).map(|b| b as f64 / (1024.0 * 1024.0)),
        _ => peak_rss_mib(),
    }
}

/// Starts a new peak-memory window at the memory in use now.
pub fn reset_peak(device: &Device) {
    match device {
        Device::Cuda(_) => cuda::reset_pool_high_water(device),
        // Linux ≥ 4.0 resets VmHWM to the current RSS on "5"; elsewhere the peak keeps counting
        // from the start of the process.
        _ => {
            let _ = std::fs::write("/proc/self/clear_refs", "5");
        }
    }
}

/// Device memory this process can still allocate, in bytes: the driver's free memory (cudarc's
/// `mem_get_info`) plus what the device's memory pool holds without using it. None on the CPU.
pub fn free_memory_bytes(device: &Device) -> Option<u64> {
    match device {
        Device::Cuda(_) => cuda::free_bytes(device),
        _ => None,
    }
}

/// `f`'s result and its peak device memory in bytes above what was in use when it started
/// (None on the CPU, where the process's peak says too little about one call).
pub fn peak_above_current<T>(
    device: &Device,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Option<u64>)> {
    if !device.is_cuda() {
        return Ok((f()?, None));
    }
    device.synchronize()?;
    reset_peak(device);
    let before = cuda::used_bytes(device);
    let out = f()?;
    device.synchronize()?;
    let high = cuda::high_water_bytes(device);
    Ok((out, before.zip(high).map(|(b, h)| h.saturating_sub(b))))
}

/// Peak resident memory of this process in MiB (Linux: VmHWM), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The label of [`peak_memory_mib`] in logs: `peak RSS` or `peak device memory`.
pub fn peak_memory_label(device: &Device) -> &'static str {
    match device {
        Device::Cuda(_) => "peak device memory",
        _ => "peak RSS",
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    //! candle allocates with `cuMemAllocAsync` from the device's current memory pool, whose
    //! "used memory high" attribute is the peak of live allocations.
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Device;

    fn pool(device: &Device) -> Option<sys::CUmemoryPool> {
        let Device::Cuda(d) = device else { return None };
        let stream = d.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().ok()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: a valid device handle from a live context and an out-pointer for the pool.
        let rc = unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) };
        (rc == sys::CUresult::CUDA_SUCCESS).then_some(pool)
    }

    /// A byte count of the pool (the attribute's type is cuuint64_t).
    fn attribute(device: &Device, attr: sys::CUmemPool_attribute) -> Option<u64> {
        let pool = pool(device)?;
        let mut bytes: u64 = 0;
        // SAFETY: the byte-count attributes are cuuint64_t, written into `bytes`.
        let rc = unsafe {
            sys::cuMemPoolGetAttribute(pool, attr, &mut bytes as *mut u64 as *mut std::ffi::c_void)
        };
        (rc == sys::CUresult::CUDA_SUCCESS).then_some(bytes)
    }

    pub fn high_water_bytes(device: &Device) -> Option<u64> {
        attribute(
            device,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        )
    }

    pub fn used_bytes(device: &Device) -> Option<u64> {
        attribute(
            device,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        )
    }

    pub fn free_bytes(device: &Device) -> Option<u64> {
        let Device::Cuda(d) = device else { return None };
        let (free, _total) = d.cuda_stream().context().mem_get_info().ok()?;
        let reserved = attribute(
            device,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
        )?;
        Some(free as u64 + reserved.saturating_sub(used_bytes(device)?))
    }

    pub fn reset_pool_high_water(device: &Device) {
        if let Some(pool) = pool(device) {
            let mut zero: u64 = 0;
            // SAFETY: resetting the high-water mark takes a cuuint64_t zero.
            unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    &mut zero as *mut u64 as *mut std::ffi::c_void,
                );
            }
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    //! A CPU-only build never holds a CUDA device.
    use candle_core::Device;

    pub fn high_water_bytes(_: &Device) -> Option<u64> {
        None
    }

    pub fn used_bytes(_: &Device) -> Option<u64> {
        None
    }

    pub fn free_bytes(_: &Device) -> Option<u64> {
        None
    }

    pub fn reset_pool_high_water(_: &Device) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choices_parse_and_print() {
        for (s, c) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(s.parse::<DeviceChoice>(), Ok(c));
        }
        assert_eq!(DeviceChoice::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            let e = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn cpu_opens_and_reports_its_peak_memory() {
        let d = open(DeviceChoice::Cpu).unwrap();
        assert_eq!(name(&d), "cpu");
        let block = vec![1u8; 256 << 20];
        let high = peak_memory_mib(&d).unwrap();
        assert!(high > 256.0, "{high}");
        drop(std::hint::black_box(block));
        reset_peak(&d);
        let after = peak_memory_mib(&d).unwrap();
        assert!(
            after < high - 200.0,
            "peak {high} MiB → {after} MiB after a reset"
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_in_a_cpu_build_is_a_clear_error() {
        let e = open(DeviceChoice::Cuda(1)).unwrap_err().to_string();
        assert!(
            e.contains("--device cuda:1") && e.contains("built without CUDA"),
            "{e}"
        );
        assert!(matches!(open(DeviceChoice::Auto).unwrap(), Device::Cpu));
    }
}
