#!/usr/bin/env bash
# Installs the Debian peer tools the interoperability tests use as independent oracles, when missing.
# As root it installs them with apt-get; elsewhere it names what is missing in one loud line and exits 0:
# the tests that need them then skip (in CI, where TIDEMARK_REQUIRE_PEERS=1, they fail instead).
set -euo pipefail

# command → Debian package. qemu-ga lives in /usr/sbin, which a non-root PATH may lack.
declare -A PACKAGE_OF=(
  [qemu-img]=qemu-utils [qemu-io]=qemu-utils [qemu-nbd]=qemu-utils
  [vhdiinfo]=libvhdi-utils [vhdimount]=libvhdi-utils
  [7zz]=7zip
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin
  [nbdkit]=nbdkit
  [qemu-ga]=qemu-guest-agent
  [bzip2]=bzip2 # the fixtures are .bz2
  [restic]=restic [borg]=borgbackup # backup benchmarks' peers
  [mkfs.xfs]=xfsprogs               # the reflink snapshot provider's test file system
  [openssl]=openssl                 # test certificates for NBD over TLS
  [qemu-system-x86_64]=qemu-system-x86 # the VM runtime's guests (TCG when there is no KVM)
  [e2fsck]=e2fsprogs [debugfs]=e2fsprogs # checks a guest's data disk; pulls files out of a restored one
  [sqlite3]=sqlite3                 # checks the sqlite workload's database in a restored guest disk
  [xz]=xz-utils [zstd]=zstd         # guest-image build: the kernel's compressed payload
  [dpkg-deb]=dpkg [apt-get]=apt     # guest-image build: apt-get download + dpkg-deb -x, no root needed
)

missing_packages=()
missing=()
for cmd in "${!PACKAGE_OF[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    missing+=("$cmd")
    missing_packages+=("${PACKAGE_OF[$cmd]}")
  fi
done
# pyvhdi (python3-libvhdi) is libvhdi without FUSE: vhdimount needs /dev/fuse and the right to mount,
# which containers often lack; test/helpers/peers.ts falls back to it. It must be importable by the
# system python (/usr/bin/python3), where Debian installs it, not by a pyenv/venv python on PATH.
if ! /usr/bin/python3 -c 'import pyvhdi' >/dev/null 2>&1; then
  missing+=(pyvhdi)
  missing_packages+=(python3-libvhdi)
fi
# UEFI firmware for generation 2 VMs that boot from their disks (no command to look for: its files).
if [ ! -e /usr/share/OVMF/OVMF_CODE_4M.fd ] && [ ! -e /usr/share/OVMF/OVMF_CODE.fd ]; then
  missing+=(OVMF)
  missing_packages+=(ovmf)
fi
# guest-image build asks apt-cache about packages: it needs apt's package lists (a fresh image may have none).
need_lists=0
if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then need_lists=1; fi
if [ ${#missing[@]} -eq 0 ]; then
  if [ "$need_lists" -eq 1 ] && [ "$(id -u)" -eq 0 ]; then
    echo "install-peers: apt-get update (no package lists: the guest image build needs them)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=600 update >/dev/null 2>&1 ||
      echo "install-peers: apt-get update failed; guest-image build will fail with NOT_FOUND" >&2
  fi
  exit 0
fi

mapfile -t packages < <(printf '%s\n' "${missing_packages[@]}" | sort -u)
loud() { echo "PEERS MISSING: ${missing[*]} — interop tests will skip ($1)" >&2; }
if [ "$(id -u)" -ne 0 ]; then
  loud "install: sudo bash scripts/install-peers.sh, or sudo apt-get install ${packages[*]}"
  exit 0
fi

echo "install-peers: installing ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Wait for another apt/dpkg run instead of failing on its lock. Output goes to a log shown on failure.
apt_opts=(-y -q -o DPkg::Lock::Timeout=600)
if ! { apt-get "${apt_opts[@]}" update && apt-get "${apt_opts[@]}" install --no-install-recommends "${packages[@]}"; } \
  >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  # Not fatal: the tests skip (or, in CI, fail) with their own loud line.
  loud "apt-get failed, see above"
  exit 0
fi
