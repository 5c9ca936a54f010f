//! Counting tensor operations: how many tensors a piece of code materialises, on any device.
//!
//! What is counted: every tensor storage candle creates. candle wraps each new storage in an
//! `Arc<parking_lot::RwLock<Storage>>` (`candle_core::Tensor::from_storage`, used by every op that writes a
//! fresh buffer: arithmetic, reductions, casts, copies that make a tensor contiguous, matrix
//! products, custom ops); views (reshape, transpose, narrow, broadcast) share their input's
//! storage and create none. On CUDA such an op is one kernel launch (or one cuBLAS call or
//! device copy), views launch nothing, so the count is the number of launches up to the few ops
//! that launch more than one kernel per output (a convolution's im2col and matrix product count
//! once). It is measured on the CPU as well as on CUDA, so progress shows on any machine.
//!
//! How: [`CountingAllocator`], installed as the global allocator by `main.rs`, counts while
//! [`count`] runs the allocations whose size and alignment are those of such an `Arc`. Other
//! allocations of exactly that layout are rare (a tensor's own buffer never matches: f32/f16/u8
//! buffers are less aligned); [`count`] checks that the allocator is installed and `tests`
//! check the count of a known sequence of ops. Only the thread that calls [`count`] is counted:
//! candle wraps an op's storage on the thread that called the op (its CPU kernels' worker
//! threads compute buffers, not tensors), and other threads' tensors (another test running in
//! parallel) are not the code's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use parking_lot::RwLock;

use candle_core::{CpuStorage, Storage};

/// std's `ArcInner`: the two reference counts, then the value.
#[repr(C)]
struct ArcInner<T> {
    strong: AtomicUsize,
    weak: AtomicUsize,
    value: T,
}

/// The allocation behind each new tensor storage.
const STORAGE_ARC: Layout = Layout::new::<ArcInner<RwLock<Storage>>>();

thread_local! {
    /// Whether this thread is inside [`count`], and the storages it has created there. Constant
    /// initialisers without destructors: reading them allocates nothing.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static STORAGES: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, counting new tensor storages while [`count`] runs.
pub struct CountingAllocator;

impl CountingAllocator {
    fn note(layout: Layout) {
        // try_with: a thread being torn down may still free and allocate.
        if layout == STORAGE_ARC && COUNTING.try_with(Cell::get).unwrap_or(false) {
            let _ = STORAGES.try_with(|n| n.set(n.get() + 1));
        }
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::note(layout);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::note(layout);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// `f`'s result and the number of tensor storages it created (≈ kernel launches on CUDA); None
/// when [`CountingAllocator`] is not the global allocator (a binary other than `cxrgen`).
pub fn count<T, E>(f: impl FnOnce() -> Result<T, E>) -> Result<(T, Option<usize>), E> {
    STORAGES.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    // A probe of the counted layout: counted once exactly when the allocator is installed.
    drop(std::hint::black_box(Arc::new(RwLock::new(Storage::Cpu(
        CpuStorage::U8(Vec::new()),
    )))));
    let out = f();
    COUNTING.with(|c| c.set(false));
    let counted = STORAGES.with(Cell::get);
    Ok((out?, counted.checked_sub(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[global_allocator]
    static ALLOCATOR: CountingAllocator = CountingAllocator;

    #[test]
    fn counts_ops_that_write_a_tensor_and_not_views() -> candle_core::Result<()> {
        let a = Tensor::arange(0f32, 24., &Device::Cpu)?.reshape((2, 3, 4))?;
        let b = Tensor::ones((2, 3, 4), candle_core::DType::F32, &Device::Cpu)?;
        // add, exp, a contiguous copy of the transpose, sum: four tensors; transpose, narrow
        // (of the first dimension) and reshape are views.
        let (_, n) = count(|| {
            (&a + &b)?
                .exp()?
                .transpose(1, 2)?
                .contiguous()?
                .narrow(0, 0, 1)?
                .reshape((4, 3))?
                .sum_keepdim(1)
        })?;
        assert_eq!(n, Some(4));
        // Reshaping a narrow of an inner dimension needs a copy: one more.
        let (_, n) = count(|| a.narrow(1, 0, 2)?.reshape((2, 8))?.exp())?;
        assert_eq!(n, Some(2));
        let (_, none) = count(|| a.reshape((6, 4))?.t())?;
        assert_eq!(none, Some(0));
        Ok(())
    }
}
