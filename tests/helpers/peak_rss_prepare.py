"""Prepare N embedded stories and print: train tokens, train documents, this process's peak
RSS in MB (the kernel's high-water mark, VmHWM), the largest child's peak RSS in MB (0 when
no worker process ran)."""

import resource
import sys
import tempfile

from slm_export import data


def vm_hwm_mb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


prepared = data.prepare(data.Source(stories=int(sys.argv[1]), seed=9), tempfile.mkdtemp())
train = prepared.meta["splits"]["train"]
children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024  # KB on Linux
print(train["tokens"], train["documents"], vm_hwm_mb(), children_mb)
