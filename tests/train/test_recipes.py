"""bench/recipes.sh: every recipe is arguments train accepts, and its --steps twin replaces the time budget."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

from support import ROOT

from train.__main__ import parser


def recipes(**env: str) -> dict[str, str]:
    proc = subprocess.run(["bash", str(ROOT / "bench" / "recipes.sh"), "-"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "LIST": "1", **env})
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("\t", 1) for line in proc.stdout.splitlines())


def test_every_recipe_parses_and_has_a_time_budget_for_its_steps_twin():
    listed, twins = recipes(), recipes(STEPS="954")
    assert twins.keys() == listed.keys()
    # the recipes the docs quote, the ablations at two seeds, the 20 min candidates, the demo-corpus runs
    assert {"cpu-131", "cpu-1200", "abl-base-s1337", "abl-ema99-s1338", "demo-ema99-s1338"} <= listed.keys()
    for name, args in listed.items():
        parsed = parser().parse_args([*shlex.split(args), "--corpus", "x", "--out", "y"])
        assert parsed.time_budget is not None, name
        twin = parser().parse_args([*shlex.split(twins[name]), "--out", "y"])
        assert (twin.steps, twin.time_budget) == (954, None), name
        assert re.sub(r"--steps 954", f"--time-budget {parsed.time_budget:g}", twins[name]) == args, name


def test_every_measured_run_states_its_ema():
    """The ablations and the runs that chose the recipes state --ema: the default changed once (issue 24) and
    a run that a table quotes must train the same after any later change. The recipes themselves follow it."""
    unstated = [name for name, args in recipes().items() if "--ema" not in args]
    assert sorted(unstated) == ["cpu-131", "gpu-1200"]
