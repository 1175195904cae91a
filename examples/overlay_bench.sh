#!/bin/bash
# A quick look at a mount (or any directory) between full fs-compare runs: untar of this
# machine's Python lib, then fio sequential write and cold sequential read of 1 GiB.
# Run it alternately on the mount and on a native directory; the machine is noisy.
#   bash examples/overlay_bench.sh /tmp/fpb/mnt
#   bash examples/overlay_bench.sh /var/tmp/native
set -euo pipefail
DIR=${1:?usage: overlay_bench.sh DIR}
command -v fio >/dev/null || { echo "fio is needed (apt-get install fio)" >&2; exit 1; }
PYLIB=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
TAR=$(mktemp /tmp/overlay_bench.XXXXXX.tar)
trap 'rm -f "$TAR"' EXIT
tar cf "$TAR" -C "$(dirname "$PYLIB")" "$(basename "$PYLIB")"
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
d="$DIR/overlay_bench.$$"; mkdir -p "$d"
drop; s=$(date +%s.%N); tar xf "$TAR" -C "$d"; sync; e=$(date +%s.%N)
echo "untar_s $(echo "$e - $s" | bc)"
rm -rf "$d"; mkdir -p "$d"
fio --name=seqw --directory="$d" --rw=write --bs=1M --size=1G --end_fsync=1 \
  --output-format=terse --terse-version=3 2>/dev/null | awk -F';' '{printf "seqwrite_MBps %.0f\n", $48/1024}'
drop
fio --name=seqw --directory="$d" --rw=read --bs=1M --size=1G \
  --output-format=terse --terse-version=3 2>/dev/null | awk -F';' '{printf "seqread_MBps %.0f\n", $7/1024}'
rm -rf "$d"
