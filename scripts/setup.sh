#!/usr/bin/env bash
# Installs everything metald needs on a fresh Debian 12 host (run as root):
#   apt packages (QEMU, iproute2, image-building tools, Node.js for the test clients),
#   the virtualenv .venv with metald in it, the npm test clients, and the default guest image.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

APT_PACKAGES=(
  qemu-system-x86 qemu-utils            # the VMM and qemu-img (per-VM overlays)
  iproute2 nftables iputils-ping        # namespaces, TAPs, bridges, tc; nftables tenant walls
  e2fsprogs kmod lz4 xz-utils zstd      # guest image: mkfs.ext4 -d, depmod, kernel decompression
  python3 python3-venv python3-dev gcc  # the daemon
  libc6-dev                             # the guest agent, compiled static at image build
  curl ca-certificates nghttp2-client   # health checks, tests, h2load for bench/
  postgresql                            # the fleet inventory; tests run their own throwaway cluster
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
# `apt-get download` of the guest kernel needs fresh package lists in any case.
apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The unprivileged user VMMs run as (setting vmm_user; docs/security.md, "Sandboxed VMMs").
id -u metald-vmm >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin metald-vmm

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'

(cd tests/clients && npm ci --no-audit --no-fund --loglevel=error)

# The default guest (kernel, initrd, root fs) into the daemon's default assets dir.
.venv/bin/metald image build
