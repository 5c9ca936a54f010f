//! CPU ops on an input, a weight and an optional bias in F32 (the convolution and the linear
//! layer): one custom op on (x, w), or on (x, w, b), around a [`Weighted`] that works on
//! slices. The wrapper reads the storages, checks they are contiguous F32, and in the backward
//! pass computes the input's and the bias's gradients only where they are tracked.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};

/// A contiguous F32 operand: its elements and its shape.
pub(crate) type Operand<'a> = (&'a [f32], &'a Shape);

/// The gradients of an op's input (when asked for), weight and bias (when it has one).
pub(crate) type Gradients = (Option<Vec<f32>>, Vec<f32>, Option<Vec<f32>>);

/// The arithmetic of an op on (x, w) or (x, w, b), on slices.
pub(crate) trait Weighted: Send + Sync {
    /// The op's names, for errors and candle's graph: without a bias and with one.
    const NAMES: [&'static str; 2];

    /// The output and its shape.
    fn forward(&self, x: Operand, w: Operand, bias: Option<Operand>) -> Result<(Vec<f32>, Shape)>;

    /// From the output gradient `gy`: the input's gradient if `want_x`, the weight's, and the
    /// bias's if `bias` (its shape) is given.
    fn backward(
        &self,
        x: Operand,
        w: Operand,
        bias: Option<&Shape>,
        gy: &[f32],
        want_x: bool,
    ) -> Result<Gradients>;
}

/// A [`Weighted`] as a candle op: `CustomOp2` on (x, w), `CustomOp3` on (x, w, b).
pub(crate) struct CpuOp<T>(pub T);

/// The contiguous F32 elements of a CPU storage, or an error naming the op and `what`.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: the {what} must be F32, not {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{op}: the {what} must be contiguous"),
    }
}

impl<T: Weighted> CpuOp<T> {
    fn run(
        &self,
        (xs, xl): (&CpuStorage, &Layout),
        (ws, wl): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let op = T::NAMES[bias.is_some() as usize];
        let bias = match bias {
            Some((bs, bl)) => Some((f32_slice(bs, bl, op, "bias")?, bl.shape())),
            None => None,
        };
        let (y, shape) = self.0.forward(
            (f32_slice(xs, xl, op, "input")?, xl.shape()),
            (f32_slice(ws, wl, op, "weight")?, wl.shape()),
            bias,
        )?;
        Ok((CpuStorage::F32(y), shape))
    }

    /// The gradients of x (if it is tracked), w and b (if there is one and it is tracked).
    fn gradients(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        let op = T::NAMES[b.is_some() as usize];
        let want_x = x.track_op();
        let want_b = b.filter(|b| b.track_op());
        let (x, w, grad) = (x.detach(), w.detach(), grad.detach().contiguous()?);
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(gs)) = (&*xs, &*ws, &*gs) else {
            bail!("{op}: a gradient on another device")
        };
        let (gx, gw, gb) = self.0.backward(
            (f32_slice(xs, xl, op, "input")?, x.shape()),
            (f32_slice(ws, wl, op, "weight")?, w.shape()),
            want_b.map(|b| b.shape()),
            f32_slice(gs, gl, op, "output gradient")?,
            want_x,
        )?;
        let dev = x.device();
        let gb = match (gb, want_b) {
            (Some(gb), Some(b)) => Some(Tensor::from_vec(gb, b.shape(), dev)?),
            _ => None,
        };
        Ok((
            gx.map(|gx| Tensor::from_vec(gx, x.shape(), dev))
                .transpose()?,
            Tensor::from_vec(gw, w.shape(), dev)?,
            gb,
        ))
    }
}

impl<T: Weighted> CustomOp2 for CpuOp<T> {
    fn name(&self) -> &'static str {
        T::NAMES[0]
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((xs, xl), (ws, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, _) = self.gradients(x, w, None, grad)?;
        Ok((gx, Some(gw)))
    }
}

impl<T: Weighted> CustomOp3 for CpuOp<T> {
    fn name(&self) -> &'static str {
        T::NAMES[1]
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((xs, xl), (ws, wl), Some((bs, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw, gb) = self.gradients(x, w, Some(b), grad)?;
        Ok((gx, Some(gw), gb))
    }
}
