//! One few-shot adaptation round (GRMP-IQA module 2: gradient-regularised prompt tuning):
//! the context vectors and the last text blocks are trained with binary cross-entropy
//! on operator labels, whose image embeddings were cached by the daemon (its visual
//! encoder stays fixed). With `lambda > 0`, the part of each quality gradient that
//! would also move the scene semantics (the gradient of the soft cross-entropy between
//! a frozen teacher's and the student's scene predictions) is projected out:
//! `G = G_q - lambda * <G_q, G_s> / (|G_s|^2 + eps) * G_s` when `<G_q, G_s> > 0`.
//! Early stopping and promotion are decided on held-out labels only.

use tch::{Device, Kind, Tensor};

use crate::clip::{PromptBatch, TextEncoder, Tokens};

/// One labelled frame: its cached L2-normalised embedding and target in [0, 1].
#[derive(Debug, Clone)]
pub struct Sample {
    /// Embedding, length D.
    pub embedding: Vec<f32>,
    /// Quality target.
    pub target: f32,
}

/// Training settings.
#[derive(Debug, Clone)]
pub struct TrainSettings {
    /// Gradient-regularisation strength (0 disables it).
    pub lambda: f64,
    /// Upper bound on epochs.
    pub max_epochs: usize,
    /// Epochs without a better held-out SRCC before stopping.
    pub patience: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Text blocks (from the last) that are trained besides the context vectors.
    pub blocks: usize,
    /// CLIP logit scale.
    pub logit_scale: f64,
    /// Print a progress line every this many epochs (0 = never).
    pub report_every: usize,
}

impl TrainSettings {
    /// The settings an adaptation round uses (Adam lr 2e-3, weight decay 1e-4, the last
    /// two text blocks, early stopping after 30 epochs without a better held-out SRCC).
    pub fn round(lambda: f64, max_epochs: usize, logit_scale: f64, report_every: usize) -> Self {
        Self {
            lambda,
            max_epochs,
            patience: 30,
            lr: 2e-3,
            weight_decay: 1e-4,
            blocks: 2,
            logit_scale,
            report_every,
        }
    }
}

/// What a round produced.
pub struct Outcome {
    /// Held-out SRCC of the starting point (the bundle's initial prompts).
    pub initial_srcc: f64,
    /// Best held-out SRCC reached.
    pub best_srcc: f64,
    /// Epoch of the best held-out SRCC (0 = the starting point).
    pub best_epoch: usize,
    /// Quality text features `[2, D]` at the best epoch (not normalised).
    pub quality: Tensor,
    /// Context vectors `[n_ctx, W]` at the best epoch.
    pub ctx: Tensor,
}

/// Stacks samples into `[N, D]` embeddings and `[N]` targets.
pub fn stack(samples: &[Sample], device: Device) -> (Tensor, Tensor) {
    let d = samples.first().map_or(0, |s| s.embedding.len()) as i64;
    let e: Vec<f32> = samples
        .iter()
        .flat_map(|s| s.embedding.iter().copied())
        .collect();
    let t: Vec<f32> = samples.iter().map(|s| s.target).collect();
    (
        Tensor::from_slice(&e).view([-1, d]).to(device),
        Tensor::from_slice(&t).to(device),
    )
}

fn normalize(t: &Tensor) -> Tensor {
    t / t.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-12)
}

/// `softmax(scale * e . [t_good, t_bad])[:, 0]` as log-probabilities (log p, log 1-p).
fn log_probs(embeds: &Tensor, text: &Tensor, scale: f64) -> (Tensor, Tensor) {
    let ls = (embeds.matmul(&normalize(text).tr()) * scale).log_softmax(-1, Kind::Float);
    (ls.select(1, 0), ls.select(1, 1))
}

/// Quality scores in [0, 1] for `embeds` under text features `text` (`[2, D]`).
pub fn scores(embeds: &Tensor, text: &Tensor, scale: f64) -> Vec<f64> {
    let (lp, _) = log_probs(embeds, text, scale);
    Vec::<f64>::try_from(lp.exp().to_kind(Kind::Double).to(Device::Cpu)).unwrap_or_default()
}

/// Binary cross-entropy of the prompt-pair probabilities against `targets`.
pub fn bce(embeds: &Tensor, targets: &Tensor, text: &Tensor, scale: f64) -> Tensor {
    let (lp, lq) = log_probs(embeds, text, scale);
    let not = targets.neg() + 1.0;
    -(targets * lp + not * lq).mean(Kind::Float)
}

/// Soft cross-entropy between teacher and student scene predictions.
fn scene_loss(embeds: &Tensor, student: &Tensor, teacher: &Tensor, scale: f64) -> Tensor {
    let s = (embeds.matmul(&normalize(student).tr()) * scale).log_softmax(-1, Kind::Float);
    let t = (embeds.matmul(&normalize(teacher).tr()) * scale).softmax(-1, Kind::Float);
    -(t * s)
        .sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)
        .mean(Kind::Float)
}

/// Per-tensor gradient surgery: removes from `gq` the part along `gs` when they agree.
pub fn regularise(gq: &Tensor, gs: &Tensor, lambda: f64) -> Tensor {
    let d = (gq * gs).sum(Kind::Float).double_value(&[]);
    if lambda == 0.0 || d <= 0.0 {
        return gq.shallow_clone();
    }
    let n2 = (gs * gs).sum(Kind::Float).double_value(&[]);
    gq - gs * (lambda * d / (n2 + 1e-12))
}

struct Adam {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i32,
}

impl Adam {
    fn new(params: &[Tensor]) -> Self {
        Self {
            m: params.iter().map(|p| p.zeros_like()).collect(),
            v: params.iter().map(|p| p.zeros_like()).collect(),
            t: 0,
        }
    }

    fn step(&mut self, params: &mut [Tensor], grads: &[Tensor], lr: f64, wd: f64) {
        let _g = tch::no_grad_guard();
        self.t += 1;
        let (b1, b2) = (0.9f64, 0.999f64);
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            self.m[i] = &self.m[i] * b1 + g * (1.0 - b1);
            self.v[i] = &self.v[i] * b2 + g * g * (1.0 - b2);
            let update =
                (&self.m[i] / c1) / ((&self.v[i] / c2).sqrt() + 1e-8) * lr + &*p * (lr * wd);
            let _ = p.f_sub_(&update).expect("in-place update of a leaf tensor");
        }
    }
}

/// Spearman correlation (ties ranked by their mean).
pub fn srcc(x: &[f64], y: &[f64]) -> f64 {
    streamiq::eval::spearman(x, y)
}

/// Trains on `train`, selects on `holdout`. `student` is modified; `teacher` is the
/// frozen original tower; `ctx0` the starting context vectors.
#[allow(clippy::too_many_arguments)]
pub fn train(
    student: &mut TextEncoder,
    teacher: &TextEncoder,
    tokens: &Tokens,
    ctx0: &Tensor,
    train: &[Sample],
    holdout: &[Sample],
    s: &TrainSettings,
    device: Device,
) -> Outcome {
    let quality: PromptBatch = tokens.quality.batch(device);
    let scenes: PromptBatch = tokens.scenes.batch(device);
    let (e_tr, y_tr) = stack(train, device);
    let (e_ho, _) = stack(holdout, device);
    let y_ho: Vec<f64> = holdout.iter().map(|s| s.target as f64).collect();
    let teacher_scenes = tch::no_grad(|| teacher.forward(&scenes, None));

    let ctx = ctx0.to(device).detach().copy().set_requires_grad(true);
    let tail = student.trainable_tail(s.blocks);
    let mut params: Vec<Tensor> = std::iter::once(ctx.shallow_clone()).chain(tail).collect();
    let snapshot =
        |ps: &[Tensor]| -> Vec<Tensor> { ps.iter().map(|p| p.detach().copy()).collect() };
    let holdout_srcc = |student: &TextEncoder, ctx: &Tensor| {
        let q = tch::no_grad(|| student.forward(&quality, Some(ctx)));
        srcc(&scores(&e_ho, &q, s.logit_scale), &y_ho)
    };

    let initial_srcc = holdout_srcc(student, &ctx);
    let (mut best_srcc, mut best_epoch, mut best) = (initial_srcc, 0, snapshot(&params));
    let mut adam = Adam::new(&params);
    for epoch in 1..=s.max_epochs {
        let q = student.forward(&quality, Some(&ctx));
        let lq = bce(&e_tr, &y_tr, &q, s.logit_scale);
        let gq = Tensor::run_backward(&[&lq], &params, s.lambda > 0.0, false);
        let grads: Vec<Tensor> = if s.lambda > 0.0 {
            // The scene prompts have no context slots: G_s is zero for ctx.
            let ls = scene_loss(
                &e_tr,
                &student.forward(&scenes, None),
                &teacher_scenes,
                s.logit_scale,
            );
            let gs = Tensor::run_backward(&[&ls], &params[1..], false, false);
            std::iter::once(gq[0].shallow_clone())
                .chain(
                    gq[1..]
                        .iter()
                        .zip(&gs)
                        .map(|(q, g)| regularise(q, g, s.lambda)),
                )
                .collect()
        } else {
            gq
        };
        adam.step(&mut params, &grads, s.lr, s.weight_decay);
        let h = holdout_srcc(student, &ctx);
        if h.is_finite() && h > best_srcc + 1e-9 {
            (best_srcc, best_epoch, best) = (h, epoch, snapshot(&params));
        }
        if s.report_every > 0 && epoch % s.report_every == 0 {
            eprintln!(
                "epoch {epoch:>4}/{}  loss {:.4}  held-out SRCC {h:.4}  (best {best_srcc:.4} at {best_epoch})",
                s.max_epochs,
                lq.double_value(&[])
            );
        }
        if epoch - best_epoch >= s.patience {
            break;
        }
    }
    tch::no_grad(|| {
        for (p, b) in params.iter_mut().zip(&best) {
            p.copy_(b);
        }
    });
    let quality_feats = tch::no_grad(|| student.forward(&quality, Some(&ctx))).to(Device::Cpu);
    Outcome {
        initial_srcc,
        best_srcc,
        best_epoch,
        quality: quality_feats,
        ctx: ctx.detach().to(Device::Cpu),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regularisation_removes_the_agreeing_component() {
        let gq = Tensor::from_slice(&[1.0f32, 1.0]);
        let gs = Tensor::from_slice(&[1.0f32, 0.0]);
        let g = regularise(&gq, &gs, 1.0);
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![0.0, 1.0]);
        let g = regularise(&gq, &gs, 5.0);
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![-4.0, 1.0]);
        // Opposed gradients are left alone; lambda 0 disables the surgery.
        let opposed = Tensor::from_slice(&[-1.0f32, 0.0]);
        assert_eq!(
            Vec::<f32>::try_from(&regularise(&gq, &opposed, 5.0)).unwrap(),
            vec![1.0, 1.0]
        );
        assert_eq!(
            Vec::<f32>::try_from(&regularise(&gq, &gs, 0.0)).unwrap(),
            vec![1.0, 1.0]
        );
    }
}
