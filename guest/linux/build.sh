#!/usr/bin/env bash
# Builds the Linux test guest once per machine into a cache:
#   vmlinux       Linux 6.1 from Debian's linux-source-6.1, tinyconfig plus
#                 ./config, with ./patches (PVM platform fixes; see
#                 ../../../shared/PLATFORM.md), booted through its PVH entry
#   bzImage       the same kernel, compressed, for the 64-bit boot protocol
#   initrd.cpio   an uncompressed initramfs: busybox (busybox-static), ./init
#                 and the static test programs in ./programs
# The cache directory is keyed by the hash of these inputs, so an edit
# rebuilds; `current` points at the newest. Prints the directory.
#
#   guest/linux/build.sh            # build if missing
#   FERRY_GUEST_CACHE=/some/dir ... # cache root (default ~/.cache/ferry/guest)
#
# Needs Debian's linux-source-6.1 busybox-static build-essential flex bison
# bc libelf-dev cpio lz4 musl-tools: installed with apt-get when missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${FERRY_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry/guest}"
src_tar=/usr/src/linux-source-6.1.tar.xz
busybox=/bin/busybox

# What the build needs, from Debian (installed when missing).
packages="linux-source-6.1 busybox-static build-essential flex bison bc libelf-dev cpio lz4 musl-tools"
missing_pkgs=$(for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing_pkgs" ]; then
  echo "build.sh: installing $(echo $missing_pkgs)" >&2
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq $missing_pkgs >&2
fi
for f in "$src_tar" "$busybox"; do
  [ -e "$f" ] || { echo "build.sh: $f is missing (apt-get install linux-source-6.1 busybox-static)" >&2; exit 1; }
done

# Bump when the steps below change what they build.
build_version=3
# Bump when the initramfs steps change what they build.
initramfs_version=2
versions=$(dpkg-query -W -f='${Version} ' linux-source-6.1 busybox-static 2>/dev/null || true)
# The kernel is keyed by what it is built from only, so editing the init
# or a test program rebuilds the initramfs (seconds), not the kernel.
kernel_key=$( (cd "$here" && echo "$build_version" && cat config patches/*.patch; echo "$versions") \
      | sha256sum | cut -c1-12)
key=$( (cd "$here" && echo "$build_version $initramfs_version $kernel_key" && cat init programs/*.c; echo "$versions") \
      | sha256sum | cut -c1-12)
out="$cache/linux/$key"
kernel="$cache/linux/kernel-$kernel_key"
if [ -s "$out/vmlinux" ] && [ -s "$out/bzImage" ] && [ -s "$out/initrd.cpio" ]; then
  ln -sfn "$key" "$cache/linux/current"
  echo "$out"
  exit 0
fi
work="$(mktemp -d "${TMPDIR:-/var/tmp}/ferry-linux.XXXXXX")"
trap 'rm -rf "$work"' EXIT
started=$(date +%s)
if ! [ -s "$kernel/vmlinux" ] || ! [ -s "$kernel/bzImage" ]; then
  echo "build.sh: unpacking $(basename "$src_tar")" >&2
  tar -xf "$src_tar" -C "$work"
  tree="$work/linux-source-6.1"
  for p in "$here"/patches/*.patch; do
    patch -d "$tree" -p1 --quiet --forward < "$p"
  done
  echo "build.sh: configuring" >&2
  make -C "$tree" -s tinyconfig >/dev/null
  opts=()
  while read -r line; do
    line="${line%%#*}"; line="${line// /}"
    [ -n "$line" ] || continue
    if [ "${line:0:1}" = "-" ]; then opts+=(--disable "${line:1}"); else opts+=(--enable "$line"); fi
  done < "$here/config"
  "$tree/scripts/config" --file "$tree/.config" "${opts[@]}"
  make -C "$tree" -s olddefconfig >/dev/null
  # Every option asked for must have survived olddefconfig (a dependency
  # missing would drop it silently).
  missing=0
  while read -r line; do
    line="${line%%#*}"; line="${line// /}"
    [ -n "$line" ] && [ "${line:0:1}" != "-" ] || continue
    grep -q "^CONFIG_$line=y" "$tree/.config" || { echo "build.sh: CONFIG_$line did not stick" >&2; missing=1; }
  done < "$here/config"
  [ "$missing" = 0 ] || exit 1
  echo "build.sh: compiling the kernel on $(nproc) cores" >&2
  make -C "$tree" -s -j"$(nproc)" vmlinux bzImage >&2
  mkdir -p "$kernel.tmp"
  cp "$tree/vmlinux" "$kernel.tmp/vmlinux"
  cp "$tree/arch/x86/boot/bzImage" "$kernel.tmp/bzImage"
  strip --strip-debug "$kernel.tmp/vmlinux" 2>/dev/null || true
  cp "$tree/.config" "$kernel.tmp/config"
  rm -rf "$kernel"
  mv "$kernel.tmp" "$kernel"
fi
echo "build.sh: the initramfs" >&2
root="$work/root"
mkdir -p "$root/bin" "$root/proc" "$root/dev" "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in sh mount mkdir cat echo reboot ip sleep; do ln -s busybox "$root/bin/$applet"; done
cp "$here/init" "$root/init"
chmod +x "$root/init"
for c in "$here"/programs/*.c; do
  name="ferry-$(basename "$c" .c)"
  # musl: a static program of 30 KB rather than glibc's 760 KB; the
  # kernel unpacks the initramfs with emulated ring-0 copies (PLATFORM.md),
  # about 3 s per MB here.
  musl-gcc -static -O2 -s -Wall -Wextra -Werror -o "$root/bin/$name" "$c"
done
mkdir -p "$out.tmp"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) > "$out.tmp/initrd.cpio"
cp "$kernel/vmlinux" "$kernel/bzImage" "$out.tmp/"
cp "$here/config" "$out.tmp/config.fragment"
rm -rf "$out"
mv "$out.tmp" "$out"
ln -sfn "$key" "$cache/linux/current"
echo "build.sh: built in $(( $(date +%s) - started )) s" >&2
echo "$out"
