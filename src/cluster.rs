//! Sharding the streams over several daemons (`[cluster]`): each of `replicas` daemons
//! watches the streams whose id falls to it by rendezvous (highest-random-weight)
//! hashing. Every daemon reads the same stream list and decides alone, with no
//! coordination: a stream belongs to the replica whose weight `sha256(id, replica)` is
//! highest. Going from N to N+1 replicas moves only the streams whose new highest weight
//! is the new replica's (about 1/(N+1) of them); every other stream stays where it was.

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{ConfigError, StreamSettings};

/// `[cluster]`, as read.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// How many daemons share the streams (1: this daemon watches them all).
    pub replicas: u32,
    /// This daemon's index in `0..replicas`. Unset: the ordinal at the end of the host
    /// name (a StatefulSet pod `streamiq-2` is replica 2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<u32>,
    /// The primary's HTTP address (`http://streamiq-0.streamiq:9790`): the replica that
    /// keeps the cluster's label store and prompt sets. The others forward their labels
    /// to it and follow its active prompt set. Unset: every daemon keeps its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Which replica the primary is.
    pub primary_replica: u32,
    /// The file holding the primary's API token (default: `server.api_token_file`, the
    /// same token on every replica).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_token_file: Option<std::path::PathBuf>,
    /// Labels a replica keeps queued (in its label store) while the primary does not
    /// answer; beyond them new labels are refused (503), none is dropped.
    pub forward_queue_max: u64,
    /// How often a replica sends queued labels and asks the primary for its active
    /// prompt set.
    pub sync_interval: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            replicas: 1,
            replica: None,
            primary: None,
            primary_replica: 0,
            primary_token_file: None,
            forward_queue_max: 2_000,
            sync_interval: "10s".into(),
        }
    }
}

/// What a replica that is not the primary does with labels and prompt sets
/// (`cluster.primary`), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Follow {
    /// The primary's address, as configured (for messages).
    pub url: String,
    /// `host:port` to connect to, and the `Host` header.
    pub authority: String,
    /// `cluster.primary_replica`: the replica the daemon at `url` must say it is.
    pub primary_replica: u32,
    /// The primary's API token file.
    pub token_file: std::path::PathBuf,
    /// `cluster.forward_queue_max`.
    pub queue_max: u64,
    /// `cluster.sync_interval`.
    pub interval: std::time::Duration,
}

/// The host and port of a `http://host[:port][/]` address.
fn http_host_port(url: &str) -> Result<(String, u16), String> {
    let rest = url.strip_prefix("http://").ok_or(
        "expected http://HOST:PORT (the primary's plain-HTTP listen address inside the cluster)",
    )?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return Err("expected http://HOST:PORT with no path, user or query".into());
    }
    let uri: hyper::Uri = format!("http://{authority}/")
        .parse()
        .map_err(|e| format!("not an address: {e}"))?;
    let host = uri.host().filter(|h| !h.is_empty()).ok_or("no host")?;
    Ok((host.to_string(), uri.port_u16().unwrap_or(80)))
}

/// Validated `[cluster]`: which replica this daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cluster {
    /// How many daemons share the streams.
    pub replicas: NonZeroU32,
    /// This daemon's index, below `replicas`.
    pub replica: u32,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            replicas: NonZeroU32::MIN,
            replica: 0,
        }
    }
}

/// Largest `cluster.replicas` accepted.
pub const MAX_REPLICAS: u32 = 1024;

impl ClusterConfig {
    /// Validates; `hostname` is asked for only when `replica` is unset and
    /// `replicas > 1`.
    pub fn validate(
        &self,
        hostname: impl FnOnce() -> Option<String>,
    ) -> Result<Cluster, ConfigError> {
        let replicas = NonZeroU32::new(self.replicas)
            .filter(|n| n.get() <= MAX_REPLICAS)
            .ok_or_else(|| {
                ConfigError::invalid(
                    "cluster.replicas",
                    self.replicas,
                    format!("must be within 1..={MAX_REPLICAS}"),
                )
            })?;
        let replica = match self.replica {
            Some(r) => r,
            None if replicas.get() == 1 => 0,
            None => {
                let name = hostname().unwrap_or_default();
                ordinal(&name).ok_or_else(|| {
                    ConfigError::invalid(
                        "cluster.replica",
                        "unset",
                        format!(
                            "with cluster.replicas = {replicas} set it, or run on a host whose \
                             name ends in -N (a StatefulSet pod); this host is {name:?}"
                        ),
                    )
                })?
            }
        };
        if replica >= replicas.get() {
            return Err(ConfigError::invalid(
                "cluster.replica",
                replica,
                format!("must be below cluster.replicas ({replicas})"),
            ));
        }
        Ok(Cluster { replicas, replica })
    }

    /// Whether `cluster` (this daemon) is the cluster's primary: `cluster.primary` is
    /// set and this is `cluster.primary_replica`. Only the primary takes labels that
    /// replicas forward.
    pub fn is_primary(&self, cluster: &Cluster) -> bool {
        self.primary.is_some() && cluster.replica == self.primary_replica
    }

    /// The host name of `cluster.primary` (lower case), if it is set and valid.
    pub fn primary_host(&self) -> Option<String> {
        let (host, _) = http_host_port(self.primary.as_deref()?.trim()).ok()?;
        Some(host.trim_matches(['[', ']']).to_ascii_lowercase())
    }

    /// What `cluster` (this daemon, validated by [`validate`](Self::validate)) does as a
    /// follower of `cluster.primary`: `None` without a primary or on the primary itself.
    pub fn follow(
        &self,
        cluster: &Cluster,
        api_token_file: &std::path::Path,
    ) -> Result<Option<Follow>, ConfigError> {
        if self.primary_replica >= cluster.replicas.get() {
            return Err(ConfigError::invalid(
                "cluster.primary_replica",
                self.primary_replica,
                format!("must be below cluster.replicas ({})", cluster.replicas),
            ));
        }
        let interval = crate::config::duration("cluster.sync_interval", &self.sync_interval)?;
        if !(std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(3600))
            .contains(&interval)
        {
            return Err(ConfigError::invalid(
                "cluster.sync_interval",
                &self.sync_interval,
                "must be within 100ms..=1h",
            ));
        }
        if self.forward_queue_max == 0 {
            return Err(ConfigError::invalid(
                "cluster.forward_queue_max",
                0,
                "must be at least 1",
            ));
        }
        let Some(url) = &self.primary else {
            return Ok(None);
        };
        let (host, port) = http_host_port(url.trim())
            .map_err(|why| ConfigError::invalid("cluster.primary", url, why))?;
        if cluster.replica == self.primary_replica {
            return Ok(None);
        }
        Ok(Some(Follow {
            url: url.trim().trim_end_matches('/').to_string(),
            authority: format!("{host}:{port}"),
            primary_replica: self.primary_replica,
            token_file: self
                .primary_token_file
                .clone()
                .unwrap_or_else(|| api_token_file.to_owned()),
            queue_max: self.forward_queue_max,
            interval,
        }))
    }
}

/// The number after the last `-` of a StatefulSet pod name (`streamiq-12` -> 12).
fn ordinal(hostname: &str) -> Option<u32> {
    let short = hostname.split('.').next()?;
    let (_, n) = short.rsplit_once('-')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// This machine's host name: `$HOSTNAME`, else the kernel's.
pub fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
}

/// The weight of `replica` for stream `id`: the first 8 bytes of
/// `sha256("streamiq-rendezvous" 0x00 id 0x00 replica as u32 little-endian)`, big-endian.
pub fn weight(id: &str, replica: u32) -> u64 {
    let mut h = Sha256::new();
    h.update(b"streamiq-rendezvous\0");
    h.update(id.as_bytes());
    h.update(b"\0");
    h.update(replica.to_le_bytes());
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("a sha256 has 8 bytes"))
}

impl Cluster {
    /// The replica that watches stream `id` (highest weight; ties go to the lower index).
    pub fn owner(&self, id: &str) -> u32 {
        (0..self.replicas.get())
            .max_by_key(|&r| (weight(id, r), std::cmp::Reverse(r)))
            .unwrap_or(0)
    }

    /// Whether this daemon watches stream `id`.
    pub fn owns(&self, id: &str) -> bool {
        self.replicas.get() == 1 || self.owner(id) == self.replica
    }

    /// The streams of `all` this daemon watches, in order.
    pub fn mine(&self, all: &[StreamSettings]) -> Vec<StreamSettings> {
        all.iter().filter(|s| self.owns(&s.id)).cloned().collect()
    }

    /// Whether the streams are shared with other daemons.
    pub fn is_sharded(&self) -> bool {
        self.replicas.get() > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(replica: u32, replicas: u32) -> Cluster {
        Cluster {
            replicas: NonZeroU32::new(replicas).unwrap(),
            replica,
        }
    }

    #[test]
    fn every_stream_has_exactly_one_owner() {
        let ids: Vec<String> = (0..300).map(|i| format!("cam-{i}")).collect();
        for n in 1..=6 {
            let mut counts = vec![0usize; n as usize];
            for id in &ids {
                let owners: Vec<u32> = (0..n).filter(|&r| cluster(r, n).owns(id)).collect();
                assert_eq!(owners.len(), 1, "{id} with {n} replicas: {owners:?}");
                counts[owners[0] as usize] += 1;
            }
            // Balanced within a loose bound (300 ids, binomial spread).
            let expect = 300 / n as usize;
            for c in counts {
                assert!(
                    c.abs_diff(expect) < expect / 2 + 10,
                    "{n} replicas: {c} vs {expect}"
                );
            }
        }
    }

    #[test]
    fn adding_a_replica_moves_only_streams_to_the_new_one() {
        let ids: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
        for n in 1..8u32 {
            let (before, after) = (cluster(0, n), cluster(0, n + 1));
            let mut moved = 0;
            for id in &ids {
                let (a, b) = (before.owner(id), after.owner(id));
                if a != b {
                    assert_eq!(b, n, "{id} moved from {a} to {b}, not to the new replica");
                    moved += 1;
                }
            }
            let expect = 1000.0 / f64::from(n + 1);
            assert!(
                (f64::from(moved) - expect).abs() < expect * 0.35,
                "{n} -> {}: {moved} moved, expected about {expect:.0}",
                n + 1
            );
        }
    }

    #[test]
    fn weight_is_stable_across_builds() {
        // Fixed values: a change of the hash would move every stream of a running fleet.
        assert_eq!(weight("cam-1", 0), weight("cam-1", 0));
        let expect = {
            let mut h = Sha256::new();
            h.update(b"streamiq-rendezvous\0cam-1\0\x02\0\0\0");
            u64::from_be_bytes(h.finalize()[..8].try_into().unwrap())
        };
        assert_eq!(weight("cam-1", 2), expect);
    }

    #[test]
    fn replicas_other_than_the_primary_follow_it() {
        let token = std::path::Path::new("state/api-token");
        let config = |replica, primary: &str| ClusterConfig {
            replicas: 3,
            replica: Some(replica),
            primary: Some(primary.into()),
            ..Default::default()
        };
        let follow = |c: ClusterConfig| {
            let cluster = c.validate(|| None).unwrap();
            c.follow(&cluster, token)
        };
        assert_eq!(
            follow(config(0, "http://streamiq-0.streamiq:9790")).unwrap(),
            None
        );
        let f = follow(config(2, "http://streamiq-0.streamiq:9790/"))
            .unwrap()
            .unwrap();
        assert_eq!(f.authority, "streamiq-0.streamiq:9790");
        assert_eq!(f.url, "http://streamiq-0.streamiq:9790");
        assert_eq!(f.token_file, token);
        assert_eq!(f.interval, std::time::Duration::from_secs(10));
        assert_eq!(
            follow(config(1, "http://10.0.0.7"))
                .unwrap()
                .unwrap()
                .authority,
            "10.0.0.7:80"
        );
        for (bad, key) in [
            ("https://streamiq-0:9790", "cluster.primary"),
            ("streamiq-0:9790", "cluster.primary"),
            ("http://streamiq-0:9790/api", "cluster.primary"),
            ("http://user@streamiq-0:9790", "cluster.primary"),
            ("http://", "cluster.primary"),
        ] {
            let e = follow(config(1, bad)).unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
        let e = follow(ClusterConfig {
            primary_replica: 3,
            ..config(1, "http://a:1")
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("cluster.primary_replica"), "{e}");
        let e = follow(ClusterConfig {
            sync_interval: "1ms".into(),
            ..config(1, "http://a:1")
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("cluster.sync_interval"), "{e}");
    }

    #[test]
    fn replica_comes_from_the_pod_ordinal_or_is_refused() {
        let c = |replicas, replica| ClusterConfig {
            replicas,
            replica,
            ..Default::default()
        };
        assert_eq!(
            c(3, None)
                .validate(|| Some("streamiq-2".into()))
                .unwrap()
                .replica,
            2
        );
        assert_eq!(
            c(3, None)
                .validate(|| Some("streamiq-1.streamiq.qc.svc".into()))
                .unwrap()
                .replica,
            1
        );
        assert_eq!(
            c(1, None).validate(|| panic!("not asked")).unwrap().replica,
            0
        );
        assert_eq!(
            c(3, Some(1))
                .validate(|| panic!("not asked"))
                .unwrap()
                .replica,
            1
        );
        let e = c(3, None)
            .validate(|| Some("qc-box".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluster.replica") && e.contains("qc-box"), "{e}");
        let e = c(3, None)
            .validate(|| Some("streamiq-3".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluster.replica") && e.contains("below"), "{e}");
        let e = c(0, None).validate(|| None).unwrap_err().to_string();
        assert!(e.contains("cluster.replicas"), "{e}");
        let e = c(2, Some(2)).validate(|| None).unwrap_err().to_string();
        assert!(e.contains("cluster.replica"), "{e}");
    }
}
