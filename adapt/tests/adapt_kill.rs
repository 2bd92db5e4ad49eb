//! "Killing the sidecar mid-write leaves the previous prompt set active and intact."
//!
//! A converted random CLIP (the small open_clip model of
//! `scripts/tests/test_convert_clip.py`, through `scripts/convert_clip.py`) and 60 labels
//! in a real label store; one `streamiq-adapt once` round promotes v0001. Then rounds are
//! SIGKILLed: after delays spread over a full round's run time, and as soon as the
//! round's temporary version file or temporary `active` file appears in `prompts_dir`
//! (to land inside the atomic write). After every kill, `active` must name a version
//! that the daemon's prompt manager loads, the previous version's bytes must be
//! unchanged unless a newer complete version was promoted, every `vNNNN.safetensors`
//! must be complete, and leftover temporary files must be ignored by the version list.
//! A normal round afterwards must still succeed and clear the leftovers.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use streamiq::score::prompt_store::{PromptDir, PromptManager};
use streamiq::score::prompts::PromptSet;

#[path = "../../tests/common/mod.rs"]
mod common;
use common::{run_ok, venv_python};

/// Converts the seeded small open_clip model of the conversion tests into a bundle.
fn small_clip_bundle(work: &Path) -> PathBuf {
    let script = r#"
import subprocess, sys, torch
repo, work = sys.argv[1], sys.argv[2]
sys.path.insert(0, repo + "/scripts/tests")
from test_convert_clip import small_open_clip
torch.set_num_threads(2)
torch.save(small_open_clip(seed=0).state_dict(), work + "/small-openai.pt")
sys.exit(subprocess.run([sys.executable, repo + "/scripts/convert_clip.py",
    "--checkpoint", work + "/small-openai.pt", "--out", work + "/bundle",
    "--text-heads", "2", "--vision-heads", "4"]).returncode)
"#;
    let o = Command::new(venv_python())
        .arg("-c")
        .arg(script)
        .arg(common::repo())
        .arg(work)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    work.join("bundle")
}

fn sha(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// The PID a temporary file `.NAME.tmp-PID-SEQ` was written by.
fn temp_pid(name: &str) -> Option<u32> {
    name.strip_prefix('.')?
        .rsplit_once(".tmp-")?
        .1
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// When to kill a round.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// After this long.
    After(Duration),
    /// As soon as a temporary file whose name starts with this appears.
    TempFile(&'static str),
}

/// One killed (or finished) round: how far it got.
struct Round {
    trigger: Trigger,
    /// The prompt directory's files before it started.
    before: BTreeSet<String>,
    pid: u32,
    finished_before_kill: bool,
    /// Its stdout and stderr lines, as far as they got.
    output: Vec<String>,
    elapsed: Duration,
}

fn once_cmd(cfg: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_streamiq-adapt"));
    // One libtorch thread: on a busy machine, OpenMP's spinning threads can stretch a
    // 2 s round to a minute, and the kill times are spread over the measured run time.
    c.args(["once", "--config"])
        .arg(cfg)
        .env("OMP_NUM_THREADS", "1");
    c
}

fn killed_round(cfg: &Path, prompts: &Path, trigger: Trigger, limit: Duration) -> Round {
    let before = names(prompts);
    let t0 = Instant::now();
    let mut child = once_cmd(cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let read = |pipe: Box<dyn std::io::Read + Send>| {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        })
    };
    let mut readers = vec![
        read(Box::new(child.stdout.take().unwrap())),
        read(Box::new(child.stderr.take().unwrap())),
    ];
    let training = || {
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l: &String| l.starts_with("adapting"))
    };
    let marker = format!(".tmp-{pid}-");
    let finished_before_kill = loop {
        if let Some(status) = child.try_wait().unwrap() {
            readers.drain(..).for_each(|r| r.join().unwrap());
            assert!(
                status.success(),
                "round {pid}: {status}\n{}",
                lines.lock().unwrap().join("\n")
            );
            break true;
        }
        let fire = match trigger {
            Trigger::After(d) => t0.elapsed() >= d,
            // Watching the directory from the start of training on (polls cost ~10 µs).
            Trigger::TempFile(_) if !training() => false,
            Trigger::TempFile(prefix) => std::fs::read_dir(prompts).is_ok_and(|d| {
                d.flatten().any(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.starts_with(prefix) && n.contains(&marker)
                })
            }),
        };
        if fire {
            // SIGKILL: no unwinding, no cleanup in the sidecar.
            child.kill().unwrap();
            break false;
        }
        assert!(t0.elapsed() < limit, "round {pid} ran past {limit:?}");
        std::thread::sleep(match trigger {
            Trigger::After(_) => Duration::from_millis(2),
            Trigger::TempFile(_) => Duration::from_micros(50),
        });
    };
    if !finished_before_kill {
        child.wait().unwrap();
        readers.drain(..).for_each(|r| r.join().unwrap());
    }
    let output = std::mem::take(&mut *lines.lock().unwrap());
    Round {
        trigger,
        before,
        pid,
        finished_before_kill,
        output,
        elapsed: t0.elapsed(),
    }
}

/// The daemon's view of `prompts_dir`: the set its prompt manager activates at start
/// (and on every change of `active`), and every version it lists.
fn daemon_view(
    dir: &PromptDir,
    bundle: &streamiq::score::bundle::Bundle,
) -> (u64, Vec<streamiq::score::prompt_store::VersionInfo>) {
    let dim = bundle.manifest.embed_dim;
    let initial = PromptSet::load(&bundle.prompts_path(), dim).unwrap();
    let manager = PromptManager::new(
        dir.clone(),
        bundle.prompts_path(),
        dim,
        &bundle.manifest.files["visual.onnx"],
        Arc::new(arc_swap::ArcSwap::from_pointee(initial)),
        None,
    );
    let active = manager
        .reload()
        .unwrap_or_else(|e| panic!("the daemon refuses the active set: {e}"));
    assert_eq!(manager.active().version, active);
    (active, manager.history())
}

/// What must survive every kill: the active version and its bytes, and every complete
/// version written so far; and how far each round got.
struct State<'a> {
    dir: PromptDir,
    bundle: &'a streamiq::score::bundle::Bundle,
    active: u64,
    active_sha: String,
    written: BTreeMap<u64, String>,
    killed_pids: BTreeSet<u32>,
    phases: BTreeMap<&'static str, usize>,
}

impl State<'_> {
    /// Checks the prompt directory after `round` and records how far the round got.
    fn check(&mut self, round: Round) {
        let dim = self.bundle.manifest.embed_dim;
        let dir = &self.dir;
        if !round.finished_before_kill {
            self.killed_pids.insert(round.pid);
        }
        let after = names(dir.dir());
        let log = format!(
            "{:?}, pid {}, {:?}; output:\n{}\nbefore: {:?}\nafter: {after:?}",
            round.trigger,
            round.pid,
            round.elapsed,
            round.output.join("\n"),
            round.before,
        );

        // Every file is `active`, a version, or a killed writer's temporary file, and
        // the version list sees only the versions.
        let mut versions = Vec::new();
        for n in &after {
            if n == "active" {
                continue;
            }
            if let Some(pid) = temp_pid(n) {
                assert!(
                    self.killed_pids.contains(&pid),
                    "{n} is no killed writer's: {log}"
                );
                continue;
            }
            let v: u64 = n
                .strip_prefix('v')
                .and_then(|s| s.strip_suffix(".safetensors"))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("unexpected file {n}: {log}"));
            versions.push(v);
        }
        versions.sort_unstable();
        assert_eq!(dir.versions(), versions, "{log}");

        // Every version is complete: earlier ones unchanged, a new one loadable and
        // made from the active set.
        let mut new_version = false;
        for &v in &versions {
            let set = PromptSet::load(&dir.path(v), dim)
                .unwrap_or_else(|e| panic!("v{v} is not a complete prompt set ({e}): {log}"));
            match self.written.get(&v) {
                Some(h) => assert_eq!(&sha(&dir.path(v)), h, "v{v} changed: {log}"),
                None => {
                    assert_eq!(set.metadata["version"], v.to_string(), "{log}");
                    assert_eq!(set.metadata["parent"], self.active.to_string(), "{log}");
                    self.written.insert(v, sha(&dir.path(v)));
                    new_version = true;
                }
            }
        }

        // `active` names the previous version, byte for byte, or a newer complete one
        // that this round wrote; the daemon's prompt manager activates it.
        let now = dir.active().unwrap().expect("`active` is still there");
        if now == self.active {
            assert_eq!(sha(&dir.path(now)), self.active_sha, "{log}");
        } else {
            assert!(
                now > self.active && !round.before.contains(&format!("v{now:04}.safetensors")),
                "active moved from v{} to v{now}, not a version this round wrote: {log}",
                self.active
            );
        }
        let (daemon_active, history) = daemon_view(dir, self.bundle);
        assert_eq!(daemon_active, now, "{log}");
        assert_eq!(
            history.iter().map(|h| h.version).collect::<Vec<_>>(),
            std::iter::once(0)
                .chain(versions.iter().copied())
                .collect::<Vec<_>>(),
            "{log}"
        );
        assert!(history.iter().all(|h| h.error.is_none()), "{log}");

        let own_temp = |prefix: &str| {
            after
                .iter()
                .find(|n| n.starts_with(prefix) && temp_pid(n) == Some(round.pid))
        };
        let (phase, temp) = if round.finished_before_kill {
            ("finished before the kill", None)
        } else if let Some(t) = own_temp(".v") {
            ("killed writing the version file", Some(t))
        } else if let Some(t) = own_temp(".active") {
            ("killed writing `active`", Some(t))
        } else if now != self.active {
            ("killed after promoting", None)
        } else if new_version {
            ("killed between writing and promoting", None)
        } else if round.output.iter().any(|l| l.starts_with("adapting")) {
            ("killed training", None)
        } else {
            ("killed starting up", None)
        };
        let temp = temp
            .map(|t| {
                let len = std::fs::metadata(dir.dir().join(t)).unwrap().len();
                format!(", left {t} ({len} bytes)")
            })
            .unwrap_or_default();
        eprintln!("{:?} -> {phase} ({:?}{temp})", round.trigger, round.elapsed);
        *self.phases.entry(phase).or_default() += 1;
        if now != self.active {
            self.active = now;
            self.active_sha = sha(&dir.path(now));
        }
    }
}

#[test]
fn killing_the_sidecar_leaves_the_previous_prompt_set_active_and_intact() {
    let started = Instant::now();
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let bundle_dir = small_clip_bundle(work.path());
    let bundle = streamiq::score::bundle::Bundle::open(&bundle_dir).unwrap();
    let dim = bundle.manifest.embed_dim;
    let db = work.path().join("labels.sqlite");
    // 60 labels whose targets follow a hidden direction in embedding space.
    common::HiddenDirectionLabels::new(&db, &bundle).add(0..60);
    let prompts = work.path().join("prompts");
    let cfg = work.path().join("adapt.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nbundle = \"{}\"\nprompts_dir = \"{}\"\n[labels]\ndb = \"{}\"\n\
             [adapt]\nmin_labels = 20\nholdout = 0.3\nmax_epochs = 40\n\
             [[streams]]\nid = \"cam\"\npipeline = \"videotestsrc is-live=true\"\n",
            bundle_dir.display(),
            prompts.display(),
            db.display()
        ),
    )
    .unwrap();
    let setup = started.elapsed();

    // A full round, timed: v0001, promoted.
    let t0 = Instant::now();
    let text = run_ok(&mut once_cmd(&cfg)).text();
    let full = t0.elapsed();
    eprintln!("a full round: {full:?}");
    let dir = PromptDir::new(&prompts);
    assert_eq!(dir.versions(), vec![1], "{text}");
    assert_eq!(dir.active().unwrap(), Some(1), "{text}");

    let mut state = State {
        dir: dir.clone(),
        bundle: &bundle,
        active: 1,
        active_sha: sha(&dir.path(1)),
        written: BTreeMap::from([(1, sha(&dir.path(1)))]),
        killed_pids: BTreeSet::new(),
        phases: BTreeMap::new(),
    };
    let limit = full * 4 + Duration::from_secs(20);

    // Kills spread over a round's run time (the estimate follows the fastest round
    // seen, so that the late ones land near the end, where the files are written).
    let mut estimate = full;
    for f in [0.03, 0.15, 0.3, 0.45, 0.6, 0.7, 0.8, 0.87, 0.93, 0.98] {
        let round = killed_round(&cfg, &prompts, Trigger::After(estimate.mul_f64(f)), limit);
        if round.finished_before_kill {
            estimate = estimate.min(round.elapsed);
        }
        state.check(round);
    }
    // Kills as soon as the round's temporary file appears: inside the atomic write of
    // the version file, or of `active` (the version is complete by then). Retried a
    // few times until they land there (they need the kill to beat the fsync).
    for (prefix, phase, want, tries) in [
        (".v", "killed writing the version file", 2, 5),
        (".active", "killed writing `active`", 1, 3),
    ] {
        for _ in 0..tries {
            let round = killed_round(&cfg, &prompts, Trigger::TempFile(prefix), limit);
            state.check(round);
            if state.phases.get(phase).copied().unwrap_or(0) >= want {
                break;
            }
        }
        assert!(
            state.phases.contains_key(phase),
            "no kill landed inside the write ({prefix}): {:?}",
            state.phases
        );
    }
    let (written, phases) = (state.written, state.phases);

    // A normal round still works after the kills, and clears the killed writers'
    // temporary files.
    let leftovers: Vec<String> = names(&prompts)
        .into_iter()
        .filter(|n| temp_pid(n).is_some())
        .collect();
    let text = run_ok(&mut once_cmd(&cfg)).text();
    let last = *written.keys().nth_back(0).unwrap();
    assert_eq!(dir.versions().last(), Some(&(last + 1)), "{text}");
    PromptSet::load(&dir.path(last + 1), dim).unwrap();
    let rest: Vec<String> = names(&prompts)
        .into_iter()
        .filter(|n| temp_pid(n).is_some())
        .collect();
    assert!(rest.is_empty(), "left behind: {rest:?} ({text})");
    let (daemon_active, _) = daemon_view(&dir, &bundle);
    assert_eq!(Some(daemon_active), dir.active().unwrap());

    eprintln!(
        "setup {setup:?}, full round {full:?} (fastest {estimate:?}), phases {phases:?}, \
         leftovers cleared {leftovers:?}, total {:?}",
        started.elapsed()
    );
}
