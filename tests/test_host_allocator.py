"""The entry points restart under jemalloc when it is installed (big_vision/host_allocator)."""
import os
import subprocess
import sys

import pytest

from big_vision import host_allocator

SCRIPT = ("import os; from big_vision import host_allocator as h; h.restart_with_jemalloc(); "
          "print(h.active(), os.environ.get('MALLOC_CONF'))")


def run_script(**env):
  base = {k: v for k, v in os.environ.items()
          if k not in ("LD_PRELOAD", "MALLOC_CONF", "BV_JEMALLOC", "BV_JEMALLOC_RESTARTED")}
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=dict(base, **env), check=True,
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__))))
  return out.stdout.strip().splitlines()[-1].split(" ", 1)


def test_active_names_an_allocator():
  assert host_allocator.active() in ("jemalloc", "tcmalloc", "glibc")


@pytest.mark.skipif(host_allocator.find_jemalloc() is None,
                    reason="jemalloc is not installed (apt-get install libjemalloc2)")
def test_restarts_under_jemalloc_once_and_can_be_turned_off():
  assert run_script() == ["jemalloc", host_allocator.MALLOC_CONF]
  assert run_script(MALLOC_CONF="narenas:2") == ["jemalloc", "narenas:2"]  # The user's wins.
  assert run_script(BV_JEMALLOC="0") == ["glibc", "None"]
  # A restart that did not get jemalloc loaded does not restart again (no loop).
  assert run_script(BV_JEMALLOC_RESTARTED="1")[0] == "glibc"


def test_release_free_memory_returns_pages():
  """Freed blocks (64 x 8 MiB) leave the process's resident memory once released."""
  script = ("import ctypes, numpy as np; from big_vision import host_allocator as h\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
            "x = [np.ones(1 << 21, np.float32) for _ in range(64)]; before = rss(); del x\n"
            "h.release_free_memory(); print(h.active(), before, rss())")
  cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for extra in ({}, {"BV_JEMALLOC": "0"}):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    if host_allocator.find_jemalloc() and not extra:
      env.update(LD_PRELOAD=host_allocator.find_jemalloc(), MALLOC_CONF=host_allocator.MALLOC_CONF)
    out = subprocess.run([sys.executable, "-c", script], env=dict(env, **extra), check=True,
                         capture_output=True, text=True, cwd=cwd).stdout.split()
    _, before, after = out[0], int(out[1]), int(out[2])
    assert before - after > 400, out  # MiB handed back.
