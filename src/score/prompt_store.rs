//! The versioned prompt-set directory (`model.prompts_dir`), shared by the daemon
//! and `streamiq-adapt`:
//!
//! ```text
//! prompts_dir/v0001.safetensors   a prompt set (quality, attr.*, ctx; metadata)
//! prompts_dir/v0002.safetensors
//! prompts_dir/active              the promoted version number, e.g. "2\n"
//! ```
//!
//! Every file is written atomically (temporary file, fsync, rename, fsync of the
//! directory), so a writer killed at any point leaves the previous state intact.
//! Version 0 is the bundle's own `prompts.safetensors`.
//!
//! A set records in its metadata the sha256 of the `visual.onnx` it was adapted for
//! ([`MODEL_SHA256_KEY`]); [`check_model`] refuses it for any other visual tower. Sets
//! written before this was checked record none and load as before, by their shape.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The metadata key of a prompt set that holds the sha256 (hex) of the `visual.onnx`
/// it was adapted for.
pub const MODEL_SHA256_KEY: &str = "model_sha256";

/// Which visual tower a usable prompt set was made for, by [`check_model`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MadeFor {
    /// It records this model's `visual.onnx` sha256 (or it is version 0, the bundle's
    /// own set, which the bundle's checksums tie to its tower).
    ThisModel,
    /// It records none: written before streamiq recorded it. Usable, checked only by
    /// its shape.
    Unrecorded,
}

/// Checks that `set` was made for the visual tower whose `visual.onnx` has sha256
/// `model_sha256` (hex, any case). Version 0 (the bundle's own set) always is; a set
/// with no recorded sha is [`MadeFor::Unrecorded`]; a set recording another sha is
/// refused with [`ModelMismatch`](super::prompts::PromptError::ModelMismatch), naming
/// both.
pub fn check_model(
    set: &super::prompts::PromptSet,
    model_sha256: &str,
) -> Result<MadeFor, super::prompts::PromptError> {
    if set.version == 0 {
        return Ok(MadeFor::ThisModel);
    }
    match set.metadata.get(MODEL_SHA256_KEY).map(|s| s.trim()) {
        None | Some("") => Ok(MadeFor::Unrecorded),
        Some(sha) if sha.eq_ignore_ascii_case(model_sha256) => Ok(MadeFor::ThisModel),
        Some(sha) => Err(super::prompts::PromptError::ModelMismatch {
            path: set.path.clone(),
            version: set.version,
            set_sha256: sha.to_ascii_lowercase(),
            model_sha256: model_sha256.to_ascii_lowercase(),
        }),
    }
}

/// The prompt directory.
#[derive(Debug, Clone)]
pub struct PromptDir {
    dir: PathBuf,
}

fn io_err(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Writes `bytes` to `path` atomically: a temporary file of this call's own
/// (`.NAME.tmp-PID-SEQ`, created exclusively, so it never follows a symlink nor shares
/// a file with a concurrent writer), synced, renamed over `path`, and the directory
/// synced. Concurrent writers each land whole; the last rename wins.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{seq}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| io_err(path, e))
}

impl PromptDir {
    /// The directory (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory path.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of version `v` (v >= 1).
    pub fn path(&self, v: u64) -> PathBuf {
        self.dir.join(format!("v{v:04}.safetensors"))
    }

    /// Versions present, ascending.
    pub fn versions(&self) -> Vec<u64> {
        let mut v: Vec<u64> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix('v')?
                    .strip_suffix(".safetensors")?
                    .parse()
                    .ok()
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// The promoted version, if any (0 = the bundle's own set).
    pub fn active(&self) -> std::io::Result<Option<u64>> {
        let p = self.dir.join("active");
        match fs::read_to_string(&p) {
            Ok(s) => s.trim().parse().map(Some).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {:?} is not a version number", p.display(), s.trim()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&p, e)),
        }
    }

    /// Writes a new version (one more than the highest present) and returns it.
    pub fn write_next(&self, bytes: &[u8]) -> std::io::Result<u64> {
        let v = self.versions().last().copied().unwrap_or(0) + 1;
        write_atomic(&self.path(v), bytes)?;
        Ok(v)
    }

    /// Promotes version `v` (0 = the bundle's own set).
    pub fn set_active(&self, v: u64) -> std::io::Result<()> {
        write_atomic(&self.dir.join("active"), format!("{v}\n").as_bytes())
    }

    /// Removes the temporary files (`.NAME.tmp-PID`, see [`write_atomic`]) of writers
    /// that were killed mid-write: those whose process no longer exists. A live
    /// writer's file is kept (and were it removed, its rename would fail and leave the
    /// previous state intact). Does nothing without `/proc`. Returns the names removed.
    pub fn remove_stale_temp_files(&self) -> Vec<String> {
        if !Path::new("/proc/self").exists() {
            return Vec::new();
        }
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                // `.NAME.tmp-PID-SEQ` (or `.NAME.tmp-PID` of earlier versions).
                let pid: u32 = name
                    .strip_prefix('.')?
                    .rsplit_once(".tmp-")?
                    .1
                    .split('-')
                    .next()?
                    .parse()
                    .ok()?;
                let alive =
                    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
                if alive || !e.file_type().ok()?.is_file() {
                    return None;
                }
                fs::remove_file(e.path()).ok()?;
                Some(name)
            })
            .collect()
    }

    /// Modification time of the `active` file, to notice promotions by another process.
    pub fn active_stamp(&self) -> Option<std::time::SystemTime> {
        fs::metadata(self.dir.join("active"))
            .and_then(|m| m.modified())
            .ok()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn versions_and_active_pointer() {
        let dir = tempfile::tempdir().unwrap();
        let p = PromptDir::new(dir.path().join("prompts"));
        assert_eq!(p.versions(), Vec::<u64>::new());
        assert_eq!(p.active().unwrap(), None);
        assert_eq!(p.write_next(b"one").unwrap(), 1);
        assert_eq!(p.write_next(b"two").unwrap(), 2);
        p.set_active(1).unwrap();
        assert_eq!(p.active().unwrap(), Some(1));
        assert_eq!(p.versions(), vec![1, 2]);
        assert_eq!(fs::read(p.path(2)).unwrap(), b"two");
        // No temporary files are left behind.
        let names: Vec<String> = fs::read_dir(p.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
        fs::write(p.dir().join("active"), "junk").unwrap();
        assert!(p.active().unwrap_err().to_string().contains("active"));
    }

    /// A prompt set file of embedding size 2 with `meta`.
    pub(crate) fn set_file(meta: &[(&str, &str)]) -> Vec<u8> {
        let v: Vec<u8> = [1.0f32, 0.0, 0.0, 1.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &v).unwrap();
        let meta = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        safetensors::serialize([("quality", view)], Some(meta)).unwrap()
    }

    #[test]
    fn sets_adapted_for_another_tower_are_refused_naming_both_shas() {
        let dir = tempfile::tempdir().unwrap();
        let p = PromptDir::new(dir.path().join("prompts"));
        let bundle = dir.path().join("prompts.safetensors");
        fs::write(&bundle, set_file(&[])).unwrap();
        p.write_next(&set_file(&[("model_sha256", "AAAA")]))
            .unwrap(); // v1: this tower
        p.write_next(&set_file(&[("model_sha256", "bbbb")]))
            .unwrap(); // v2: another
        p.write_next(&set_file(&[])).unwrap(); // v3: written before shas were recorded
        let initial = crate::score::prompts::PromptSet::load(&bundle, 2).unwrap();
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let m = PromptManager::new(
            p.clone(),
            bundle,
            2,
            "aaaa",
            std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(initial)),
            Some(metrics.clone()),
        );
        assert_eq!(m.rollback(1).unwrap(), 1);
        let e = m.rollback(2).unwrap_err();
        assert_eq!(e.kind(), "model_mismatch");
        let msg = e.to_string();
        assert!(
            msg.contains("v0002.safetensors")
                && msg.contains("prompt set v2")
                && msg.contains("bbbb")
                && msg.contains("aaaa"),
            "{msg}"
        );
        assert_eq!(m.active().version, 1, "the active set stays");
        assert_eq!(
            m.rollback(3).unwrap(),
            3,
            "no recorded sha: loaded as before"
        );
        let listed = m.history();
        assert!(listed[2].error.as_deref().unwrap().contains("bbbb"));
        assert!(listed[3].error.is_none());

        // At start, a promoted set for another tower leaves the bundle's own set active,
        // loudly; any other unusable set stops the start.
        p.set_active(2).unwrap();
        m.rollback(0).unwrap();
        p.set_active(2).unwrap();
        assert_eq!(m.start().unwrap(), 0);
        assert_eq!(m.active().version, 0);
        assert_eq!(metrics.prompt_model_mismatch.get(), 1);
        assert_eq!(
            metrics
                .prompt_rejects
                .with_label_values(&["model_mismatch"])
                .get(),
            2
        );
        p.set_active(1).unwrap();
        assert_eq!(m.reload().unwrap(), 1);
        assert_eq!(metrics.prompt_model_mismatch.get(), 0);
        fs::write(p.path(1), b"truncated").unwrap();
        assert_eq!(m.start().unwrap_err().kind(), "invalid");
    }

    #[test]
    fn concurrent_promotions_each_land_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = std::sync::Arc::new(PromptDir::new(dir.path()));
        let writers: Vec<_> = (1..=8u64)
            .map(|v| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        p.set_active(v).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let v = p.active().unwrap().unwrap();
        assert!((1..=8).contains(&v), "{v}");
        let names: Vec<String> = fs::read_dir(p.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["active"], "no temporary file is left");
    }

    #[test]
    fn a_symlink_in_place_of_a_temporary_file_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        fs::write(&target, "keep").unwrap();
        let p = PromptDir::new(dir.path().join("prompts"));
        fs::create_dir_all(p.dir()).unwrap();
        // Every name the next writes of this process could use.
        let pid = std::process::id();
        for seq in 0..10_000 {
            let _ = std::os::unix::fs::symlink(
                &target,
                p.dir().join(format!(".active.tmp-{pid}-{seq}")),
            );
        }
        assert!(
            p.set_active(3).is_err(),
            "an exclusive create refuses the link"
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep");
    }

    #[test]
    fn stale_temp_files_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = PromptDir::new(dir.path());
        assert!(p.remove_stale_temp_files().is_empty());
        // A process that has exited: its PID names no process (until reused).
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        dead.wait().unwrap();
        let dead = dead.id();
        let me = std::process::id();
        for name in [
            format!(".v0002.safetensors.tmp-{dead}"),
            format!(".active.tmp-{dead}"),
            format!(".v0003.safetensors.tmp-{me}"),
            ".v0004.safetensors.tmp-x".to_string(),
            "v0001.safetensors".to_string(),
            "notes.tmp-1".to_string(),
        ] {
            fs::write(p.dir().join(name), b"partial").unwrap();
        }
        let mut removed = p.remove_stale_temp_files();
        removed.sort();
        assert_eq!(
            removed,
            [
                format!(".active.tmp-{dead}"),
                format!(".v0002.safetensors.tmp-{dead}")
            ]
        );
        let mut left: Vec<String> = fs::read_dir(p.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                format!(".v0003.safetensors.tmp-{me}"),
                ".v0004.safetensors.tmp-x".to_string(),
                "notes.tmp-1".to_string(),
                "v0001.safetensors".to_string(),
            ]
        );
        assert_eq!(p.versions(), vec![1]);
    }
}

/// Loads, validates and swaps the daemon's active prompt set: at start, when another
/// process promotes a version (the `active` file changes), and on request (reload,
/// rollback). A set that fails validation, or that was adapted for another visual
/// tower ([`check_model`]), is refused and counted; scoring goes on with the previous
/// one. The swap is one atomic pointer store: the model thread picks the new set up at
/// its next batch, with no lock on the scoring path.
pub struct PromptManager {
    dir: PromptDir,
    bundle_prompts: PathBuf,
    dim: usize,
    model_sha256: String,
    active: super::ActivePrompts,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    seen: std::sync::Mutex<Option<std::time::SystemTime>>,
    /// Held across "write `active`, then swap", so that concurrent rollbacks and
    /// reloads leave the file and the scoring path on the same version.
    switching: std::sync::Mutex<()>,
}

/// One version in the directory, for the API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionInfo {
    /// Version number (0 = the bundle's own set).
    pub version: u64,
    /// The file.
    pub path: PathBuf,
    /// Its metadata (empty if the file cannot be read).
    pub metadata: std::collections::HashMap<String, String>,
    /// Why it cannot be used, if it cannot.
    pub error: Option<String>,
}

impl PromptManager {
    /// A manager over `dir` for a model with embedding size `dim` whose `visual.onnx`
    /// has sha256 `model_sha256`; `active` starts with whatever set the caller loaded
    /// (the bundle's).
    pub fn new(
        dir: PromptDir,
        bundle_prompts: PathBuf,
        dim: usize,
        model_sha256: &str,
        active: super::ActivePrompts,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    ) -> Self {
        Self {
            dir,
            bundle_prompts,
            dim,
            model_sha256: model_sha256.to_ascii_lowercase(),
            active,
            metrics,
            seen: std::sync::Mutex::new(None),
            switching: std::sync::Mutex::new(()),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &PromptDir {
        &self.dir
    }

    /// The embedding size of the model's sets.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The active set.
    pub fn active(&self) -> std::sync::Arc<super::prompts::PromptSet> {
        self.active.load_full()
    }

    fn path_of(&self, v: u64) -> PathBuf {
        if v == 0 {
            self.bundle_prompts.clone()
        } else {
            self.dir.path(v)
        }
    }

    /// Validates `bytes` as version `v` is validated at activation (its shape, the
    /// visual tower it was made for) without writing or activating it; `path` names it
    /// in errors.
    pub fn check_bytes(
        &self,
        v: u64,
        bytes: &[u8],
        path: &Path,
    ) -> Result<(), super::prompts::PromptError> {
        let mut set = super::prompts::PromptSet::parse(bytes, path, self.dim)?;
        set.version = v;
        check_model(&set, &self.model_sha256).map(drop)
    }

    /// Loads and validates version `v` without activating it: its shape, and that it
    /// was made for this model's visual tower ([`check_model`]).
    pub fn load(&self, v: u64) -> Result<super::prompts::PromptSet, super::prompts::PromptError> {
        self.load_checked(v).map(|(set, _)| set)
    }

    fn load_checked(
        &self,
        v: u64,
    ) -> Result<(super::prompts::PromptSet, MadeFor), super::prompts::PromptError> {
        let mut set = super::prompts::PromptSet::load(&self.path_of(v), self.dim)?;
        set.version = v;
        let made_for = check_model(&set, &self.model_sha256)?;
        Ok((set, made_for))
    }

    /// [`load_checked`](Self::load_checked) for activation: refusals are counted and
    /// logged, and a set that records no model says so in the log.
    fn load_for_activation(
        &self,
        v: u64,
    ) -> Result<super::prompts::PromptSet, super::prompts::PromptError> {
        let (set, made_for) = self.load_checked(v).inspect_err(|e| self.reject(e))?;
        if made_for == MadeFor::Unrecorded {
            tracing::warn!(
                version = v,
                path = %set.path.display(),
                model_sha256 = %self.model_sha256,
                "Prompt set records no model_sha256 (written before streamiq recorded the \
                 visual tower a set was adapted for): loaded, checked by its shape only"
            );
        }
        Ok(set)
    }

    /// Activates what `active` names at the daemon's start, like [`reload`](Self::reload),
    /// except that a set adapted for another visual tower (a model upgrade) does not
    /// stop the start: it is refused and counted, the bundle's own set (version 0, which
    /// the caller activated) stays active, and `streamiq_prompt_set_model_mismatch` is
    /// 1 until a set made for this model is activated. Other refusals are returned.
    pub fn start(&self) -> Result<u64, super::prompts::PromptError> {
        match self.reload() {
            Err(e @ super::prompts::PromptError::ModelMismatch { .. }) => {
                tracing::error!(
                    error = %e,
                    "The promoted prompt set was adapted for another model: scoring with the \
                     bundle's own prompt set (version 0) until a set adapted for this model is \
                     promoted or rolled back to"
                );
                if let Some(m) = &self.metrics {
                    m.prompt_model_mismatch.set(1);
                }
                Ok(self.active.load().version)
            }
            other => other,
        }
    }

    fn reject(&self, e: &super::prompts::PromptError) {
        tracing::error!(error = %e, "Prompt set refused; keeping the active one");
        if let Some(m) = &self.metrics {
            m.prompt_rejects.with_label_values(&[e.kind()]).inc();
        }
    }

    fn swap(&self, set: super::prompts::PromptSet) -> u64 {
        let (from, to) = (self.active.load().version, set.version);
        self.active.store(std::sync::Arc::new(set));
        if let Some(m) = &self.metrics {
            m.prompt_version.set(to as i64);
            m.prompt_model_mismatch.set(0);
        }
        if from != to {
            tracing::info!(from, to, "Prompt set switched");
        }
        to
    }

    /// Activates the version the `active` file names (the bundle's set if there is
    /// none). Returns the active version; a bad file is refused, counted and reported.
    pub fn reload(&self) -> Result<u64, super::prompts::PromptError> {
        let _switching = self.switching.lock().unwrap_or_else(|e| e.into_inner());
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = self.dir.active_stamp();
        let v = self
            .dir
            .active()
            .map_err(|source| super::prompts::PromptError::Io {
                path: self.dir.dir().join("active"),
                source,
            })
            .inspect_err(|e| self.reject(e))?
            .unwrap_or(0);
        let set = self.load_for_activation(v)?;
        Ok(self.swap(set))
    }

    /// Activates version `v` (validated first) and records it as the promoted one.
    pub fn rollback(&self, v: u64) -> Result<u64, super::prompts::PromptError> {
        let set = self.load_for_activation(v)?;
        let _switching = self.switching.lock().unwrap_or_else(|e| e.into_inner());
        self.dir
            .set_active(v)
            .map_err(|source| super::prompts::PromptError::Io {
                path: self.dir.dir().join("active"),
                source,
            })?;
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = self.dir.active_stamp();
        Ok(self.swap(set))
    }

    /// Reloads if the `active` file changed since the last look (for the watcher).
    pub fn poll(&self) {
        let stamp = self.dir.active_stamp();
        let changed = *self.seen.lock().unwrap_or_else(|e| e.into_inner()) != stamp;
        if changed {
            let _ = self.reload();
        }
    }

    /// Every version, 0 (the bundle's) first.
    pub fn history(&self) -> Vec<VersionInfo> {
        std::iter::once(0)
            .chain(self.dir.versions())
            .map(|v| {
                let (metadata, error) = match self.load(v) {
                    Ok(s) => (s.metadata, None),
                    Err(e) => (Default::default(), Some(e.to_string())),
                };
                VersionInfo {
                    version: v,
                    path: self.path_of(v),
                    metadata,
                    error,
                }
            })
            .collect()
    }
}
