//! One training round with libtorch: the serving version fine-tuned on a round's examples,
//! and the predictions of a version on the holdout.
//!
//! The base is loaded with [`tch::TrainableCModule`] into a fresh [`tch::nn::VarStore`] (its
//! parameters become the store's variables), the optimizer is built after loading (it takes
//! the variables it sees then), the module is put in training mode, and each mini-batch is one
//! step: forward, binary cross-entropy of the score (clamped to [1e-7, 1 − 1e-7]) against the
//! label, backward, step. The module is put back in evaluation mode before it is saved, so the
//! file loads in `torch.jit.load` and in sluice as a plain TorchScript module. Examples are
//! used in the order given (the caller sorts them by the time they were scored), without
//! shuffling: a round is reproducible, which is what lets a test compare it step by step with
//! PyTorch.
//!
//! Training runs on the caller's thread, which must not hold a no-grad guard (the scoring
//! threads do, and grad mode is per thread in libtorch); the trainer calls this from a
//! blocking thread of its own.

use std::{path::Path, time::Instant};

use tch::{
    nn::{self, OptimizerConfig},
    Device, Reduction, Tensor, TrainableCModule,
};

use crate::{
    config::{OptimizerSpec, TrainSpec},
    event::Example,
    score::model::{Candidate, LoadedModel, Shape},
};

/// Clamping of the score in the loss (the same as [`super::metrics`]'s log loss).
const EPSILON: f64 = 1e-7;
/// Rows per forward pass when predicting.
const PREDICT_BATCH: usize = 1024;

/// What a round of training did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Trained {
    pub examples: usize,
    pub epochs: usize,
    pub steps: usize,
    pub seconds: f64,
    /// Mean loss of the last epoch's steps.
    pub last_epoch_loss: f64,
}

fn torch(what: &str) -> impl Fn(tch::TchError) -> String + '_ {
    move |e| {
        let text = e.to_string();
        format!("{what}: {}", text.lines().next().unwrap_or_default())
    }
}

/// The features and labels of `examples` as tensors of `width` columns.
fn tensors(examples: &[&Example], width: usize) -> Result<(Tensor, Tensor), String> {
    let mut x = Vec::with_capacity(examples.len() * width);
    for e in examples {
        if e.features.len() != width {
            return Err(format!(
                "example {} has {} features, the others {width}",
                e.event_id,
                e.features.len()
            ));
        }
        x.extend(e.features.iter().map(|v| *v as f32));
    }
    let y: Vec<f32> = examples.iter().map(|e| e.label as f32).collect();
    let n = examples.len() as i64;
    let x = Tensor::from_slice(&x)
        .f_view([n, width as i64])
        .map_err(torch("features"))?;
    Ok((x, Tensor::from_slice(&y)))
}

/// Fine-tunes the TorchScript module at `base` on `examples` and saves the result to `out`.
pub fn fine_tune(
    base: &Path,
    out: &Path,
    examples: &[&Example],
    spec: &TrainSpec,
) -> Result<Trained, String> {
    let started = Instant::now();
    let width = examples
        .first()
        .ok_or("no examples to train on")?
        .features
        .len();
    let vs = nn::VarStore::new(Device::Cpu);
    let mut module = TrainableCModule::load(base, vs.root()).map_err(torch("loading the base"))?;
    if vs.trainable_variables().is_empty() {
        return Err(format!(
            "{} has no trainable parameters (a frozen or optimize_for_inference module, or \
             parameters saved without requires_grad): publish a torch.jit.script module as the \
             base",
            base.display()
        ));
    }
    let lr = spec.learning_rate;
    let mut opt = match spec.optimizer {
        OptimizerSpec::Adam => nn::Adam {
            wd: spec.weight_decay,
            ..Default::default()
        }
        .build(&vs, lr),
        OptimizerSpec::Sgd { momentum } => nn::Sgd {
            momentum,
            dampening: 0.0,
            wd: spec.weight_decay,
            nesterov: false,
        }
        .build(&vs, lr),
    }
    .map_err(torch("building the optimizer"))?;
    module.f_set_train().map_err(torch("training mode"))?;
    let mut steps = 0;
    let mut last_epoch_loss = f64::NAN;
    for _ in 0..spec.epochs {
        let (mut sum, mut batches) = (0.0, 0);
        for chunk in examples.chunks(spec.batch_size) {
            let (x, y) = tensors(chunk, width)?;
            let out = module
                .forward_ts(&[x])
                .and_then(|o| o.f_view([-1]))
                .map_err(torch("forward pass"))?;
            if out.size() != [chunk.len() as i64] {
                return Err(format!(
                    "the model returned shape {:?} for {} rows; the trainer needs one score per \
                     row",
                    out.size(),
                    chunk.len()
                ));
            }
            let loss = out
                .f_clamp(EPSILON, 1.0 - EPSILON)
                .and_then(|p| p.f_binary_cross_entropy::<Tensor>(&y, None, Reduction::Mean))
                .map_err(torch("loss"))?;
            opt.zero_grad();
            loss.f_backward().map_err(torch("backward pass"))?;
            opt.step();
            sum += loss.double_value(&[]);
            batches += 1;
            steps += 1;
        }
        last_epoch_loss = sum / f64::from(batches.max(1));
    }
    module.f_set_eval().map_err(torch("evaluation mode"))?;
    module.save(out).map_err(torch("saving the candidate"))?;
    Ok(Trained {
        examples: examples.len(),
        epochs: spec.epochs,
        steps,
        seconds: started.elapsed().as_secs_f64(),
        last_epoch_loss,
    })
}

/// The scores the version at `path` gives `examples`, loaded and warmed up as a scoring
/// pipeline would (a version that fails its warm-up fails here).
pub fn predict(path: &Path, version: &str, examples: &[&Example]) -> Result<Vec<f64>, String> {
    let width = examples.first().map_or(0, |e| e.features.len());
    let candidate = Candidate {
        path: path.to_owned(),
        version: version.to_owned(),
        stamp: crate::score::model::Stamp {
            len: 0,
            modified: None,
        },
    };
    let shape = Shape {
        features: width,
        outputs: 1,
        max_batch: PREDICT_BATCH,
    };
    let model = LoadedModel::load(candidate, Device::Cpu, shape)?;
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(PREDICT_BATCH) {
        let x: Vec<f32> = chunk
            .iter()
            .flat_map(|e| e.features.iter().map(|v| *v as f32))
            .collect();
        let y = model
            .forward(&x, chunk.len())
            .map_err(|e| format!("version {version}: {e}"))?;
        out.extend(y.into_iter().map(f64::from));
    }
    Ok(out)
}
