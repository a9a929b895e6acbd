"""Running Triton kernel tests on CPU: Triton's interpreter must be on (TRITON_INTERPRET=1)
before triton is first imported in a process (@triton.jit reads it, triton.language's own
@jit helpers included), so a kernel test module runs itself again in a child pytest with it set,
and checks from the parent that every interpreter test ran."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

CHILD_FLAG = "VLLM_GLIMPSE_TRITON_INTERPRETER_CHILD"
IN_CHILD = os.environ.get(CHILD_FLAG) == "1"


def run_module_under_interpreter(test_file: str, selection: str, min_passed: int) -> None:
    """Run the tests of ``test_file`` matching ``-k selection`` in a child pytest under the
    interpreter; fail unless at least ``min_passed`` passed and none was skipped."""
    env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD_FLAG: "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selection],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
        timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    passed = re.search(r"(\d+) passed", output)
    # Every selected test ran (none deselected by a renaming, none skipped).
    assert passed and int(passed.group(1)) >= min_passed and "skipped" not in output, output


def load_compiled_copy(module_name: str, alias: str):
    """A private copy of a kernels module with @triton.jit run without the interpreter."""
    origin = importlib.util.find_spec(module_name).origin
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        spec = importlib.util.spec_from_file_location(alias, origin)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module
