#!/usr/bin/env python3
"""Soak test of the daemon (`make soak`; not part of `make test`).

    soak.py [--minutes 30] [--cycle 60] [--binary target/release/streamiq] [--out target/soak]

Runs `streamiq run` with nine streams of mixed kinds:

  file       a local H.264 file, looped (uri, restarted at its end)
  jpegs      a JPEG sequence through multifilesrc, looped (launch line)
  live       videotestsrc, live (launch line)
  udp        MPEG-TS over UDP from a sender process          (uri udp://)
  srt        MPEG-TS over SRT, the daemon calling a listener  (uri srt://)
  tcp        MPEG-TS over TCP from a tcpserversink            (launch line tcpclientsrc)
  tcp2       the same, a second sender
  rtp        RTP/H.264 over UDP                               (launch line udpsrc)
  broken     an RTSP address nobody answers                  (uri rtsp://, always failing)

Every cycle (60 s by default) the senders are killed for a quarter of it, then paused
(SIGSTOP) for a quarter, then continued and, where killed, started again. Meanwhile a
client posts a label on a recent frame every 2 s and rolls the prompt set back and
reloads it every 15 s. Every 10 s the daemon's RSS, threads and open file descriptors
are sampled from /proc, with each stream's restarts from /api/v1/streams.

The report (OUT/report.md, and OUT/samples.csv) has a table per minute, restarts per
stream, any panic in the log, and the verdict: flat means RSS at the last minute at
most the tenth minute's + 16 MiB (for runs shorter than 20 minutes: the middle
minute's), and after the first third of the run the same fewest threads and file
descriptors in every cycle (the moment all sources are up and settled; the most, while
pipelines are being rebuilt on a backoff that does not follow the cycle, are reported).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] soak: {msg}", flush=True)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sender:
    """A gst-launch-1.0 sender that can be killed, paused and started again."""

    def __init__(self, name, pipeline):
        self.name, self.pipeline, self.proc = name, pipeline, None

    def start(self):
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(["gst-launch-1.0", "-q", *self.pipeline.split()],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def signal(self, sig):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)


def source(enc="x264enc tune=zerolatency speed-preset=ultrafast bitrate=800 key-int-max=25"):
    return ("videotestsrc is-live=true pattern=smpte ! video/x-raw,width=640,height=360,framerate=25/1 "
            f"! timeoverlay ! {enc}")


class Api:
    def __init__(self, addr, token):
        self.base, self.token = f"http://{addr}", token

    def call(self, method, path, body=None):
        req = urllib.request.Request(self.base + path, method=method,
                                     data=None if body is None else json.dumps(body).encode())
        req.add_header("Authorization", f"Bearer {self.token}")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, None
        except OSError:
            return 0, None


def proc_stats(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    field = {line.split(":")[0]: line.split(":")[1].strip() for line in status.splitlines() if ":" in line}
    rss = int(field["VmRSS"].split()[0]) / 1024
    threads = int(field["Threads"])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, threads, fds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--cycle", type=float, default=60, help="seconds per kill/pause/restore cycle")
    ap.add_argument("--binary", default=str(ROOT / "target/release/streamiq"))
    ap.add_argument("--out", default=str(ROOT / "target/soak"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(a.binary).is_file():
        sys.exit(f"soak: {a.binary} is missing (make build-daemon)")
    work = Path(tempfile.mkdtemp(prefix="streamiq-soak-"))
    clip = work / "clip.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25:duration=8",
                    "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(clip)], check=True)
    jpegs = work / "jpegs"
    jpegs.mkdir()
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(clip), "-q:v", "3", str(jpegs / "%05d.jpg")], check=True)
    ports = {k: free_port() for k in ("http", "udp", "srt", "tcp", "tcp2", "rtp")}
    senders = [
        Sender("udp", f"{source()} ! mpegtsmux ! udpsink host=127.0.0.1 port={ports['udp']}"),
        Sender("srt", f"{source()} ! mpegtsmux ! srtsink uri=srt://:{ports['srt']}?mode=listener "
                      "wait-for-connection=false"),
        Sender("tcp", f"{source()} ! mpegtsmux ! tcpserversink host=127.0.0.1 port={ports['tcp']}"),
        Sender("tcp2", f"{source()} ! mpegtsmux ! tcpserversink host=127.0.0.1 port={ports['tcp2']}"),
        Sender("rtp", f"{source()} ! rtph264pay config-interval=1 pt=96 ! udpsink host=127.0.0.1 port={ports['rtp']}"),
    ]
    streams = [
        ("file", f'uri = "file://{clip}"'),
        ("jpegs", f'pipeline = "multifilesrc location={jpegs}/%05d.jpg start-index=1 index=1 loop=true '
                  f'caps=image/jpeg,framerate=25/1 ! jpegdec"'),
        ("live", 'pipeline = "videotestsrc is-live=true pattern=ball '
                 '! video/x-raw,width=320,height=240,framerate=25/1"'),
        ("udp", f'uri = "udp://127.0.0.1:{ports["udp"]}"'),
        ("srt", f'uri = "srt://127.0.0.1:{ports["srt"]}?mode=caller"'),
        ("tcp", f'pipeline = "tcpclientsrc host=127.0.0.1 port={ports["tcp"]} ! tsdemux ! h264parse ! avdec_h264"'),
        ("tcp2", f'pipeline = "tcpclientsrc host=127.0.0.1 port={ports["tcp2"]} ! tsdemux ! h264parse ! avdec_h264"'),
        ("rtp", f'pipeline = "udpsrc port={ports["rtp"]} caps=application/x-rtp,media=video,encoding-name=H264,'
                f'payload=96,clock-rate=90000 ! rtph264depay ! h264parse ! avdec_h264"'),
        ("broken", 'uri = "rtsp://127.0.0.1:1/nothing"'),
    ]
    config = work / "streamiq.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{ports["http"]}"\napi_token_file = "{work}/api-token"\n'
        f'[model]\nbundle = "{ROOT}/models/streamiq-tiny"\nprompts_dir = "{work}/prompts"\n'
        f'[labels]\ndb = "{work}/labels.sqlite"\nincidents_dir = "{work}/incidents"\n'
        + "".join(f'\n[[streams]]\nid = "{i}"\n{s}\nsample_fps = 2.0\n' for i, s in streams))
    for s in senders:
        s.start()
    daemon_log = open(out / "daemon.log", "w")
    daemon = subprocess.Popen([a.binary, "run", "--config", str(config)], stdout=daemon_log,
                              stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
    token_file = work / "api-token"
    for _ in range(100):
        if token_file.is_file() and token_file.read_text().strip():
            break
        time.sleep(0.2)
    api = Api(f"127.0.0.1:{ports['http']}", token_file.read_text().strip())
    stop = threading.Event()
    counts = {"labels": 0, "label_errors": 0, "rollbacks": 0}

    def client():
        k = 0
        while not stop.wait(2):
            k += 1
            code, frames = api.call("GET", "/api/v1/streams/live/frames?limit=1")
            if code == 200 and frames:
                code, _ = api.call("POST", "/api/v1/labels", {"frame_id": frames[0]["id"], "mos": 1 + k % 5})
                counts["labels" if code == 201 else "label_errors"] += 1
            if k % 8 == 0:
                api.call("POST", "/api/v1/prompts/rollback", {"version": 0})
                api.call("POST", "/api/v1/prompts/reload")
                counts["rollbacks"] += 1

    threading.Thread(target=client, daemon=True).start()
    t0 = time.time()
    end = t0 + a.minutes * 60
    samples = []
    phase_name = "up"
    next_sample = t0
    log(f"{len(streams)} streams, {a.minutes:g} min, {a.cycle:g}-s cycles; log in {out / 'daemon.log'}")
    try:
        while time.time() < end:
            if daemon.poll() is not None:
                raise SystemExit(f"soak: the daemon exited with {daemon.returncode} (see {out / 'daemon.log'})")
            phase = ((time.time() - t0) % a.cycle) / a.cycle
            want = "up" if phase < 0.5 else "killed" if phase < 0.75 else "paused"
            if want != phase_name:
                if want == "killed":
                    for s in senders[:3]:
                        s.kill()
                elif want == "paused":
                    for s in senders[:3]:
                        s.start()
                    for s in senders[3:]:
                        s.signal(signal.SIGSTOP)
                else:
                    for s in senders[3:]:
                        s.signal(signal.SIGCONT)
                    for s in senders:
                        s.start()
                phase_name = want
            if time.time() >= next_sample:
                rss, threads, fds = proc_stats(daemon.pid)
                _, listed = api.call("GET", "/api/v1/streams")
                restarts = {s["id"]: s.get("restarts", 0) for s in listed or []}
                samples.append({"t": time.time() - t0, "phase": round(phase, 3), "rss_mib": rss,
                                "threads": threads, "fds": fds, "restarts": restarts})
                if len(samples) % 6 == 0:
                    log(f"minute {samples[-1]['t'] / 60:.0f}: RSS {rss:.0f} MiB, {threads} threads, {fds} fds, "
                        f"{counts['labels']} labels, {counts['rollbacks']} rollbacks")
                next_sample += 10
            time.sleep(0.2)
    finally:
        stop.set()
        for s in senders:
            s.signal(signal.SIGCONT)
            s.kill()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        daemon_log.close()
    report(samples, counts, a, out, daemon.returncode, [s[0] for s in streams])


def report(samples, counts, a, out, rc, ids):
    with open(out / "samples.csv", "w") as f:
        f.write("seconds,phase,rss_mib,threads,fds\n")
        for s in samples:
            f.write(f"{s['t']:.0f},{s['phase']},{s['rss_mib']:.1f},{s['threads']},{s['fds']}\n")
    text = (out / "daemon.log").read_text(errors="replace")
    panics = [line for line in text.splitlines() if "panicked" in line]
    minutes = {}
    for s in samples:
        minutes.setdefault(int(s["t"] // 60), s)
    total = int(samples[-1]["t"] // 60) if samples else 0
    ref_min = 10 if total >= 20 else max(1, total // 2)
    rss_ref, rss_end = minutes.get(ref_min, samples[0])["rss_mib"], samples[-1]["rss_mib"]
    first_third = samples[-1]["t"] / 3 if samples else 0
    # Per cycle after the first third: the fewest threads and fds (every source up and
    # settled at some point of the cycle) must not move; the most (pipelines being
    # rebuilt at that moment, a backoff of up to 30 s not aligned with the cycle) are
    # reported beside them.
    cycles = {}
    for s in samples:
        if s["t"] >= first_third:
            cycles.setdefault(int(s["t"] // a.cycle), []).append(s)
    low_fds = sorted({min(x["fds"] for x in c) for c in cycles.values()})
    low_threads = sorted({min(x["threads"] for x in c) for c in cycles.values()})
    high = (max((x["threads"] for c in cycles.values() for x in c), default=0),
            max((x["fds"] for c in cycles.values() for x in c), default=0))
    flat_rss = rss_end <= rss_ref + 16
    flat_fds = len(low_fds) <= 1
    flat_threads = len(low_threads) <= 1
    lines = [f"# streamiq soak: {a.minutes:g} min, {len(ids)} streams, {a.cycle:g}-s cycles", "",
             "| minute | RSS MiB | threads | fds |", "|---|---|---|---|"]
    lines += [f"| {m} | {s['rss_mib']:.0f} | {s['threads']} | {s['fds']} |" for m, s in sorted(minutes.items())]
    last = samples[-1]["restarts"] if samples else {}
    lines += ["", "Restarts per stream: " + ", ".join(f"{i} {last.get(i, '?')}" for i in ids), "",
              f"Labels posted: {counts['labels']} (refused: {counts['label_errors']}); rollbacks + reloads: "
              f"{counts['rollbacks']}; daemon exit status {rc}; panics in the log: {len(panics)}", "",
              f"- RSS: minute {ref_min} {rss_ref:.0f} MiB, end {rss_end:.0f} MiB: "
              f"{'flat' if flat_rss else 'GROWS'} (limit +16 MiB)",
              f"- file descriptors, fewest in each cycle after the first third: {low_fds}: "
              f"{'flat' if flat_fds else 'VARY'} (most at any sample: {high[1]})",
              f"- threads, fewest in each cycle after the first third: {low_threads}: "
              f"{'flat' if flat_threads else 'VARY'} (most at any sample: {high[0]})"]
    verdict = flat_rss and flat_fds and flat_threads and not panics and rc == 0
    lines += ["", f"Verdict: {'flat' if verdict else 'NOT flat'}"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if verdict else 1)


if __name__ == "__main__":
    main()
