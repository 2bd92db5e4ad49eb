//! The labelling page at `GET /`: plain HTML, CSS and JavaScript embedded in the binary
//! (no build step, no external assets). The page reads `/api/v1/streams`, each stream's
//! recent frames and `/api/v1/labels/summary`, and posts ratings to `/api/v1/labels`
//! with the bearer token the operator typed in (kept in the browser's localStorage).
//!
//! ```text
//! GET /                  static/index.html
//! GET /static/page.css   static/page.css
//! GET /static/page.js    static/page.js
//! ```

use axum::Router;
use axum::http::header::{self, HeaderName};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;

const INDEX_HTML: &str = include_str!("static/index.html");
const PAGE_CSS: &str = include_str!("static/page.css");
const PAGE_JS: &str = include_str!("static/page.js");

/// Only this origin's scripts, styles, images and API; no inline script, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The page's routes, merged into the main router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/static/page.css",
            get(|| async { asset("text/css; charset=utf-8", PAGE_CSS) }),
        )
        .route(
            "/static/page.js",
            get(|| async { asset("text/javascript; charset=utf-8", PAGE_JS) }),
        )
}

/// An embedded file. `no-cache`: the browser revalidates, so a new daemon build's page
/// is picked up on the next load.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, &'static str); 5] = [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, "no-cache"),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_links_only_embedded_assets() {
        for path in ["/static/page.css", "/static/page.js"] {
            assert!(INDEX_HTML.contains(path), "index.html links {path}");
        }
        for text in [INDEX_HTML, PAGE_CSS, PAGE_JS] {
            assert!(!text.contains("http://"), "no external URL");
            assert!(!text.contains("https://"), "no external URL");
        }
        assert!(!INDEX_HTML.contains("<script>"), "no inline script (CSP)");
        assert!(PAGE_JS.contains("/api/v1/labels/summary"));
    }
}
