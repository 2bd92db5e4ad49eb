//! `streamiq-adapt pretrain`: meta-prompt pre-training (GRMP-IQA module 1) of the
//! context vectors. Tasks are distortion types; each iteration draws a meta-batch of
//! training types, and for each resets `theta_task <- theta_meta`, takes one Adam step
//! on a support batch and one on a query batch (an 80/20 split of the task's images),
//! then moves `theta_meta` by the Reptile rule
//! `theta_meta <- theta_meta - beta * mean_tasks(theta_meta - theta_task)`.
//! The checkpoint is chosen on held-out distortion types (mean per-type SRCC), never
//! on the data the bundle will be judged on. The result is written as a new bundle
//! whose initial prompt set carries the learnt context vectors.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, ensure};
use streamiq::score::bundle::{Bundle, sha256_file};
use streamiq::score::prompt_store::write_atomic;
use tch::{Device, Kind, Tensor};

use crate::adapt::{self, Sample};
use crate::clip;

/// Options of `pretrain`.
pub struct PretrainOptions {
    /// Outer iterations.
    pub iterations: usize,
    /// Tasks per meta-batch.
    pub tasks_per_batch: usize,
    /// Reptile step size beta.
    pub beta: f64,
    /// Inner Adam learning rate.
    pub inner_lr: f64,
    /// Distortion types held out for checkpoint selection.
    pub val_types: Vec<String>,
    /// Evaluate on the held-out types every this many iterations.
    pub eval_every: usize,
    /// Seed.
    pub seed: u64,
}

/// Reads `streamiq eval --save-embeddings` output grouped by distortion type.
fn load_tasks(path: &Path) -> anyhow::Result<BTreeMap<String, Vec<Sample>>> {
    let e = clip::read_tensor(path, "embeds")?;
    let t = clip::read_tensor(path, "targets")?;
    let meta = safetensors::SafeTensors::read_metadata(&std::fs::read(path)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        .1;
    let types: Vec<String> = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("types"))
        .with_context(|| format!("{}: no `types` metadata (write it with streamiq eval --save-embeddings on a CSV with a type column)", path.display()))?
        .split(',')
        .map(str::to_string)
        .collect();
    let d = e.size()[1] as usize;
    let e = Vec::<f32>::try_from(e.flatten(0, -1))?;
    let t = Vec::<f32>::try_from(t)?;
    ensure!(
        types.len() == t.len(),
        "{}: {} types for {} images",
        path.display(),
        types.len(),
        t.len()
    );
    let mut tasks: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    for ((emb, target), kind) in e.chunks_exact(d).zip(t).zip(types) {
        tasks.entry(kind).or_default().push(Sample {
            embedding: emb.to_vec(),
            target,
        });
    }
    Ok(tasks)
}

/// One Adam step on `ctx` for the BCE of `batch`.
fn inner_step(
    text: &clip::TextEncoder,
    quality: &clip::PromptBatch,
    ctx: &mut Tensor,
    adam: &mut (Tensor, Tensor, i32),
    batch: &[Sample],
    lr: f64,
    scale: f64,
) {
    let (e, y) = adapt::stack(batch, ctx.device());
    let q = text.forward(quality, Some(ctx));
    let loss = adapt::bce(&e, &y, &q, scale);
    let g = Tensor::run_backward(&[&loss], &[&*ctx], false, false).remove(0);
    let _guard = tch::no_grad_guard();
    adam.2 += 1;
    adam.0 = &adam.0 * 0.9 + &g * 0.1;
    adam.1 = &adam.1 * 0.999 + &g * &g * 0.001;
    let (c1, c2) = (1.0 - 0.9f64.powi(adam.2), 1.0 - 0.999f64.powi(adam.2));
    let step = (&adam.0 / c1) / ((&adam.1 / c2).sqrt() + 1e-8) * lr;
    let _ = ctx.f_sub_(&step).expect("in-place update of a leaf tensor");
}

/// Mean per-type SRCC of `ctx` on the given tasks.
fn validate(
    text: &clip::TextEncoder,
    quality: &clip::PromptBatch,
    ctx: &Tensor,
    tasks: &[&Vec<Sample>],
    scale: f64,
) -> f64 {
    let q = tch::no_grad(|| text.forward(quality, Some(ctx)));
    let srccs: Vec<f64> = tasks
        .iter()
        .map(|t| {
            let (e, _) = adapt::stack(t, ctx.device());
            let y: Vec<f64> = t.iter().map(|s| s.target as f64).collect();
            adapt::srcc(&adapt::scores(&e, &q, scale), &y)
        })
        .collect();
    srccs.iter().sum::<f64>() / srccs.len().max(1) as f64
}

/// Runs the pre-training and writes the new bundle to `out`.
pub fn run(
    model: &Path,
    embeddings: &Path,
    out: &Path,
    o: &PretrainOptions,
    dev: Device,
) -> anyhow::Result<()> {
    let bundle = Bundle::open(model)?;
    let tokens = clip::load_tokens(&bundle)?;
    let text = clip::TextEncoder::load(&bundle, dev)?;
    let quality = tokens.quality.batch(dev);
    let scale = bundle.manifest.logit_scale as f64;
    let tasks = load_tasks(embeddings)?;
    let (val, train): (Vec<_>, Vec<_>) = tasks
        .iter()
        .filter(|(k, v)| k.as_str() != "reference" && v.len() >= 5)
        .partition(|(k, _)| o.val_types.iter().any(|v| v == *k));
    ensure!(
        !val.is_empty(),
        "none of --val-types {:?} is in {} (types: {:?})",
        o.val_types,
        embeddings.display(),
        tasks.keys().collect::<Vec<_>>()
    );
    ensure!(
        !train.is_empty(),
        "no training distortion types left after holding out {:?}",
        o.val_types
    );
    let val_sets: Vec<&Vec<Sample>> = val.iter().map(|(_, v)| *v).collect();
    let mut meta = clip::read_tensor(&bundle.prompts_path(), "ctx")?.to(dev);
    let mut rng = fastrand::Rng::with_seed(o.seed);
    let initial = validate(&text, &quality, &meta, &val_sets, scale);
    let (mut best, mut best_it, mut best_ctx) = (initial, 0, meta.copy());
    println!(
        "pretraining the context vectors on {} distortion types, selecting on {} held-out ones ({}); held-out SRCC {initial:.4}",
        train.len(),
        val.len(),
        val.iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for it in 1..=o.iterations {
        let mut delta = meta.zeros_like();
        for _ in 0..o.tasks_per_batch {
            let (_, samples) = train[rng.usize(..train.len())];
            let mut order: Vec<usize> = (0..samples.len()).collect();
            rng.shuffle(&mut order);
            let cut = (samples.len() * 4 / 5).max(1);
            let pick = |ix: &[usize]| ix.iter().map(|&i| samples[i].clone()).collect::<Vec<_>>();
            let (support, query) = (pick(&order[..cut]), pick(&order[cut..]));
            // The per-task reset the released code forgets.
            let mut task = meta.detach().copy().set_requires_grad(true);
            let mut adam = (meta.zeros_like(), meta.zeros_like(), 0);
            inner_step(
                &text, &quality, &mut task, &mut adam, &support, o.inner_lr, scale,
            );
            if !query.is_empty() {
                inner_step(
                    &text, &quality, &mut task, &mut adam, &query, o.inner_lr, scale,
                );
            }
            delta += &meta - task.detach();
        }
        meta = (&meta - delta * (o.beta / o.tasks_per_batch as f64)).detach();
        if it % o.eval_every == 0 || it == o.iterations {
            let v = validate(&text, &quality, &meta, &val_sets, scale);
            if v > best {
                (best, best_it, best_ctx) = (v, it, meta.copy());
            }
            eprintln!(
                "iteration {it:>5}/{}  held-out SRCC {v:.4}  (best {best:.4} at {best_it})",
                o.iterations
            );
        }
    }
    write_bundle(&bundle, &text, &tokens, &best_ctx, out, best, best_it)?;
    println!(
        "wrote {} (held-out SRCC {initial:.4} -> {best:.4}, checkpoint of iteration {best_it})",
        out.display()
    );
    Ok(())
}

/// Copies the bundle to `out` with a new `prompts.safetensors` (every pair recomputed
/// with `ctx` by the text tower) and the manifest's checksum updated.
fn write_bundle(
    bundle: &Bundle,
    text: &clip::TextEncoder,
    tokens: &clip::Tokens,
    ctx: &Tensor,
    out: &Path,
    srcc: f64,
    iteration: usize,
) -> anyhow::Result<()> {
    ensure!(
        !out.join("manifest.toml").exists(),
        "{}: a bundle is already there",
        out.display()
    );
    let dev = ctx.device();
    let feats = |g: &clip::PromptTokens| -> anyhow::Result<Vec<f32>> {
        let t = tch::no_grad(|| text.forward(&g.batch(dev), Some(ctx)));
        Ok(Vec::<f32>::try_from(
            t.to(Device::Cpu).to_kind(Kind::Float).flatten(0, -1),
        )?)
    };
    let d = bundle.manifest.embed_dim;
    let mut tensors = vec![("quality".to_string(), vec![2, d], feats(&tokens.quality)?)];
    for (name, g) in &tokens.attributes {
        tensors.push((format!("attr.{name}"), vec![2, d], feats(g)?));
    }
    let c = ctx.to(Device::Cpu);
    tensors.push((
        "ctx".into(),
        c.size().iter().map(|s| *s as usize).collect(),
        Vec::<f32>::try_from(c.flatten(0, -1))?,
    ));
    let meta = [
        ("version", "0".to_string()),
        (
            "created",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        ),
        ("labels", "0".into()),
        ("val_srcc", format!("{srcc:.6}")),
        ("parent", String::new()),
        (
            "source",
            format!("streamiq-adapt pretrain (iteration {iteration})"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes = crate::once::safetensors_bytes(&tensors, meta)?;
    let mut manifest = bundle.manifest.clone();
    for rel in manifest.files.keys() {
        let dst = out.join(rel);
        std::fs::create_dir_all(dst.parent().unwrap_or(out))?;
        if rel != "prompts.safetensors" {
            std::fs::copy(bundle.dir.join(rel), &dst)
                .with_context(|| format!("{}", dst.display()))?;
        }
    }
    write_atomic(&out.join("prompts.safetensors"), &bytes)?;
    manifest.files.insert(
        "prompts.safetensors".into(),
        sha256_file(&out.join("prompts.safetensors"))?,
    );
    manifest.info.insert(
        "pretrained".into(),
        toml::Value::String(format!("streamiq-adapt pretrain, held-out SRCC {srcc:.4}")),
    );
    write_atomic(
        &out.join("manifest.toml"),
        toml::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    Bundle::open(out)?;
    Ok(())
}
