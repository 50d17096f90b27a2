#!/usr/bin/env bash
# Regenerate src/soundtag/assets/speech_espeak.flac: 10 s of synthetic speech (espeak-ng, GPL tool,
# output not covered), used as the "recorded speech" validation input of the converter.
#   apt-get install espeak-ng sox && bash tools/make_speech_clip.sh
set -euo pipefail
out="$(dirname "$0")/../src/soundtag/assets/speech_espeak.flac"
tmp="$(mktemp -d)"
espeak-ng -v en-us -s 150 -w "$tmp/a.wav" \
  "The quick brown fox jumps over the lazy dog. A dog barks in the distance while somebody is talking on the phone. Listen to the sound of the city."
sox "$tmp/a.wav" -r 16000 -c 1 "$out" trim 0 10
rm -r "$tmp"
echo "wrote $out"
