//! `streamiq-adapt once`: reads the labels whose embeddings came from the active
//! bundle's encoder, holds out `adapt.holdout` of them, trains, writes
//! `prompts_dir/vNNNN.safetensors` atomically with its metadata, and promotes it
//! (`prompts_dir/active`) only if the held-out SRCC did not get worse than the
//! currently active prompt set's. The daemon notices the promotion and hot-swaps.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use streamiq::config::Config;
use streamiq::score::bundle::Bundle;
use streamiq::score::prompt_store::{MODEL_SHA256_KEY, PromptDir, check_model};
use streamiq::score::prompts::PromptSet;
use tch::Tensor;

use crate::adapt::{self, Sample, TrainSettings};
use crate::clip;

/// Serialises named f32 tensors with metadata as safetensors bytes.
pub fn safetensors_bytes(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    meta: HashMap<String, String>,
) -> anyhow::Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, Some(meta))?)
}

fn to_vec(t: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(
        t.flatten(0, -1).to_kind(tch::Kind::Float),
    )?)
}

/// The prompt set the daemon scores with, which a new set must not do worse than: the
/// promoted version, or the bundle's own. A promoted version adapted for another visual
/// tower is one the daemon refuses (it scores with the bundle's own set then), so the
/// bundle's own set is the one to beat.
fn active_set(dir: &PromptDir, bundle: &Bundle, model_sha: &str) -> anyhow::Result<PromptSet> {
    let dim = bundle.manifest.embed_dim;
    let own = || PromptSet::load(&bundle.prompts_path(), dim);
    let Some(v) = dir.active()?.filter(|v| *v > 0) else {
        return Ok(own()?);
    };
    let mut set = PromptSet::load(&dir.path(v), dim)?;
    set.version = v;
    match check_model(&set, model_sha) {
        Ok(_) => Ok(set),
        Err(e) => {
            println!("{e}\nthe daemon scores with the bundle's own set: comparing with it");
            Ok(own()?)
        }
    }
}

/// Held-out labels the promotion decision rests on, at least (`adapt.holdout` of the
/// labels, but never fewer: with 20 labels at 0.2 the decision would rest on 4 points).
pub const MIN_HOLDOUT: usize = 10;

/// Training labels a round needs, at least.
pub const MIN_TRAIN: usize = 10;

/// How many of `usable` labels to hold out: `share` of them, at least [`MIN_HOLDOUT`],
/// leaving at least [`MIN_TRAIN`]; `None` when there are too few for both.
pub fn holdout_size(usable: usize, share: f64) -> Option<usize> {
    (usable >= MIN_HOLDOUT + MIN_TRAIN)
        .then(|| ((usable as f64 * share).round() as usize).clamp(MIN_HOLDOUT, usable - MIN_TRAIN))
}

/// Runs one round as configured in `config`.
pub fn run(config: &Path, lambda: Option<f64>) -> anyhow::Result<()> {
    let settings = Config::load(config)?.validate()?;
    let a = &settings.adapt;
    let lambda = lambda.unwrap_or(a.lambda);
    anyhow::ensure!(
        lambda >= 0.0 && lambda.is_finite(),
        "--lambda {lambda}: must be finite and >= 0"
    );
    let dev = crate::torch_device(a.device)?;
    // A round killed mid-write leaves its temporary file behind (never a partial
    // version: see `write_atomic`); clear those of writers that are gone.
    let prompt_dir = PromptDir::new(&settings.model.prompts_dir);
    for name in prompt_dir.remove_stale_temp_files() {
        println!("removed {name}, left by a killed writer");
    }
    let bundle = Bundle::open(&settings.model.bundle)?;
    let model_sha = bundle
        .manifest
        .files
        .get("visual.onnx")
        .context("manifest lists no visual.onnx")?
        .to_lowercase();
    if !settings.labels_db.exists() {
        println!(
            "no label store at {}: nothing to adapt",
            settings.labels_db.display()
        );
        return Ok(());
    }
    let labels = streamiq::labels::load_training_set(&settings.labels_db, &model_sha)?;
    if labels.len() < a.min_labels {
        println!(
            "{} labels for this model, adapt.min_labels = {}: not adapting (nothing written)",
            labels.len(),
            a.min_labels
        );
        return Ok(());
    }
    let dim = bundle.manifest.embed_dim;
    let mut samples: Vec<Sample> = labels
        .into_iter()
        .filter(|(e, t)| e.len() == dim && t.is_finite())
        .map(|(embedding, target)| Sample { embedding, target })
        .collect();
    let usable = samples.len();
    let Some(n_hold) = holdout_size(usable, a.holdout) else {
        println!(
            "{usable} usable labels for this model (finite target, {dim}-value embedding); a round \
             needs at least {}: {MIN_HOLDOUT} held out to decide promotion and {MIN_TRAIN} to \
             train on: not adapting (nothing written)",
            MIN_HOLDOUT + MIN_TRAIN
        );
        return Ok(());
    };
    // A seeded shuffle: the same labels give the same split.
    fastrand::Rng::with_seed(usable as u64).shuffle(&mut samples);
    let (holdout, train) = samples.split_at(n_hold);

    let parent = active_set(&prompt_dir, &bundle, &model_sha)?;
    let (e_ho, _) = adapt::stack(holdout, tch::Device::Cpu);
    let y_ho: Vec<f64> = holdout.iter().map(|s| s.target as f64).collect();
    let parent_text =
        Tensor::from_slice(&[parent.quality.good.clone(), parent.quality.bad.clone()].concat())
            .view([2, -1]);
    let scale = bundle.manifest.logit_scale as f64;
    let before = adapt::srcc(&adapt::scores(&e_ho, &parent_text, scale), &y_ho);

    let tokens = clip::load_tokens(&bundle)?;
    let mut student = clip::TextEncoder::load(&bundle, dev)?;
    let teacher = clip::TextEncoder::load(&bundle, dev)?;
    let ctx0 = clip::read_tensor(&bundle.prompts_path(), "ctx")?;
    println!(
        "adapting {}: {} labels ({} train, {} held out), lambda {lambda}, device {}; active prompt set v{} held-out SRCC {before:.4}",
        bundle.manifest.name,
        samples.len(),
        train.len(),
        holdout.len(),
        a.device,
        parent.version
    );
    let ts = TrainSettings::round(lambda, a.max_epochs.get(), scale, 10);
    let out = adapt::train(
        &mut student,
        &teacher,
        &tokens,
        &ctx0,
        train,
        holdout,
        &ts,
        dev,
    );
    let after = out.best_srcc;
    let quality = to_vec(&out.quality)?;
    if !after.is_finite() || quality.iter().any(|v| !v.is_finite()) {
        bail!(
            "adaptation produced non-finite values; discarded (nothing written, v{} stays active)",
            parent.version
        );
    }
    let mut tensors = vec![("quality".to_string(), vec![2, dim], quality)];
    for (name, pair) in &parent.attributes {
        tensors.push((
            format!("attr.{name}"),
            vec![2, dim],
            [pair.good.clone(), pair.bad.clone()].concat(),
        ));
    }
    let ctx = to_vec(&out.ctx)?;
    tensors.push((
        "ctx".into(),
        out.ctx.size().iter().map(|s| *s as usize).collect(),
        ctx,
    ));
    let next = prompt_dir.versions().last().copied().unwrap_or(0) + 1;
    let created = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let meta: HashMap<String, String> = [
        ("version", next.to_string()),
        ("created", created),
        ("labels", samples.len().to_string()),
        ("holdout", holdout.len().to_string()),
        ("val_srcc", format!("{after:.6}")),
        ("val_srcc_before", format!("{before:.6}")),
        ("val_srcc_initial", format!("{:.6}", out.initial_srcc)),
        ("parent", parent.version.to_string()),
        ("lambda", lambda.to_string()),
        ("best_epoch", out.best_epoch.to_string()),
        ("bundle", bundle.manifest.name.clone()),
        (MODEL_SHA256_KEY, model_sha),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes = safetensors_bytes(&tensors, meta)?;
    // Check what the daemon will load before anything is written.
    PromptSet::parse(&bytes, &prompt_dir.path(next), dim)?;
    let v = prompt_dir.write_next(&bytes)?;
    if after + 1e-9 >= before {
        prompt_dir.set_active(v)?;
        println!(
            "wrote {} and promoted it: held-out SRCC {before:.4} -> {after:.4}",
            prompt_dir.path(v).display()
        );
    } else {
        println!(
            "wrote {} but did not promote it: held-out SRCC would drop {before:.4} -> {after:.4}; v{} stays active",
            prompt_dir.path(v).display(),
            parent.version
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_promotion_decision_rests_on_at_least_ten_labels() {
        assert_eq!(holdout_size(3, 0.2), None, "too few: no round, no panic");
        assert_eq!(holdout_size(19, 0.2), None);
        assert_eq!(
            holdout_size(20, 0.2),
            Some(10),
            "4 would be too few to decide"
        );
        assert_eq!(holdout_size(60, 0.3), Some(18));
        assert_eq!(holdout_size(100, 0.95), Some(90), "10 are left to train on");
    }
}
