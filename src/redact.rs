//! Removes credentials from anything streamiq shows or logs: the API's stream sources
//! and errors, `check-config`'s output and the log. Stream URIs and launch lines carry
//! secrets in three forms, each replaced by `***`:
//!
//! - a URI's user information: `rtsp://user:secret@camera/…` (anywhere in the text);
//! - a query parameter: `srt://host:9000?passphrase=…`, signed URLs' `token=`, `sig=`,
//!   `signature=`, `X-Amz-Signature=`, `key=`, `auth=`, `password=` …;
//! - a launch-line property: `rtspsrc user-pw=…`, `souphttpsrc proxy-pw=…`,
//!   `srtsrc passphrase=…`, quoted values included.

/// Names (lower case, compared whole) whose `name=value` value is a secret.
const SECRET_KEYS: &[&str] = &[
    "passphrase",
    "password",
    "passwd",
    "pass",
    "pwd",
    "pw",
    "user-pw",
    "proxy-pw",
    "user_pw",
    "secret",
    "token",
    "access_token",
    "auth",
    "authorization",
    "key",
    "apikey",
    "api_key",
    "api-key",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-security-token",
    "x-amz-credential",
    "streamid",
];

/// What replaces a secret.
const MASK: &str = "***";

/// `text` with every credential form above replaced by `***`.
pub fn redact(text: &str) -> String {
    redact_pairs(&redact_userinfo(text))
}

/// `scheme://user:pass@host` -> `scheme://***@host`, for every URI in `text`.
fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', '?', '#' or a character that cannot be
        // in a URI (space, quote, '!' of a launch line).
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'' | '!') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str(MASK);
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// `name=value` with a secret name: the value (up to `&`, `;`, whitespace, `!`, or
/// the closing quote of a quoted value) becomes `***`.
fn redact_pairs(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while let Some(eq) = text[i..].find('=').map(|e| e + i) {
        // The name: the run of name characters right before '='.
        let start = text[..eq]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            .map_or(0, |p| p + 1);
        let name = &text[start..eq];
        let secret = !name.is_empty()
            && SECRET_KEYS
                .iter()
                .any(|k| k.eq_ignore_ascii_case(name.trim_start_matches("extra-")));
        i = eq + 1;
        if !secret {
            continue;
        }
        let (value_start, value_end) = match bytes.get(eq + 1) {
            Some(q @ (b'"' | b'\'')) => {
                let close = text[eq + 2..]
                    .find(*q as char)
                    .map_or(text.len(), |p| eq + 2 + p);
                (eq + 2, close)
            }
            _ => {
                let end = text[eq + 1..]
                    .find(|c: char| {
                        matches!(c, '&' | ';' | '!' | ',' | '"' | '\'') || c.is_whitespace()
                    })
                    .map_or(text.len(), |p| eq + 1 + p);
                (eq + 1, end)
            }
        };
        if value_end > value_start {
            out.push_str(&text[copied..value_start]);
            out.push_str(MASK);
            copied = value_end;
        }
        i = value_end.max(i);
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn every_credential_form_is_removed() {
        for (raw, want) in [
            ("rtsp://u:p@cam/s1", "rtsp://***@cam/s1"),
            ("rtsp://admin@cam:554/s", "rtsp://***@cam:554/s"),
            (
                "srt://host:9000?mode=caller&passphrase=hunter22secret",
                "srt://host:9000?mode=caller&passphrase=***",
            ),
            (
                "https://cdn.example/live.m3u8?token=abc123&sig=ZZZ&exp=99",
                "https://cdn.example/live.m3u8?token=***&sig=***&exp=99",
            ),
            (
                "https://b.s3/x.ts?X-Amz-Credential=AK/1&X-Amz-Signature=f00d",
                "https://b.s3/x.ts?X-Amz-Credential=***&X-Amz-Signature=***",
            ),
            (
                "rtspsrc location=rtsp://cam/s user-id=admin user-pw=s3cret latency=0 ! decodebin",
                "rtspsrc location=rtsp://cam/s user-id=admin user-pw=*** latency=0 ! decodebin",
            ),
            (
                "souphttpsrc location=http://x/y proxy-pw=\"two words\" ! decodebin",
                "souphttpsrc location=http://x/y proxy-pw=\"***\" ! decodebin",
            ),
            (
                "srtsrc uri=srt://h:1?mode=listener passphrase='q w e'! tsdemux",
                "srtsrc uri=srt://h:1?mode=listener passphrase='***'! tsdemux",
            ),
            (
                "Could not open resource: rtsp://bob:pw@10.0.0.1/live (401)",
                "Could not open resource: rtsp://***@10.0.0.1/live (401)",
            ),
        ] {
            assert_eq!(redact(raw), want, "{raw}");
        }
    }

    #[test]
    fn what_is_not_a_secret_is_kept() {
        for text in [
            "file:///a@b.mp4",
            "videotestsrc ! x264enc key-int-max=60 ! h264parse",
            "udp://239.0.0.1:5000?keyframe=1&pkt_size=1316",
            "multifilesrc location=state/demo/clean/%05d.jpg index=1 ! jpegdec",
            "a=b c==d =x",
        ] {
            assert_eq!(redact(text), text);
        }
        assert_eq!(redact("token="), "token=", "an empty value stays empty");
    }
}
