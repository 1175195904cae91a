#!/usr/bin/env python3
"""fsync-heavy workloads side by side, in one run (ratios, not absolute figures: the
machine is noisy).

    python3 examples/fsync_bench.py NATIVE_DIR MOUNT_DIR [N]

For each directory, alternating, three rounds: N times a 4 KiB pwrite and an fsync of one
file, and N SQLite transactions of one INSERT each (rollback journal, the default). Prints
operations per second and the mount's ratio to the native directory.
"""
import os
import sqlite3
import sys
import time


def fsyncs(d, n):
    p = os.path.join(d, "fsync-bench.bin")
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    buf = os.urandom(4096)
    t = time.perf_counter()
    for i in range(n):
        os.pwrite(fd, buf, (i % 64) * 4096)
        os.fsync(fd)
    e = time.perf_counter() - t
    os.close(fd)
    os.unlink(p)
    return n / e


def transactions(d, n):
    p = os.path.join(d, "fsync-bench.db")
    db = sqlite3.connect(p)
    db.execute("create table t(i integer, v text)")
    db.commit()
    t = time.perf_counter()
    for i in range(n):
        db.execute("insert into t values(?, ?)", (i, "x" * 100))
        db.commit()
    e = time.perf_counter() - t
    db.close()
    os.unlink(p)
    return n / e


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    native, mount = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    for bench in (fsyncs, transactions):
        for r in range(3):
            a = bench(native, n)
            b = bench(mount, n)
            print(f"{bench.__name__:13} round {r + 1}: native {a:7.0f}/s, mount {b:7.0f}/s, ratio {b / a:.2f}")


if __name__ == "__main__":
    main()
