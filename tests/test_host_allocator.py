"""The entry points restart under tcmalloc when it is installed (big_vision/host_allocator)."""
import os
import subprocess
import sys

import pytest

from big_vision import host_allocator

SCRIPT = ("from big_vision import host_allocator as h; h.restart_with_tcmalloc(); "
          "print(h.active())")


def run_script(**env):
  base = {k: v for k, v in os.environ.items()
          if k not in ("LD_PRELOAD", "BV_TCMALLOC", "BV_TCMALLOC_RESTARTED")}
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=dict(base, **env), check=True,
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__))))
  return out.stdout.strip().splitlines()[-1]


def test_active_names_an_allocator():
  assert host_allocator.active() in ("tcmalloc", "jemalloc", "glibc")


@pytest.mark.skipif(host_allocator.find_tcmalloc() is None,
                    reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
def test_restarts_under_tcmalloc_once_and_can_be_turned_off():
  assert run_script() == "tcmalloc"
  assert run_script(BV_TCMALLOC="0") == "glibc"
  # A restart that did not get tcmalloc loaded does not restart again (no loop).
  assert run_script(BV_TCMALLOC_RESTARTED="1") == "glibc"
