#!/usr/bin/env bash
# Prepares, idempotently, what building and running the worker image needs where no image
# registry is reachable:
#   1. a Docker engine: Debian's docker.io, started when none answers with its default bridge
#      on a fixed address ($S3ROLLUP_DOCKER_BRIDGE, 172.31.250.1/24), no iptables rules (so
#      nothing of this machine's firewall changes; published ports go through docker-proxy) and
#      published ports on 127.0.0.1 unless a run names another address. Containers on the
#      bridge reach a server this machine binds on the gateway address, 172.31.250.1, as SAM's
#      Lambda containers and the worker's test reach the embedded stack. An engine that an
#      earlier version of this script started without a bridge (--bridge=none) is restarted,
#      unless containers are running on it;
#   2. a base image made locally: `debootstrap --variant=minbase trixie`, imported with
#      `docker import` as $S3ROLLUP_BASE_IMAGE. The rootfs tarball is cached in
#      $S3ROLLUP_DOCKER_CACHE (outside the repository), so a second run only re-imports it.
#   3. worker/build-ca.pem (git-ignored), a copy of this machine's CA bundle, for pip inside
#      the build stage when TLS goes through an intercepting proxy.
# Prints the base image name as its last line. Needs root for apt-get, dockerd and debootstrap.
set -euo pipefail

CACHE="${S3ROLLUP_DOCKER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/s3rollup-docker}"
BASE_IMAGE="${S3ROLLUP_BASE_IMAGE:-s3rollup-base:trixie}"
SUITE="${S3ROLLUP_BASE_SUITE:-trixie}"
MIRROR="${S3ROLLUP_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BRIDGE="${S3ROLLUP_DOCKER_BRIDGE:-172.31.250.1/24}"
TARBALL="$CACHE/$SUITE-minbase.tar"
mkdir -p "$CACHE"

say() { printf 'build_local_base: %s\n' "$*" >&2; }
elapsed() { printf '%ss' "$(($(date +%s) - $1))"; }

need_packages=()
command -v dockerd >/dev/null || need_packages+=(docker.io)
command -v debootstrap >/dev/null || need_packages+=(debootstrap)
if ((${#need_packages[@]})); then
    say "installing ${need_packages[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_packages[@]}" >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_packages[@]}" >&2; }
fi

if docker info >/dev/null 2>&1 && ! docker network inspect bridge >/dev/null 2>&1; then
    pid="$(cat /var/run/docker.pid 2>/dev/null || true)"
    if [ -n "$(docker ps -q)" ] || [ -z "$pid" ] || ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- '--bridge=none'; then
        say "the running Docker engine has no default bridge and was not started by this script, or runs"
        say "containers: stop it (or its containers), then run this script again"
        exit 1
    fi
    say "restarting dockerd (pid $pid): it runs without the default bridge (--bridge=none)"
    kill "$pid"
    for _ in $(seq 1 60); do
        [ -d "/proc/$pid" ] || break
        sleep 0.5
    done
    [ ! -d "/proc/$pid" ] || { say "dockerd (pid $pid) did not stop within 30s"; exit 1; }
fi

if ! docker info >/dev/null 2>&1; then
    say "starting dockerd (default bridge $BRIDGE, no iptables), log in $CACHE/dockerd.log"
    # setsid: the engine outlives this script (and the test that called it).
    setsid dockerd --bip "$BRIDGE" --iptables=false --ip6tables=false --ip 127.0.0.1 \
        >"$CACHE/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { say "dockerd did not answer within 60s:"; tail -20 "$CACHE/dockerd.log" >&2; exit 1; }
fi

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if [ ! -s "$TARBALL" ]; then
        start=$(date +%s)
        rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
        trap 'rm -rf "$rootfs"' EXIT
        say "debootstrap --variant=minbase $SUITE (cached as $TARBALL)"
        debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -cf "$TARBALL.tmp" . && mv "$TARBALL.tmp" "$TARBALL"
        rm -rf "$rootfs"
        trap - EXIT
        say "debootstrap took $(elapsed "$start")"
    fi
    start=$(date +%s)
    # An imported image has no environment: give it the PATH the official images have.
    docker import --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        "$TARBALL" "$BASE_IMAGE" >/dev/null
    say "docker import took $(elapsed "$start")"
fi
ca="${S3ROLLUP_BUILD_CA:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
if [ -s "$ca" ]; then
    cp "$ca" "$(dirname "$0")/build-ca.pem"
fi
echo "$BASE_IMAGE"
