"""Where Ray may be imported: only geopose_ray.cluster. Every other module imports without it."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import geopose_ray


def modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(geopose_ray.__path__, "geopose_ray."))


def test_only_the_cluster_package_imports_ray() -> None:
    """Each module outside geopose_ray.cluster, imported alone in a fresh interpreter, leaves ``ray`` unimported
    (a module that needs Ray for one command imports it inside that command)."""
    outside = [m for m in modules() if m != "geopose_ray.cluster" and not m.startswith("geopose_ray.cluster.")]
    assert "geopose_ray.sweep.dispatch" in outside and "geopose_ray.simulate.engine" in outside
    code = (
        "import importlib, json, sys\n"
        "bad = []\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    before = set(sys.modules)\n"
        "    importlib.import_module(name)\n"
        "    if 'ray' in sys.modules:\n"
        "        bad.append(name)\n"
        "        for m in set(sys.modules) - before:\n"
        "            del sys.modules[m]\n"
        "print(json.dumps(bad))\n"
    )
    # One interpreter per module would take a minute; one for all, with each module's imports undone when it
    # pulled Ray in, names every offender (a module imported before the offender keeps its own imports).
    # The control, last: a cluster module, which must be named (the check can fail).
    names = json.dumps([*outside, "geopose_ray.cluster.scheduler"])
    out = subprocess.run([sys.executable, "-c", code, names], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["geopose_ray.cluster.scheduler"]
