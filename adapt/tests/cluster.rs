//! One truth in a cluster (`cluster.primary`): two real daemons as replicas 0 (the
//! primary) and 1. A label posted on replica 1 reaches the primary's store with its
//! frame and embedding and is used by the next `streamiq-adapt once` round there; the
//! new prompt set reaches replica 1 without a restart, and so does a rollback. With the
//! primary down, labels queue on replica 1 (bounded, refused beyond the bound, kept
//! across a restart of replica 1) and arrive when the primary is back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

#[path = "../../tests/common/mod.rs"]
mod common;
use common::daemon::Process;
use common::{
    HiddenDirectionLabels, free_port, get_as, http, json_as, post_label, run_ok, sample, text,
    wait_until_for,
};
use streamiq::labels::LabelStore;
use streamiq::score::bundle::Bundle;
use streamiq::score::prompt_store::PromptDir;

const WAIT: Duration = Duration::from_secs(30);

/// The shipped model: the sidecar needs a bundle with its text tower.
fn tiny() -> PathBuf {
    common::repo().join("models/streamiq-tiny")
}

/// Replica `replica` of two; the primary listens on `primary_port`.
fn config(work: &Path, replica: u32, port: u16, primary_port: u16, streams: &[String]) -> PathBuf {
    let dir = work.join(format!("replica-{replica}"));
    std::fs::create_dir_all(&dir).unwrap();
    let streams: String = streams
        .iter()
        .map(|id| {
            format!(
                "[[streams]]\nid = \"{id}\"\npipeline = \"videotestsrc is-live=true \
                 pattern=ball ! video/x-raw,width=160,height=120,framerate=10/1\"\n\
                 sample_fps = 2\n"
            )
        })
        .collect();
    let cfg = dir.join("streamiq.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\napi_token_file = \"{token}\"\n\
             [model]\nbundle = \"{bundle}\"\nprompts_dir = \"{prompts}\"\nintra_threads = 1\n\
             [scorer]\nviews = \"global\"\n\
             [labels]\ndb = \"{db}\"\n\
             [adapt]\nmin_labels = 20\nholdout = 0.3\nmax_epochs = 80\n\
             [cluster]\nreplicas = 2\nreplica = {replica}\nprimary = \"http://127.0.0.1:{primary_port}\"\n\
             sync_interval = \"300ms\"\nforward_queue_max = 3\n{streams}",
            token = work.join("api-token").display(),
            bundle = tiny().display(),
            prompts = dir.join("prompts").display(),
            db = dir.join("labels.sqlite").display(),
        ),
    )
    .unwrap();
    cfg
}

/// The newest `n` frame ids of `stream` on the daemon at `addr`.
fn frames(addr: std::net::SocketAddr, token: &str, stream: &str, n: usize) -> Vec<u64> {
    let list = json_as(
        addr,
        &format!("/api/v1/streams/{stream}/frames?limit={n}"),
        token,
    );
    list.as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_u64().unwrap())
        .collect()
}

fn metrics_of(addr: std::net::SocketAddr) -> String {
    text(addr, "/metrics")
}

fn metric_of(addr: std::net::SocketAddr, series: &str) -> Option<f64> {
    sample(&metrics_of(addr), series)
}

fn labels_of(addr: std::net::SocketAddr, token: &str) -> Vec<Value> {
    json_as(addr, "/api/v1/labels", token)
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn labels_reach_the_primary_and_its_prompt_set_reaches_every_replica() {
    let work = tempfile::tempdir().unwrap();
    let bundle = Bundle::open(&tiny()).unwrap();
    std::fs::write(
        work.path().join("api-token"),
        format!("{:064x}", 0x5eed_u64),
    )
    .unwrap();
    let token = common::token_in(&work.path().join("api-token"));
    // Streams that fall to replica 0 and to replica 1 by the documented rule.
    let sharding = streamiq::cluster::Cluster {
        replicas: std::num::NonZeroU32::new(2).unwrap(),
        replica: 1,
    };
    let ids: Vec<String> = (0..40).map(|i| format!("cam-{i}")).collect();
    let theirs = ids.iter().find(|id| sharding.owns(id)).unwrap().clone();
    let ours = ids.iter().find(|id| !sharding.owns(id)).unwrap().clone();
    let streams = [ours.clone(), theirs.clone()];
    let (p0, p1) = (free_port(), free_port());
    let cfg0 = config(work.path(), 0, p0, p0, &streams);
    let cfg1 = config(work.path(), 1, p1, p0, &streams);
    let db0 = work.path().join("replica-0/labels.sqlite");
    let db1 = work.path().join("replica-1/labels.sqlite");

    let mut primary = Process::start(&cfg0);
    let mut replica = Process::start(&cfg1);
    let (a0, a1) = (primary.addr, replica.addr);
    wait_until_for(WAIT, "replica 1 reaches the primary", || {
        metric_of(a1, "streamiq_cluster_primary_up") == Some(1.0)
    });
    assert_eq!(
        metric_of(a0, "streamiq_cluster_primary_up"),
        None,
        "the primary follows nobody"
    );
    wait_until_for(WAIT, "frames on replica 1", || {
        metric_of(
            a1,
            &format!("streamiq_frames_scored_total{{stream=\"{theirs}\"}}"),
        )
        .is_some_and(|v| v >= 6.0)
    });

    // A label on replica 1 is stored there, queued, and stored by the primary with the
    // frame, the embedding and replica 1's run id.
    let fids = frames(a1, &token, &theirs, 6);
    let (code, stored) = post_label(
        a1,
        Some(&token),
        &format!(r#"{{"frame_id": {}, "mos": 2}}"#, fids[0]),
    );
    assert_eq!(code, 201, "{stored}");
    assert_eq!(stored["primary"], "queued");
    wait_until_for(WAIT, "the label on the primary", || {
        labels_of(a0, &token).len() == 1
    });
    let on_primary = &labels_of(a0, &token)[0];
    assert_eq!(on_primary["stream"], theirs.as_str());
    assert_eq!(on_primary["frame_id"], fids[0]);
    assert_eq!(on_primary["run_id"], stored["run_id"]);
    assert_eq!(on_primary["mos"], 2.0);
    assert_eq!(on_primary["model_sha256"], stored["model_sha256"]);
    let (s0, s1) = (
        LabelStore::open(&db0).unwrap(),
        LabelStore::open(&db1).unwrap(),
    );
    let (id0, id1) = (
        on_primary["id"].as_i64().unwrap(),
        stored["id"].as_i64().unwrap(),
    );
    assert_eq!(s0.embedding(id0).unwrap(), s1.embedding(id1).unwrap());
    assert_eq!(s0.frame(id0).unwrap(), s1.frame(id1).unwrap());
    assert!(
        s0.frame(id0).unwrap().is_some(),
        "the frame travels with the label"
    );
    wait_until_for(WAIT, "the queue empties", || {
        metric_of(a1, "streamiq_cluster_labels_queued") == Some(0.0)
    });
    assert_eq!(
        metric_of(a1, "streamiq_cluster_labels_forwarded_total"),
        Some(1.0)
    );

    // Forwarded labels are checked: another model's embedding names both models.
    let (code, err) = post_label(
        a0,
        Some(&token),
        &serde_json::json!({"mos": 3, "forwarded": {"replica": 1, "run_id": "ab", "frame_id": 1,
            "stream": "cam-x", "captured": 1.0, "pts": null, "bundle": "other",
            "model_sha256": "0".repeat(64), "prompt_version": 0, "model_score": 0.5,
            "embedding": "AACAPw==", "thumbnail": "/9j/2Q==", "frame": null}})
        .to_string(),
    );
    assert_eq!(
        (code, err["field"].as_str()),
        (409, Some("forwarded")),
        "{err}"
    );
    assert!(
        err["error"].as_str().unwrap().contains(&"0".repeat(64)),
        "{err}"
    );
    let (code, err) = post_label(
        a0,
        Some(&token),
        r#"{"mos": 3, "forwarded": {"replica": 1}}"#,
    );
    assert_eq!(
        (code, err["field"].as_str()),
        (422, Some("forwarded")),
        "{err}"
    );
    // ... and a replica takes none.
    let (code, err) = post_label(a1, Some(&token), r#"{"mos": 3, "forwarded": {}}"#);
    assert_eq!(
        (code, err["field"].as_str()),
        (409, Some("cluster")),
        "{err}"
    );

    // The next adaptation round on the primary uses it: 59 more labels, 60 used.
    HiddenDirectionLabels::new(&db0, &bundle).add(0..59);
    let text = run_ok(
        Command::new(env!("CARGO_BIN_EXE_streamiq-adapt"))
            .args(["once", "--config"])
            .arg(&cfg0),
    )
    .text();
    let dir0 = PromptDir::new(work.path().join("replica-0/prompts"));
    assert_eq!(dir0.active().unwrap(), Some(1), "{text}");
    let set = streamiq::score::prompts::PromptSet::load(&dir0.path(1), bundle.manifest.embed_dim)
        .unwrap();
    assert_eq!(set.metadata["labels"], "60", "{text}");

    // The new set reaches replica 1 without a restart, byte for byte.
    wait_until_for(WAIT, "replica 1 on prompt set 1", || {
        metric_of(a1, "streamiq_prompt_version") == Some(1.0)
    });
    let dir1 = PromptDir::new(work.path().join("replica-1/prompts"));
    assert_eq!(
        std::fs::read(dir1.path(1)).unwrap(),
        std::fs::read(dir0.path(1)).unwrap()
    );
    assert_eq!(json_as(a1, "/api/v1/prompts", &token)["active"], 1);
    // A set activated on the replica behind its back (its own `active` file) is
    // replaced by the primary's again.
    let taken = |p: &Process| {
        p.log_text()
            .matches("Prompt set taken from the primary")
            .count()
    };
    assert_eq!(taken(&replica), 1);
    dir1.set_active(0).unwrap();
    wait_until_for(WAIT, "the primary's set taken again", || {
        taken(&replica) == 2
    });
    wait_until_for(WAIT, "replica 1 back on prompt set 1", || {
        metric_of(a1, "streamiq_prompt_version") == Some(1.0) && dir1.active().unwrap() == Some(1)
    });
    // Replica 1 leaves switching to the primary; a rollback there reaches it.
    let (code, body) = http(
        a1,
        "POST",
        "/api/v1/prompts/rollback",
        Some(&token),
        r#"{"version":0}"#,
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains(&format!("127.0.0.1:{p0}")), "{body}");
    let (code, body) = http(
        a0,
        "POST",
        "/api/v1/prompts/rollback",
        Some(&token),
        r#"{"version":0}"#,
    );
    assert_eq!(code, 200, "{body}");
    wait_until_for(WAIT, "replica 1 back on prompt set 0", || {
        metric_of(a1, "streamiq_prompt_version") == Some(0.0)
    });
    // The set is served with its sha256; an unchanged one answers 304.
    let (code, bytes) = get_as(a0, "/api/v1/prompts/active", &token);
    assert_eq!(code, 200);
    assert_eq!(bytes, std::fs::read(bundle.prompts_path()).unwrap());

    // The primary goes down: labels queue on replica 1, up to forward_queue_max (3).
    primary.signal("KILL");
    primary.wait();
    wait_until_for(WAIT, "replica 1 sees the primary down", || {
        metric_of(a1, "streamiq_cluster_primary_up") == Some(0.0)
    });
    for f in &fids[1..4] {
        let (code, body) = post_label(
            a1,
            Some(&token),
            &format!(r#"{{"frame_id": {f}, "mos": 5}}"#),
        );
        assert_eq!(code, 201, "{body}");
    }
    let (code, err) = post_label(
        a1,
        Some(&token),
        &format!(r#"{{"frame_id": {}, "mos": 5}}"#, fids[4]),
    );
    assert_eq!(
        (code, err["field"].as_str()),
        (503, Some("labels")),
        "{err}"
    );
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{p0}")),
        "{err}"
    );
    assert_eq!(s1.count().unwrap(), 4, "the refused label is not stored");
    wait_until_for(WAIT, "three queued", || {
        metric_of(a1, "streamiq_cluster_labels_queued") == Some(3.0)
    });
    assert!(
        metric_of(
            a1,
            "streamiq_cluster_sync_errors_total{kind=\"unreachable\"}"
        )
        .unwrap()
            >= 1.0
    );
    replica.assert_alive();

    // Replica 1 restarts (the queue is on disk), then the primary comes back.
    replica.signal("TERM");
    assert!(replica.wait().success(), "{}", replica.log_text());
    let replica = Process::start(&cfg1);
    let a1 = replica.addr;
    wait_until_for(WAIT, "the queue survives the restart", || {
        metric_of(a1, "streamiq_cluster_labels_queued") == Some(3.0)
    });
    let primary = Process::start(&cfg0);
    let a0 = primary.addr;
    wait_until_for(WAIT, "the queue drains into the primary", || {
        metric_of(a1, "streamiq_cluster_labels_queued") == Some(0.0)
    });
    let stored: Vec<Value> = labels_of(a0, &token);
    assert_eq!(stored.len(), 60 + 3);
    let forwarded: Vec<u64> = stored
        .iter()
        .filter(|l| l["stream"] == theirs.as_str() && l["mos"] == 5.0)
        .map(|l| l["frame_id"].as_u64().unwrap())
        .collect();
    assert_eq!(forwarded, fids[1..4].to_vec());
    assert_eq!(metric_of(a1, "streamiq_cluster_primary_up"), Some(1.0));
    drop((primary, replica));
}
