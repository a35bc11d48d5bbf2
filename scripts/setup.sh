#!/usr/bin/env bash
# Installs everything ferry needs on a fresh Debian 12 machine: system packages
# with apt-get and Python packages into ./.venv. Idempotent: a second run only
# checks that everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    qemu-system-x86 qemu-utils        # the VMM and qemu-img/qemu-io/qemu-nbd (NBD interop)
    nbdkit libnbd-bin                 # nbdkit (benchmark baseline), nbdcopy/nbdinfo (interop)
    fuse3 libfuse3-dev pkg-config     # FUSE mounts and pyfuse3's build
    busybox-static cpio e2fsprogs     # guest initramfs and root filesystems
    iproute2 nftables                 # network namespaces for hosts, NAT, port forwarding
    redis-tools                       # redis-cli for talking to guest Redis
    gcc libc6-dev                     # the static in-guest agent is compiled at image build
)

need_apt=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "setup: installing system packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # With recommends: the same set the suite was developed and tested against.
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.ferry-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing Python packages"
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
