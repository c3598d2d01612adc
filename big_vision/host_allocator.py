"""The host's memory allocator: XLA on the CPU trains ~30% faster under tcmalloc.

XLA:CPU allocates the temporary buffers of a compiled step afresh at every execution.
glibc's malloc serves such large blocks with mmap and hands them back with munmap, so each
step page-faults through its whole working set again (gigabytes for a ViT step) and the
kernel zeroes every page. tcmalloc keeps freed memory for reuse. Measured on the 2-core
development machine (docs/BENCHMARKS.md): UMD-S/4 at 28x28, batch 128, 61 -> 79 img/s.

The command-line entry points call `restart_with_tcmalloc()` first: when tcmalloc is
installed (Debian: libtcmalloc-minimal4) and not loaded yet, the process re-executes itself
with it preloaded (same command line, same PID). BV_TCMALLOC=0 turns this off.
"""
import os
import sys

LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib")
_RESTARTED = "BV_TCMALLOC_RESTARTED"


def find_tcmalloc():
  """Path of an installed tcmalloc shared library, or None."""
  for directory in LIBRARY_DIRS:
    for name in LIBRARIES:
      path = os.path.join(directory, name)
      if os.path.exists(path):
        return path
  return None


def active():
  """'tcmalloc', 'jemalloc' or 'glibc': the allocator this process runs with."""
  try:
    with open("/proc/self/maps") as f:
      maps = f.read()
  except OSError:
    return "unknown"
  for name in ("tcmalloc", "jemalloc"):
    if name in maps:
      return name
  return "glibc"


def restart_with_tcmalloc():
  """Re-executes this process with tcmalloc preloaded, when that helps and is possible."""
  if (os.environ.get("BV_TCMALLOC", "1") == "0" or os.environ.get(_RESTARTED)
      or not sys.platform.startswith("linux") or active() != "glibc"):
    return
  path = find_tcmalloc()
  if path is None:
    print("note: glibc malloc; XLA:CPU steps run ~30% faster with tcmalloc "
          "(apt-get install libtcmalloc-minimal4)", file=sys.stderr)
    return
  preload = " ".join(p for p in (os.environ.get("LD_PRELOAD"), path) if p)
  env = dict(os.environ, LD_PRELOAD=preload, **{_RESTARTED: "1"})
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
