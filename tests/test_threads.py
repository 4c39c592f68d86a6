"""The thread policy: passive OpenMP waiting asked for before torch loads, thread count from free cores."""

import sys
import textwrap
from pathlib import Path

from tests.helpers import clean_env, run_command


def _run(code, **env):
    # Run from the project root, so that "csakd_qgis" is the engine of this checkout.
    root = Path(__file__).resolve().parent.parent
    return run_command([sys.executable, "-c", textwrap.dedent(code)], env=clean_env(**env), cwd=root).stdout


def test_passive_waiting_is_asked_for_before_torch_loads_and_the_count_follows_the_free_cores():
    out = _run(
        """
        import os
        from csakd_qgis.threads import configure_torch_threads, free_cores, prefer_passive_waiting, system_load, usable_cores
        assert prefer_passive_waiting() and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
        import torch
        lines = []
        threads = configure_torch_threads(lines.append)
        assert threads == torch.get_num_threads(), (threads, torch.get_num_threads())
        assert 1 <= threads <= usable_cores()
        print(lines[0])
        """,
    )
    assert "OpenMP wait policy PASSIVE" in out and "thread(s)" in out, out


def test_an_explicit_thread_count_and_wait_policy_are_kept():
    out = _run(
        """
        from csakd_qgis.threads import configure_torch_threads, prefer_passive_waiting
        assert not prefer_passive_waiting()
        import torch
        print(configure_torch_threads(print), torch.get_num_threads())
        """,
        OMP_NUM_THREADS=1, OMP_WAIT_POLICY="ACTIVE",
    )
    assert "1 thread(s) (OMP_NUM_THREADS); OpenMP wait policy ACTIVE" in out, out
    assert out.strip().endswith("1 1"), out


def test_free_cores_subtracts_the_load_and_keeps_at_least_one():
    from csakd_qgis.threads import free_cores

    assert free_cores(2, 0.1) == 2
    assert free_cores(2, 1.2) == 1
    assert free_cores(2, 7.0) == 1
    assert free_cores(16, 3.6) == 12
    assert free_cores(4, None) == 4


def test_busy_cores_are_measured_now_not_a_minute_ago():
    """The load is what runs now: one spinning process shows as about one busy core within a
    quarter second (a 1-minute load average would still remember earlier work, or not yet see it)."""
    import subprocess

    from csakd_qgis.threads import system_load

    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        import time

        time.sleep(0.3)
        load = system_load()
    finally:
        spinner.kill()
        spinner.wait()
    assert load is not None and load >= 0.7, load
