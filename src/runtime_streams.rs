//! Streams added at run time (`POST /api/v1/streams`, removed with `DELETE
//! /api/v1/streams/{id}`), kept in `server.runtime_streams` (TOML `[[streams]]` tables,
//! like the config's, written atomically with mode 0600: a source may hold credentials)
//! so that they survive a restart and a reload. The running set is always the config
//! file's streams plus these; an id in both is refused.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, MAX_STREAMS, StreamConfig, StreamSettings};

#[derive(Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    streams: Vec<StreamConfig>,
}

/// The streams added at run time and their file.
pub struct RuntimeStreams {
    path: PathBuf,
    list: Mutex<Vec<StreamConfig>>,
}

/// Why a stream cannot be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeStreamError {
    /// The stream's settings are invalid (the key is named as in a config file).
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// The id is taken.
    #[error("stream {0:?} already exists")]
    Exists(String),
    /// The id is a stream of the configuration file, which only a reload changes.
    #[error("stream {0:?} is defined in the configuration file: edit it and reload")]
    FromConfig(String),
    /// No such stream.
    #[error("no stream {0:?}")]
    NotFound(String),
    /// The file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl RuntimeStreams {
    /// Reads `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let list = match std::fs::read_to_string(path) {
            Ok(text) => {
                toml::from_str::<File>(&text)
                    .map_err(|e| ConfigError::Parse {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?
                    .streams
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(ConfigError::Parse {
                    path: path.to_owned(),
                    message: e.to_string(),
                });
            }
        };
        let s = Self {
            path: path.to_owned(),
            list: Mutex::new(list),
        };
        s.settings()?;
        Ok(s)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Vec<StreamConfig>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The streams, validated (keys named `streams[N].key` of this file).
    pub fn settings(&self) -> Result<Vec<StreamSettings>, ConfigError> {
        crate::config::Config::validate_stream_list(&self.lock()).map_err(|e| self.in_file(e))
    }

    fn in_file(&self, e: ConfigError) -> ConfigError {
        match e {
            ConfigError::Invalid { key, value, reason } => ConfigError::Invalid {
                key: format!("{}: {key}", self.path.display()),
                value,
                reason,
            },
            other => other,
        }
    }

    /// Whether `id` was added at run time.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().iter().any(|s| s.id == id)
    }

    /// The config file's streams followed by these; an id in both, or too many streams,
    /// is refused naming this file.
    pub fn combine(&self, config: &[StreamSettings]) -> Result<Vec<StreamSettings>, ConfigError> {
        let mine = self.settings()?;
        let ids: HashSet<&str> = config.iter().map(|s| s.id.as_str()).collect();
        if let Some(dup) = mine.iter().find(|s| ids.contains(s.id.as_str())) {
            return Err(ConfigError::Parse {
                path: self.path.clone(),
                message: format!(
                    "stream {:?} is also in the configuration file: remove one of them",
                    dup.id
                ),
            });
        }
        if config.len() + mine.len() > MAX_STREAMS {
            return Err(ConfigError::Parse {
                path: self.path.clone(),
                message: format!("more than {MAX_STREAMS} streams with the configuration file's"),
            });
        }
        Ok(config.iter().cloned().chain(mine).collect())
    }

    /// Validates `stream` against the running ids, then runs `start` with its settings
    /// and, if that works, records it in the file. `start` failing records nothing;
    /// the file failing runs `undo`.
    pub fn add<E>(
        &self,
        stream: StreamConfig,
        running: &[String],
        start: impl FnOnce(StreamSettings) -> Result<(), E>,
        undo: impl FnOnce(&str),
    ) -> Result<StreamSettings, AddError<E>> {
        let mut list = self.lock();
        let settings = crate::config::Config::validate_stream_list(std::slice::from_ref(&stream))
            .map_err(|e| AddError::Refused(RuntimeStreamError::Invalid(e)))?
            .remove(0);
        if running.contains(&stream.id) || list.iter().any(|s| s.id == stream.id) {
            return Err(AddError::Refused(RuntimeStreamError::Exists(stream.id)));
        }
        if running.len() >= MAX_STREAMS {
            return Err(AddError::Refused(RuntimeStreamError::Invalid(
                ConfigError::Parse {
                    path: self.path.clone(),
                    message: format!("at most {MAX_STREAMS} streams per daemon"),
                },
            )));
        }
        start(settings.clone()).map_err(AddError::Start)?;
        list.push(stream);
        if let Err(e) = self.save(&list) {
            let id = list.pop().map(|s| s.id).unwrap_or_default();
            undo(&id);
            return Err(AddError::Refused(e));
        }
        Ok(settings)
    }

    /// Removes `id` (added at run time) after `stop` stopped it, and records that.
    pub fn remove(
        &self,
        id: &str,
        is_config_stream: bool,
        stop: impl FnOnce(&str),
    ) -> Result<(), RuntimeStreamError> {
        let mut list = self.lock();
        let Some(i) = list.iter().position(|s| s.id == id) else {
            return Err(if is_config_stream {
                RuntimeStreamError::FromConfig(id.to_string())
            } else {
                RuntimeStreamError::NotFound(id.to_string())
            });
        };
        let removed = list.remove(i);
        if let Err(e) = self.save(&list) {
            list.insert(i, removed);
            return Err(e);
        }
        stop(id);
        Ok(())
    }

    fn save(&self, list: &[StreamConfig]) -> Result<(), RuntimeStreamError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| RuntimeStreamError::Io {
            path: self.path.clone(),
            source,
        };
        let text = format!(
            "# Streams added through POST /api/v1/streams; written by streamiq.\n{}",
            toml::to_string_pretty(&File {
                streams: list.to_vec(),
            })
            .expect("stream tables serialise")
        );
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        Ok(())
    }
}

/// [`RuntimeStreams::add`]'s failure: refused before starting, or the start failed.
#[derive(Debug)]
pub enum AddError<E> {
    /// Refused (invalid, taken, or not recorded).
    Refused(RuntimeStreamError),
    /// Starting the stream failed.
    Start(E),
}
