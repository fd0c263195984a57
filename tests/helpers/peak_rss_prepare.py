"""Prepare N embedded stories and print: train tokens, train documents, this process's peak
RSS in MB (the kernel's high-water mark, VmHWM), and how many worker processes tokenized
(``datasets.Dataset.map``'s num_proc; 0: this process)."""

import sys
import tempfile

import datasets

from slm_export import data

workers = [0]
real_map = datasets.Dataset.map


def counting_map(self, *args, **kwargs):
    workers[0] = max(workers[0], kwargs.get("num_proc") or 0)
    return real_map(self, *args, **kwargs)


datasets.Dataset.map = counting_map


def vm_hwm_mb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


prepared = data.prepare(data.Source.of(stories=int(sys.argv[1]), data_seed=9), tempfile.mkdtemp())
train = prepared.meta["splits"]["train"]
print(train["tokens"], train["documents"], vm_hwm_mb(), workers[0])
