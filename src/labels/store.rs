//! The SQLite label store (`labels.db`): WAL journal, `synchronous = FULL`, one
//! transaction per write, so a stored label survives SIGTERM, a crash or a power cut.
//! The schema is versioned (`schema_version`) and migrated forward on open.
//!
//! Every method blocks: the daemon calls them from `spawn_blocking`, never from a tokio
//! worker. The connection sits behind a mutex, so a [`LabelStore`] can be cloned freely.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};

use super::{Label, NewLabel, decode_embedding, encode_embedding};
use crate::csv::field as csv_field;

/// Schema migrations, in order; `schema_version` holds how many have been applied.
const MIGRATIONS: &[&str] = &[
    // 1: one row per (run, frame, labeller).
    "CREATE TABLE labels (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id         TEXT    NOT NULL,
        stream         TEXT    NOT NULL,
        frame_id       INTEGER NOT NULL,
        captured       REAL    NOT NULL,
        pts            REAL,
        mos            REAL,
        score          REAL,
        target         REAL    NOT NULL CHECK (target BETWEEN 0 AND 1),
        labeller       TEXT    NOT NULL,
        embedding      BLOB    NOT NULL,
        embed_dim      INTEGER NOT NULL CHECK (length(embedding) = 4 * embed_dim),
        bundle         TEXT    NOT NULL,
        model_sha256   TEXT    NOT NULL,
        prompt_version INTEGER NOT NULL,
        model_score    REAL    NOT NULL,
        thumbnail      BLOB    NOT NULL,
        created        REAL    NOT NULL,
        UNIQUE (run_id, frame_id, labeller)
    );
    CREATE INDEX labels_by_model ON labels (model_sha256);",
    // 2: what a model upgrade needs to re-embed a label. `frame`: the frame as scored
    // (the whole working frame the scorer was given), PNG, NULL for labels stored
    // before; `embedding_source`: how the row's embedding was computed (`live` by the
    // daemon, `frame` or `thumbnail` by `streamiq-adapt reembed`); `label_embeddings`:
    // a label's embeddings by other encoders than its current one, kept when it is
    // re-embedded so that returning to an earlier model loses nothing.
    "ALTER TABLE labels ADD COLUMN frame BLOB;
    ALTER TABLE labels ADD COLUMN embedding_source TEXT NOT NULL DEFAULT 'live';
    CREATE TABLE label_embeddings (
        label_id         INTEGER NOT NULL,
        model_sha256     TEXT    NOT NULL,
        bundle           TEXT    NOT NULL,
        embedding        BLOB    NOT NULL,
        embed_dim        INTEGER NOT NULL CHECK (length(embedding) = 4 * embed_dim),
        embedding_source TEXT    NOT NULL,
        PRIMARY KEY (label_id, model_sha256)
    );",
    // 3: labels a replica has stored but the cluster's primary has not yet
    // acknowledged (`cluster.primary`), oldest first; a row goes when the primary has
    // stored the label, or with its label (replaced by a newer one of its frame, or
    // deleted). `refused`: the primary answered that it will not store this label (not
    // sent again until the replica restarts).
    "CREATE TABLE outbox (
        label_id   INTEGER PRIMARY KEY,
        queued     REAL    NOT NULL,
        attempts   INTEGER NOT NULL DEFAULT 0,
        refused    INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE TRIGGER outbox_follows_labels AFTER DELETE ON labels
    BEGIN
        DELETE FROM outbox WHERE label_id = OLD.id;
    END;",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Whether `run_id` can be a label's run id: 1-64 ASCII letters, digits or `-` (a
/// store's own are 16 hex digits).
pub fn valid_run_id(run_id: &str) -> bool {
    !run_id.is_empty()
        && run_id.len() <= 64
        && run_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The columns of a [`Label`], in [`label_from_row`]'s order.
const LABEL_COLUMNS: &str = "id, run_id, stream, frame_id, captured, pts, mos, score, target, \
     labeller, embed_dim, bundle, model_sha256, prompt_version, model_score, created, \
     embedding_source";

/// The label store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    /// The database's directory cannot be created.
    #[error("{path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// SQLite refused an operation.
    #[error("{path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The database was written by a newer streamiq, or is not a label store.
    #[error("{path}: schema version {found}: {reason}")]
    Schema {
        /// The database file.
        path: PathBuf,
        /// The version found (0: none).
        found: i64,
        /// Why it cannot be used.
        reason: String,
    },
    /// The store holds `labels.max_labels` labels already.
    #[error(
        "{path}: the store holds {count} labels, labels.max_labels = {limit}; export and prune old labels to add more"
    )]
    Full {
        /// The database file.
        path: PathBuf,
        /// Labels stored.
        count: u64,
        /// The limit.
        limit: u64,
    },
    /// `cluster.forward_queue_max` labels already wait for the cluster's primary.
    #[error(
        "{path}: {count} labels wait for the cluster's primary (cluster.forward_queue_max = {limit}); they are sent when it answers again"
    )]
    QueueFull {
        /// The database file.
        path: PathBuf,
        /// Labels waiting.
        count: u64,
        /// The limit.
        limit: u64,
    },
    /// A stored row or a label to store is inconsistent.
    #[error("{path}: label {id}: {message}")]
    Invalid {
        /// The database file.
        path: PathBuf,
        /// The row id (0 for a label not yet stored).
        id: i64,
        /// What is wrong.
        message: String,
    },
}

impl LabelError {
    /// Short static name, usable as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Sqlite { .. } => "sqlite",
            Self::Schema { .. } => "schema",
            Self::Full { .. } => "full",
            Self::QueueFull { .. } => "queue_full",
            Self::Invalid { .. } => "invalid",
        }
    }
}

/// A label waiting for the cluster's primary, with its blobs.
#[derive(Debug, Clone)]
pub struct Queued {
    /// The label as stored here.
    pub label: Label,
    /// Its embedding, little-endian f32s.
    pub embedding: Vec<u8>,
    /// Its JPEG thumbnail.
    pub thumbnail: Vec<u8>,
    /// Its frame as PNG, if kept.
    pub frame: Option<Vec<u8>>,
    /// Deliveries tried and failed so far.
    pub attempts: u64,
}

/// [`LabelStore::summary`]'s counts.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSummary {
    /// Labels for the encoder, all streams.
    pub labels_for_model: u64,
    /// Per stream asked for, in order.
    pub streams: Vec<StreamCounts>,
}

/// One stream's part of a [`StoreSummary`].
#[derive(Debug, Clone, PartialEq)]
pub struct StreamCounts {
    /// Stream id.
    pub stream: String,
    /// Its labels for the encoder.
    pub labels: u64,
    /// Targets of its newest labels for the encoder, newest first.
    pub recent_targets: Vec<f64>,
    /// (frame id, mos, target) of its newest labels in the run, newest first.
    pub labelled_frames: Vec<(u64, Option<f64>, f64)>,
}

/// How `GET /api/v1/labels` exports labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// A JSON array of [`Label`] objects.
    Json,
    /// CSV with a header row: [`CSV_COLUMNS`].
    Csv,
}

/// The CSV export's columns.
pub const CSV_COLUMNS: &[&str] = &[
    "id",
    "stream",
    "frame_id",
    "captured",
    "mos",
    "target",
    "labeller",
    "model_score",
    "prompt_version",
    "bundle",
    "created",
];

/// The result of [`LabelStore::insert`].
#[derive(Debug, Clone, PartialEq)]
pub struct Inserted {
    /// The label as stored.
    pub label: Label,
    /// Whether it replaced an earlier label of the same frame by the same labeller.
    pub replaced: bool,
}

/// A label whose current embedding is by another encoder than the one asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ReembedCandidate {
    /// The label's id.
    pub id: i64,
    /// The encoder of its current embedding.
    pub model_sha256: String,
    /// An embedding by the encoder asked for is kept (`label_embeddings`): it was by that
    /// encoder before, so nothing needs computing.
    pub kept: bool,
    /// Its frame is stored (labels stored before frames were kept have only their
    /// thumbnail).
    pub has_frame: bool,
}

/// What an embedding was computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingSource {
    /// By the daemon, from the live frame, when the label was made.
    Live,
    /// By `streamiq-adapt reembed`, from the stored frame (PNG, lossless).
    Frame,
    /// By `streamiq-adapt reembed`, from the stored thumbnail (JPEG; labels stored
    /// before frames were kept).
    Thumbnail,
}

impl EmbeddingSource {
    /// The name stored in `embedding_source`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Frame => "frame",
            Self::Thumbnail => "thumbnail",
        }
    }
}

/// One label's move to another encoder, for [`LabelStore::apply_reembedding`].
#[derive(Debug, Clone, PartialEq)]
pub struct Reembedded {
    /// The label's id.
    pub id: i64,
    /// The encoder of its current embedding when it was read; the move is skipped if
    /// that changed since.
    pub from_sha256: String,
    /// The new embedding and what it was computed from; `None` takes the embedding
    /// kept from the label's earlier time with the target encoder.
    pub embedding: Option<(Vec<f32>, EmbeddingSource)>,
}

/// The label store: one SQLite connection, used from blocking threads only.
#[derive(Clone)]
pub struct LabelStore {
    path: PathBuf,
    run_id: String,
    conn: Arc<Mutex<Connection>>,
    max_labels: u64,
}

impl std::fmt::Debug for LabelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabelStore")
            .field("path", &self.path)
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> f64 {
    crate::state::unix_seconds(std::time::SystemTime::now())
}

impl LabelStore {
    /// Opens (or creates, with its parent directories) the database at `path`, switches it
    /// to WAL with `synchronous = FULL`, and migrates the schema. Frame ids restart with
    /// every process, so each store handle gets a fresh random run id that is recorded
    /// with every label it writes.
    pub fn open(path: &Path) -> Result<Self, LabelError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| LabelError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let sql = |source| LabelError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "Label store is not in WAL mode");
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        migrate(&mut conn, path)?;
        let run_id = format!("{:016x}", fastrand::u64(..));
        Ok(Self {
            path: path.to_owned(),
            run_id,
            conn: Arc::new(Mutex::new(conn)),
            max_labels: u64::MAX,
        })
    }

    /// The store with a limit on the labels it holds (`labels.max_labels`): an insert
    /// beyond it fails with [`LabelError::Full`]; nothing stored is deleted to make room.
    pub fn with_max_labels(mut self, max_labels: u64) -> Self {
        self.max_labels = max_labels;
        self
    }

    /// A separate read-only connection (WAL: it reads a snapshot while inserts go on
    /// through the shared one), for long reads such as exports.
    fn reader(&self) -> Result<Connection, LabelError> {
        let sql = self.sql();
        let conn = Connection::open_with_flags(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(&sql)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(&sql)?;
        Ok(conn)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The run id recorded with every label this handle writes.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> LabelError + '_ {
        |source| LabelError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn invalid(&self, id: i64, message: impl Into<String>) -> LabelError {
        LabelError::Invalid {
            path: self.path.clone(),
            id,
            message: message.into(),
        }
    }

    /// Stores a label in one durable transaction. An earlier label of the same frame (in
    /// this run) by the same labeller is replaced; the new row gets a new id.
    pub fn insert(&self, l: &NewLabel) -> Result<Inserted, LabelError> {
        self.insert_row(&self.run_id, l, None)
    }

    /// [`insert`](Self::insert) for a label another daemon stored first (a replica
    /// forwarding to the cluster's primary), under that daemon's `run_id`: its frame ids
    /// count in that run, and a label sent twice replaces itself instead of doubling.
    pub fn insert_from(&self, run_id: &str, l: &NewLabel) -> Result<Inserted, LabelError> {
        self.insert_in_run(run_id, l, None)
    }

    /// [`insert`](Self::insert), or with `queue_max` [`insert_queued`](Self::insert_queued),
    /// under `run_id` instead of this run's: for a frame scored by an earlier run (an
    /// incident's frame labelled after a restart), whose frame id counts in that run and
    /// must not replace the label of this run's frame with the same id.
    pub fn insert_in_run(
        &self,
        run_id: &str,
        l: &NewLabel,
        queue_max: Option<u64>,
    ) -> Result<Inserted, LabelError> {
        if !valid_run_id(run_id) {
            return Err(self.invalid(
                0,
                format!("run_id {run_id:?}: expected 1-64 letters, digits or '-'"),
            ));
        }
        self.insert_row(run_id, l, queue_max)
    }

    /// [`insert`](Self::insert), and in the same transaction queues the label for the
    /// cluster's primary ([`outbox`](Self::outbox)). With `queue_max` labels queued
    /// already, nothing is stored and [`LabelError::QueueFull`] says so.
    pub fn insert_queued(&self, l: &NewLabel, queue_max: u64) -> Result<Inserted, LabelError> {
        self.insert_row(&self.run_id, l, Some(queue_max))
    }

    fn insert_row(
        &self,
        run_id: &str,
        l: &NewLabel,
        queue_max: Option<u64>,
    ) -> Result<Inserted, LabelError> {
        let target = l.rating.target();
        if !(0.0..=1.0).contains(&target) {
            return Err(self.invalid(0, format!("target {target} outside 0..1")));
        }
        if l.embedding.is_empty() {
            return Err(self.invalid(0, "empty embedding"));
        }
        let frame_id = i64::try_from(l.frame_id)
            .map_err(|_| self.invalid(0, format!("frame_id {} too large", l.frame_id)))?;
        let prompt_version = i64::try_from(l.prompt_version).map_err(|_| {
            self.invalid(0, format!("prompt_version {} too large", l.prompt_version))
        })?;
        let sql = self.sql();
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&sql)?;
        const EARLIER: &str =
            "(SELECT id FROM labels WHERE run_id = ?1 AND frame_id = ?2 AND labeller = ?3)";
        tx.execute(
            &format!("DELETE FROM label_embeddings WHERE label_id IN {EARLIER}"),
            params![run_id, frame_id, l.labeller],
        )
        .map_err(&sql)?;
        // A queued earlier label is superseded (its outbox row goes with it, by the
        // trigger): only the newest rating travels.
        let replaced = tx
            .execute(
                "DELETE FROM labels WHERE run_id = ?1 AND frame_id = ?2 AND labeller = ?3",
                params![run_id, frame_id, l.labeller],
            )
            .map_err(&sql)?
            > 0;
        let count = tx
            .query_row("SELECT count(*) FROM labels", [], |r| r.get::<_, i64>(0))
            .map_err(&sql)? as u64;
        if count >= self.max_labels {
            // Dropping the transaction rolls the replacement back: the earlier label stays.
            return Err(LabelError::Full {
                path: self.path.clone(),
                count,
                limit: self.max_labels,
            });
        }
        if let Some(limit) = queue_max {
            let queued = tx
                .query_row("SELECT count(*) FROM outbox WHERE refused = 0", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(&sql)? as u64;
            if queued >= limit {
                return Err(LabelError::QueueFull {
                    path: self.path.clone(),
                    count: queued,
                    limit,
                });
            }
        }
        tx.execute(
            "INSERT INTO labels (run_id, stream, frame_id, captured, pts, mos, score, target,
                 labeller, embedding, embed_dim, bundle, model_sha256, prompt_version,
                 model_score, thumbnail, created, frame)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                 ?18)",
            params![
                run_id,
                l.stream,
                frame_id,
                l.captured,
                l.pts,
                l.rating.mos(),
                l.rating.score(),
                target,
                l.labeller,
                encode_embedding(&l.embedding),
                l.embedding.len() as i64,
                l.provenance.bundle,
                l.provenance.model_sha256,
                prompt_version,
                shortest_f64(l.model_score),
                l.thumbnail,
                unix_now(),
                l.frame,
            ],
        )
        .map_err(&sql)?;
        let id = tx.last_insert_rowid();
        if queue_max.is_some() {
            tx.execute(
                "INSERT INTO outbox (label_id, queued) VALUES (?1, ?2)",
                params![id, unix_now()],
            )
            .map_err(&sql)?;
        }
        let label = tx
            .query_row(
                &format!("SELECT {LABEL_COLUMNS} FROM labels WHERE id = ?1"),
                [id],
                label_from_row,
            )
            .map_err(&sql)?;
        tx.commit().map_err(&sql)?;
        Ok(Inserted { label, replaced })
    }

    /// Labels queued for the cluster's primary ([`insert_queued`](Self::insert_queued))
    /// and labels it refused ([`refused`](Self::refused)).
    pub fn outbox_len(&self) -> Result<(u64, u64), LabelError> {
        self.conn()
            .query_row(
                "SELECT count(*) - coalesce(sum(refused), 0), coalesce(sum(refused), 0)
                 FROM outbox",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .map_err(self.sql())
    }

    /// Queues the labels the primary refused again (a replica's start: the cause may
    /// have been fixed); returns how many.
    pub fn retry_refused(&self) -> Result<usize, LabelError> {
        self.conn()
            .execute("UPDATE outbox SET refused = 0 WHERE refused = 1", [])
            .map_err(self.sql())
    }

    /// Up to `limit` queued labels (not refused) with a label id above `after`, oldest
    /// first, each with everything the primary needs to store it.
    pub fn outbox(&self, after: i64, limit: usize) -> Result<Vec<Queued>, LabelError> {
        let sql = self.sql();
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {LABEL_COLUMNS}, embedding, thumbnail, frame, o.attempts
                 FROM outbox o JOIN labels l ON l.id = o.label_id
                 WHERE o.label_id > ?1 AND o.refused = 0 ORDER BY o.label_id LIMIT ?2"
            ))
            .map_err(&sql)?;
        let rows = stmt
            .query_map(
                params![after, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| {
                    Ok(Queued {
                        label: label_from_row(r)?,
                        embedding: r.get(17)?,
                        thumbnail: r.get(18)?,
                        frame: r.get(19)?,
                        attempts: r.get::<_, i64>(20)? as u64,
                    })
                },
            )
            .map_err(&sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// The primary stored label `id`: it leaves the queue.
    pub fn delivered(&self, id: i64) -> Result<(), LabelError> {
        self.conn()
            .execute("DELETE FROM outbox WHERE label_id = ?1", [id])
            .map(drop)
            .map_err(self.sql())
    }

    /// The primary answered that it will not store label `id`: it stays in the store
    /// and out of the queue, with the reason, until [`retry_refused`](Self::retry_refused).
    pub fn refused(&self, id: i64, error: &str) -> Result<(), LabelError> {
        self.conn()
            .execute(
                "UPDATE outbox SET attempts = attempts + 1, refused = 1, last_error = ?2
                 WHERE label_id = ?1",
                params![id, error],
            )
            .map(drop)
            .map_err(self.sql())
    }

    /// Label `id` could not be delivered (no answer): it stays queued, with the reason.
    pub fn delivery_failed(&self, id: i64, error: &str) -> Result<(), LabelError> {
        self.conn()
            .execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?2 WHERE label_id = ?1",
                params![id, error],
            )
            .map(drop)
            .map_err(self.sql())
    }

    /// Labels with an id above `since`, oldest first, at most `limit` (all if `None`).
    pub fn list(&self, since: i64, limit: Option<usize>) -> Result<Vec<Label>, LabelError> {
        Self::list_on(&self.conn(), &self.sql(), since, limit)
    }

    fn list_on(
        conn: &Connection,
        sql: &impl Fn(rusqlite::Error) -> LabelError,
        since: i64,
        limit: Option<usize>,
    ) -> Result<Vec<Label>, LabelError> {
        let limit = limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {LABEL_COLUMNS} FROM labels WHERE id > ?1 ORDER BY id LIMIT ?2"
            ))
            .map_err(&sql)?;
        let rows = stmt
            .query_map(params![since, limit], label_from_row)
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)
    }

    /// What the labelling page's summary needs, counted and limited by SQLite instead of
    /// read row by row: labels for the encoder `model_sha256` (any case) in all and for
    /// each of `streams`, each stream's newest `recent` targets for that encoder, and its
    /// newest `frames` labelled frames of the run `run_id` as (frame id, mos, target).
    pub fn summary(
        &self,
        model_sha256: &str,
        run_id: &str,
        streams: &[&str],
        recent: usize,
        frames: usize,
    ) -> Result<StoreSummary, LabelError> {
        let sql = self.sql();
        let conn = self.conn();
        let model = model_sha256.to_ascii_lowercase();
        let for_model: i64 = conn
            .query_row(
                "SELECT count(*) FROM labels WHERE lower(model_sha256) = ?1",
                [&model],
                |r| r.get(0),
            )
            .map_err(&sql)?;
        let mut out = StoreSummary {
            labels_for_model: for_model as u64,
            streams: Vec::with_capacity(streams.len()),
        };
        let mut count = conn
            .prepare_cached(
                "SELECT count(*) FROM labels WHERE stream = ?1 AND lower(model_sha256) = ?2",
            )
            .map_err(&sql)?;
        let mut targets = conn
            .prepare_cached(
                "SELECT target FROM labels WHERE stream = ?1 AND lower(model_sha256) = ?2
                 ORDER BY id DESC LIMIT ?3",
            )
            .map_err(&sql)?;
        let mut labelled = conn
            .prepare_cached(
                "SELECT frame_id, mos, target FROM labels WHERE stream = ?1 AND run_id = ?2
                 ORDER BY id DESC LIMIT ?3",
            )
            .map_err(&sql)?;
        for stream in streams {
            let n: i64 = count
                .query_row(params![stream, model], |r| r.get(0))
                .map_err(&sql)?;
            let recent_targets = targets
                .query_map(params![stream, model, recent as i64], |r| r.get(0))
                .map_err(&sql)?
                .collect::<Result<Vec<f64>, _>>()
                .map_err(&sql)?;
            let labelled_frames = labelled
                .query_map(params![stream, run_id, frames as i64], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
                })
                .map_err(&sql)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(&sql)?;
            out.streams.push(StreamCounts {
                stream: stream.to_string(),
                labels: n as u64,
                recent_targets,
                labelled_frames,
            });
        }
        Ok(out)
    }

    /// How many labels are stored.
    pub fn count(&self) -> Result<u64, LabelError> {
        self.conn()
            .query_row("SELECT count(*) FROM labels", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(self.sql())
    }

    /// The stored JPEG thumbnail of label `id`.
    pub fn thumbnail(&self, id: i64) -> Result<Option<Vec<u8>>, LabelError> {
        self.conn()
            .query_row("SELECT thumbnail FROM labels WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.sql())
    }

    /// The stored embedding of label `id`.
    pub fn embedding(&self, id: i64) -> Result<Option<Vec<f32>>, LabelError> {
        let blob: Option<Vec<u8>> = self
            .conn()
            .query_row("SELECT embedding FROM labels WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.sql())?;
        blob.map(|b| decode_embedding(&b).ok_or_else(|| self.invalid(id, "embedding blob")))
            .transpose()
    }

    /// The labels whose current embedding is not by the encoder `model_sha256`, oldest
    /// first: what [`reembed`](super::reembed::reembed) has to bring over to it.
    pub fn reembed_candidates(
        &self,
        model_sha256: &str,
    ) -> Result<Vec<ReembedCandidate>, LabelError> {
        let sql = self.sql();
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT l.id, l.model_sha256, e.label_id IS NOT NULL, l.frame IS NOT NULL
                 FROM labels l LEFT JOIN label_embeddings e
                     ON e.label_id = l.id AND e.model_sha256 = ?1
                 WHERE l.model_sha256 != ?1 ORDER BY l.id",
            )
            .map_err(&sql)?;
        let rows = stmt
            .query_map([model_sha256.to_ascii_lowercase()], |r| {
                Ok(ReembedCandidate {
                    id: r.get(0)?,
                    model_sha256: r.get(1)?,
                    kept: r.get(2)?,
                    has_frame: r.get(3)?,
                })
            })
            .map_err(&sql)?;
        rows.collect::<Result<_, _>>().map_err(&sql)
    }

    /// How many labels have their current embedding by the encoder `model_sha256`.
    pub fn count_for_model(&self, model_sha256: &str) -> Result<u64, LabelError> {
        self.conn()
            .query_row(
                "SELECT count(*) FROM labels WHERE model_sha256 = ?1",
                [model_sha256.to_ascii_lowercase()],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(self.sql())
    }

    /// The stored frame (PNG) of label `id`, if it has one (labels stored before frames
    /// were kept have only their thumbnail).
    pub fn frame(&self, id: i64) -> Result<Option<Vec<u8>>, LabelError> {
        self.conn()
            .query_row("SELECT frame FROM labels WHERE id = ?1", [id], |r| {
                r.get::<_, Option<Vec<u8>>>(0)
            })
            .optional()
            .map(Option::flatten)
            .map_err(self.sql())
    }

    /// Moves labels over to the encoder `to`, in one durable transaction: each label's
    /// current embedding goes to `label_embeddings` (kept for a return to that encoder)
    /// and the new one takes its place: the one computed ([`Reembedded::embedding`]), or
    /// the one kept from an earlier move to `to`. A label that was replaced or moved by
    /// someone else since it was read (its encoder is no longer `from_sha256`) is left
    /// alone. Nothing is written unless everything is. Returns how many labels moved.
    pub fn apply_reembedding(
        &self,
        to: &super::Provenance,
        items: &[Reembedded],
    ) -> Result<usize, LabelError> {
        let to_sha = to.model_sha256.to_ascii_lowercase();
        let sql = self.sql();
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&sql)?;
        let mut moved = 0;
        for item in items {
            let current: Option<(String, String, Vec<u8>, i64, String)> = tx
                .query_row(
                    "SELECT model_sha256, bundle, embedding, embed_dim, embedding_source
                     FROM labels WHERE id = ?1",
                    [item.id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()
                .map_err(&sql)?;
            let Some((sha, bundle, blob, dim, source)) = current else {
                continue;
            };
            if !sha.eq_ignore_ascii_case(&item.from_sha256) {
                continue;
            }
            let new: Option<(Vec<u8>, i64, String)> = match &item.embedding {
                Some((e, source)) => Some((
                    encode_embedding(e),
                    e.len() as i64,
                    source.as_str().to_string(),
                )),
                None => tx
                    .query_row(
                        "SELECT embedding, embed_dim, embedding_source FROM label_embeddings
                         WHERE label_id = ?1 AND model_sha256 = ?2",
                        params![item.id, to_sha],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()
                    .map_err(&sql)?,
            };
            let Some((new_blob, new_dim, new_source)) = new else {
                continue;
            };
            if new_dim == 0 {
                return Err(self.invalid(item.id, "empty embedding"));
            }
            tx.execute(
                "INSERT OR REPLACE INTO label_embeddings
                     (label_id, model_sha256, bundle, embedding, embed_dim, embedding_source)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![item.id, sha.to_ascii_lowercase(), bundle, blob, dim, source],
            )
            .map_err(&sql)?;
            tx.execute(
                "DELETE FROM label_embeddings WHERE label_id = ?1 AND model_sha256 = ?2",
                params![item.id, to_sha],
            )
            .map_err(&sql)?;
            tx.execute(
                "UPDATE labels SET embedding = ?2, embed_dim = ?3, bundle = ?4,
                     model_sha256 = ?5, embedding_source = ?6
                 WHERE id = ?1",
                params![item.id, new_blob, new_dim, to.bundle, to_sha, new_source],
            )
            .map_err(&sql)?;
            moved += 1;
        }
        tx.commit().map_err(&sql)?;
        Ok(moved)
    }

    /// Writes the labels with an id above `since` into `out` (which must not exist, or be
    /// empty) as a set `streamiq eval` reads directly: `images/label-ID.png` (the frame as
    /// scored; `.jpg`, the thumbnail, for a label stored without it) and `labels.csv` with
    /// `path, mos, type` (`mos` as given, or `1 + 4 x target` for a 0-1 score; `type` is
    /// the stream) and then `id, labeller, target, model_score, model_sha256, image`.
    /// Reads one label at a time through its own connection. Returns how many labels.
    pub fn export_dir(&self, out: &Path, since: i64) -> Result<usize, LabelError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| LabelError::Io { path, source }
        };
        if out.exists() && std::fs::read_dir(out).map_err(io(out))?.next().is_some() {
            return Err(LabelError::Io {
                path: out.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "not empty: export into a new directory",
                ),
            });
        }
        let images = out.join("images");
        std::fs::create_dir_all(&images).map_err(io(&images))?;
        let sql = self.sql();
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare(
                "SELECT id, stream, mos, target, labeller, model_score, model_sha256, frame, thumbnail
                 FROM labels WHERE id > ?1 ORDER BY id",
            )
            .map_err(&sql)?;
        let mut rows = stmt.query([since]).map_err(&sql)?;
        let mut csv =
            String::from("path,mos,type,id,labeller,target,model_score,model_sha256,image\n");
        let mut n = 0;
        while let Some(r) = rows.next().map_err(&sql)? {
            let id: i64 = r.get(0).map_err(&sql)?;
            let stream: String = r.get(1).map_err(&sql)?;
            let mos: Option<f64> = r.get(2).map_err(&sql)?;
            let target: f64 = r.get(3).map_err(&sql)?;
            let labeller: String = r.get(4).map_err(&sql)?;
            let model_score: f64 = r.get(5).map_err(&sql)?;
            let sha: String = r.get(6).map_err(&sql)?;
            let frame: Option<Vec<u8>> = r.get(7).map_err(&sql)?;
            let (name, bytes, kind) = match frame {
                Some(png) => (format!("label-{id}.png"), png, "frame"),
                None => (
                    format!("label-{id}.jpg"),
                    r.get(8).map_err(&sql)?,
                    "thumbnail",
                ),
            };
            let path = images.join(&name);
            std::fs::write(&path, bytes).map_err(io(&path))?;
            let mos = mos.unwrap_or(1.0 + 4.0 * target);
            use std::fmt::Write;
            let _ = writeln!(
                csv,
                "images/{name},{mos},{},{id},{},{target},{model_score},{},{kind}",
                crate::csv::field(&stream),
                crate::csv::field(&labeller),
                crate::csv::field(&sha),
            );
            n += 1;
        }
        let list = out.join("labels.csv");
        std::fs::write(&list, csv).map_err(io(&list))?;
        Ok(n)
    }

    /// [`list`](Self::list), written as JSON or CSV (without the blobs).
    pub fn export(
        &self,
        since: i64,
        limit: Option<usize>,
        format: ExportFormat,
    ) -> Result<String, LabelError> {
        // Its own connection: a long export never holds up the inserts.
        let labels = Self::list_on(&self.reader()?, &self.sql(), since, limit)?;
        Ok(match format {
            ExportFormat::Json => serde_json::to_string(&labels).expect("labels serialise to JSON"),
            ExportFormat::Csv => to_csv(&labels),
        })
    }
}

/// Creates `schema_version` if needed and applies the migrations it has not seen, in one
/// transaction; refuses a database written by a newer build.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), LabelError> {
    let sql = |source| LabelError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .map_err(sql)?;
    let found: Option<i64> = tx
        .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
        .map_err(sql)?;
    let found = found.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(LabelError::Schema {
            path: path.to_owned(),
            found,
            reason: format!("newer than this build's {SCHEMA_VERSION}; upgrade streamiq"),
        });
    }
    if found == SCHEMA_VERSION {
        return tx.commit().map_err(sql);
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        tx.execute_batch(step).map_err(sql)?;
        tracing::info!(path = %path.display(), version = i + 1, "Label store migrated");
    }
    tx.execute("DELETE FROM schema_version", []).map_err(sql)?;
    tx.execute(
        "INSERT INTO schema_version (version) VALUES (?1)",
        [SCHEMA_VERSION],
    )
    .map_err(sql)?;
    tx.commit().map_err(sql)
}

/// The f64 that prints like the f32 does (0.42f32 -> 0.42, not 0.41999998688697815).
fn shortest_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

fn label_from_row(r: &Row<'_>) -> rusqlite::Result<Label> {
    Ok(Label {
        id: r.get(0)?,
        run_id: r.get(1)?,
        stream: r.get(2)?,
        frame_id: r.get::<_, i64>(3)? as u64,
        captured: r.get(4)?,
        pts: r.get(5)?,
        mos: r.get(6)?,
        score: r.get(7)?,
        target: r.get(8)?,
        labeller: r.get(9)?,
        embed_dim: r.get::<_, i64>(10)? as usize,
        bundle: r.get(11)?,
        model_sha256: r.get(12)?,
        prompt_version: r.get::<_, i64>(13)? as u64,
        model_score: r.get(14)?,
        created: r.get(15)?,
        embedding_source: r.get(16)?,
    })
}

/// Labels as CSV with a header row ([`CSV_COLUMNS`]).
pub fn to_csv(labels: &[Label]) -> String {
    let mut out = CSV_COLUMNS.join(",");
    out.push('\n');
    for l in labels {
        let mos = l.mos.map(|m| m.to_string()).unwrap_or_default();
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{}",
            l.id,
            csv_field(&l.stream),
            l.frame_id,
            l.captured,
            mos,
            l.target,
            csv_field(&l.labeller),
            l.model_score,
            l.prompt_version,
            csv_field(&l.bundle),
            l.created,
        );
    }
    out
}

/// The training pairs for one encoder: `(embedding, target)` of every label whose
/// embedding was computed by the `visual.onnx` with sha256 `model_sha256`, oldest first.
/// Opens `db` read-only; for `streamiq-adapt`.
pub fn load_training_set(
    db: &Path,
    model_sha256: &str,
) -> Result<Vec<(Vec<f32>, f32)>, LabelError> {
    let sql = |source| LabelError::Sqlite {
        path: db.to_owned(),
        source,
    };
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
    let versioned: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .map_err(sql)?;
    let version = if versioned == 0 {
        0
    } else {
        conn.query_row("SELECT max(version) FROM schema_version", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .map_err(sql)?
        .unwrap_or(0)
    };
    if !(1..=SCHEMA_VERSION).contains(&version) {
        return Err(LabelError::Schema {
            path: db.to_owned(),
            found: version,
            reason: format!("this build reads versions 1..={SCHEMA_VERSION}"),
        });
    }
    let mut stmt = conn
        .prepare(
            "SELECT id, embedding, embed_dim, target FROM labels
             WHERE model_sha256 = ?1 ORDER BY id",
        )
        .map_err(sql)?;
    let rows = stmt
        .query_map([model_sha256.to_ascii_lowercase()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, f64>(3)?,
            ))
        })
        .map_err(sql)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, blob, dim, target) = row.map_err(sql)?;
        let embedding = decode_embedding(&blob)
            .filter(|e| e.len() as i64 == dim)
            .ok_or_else(|| LabelError::Invalid {
                path: db.to_owned(),
                id,
                message: format!("embedding blob of {} bytes, embed_dim {dim}", blob.len()),
            })?;
        out.push((embedding, target as f32));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{Provenance, Rating};

    fn label(frame_id: u64, rating: Rating, labeller: &str, sha: &str) -> NewLabel {
        NewLabel {
            stream: "cam-a".into(),
            frame_id,
            captured: 1_700_000_000.5,
            pts: Some(1.25),
            rating,
            labeller: labeller.into(),
            embedding: vec![0.6, 0.8, 0.0, 0.0],
            provenance: Provenance {
                bundle: "streamiq-test".into(),
                model_sha256: sha.into(),
            },
            prompt_version: 3,
            model_score: 0.42,
            thumbnail: vec![0xff, 0xd8, 0xff, 0xe0],
            frame: None,
        }
    }

    fn temp_db() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/state/labels.sqlite");
        (dir, path)
    }

    #[test]
    fn the_outbox_is_bounded_superseded_by_relabelling_and_round_trips_to_the_primary() {
        let (_dir, path) = temp_db();
        let sha = "a".repeat(64);
        let replica = LabelStore::open(&path).unwrap();
        let a = replica
            .insert_queued(&label(1, Rating::Mos(2.0), "ann", &sha), 2)
            .unwrap();
        replica
            .insert_queued(&label(2, Rating::Mos(3.0), "ann", &sha), 2)
            .unwrap();
        // Full: refused, nothing stored, the queued ones intact.
        let e = replica
            .insert_queued(&label(3, Rating::Mos(4.0), "ann", &sha), 2)
            .unwrap_err();
        assert!(
            matches!(
                e,
                LabelError::QueueFull {
                    count: 2,
                    limit: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            (replica.count().unwrap(), replica.outbox_len().unwrap()),
            (2, (2, 0))
        );
        // Relabelling frame 1 replaces its queued label: still two queued, the new one.
        let a2 = replica
            .insert_queued(&label(1, Rating::Mos(5.0), "ann", &sha), 2)
            .unwrap();
        assert!(a2.replaced);
        let queued = replica.outbox(0, 10).unwrap();
        let ids: Vec<i64> = queued.iter().map(|q| q.label.id).collect();
        assert!(
            !ids.contains(&a.label.id) && ids.contains(&a2.label.id),
            "{ids:?}"
        );
        assert_eq!(queued.len(), 2);

        // The primary stores each under the replica's run id; sending one twice
        // replaces it instead of counting it twice.
        let (_dir2, path2) = temp_db();
        let primary = LabelStore::open(&path2).unwrap();
        for q in queued.iter().chain(&queued[..1]) {
            let body = crate::labels::forward::request_body(q, 1);
            let req: crate::labels::LabelRequest = serde_json::from_value(body).unwrap();
            let v = req.validate().unwrap();
            let crate::labels::LabelTarget::Forwarded(f) = v.target else {
                panic!("not forwarded")
            };
            assert_eq!(f.label.embedding, vec![0.6, 0.8, 0.0, 0.0]);
            assert_eq!(f.label.thumbnail, q.thumbnail);
            primary.insert_from(&f.run_id, &f.label).unwrap();
            replica.delivered(q.label.id).unwrap();
        }
        let stored = primary.list(0, None).unwrap();
        assert_eq!(stored.len(), 2);
        assert!(stored.iter().all(|l| l.run_id == replica.run_id()));
        assert_eq!(
            stored.iter().map(|l| l.mos).collect::<Vec<_>>(),
            vec![Some(5.0), Some(3.0)]
        );
        assert_eq!(replica.outbox_len().unwrap(), (0, 0));
        assert!(
            primary
                .insert_from("", &label(9, Rating::Mos(1.0), "ann", &sha))
                .is_err()
        );

        // A refused label leaves the queue (and its bound) until retried; a deleted
        // label leaves the outbox with it.
        let c = replica
            .insert_queued(&label(3, Rating::Mos(4.0), "ann", &sha), 1)
            .unwrap();
        replica.refused(c.label.id, "409 another model").unwrap();
        assert_eq!(replica.outbox_len().unwrap(), (0, 1));
        assert!(replica.outbox(0, 10).unwrap().is_empty());
        let d = replica
            .insert_queued(&label(4, Rating::Mos(4.0), "ann", &sha), 1)
            .unwrap();
        assert_eq!(replica.retry_refused().unwrap(), 1);
        assert_eq!(replica.outbox_len().unwrap(), (2, 0));
        replica
            .conn()
            .execute("DELETE FROM labels WHERE id = ?1", [d.label.id])
            .unwrap();
        assert_eq!(replica.outbox_len().unwrap(), (1, 0));
    }

    #[test]
    fn insert_list_count_and_blobs() {
        let (_dir, path) = temp_db();
        let store = LabelStore::open(&path).unwrap();
        assert_eq!(store.count().unwrap(), 0);
        let a = store
            .insert(&label(5, Rating::Mos(4.0), "operator", "aa"))
            .unwrap();
        assert!(!a.replaced);
        assert_eq!(a.label.target, 0.75);
        assert_eq!(a.label.mos, Some(4.0));
        assert_eq!(a.label.score, None);
        assert_eq!(a.label.embed_dim, 4);
        assert_eq!(a.label.run_id, store.run_id());
        assert_eq!(a.label.pts, Some(1.25));
        assert_eq!(a.label.model_score, 0.42);
        let b = store
            .insert(&label(6, Rating::Score(0.1), "operator", "aa"))
            .unwrap();
        assert!(b.label.id > a.label.id);
        assert_eq!(store.count().unwrap(), 2);
        let all = store.list(0, None).unwrap();
        assert_eq!(all, vec![a.label.clone(), b.label.clone()]);
        assert_eq!(store.list(a.label.id, None).unwrap(), vec![b.label.clone()]);
        assert_eq!(store.list(0, Some(1)).unwrap(), vec![a.label.clone()]);
        assert_eq!(
            store.thumbnail(a.label.id).unwrap().unwrap(),
            vec![0xff, 0xd8, 0xff, 0xe0]
        );
        assert_eq!(
            store.embedding(a.label.id).unwrap().unwrap(),
            vec![0.6, 0.8, 0.0, 0.0]
        );
        assert!(store.thumbnail(999).unwrap().is_none());
    }

    #[test]
    fn summary_counts_by_encoder_stream_and_run_in_sql() {
        let (_dir, path) = temp_db();
        let old = LabelStore::open(&path).unwrap();
        let at = |stream: &str, mut l: NewLabel| {
            l.stream = stream.into();
            l
        };
        old.insert(&at("cam", label(1, Rating::Mos(1.0), "o", "aa")))
            .unwrap();
        old.insert(&at("cam", label(2, Rating::Mos(5.0), "o", "bb")))
            .unwrap();
        let now = LabelStore::open(&path).unwrap();
        now.insert(&at("cam", label(3, Rating::Mos(5.0), "o", "AA")))
            .unwrap();
        now.insert(&at("gone", label(4, Rating::Mos(3.0), "o", "aa")))
            .unwrap();
        let s = now
            .summary("aa", now.run_id(), &["cam", "idle"], 10, 10)
            .unwrap();
        assert_eq!(s.labels_for_model, 3, "every stream, any case of the sha");
        assert_eq!(s.streams.len(), 2);
        let cam = &s.streams[0];
        assert_eq!((cam.stream.as_str(), cam.labels), ("cam", 2));
        assert_eq!(cam.recent_targets, vec![1.0, 0.0], "newest first");
        assert_eq!(
            cam.labelled_frames,
            vec![(3, Some(5.0), 1.0)],
            "this run's only"
        );
        assert_eq!(
            (s.streams[1].labels, s.streams[1].recent_targets.len()),
            (0, 0)
        );
        let capped = now.summary("aa", now.run_id(), &["cam"], 1, 0).unwrap();
        assert_eq!(capped.streams[0].recent_targets, vec![1.0]);
        assert!(capped.streams[0].labelled_frames.is_empty());
    }

    #[test]
    fn a_full_store_refuses_new_labels_and_keeps_what_it_has() {
        let (_dir, path) = temp_db();
        let store = LabelStore::open(&path).unwrap().with_max_labels(2);
        store
            .insert(&label(1, Rating::Mos(2.0), "ana", "aa"))
            .unwrap();
        store
            .insert(&label(2, Rating::Mos(3.0), "ana", "aa"))
            .unwrap();
        let e = store
            .insert(&label(3, Rating::Mos(4.0), "ana", "aa"))
            .unwrap_err();
        assert_eq!(e.kind(), "full");
        assert!(e.to_string().contains("labels.max_labels = 2"), "{e}");
        // A relabel replaces, so it never grows the store: accepted.
        let again = store
            .insert(&label(2, Rating::Mos(5.0), "ana", "aa"))
            .unwrap();
        assert!(again.replaced);
        let all = store.list(0, None).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].mos, Some(5.0));
        // The export reads through its own connection while the store is in use.
        let _guard = store.conn();
        let csv = store.export(0, None, ExportFormat::Csv).unwrap();
        assert_eq!(csv.lines().count(), 3, "{csv}");
    }

    #[test]
    fn relabelling_replaces_per_labeller() {
        let (_dir, path) = temp_db();
        let store = LabelStore::open(&path).unwrap();
        let first = store
            .insert(&label(5, Rating::Mos(2.0), "ana", "aa"))
            .unwrap();
        let again = store
            .insert(&label(5, Rating::Mos(5.0), "ana", "aa"))
            .unwrap();
        assert!(again.replaced);
        assert!(again.label.id > first.label.id, "a relabel gets a new id");
        let other = store
            .insert(&label(5, Rating::Mos(1.0), "bo", "aa"))
            .unwrap();
        assert!(!other.replaced);
        let all = store.list(0, None).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].target, 1.0);
        assert_eq!(all[1].labeller, "bo");
        // Another run (a restarted daemon) reuses frame ids: never a replacement.
        let next_run = LabelStore::open(&path).unwrap();
        assert_ne!(next_run.run_id(), store.run_id());
        let r = next_run
            .insert(&label(5, Rating::Mos(3.0), "ana", "aa"))
            .unwrap();
        assert!(!r.replaced);
        assert_eq!(next_run.count().unwrap(), 3);
    }

    #[test]
    fn reopening_keeps_labels_and_the_schema() {
        let (_dir, path) = temp_db();
        let store = LabelStore::open(&path).unwrap();
        store
            .insert(&label(1, Rating::Mos(3.0), "ana", "aa"))
            .unwrap();
        drop(store);
        let again = LabelStore::open(&path).unwrap();
        assert_eq!(again.count().unwrap(), 1);
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn migration_from_an_unversioned_file_and_refusal_of_a_newer_one() {
        let (_dir, path) = temp_db();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // An empty SQLite file with version 0 recorded: every migration runs.
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL);
                 INSERT INTO schema_version VALUES (0);",
            )
            .unwrap();
        }
        let store = LabelStore::open(&path).unwrap();
        store
            .insert(&label(1, Rating::Mos(3.0), "ana", "aa"))
            .unwrap();
        drop(store);
        // A store written by a newer build is refused.
        Connection::open(&path)
            .unwrap()
            .execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        let e = LabelStore::open(&path).unwrap_err();
        assert_eq!(e.kind(), "schema");
        assert!(e.to_string().contains("99"), "{e}");
        assert!(e.to_string().contains("labels.sqlite"), "{e}");
    }

    #[test]
    fn training_set_is_filtered_by_encoder() {
        let (_dir, path) = temp_db();
        let store = LabelStore::open(&path).unwrap();
        store
            .insert(&label(1, Rating::Mos(5.0), "ana", "aa"))
            .unwrap();
        store
            .insert(&label(2, Rating::Score(0.2), "ana", "bb"))
            .unwrap();
        store
            .insert(&label(3, Rating::Mos(1.0), "ana", "aa"))
            .unwrap();
        drop(store);
        let set = load_training_set(&path, "AA").unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set[0], (vec![0.6, 0.8, 0.0, 0.0], 1.0));
        assert_eq!(set[1].1, 0.0);
        assert_eq!(load_training_set(&path, "bb").unwrap().len(), 1);
        assert!(load_training_set(&path, "cc").unwrap().is_empty());
        let missing = path.with_file_name("missing.sqlite");
        assert!(load_training_set(&missing, "aa").is_err());
        assert!(!missing.exists(), "read-only: nothing created");
    }

    #[test]
    fn reembedding_moves_labels_keeps_the_old_embedding_and_is_all_or_nothing() {
        let (_dir, path) = temp_db();
        let store = LabelStore::open(&path).unwrap();
        let a = store
            .insert(&label(1, Rating::Mos(5.0), "ana", "aa"))
            .unwrap()
            .label;
        let mut with_frame = label(2, Rating::Mos(1.0), "ana", "aa");
        with_frame.frame = Some(vec![0x89, b'P', b'N', b'G']);
        let b = store.insert(&with_frame).unwrap().label;
        assert_eq!(store.frame(a.id).unwrap(), None);
        assert_eq!(store.frame(b.id).unwrap().unwrap(), b"\x89PNG");
        let cands = store.reembed_candidates("BB").unwrap();
        assert_eq!(
            cands,
            vec![
                ReembedCandidate {
                    id: a.id,
                    model_sha256: "aa".into(),
                    kept: false,
                    has_frame: false
                },
                ReembedCandidate {
                    id: b.id,
                    model_sha256: "aa".into(),
                    kept: false,
                    has_frame: true
                },
            ]
        );
        let to_b = Provenance {
            bundle: "b".into(),
            model_sha256: "BB".into(),
        };
        let moves = |e: f32, source| -> Vec<Reembedded> {
            [a.id, b.id]
                .iter()
                .map(|id| Reembedded {
                    id: *id,
                    from_sha256: "aa".into(),
                    embedding: Some((vec![e, 0.0], source)),
                })
                .collect()
        };
        // A bad item (an empty embedding) fails the whole transaction: nothing moves.
        let mut bad = moves(1.0, EmbeddingSource::Frame);
        bad[1].embedding = Some((vec![], EmbeddingSource::Frame));
        assert!(store.apply_reembedding(&to_b, &bad).is_err());
        assert_eq!(store.count_for_model("aa").unwrap(), 2);
        assert_eq!(
            store.embedding(a.id).unwrap().unwrap(),
            [0.6, 0.8, 0.0, 0.0]
        );

        assert_eq!(
            store
                .apply_reembedding(&to_b, &moves(1.0, EmbeddingSource::Frame))
                .unwrap(),
            2
        );
        let l = &store.list(0, None).unwrap()[0];
        assert_eq!(
            (l.model_sha256.as_str(), l.bundle.as_str(), l.embed_dim),
            ("bb", "b", 2)
        );
        assert_eq!(l.embedding_source, "frame");
        assert_eq!(load_training_set(&path, "bb").unwrap().len(), 2);
        assert!(load_training_set(&path, "aa").unwrap().is_empty());
        // Again: the labels are by "bb" already, and moves read before are skipped.
        assert!(store.reembed_candidates("bb").unwrap().is_empty());
        assert_eq!(
            store
                .apply_reembedding(&to_b, &moves(0.5, EmbeddingSource::Frame))
                .unwrap(),
            0
        );
        assert_eq!(store.embedding(a.id).unwrap().unwrap(), [1.0, 0.0]);
        // Back to "aa": the live embeddings were kept, nothing to compute.
        let back = store.reembed_candidates("aa").unwrap();
        assert!(back.iter().all(|c| c.kept), "{back:?}");
        let to_a = Provenance {
            bundle: "streamiq-test".into(),
            model_sha256: "aa".into(),
        };
        let restore: Vec<Reembedded> = back
            .iter()
            .map(|c| Reembedded {
                id: c.id,
                from_sha256: c.model_sha256.clone(),
                embedding: None,
            })
            .collect();
        assert_eq!(store.apply_reembedding(&to_a, &restore).unwrap(), 2);
        assert_eq!(
            store.embedding(a.id).unwrap().unwrap(),
            [0.6, 0.8, 0.0, 0.0]
        );
        assert_eq!(store.list(0, None).unwrap()[0].embedding_source, "live");
        assert!(
            store
                .reembed_candidates("bb")
                .unwrap()
                .iter()
                .all(|c| c.kept)
        );
        // A relabelled frame takes its kept embeddings with it.
        store
            .insert(&label(1, Rating::Mos(2.0), "ana", "aa"))
            .unwrap();
        let kept: i64 = store
            .conn()
            .query_row("SELECT count(*) FROM label_embeddings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, 1, "only label 2's embedding by bb is left");
    }

    #[test]
    fn csv_export_has_the_header_and_quotes_fields() {
        let (_dir, path) = temp_db();
        let store = LabelStore::open(&path).unwrap();
        store
            .insert(&label(9, Rating::Score(0.5), "o'neil, \"the\" boss", "aa"))
            .unwrap();
        let csv = store.export(0, None, ExportFormat::Csv).unwrap();
        let mut lines = csv.lines();
        assert_eq!(
            lines.next().unwrap(),
            "id,stream,frame_id,captured,mos,target,labeller,model_score,prompt_version,bundle,created"
        );
        let row = lines.next().unwrap();
        assert!(
            row.starts_with("1,cam-a,9,1700000000.5,,0.5,\"o'neil, \"\"the\"\" boss\","),
            "{row}"
        );
        for (name, cell) in [
            (
                "=HYPERLINK(\"http://x\",\"y\")",
                "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\"",
            ),
            ("+1", "'+1"),
            ("-2+3", "'-2+3"),
            ("@SUM(A1)", "'@SUM(A1)"),
        ] {
            assert_eq!(super::csv_field(name), cell, "{name}");
        }
        let json: serde_json::Value =
            serde_json::from_str(&store.export(0, None, ExportFormat::Json).unwrap()).unwrap();
        assert_eq!(json[0]["frame_id"], 9);
        assert_eq!(json[0]["score"], 0.5);
        assert!(json[0].get("thumbnail").is_none(), "no blobs in exports");
    }
}
