//! `cxrgen info`: the resolved config and the parameter count of each network.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;

use crate::config::Config;
use crate::device::DeviceChoice;
use crate::io::stdout::Stdout;
use crate::model::param_counts;

pub struct Request {
    pub config: String,
    pub device: DeviceChoice,
    /// One JSON object on stdout instead of YAML and a table.
    pub json: bool,
}

pub fn run(req: &Request) -> Result<ExitCode> {
    let cfg = Config::load(&req.config)?;
    let device = crate::device::name(&crate::device::open(req.device)?);
    let counts = param_counts(&cfg)?;
    let latent = [
        cfg.vae.latent_channels,
        cfg.latent_size(),
        cfg.latent_size(),
    ];
    let mut out = Stdout::lock();
    if req.json {
        let mut obj = serde_json::to_value(&counts)?;
        obj["config"] = serde_json::to_value(&cfg)?;
        obj["latent_shape"] = serde_json::to_value(latent)?;
        obj["device"] = device.into();
        writeln!(out, "{obj}")?;
        return Ok(ExitCode::SUCCESS);
    }
    let fmt = |n: Option<usize>, why: &str| match n {
        Some(n) => format!("{n:>12}  ({:.2} M)", n as f64 / 1e6),
        None => format!("{:>12}  ({why})", "unknown"),
    };
    write!(out, "{}", serde_yaml::to_string(&cfg)?)?;
    write!(
        out,
        "\ndevice: {device}\nlatent: {}×{}×{} (channels × height × width)\nparameters:\n  vae           {}\n  unet          {}\n  text head     {}\n  text frozen   {}\n",
        latent[0],
        latent[1],
        latent[2],
        fmt(Some(counts.vae_params), ""),
        fmt(Some(counts.unet_params), ""),
        fmt(counts.text_trainable_params, "hidden size unknown: set text.hidden_size"),
        fmt(counts.text_frozen_params, "the encoder's config.json is not on this machine"),
    )?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
