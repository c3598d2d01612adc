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


@pytest.mark.skipif(host_allocator.find_jemalloc() is None,
                    reason="jemalloc is not installed (apt-get install libjemalloc2)")
def test_release_free_memory_returns_pages():
  """jemalloc keeps freed 1 MiB blocks (for the next step); the release hands them back."""
  script = ("import numpy as np; from big_vision import host_allocator as h\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
            "x = [np.ones(1 << 18, np.float32) for _ in range(512)]; del x; kept = rss()\n"
            "h.release_free_memory(); print(h.active(), kept, rss())")
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
  for allocator, extra in (("jemalloc", {}), ("glibc", {"BV_JEMALLOC": "0"})):
    if allocator == "jemalloc":
      extra = dict(LD_PRELOAD=host_allocator.find_jemalloc(),
                   MALLOC_CONF=host_allocator.MALLOC_CONF)
    out = subprocess.run([sys.executable, "-c", script], env=dict(env, **extra), check=True,
                         capture_output=True, text=True, cwd=os.path.dirname(
                             os.path.dirname(os.path.abspath(__file__)))).stdout.split()
    assert out[0] == allocator
    kept, released = int(out[1]), int(out[2])
    if allocator == "jemalloc":
      assert kept - released > 50, out  # MiB handed back by the release.
    else:
      assert released <= kept + 5, out  # malloc_trim runs and frees, never grows.
