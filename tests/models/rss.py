"""Peak-RAM measurements of loading, each in a fresh Python process.

Growth is measured from the CURRENT resident size after imports to the high-water mark after the
measured statement: stricter than comparing two high-water marks, which an import transient could
inflate. Not ru_maxrss: Linux carries it over fork + exec, so a child of a big pytest process starts
with its parent's peak. /proc's VmHWM belongs to the child's own address space.
"""
import json
import subprocess
import sys

SAVE = """
import sys, torch
from peftcore.models import from_config, save_pretrained
from peftcore.models.llama import LlamaConfig
torch.manual_seed(0)
save_pretrained(from_config(LlamaConfig(**{config})), sys.argv[1])
"""

MEASURE = """
import gc, json, sys
{imports}

def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB

gc.collect()
before = status("VmRSS")
{statement}
print(json.dumps({{"growth": status("VmHWM") - before}}))
"""


def start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out


def save_random_llama(config: dict, folder) -> None:
    finish(start(SAVE.format(config=config), str(folder)))


def start_growth(imports: str, statement: str, *args: str) -> subprocess.Popen:
    """A child that runs `imports`, then measures how far `statement` raises its peak RSS."""
    return start(MEASURE.format(imports=imports, statement=statement), *args)


def growth_bytes(proc: subprocess.Popen) -> int:
    return json.loads(finish(proc))["growth"]
