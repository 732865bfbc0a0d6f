"""Heavy optional pieces sit behind pip extras: using one without it raises an ImportError that
names the extra to install, before any work starts."""
from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest

from attnpatch import _extras

ROOT = Path(__file__).resolve().parents[1]


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n in names else real(n, *a, **k))


def test_missing_matplotlib_names_the_cli_extra(monkeypatch, tmp_path):
    from attnpatch.cli import report

    _hide(monkeypatch, "matplotlib")
    with pytest.raises(ImportError, match=r"matplotlib.*pip install 'attnpatch\[cli\]'"):
        report.scatter([{"setting": "a", "speedup": 1.0, "psnr": 30.0}], "psnr", tmp_path / "x.png")


def test_missing_diffusers_names_the_extra_before_loading(monkeypatch):
    from attnpatch.cli import runner
    from attnpatch.models import fixtures

    _hide(monkeypatch, "diffusers")
    with pytest.raises(ImportError, match=r"pip install 'attnpatch\[diffusers\]'"):
        runner.load("builtin:flux-shapes")
    with pytest.raises(ImportError, match=r"diffusers, which is not installed"):
        fixtures.flux_components()


def test_core_dependencies_are_light_and_extras_cover_every_named_module():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("<")[0].split("=")[0].strip() for d in meta["dependencies"]}
    assert not core & {"diffusers", "transformers", "matplotlib", "accelerate"}, core
    extras = meta["optional-dependencies"]
    for module, extra in _extras.EXTRAS.items():  # the extra an error names installs the module
        assert any(d.startswith(module) for d in extras[extra]), (module, extra, extras[extra])
