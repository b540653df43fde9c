"""The public surface: complete exports, documented hooks, typed package."""

from __future__ import annotations

import inspect
from pathlib import Path

import kafkaworkers
from kafkaworkers.plugins import hook_names

ROOT = Path(__file__).resolve().parent.parent


def test_all_is_sorted_and_complete() -> None:
    assert kafkaworkers.__all__ == sorted(kafkaworkers.__all__)
    public = {n for n, v in vars(kafkaworkers).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert public <= set(kafkaworkers.__all__), public - set(kafkaworkers.__all__)


def test_every_hook_is_documented() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    undocumented = [name for name in hook_names() if f"**`{name}(" not in docs]
    assert undocumented == []


def test_every_hook_has_a_docstring_with_its_parameters() -> None:
    from kafkaworkers import hookspecs

    for name in hook_names():
        spec = getattr(hookspecs, name)
        params = inspect.signature(spec).parameters
        doc = spec.__doc__ or ""
        assert doc.strip(), name
        assert all(f":param {p}:" in doc for p in params), name


def test_package_ships_py_typed() -> None:
    assert (Path(kafkaworkers.__file__).parent / "py.typed").exists()
