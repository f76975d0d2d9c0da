#!/usr/bin/env bash
# Builds the ingest function's local Lambda runtime image (functions/runtime/Dockerfile) on the
# locally made Debian base, and prints its name as the last line:
#
#   functions/runtime/build_image.sh PYTHON [ENDPOINT]
#
# PYTHON is a CPython 3.12 (the template's runtime) installed in a prefix of its own, as
# pyenv's `$(pyenv root)/versions/3.12.1` (what the Makefile's PYTHON is on these machines);
# that prefix, less its tests, static library and site-packages, becomes /var/lang. The image
# is rebuilt only when its inputs change (their hash is the image's `s3rollup.inputs` label).
#
# With ENDPOINT, it also makes (once per runtime image and endpoint) the image SAM invokes
# with: the runtime plus AWS_ENDPOINT_URL=ENDPOINT. SAM's --env-vars only sets variables the
# template declares, and the function declares no endpoint: in AWS it needs none.
# Runs worker/build_local_base.sh first (root: the engine and the base image).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
PYTHON="${1:?usage: build_image.sh PYTHON [ENDPOINT]}"
ENDPOINT="${2:-}"
IMAGE="${S3ROLLUP_LAMBDA_IMAGE:-s3rollup-lambda:python3.12}"
say() { printf 'build_image: %s\n' "$*" >&2; }

base="$("$root/worker/build_local_base.sh" | tail -1)"
prefix="$("$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version; print(sys.base_prefix)')" \
    || { say "$PYTHON is not CPython 3.12, the template's runtime"; exit 1; }
if [ ! -x "$prefix/bin/python3.12" ] || [ ! -f "$prefix/lib/python3.12/os.py" ]; then
    say "$prefix is not a self-contained CPython prefix (bin/python3.12, lib/python3.12): use pyenv's 3.12"
    exit 1
fi

inputs="$( { cat "$here/Dockerfile" "$here/bootstrap" "$root/requirements/lambda-runtime.lock";
             echo "$base $(docker image inspect -f '{{.Id}}' "$base") $prefix";
             "$prefix/bin/python3.12" -VV; } | sha256sum | cut -c1-16)"
if [ "$(docker image inspect -f '{{index .Config.Labels "s3rollup.inputs"}}' "$IMAGE" 2>/dev/null)" != "$inputs" ]; then
    start=$(date +%s)
    stage="$(mktemp -d)"
    trap 'rm -rf "$stage"' EXIT
    mkdir "$stage/python"
    # The interpreter and its standard library; not the host's site-packages (their .pth
    # files and pip belong to the host), the test suite, IDLE, Tk or the static library.
    tar -C "$prefix" -cf - \
        --exclude=lib/python3.12/test --exclude=lib/python3.12/idlelib \
        --exclude=lib/python3.12/tkinter --exclude=lib/python3.12/turtledemo \
        --exclude=lib/python3.12/site-packages --exclude='lib/python3.12/config-3.12-*' \
        --exclude=lib/pkgconfig --exclude='bin/idle*' --exclude='bin/*-config' --exclude='bin/*-gdb.py' \
        bin lib | tar -C "$stage/python" -xf -
    mkdir "$stage/python/lib/python3.12/site-packages"
    cp "$here/Dockerfile" "$here/bootstrap" "$root/requirements/lambda-runtime.lock" "$stage/"
    if [ -s "$root/worker/build-ca.pem" ]; then cp "$root/worker/build-ca.pem" "$stage/"; fi
    DOCKER_BUILDKIT=0 docker build --quiet --network host --build-arg BASE_IMAGE="$base" \
        --label "s3rollup.inputs=$inputs" -t "$IMAGE" "$stage" >/dev/null
    say "built $IMAGE in $(($(date +%s) - start))s"
fi

if [ -z "$ENDPOINT" ]; then
    echo "$IMAGE"
    exit 0
fi
# SAM names the image it adds its emulator to after this image's repository: one repository
# per runtime build and endpoint, so that image is never one made for another.
invoke="s3rollup-lambda-$(printf '%s %s' "$(docker image inspect -f '{{.Id}}' "$IMAGE")" "$ENDPOINT" | sha256sum | cut -c1-12):latest"
if ! docker image inspect "$invoke" >/dev/null 2>&1; then
    printf 'FROM %s\nENV AWS_ENDPOINT_URL=%s\n' "$IMAGE" "$ENDPOINT" \
        | DOCKER_BUILDKIT=0 docker build --quiet --label "s3rollup.endpoint=$ENDPOINT" -t "$invoke" - >/dev/null
fi
echo "$invoke"
