//! Re-embedding stored labels for another model (a model upgrade): every label whose
//! embedding is by another `visual.onnx` gets one by the new encoder, computed from its
//! stored frame exactly as the daemon computes a live frame's ([`crate::scan`]: the same
//! GStreamer scaling, views and preprocessing, the same ONNX Runtime model), so the
//! sidecar's next adaptation trains on every label again.
//!
//! ```text
//! labels.db ─▶ reembed_candidates ─▶ stored frame (PNG) or, for labels stored before
//!   frames were kept, the thumbnail (JPEG) ─▶ scan (temporary files) ─▶ embeddings
//!   ─▶ apply_reembedding (one transaction: all or nothing) ─▶ labels.db
//! ```
//!
//! Safe to run while a daemon writes labels (SQLite's locking; a label replaced in the
//! meantime is left alone) and to run again: labels already by the new encoder are not
//! touched, and a label moved back to an encoder it had before gets its kept
//! embedding back instead of a recomputed one.

use std::path::{Path, PathBuf};

use super::store::{EmbeddingSource, LabelStore, Reembedded};
use crate::config::Settings;
use crate::error::Error;
use crate::scan::{ScanOptions, scan};
use crate::score::bundle::Bundle;

/// What [`reembed`] did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ReembedReport {
    /// The new encoder's bundle name.
    pub bundle: String,
    /// sha256 of its `visual.onnx`.
    pub model_sha256: String,
    /// Labels in the store.
    pub labels: u64,
    /// Labels that were by the new encoder already (not touched).
    pub already: u64,
    /// Labels moved with an embedding computed from their stored frame.
    pub from_frame: usize,
    /// Labels moved with an embedding computed from their thumbnail (stored before
    /// frames were kept: approximate, see the README).
    pub from_thumbnail: usize,
    /// Labels moved back to an embedding kept from an earlier time with this encoder.
    pub restored: usize,
    /// Labels changed by someone else while this ran (replaced): left alone.
    pub skipped: usize,
    /// Labels that could not be re-embedded, with why: left as they were.
    pub failed: Vec<(i64, String)>,
}

impl ReembedReport {
    /// Labels now by the new encoder.
    pub fn usable(&self) -> u64 {
        self.already + (self.from_frame + self.from_thumbnail + self.restored) as u64
    }
}

impl std::fmt::Display for ReembedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} labels; re-embedded for {} (visual.onnx sha256 {}): {} from stored frames, \
             {} from thumbnails, {} restored from kept embeddings; {} were for this model \
             already, {} changed meanwhile (left alone), {} failed; {} labels are now usable \
             with this model",
            self.labels,
            self.bundle,
            self.model_sha256,
            self.from_frame,
            self.from_thumbnail,
            self.restored,
            self.already,
            self.skipped,
            self.failed.len(),
            self.usable()
        )
    }
}

/// A directory removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        let base = std::env::temp_dir();
        for i in 0..100u32 {
            let p = base.join(format!("streamiq-reembed-{}-{i}", std::process::id()));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(Self(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free temporary directory name"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Embeds stored label images (each a PNG frame or a JPEG thumbnail, with what it is)
/// with `settings.model`, exactly as the daemon embeds a live frame: through
/// [`crate::scan`] (GStreamer's scaling to the working size, `settings.scorer.views`,
/// the bundle's preprocessing and ONNX model). One result per image: its L2-normalised
/// embedding, or why there is none.
pub fn embed_images(
    settings: &Settings,
    images: &[(Vec<u8>, EmbeddingSource)],
) -> Result<Vec<Result<Vec<f32>, String>>, Error> {
    if images.is_empty() {
        return Ok(Vec::new());
    }
    // The scanner reads files: one temporary file per image, removed at the end.
    let tmp = TempDir::new().map_err(|e| Error::runtime("a temporary directory", e))?;
    let mut files = Vec::with_capacity(images.len());
    for (i, (bytes, source)) in images.iter().enumerate() {
        let ext = match source {
            EmbeddingSource::Thumbnail => "jpg",
            EmbeddingSource::Frame | EmbeddingSource::Live => "png",
        };
        let path = tmp.0.join(format!("image-{i}.{ext}"));
        std::fs::write(&path, bytes).map_err(|e| Error::runtime("writing a temporary image", e))?;
        files.push(path);
    }
    let opts = ScanOptions::files(files);
    Ok(scan(settings, &opts)?
        .into_iter()
        .map(|r| match r.embedding {
            Some(e) if e.iter().all(|v| v.is_finite()) && !e.is_empty() => Ok(e),
            Some(_) => Err("the embedding is not finite".to_string()),
            None => Err(r
                .error
                .unwrap_or_else(|| "the stored image gave no frame".into())),
        })
        .collect())
}

/// Re-embeds every label of the store `db` whose embedding is by another encoder than
/// the `visual.onnx` of `settings.model.bundle`, with `settings.scorer.views` (set them
/// as the daemon that will run the model has them). Labels that cannot be re-embedded
/// are reported and left as they were; the others move in one transaction at the end,
/// so an interrupted run changes nothing.
pub fn reembed(db: &Path, settings: &Settings) -> Result<ReembedReport, Error> {
    let bundle = Bundle::open(&settings.model.bundle)
        .map_err(|e| Error::Model(crate::score::LoadError::Bundle(e)))?;
    let to = crate::app::provenance(&bundle);
    if !db.is_file() {
        return Err(Error::runtime(
            "labels.db",
            format!("{}: no label store there", db.display()),
        ));
    }
    let store = LabelStore::open(db).map_err(Error::Labels)?;
    let candidates = store
        .reembed_candidates(&to.model_sha256)
        .map_err(Error::Labels)?;
    let mut report = ReembedReport {
        bundle: to.bundle.clone(),
        model_sha256: to.model_sha256.clone(),
        labels: store.count().map_err(Error::Labels)?,
        already: store
            .count_for_model(&to.model_sha256)
            .map_err(Error::Labels)?,
        ..Default::default()
    };
    let dim = bundle.manifest.embed_dim;
    let mut to_compute = Vec::new();
    let mut images = Vec::new();
    let mut items = Vec::new();
    for c in &candidates {
        if c.kept {
            items.push(Reembedded {
                id: c.id,
                from_sha256: c.model_sha256.clone(),
                embedding: None,
            });
            continue;
        }
        let image = match store.frame(c.id).map_err(Error::Labels)? {
            Some(png) => (png, EmbeddingSource::Frame),
            None => match store.thumbnail(c.id).map_err(Error::Labels)? {
                Some(jpeg) => (jpeg, EmbeddingSource::Thumbnail),
                None => continue,
            },
        };
        to_compute.push((c, image.1));
        images.push(image);
    }
    let embeddings = embed_images(settings, &images)?;
    for ((c, source), e) in to_compute.into_iter().zip(embeddings) {
        match e {
            Ok(e) if e.len() == dim => items.push(Reembedded {
                id: c.id,
                from_sha256: c.model_sha256.clone(),
                embedding: Some((e, source)),
            }),
            Ok(e) => report
                .failed
                .push((c.id, format!("{}-value embedding, expected {dim}", e.len()))),
            Err(why) => report.failed.push((c.id, why)),
        }
    }
    let moved = store
        .apply_reembedding(&to, &items)
        .map_err(Error::Labels)?;
    // What moved, by kind (the transaction skips labels changed meanwhile).
    let now: std::collections::HashMap<i64, String> = store
        .list(0, None)
        .map_err(Error::Labels)?
        .into_iter()
        .filter(|l| l.model_sha256 == to.model_sha256)
        .map(|l| (l.id, l.embedding_source))
        .collect();
    for item in &items {
        match (now.get(&item.id), &item.embedding) {
            (None, _) => report.skipped += 1,
            (Some(_), None) => report.restored += 1,
            (Some(_), Some((_, EmbeddingSource::Thumbnail))) => report.from_thumbnail += 1,
            (Some(_), Some(_)) => report.from_frame += 1,
        }
    }
    debug_assert_eq!(
        moved,
        report.from_frame + report.from_thumbnail + report.restored
    );
    Ok(report)
}
