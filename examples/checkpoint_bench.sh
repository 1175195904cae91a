#!/usr/bin/env bash
# Process checkpoint/restore benchmark (not a timed test). As root:
#   bash examples/checkpoint_bench.sh [MEM_MIB]      (default 512)
# A C program fills MEM_MIB of memory with random bytes. Prints: first checkpoint (total and
# downtime), a second checkpoint after 5% of the pages changed (total, downtime, new bytes after
# dedup), and the time of a restore: in place, on a new branch, and on a new branch with
# --lazy (to running, and until every page is in).
set -euo pipefail
MEM=${1:-512}
cd "$(dirname "$0")/.."
cargo build --release -q
FP=$PWD/target/release/forkpoint
W=$(mktemp -d /tmp/fp-bench.XXXXXX)
cleanup() {
  for p in $(cat "$W"/store/sessions/*/info.json 2>/dev/null | grep '"pid"' | tr -dc '0-9\n'); do kill -9 "$p" 2>/dev/null || true; done
  sleep 0.3
  for m in $(grep "$W" /proc/self/mountinfo | cut -d" " -f5); do "$FP" umount "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true; done
  rm -rf "$W"
}
# FORKPOINT_BENCH_KEEP_LOGS=DIR keeps the daemon's and the sessions' logs there (with
# FORKPOINT_LOG=debug in the environment they time each phase).
keep_logs() {
  if [ -n "${FORKPOINT_BENCH_KEEP_LOGS:-}" ]; then
    mkdir -p "$FORKPOINT_BENCH_KEEP_LOGS"
    find "$W/store" -name "*.log" -exec cp --backup=numbered {} "$FORKPOINT_BENCH_KEEP_LOGS"/ \; || true
  fi
  cleanup
}
trap keep_logs EXIT
mkdir -p "$W/mnt"
cat > "$W/mem.c" <<C
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
int main(void) {
    for (int fd = 3; fd < 1024; fd++) close(fd);
    size_t n = (size_t)$MEM << 20;
    unsigned char *m = malloc(n);
    int r = open("/dev/urandom", O_RDONLY);
    for (size_t o = 0; o < n; ) { ssize_t k = read(r, m + o, n - o > (1 << 20) ? (1 << 20) : n - o); if (k <= 0) return 1; o += k; }
    close(r);
    int f = open("ready", O_WRONLY | O_CREAT | O_TRUNC, 0644); close(f);
    unsigned long x = 88172645463325252UL;
    for (;;) {
        if (access("dirty", F_OK) == 0) {
            unlink("dirty");
            /* change 5% of the pages */
            for (size_t p = 0; p < n / 4096 / 20; p++) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                m[(x % (n / 4096)) * 4096] ^= 0xff;
            }
            f = open("dirtied", O_WRONLY | O_CREAT | O_TRUNC, 0644); close(f);
        }
        usleep(10000);
    }
}
C
cc -O2 -o "$W/mem" "$W/mem.c"
"$FP" mount "$W/store" "$W/mnt" >/dev/null
cd "$W/mnt"
"$FP" run --detach --name bench -- "$W/mem" >/dev/null
while [ ! -e ready ]; do sleep 0.05; done
echo "program with $MEM MiB of random memory"
echo -n "first checkpoint:  "; "$FP" checkpoint first | sed 's/.*is #[0-9]*: //'
touch dirty; while [ ! -e dirtied ]; do sleep 0.01; done
echo -n "second checkpoint: "; "$FP" checkpoint second | sed 's/.*is #[0-9]*: //'
s=$(date +%s.%N)
"$FP" restore --detach second >/dev/null 2>&1
e=$(date +%s.%N)
echo "restore (in place, incl. the automatic checkpoint of the running program): $(echo "$e - $s" | bc -l | cut -c1-6) s"
s=$(date +%s.%N)
"$FP" restore --detach --branch side second >/dev/null 2>&1
e=$(date +%s.%N)
echo "restore on a new branch: $(echo "$e - $s" | bc -l | cut -c1-6) s"
sleep 1
s=$(date +%s.%N)
FORKPOINT_LOG=debug "$FP" restore --detach --lazy --branch lazy second >/dev/null 2>&1
e=$(date +%s.%N)
echo -n "restore on a new branch, --lazy: $(echo "$e - $s" | bc -l | cut -c1-6) s to running"
# The session's log has the fill's figures once it ends.
for _ in $(seq 100); do grep -q "lazy restore: LazyStats" "$W/store/sessions/lazy/output.log" 2>/dev/null && break; sleep 0.1; done
grep -o "lazy restore: LazyStats.*" "$W/store/sessions/lazy/output.log" | head -1 |
  sed -E 's/.*faults: ([0-9]+).*fill_time: ([0-9.]+)(m?s).*/; every page in \2 \3 later (\1 faults served)/'
for p in $(cat "$W"/store/sessions/*/info.json | grep '"pid"' | tr -dc '0-9\n'); do kill -9 "$p" 2>/dev/null || true; done
sleep 0.5
"$FP" umount "$W/store/branches/side" >/dev/null 2>&1 || true
"$FP" umount "$W/store/branches/lazy" >/dev/null 2>&1 || true
