//! CLIP's text tower in libtorch (tch), read from a bundle's `text/`:
//! token + positional embedding, a causal pre-LN transformer with QuickGELU MLPs,
//! `ln_final`, pooling at the EOT token and the text projection. The learnable
//! context vectors are passed in as a tensor, so gradients reach them.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;
use streamiq::score::bundle::{Bundle, TextSpec};
use tch::{Device, Kind, Tensor};

/// Token ids of one group of prompts, as `text/tokens.json` stores them.
#[derive(Debug, Clone, Deserialize)]
pub struct PromptTokens {
    /// Prompt names (e.g. `high`, `low`).
    pub names: Vec<String>,
    /// The prompt texts.
    pub texts: Vec<String>,
    /// `[P][context_length]` token ids.
    pub ids: Vec<Vec<i64>>,
    /// Position of the EOT token in each prompt.
    pub eot_index: Vec<i64>,
}

/// `text/tokens.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Tokens {
    /// Token positions.
    pub context_length: usize,
    /// Learnable context vectors in the quality / attribute prompts.
    pub n_ctx: usize,
    /// Where they go (right after SOT).
    pub ctx_positions: Vec<usize>,
    /// The quality pair.
    pub quality: PromptTokens,
    /// Attribute pairs by name.
    pub attributes: std::collections::BTreeMap<String, PromptTokens>,
    /// Scene prompts (no context slots), for the gradient regulariser.
    pub scenes: PromptTokens,
}

/// Token ids of a prompt group as tensors on a device.
pub struct PromptBatch {
    /// `[P, L]` int64.
    pub ids: Tensor,
    /// `[P]` int64.
    pub eot: Tensor,
}

impl PromptTokens {
    /// The group as tensors.
    pub fn batch(&self, device: Device) -> PromptBatch {
        let flat: Vec<i64> = self.ids.iter().flatten().copied().collect();
        let p = self.ids.len() as i64;
        PromptBatch {
            ids: Tensor::from_slice(&flat).view([p, -1]).to(device),
            eot: Tensor::from_slice(&self.eot_index).to(device),
        }
    }
}

/// One residual attention block.
pub struct Block {
    ln1: (Tensor, Tensor),
    in_proj: (Tensor, Tensor),
    out_proj: (Tensor, Tensor),
    ln2: (Tensor, Tensor),
    fc: (Tensor, Tensor),
    proj: (Tensor, Tensor),
}

impl Block {
    fn tensors(&self) -> [&Tensor; 12] {
        let [a, b, c, d, e, f] = [
            &self.ln1,
            &self.in_proj,
            &self.out_proj,
            &self.ln2,
            &self.fc,
            &self.proj,
        ];
        [
            &a.0, &a.1, &b.0, &b.1, &c.0, &c.1, &d.0, &d.1, &e.0, &e.1, &f.0, &f.1,
        ]
    }
}

/// The text tower.
pub struct TextEncoder {
    /// Shape of the tower.
    pub spec: TextSpec,
    token_embedding: Tensor,
    positional_embedding: Tensor,
    /// Transformer blocks, first to last.
    pub blocks: Vec<Block>,
    /// Final layer norm (weight, bias).
    pub ln_final: (Tensor, Tensor),
    text_projection: Tensor,
    causal_mask: Tensor,
    device: Device,
}

fn take(
    w: &mut HashMap<String, Tensor>,
    name: &str,
    shape: &[i64],
    device: Device,
) -> anyhow::Result<Tensor> {
    let t = w
        .remove(name)
        .with_context(|| format!("text/weights.safetensors: no tensor {name:?}"))?;
    if t.size() != shape {
        bail!(
            "text/weights.safetensors: {name} has shape {:?}, expected {shape:?} (manifest [text])",
            t.size()
        );
    }
    Ok(t.to_kind(Kind::Float).to(device).detach())
}

fn layer_norm(x: &Tensor, (w, b): &(Tensor, Tensor)) -> Tensor {
    let d = *x.size().last().expect("rank >= 1");
    x.layer_norm([d], Some(w), Some(b), 1e-5, false)
}

fn linear(x: &Tensor, (w, b): &(Tensor, Tensor)) -> Tensor {
    x.matmul(&w.tr()) + b
}

impl TextEncoder {
    /// Loads `text/weights.safetensors` of a verified bundle.
    pub fn load(bundle: &Bundle, device: Device) -> anyhow::Result<Self> {
        let spec = bundle.manifest.text.clone().with_context(|| {
            format!(
                "{}: manifest has no [text] table (this bundle has no text tower)",
                bundle.dir.join("manifest.toml").display()
            )
        })?;
        let path = bundle.dir.join("text/weights.safetensors");
        let mut w: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
            .with_context(|| format!("{}", path.display()))?
            .into_iter()
            .collect();
        let (width, l) = (spec.width as i64, spec.context_length as i64);
        let d = bundle.manifest.embed_dim as i64;
        let pair = |w: &mut HashMap<String, Tensor>,
                    name: &str,
                    shape: &[i64]|
         -> anyhow::Result<(Tensor, Tensor)> {
            Ok((
                take(w, &format!("{name}.weight"), shape, device)?,
                take(w, &format!("{name}.bias"), &shape[..1], device)?,
            ))
        };
        let mut blocks = Vec::with_capacity(spec.layers);
        for i in 0..spec.layers {
            let p = format!("transformer.resblocks.{i}");
            blocks.push(Block {
                ln1: pair(&mut w, &format!("{p}.ln_1"), &[width])?,
                in_proj: (
                    take(
                        &mut w,
                        &format!("{p}.attn.in_proj_weight"),
                        &[3 * width, width],
                        device,
                    )?,
                    take(
                        &mut w,
                        &format!("{p}.attn.in_proj_bias"),
                        &[3 * width],
                        device,
                    )?,
                ),
                out_proj: pair(&mut w, &format!("{p}.attn.out_proj"), &[width, width])?,
                ln2: pair(&mut w, &format!("{p}.ln_2"), &[width])?,
                fc: pair(&mut w, &format!("{p}.mlp.c_fc"), &[4 * width, width])?,
                proj: pair(&mut w, &format!("{p}.mlp.c_proj"), &[width, 4 * width])?,
            });
        }
        let causal_mask = Tensor::full([l, l], f64::NEG_INFINITY, (Kind::Float, device)).triu(1);
        Ok(Self {
            token_embedding: take(
                &mut w,
                "token_embedding.weight",
                &[spec.vocab_size as i64, width],
                device,
            )?,
            positional_embedding: take(&mut w, "positional_embedding", &[l, width], device)?,
            ln_final: pair(&mut w, "ln_final", &[width])?,
            text_projection: take(&mut w, "text_projection", &[width, d], device)?,
            blocks,
            causal_mask,
            spec,
            device,
        })
    }

    /// Makes the last `blocks` transformer blocks and `ln_final` trainable and returns
    /// those tensors (sharing storage and autograd identity with the tower).
    pub fn trainable_tail(&mut self, blocks: usize) -> Vec<Tensor> {
        let first = self.blocks.len().saturating_sub(blocks);
        let mut out: Vec<Tensor> = self.blocks[first..]
            .iter()
            .flat_map(|b| b.tensors())
            .chain([&self.ln_final.0, &self.ln_final.1])
            .map(|t| t.shallow_clone())
            .collect();
        for t in &mut out {
            *t = t.set_requires_grad(true);
        }
        out
    }

    /// Token embeddings of `ids` (`[P, L, W]`); used to initialise context vectors.
    pub fn embed_tokens(&self, ids: &Tensor) -> Tensor {
        let s = ids.size();
        self.token_embedding
            .index_select(0, &ids.flatten(0, -1))
            .view([s[0], s[1], -1])
    }

    /// Projected text features `[P, D]` (not normalised). With `ctx` (`[n_ctx, W]`),
    /// the embeddings at positions `1..=n_ctx` are replaced by it.
    // `x = x + y` on purpose: `+=` on a tch tensor is in place, which breaks autograd
    // for tensors the backward pass still needs.
    #[allow(clippy::assign_op_pattern)]
    pub fn forward(&self, prompts: &PromptBatch, ctx: Option<&Tensor>) -> Tensor {
        let mut x = self.embed_tokens(&prompts.ids);
        let (p, l, w) = (x.size()[0], x.size()[1], x.size()[2]);
        if let Some(ctx) = ctx {
            let n = ctx.size()[0];
            x = Tensor::cat(
                &[
                    x.narrow(1, 0, 1),
                    ctx.unsqueeze(0).expand([p, n, w], false),
                    x.narrow(1, 1 + n, l - 1 - n),
                ],
                1,
            );
        }
        x = x + &self.positional_embedding;
        let heads = self.spec.heads as i64;
        let hd = w / heads;
        for b in &self.blocks {
            let h = layer_norm(&x, &b.ln1);
            let qkv = linear(&h, &b.in_proj)
                .view([p, l, 3, heads, hd])
                .permute([2, 0, 3, 1, 4]);
            let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
            let att = (q.matmul(&k.transpose(-2, -1)) / (hd as f64).sqrt() + &self.causal_mask)
                .softmax(-1, Kind::Float);
            let o = att.matmul(&v).permute([0, 2, 1, 3]).reshape([p, l, w]);
            x = x + linear(&o, &b.out_proj);
            let h = linear(&layer_norm(&x, &b.ln2), &b.fc);
            let h = &h * (&h * 1.702).sigmoid();
            x = x + linear(&h, &b.proj);
        }
        let x = layer_norm(&x, &self.ln_final);
        let rows = Tensor::arange(p, (Kind::Int64, self.device));
        let pooled = x.index(&[Some(rows), Some(prompts.eot.shallow_clone())]);
        pooled.matmul(&self.text_projection)
    }
}

/// Reads `text/tokens.json` of a bundle and checks it against the manifest.
pub fn load_tokens(bundle: &Bundle) -> anyhow::Result<Tokens> {
    let path = bundle.dir.join("text/tokens.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let t: Tokens = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let spec = bundle
        .manifest
        .text
        .as_ref()
        .context("manifest has no [text] table")?;
    let groups = std::iter::once(&t.quality)
        .chain(t.attributes.values())
        .chain(std::iter::once(&t.scenes));
    for g in groups {
        for (ids, eot) in g.ids.iter().zip(&g.eot_index) {
            if ids.len() != spec.context_length
                || *eot < 0
                || *eot as usize >= ids.len()
                || ids.iter().any(|i| *i < 0 || *i as usize >= spec.vocab_size)
            {
                bail!(
                    "{}: prompt {:?} does not fit the manifest's [text] table",
                    path.display(),
                    g.texts
                );
            }
        }
    }
    if t.context_length != spec.context_length
        || t.n_ctx != spec.n_ctx
        || t.ctx_positions != (1..=spec.n_ctx).collect::<Vec<_>>()
    {
        bail!(
            "{}: context length {} and slots {:?} do not match the manifest ({} and 1..={})",
            path.display(),
            t.context_length,
            t.ctx_positions,
            spec.context_length,
            spec.n_ctx
        );
    }
    Ok(t)
}

/// Reads a `[rows, cols]` f32 tensor from a safetensors file.
pub fn read_tensor(path: &Path, name: &str) -> anyhow::Result<Tensor> {
    Tensor::read_safetensors(path)
        .with_context(|| format!("{}", path.display()))?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t.to_kind(Kind::Float))
        .with_context(|| format!("{}: no tensor {name:?}", path.display()))
}
