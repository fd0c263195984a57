"""Prepare N embedded stories and print: tokens, peak anonymous RSS in MB (sampled)."""

import sys
import tempfile
import threading
import time

from slm_export import data


def rss_anon_mb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


peak, done = rss_anon_mb(), threading.Event()


def watch():
    global peak
    while not done.is_set():
        peak = max(peak, rss_anon_mb())
        time.sleep(0.005)


watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
prepared = data.prepare(data.Source(stories=int(sys.argv[1]), seed=9), tempfile.mkdtemp())
done.set()
watcher.join()
print(prepared.meta["splits"]["train"]["tokens"], peak)
