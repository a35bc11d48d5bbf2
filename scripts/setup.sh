#!/usr/bin/env bash
# Installs everything ferry needs on a fresh Debian 12 machine: system packages
# with apt-get and Python packages into ./.venv. Idempotent: a second run only
# checks that everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    qemu-system-x86 qemu-utils        # the VMM and qemu-img/qemu-io/qemu-nbd (>= 9, below)
    nbdkit libnbd-bin                 # nbdkit (benchmark baseline), nbdcopy/nbdinfo (interop)
    fuse3 libfuse3-dev pkg-config     # FUSE mounts and pyfuse3's build
    busybox-static cpio e2fsprogs     # guest initramfs and root filesystems
    iproute2 nftables                 # network namespaces for hosts, NAT, port forwarding
    redis-tools                       # redis-cli for talking to guest Redis
    gcc libc6-dev                     # the static in-guest agent is compiled at image build
    chromium chromium-driver          # the daemon dashboard's browser test (Selenium)
    skopeo umoci                      # OCI images: registry copies, layer unpack/repack
    docker-registry                   # a local OCI registry for tests and demos (loopback)
    etcd-server                       # the cluster's state (ferry.cluster; ferry.testing.etcd)
)

# QEMU >= 9: 7.2 (Debian 12's own) under TCG loses guest writes from its precopy dirty
# tracking (fixed upstream by 03bfc2188f, QEMU 9.0; docs/live-migration.md), which the
# default live-migration path relies on. Debian 12 gets QEMU 10 from bookworm-backports.
BACKPORTS=/etc/apt/sources.list.d/ferry-bookworm-backports.sources
qemu_ok() {
    local v
    v=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null) || return 1
    dpkg --compare-versions "$v" ge "1:9.0" || return 1
    v=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null) || return 1
    dpkg --compare-versions "$v" ge "1:9.0"
}
if ! qemu_ok; then
    export DEBIAN_FRONTEND=noninteractive
    if grep -q '^VERSION_CODENAME=bookworm' /etc/os-release && [ ! -f "$BACKPORTS" ]; then
        echo "setup: adding bookworm-backports (QEMU 10)"
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            > "$BACKPORTS"
    fi
    echo "setup: installing QEMU >= 9"
    apt-get update -qq
    if [ -f "$BACKPORTS" ]; then
        apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
    else
        apt-get install -y -qq qemu-system-x86 qemu-utils >/dev/null
    fi
    qemu_ok || { echo "setup: QEMU >= 9 is needed (found $(qemu-system-x86_64 --version | head -1))" >&2; exit 1; }
fi

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
