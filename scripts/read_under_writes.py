#!/usr/bin/env python3
"""How long a random 4 KiB O_DIRECT read waits behind concurrent page-out writes.

Usage: scripts/read_under_writes.py [DIR] [WRITERS...]
  DIR      where to put a 512 MiB probe file (default /var/tmp); removed at the end
  WRITERS  writer-thread counts to try, each for 4 s (default 0 1 2 4 16)

Each writer thread writes 128 KiB runs (what a page-I/O thread writes to a local
swap file) at random offsets with O_DIRECT while one thread reads 4 KiB pages at
random and times each read: what a fault's swap-in read costs while page-out is
writing (issue 10 item 2: demand reads must not queue behind write-back).
"""
import mmap
import os
import random
import sys
import threading
import time

SIZE = 512 << 20
RUN = 128 << 10


def make(path):
    with open(path, "wb") as f:
        f.truncate(SIZE)
    fd = os.open(path, os.O_WRONLY)
    buf = mmap.mmap(-1, 1 << 20)
    buf.write(b"x" * (1 << 20))
    for off in range(0, SIZE, 1 << 20):
        os.pwrite(fd, buf, off)
    os.fsync(fd)
    os.close(fd)


def writer(path, stop):
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    b = mmap.mmap(-1, RUN)
    b.write(b"y" * RUN)
    while not stop.is_set():
        os.pwrite(fd, b, random.randrange(SIZE // RUN) * RUN)
    os.close(fd)


def run(path, writers, secs=4.0):
    stop = threading.Event()
    ts = [threading.Thread(target=writer, args=(path, stop)) for _ in range(writers)]
    for t in ts:
        t.start()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    b = mmap.mmap(-1, 4096)
    lat = []
    end = time.time() + secs
    while time.time() < end:
        off = random.randrange(SIZE // 4096) * 4096
        t = time.perf_counter()
        os.preadv(fd, [b], off)
        lat.append(time.perf_counter() - t)
    stop.set()
    for t in ts:
        t.join()
    os.close(fd)
    lat.sort()
    print(
        "writers %2d: read p50 %5.0f us  p99 %5.0f us  (%d reads)"
        % (writers, 1e6 * lat[len(lat) // 2], 1e6 * lat[int(len(lat) * 0.99)], len(lat))
    )


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"
    counts = [int(x) for x in sys.argv[2:]] or [0, 1, 2, 4, 16]
    path = os.path.join(d, "usermm-read-under-writes-%d" % os.getpid())
    try:
        make(path)
        for n in counts:
            run(path, n)
    finally:
        if os.path.exists(path):
            os.unlink(path)


if __name__ == "__main__":
    main()
