"""The peer frameworks' virtual environments under ``.cache/bench/venvs/<name>``.

Each peer gets its own venv made from the same interpreter as the project's ``.venv``,
with the framework from PyPI plus msgspec (every contender decodes with the same msgspec
contract). A venv is built once and reused while its requirement list is unchanged; a peer
that cannot be installed is reported with pip's own error and skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".cache" / "bench" / "venvs"

#: venv name -> pip requirements (msgspec is added to every one).
PEER_REQUIREMENTS: dict[str, list[str]] = {
    # aiohttp: W6's handler awaits a local HTTP server.
    "faststream-confluent": ["faststream[confluent]", "aiohttp"],
    "faststream-aiokafka": ["faststream[kafka]"],
    "quixstreams": ["quixstreams"],
    "faust": ["faust-streaming"],
    "aiokafka": ["aiokafka"],
}

#: The distributions whose versions the results name, per venv.
REPORTED = {
    "faststream-confluent": ["faststream", "confluent-kafka", "msgspec"],
    "faststream-aiokafka": ["faststream", "aiokafka", "msgspec"],
    "quixstreams": ["quixstreams", "confluent-kafka", "msgspec"],
    "faust": ["faust-streaming", "aiokafka", "msgspec"],
    "aiokafka": ["aiokafka", "msgspec"],
}


@dataclass
class Venv:
    name: str
    python: Path | None = None
    versions: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.python is not None


def _base_python() -> str:
    # The interpreter the project's venv was made from: every peer runs on the same Python.
    return getattr(sys, "_base_executable", None) or sys.executable


def ensure(name: str, log=print) -> Venv:
    """Create (or reuse) the venv of one peer; never raises for an install failure."""
    wanted = [*PEER_REQUIREMENTS[name], "msgspec"]
    home = VENVS / name
    python = home / "bin" / "python"
    stamp = home / ".bench-requirements.json"
    try:
        if not (python.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted):
            log(f"venv {name}: installing {' '.join(wanted)} (once)")
            subprocess.run([_base_python(), "-m", "venv", "--clear", str(home)], check=True, capture_output=True)
            proc = subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *wanted],
                capture_output=True,
                text=True,
                timeout=900,
            )
            if proc.returncode != 0:
                return Venv(name, error=f"pip install {' '.join(wanted)} failed: {_last_lines(proc.stderr)}")
            stamp.write_text(json.dumps(wanted))
        return Venv(name, python, versions(python, REPORTED[name]))
    except (OSError, subprocess.SubprocessError) as exc:
        return Venv(name, error=f"{type(exc).__name__}: {exc}")


def versions(python: Path | str, dists: list[str]) -> dict[str, str]:
    """Installed versions of ``dists`` in the environment of ``python`` (``-`` if absent)."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for d in sys.argv[1:]:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: out[d] = '-'\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([str(python), "-c", code, *dists], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def _last_lines(text: str, n: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:]) or "(no output)"


if __name__ == "__main__":
    for peer in sys.argv[1:] or list(PEER_REQUIREMENTS):
        v = ensure(peer)
        print(peer, v.versions if v.ok else v.error)
