"""Coverage-guided fuzzing (atheris) of the policy loader: YAML text -> validated objects or located errors.

Contract under test: `load_text` never raises, whatever the bytes; every error has a file and a message; every
object it accepts compiles into the engine.
Run: `.venv/bin/python fuzz/fuzz_policy_loader.py fuzz/corpus/policy -max_total_time=60`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import atheris

with atheris.instrument_imports():
    from egress_gateway.policy.engine import compile_policy
    from egress_gateway.sources.files import load_text


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    result = load_text(text, "fuzz.yaml")
    for error in result.errors:
        if not error.file or not error.error.message:
            raise AssertionError(f"error without location or message: {error!r}")
    for item in result.objects:
        compile_policy(item.policy, item.version)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
