#!/usr/bin/env bash
# Refresh the lock files from pyproject.toml: every package at one version with the sha256 of
# each of its files, for CPython 3.11 on Linux x86_64 (manylinux_2_28: glibc 2.28 or newer),
# whatever machine runs this. Needs uv (locked itself, in tools.txt):
#
#   pip install --require-hashes -r requirements/tools.txt
#   bash requirements/lock.sh             # keep every pin, add what pyproject newly asks for
#   bash requirements/lock.sh --upgrade   # the newest releases pyproject allows: a decision,
#                                         # so run jobs/deploy/newest_releases.py first
#
# prod.txt  the package (the documented install, the image, README's first command)
# ci.txt    + the test, ray and docs extras (README's test command, CI)
# gpu.txt   + the gpu extra (the GPU image: --build-arg EXTRAS=gpu)
# ray.txt   + the ray extra (the image of a Ray cluster's nodes: --build-arg EXTRAS=ray)
# tools.txt pyproject's tools group (uv, cyclonedx-bom), without the package
#
# ci.txt, gpu.txt and ray.txt are resolved within prod.txt's pins, so every package that makes a score
# is at the same version in CI, in production and on a GPU. The build backend
# ([build-system] requires) is in the locks too: batchscan is then built from the locked
# setuptools (pip install --no-deps --no-build-isolation .), nothing unpinned is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
build=$(python3 -c 'import tomllib; print("\n".join(
    tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes
    --custom-compile-command "bash requirements/lock.sh" --quiet)
compile() {
    local out=$1
    shift
    printf '%s\n' "$build" | uv pip compile pyproject.toml - "${target[@]}" -o "requirements/$out" "$@"
}
compile prod.txt "$@"
compile ci.txt --extra test --extra ray --extra docs -c requirements/prod.txt "$@"
compile gpu.txt --extra gpu -c requirements/prod.txt "$@"
compile ray.txt --extra ray -c requirements/prod.txt "$@"
uv pip compile --group pyproject.toml:tools "${target[@]}" -o requirements/tools.txt "$@"
