#!/bin/sh
# Compile the native kernels: build.sh OUT [CC]. Plain C, loaded with ctypes, so no Python
# headers are needed. -ffp-contract=off: no fused multiply-add, so every CPU computes the
# source's arithmetic. Used by the Makefile and by worker/Dockerfile alike.
set -eu
out=$1
cc=${2:-cc}
here=$(dirname "$0")
exec "$cc" -O2 -fPIC -shared -ffp-contract=off -fno-strict-aliasing -Wall -Wextra \
    -o "$out" "$here/rollup.c"
