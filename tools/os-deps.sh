#!/usr/bin/env bash
# OS packages the tests need (Debian/Ubuntu): ffmpeg is the decoder of the test reference path
# (librosa -> audioread for M4A/MP3); chromium is the real browser the web page is tested in (Playwright
# cannot download its own here); libportaudio2 is PortAudio for `soundtag listen`'s microphone input;
# libvulkan1 + mesa-vulkan-drivers give LiteRT's GPU accelerator (WebGPU/Dawn over Vulkan) a device on
# any machine: Mesa's software GPU, lavapipe. Dawn rejects Debian 12's Mesa 22.3, so on bookworm Mesa
# comes from bookworm-backports (25.x). alsa-utils and sound-theme-freedesktop carry real recordings (voices,
# a camera shutter, a phone) that the sound event detection tests mix into scenes with known onsets;
# hydrogen-drumkits (143 MB) carries real drum samples of 14 kits that `soundtag train` is tested on.
# Runs apt-get as root, else through sudo.
set -euo pipefail
PACKAGES=(ffmpeg chromium libportaudio2 libvulkan1 alsa-utils sound-theme-freedesktop hydrogen-drumkits)
if ! command -v apt-get >/dev/null 2>&1; then
  echo "os-deps: no apt-get here; install these yourself: ${PACKAGES[*]} mesa-vulkan-drivers (Mesa >= 25)" >&2
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
CODENAME="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
MESA=(mesa-vulkan-drivers)
if [ "$CODENAME" = "bookworm" ]; then
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/backports.list >/dev/null
  fi
  MESA=(-t bookworm-backports mesa-vulkan-drivers)
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${MESA[@]}"
