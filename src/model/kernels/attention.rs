//! Multi-head attention forward as one op: softmax(q kᵀ / √d + bias) v for every head, reading q,
//! k and v in the projections' [B, L, heads · d] layout and writing the output in it, so that no
//! head split or merge copies are made and the score matrix is never stored whole. In candle ops
//! it was four copies for the heads, a copy of kᵀ, the scaling, a matrix product, a cast, the bias
//! add, five softmax kernels, a cast and a second product.
//!
//! CUDA: one kernel with FlashAttention's online softmax (attention.cu), head widths up to
//! [`MAX_CUDA_HEAD_DIM`]; its backward pass is the chunked one of [`crate::model::attention`].
//! CPU: per batch and block of query rows, each head's scores by one matrix product (the `gemm`
//! crate on strided views; stored key-major, so that gemm reads the keys in place), bias and the
//! unnormalised softmax in place, then the product with v written straight into the output and
//! divided by each row's sum. The CPU backward pass is one op too ([`backward_f32`]): per batch
//! element, head and block of query rows it recomputes the probabilities and accumulates the
//! three gradients by matrix products, never holding more than two blocks of scores.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::{dot_lanes, fast_exp, float_dispatch, matmul, same_dtype, vectorized, Float, Strided};

/// The widest head the CUDA kernel takes (its shared memory holds tiles of 32 keys × d).
pub const MAX_CUDA_HEAD_DIM: usize = 128;

/// Score elements of one CPU task (query rows × keys), 1 MiB of F32.
const CPU_SCORES_PER_TASK: usize = 1 << 18;

/// Whether [`attention`] runs on `device` for heads of width `head_dim`.
pub fn supported(device: &candle_core::Device, head_dim: usize) -> bool {
    !device.is_cuda() || head_dim <= MAX_CUDA_HEAD_DIM
}

/// `q` [B, Lq, heads·d], `k`, `v` [B, Lk, heads·d], `bias` [B, 1, Lk] (from
/// [`crate::model::attention::padding_bias`]) → [B, Lq, heads·d] in q's dtype: each head's
/// softmax(q kᵀ / √d + bias) v, in F32.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, _, c) = q.dims3()?;
    let (kb, lk, kc) = k.dims3()?;
    if v.dims3()? != (kb, lk, kc) || kb != b || kc != c || heads == 0 || !c.is_multiple_of(heads) {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not split into {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if !supported(q.device(), c / heads) {
        candle_core::bail!(
            "attention: heads of width {} exceed the CUDA kernel's {MAX_CUDA_HEAD_DIM}",
            c / heads
        );
    }
    let bias = match bias {
        Some(t) if t.dims() == [b, 1, lk] => Some(
            t.to_dtype(candle_core::DType::F32)?
                .reshape((b, lk))?
                .contiguous()?
                .detach(),
        ),
        Some(t) => candle_core::bail!("attention: bias {:?} for {b} × {lk} keys", t.dims()),
        None => None,
    };
    // The kernels read rows with any stride, but each row's elements one after the other.
    let rows = |t: &Tensor| {
        if t.stride()[2] == 1 {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    rows(q)?.apply_op3(&rows(k)?, &rows(v)?, Attention { heads, bias })
}

struct Attention {
    heads: usize,
    /// [B, Lk] F32, contiguous.
    bias: Option<Tensor>,
}

/// A [B, L, C] input from the storage: elements from the layout's start, the strides of its
/// batch and row dimensions (elements within a row are contiguous).
struct Rows<'a, T> {
    data: &'a [T],
    batch: usize,
    row: usize,
}

impl<'a, T: candle_core::WithDType> Rows<'a, T> {
    fn of(storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let data = &storage.as_slice::<T>()?[layout.start_offset()..];
        let (batch, row) = strides(layout)?;
        Ok(Self { data, batch, row })
    }
}

impl<T> Rows<'_, T> {
    /// The same strides over other data.
    fn with<'b>(&self, data: &'b [f32]) -> Rows<'b, f32> {
        Rows::dense(data, (self.batch, self.row))
    }
}

impl<'a> Rows<'a, f32> {
    fn dense(data: &'a [f32], (batch, row): (usize, usize)) -> Self {
        Self { data, batch, row }
    }
}

/// The batch and row strides of a [B, L, C] layout, checking that a row is contiguous.
fn strides(layout: &Layout) -> Result<(usize, usize)> {
    match layout.stride() {
        [batch, row, 1] => Ok((*batch, *row)),
        s => candle_core::bail!("attention: rows of layout {s:?} are not contiguous"),
    }
}

/// Sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    d: usize,
}

impl Dims {
    fn of(heads: usize, ql: &Layout, kl: &Layout) -> Result<Self> {
        let (batch, lq, c) = ql.shape().dims3()?;
        let lk = kl.shape().dims()[1];
        Ok(Self {
            batch,
            lq,
            lk,
            heads,
            d: c / heads,
        })
    }

    fn width(&self) -> usize {
        self.heads * self.d
    }

    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

/// One block of query rows of one head: batch `b`, head `h`, rows `row0..row0 + rows`.
#[derive(Clone, Copy)]
struct Block {
    b: usize,
    h: usize,
    row0: usize,
    rows: usize,
}

impl Block {
    /// Where the block's rows of head h start in `x`, and x's (row, column) strides, checking
    /// that the `rows` rows of d values it reads lie inside x's slice.
    fn rows_of(&self, x: &Rows<f32>, n: Dims, first_row: usize, rows: usize) -> Strided {
        let start = self.b * x.batch + first_row * x.row + self.h * n.d;
        // The last row's last element is at (rows − 1) · row + d − 1 from the start.
        assert!(rows == 0 || start + (rows - 1) * x.row + n.d <= x.data.len());
        (x.data[start..].as_ptr(), x.row, 1)
    }

    /// The block's query rows of `q` [rows, d].
    fn queries(&self, q: &Rows<f32>, n: Dims) -> Strided {
        self.rows_of(q, n, self.row0, self.rows)
    }

    /// Every key row of `k` (or `v`) [lk, d].
    fn keys(&self, k: &Rows<f32>, n: Dims) -> Strided {
        self.rows_of(k, n, 0, n.lk)
    }

    /// The unnormalised softmax of the block's scores, key-major: into `pt` [lk, rows] (query row
    /// i's probabilities in column i, each still to be divided by its sum), each row's sum into
    /// `sums`; `max` [rows] is scratch.
    /// Computed as Sᵀ = K Qᵀ, which gemm turns into S = Q Kᵀ with a column-major result, so that
    /// it reads the keys in place and packs only the block's queries (a row-major [rows, lk]
    /// block had it pack every key again for each block of rows: a fifth of the VAE decode's
    /// attention). The softmax's maxima and sums run across rows of `pt`, a lane per query.
    #[inline(always)]
    fn exp_scores(
        &self,
        (q, k): (&Rows<f32>, &Rows<f32>),
        bias: Option<&[f32]>,
        n: Dims,
        (pt, sums, max): (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        let rows = self.rows;
        assert_eq!(pt.len(), rows * n.lk);
        assert!(sums.len() == rows && max.len() == rows);
        let qt = transposed(self.queries(q, n));
        // SAFETY: `queries` and `keys` checked their rows; pt holds lk × rows elements.
        unsafe {
            matmul(
                (n.lk, rows, n.d),
                (pt.as_mut_ptr(), rows),
                false,
                (self.keys(k, n), qt),
                n.scale(),
                NO_THREADS,
            )
        };
        if let Some(bias) = bias {
            for (scores, b) in pt.chunks_mut(rows).zip(bias) {
                for s in scores {
                    *s += b;
                }
            }
        }
        max.fill(f32::NEG_INFINITY);
        for scores in pt.chunks(rows) {
            for (m, &s) in max.iter_mut().zip(scores) {
                *m = m.max(s);
            }
        }
        sums.fill(0.0);
        for scores in pt.chunks_mut(rows) {
            for ((s, m), sum) in scores.iter_mut().zip(&*max).zip(sums.iter_mut()) {
                *s = fast_exp(*s - m);
                *sum += *s;
            }
        }
    }
}

/// Inside a rayon task the products run on its thread.
const NO_THREADS: gemm::Parallelism = gemm::Parallelism::None;

/// The transpose of a strided operand.
fn transposed((ptr, rs, cs): Strided) -> Strided {
    (ptr, cs, rs)
}

/// Rows per CPU task for `n.lk` keys.
fn rows_per_task(n: Dims) -> usize {
    (CPU_SCORES_PER_TASK / n.lk).clamp(1, n.lq)
}

/// The attention of F32 rows, [B, Lq, C].
fn forward_f32(
    q: Rows<f32>,
    k: Rows<f32>,
    v: Rows<f32>,
    bias: Option<&[f32]>,
    n: Dims,
) -> Vec<f32> {
    let c = n.width();
    let mut out = vec![0f32; n.batch * n.lq * c];
    if out.is_empty() || n.lk == 0 {
        return out;
    }
    let per_task = rows_per_task(n);
    out.par_chunks_mut(n.lq * c)
        .enumerate()
        .for_each(|(b, out)| {
            let bias = bias.map(|bias| &bias[b * n.lk..(b + 1) * n.lk]);
            out.par_chunks_mut(per_task * c)
                .enumerate()
                .for_each(|(task, out)| {
                    vectorized!(|| {
                        let rows = out.len() / c;
                        let mut pt = vec![0f32; n.lk * rows];
                        let (mut sums, mut max) = (vec![0f32; rows], vec![0f32; rows]);
                        for h in 0..n.heads {
                            let blk = Block {
                                b,
                                h,
                                row0: task * per_task,
                                rows,
                            };
                            let scratch = (&mut pt[..], &mut sums[..], &mut max[..]);
                            blk.exp_scores((&q, &k), bias, n, scratch);
                            // P [rows, lk] is pt read across.
                            let p = transposed((pt.as_ptr(), rows, 1));
                            // SAFETY: `keys` checked v's rows; the output block of head h is
                            // columns h·d..(h+1)·d of out's rows × c elements.
                            unsafe {
                                matmul(
                                    (rows, n.d, n.lk),
                                    (out[h * n.d..].as_mut_ptr(), c),
                                    false,
                                    (p, blk.keys(&v, n)),
                                    1.0,
                                    NO_THREADS,
                                )
                            };
                            for (row, sum) in out.chunks_mut(c).zip(&sums) {
                                let inv = 1.0 / sum;
                                for o in &mut row[h * n.d..(h + 1) * n.d] {
                                    *o *= inv;
                                }
                            }
                        }
                    })
                })
        });
    out
}

/// The gradients of F32 attention, [B, L, C] each: from the inputs, the output `o` and its
/// gradient `go`, (dq, dk, dv). One task per batch element and head; per block of query rows the
/// probabilities P are recomputed, and with dP = go vᵀ and dS = P ⊙ (dP − rowsum(go ⊙ o)):
/// dv += Pᵀ go, dq = dS k / √d, dk += dSᵀ q / √d.
fn backward_f32(
    (q, k, v): (Rows<f32>, Rows<f32>, Rows<f32>),
    (o, go): (&[f32], &[f32]),
    bias: Option<&[f32]>,
    n: Dims,
) -> [Vec<f32>; 3] {
    let c = n.width();
    let mut out = [n.lq, n.lk, n.lk].map(|len| vec![0f32; n.batch * len * c]);
    if out[0].is_empty() || n.lk == 0 {
        return out;
    }
    let per_task = rows_per_task(n);
    let go_rows = Rows::dense(go, (n.lq * c, c));
    // Each head's gradients [lq, d], [lk, d], [lk, d], then copied into their columns.
    let heads: Vec<[Vec<f32>; 3]> = (0..n.batch * n.heads)
        .into_par_iter()
        .map(|task| {
            vectorized!(|| {
                let (b, h) = (task / n.heads, task % n.heads);
                let bias = bias.map(|bias| &bias[b * n.lk..(b + 1) * n.lk]);
                let [mut dq, mut dk, mut dv] = [n.lq, n.lk, n.lk].map(|len| vec![0f32; len * n.d]);
                let mut pt = vec![0f32; per_task * n.lk];
                let mut dpt = vec![0f32; per_task * n.lk];
                let [mut sums, mut inv, mut r] = [(); 3].map(|_| vec![0f32; per_task]);
                for row0 in (0..n.lq).step_by(per_task) {
                    let rows = per_task.min(n.lq - row0);
                    let blk = Block { b, h, row0, rows };
                    let (pt, dpt) = (&mut pt[..rows * n.lk], &mut dpt[..rows * n.lk]);
                    let (sums, inv, r) = (&mut sums[..rows], &mut inv[..rows], &mut r[..rows]);
                    // P, key-major; `inv` is scratch until it holds 1 / each row's sum.
                    blk.exp_scores((&q, &k), bias, n, (&mut *pt, &mut *sums, &mut *inv));
                    for (inv, sum) in inv.iter_mut().zip(&*sums) {
                        *inv = 1.0 / sum;
                    }
                    for scores in pt.chunks_mut(rows) {
                        for (x, inv) in scores.iter_mut().zip(&*inv) {
                            *x *= inv;
                        }
                    }
                    let g = blk.queries(&go_rows, n);
                    // Pᵀ [lk, rows] is pt; its transpose P is pt read across.
                    let pt_rows = (pt.as_ptr(), rows, 1);
                    // SAFETY: `queries` and `keys` checked their rows; pt and dpt hold lk × rows
                    // elements, dk and dv lk × d.
                    unsafe {
                        let dv = (dv.as_mut_ptr(), n.d);
                        matmul((n.lk, n.d, rows), dv, true, (pt_rows, g), 1.0, NO_THREADS);
                        // dPᵀ = V goᵀ, key-major as the scores (gemm reads v in place).
                        let (dpt, v) = ((dpt.as_mut_ptr(), rows), blk.keys(&v, n));
                        matmul(
                            (n.lk, rows, n.d),
                            dpt,
                            false,
                            (v, transposed(g)),
                            1.0,
                            NO_THREADS,
                        );
                    }
                    for (i, r) in r.iter_mut().enumerate() {
                        let at = (b * n.lq + row0 + i) * c + h * n.d;
                        *r = dot_lanes(&o[at..at + n.d], &go[at..at + n.d]);
                    }
                    // dSᵀ = Pᵀ ⊙ (dPᵀ − r), in place of dPᵀ.
                    for (dp, p) in dpt.chunks_mut(rows).zip(pt.chunks(rows)) {
                        for ((dp, p), r) in dp.iter_mut().zip(p).zip(&*r) {
                            *dp = p * (*dp - r);
                        }
                    }
                    let dst = (dpt.as_ptr(), rows, 1);
                    // SAFETY: as above; dq holds lq × d elements, this block's from row0 on.
                    unsafe {
                        let dq = (dq[row0 * n.d..].as_mut_ptr(), n.d);
                        let (ds, k) = (transposed(dst), blk.keys(&k, n));
                        matmul((rows, n.d, n.lk), dq, false, (ds, k), n.scale(), NO_THREADS);
                        let (dk, q) = ((dk.as_mut_ptr(), n.d), blk.queries(&q, n));
                        matmul((n.lk, n.d, rows), dk, true, (dst, q), n.scale(), NO_THREADS);
                    }
                }
                [dq, dk, dv]
            })
        })
        .collect();
    for (which, out) in out.iter_mut().enumerate() {
        let len = if which == 0 { n.lq } else { n.lk };
        out.par_chunks_mut(c).enumerate().for_each(|(row, out)| {
            let (b, i) = (row / len, row % len);
            for (h, cols) in out.chunks_mut(n.d).enumerate() {
                cols.copy_from_slice(&heads[b * n.heads + h][which][i * n.d..(i + 1) * n.d]);
            }
        });
    }
    out
}

/// F16/BF16 rows as contiguous F32 [B, L, C].
fn widen<T: Float>(x: &Rows<T>, batch: usize, len: usize, c: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(batch * len * c);
    for b in 0..batch {
        for i in 0..len {
            let row = &x.data[b * x.batch + i * x.row..][..c];
            out.extend(row.iter().map(|v| v.to_f32()));
        }
    }
    out
}

impl Attention {
    /// `f` of the bias's storage and layout, if there is a bias.
    fn with_bias<R>(&self, f: impl FnOnce(Option<(&Storage, &Layout)>) -> Result<R>) -> Result<R> {
        match &self.bias {
            Some(t) => {
                let (storage, layout) = t.storage_and_layout();
                f(Some((&storage, layout)))
            }
            None => f(None),
        }
    }

    /// [`backward_f32`] on [q, k, v, output, output gradient] (in F32, whatever their dtype):
    /// the gradients of q, k and v in q's dtype.
    fn cpu_backward(&self, t: [&Tensor; 5]) -> Result<[Tensor; 3]> {
        let dtype = t[0].dtype();
        let f32c = |t: &Tensor| t.detach().to_dtype(candle_core::DType::F32)?.contiguous();
        let (q, k, v, o, go) = (
            f32c(t[0])?,
            f32c(t[1])?,
            f32c(t[2])?,
            f32c(t[3])?,
            f32c(t[4])?,
        );
        let n = Dims::of(self.heads, q.layout(), k.layout())?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = o.storage_and_layout();
        let (gs, gl) = go.storage_and_layout();
        let (
            Storage::Cpu(qs),
            Storage::Cpu(ks),
            Storage::Cpu(vs),
            Storage::Cpu(os),
            Storage::Cpu(gs),
        ) = (&*qs, &*ks, &*vs, &*os, &*gs)
        else {
            candle_core::bail!("attention: a gradient on another device")
        };
        let name = self.name();
        let [dq, dk, dv] = self.with_bias(|bias| {
            let bias = match bias {
                Some((Storage::Cpu(s), l)) => Some(super::cpu_slice::<f32>(s, l, name)?),
                Some(_) => candle_core::bail!("attention: the bias is on another device"),
                None => None,
            };
            Ok(backward_f32(
                (Rows::of(qs, ql)?, Rows::of(ks, kl)?, Rows::of(vs, vl)?),
                (
                    super::cpu_slice(os, ol, name)?,
                    super::cpu_slice(gs, gl, name)?,
                ),
                bias,
                n,
            ))
        })?;
        let back = |g: Vec<f32>, like: &Tensor| {
            Tensor::from_vec(g, like.shape(), like.device())?.to_dtype(dtype)
        };
        Ok([back(dq, &q)?, back(dk, &k)?, back(dv, &v)?])
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Float>(
            op: &Attention,
            (q, ql): (&CpuStorage, &Layout),
            (k, kl): (&CpuStorage, &Layout),
            (v, vl): (&CpuStorage, &Layout),
        ) -> Result<CpuStorage> {
            let n = Dims::of(op.heads, ql, kl)?;
            let (q, k, v) = (
                Rows::<T>::of(q, ql)?,
                Rows::<T>::of(k, kl)?,
                Rows::<T>::of(v, vl)?,
            );
            op.with_bias(|bias| {
                let bias = match bias {
                    Some((Storage::Cpu(s), l)) => Some(super::cpu_slice::<f32>(s, l, op.name())?),
                    Some(_) => candle_core::bail!("attention: the bias is on another device"),
                    None => None,
                };
                let out = match (T::as_f32(q.data), T::as_f32(k.data), T::as_f32(v.data)) {
                    (Some(qd), Some(kd), Some(vd)) => {
                        forward_f32(q.with(qd), k.with(kd), v.with(vd), bias, n)
                    }
                    _ => {
                        let c = n.width();
                        let (qw, kw, vw) = (
                            widen(&q, n.batch, n.lq, c),
                            widen(&k, n.batch, n.lk, c),
                            widen(&v, n.batch, n.lk, c),
                        );
                        let dense = |len: usize| (len * c, c);
                        forward_f32(
                            Rows::dense(&qw, dense(n.lq)),
                            Rows::dense(&kw, dense(n.lk)),
                            Rows::dense(&vw, dense(n.lk)),
                            bias,
                            n,
                        )
                    }
                };
                Ok(T::to_cpu_storage_owned(T::from_f32_vec(out)))
            })
        }
        same_dtype(self.name(), q.dtype(), &[k.dtype(), v.dtype()])?;
        let out = float_dispatch!(q.dtype(), self.name(), run(self, (q, ql), (k, kl), (v, vl)))?;
        Ok((out, ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self, CudaFloat};
        use candle_core::cuda::cudarc::driver::{CudaView, DevicePtr, LaunchConfig};

        /// The elements a [B, L, C] input's kernel reads: from its start to its last row's end.
        fn rows<'a, T: CudaFloat>(
            s: &'a candle_core::CudaStorage,
            l: &Layout,
        ) -> Result<(CudaView<'a, T>, u64, u64)> {
            let (batch, row) = strides(l)?;
            let (b, len, c) = l.shape().dims3()?;
            let extent = (b - 1) * batch + (len - 1) * row + c;
            let start = l.start_offset();
            Ok((
                s.as_cuda_slice::<T>()?.slice(start..start + extent),
                batch as u64,
                row as u64,
            ))
        }

        fn run<T: CudaFloat>(
            op: &Attention,
            (q, ql): (&candle_core::CudaStorage, &Layout),
            (k, kl): (&candle_core::CudaStorage, &Layout),
            (v, vl): (&candle_core::CudaStorage, &Layout),
        ) -> Result<candle_core::CudaStorage> {
            let n = Dims::of(op.heads, ql, kl)?;
            let dev = &q.device;
            let out = cuda::output::<T>(dev, ql.shape().elem_count())?;
            if n.lq == 0 || n.lk == 0 || n.batch == 0 {
                return Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()));
            }
            let (qs, q_batch, q_row) = rows::<T>(q, ql)?;
            let (ks, k_batch, k_row) = rows::<T>(k, kl)?;
            let (vs, v_batch, v_row) = rows::<T>(v, vl)?;
            let (lq, lk) = (
                cuda::arg_u32(n.lq, "queries")?,
                cuda::arg_u32(n.lk, "keys")?,
            );
            let (heads, d) = (
                cuda::arg_u32(n.heads, "heads")?,
                cuda::arg_u32(n.d, "head width")?,
            );
            let scale = n.scale();
            let heads_total = n.batch * n.heads;
            if heads_total > 65_535 {
                candle_core::bail!("attention: {heads_total} batch × heads exceed one launch");
            }
            // Must match attention.cu: ROWS warps per block, tiles of 32 keys.
            const ROWS: usize = 8;
            let cfg = LaunchConfig {
                grid_dim: (n.lq.div_ceil(ROWS) as u32, heads_total as u32, 1),
                block_dim: (32 * ROWS as u32, 1, 1),
                shared_mem_bytes: (4 * (32 * (n.d | 1) + 32 * n.d + ROWS * n.d)) as u32,
            };
            op.with_bias(|bias| {
                let bias = match bias {
                    Some((Storage::Cuda(s), l)) => Some(cuda::view::<f32>(s, l, op.name())?),
                    Some(_) => candle_core::bail!("attention: the bias is on another device"),
                    None => None,
                };
                // The kernel takes a null pointer for "no bias". `_read` records the read of the
                // bias on the stream once the launch is queued (when it is dropped).
                let stream = dev.cuda_stream();
                let (bias_ptr, _read) = match &bias {
                    Some(view) => {
                        let (ptr, read) = view.device_ptr(&stream);
                        (ptr, Some(read))
                    }
                    None => (0, None),
                };
                cuda::launch!(
                    dev,
                    &cuda::ATTENTION,
                    "attention_fwd",
                    T::DTYPE,
                    cfg,
                    [
                        &qs, &ks, &vs, &bias_ptr, &out, &lq, &lk, &heads, &d, &q_batch, &q_row,
                        &k_batch, &k_row, &v_batch, &v_row, &scale
                    ]
                );
                Ok(())
            })?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        same_dtype(self.name(), q.dtype(), &[k.dtype(), v.dtype()])?;
        let out = float_dispatch!(q.dtype(), self.name(), run(self, (q, ql), (k, kl), (v, vl)))?;
        Ok((out, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if q.device().is_cpu() {
            let [dq, dk, dv] = self.cpu_backward([q, k, v, res, grad])?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let bias = match &self.bias {
            Some(b) => Some(b.unsqueeze(1)?),
            None => None,
        };
        let (dq, dk, dv) =
            crate::model::attention::multi_head_backward(q, k, v, self.heads, bias.as_ref(), grad)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{outputs_and_gradients, worst_relative};
    use super::*;
    use crate::model::attention::padding_bias;
    use crate::rng::Rng;
    use candle_core::{DType, Device, D};

    /// Multi-head attention in candle ops, in F64.
    fn naive(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let split = |t: &Tensor| -> Result<Tensor> {
            let (b, l, c) = t.dims3()?;
            t.to_dtype(DType::F64)?
                .reshape((b, l, heads, c / heads))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(q)?, split(k)?, split(v)?);
        let d = q.dim(3)? as f64;
        let mut s = (q.matmul(&k.t()?)? / d.sqrt())?;
        if let Some(b) = bias {
            s = s.broadcast_add(&b.to_dtype(DType::F64)?.unsqueeze(1)?)?;
        }
        let o = candle_nn::ops::softmax(&s, D::Minus1)?.matmul(&v)?;
        let (b, h, l, d) = o.dims4()?;
        o.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d))
    }

    #[test]
    fn fused_attention_equals_the_composite_ops() -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = Rng::new(17);
        // (batch, queries, keys, heads, head width): odd sizes; 5,000 keys make two CPU tasks
        // (blocks of query rows), with batch 1's keys masked.
        for (b, lq, lk, heads, d) in [(2, 7, 5, 3, 5), (2, 70, 5000, 2, 8), (2, 33, 9, 1, 24)] {
            let c = heads * d;
            let q = (rng.randn((b, lq, c), &dev)? * 1.5)?;
            let k = rng.randn((b, lk, c), &dev)?;
            let v = rng.randn((b, lk, c), &dev)?;
            let r = rng.randn((b, lq, c), &dev)?;
            // Batch 0 sees every key, batch 1 only the first two.
            let mask: Vec<f32> = (0..b * lk)
                .map(|i| if i < lk || i % lk < 2 { 1.0 } else { 0.0 })
                .collect();
            let bias = padding_bias(&Tensor::from_vec(mask, (b, lk), &dev)?)?;
            for bias in [None, Some(&bias)] {
                for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 5e-3), (DType::BF16, 3e-2)] {
                    let cast = |t: &Tensor| t.to_dtype(dtype);
                    let (q, k, v) = (cast(&q)?, cast(&k)?, cast(&v)?);
                    let got = outputs_and_gradients(
                        &|t| attention(&t[0], &t[1], &t[2], heads, bias),
                        &[&q, &k, &v],
                        &r,
                    )?;
                    // Against the composite on the same rounded inputs.
                    let up = |t: &Tensor| t.to_dtype(DType::F32);
                    let want = outputs_and_gradients(
                        &|t| naive(&t[0], &t[1], &t[2], heads, bias),
                        &[&up(&q)?, &up(&k)?, &up(&v)?],
                        &r,
                    )?;
                    let err = worst_relative(&got, &want)?;
                    let case = (b, lq, lk, heads, d);
                    assert!(
                        err < tol,
                        "{case:?} {dtype:?}, bias {}: {err}",
                        bias.is_some()
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn strided_inputs_read_in_place() -> Result<()> {
        // q, k and v as column blocks of one projection [B, L, 3C], as a fused q/k/v projection
        // would give them.
        let dev = Device::Cpu;
        let (heads, c) = (2, 6);
        let qkv = Rng::new(18).randn((2, 11, 3 * c), &dev)?;
        let part = |i: usize| qkv.narrow(2, i * c, c);
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        assert!(!q.is_contiguous());
        let close = |got: Tensor, want: Tensor| -> Result<()> {
            let err = worst_relative(&[got], &[want])?;
            assert!(err < 1e-6, "{err}");
            Ok(())
        };
        close(
            attention(&q, &k, &v, heads, None)?,
            naive(&q, &k, &v, heads, None)?,
        )?;
        // Elements of a row that are not adjacent are copied first.
        let t = Rng::new(19).randn((2, c, 11), &dev)?.transpose(1, 2)?;
        close(
            attention(&t, &t, &t, heads, None)?,
            naive(&t, &t, &t, heads, None)?,
        )?;
        assert!(attention(&q, &k, &v, 4, None).is_err());
        Ok(())
    }
}
