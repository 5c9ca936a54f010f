//! A step of fixed shapes (the guided U-Net pass of a denoising step) recorded once as a CUDA
//! graph and replayed: the host then launches one graph per step instead of every kernel of it
//! (about 2,200 launches of ~15 µs each for the paper U-Net, against < 1 ms of GPU work).
//!
//! On the CPU, and in builds without the `cuda` feature, [`CapturedStep`] simply calls the step, so
//! that callers have one code path. Capture can fail (a driver without stream-ordered allocation, a
//! step that reads back to the host...): [`CapturedStep::new`] then returns the error and the
//! caller falls back to [`CapturedStep::eager`]. Why capture works with candle 0.11.1 at all, and
//! under which conditions: see the `cuda` module below.

use candle_core::{DType, Result, Shape, Tensor};

/// A step: inputs of fixed shapes → one tensor.
type StepFn<'a> = Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>;

/// A step, borrowed.
#[cfg(feature = "cuda")]
type Step<'s> = &'s dyn Fn(&[Tensor]) -> Result<Tensor>;

/// The nodes of a captured graph, by type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    pub nodes: usize,
    /// Kernel launches: what the host no longer issues one by one.
    pub kernels: usize,
    pub copies: usize,
    pub memsets: usize,
    pub allocations: usize,
    pub frees: usize,
}

/// A step replayed from a CUDA graph captured from it (or run eagerly; see the module docs).
///
/// Its inputs keep the shapes and dtypes of the example inputs it was built with. Not `Send`: on
/// CUDA, candle's device stream is the per-thread default stream, so capture, input writes and
/// replays all belong to the thread that built it.
pub struct CapturedStep<'a> {
    step: StepFn<'a>,
    signature: Vec<(Shape, DType)>,
    #[cfg(feature = "cuda")]
    graph: Option<cuda::Replay>,
}

impl<'a> CapturedStep<'a> {
    /// `step` run eagerly on every [`CapturedStep::run`]: the CPU's path, and the fallback when
    /// capture fails. `inputs`: examples of the inputs (their shapes and dtypes are kept).
    pub fn eager(step: impl Fn(&[Tensor]) -> Result<Tensor> + 'a, inputs: &[Tensor]) -> Self {
        Self {
            step: Box::new(step),
            signature: signature(inputs),
            #[cfg(feature = "cuda")]
            graph: None,
        }
    }

    /// On a CUDA device: runs `step` once on copies of `inputs` (loading its kernels, initialising
    /// cuBLAS, filling candle's caches of layouts and small constants), then records it as a graph.
    /// Elsewhere: the same as [`CapturedStep::eager`].
    ///
    /// `step` must launch the same work for the same shapes every time (no reads of tensor values
    /// on the host, no branches on them) and keep no tensor it makes beyond its return. Values it
    /// does not take as inputs (scalars, the weights it borrows) are frozen into the graph, which
    /// reads the weights' memory where it is: they must not change or move.
    pub fn new(step: impl Fn(&[Tensor]) -> Result<Tensor> + 'a, inputs: &[Tensor]) -> Result<Self> {
        let captured = Self::eager(step, inputs);
        let Some(first) = inputs.first() else {
            candle_core::bail!("a captured step needs at least one input");
        };
        if let Some(i) = inputs
            .iter()
            .position(|x| !x.device().same_device(first.device()))
        {
            candle_core::bail!(
                "a captured step's inputs must share one device: input {i} does not"
            );
        }
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(device) = first.device() {
            let graph = cuda::Replay::capture(device, captured.step.as_ref(), inputs)?;
            return Ok(Self {
                graph: Some(graph),
                ..captured
            });
        }
        Ok(captured)
    }

    /// Whether [`CapturedStep::run`] replays a CUDA graph (false: it calls the step).
    pub fn is_graph(&self) -> bool {
        self.stats().is_some()
    }

    /// The captured graph's nodes (None when the step runs eagerly).
    pub fn stats(&self) -> Option<GraphStats> {
        #[cfg(feature = "cuda")]
        if let Some(graph) = &self.graph {
            return Some(graph.stats);
        }
        None
    }

    /// The step's output for `inputs` (same shapes and dtypes as the examples). From a graph, a
    /// copy of its output buffer: the next replay overwrites the buffer, not the returned tensor.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Tensor> {
        self.check(inputs)?;
        #[cfg(feature = "cuda")]
        if let Some(graph) = &self.graph {
            return graph.run(inputs);
        }
        (self.step)(inputs)
    }

    /// Whether `inputs` have the shapes and dtypes of the examples this step was built with.
    pub fn accepts(&self, inputs: &[Tensor]) -> bool {
        self.check(inputs).is_ok()
    }

    fn check(&self, inputs: &[Tensor]) -> Result<()> {
        if inputs.len() != self.signature.len() {
            candle_core::bail!(
                "a captured step takes {} inputs, got {}",
                self.signature.len(),
                inputs.len()
            );
        }
        for (i, (x, (shape, dtype))) in inputs.iter().zip(&self.signature).enumerate() {
            if x.shape() != shape || x.dtype() != *dtype {
                candle_core::bail!(
                    "input {i} of a captured step must be {shape:?} {dtype:?} (as when it was captured), got {:?} {:?}",
                    x.shape(),
                    x.dtype()
                );
            }
        }
        Ok(())
    }
}

fn signature(inputs: &[Tensor]) -> Vec<(Shape, DType)> {
    inputs
        .iter()
        .map(|x| (x.shape().clone(), x.dtype()))
        .collect()
}

/// Device memory in MiB that CUDA graphs hold on `device` now (all graphs of the device: their
/// allocations come from a pool of their own, outside the peak that `cxrgen bench` reports).
/// None off CUDA.
pub fn graph_memory_mib(device: &candle_core::Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(device) = device {
        return cuda::reserved_graph_memory(device).map(|bytes| bytes as f64 / (1024.0 * 1024.0));
    }
    let _ = device;
    None
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Why capture works with candle 0.11.1 / cudarc 0.19:
    //! - candle allocates with `cuMemAllocAsync` and frees with `cuMemFreeAsync` on the device's
    //!   stream when the device has memory pools: in a capture these become alloc and free nodes, so
    //!   everything the step makes and drops inside the capture is allocated by the graph itself.
    //! - Kernels on strided layouts (and all reductions) upload their dims and strides from the
    //!   host at every launch, and `Tensor::from_vec` uploads its data; a captured host copy would
    //!   read freed memory at replay. Under `enable_cuda_graph_htod_cache` candle serves both from
    //!   device-side caches, filled by the warm-up run, and refuses (an error, not a bad graph) what
    //!   the warm-up did not see.
    //! - cudarc records and waits on events only when a context has several streams; candle's
    //!   `Device::new_cuda` has one (the per-thread default stream), so capture records no event.
    //! - Errors in drops (a failed free) are only stored in the context: checked after capture.
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaContext, CudaGraph, DriverError};
    use candle_core::{CudaDevice, Result, Tensor};

    use super::{GraphStats, Step};

    /// A CUDA driver error as a candle error that says what was being done.
    fn driver(what: &str, e: DriverError) -> candle_core::Error {
        candle_core::Error::Msg(format!("CUDA graph: {what} failed: {e}"))
    }

    /// Errors candle could only store in the context (frees and event records in drops).
    fn deferred_errors(ctx: &CudaContext, when: &str) -> Result<()> {
        ctx.check_err().map_err(|e| driver(when, e))
    }

    /// A captured graph with the buffers it reads its inputs from and writes its output to.
    /// Field order is drop order: the graph goes before the buffers it uses.
    pub(super) struct Replay {
        graph: CudaGraph,
        inputs: Vec<Tensor>,
        output: Tensor,
        pub(super) stats: GraphStats,
    }

    impl Replay {
        pub(super) fn capture(device: &CudaDevice, step: Step, inputs: &[Tensor]) -> Result<Self> {
            let stream = device.cuda_stream();
            let ctx = stream.context();
            if !ctx.has_async_alloc() {
                candle_core::bail!("CUDA graph: this device has no stream-ordered allocator (memory pools), so candle's allocations cannot be recorded in a graph");
            }
            if ctx.is_managing_stream_synchronization() {
                candle_core::bail!("CUDA graph: this device's context has several streams with event tracking (waits on events recorded outside a capture cannot be captured); use Device::new_cuda");
            }
            deferred_errors(ctx, "an earlier CUDA call (before capture)")?;
            // The addresses the graph reads its inputs from: private, contiguous, untracked.
            let inputs = inputs
                .iter()
                .map(|x| x.detach().contiguous()?.copy())
                .collect::<Result<Vec<_>>>()?;
            let _cache = device.enable_cuda_graph_htod_cache();
            let output = step(&inputs)?.detach().zeros_like()?;
            stream
                .synchronize()
                .map_err(|e| driver("the warm-up run", e))?;
            deferred_errors(ctx, "the warm-up run")?;

            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|e| driver("beginning the capture", e))?;
            let recorded = record(step, &inputs, &output);
            // Always end the capture, also after an error, or the stream stays in capture mode.
            let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            let deferred = deferred_errors(ctx, "an operation during capture");
            // The step's own error first: it names the operation that could not be captured.
            recorded?;
            let graph = ended
                .map_err(|e| driver("ending the capture", e))?
                .ok_or_else(|| {
                    candle_core::Error::Msg("CUDA graph: the capture is empty".into())
                })?;
            deferred?;
            let stats = node_stats(&graph)?;
            if stats.allocations != stats.frees {
                candle_core::bail!(
                    "CUDA graph: the step allocates {} times and frees {} times inside the capture; a tensor it keeps beyond its return (or frees from outside) would be freed or reused under candle's feet",
                    stats.allocations,
                    stats.frees
                );
            }
            graph
                .upload()
                .map_err(|e| driver("uploading the graph", e))?;
            Ok(Self {
                graph,
                inputs,
                output,
                stats,
            })
        }

        /// Writes `inputs` into the graph's input buffers, replays it, copies its output out.
        pub(super) fn run(&self, inputs: &[Tensor]) -> Result<Tensor> {
            for (buffer, x) in self.inputs.iter().zip(inputs) {
                write(buffer, x)?;
            }
            self.graph
                .launch()
                .map_err(|e| driver("launching the graph", e))?;
            self.output.copy()
        }
    }

    /// The step on the input buffers, its result copied into `output`. Everything the step made is
    /// dropped on return, inside the capture, so that the graph frees what it allocates.
    fn record(step: Step, inputs: &[Tensor], output: &Tensor) -> Result<()> {
        let y = step(inputs)?;
        if y.shape() != output.shape() || y.dtype() != output.dtype() {
            candle_core::bail!(
                "CUDA graph: the step returned {:?} {:?} while capturing but {:?} {:?} in its warm-up run",
                y.shape(),
                y.dtype(),
                output.shape(),
                output.dtype()
            );
        }
        write(output, &y)
    }

    /// Copies `x` into `buffer` in place (same shape and dtype), one kernel on the device's stream.
    fn write(buffer: &Tensor, x: &Tensor) -> Result<()> {
        // Flattened views share their storage: this also covers rank-0 tensors.
        buffer.flatten_all()?.slice_set(&x.flatten_all()?, 0, 0)
    }

    /// The graph's nodes counted by type.
    fn node_stats(graph: &CudaGraph) -> Result<GraphStats> {
        use sys::CUgraphNodeType as T;
        let query = |e| driver("listing the graph's nodes", e);
        let mut n = 0usize;
        // SAFETY: a live graph; a null array asks for the count only.
        unsafe { sys::cuGraphGetNodes(graph.cu_graph(), std::ptr::null_mut(), &mut n) }
            .result()
            .map_err(query)?;
        let mut nodes = vec![std::ptr::null_mut(); n];
        // SAFETY: `nodes` has room for the `n` nodes just counted.
        unsafe { sys::cuGraphGetNodes(graph.cu_graph(), nodes.as_mut_ptr(), &mut n) }
            .result()
            .map_err(query)?;
        let mut stats = GraphStats {
            nodes: n,
            ..GraphStats::default()
        };
        for node in &nodes[..n] {
            let mut kind = T::CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: a node of the live graph and an out-pointer for its type.
            unsafe { sys::cuGraphNodeGetType(*node, &mut kind) }
                .result()
                .map_err(query)?;
            match kind {
                T::CU_GRAPH_NODE_TYPE_KERNEL => stats.kernels += 1,
                T::CU_GRAPH_NODE_TYPE_MEMCPY => stats.copies += 1,
                T::CU_GRAPH_NODE_TYPE_MEMSET => stats.memsets += 1,
                T::CU_GRAPH_NODE_TYPE_MEM_ALLOC => stats.allocations += 1,
                T::CU_GRAPH_NODE_TYPE_MEM_FREE => stats.frees += 1,
                _ => {}
            }
        }
        Ok(stats)
    }

    /// Bytes the device's graph memory pool holds now.
    pub(super) fn reserved_graph_memory(device: &CudaDevice) -> Option<u64> {
        let stream = device.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().ok()?;
        let mut bytes: u64 = 0;
        // SAFETY: a device of a live context; the attribute is a cuuint64_t written into `bytes`.
        let rc = unsafe {
            sys::cuDeviceGetGraphMemAttribute(
                ctx.cu_device(),
                sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT,
                &mut bytes as *mut u64 as *mut std::ffi::c_void,
            )
        };
        (rc == sys::CUresult::CUDA_SUCCESS).then_some(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A step with two inputs, a reduction and a strided op (what needs candle's caches on CUDA).
    fn step(inputs: &[Tensor]) -> Result<Tensor> {
        let (x, s) = (&inputs[0], &inputs[1]);
        x.t()?.contiguous()?.broadcast_mul(s)?.sum_keepdim(0)?.exp()
    }

    #[test]
    fn the_cpu_path_is_the_step_itself() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 4), &dev)?;
        let s = Tensor::randn(0f32, 1., (1, 3), &dev)?;
        let captured = CapturedStep::new(step, &[x.clone(), s.clone()])?;
        assert!(!captured.is_graph());
        assert_eq!(captured.stats(), None);
        assert_eq!(graph_memory_mib(&dev), None);
        // Several inputs in a row, each equal to the step's own output.
        for _ in 0..3 {
            let x = Tensor::randn(0f32, 1., (3, 4), &dev)?;
            let s = Tensor::randn(0f32, 1., (1, 3), &dev)?;
            let got = captured.run(&[x.clone(), s.clone()])?;
            let want = step(&[x, s])?;
            assert_eq!(got.dims(), want.dims());
            assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        }
        Ok(())
    }

    #[test]
    fn inputs_must_keep_their_shapes_on_every_device() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((3, 4), DType::F32, &dev)?;
        let s = Tensor::zeros((1, 3), DType::F32, &dev)?;
        let captured = CapturedStep::eager(step, &[x.clone(), s.clone()]);
        assert!(captured.accepts(&[x.clone(), s.clone()]));
        assert!(!captured.accepts(std::slice::from_ref(&x)));
        let e = captured
            .run(std::slice::from_ref(&x))
            .unwrap_err()
            .to_string();
        assert!(e.contains("takes 2 inputs, got 1"), "{e}");
        let wider = Tensor::zeros((3, 5), DType::F32, &dev)?;
        assert!(!captured.accepts(&[wider.clone(), s.clone()]));
        let e = captured.run(&[wider, s.clone()]).unwrap_err().to_string();
        assert!(e.contains("input 0") && e.contains("[3, 5]"), "{e}");
        let e = captured
            .run(&[x, s.to_dtype(DType::F64)?])
            .unwrap_err()
            .to_string();
        assert!(e.contains("input 1") && e.contains("F64"), "{e}");
        let e = CapturedStep::new(step, &[]).err().unwrap().to_string();
        assert!(e.contains("at least one input"), "{e}");
        Ok(())
    }
}
