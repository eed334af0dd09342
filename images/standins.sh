#!/usr/bin/env bash
# Local stand-ins for the public base images, for machines that can reach a Debian mirror and PyPI but
# no container registry (CI). Real users pull the real images and never need this.
#
#   images/standins.sh     builds python:3.11-slim-bookworm from Debian bookworm (debootstrap), then
#                          apache/airflow:3.3.2-python3.11 on top of it
#
# The Python stand-in is Debian's own Python 3.11 with `python` on PATH, like the official slim image; a
# Python build that differs from the official one is why tests compare metrics within a tolerance.
# The Airflow stand-in has what images/airflow/Dockerfile relies on in the official image: the user
# `airflow` (uid 50000, gid 0), a pip that installs into Airflow's environment as that user, Airflow
# itself, and /opt/airflow. Needs root, debootstrap and a Docker engine with BuildKit.
# MIRROR defaults to the first one apt's sources name; EXTRA_CA_CERTS as for images/build.sh.
set -euo pipefail
DOCKER=${DOCKER:-docker}
PYTHON_IMAGE=${PYTHON_STANDIN:-python:3.11-slim-bookworm}
AIRFLOW_VERSION=$(sed -n 's/.*"apache-airflow==\([0-9.]*\)".*/\1/p' "$(dirname "$0")/../pyproject.toml" | head -1)
AIRFLOW_IMAGE=${AIRFLOW_STANDIN:-apache/airflow:$AIRFLOW_VERSION-python3.11}

python_standin() {
  command -v debootstrap >/dev/null || { echo "error: debootstrap is missing (apt-get install debootstrap)" >&2; exit 2; }
  if [ -z "${MIRROR:-}" ]; then
    # Only the files apt reads (*.list, *.sources), and a Debian archive among them (not a vendor's repository).
    MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | grep -oE '^(URIs:|deb) +https?://[^ ]+' | awk '{print $2}' | grep -E '/debian/?$' | head -1 || true)
  fi
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  echo "building $PYTHON_IMAGE from $MIRROR"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" >/dev/null
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python3"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
  tar -C "$rootfs" -c . | "$DOCKER" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$PYTHON_IMAGE"
  echo "$PYTHON_IMAGE built"
}

airflow_standin() {
  local ca_dir ca_file
  ca_dir=$(mktemp -d)
  ca_file=$ca_dir/extra-ca.pem
  : >"$ca_file"
  EXTRA_CA_CERTS=${EXTRA_CA_CERTS-/usr/local/share/ca-certificates}
  if [ -d "$EXTRA_CA_CERTS" ]; then
    find "$EXTRA_CA_CERTS" -name '*.crt' -type f -print0 | sort -z | xargs -0 -r cat >>"$ca_file"
  elif [ -f "$EXTRA_CA_CERTS" ]; then
    cat "$EXTRA_CA_CERTS" >>"$ca_file"
  fi
  echo "building $AIRFLOW_IMAGE (Airflow $AIRFLOW_VERSION from PyPI on $PYTHON_IMAGE)"
  DOCKER_BUILDKIT=1 "$DOCKER" build --quiet --tag "$AIRFLOW_IMAGE" --secret id=extra_ca,src="$ca_file" \
    --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" --build-arg AIRFLOW_VERSION="$AIRFLOW_VERSION" - <<'EOF' >/dev/null
ARG PYTHON_IMAGE
FROM ${PYTHON_IMAGE}
ARG AIRFLOW_VERSION
RUN useradd --uid 50000 --gid 0 --create-home --home-dir /home/airflow airflow \
    && mkdir -p /opt/airflow && chown 50000:0 /opt/airflow \
    && python -m venv /home/airflow/.local && chown -R 50000:0 /home/airflow
ENV PATH=/home/airflow/.local/bin:$PATH AIRFLOW_HOME=/opt/airflow PIP_DISABLE_PIP_VERSION_CHECK=1
USER airflow
RUN --mount=type=secret,id=extra_ca,uid=50000 \
    set -eu; \
    if [ -s /run/secrets/extra_ca ]; then \
      cat /etc/ssl/certs/ca-certificates.crt /run/secrets/extra_ca > /tmp/ca.pem; export PIP_CERT=/tmp/ca.pem; \
    fi; \
    pip install --no-cache-dir --progress-bar off "apache-airflow==${AIRFLOW_VERSION}"; \
    rm -f /tmp/ca.pem
WORKDIR /opt/airflow
EOF
  rm -rf "$ca_dir"
  echo "$AIRFLOW_IMAGE built"
}

if "$DOCKER" image inspect "$PYTHON_IMAGE" >/dev/null 2>&1; then
  echo "$PYTHON_IMAGE is already here"
else
  python_standin
fi
if "$DOCKER" image inspect "$AIRFLOW_IMAGE" >/dev/null 2>&1; then
  echo "$AIRFLOW_IMAGE is already here"
else
  airflow_standin
fi
