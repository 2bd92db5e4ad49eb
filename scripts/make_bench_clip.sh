#!/bin/sh
# Make a synthetic H.264 test clip: make_bench_clip.sh OUT.mp4 [SECONDS] [WIDTHxHEIGHT] [FPS]
# Needs ffmpeg (Debian package ffmpeg).
set -eu
out=$1; secs=${2:-30}; size=${3:-1280x720}; fps=${4:-30}
ffmpeg -loglevel error -y -f lavfi -i "testsrc2=size=${size}:rate=${fps}" -t "$secs" \
  -c:v libx264 -preset veryfast -crf 23 -pix_fmt yuv420p "$out"
