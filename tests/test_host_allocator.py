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
