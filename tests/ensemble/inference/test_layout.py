"""The inference stage's modules import one way: each imports alone in a fresh interpreter, the
engine contract imports no engine, neither engine imports the split loop (run.py) nor the
other, and the options the command line reads its defaults from need no numpy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ensemble.inference

FOLDER = Path(ensemble.inference.__file__).parent
MODULES = sorted(p.stem for p in FOLDER.glob("*.py") if p.stem != "__init__")
PROBE = """
import json, sys
import ensemble.inference.{name}
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("ensemble", "numpy", "ray")))))
"""
#: What each module must not import, directly or not.
NEVER = {
    "options": {"numpy", "ensemble.inference.engine", "ensemble.inference.run"},
    "engine": {"ensemble.inference.local", "ensemble.inference.ray_engine", "ensemble.inference.run"},
    "forward": {"ensemble.inference.local", "ensemble.inference.ray_engine", "ensemble.inference.run"},
    "local": {"ensemble.inference.ray_engine", "ensemble.inference.run"},
    "ray_engine": {"ensemble.inference.local", "ensemble.inference.run", "ray"},  # ray: only when run
    "foreign": {"numpy", "ensemble.inference.runtime"},
    "run": {"ensemble.inference.ray_engine", "ray"},  # Ray only for --engine ray
}


def test_each_module_imports_alone_and_one_way():
    assert {"engine", "local", "ray_engine", "run", "forward", "options", "foreign", "runtime"} <= set(MODULES)
    # One interpreter per module, all at once: a circle fails the module imported first.
    probes = {name: subprocess.Popen([sys.executable, "-c", PROBE.format(name=name)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for name in MODULES}
    imported = {}
    for name, probe in probes.items():
        out, err = probe.communicate(timeout=120)
        assert probe.returncode == 0, f"import ensemble.inference.{name} failed:\n{err}"
        imported[name] = set(json.loads(out))
    for name, never in NEVER.items():
        assert not imported[name] & never, (name, sorted(imported[name] & never))
    # Stages import formats, never each other.
    for name, modules in imported.items():
        other = {m for m in modules if m.startswith("ensemble.") and m.split(".")[1] in
                 ("blend", "submission", "report", "demo", "cli", "cli_progress")}
        assert not other, (name, sorted(other))
