//! `streamiq-adapt reembed`: after a model upgrade, re-embeds the stored labels with
//! the new bundle's visual tower (from each label's stored frame, through the daemon's
//! own preprocessing), so that `streamiq-adapt once` trains on them again. The work is
//! the `streamiq` library's ([`streamiq::labels::reembed`]); this is its command line.

use std::path::PathBuf;

use anyhow::Context;
use streamiq::config::Config;
use streamiq::labels::reembed::{ReembedReport, reembed};

/// What `reembed` runs on: a config file (as the daemon that will run the new model
/// reads it) and/or explicit paths, which override it.
#[derive(Debug, Clone, Default)]
pub struct ReembedOptions {
    /// Configuration file: `model.*`, `scorer.views` and `labels.db` are used.
    pub config: Option<PathBuf>,
    /// The new model bundle (overrides `model.bundle`).
    pub model: Option<PathBuf>,
    /// The label store (overrides `labels.db`).
    pub db: Option<PathBuf>,
    /// `global`, `crops:N`, ... (overrides `scorer.views`).
    pub views: Option<String>,
}

/// Runs a re-embedding as `o` says and returns its report.
pub fn run(o: &ReembedOptions) -> anyhow::Result<ReembedReport> {
    anyhow::ensure!(
        o.config.is_some() || (o.model.is_some() && o.db.is_some()),
        "give --config FILE, or --model DIR and --db FILE"
    );
    let mut c = match &o.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(m) = &o.model {
        c.model.bundle = m.clone();
    }
    if let Some(db) = &o.db {
        c.labels.db = db.clone();
    }
    if let Some(v) = &o.views {
        c.scorer.views = v.clone();
    }
    let settings = c.validate()?;
    reembed(&settings.labels_db, &settings).with_context(|| {
        format!(
            "re-embedding {} with {}",
            settings.labels_db.display(),
            settings.model.bundle.display()
        )
    })
}
