#!/usr/bin/env bash
# Local stand-ins for the public base images, for machines that can reach a Debian mirror but no
# container registry (CI). Real users pull the real images and never need this.
#
#   images/standins.sh            builds python:3.11-slim-bookworm from Debian bookworm (debootstrap)
#
# The stand-in is Debian's own Python 3.11 with `python` on PATH, like the official slim image; a Python
# build that differs from the official one is why tests compare metrics within a tolerance.
# Needs root, debootstrap and a Docker engine. MIRROR defaults to the first one apt's sources name.
set -euo pipefail
DOCKER=${DOCKER:-docker}
IMAGE=${PYTHON_STANDIN:-python:3.11-slim-bookworm}
if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE is already here"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "error: debootstrap is missing (apt-get install debootstrap)" >&2; exit 2; }
if [ -z "${MIRROR:-}" ]; then
  MIRROR=$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | awk '{print $2}' | grep -v security | head -1)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
echo "building $IMAGE from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" >/dev/null
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python3"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
tar -C "$rootfs" -c . | "$DOCKER" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$IMAGE"
echo "$IMAGE built"
