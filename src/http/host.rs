//! The `Host` allow-list, against DNS rebinding: a web page on another site that gets
//! its name resolved to this daemon's address makes the browser send requests here with
//! that name in `Host`. Every route answers only to the names in `server.allowed_hosts`;
//! with none listed, a daemon listening on a loopback address answers only to loopback
//! names (`localhost`, `127.0.0.0/8`, `::1`) and one listening elsewhere to any name
//! (with a warning at start: see [`HostPolicy::warning`]). A request without `Host`
//! (HTTP/1.0 tools) is let through: browsers always send one.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// Which `Host` names the server answers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPolicy {
    /// Only these names (lower case, no port).
    Listed(Vec<String>),
    /// Only loopback names (an empty list on a loopback listen address).
    Loopback,
    /// Any name (an empty list on any other listen address).
    Any,
}

impl HostPolicy {
    /// The policy for `allowed_hosts` (already validated) on `listen`.
    pub fn new(allowed_hosts: &[String], listen: SocketAddr) -> Self {
        if !allowed_hosts.is_empty() {
            Self::Listed(
                allowed_hosts
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
            )
        } else if listen.ip().is_loopback() {
            Self::Loopback
        } else {
            Self::Any
        }
    }

    /// Whether a request with this `Host` header value is answered.
    pub fn allows(&self, host_header: Option<&str>) -> bool {
        let Some(value) = host_header else {
            return true;
        };
        let name = host_name(value).to_ascii_lowercase();
        match self {
            Self::Listed(names) => names.contains(&name),
            Self::Loopback => {
                name == "localhost"
                    || name.ends_with(".localhost")
                    || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
            Self::Any => true,
        }
    }

    /// What to warn about at start, if anything: a listen address others can reach with
    /// no allow-list, or any non-loopback listen (the bearer token crosses the network in
    /// clear text unless a TLS proxy is in front).
    pub fn warning(&self, listen: SocketAddr) -> Option<&'static str> {
        if listen.ip().is_loopback() {
            return None;
        }
        Some(match self {
            Self::Any => {
                "server.listen is not a loopback address and server.allowed_hosts is empty: any \
                 Host is answered (DNS rebinding), and the API token crosses the network in \
                 clear text; put a TLS reverse proxy in front (README, \"TLS\") and list its \
                 name in server.allowed_hosts"
            }
            _ => {
                "server.listen is not a loopback address: the API token crosses the network in \
                 clear text unless a TLS reverse proxy is in front (README, \"TLS\")"
            }
        })
    }
}

/// The name part of a `Host` value: `[::1]:80` -> `::1`, `a.example:80` -> `a.example`.
fn host_name(value: &str) -> &str {
    let v = value.trim();
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match v.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => v,
    }
}

/// Middleware: a request whose `Host` is not allowed gets 421 Misdirected Request.
pub async fn check(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .map(|v| v.to_str().unwrap_or("\u{fffd}"));
    if s.hosts.allows(host) {
        return next.run(req).await;
    }
    let shown: String = host.unwrap_or_default().chars().take(80).collect();
    tracing::warn!(host = %shown, "Request refused: Host not allowed");
    ApiError::new(
        StatusCode::MISDIRECTED_REQUEST,
        format!("Host {shown:?} is not answered here (server.allowed_hosts)"),
        "host",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(listen: &str) -> SocketAddr {
        listen.parse().unwrap()
    }

    #[test]
    fn names_are_read_without_the_port() {
        assert_eq!(host_name("a.example:9790"), "a.example");
        assert_eq!(host_name("[::1]:9790"), "::1");
        assert_eq!(host_name("::1"), "::1");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
    }

    #[test]
    fn loopback_listen_answers_loopback_names_only() {
        let p = HostPolicy::new(&[], at("127.0.0.1:9790"));
        assert_eq!(p, HostPolicy::Loopback);
        for ok in [
            "localhost:9790",
            "LOCALHOST",
            "127.0.0.1:9790",
            "127.1.2.3",
            "[::1]:9790",
            "app.localhost",
        ] {
            assert!(p.allows(Some(ok)), "{ok}");
        }
        for bad in [
            "evil.example:9790",
            "localhost.evil.example",
            "10.0.0.1",
            "",
            "\u{fffd}",
        ] {
            assert!(!p.allows(Some(bad)), "{bad}");
        }
        assert!(p.allows(None));
        assert_eq!(p.warning(at("127.0.0.1:9790")), None);
    }

    #[test]
    fn a_list_is_exact_and_any_is_any() {
        let p = HostPolicy::new(&["QC.example".into()], at("0.0.0.0:9790"));
        assert!(p.allows(Some("qc.example:443")));
        assert!(!p.allows(Some("localhost")));
        assert!(!p.allows(Some("qc.example.evil")));
        assert!(p.warning(at("0.0.0.0:9790")).is_some());
        let any = HostPolicy::new(&[], at("0.0.0.0:9790"));
        assert_eq!(any, HostPolicy::Any);
        assert!(any.allows(Some("whatever")));
        assert!(
            any.warning(at("0.0.0.0:9790"))
                .unwrap()
                .contains("allowed_hosts")
        );
    }
}
