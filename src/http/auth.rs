//! The API token: `server.api_token_file` holds a bearer token (compared in constant
//! time) that every `/api/v1` route but the stream list requires: writes as
//! `Authorization: Bearer <token>`, reads (frames, thumbnails, labels, prompt sets) as
//! that header or the labelling page's session cookie, an HttpOnly, SameSite=Strict
//! cookie that `POST /api/v1/session` sets for a request that carried the header (so
//! the page's `<img>` thumbnails load without the token in any URL). No route without
//! the token ever returns it. A missing file is created at start with a random 32-byte
//! hex token, mode 0600.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// The token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file or its directory cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no token.
    #[error("{path}: empty API token file; delete it to have a new token created")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The token is too short to resist guessing.
    #[error(
        "{path}: the API token has {len} characters, fewer than {MIN_TOKEN_CHARS}; delete the file to have a new 64-character token created"
    )]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its length in characters.
        len: usize,
    },
}

/// Fewest characters a token file may hold.
pub const MIN_TOKEN_CHARS: usize = 16;

impl TokenError {
    /// Short static name, usable as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Empty { .. } => "empty",
            Self::TooShort { .. } => "too_short",
        }
    }
}

/// The bearer token; its `Debug` never shows it.
#[derive(Clone)]
pub struct ApiToken(Arc<str>);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(***)")
    }
}

impl ApiToken {
    /// A token from its text (surrounding whitespace removed).
    pub fn new(token: &str) -> Self {
        Self(token.trim().into())
    }

    /// Reads the token from `path`, or creates the file (and its directory) with a new
    /// random token, mode 0600. Logs the path, never the token. An empty file is refused;
    /// a file readable by group or others is used with a warning.
    pub fn load_or_create(path: &Path) -> Result<Self, TokenError> {
        let io = |source| TokenError::Io {
            path: path.to_owned(),
            source,
        };
        // A token created meanwhile by another process is read, not overwritten.
        let created = match fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path)?,
            _ => false,
        };
        let token = Self::new(&fs::read_to_string(path).map_err(io)?);
        if token.0.is_empty() {
            return Err(TokenError::Empty {
                path: path.to_owned(),
            });
        }
        let len = token.0.chars().count();
        if len < MIN_TOKEN_CHARS {
            return Err(TokenError::TooShort {
                path: path.to_owned(),
                len,
            });
        }
        warn_if_readable_by_others(path);
        if created {
            tracing::info!(path = %path.display(), "API token created");
        } else {
            tracing::info!(path = %path.display(), "API token loaded");
        }
        Ok(token)
    }

    /// Whether `presented` is the token, compared in constant time (for equal lengths).
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        std::hint::black_box(diff) == 0
    }

    /// Whether an `Authorization` header value carries the token (`Bearer <token>`).
    pub fn authorizes(&self, header_value: &str) -> bool {
        header_value
            .trim()
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .is_some_and(|(_, token)| self.matches(token.trim()))
    }
}

impl ApiToken {
    /// Whether a `Cookie` header carries the session cookie with this token.
    pub fn authorizes_cookie(&self, cookie_header: &str) -> bool {
        cookie_header
            .split(';')
            .filter_map(|c| c.trim().split_once('='))
            .any(|(name, value)| name == SESSION_COOKIE && self.matches(value))
    }
}

/// The labelling page's session cookie (its value is the token).
pub const SESSION_COOKIE: &str = "streamiq_session";

/// Whether the request carries the token: the `Authorization` header, or, for reads
/// (GET, HEAD) only, the session cookie.
fn request_authorized(s: &AppState, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        return match v.to_str() {
            Ok(v) if s.api_token.authorizes(v) => Ok(()),
            _ => Err(ApiError::unauthorized("invalid bearer token")),
        };
    }
    let read = matches!(*method, Method::GET | Method::HEAD);
    let cookie_ok = read
        && headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| s.api_token.authorizes_cookie(v));
    if cookie_ok {
        Ok(())
    } else {
        Err(ApiError::unauthorized(
            "missing Authorization: Bearer <token> (see server.api_token_file)",
        ))
    }
}

/// Middleware for the routes behind the token (see the module docs).
pub async fn require_token(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    match request_authorized(&s, req.method(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// `POST /api/v1/session` (bearer token): sets the session cookie for the labelling
/// page's reads, HttpOnly (scripts cannot read it) and SameSite=Strict (other sites'
/// pages cannot send it). `DELETE` clears it.
pub async fn open_session(_: Bearer, State(s): State<AppState>) -> Response {
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/api/v1; HttpOnly; SameSite=Strict",
        s.api_token.0
    );
    (
        StatusCode::NO_CONTENT,
        [
            (header::SET_COOKIE, cookie),
            (header::CACHE_CONTROL, "no-store".into()),
        ],
    )
        .into_response()
}

/// `DELETE /api/v1/session`: clears the session cookie.
pub async fn close_session() -> Response {
    let cookie = format!("{SESSION_COOKIE}=; Path=/api/v1; HttpOnly; SameSite=Strict; Max-Age=0");
    (StatusCode::NO_CONTENT, [(header::SET_COOKIE, cookie)]).into_response()
}

/// Writes a new token to a temporary file (0600, synced) and links it into place, which
/// fails rather than overwrite a token another process created meanwhile. Returns
/// whether this call created the file.
fn create(path: &Path) -> Result<bool, TokenError> {
    let io = |p: &Path| {
        let p = p.to_owned();
        move |source| TokenError::Io { path: p, source }
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io(dir))?;
    let token = hex::encode(random_bytes::<32>().map_err(io(Path::new("/dev/urandom")))?);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.{}.{:08x}.tmp",
        std::process::id(),
        fastrand::u32(..)
    ));
    let written = (|| {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        writeln!(f, "{token}")?;
        f.sync_all()
    })();
    let linked = written.and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io(path)(e)),
    }
}

fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "API token file is accessible to other users; chmod 600 it"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

/// Extractor for write routes: rejects the request with 401 unless it carries
/// `Authorization: Bearer <token>` (never the cookie). Put it first, so that it runs
/// before the body is read.
pub struct Bearer;

impl FromRequestParts<AppState> for Bearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match header {
            Some(v) if s.api_token.authorizes(v) => Ok(Self),
            Some(_) => Err(ApiError::unauthorized("invalid bearer token")),
            None => Err(ApiError::unauthorized(
                "missing Authorization: Bearer <token> (see server.api_token_file)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_must_carry_the_exact_token_under_its_name() {
        let t = ApiToken::new("abc123");
        assert!(t.authorizes_cookie("streamiq_session=abc123"));
        assert!(t.authorizes_cookie("a=b; streamiq_session=abc123; c=d"));
        assert!(!t.authorizes_cookie("streamiq_session=abc12"));
        assert!(!t.authorizes_cookie("other=abc123"));
        assert!(!t.authorizes_cookie("xstreamiq_session=abc123"));
        assert!(!t.authorizes_cookie(""));
    }

    #[test]
    fn header_must_carry_the_exact_token() {
        let t = ApiToken::new(" abc123\n");
        assert!(t.authorizes("Bearer abc123"));
        assert!(t.authorizes("bearer  abc123 "));
        assert!(!t.authorizes("Bearer abc124"));
        assert!(!t.authorizes("Bearer abc12"));
        assert!(!t.authorizes("Bearer abc1234"));
        assert!(!t.authorizes("Basic abc123"));
        assert!(!t.authorizes("abc123"));
        assert!(!t.authorizes("Bearer "));
        assert_eq!(format!("{t:?}"), "ApiToken(***)");
    }

    #[cfg(unix)]
    #[test]
    fn token_file_is_created_0600_then_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/api-token");
        let t = ApiToken::load_or_create(&path).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert!(text.trim().bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(t.matches(text.trim()));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = ApiToken::load_or_create(&path).unwrap();
        assert!(again.matches(text.trim()));
        let leftovers = fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file left behind");
    }

    #[test]
    fn empty_token_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-token");
        fs::write(&path, " \n").unwrap();
        let e = ApiToken::load_or_create(&path).unwrap_err();
        assert_eq!(e.kind(), "empty");
        assert!(e.to_string().contains("api-token"), "{e}");
    }
}
