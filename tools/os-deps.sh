#!/usr/bin/env bash
# OS packages the tests need (Debian/Ubuntu): ffmpeg is the decoder of the test reference path
# (librosa -> audioread for M4A/MP3); chromium is the real browser the web page is tested in (Playwright
# cannot download its own here); libportaudio2 is PortAudio for `soundtag listen`'s microphone input.
# Runs apt-get as root, else through sudo.
set -euo pipefail
PACKAGES=(ffmpeg chromium libportaudio2)
if ! command -v apt-get >/dev/null 2>&1; then
  echo "os-deps: no apt-get here; install these yourself: ${PACKAGES[*]}" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
