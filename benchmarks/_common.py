"""What every benchmark shares: the name of the CPU the figures were measured on.

(`cpu_id` tells apart machines with the same name: "AMD EPYC" covers several generations.)

The scripts run as `python benchmarks/<name>.py`, which puts this folder on sys.path, so
they import it as `from _common import cpu_name`.
"""

from __future__ import annotations

import platform
import subprocess


def cpu_name() -> str:
    """lscpu's `Model name` (else /proc/cpuinfo's `model name`, else the platform's word)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_id() -> str:
    """/proc/cpuinfo's "family F model M" (x86), else ""."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first CPU only
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return ""
    if "cpu family" in fields and "model" in fields:
        return f"family {fields['cpu family']} model {fields['model']}"
    return ""
