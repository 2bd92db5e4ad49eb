//! CSV fields for the files streamiq writes (label exports, `scan --format csv`).

/// Quotes a CSV field when it holds a separator, a quote or a line break (RFC 4180).
/// A field a spreadsheet would read as a formula (starting with `=`, `+`, `-`, `@`, a
/// tab or a carriage return) gets a leading `'`, so an export opened in a spreadsheet
/// never runs what a labeller typed or a file name holds (OWASP's CSV-injection rule).
pub fn field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}
