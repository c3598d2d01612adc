"""The host's memory allocator: XLA on the CPU trains ~25% faster under a tuned jemalloc.

XLA:CPU allocates the temporary buffers of a compiled step afresh at every execution.
glibc's malloc serves such large blocks with mmap and hands them back with munmap, so each
step page-faults through its whole working set again (gigabytes for a ViT step) and the
kernel zeroes every page. jemalloc, told to keep freed pages for a few seconds
(`dirty_decay_ms`) also for large blocks (`oversize_threshold:0`), hands the same pages to
the next step; pages idle for longer go back to the system, so the process does not grow
(tcmalloc is as fast but keeps every freed page: the main job then peaked at 5.2 GiB).
Measured on the 2-core development machine: docs/BENCHMARKS.md.

The command-line entry points call `restart_with_jemalloc()` first: when jemalloc is
installed (Debian: libjemalloc2) and not loaded yet, the process re-executes itself with
it preloaded (same command line, same PID). BV_JEMALLOC=0 turns this off.
"""
import ctypes
import os
import sys

LIBRARY = "libjemalloc.so.2"
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib")
# Keep freed pages 5 s for reuse (steps take well under that), whatever their size; a
# background thread returns older ones to the system even while the process is idle.
MALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:5000,muzzy_decay_ms:0,background_thread:true"
_RESTARTED = "BV_JEMALLOC_RESTARTED"


def find_jemalloc():
  """Path of an installed jemalloc shared library, or None."""
  for directory in LIBRARY_DIRS:
    path = os.path.join(directory, LIBRARY)
    if os.path.exists(path):
      return path
  return None


def active():
  """'jemalloc', 'tcmalloc' or 'glibc': the allocator this process runs with."""
  try:
    with open("/proc/self/maps") as f:
      maps = f.read()
  except OSError:
    return "unknown"
  for name in ("jemalloc", "tcmalloc"):
    if name in maps:
      return name
  return "glibc"


def restart_with_jemalloc():
  """Re-executes this process with jemalloc preloaded, when that helps and is possible."""
  if (os.environ.get("BV_JEMALLOC", "1") == "0" or os.environ.get(_RESTARTED)
      or not sys.platform.startswith("linux") or active() != "glibc"):
    return
  path = find_jemalloc()
  if path is None:
    print("note: glibc malloc; XLA:CPU steps run ~25% faster with jemalloc "
          "(apt-get install libjemalloc2)", file=sys.stderr)
    return
  preload = " ".join(p for p in (os.environ.get("LD_PRELOAD"), path) if p)
  env = dict(os.environ, LD_PRELOAD=preload, **{_RESTARTED: "1"})
  env.setdefault("MALLOC_CONF", MALLOC_CONF)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def release_free_memory():
  """Hands freed pages back to the system now, e.g. after a round of evaluations, so
  that their leftovers and training's buffers are not held at the same time."""
  allocator = active()
  if allocator not in ("jemalloc", "glibc"):
    return
  process = ctypes.CDLL(None)
  if allocator == "jemalloc":  # 4096 = MALLCTL_ARENAS_ALL: purge every arena.
    process.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
  else:
    process.malloc_trim(ctypes.c_size_t(0))
