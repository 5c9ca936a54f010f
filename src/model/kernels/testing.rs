//! For tests of ops against their definitions: an op's output and gradients, and how far apart
//! two sets of them are.

use candle_core::{DType, Result, Tensor, Var};

/// `f`'s output and the gradients of Σ output ⊙ `r` with respect to each input, all in F64.
pub fn outputs_and_gradients(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[&Tensor],
    r: &Tensor,
) -> Result<Vec<Tensor>> {
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(t))
        .collect::<Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors)?.to_dtype(DType::F64)?;
    let grads = (&y * r.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
    let mut all = vec![y];
    for v in &vars {
        let g = grads
            .get(v.as_tensor())
            .ok_or_else(|| candle_core::Error::Msg("an input without a gradient".into()))?;
        all.push(g.to_dtype(DType::F64)?);
    }
    Ok(all)
}

/// For each pair: the largest difference relative to the largest entry of `want`.
pub fn relative_errors(got: &[Tensor], want: &[Tensor]) -> Result<Vec<f64>> {
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            let (g, w) = (g.to_dtype(DType::F64)?, w.to_dtype(DType::F64)?);
            let d = (&g - &w)?.abs()?.max_all()?.to_scalar::<f64>()?;
            Ok(d / w
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?
                .max(f64::MIN_POSITIVE))
        })
        .collect()
}

/// The largest of [`relative_errors`].
pub fn worst_relative(got: &[Tensor], want: &[Tensor]) -> Result<f64> {
    Ok(relative_errors(got, want)?.into_iter().fold(0.0, f64::max))
}

/// `fused` computed on `inputs` rounded to `dtype`, against `reference` computed in F32 on the
/// same rounded inputs (so that only the fused op's own rounding counts): the fused op's output
/// and gradients ([`outputs_and_gradients`] with `r`), and the relative error of each.
pub fn against_reference(
    dtype: DType,
    fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[&Tensor],
    r: &Tensor,
) -> Result<(Vec<Tensor>, Vec<f64>)> {
    let rounded = inputs
        .iter()
        .map(|t| t.to_dtype(dtype))
        .collect::<Result<Vec<_>>>()?;
    let up = rounded
        .iter()
        .map(|t| t.to_dtype(DType::F32))
        .collect::<Result<Vec<_>>>()?;
    let got = outputs_and_gradients(fused, &rounded.iter().collect::<Vec<_>>(), r)?;
    let want = outputs_and_gradients(reference, &up.iter().collect::<Vec<_>>(), r)?;
    let errors = relative_errors(&got, &want)?;
    Ok((got, errors))
}
