#!/usr/bin/env bash
# Installs the Debian peer tools the interoperability tests compare against, when missing.
# As root it installs them with apt-get; elsewhere it names what is missing in one loud line and
# the tests that need them skip (in CI, with TIDEMARK_REQUIRE_PEERS=1, they fail instead).
set -euo pipefail

declare -A PACKAGE_OF=(
  [qemu-img]=qemu-utils [qemu-io]=qemu-utils [qemu-nbd]=qemu-utils
  [vhdiinfo]=libvhdi-utils [vhdimount]=libvhdi-utils
  [7zz]=7zip
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin
  [nbdkit]=nbdkit
  [qemu-ga]=qemu-guest-agent
  [bzip2]=bzip2
)

missing_packages=()
missing_commands=()
for cmd in "${!PACKAGE_OF[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    missing_commands+=("$cmd")
    missing_packages+=("${PACKAGE_OF[$cmd]}")
  fi
done
[ ${#missing_packages[@]} -eq 0 ] && exit 0

mapfile -t packages < <(printf '%s\n' "${missing_packages[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ]; then
  echo "PEERS MISSING: ${missing_commands[*]} — interop tests will skip (install: sudo apt-get install ${packages[*]})" >&2
  exit 0
fi
echo "installing peer tools: ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
