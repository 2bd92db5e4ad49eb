//! The integration tests' one HTTP client: HTTP/1.0, one request per connection, read
//! to the end (the daemon closes the connection after answering). Every address is
//! anything `TcpStream::connect` takes: a `SocketAddr`, or `"127.0.0.1:PORT"`.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde_json::Value;

/// How long a request may wait for its answer before the test fails.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `method path` with `headers` and `body`; returns (status, body).
pub fn request(
    addr: impl ToSocketAddrs,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let (status, _, body) = request_with_head(addr, method, path, headers, body);
    (status, body)
}

/// [`request`], also returning the response head (status line and headers, lower-case
/// names as hyper writes them).
pub fn request_with_head(
    addr: impl ToSocketAddrs,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut req = req.into_bytes();
    req.extend_from_slice(body);
    // The server may answer (e.g. 413) and close before it has read the whole body.
    let _ = s.write_all(&req);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: no response head"));
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, buf[split + 4..].to_vec())
}

/// A GET returning (status, body).
pub fn get(addr: impl ToSocketAddrs, path: &str) -> (u16, Vec<u8>) {
    request(addr, "GET", path, &[], b"")
}

/// `get` with `Authorization: Bearer <token>`: the routes behind the API token.
pub fn get_as(addr: impl ToSocketAddrs, path: &str, token: &str) -> (u16, Vec<u8>) {
    let auth = format!("Bearer {}", token.trim());
    request(addr, "GET", path, &[("Authorization", &auth)], b"")
}

/// A request with a JSON body (and the bearer token, if given), returning (status, body
/// as text).
pub fn http(
    addr: impl ToSocketAddrs,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    let (code, body) = request(addr, method, path, &headers, body.as_bytes());
    (code, String::from_utf8(body).unwrap())
}

/// A GET that must answer 200; its body as text.
pub fn text(addr: impl ToSocketAddrs, path: &str) -> String {
    let (code, body) = get(addr, path);
    assert_eq!(code, 200, "GET {path}: {}", String::from_utf8_lossy(&body));
    String::from_utf8(body).unwrap()
}

/// `text` behind the API token.
pub fn text_as(addr: impl ToSocketAddrs, path: &str, token: &str) -> String {
    let (code, body) = get_as(addr, path, token);
    assert_eq!(code, 200, "GET {path}: {}", String::from_utf8_lossy(&body));
    String::from_utf8(body).unwrap()
}

/// `text_as` parsed as JSON.
pub fn json_as(addr: impl ToSocketAddrs, path: &str, token: &str) -> Value {
    let body = text_as(addr, path, token);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// POSTs a JSON label (with the bearer token, if given); returns (status, JSON body).
pub fn post_label(addr: impl ToSocketAddrs, token: Option<&str>, body: &str) -> (u16, Value) {
    let (code, body) = http(addr, "POST", "/api/v1/labels", token, body);
    let json = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{code}: not JSON: {body}"));
    (code, json)
}

/// The value of a sample line `name{labels} value` in an exposition.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// One series' value on `/metrics` (NaN when it is absent).
pub fn metric(addr: impl ToSocketAddrs, series: &str) -> f64 {
    let (_, m) = get(addr, "/metrics");
    sample(&String::from_utf8_lossy(&m), series).unwrap_or(f64::NAN)
}
