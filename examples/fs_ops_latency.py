#!/usr/bin/env python3
"""Per-call latency of the syscalls tar makes for each file, in a directory (e.g. a
forkpoint mount) and, for comparison, elsewhere. Not a timed test:
    python3 examples/fs_ops_latency.py MOUNT/dir  [N]
Prints microseconds per call, averaged over N files (default 2000)."""
import os, sys, time
d = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
os.makedirs(d, exist_ok=True)
t = {k: 0.0 for k in ["lookup-miss", "create", "write", "close", "utime", "chown", "chmod"]}
for i in range(n):
    p = f"{d}/f{i}"
    a = time.perf_counter()
    try: os.stat(p)
    except FileNotFoundError: pass
    b = time.perf_counter(); t["lookup-miss"] += b - a
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    c = time.perf_counter(); t["create"] += c - b
    os.write(fd, b"x" * 3000)
    e = time.perf_counter(); t["write"] += e - c
    os.fchown(fd, 0, 0)
    f = time.perf_counter(); t["chown"] += f - e
    os.fchmod(fd, 0o644)
    g = time.perf_counter(); t["chmod"] += g - f
    os.close(fd)
    h = time.perf_counter(); t["close"] += h - g
    os.utime(p, (1, 1))
    k = time.perf_counter(); t["utime"] += k - h
print(" ".join(f"{k}={v/n*1e6:.0f}us" for k, v in t.items()))
