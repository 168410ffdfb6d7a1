#!/usr/bin/env python3
"""Append + fdatasync into a file that grows, one whose blocks were fallocate'd, and one
whose next bytes were written as zeros (what meshd's Raft log keeps ahead of its end,
storage/wal.rs). Run it in the directory that will hold the data dir:

    cd /var/lib/meshd && python3 /path/to/bench/fsync-ahead.py

Prints wall time and CPU per append + fdatasync for each, and for zeros written ahead
in steps of 256 KiB, 1 MiB and 4 MiB (the step decides how often one fdatasync also
carries the zeros, which shows in p99.9 and max).
"""
import os
import time

N, SIZE = 3000, 8192


def run(name, prepare=None, step=0):
    path = f"fsync-ahead-{os.getpid()}.tmp"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        if prepare:
            prepare(fd)
        buf = os.urandom(SIZE)
        zeros = b"\0" * step
        pos = zeroed = 0
        lat = []
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(N):
            t = time.perf_counter()
            if step and pos + SIZE > zeroed:
                os.pwrite(fd, zeros, zeroed)
                zeroed += step
            os.pwrite(fd, buf, pos)
            pos += SIZE
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        os.close(fd)
        os.unlink(path)
    lat.sort()
    us = lambda s: f"{s * 1e6:6.0f}"
    print(f"{name:22s} mean {us(wall / N)} us  p99 {us(lat[int(N * .99)])}  "
          f"p99.9 {us(lat[int(N * .999)])}  max {us(lat[-1])}  cpu {us(cpu / N)} us")


def fallocate(fd):
    os.posix_fallocate(fd, 0, N * SIZE + (1 << 20))
    os.fsync(fd)


def zero_fill(fd):
    os.write(fd, b"\0" * (N * SIZE + (1 << 20)))
    os.fsync(fd)


for _ in range(2):
    run("grows")
    run("fallocate'd")
    run("zeros written")
    for kib in (256, 1024, 4096):
        run(f"zeros ahead, {kib} KiB", step=kib << 10)
