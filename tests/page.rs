//! The labelling page (`GET /`) in headless Chromium: a daemon on 127.0.0.1:0 with one
//! live test stream, Debian's `/usr/bin/chromium` driven through the DevTools protocol
//! over `--remote-debugging-pipe` (JSON messages separated by NUL bytes on file
//! descriptors 3 and 4; no WebSocket, no extra crate), keys pressed as an operator
//! would, and the outcome checked through the API.
//!
//! It needs the test bundle (`make bundle`), GStreamer and Chromium (`scripts/setup.sh`).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::daemon::InProcess;
use common::{config_text, get, json_as, poll, settings};

const CHROMIUM: &str = "/usr/bin/chromium";
const SCREENSHOT: &str = "/tmp/streamiq-page.png";

/// Headless Chromium in its own process group, driven over `--remote-debugging-pipe`.
/// Dropping it closes the browser and kills the whole group, also when a test fails.
struct Browser {
    child: Child,
    commands: ChildStdin,
    messages: mpsc::Receiver<Value>,
    next_id: u64,
    /// Events received so far (console messages, exceptions, log entries).
    events: Vec<Value>,
    profile: tempfile::TempDir,
}

impl Browser {
    fn launch() -> Self {
        assert!(
            Path::new(CHROMIUM).is_file(),
            "{CHROMIUM} is missing: run scripts/setup.sh (it installs Debian's chromium), \
             which the labelling-page test needs"
        );
        let profile = tempfile::tempdir().unwrap();
        let log = File::create(profile.path().join("chromium.log")).unwrap();
        // The shell hands our pipes to Chromium as fd 3 (commands in) and fd 4
        // (messages out), then execs it, so the child's pid is the browser's.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$@" 3<&0 4>&1 0</dev/null 1>&2"#)
            .arg("sh")
            .arg(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-pipe",
                "--window-size=1280,800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{CHROMIUM}: {e}; run scripts/setup.sh"));
        let commands = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            while r.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice(&buf)
                    && tx.send(v).is_err()
                {
                    return;
                }
                buf.clear();
            }
        });
        Self {
            child,
            commands,
            messages,
            next_id: 0,
            events: Vec::new(),
            profile,
        }
    }

    /// The tail of Chromium's stderr, for failure messages.
    fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Sends one DevTools command (to a page session, if given) and returns its result.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        if let Err(e) = self
            .commands
            .write_all(&bytes)
            .and_then(|()| self.commands.flush())
        {
            panic!("{method}: Chromium gone ({e}):\n{}", self.log_tail());
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(m) = self.messages.recv_timeout(left) else {
                panic!("{method}: no answer from Chromium:\n{}", self.log_tail());
            };
            if m["id"] == json!(id) {
                if let Some(err) = m.get("error") {
                    panic!("{method}: {err}");
                }
                return m["result"].clone();
            }
            if m.get("method").is_some() {
                self.events.push(m);
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let close = serde_json::to_vec(&json!({ "id": 0, "method": "Browser.close" }));
        let _ = self
            .commands
            .write_all(&[close.unwrap_or_default(), vec![0]].concat());
        let _ = self.commands.flush();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever is left of the group (renderers, zygote), and the browser if it hung.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One tab of the browser.
struct Page<'a> {
    browser: &'a mut Browser,
    session: String,
}

impl Page<'_> {
    fn open<'a>(browser: &'a mut Browser, url: &str) -> Page<'a> {
        let target = browser.call(None, "Target.createTarget", json!({ "url": "about:blank" }));
        let attached = browser.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        let session = attached["sessionId"].as_str().unwrap().to_string();
        let mut page = Page { browser, session };
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            page.call(domain, json!({}));
        }
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": false }),
        );
        page.call("Page.navigate", json!({ "url": url }));
        page
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.browser.call(Some(&self.session), method, params)
    }

    /// Evaluates a JavaScript expression and returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy (not null, false, 0 or "") and returns it.
    fn wait_for(&mut self, what: &str, expression: &str) -> Value {
        poll(Duration::from_secs(20), what, || {
            let v = self.eval(expression);
            let falsy = v.is_null() || v == json!(false) || v == json!(0) || v == json!("");
            (!falsy).then_some(v)
        })
    }

    /// A key press as the keyboard would deliver it.
    fn press(&mut self, key: &str, code: &str, key_code: u32, text: &str) {
        let mut down = json!({
            "type": "keyDown", "key": key, "code": code, "windowsVirtualKeyCode": key_code,
        });
        if !text.is_empty() {
            down["text"] = json!(text);
        }
        self.call("Input.dispatchKeyEvent", down);
        self.call(
            "Input.dispatchKeyEvent",
            json!({ "type": "keyUp", "key": key, "code": code, "windowsVirtualKeyCode": key_code }),
        );
    }

    /// Types `token` into the token field (replacing what is there) and presses Enter.
    fn enter_token(&mut self, token: &str) {
        self.eval(
            "(() => { const t = document.getElementById('token'); t.focus(); t.select(); })()",
        );
        self.call("Input.insertText", json!({ "text": token }));
        self.press("Enter", "Enter", 13, "\r");
    }

    fn press_digit(&mut self, digit: char) {
        let key = digit.to_string();
        self.press(&key, &format!("Digit{digit}"), digit as u32, &key);
    }

    fn selected_frame(&mut self) -> u64 {
        let v = self.eval("document.querySelector('.frame[aria-current=\"true\"]')?.dataset.id");
        v.as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no selected frame: {v}"))
    }

    fn screenshot(&mut self, path: &str) {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64_decode(shot["data"].as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, png).unwrap();
    }

    /// Console errors, uncaught exceptions and error log entries, except the network
    /// error the test provokes on purpose (a log entry holding every one of `expected`).
    fn errors(&self, expected: &[&str]) -> Vec<String> {
        self.browser
            .events
            .iter()
            .filter_map(|e| {
                let p = &e["params"];
                match e["method"].as_str()? {
                    "Runtime.exceptionThrown" => Some(p["exceptionDetails"].to_string()),
                    "Runtime.consoleAPICalled" if p["type"] == "error" => {
                        Some(p["args"].to_string())
                    }
                    "Log.entryAdded" if p["entry"]["level"] == "error" => {
                        let text = p["entry"].to_string();
                        (!expected.iter().all(|a| text.contains(a))).then_some(text)
                    }
                    _ => None,
                }
            })
            .collect()
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &d)| n | u32::from(d) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

#[test]
fn base64_decodes_padded_and_unpadded_text() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGk"), b"hi");
    assert_eq!(base64_decode("YWJj"), b"abc");
}

// The test's body blocks (the browser's pipes) on the main thread; the daemon runs on
// the runtime's two worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_labels_a_frame_with_the_keyboard_in_chromium() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let streams = r#"
[[streams]]
id = "cam"
pipeline = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=10/1"
sample_fps = 2.0

[[streams]]
id = "dark"
pipeline = "videotestsrc is-live=true pattern=black ! video/x-raw,width=480,height=270,framerate=10/1"
sample_fps = 2.0
"#;
    let incidents = dir.path().join("state/incidents");
    let mut s = settings(&config_text(
        streams,
        &format!(
            "black_min_duration = \"1s\"\n[adapt]\nmin_labels = 3\n[labels]\nincidents_dir = \"{}\"\n",
            incidents.display()
        ),
    ));
    let token_file = dir.path().join("state/api-token");
    s.server.api_token_file = token_file.clone();
    s.labels_db = dir.path().join("state/labels.sqlite");
    s.model.prompts_dir = dir.path().join("state/prompts");
    let d = InProcess::start(s).await;
    let addr = d.addr;
    let token = std::fs::read_to_string(&token_file).unwrap();
    let token = token.trim();
    poll(Duration::from_secs(30), "frames scored", || {
        let frames = json_as(addr, "/api/v1/streams/cam/frames?limit=3", token);
        (frames.as_array()?.len() >= 3).then_some(())
    });

    // The page and its assets are served from the binary.
    let (code, html) = get(addr, "/");
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&html).contains("/static/page.js"));
    assert_eq!(get(addr, "/static/page.js").0, 200);
    assert_eq!(get(addr, "/static/page.css").0, 200);
    let summary = json_as(addr, "/api/v1/labels/summary", token);
    assert_eq!(summary["labels_for_model"], 0, "{summary}");
    assert_eq!(
        (&summary["min_labels"], &summary["needed"]),
        (&json!(3), &json!(3))
    );

    let mut browser = Browser::launch();
    let mut page = Page::open(&mut browser, &format!("http://{addr}/"));
    // Without the token the page lists the stream but shows no frame, and asks for it.
    let message = page.wait_for(
        "the request for the token",
        "(() => { const m = document.getElementById('message'); \
           return m && !m.hidden && m.textContent.includes('need the API token') && m.textContent })()",
    );
    assert!(
        message.as_str().unwrap().contains("server.api_token_file"),
        "{message}"
    );
    assert_eq!(
        page.eval("document.querySelectorAll('#streams .frame').length"),
        json!(0)
    );

    // A wrong token: the page says so, keeps nothing, and nothing is stored.
    page.enter_token("not-the-token");
    let message = page.wait_for(
        "the 401 message",
        "(() => { const m = document.getElementById('message'); \
           return !m.hidden && m.textContent.includes('401') && m.textContent })()",
    );
    let message = message.as_str().unwrap();
    assert!(message.contains("server.api_token_file"), "{message}");
    page.screenshot("/tmp/streamiq-page-401.png");
    assert_eq!(json_as(addr, "/api/v1/labels", token), json!([]));
    assert_eq!(
        page.eval("sessionStorage.length + localStorage.length"),
        json!(0),
        "a refused token is not kept"
    );

    // The right token: thumbnails load (through the HttpOnly session cookie, which the
    // page's scripts cannot read), and the token is kept in this tab only.
    page.enter_token(token);
    page.wait_for(
        "thumbnails of the stream and a selected frame",
        "document.querySelectorAll('#streams .frame').length >= 3 \
         && document.querySelector('.frame[aria-current=\"true\"] img')?.complete \
         && document.querySelector('.frame[aria-current=\"true\"] img')?.naturalWidth > 0",
    );
    page.wait_for(
        "labels still needed",
        "document.getElementById('progress-text').textContent.includes('3 more needed')",
    );
    assert_eq!(page.eval("document.cookie"), json!(""), "HttpOnly");
    assert_eq!(
        page.eval("localStorage.getItem('streamiq.apiToken')"),
        Value::Null
    );
    assert_eq!(
        page.eval("sessionStorage.getItem('streamiq.apiToken')"),
        json!(token)
    );

    // Key 4 on the selected frame.
    let frame = page.selected_frame();
    let shown: Vec<u64> = page
        .eval("[...document.querySelectorAll('.frame')].map(b => Number(b.dataset.id))")
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(shown.contains(&frame), "{frame} in {shown:?}");
    page.press_digit('4');
    page.wait_for(
        "the frame marked as rated",
        &format!(
            "document.querySelector('.frame[data-id=\"{frame}\"]')?.classList.contains('rated')"
        ),
    );
    let labels = json_as(addr, "/api/v1/labels", token);
    let labels = labels.as_array().unwrap();
    assert_eq!(labels.len(), 1, "{labels:?}");
    assert_eq!(labels[0]["frame_id"], json!(frame));
    assert_eq!(labels[0]["mos"], json!(4.0));
    assert_ne!(page.selected_frame(), frame, "the next frame is selected");
    page.wait_for(
        "the count of labels still needed",
        "document.getElementById('progress-text').textContent.includes('2 more needed')",
    );
    let summary = json_as(addr, "/api/v1/labels/summary", token);
    assert_eq!(summary["needed"], 2, "{summary}");
    assert_eq!(
        summary["streams"]["cam"]["labelled_frames"][0]["frame_id"],
        json!(frame)
    );

    // Incidents (the dark stream is black; the ball on black counts too): their frames
    // follow the streams, shown at the source's resolution (320x240 or 480x270; the
    // model's view is 224 px high), and a key rates one.
    page.wait_for(
        "an incident frame",
        "document.querySelectorAll('#streams .frame[data-incident]').length > 0",
    );
    page.eval("document.querySelector('#streams .frame[data-incident]').click()");
    let natural = page.wait_for(
        "the incident frame at its own size",
        "(() => { const i = document.getElementById('sel-img'); \
           return i.classList.contains('native') && i.complete && i.naturalWidth > 0 \
             && [i.naturalWidth, i.naturalHeight] })()",
    );
    assert!(
        natural == json!([480, 270]) || natural == json!([320, 240]),
        "{natural}"
    );
    assert_eq!(
        page.eval("document.getElementById('sel-full').hidden"),
        json!(false)
    );
    page.press_digit('2');
    let stored = poll(Duration::from_secs(10), "the incident label", || {
        let labels = json_as(addr, "/api/v1/labels", token);
        labels
            .as_array()?
            .iter()
            .find(|l| l["mos"] == json!(2.0))
            .cloned()
    });
    let size = (stored["stream"] == "dark").then_some(json!([480, 270]));
    assert_eq!(size.unwrap_or(json!([320, 240])), natural, "{stored}");

    page.screenshot(SCREENSHOT);
    // The 401s of the reads before the token and of the wrong token are expected.
    let errors = page.errors(&["401", "/api/v1/"]);
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    drop(browser);
    d.stop().await;
    assert!(
        t0.elapsed() < Duration::from_secs(50),
        "took {:?}",
        t0.elapsed()
    );
}
