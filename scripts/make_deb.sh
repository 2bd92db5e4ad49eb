#!/usr/bin/env bash
# Builds the Debian package of the daemon (`make deb`): OUT/streamiq_VERSION_ARCH.deb with
#   /usr/bin/streamiq                       the daemon (no libtorch: the sidecar is not in it)
#   /usr/lib/streamiq/libonnxruntime.so.*   the ONNX Runtime library it loads (from the venv's
#                                           onnxruntime wheel; found beside the binary)
#   /usr/share/streamiq/models/streamiq-tiny  the default model bundle
#   /usr/share/streamiq/config/             alert rules and their tests, Grafana provisioning
#   /etc/streamiq/streamiq.toml             the config (a conffile): the shipped one with
#                                           absolute paths and no demo streams
#   /usr/lib/systemd/system/streamiq.service, /usr/lib/sysusers.d/streamiq.conf,
#   /usr/lib/tmpfiles.d/streamiq.conf       the unit, the service user, the state directory
#   /usr/share/doc/streamiq/                README, copyright (with ONNX Runtime's licence)
# Depends: the shared libraries the binaries link (dpkg-shlibdeps) and the GStreamer
# plug-in packages the pipelines load at run time.
# Usage: scripts/make_deb.sh [--binary PATH] [--out DIR] [--fast]
#   --binary  the daemon to package (default target/release/streamiq, from `make build-daemon`)
#   --fast    gzip -1 instead of xz (the package test in `make test` uses it)
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release/streamiq
OUT=target/deb
COMPRESS=(-Zxz)
while [[ $# -gt 0 ]]; do
    case $1 in
        --binary) BIN=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --fast) COMPRESS=(-Zgzip -z1); shift ;;
        *) echo "make_deb: unknown argument $1 (usage: make_deb.sh [--binary PATH] [--out DIR] [--fast])" >&2; exit 2 ;;
    esac
done
VENV=${STREAMIQ_VENV:-/opt/streamiq/venv}
MODEL=models/streamiq-tiny

[[ -x $BIN ]] || { echo "make_deb: $BIN is missing; run make build-daemon first" >&2; exit 2; }
ORT_DIR=$(echo "$VENV"/lib/python3*/site-packages/onnxruntime)
ORT=$(find "$ORT_DIR/capi" -maxdepth 1 -name 'libonnxruntime.so.*' | sort | tail -n 1)
[[ -n $ORT && -f $ORT ]] || { echo "make_deb: no libonnxruntime.so.* under $ORT_DIR/capi (scripts/setup.sh installs it)" >&2; exit 2; }
[[ -f $MODEL/manifest.toml ]] || { echo "make_deb: $MODEL is missing" >&2; exit 2; }
grep -q "^bundle = \"$MODEL\"" config/streamiq.toml \
    || { echo "make_deb: config/streamiq.toml's model.bundle is not $MODEL" >&2; exit 2; }

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
ARCH=$(dpkg --print-architecture)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir -p "$ROOT/DEBIAN" "$OUT"

install -D -m 0755 "$BIN" "$ROOT/usr/bin/streamiq"
install -D -m 0644 "$ORT" "$ROOT/usr/lib/streamiq/$(basename "$ORT")"
install -d "$ROOT/usr/share/streamiq/models" "$ROOT/usr/share/streamiq/config"
cp -r "$MODEL" "$ROOT/usr/share/streamiq/models/"
cp -r config/alerts config/grafana "$ROOT/usr/share/streamiq/config/"
install -D -m 0644 README.md "$ROOT/usr/share/doc/streamiq/README.md"
{
    echo "streamiq $VERSION: MIT OR Apache-2.0."
    echo
    echo "usr/lib/streamiq/$(basename "$ORT"): ONNX Runtime (from the onnxruntime wheel on PyPI):"
    echo
    cat "$ORT_DIR/LICENSE"
    echo
    echo "usr/share/streamiq/models: see models/README.md in the source for provenance and licences."
} > "$ROOT/usr/share/doc/streamiq/copyright"
[[ -f $ORT_DIR/ThirdPartyNotices.txt ]] \
    && install -m 0644 "$ORT_DIR/ThirdPartyNotices.txt" "$ROOT/usr/share/doc/streamiq/onnxruntime-ThirdPartyNotices.txt"

# The config: the shipped one with absolute paths, its demo streams (frames made by `make`
# in a checkout) left out, an example instead.
install -d "$ROOT/etc/streamiq"
cat > "$ROOT/etc/streamiq/streamiq.toml" <<'EOF'
# streamiq configuration (Debian package). Every key is documented in
# /usr/share/doc/streamiq/README.md ("Configuration"); unknown keys are errors.
# Any key can be overridden from the environment: STREAMIQ__SCORER__MAX_BATCH=16.

EOF
sed -e '1,/^$/d' -e 's#^api_token_file = "state/api-token"#api_token_file = "/var/lib/streamiq/api-token"#' \
    -e "s#^bundle = \"$MODEL\"#bundle = \"/usr/share/streamiq/$MODEL\"#" \
    -e 's#^prompts_dir = "state/prompts"#prompts_dir = "/var/lib/streamiq/prompts"#' \
    -e 's#^db = "state/labels.sqlite"#db = "/var/lib/streamiq/labels.sqlite"#' \
    -e 's#^incidents_dir = "state/incidents"#incidents_dir = "/var/lib/streamiq/incidents"#' \
    -e 's#^runtime_streams = "state/runtime-streams.toml"#runtime_streams = "/var/lib/streamiq/runtime-streams.toml"#' \
    -e '/^# Slow pans over real photographs/,$d' config/streamiq.toml >> "$ROOT/etc/streamiq/streamiq.toml"
cat >> "$ROOT/etc/streamiq/streamiq.toml" <<'EOF'
# Streams: one [[streams]] table each (README, "Streams"), then
# `systemctl enable --now streamiq`. For example:
#
# [[streams]]
# id = "studio-1"
# uri = "rtsp://camera.example/stream1"
# sample_fps = 2.0
EOF
chmod 0640 "$ROOT/etc/streamiq/streamiq.toml"
for key in api_token_file bundle prompts_dir db incidents_dir runtime_streams; do
    grep -q "^$key = \"/" "$ROOT/etc/streamiq/streamiq.toml" \
        || { echo "make_deb: config/streamiq.toml's $key was not rewritten to an absolute path" >&2; exit 1; }
done

# The unit, with the package's paths.
sed -e 's#/opt/streamiq/bin/#/usr/bin/#g' \
    -e 's#^WorkingDirectory=/opt/streamiq$#WorkingDirectory=/usr/share/streamiq#' \
    systemd/streamiq.service > "$WORK/streamiq.service"
install -D -m 0644 "$WORK/streamiq.service" "$ROOT/usr/lib/systemd/system/streamiq.service"
install -D -m 0644 /dev/stdin "$ROOT/usr/lib/sysusers.d/streamiq.conf" <<'EOF'
u streamiq - "streamiq video quality monitor" /var/lib/streamiq /usr/sbin/nologin
EOF
install -D -m 0644 /dev/stdin "$ROOT/usr/lib/tmpfiles.d/streamiq.conf" <<'EOF'
d /var/lib/streamiq 0750 streamiq streamiq -
EOF

# Dependencies: linked libraries, then the plug-ins behind decodebin / RTSP / SRT / HLS / H.264.
mkdir -p "$WORK/src/debian"
printf 'Source: streamiq\n\nPackage: streamiq\nArchitecture: any\n' > "$WORK/src/debian/control"
SHLIBS=$(cd "$WORK/src" && dpkg-shlibdeps -O "$ROOT/usr/bin/streamiq" "$ROOT/usr/lib/streamiq/$(basename "$ORT")" 2>/dev/null \
    | sed -n 's/^shlibs:Depends=//p')
[[ -n $SHLIBS ]] || { echo "make_deb: dpkg-shlibdeps found no dependencies" >&2; exit 1; }
DEPENDS="$SHLIBS, gstreamer1.0-plugins-base, gstreamer1.0-plugins-good, gstreamer1.0-plugins-bad, gstreamer1.0-libav, systemd | systemd-standalone-sysusers"
case $DEPENDS in *torch*) echo "make_deb: the daemon's dependencies name libtorch: $DEPENDS" >&2; exit 1 ;; esac

SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
cat > "$ROOT/DEBIAN/control" <<EOF
Package: streamiq
Version: $VERSION
Architecture: $ARCH
Maintainer: streamiq developers <streamiq@localhost>
Installed-Size: $SIZE
Depends: $DEPENDS
Section: video
Priority: optional
Description: video stream picture quality monitor for Prometheus
 streamiq watches live video streams (RTSP, SRT, UDP, HLS, files, any GStreamer
 source), scores sampled frames with a CLIP-style blind image-quality model through
 ONNX Runtime and exports per-stream quality, black / freeze / colour-bars alarms and
 pipeline health as Prometheus metrics. Its scan command gates files in CDN / VOD
 pipelines. The few-shot recalibration sidecar (streamiq-adapt, libtorch) is not part
 of this package.
EOF
echo /etc/streamiq/streamiq.toml > "$ROOT/DEBIAN/conffiles"
cat > "$ROOT/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    systemd-sysusers streamiq.conf
    systemd-tmpfiles --create streamiq.conf || true
    chgrp streamiq /etc/streamiq/streamiq.toml
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        # A running daemon re-reads its config; a fresh install waits for streams.
        systemctl try-reload-or-restart streamiq.service || true
    fi
fi
EOF
cat > "$ROOT/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop streamiq.service || true
fi
EOF
cat > "$ROOT/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
# Labels, prompt sets and the API token are the operators' work: purge keeps them too.
EOF
chmod 0755 "$ROOT/DEBIAN/postinst" "$ROOT/DEBIAN/prerm" "$ROOT/DEBIAN/postrm"

DEB=$OUT/streamiq_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group "${COMPRESS[@]}" --build "$ROOT" "$DEB" > /dev/null
echo "make_deb: $DEB ($(du -h "$DEB" | cut -f1)), Depends: $DEPENDS"
