//! Each fused op on a device against the same op on the CPU, forward and backward, in F32 and
//! F16, on random inputs of the paper networks' sizes and odd ones: `cxrgen check-device` shows
//! the rows, so that one GPU run proves the CUDA kernels.

use candle_core::{DType, Device, Result, Tensor, Var};

use super::{attention, bias, geglu, norm};
use crate::model::attention::padding_bias;
use crate::rng::Rng;

/// One comparison: what the CPU computed, what the device computed, and the largest relative
/// L2 difference ‖tested − reference‖ / ‖reference‖ accepted.
pub struct Comparison {
    pub name: String,
    pub reference: Tensor,
    pub tested: Tensor,
    pub tolerance: f64,
}

/// An op applied to its inputs.
type Apply = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// An op under test: its inputs (the first `tracked` get gradients and the dtype under test,
/// the others are constants) and how to apply it.
struct Case {
    name: &'static str,
    inputs: Vec<Tensor>,
    tracked: usize,
    apply: Apply,
}

fn cases() -> Result<Vec<Case>> {
    let cpu = Device::Cpu;
    let mut rng = Rng::new(31);
    let mut randn = |dims: &[usize], scale: f64, shift: f64| -> Result<Tensor> {
        (rng.randn(dims, &cpu)? * scale)? + shift
    };
    // Batch 0 attends to all 77 tokens, batch 1 to the first 20.
    let mask: Vec<f32> = (0..2 * 77)
        .map(|i| if i < 77 || i % 77 < 20 { 1.0 } else { 0.0 })
        .collect();
    let bias = padding_bias(&Tensor::from_vec(mask, (2, 77), &cpu)?)?;
    Ok(vec![
        Case {
            name: "GN+SiLU",
            // The U-Net's 96 channels in 24 groups, 16×16.
            inputs: vec![
                randn(&[2, 96, 16, 16], 2.0, 1.0)?,
                randn(&[96], 0.5, 1.0)?,
                randn(&[96], 0.5, 0.0)?,
            ],
            tracked: 3,
            apply: Box::new(|t| norm::group_norm(&t[0], &t[1], &t[2], 24, 1e-6, true)),
        },
        Case {
            name: "GN big rows",
            // The VAE's long rows: 2 channels of 64×64 per group, more elements than threads.
            inputs: vec![
                randn(&[1, 32, 64, 64], 1.0, -0.5)?,
                randn(&[32], 0.5, 1.0)?,
                randn(&[32], 0.5, 0.0)?,
            ],
            tracked: 3,
            apply: Box::new(|t| norm::group_norm(&t[0], &t[1], &t[2], 16, 1e-6, false)),
        },
        Case {
            name: "GN to tokens",
            inputs: vec![
                randn(&[2, 96, 16, 15], 2.0, 1.0)?,
                randn(&[96], 0.5, 1.0)?,
                randn(&[96], 0.5, 0.0)?,
            ],
            tracked: 3,
            apply: Box::new(|t| norm::group_norm_to_tokens(&t[0], &t[1], &t[2], 24, 1e-6)),
        },
        Case {
            name: "LayerNorm",
            inputs: vec![
                randn(&[2, 250, 192], 1.5, 0.5)?,
                randn(&[192], 0.5, 1.0)?,
                randn(&[192], 0.5, 0.0)?,
            ],
            tracked: 3,
            apply: Box::new(|t| norm::layer_norm(&t[0], &t[1], &t[2], 1e-5)),
        },
        Case {
            name: "cross-attention",
            // 8 heads of 24 over 77 padded tokens, 250 queries (not a multiple of 8).
            inputs: vec![
                randn(&[2, 250, 192], 1.0, 0.0)?,
                randn(&[2, 77, 192], 1.0, 0.0)?,
                randn(&[2, 77, 192], 1.0, 0.0)?,
                bias,
            ],
            tracked: 3,
            apply: Box::new(|t| attention::attention(&t[0], &t[1], &t[2], 8, Some(&t[3]))),
        },
        Case {
            name: "self-attention",
            // One head of 128 (the VAE's), q, k and v read in place from one [B, L, 3C] tensor.
            inputs: vec![randn(&[2, 300, 3 * 128], 1.0, 0.0)?],
            tracked: 1,
            apply: Box::new(|t| {
                let part = |i: usize| t[0].narrow(2, 128 * i, 128);
                attention::attention(&part(0)?, &part(1)?, &part(2)?, 1, None)
            }),
        },
        Case {
            name: "bias+residual",
            inputs: vec![
                randn(&[2, 96, 16, 15], 1.0, 0.0)?,
                randn(&[96], 1.0, 0.0)?,
                randn(&[2, 96, 16, 15], 1.0, 0.0)?,
            ],
            tracked: 3,
            apply: Box::new(|t| bias::add_bias_residual(&t[0], &t[1], 1, &t[2])),
        },
        Case {
            name: "tokens+bias+map",
            inputs: vec![
                randn(&[2, 16 * 15, 96], 1.0, 0.0)?,
                randn(&[96], 1.0, 0.0)?,
                randn(&[2, 96, 16, 15], 1.0, 0.0)?,
            ],
            tracked: 3,
            apply: Box::new(|t| bias::add_bias_residual_from_tokens(&t[0], &t[1], &t[2])),
        },
        Case {
            name: "GEGLU",
            inputs: vec![randn(&[2, 250, 2 * 192], 2.0, 0.0)?],
            tracked: 1,
            apply: Box::new(|t| geglu::geglu(&t[0])),
        },
    ])
}

/// The op's output and its inputs' gradients of Σ output ⊙ r (flattened, concatenated), on the
/// device of `inputs`, in F32 on the CPU.
fn evaluate(case: &Case, inputs: &[Tensor], r: &Tensor) -> Result<(Tensor, Tensor)> {
    let vars = inputs[..case.tracked]
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<Vec<_>>>()?;
    let mut all: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    all.extend(inputs[case.tracked..].iter().cloned());
    let y = (case.apply)(&all)?;
    let grads = (y.to_dtype(DType::F32)? * r.to_device(y.device())?)?
        .sum_all()?
        .backward()?;
    let cpu = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
    let gradients = vars
        .iter()
        .map(|v| {
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg(format!("{}: no gradient", case.name)))?;
            cpu(g)?.flatten_all()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((cpu(&y)?, Tensor::cat(&gradients, 0)?))
}

/// Every fused op's output and gradients on `device` against the CPU's, in F32 and F16.
pub fn comparisons(device: &Device) -> Result<Vec<Comparison>> {
    let mut out = Vec::new();
    for case in cases()? {
        // F32: the same arithmetic in another order. F16: the same F16 inputs, each result
        // rounded to F16 (gradients through F16 matrix products on both sides).
        for (dtype, fwd_tol, bwd_tol) in [(DType::F32, 1e-5, 1e-4), (DType::F16, 2e-3, 1e-2)] {
            // Untracked inputs are constants (the F32 padding bias) and keep their dtype.
            let inputs = case
                .inputs
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    if i < case.tracked {
                        t.to_dtype(dtype)
                    } else {
                        Ok(t.clone())
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            let probe = (case.apply)(&inputs)?;
            let r = Rng::new(32).randn(probe.shape(), &Device::Cpu)?;
            let (y_ref, g_ref) = evaluate(&case, &inputs, &r)?;
            let on_device = inputs
                .iter()
                .map(|t| t.to_device(device))
                .collect::<Result<Vec<_>>>()?;
            let (y_dev, g_dev) = evaluate(&case, &on_device, &r)?;
            let label = format!("{} {}", case.name, dtype.as_str());
            out.push(Comparison {
                name: label.clone(),
                reference: y_ref,
                tested: y_dev,
                tolerance: fwd_tol,
            });
            out.push(Comparison {
                name: format!("{label} grad"),
                reference: g_ref,
                tested: g_dev,
                tolerance: bwd_tol,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_agrees_with_itself_and_every_case_runs() -> Result<()> {
        let rows = comparisons(&Device::Cpu)?;
        assert_eq!(rows.len(), 9 * 2 * 2);
        for row in rows {
            let diff = (&row.tested - &row.reference)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{}", row.name);
            assert!(
                row.reference.abs()?.max_all()?.to_scalar::<f32>()? > 0.0,
                "{}",
                row.name
            );
        }
        Ok(())
    }
}
