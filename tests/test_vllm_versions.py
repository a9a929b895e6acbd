"""vLLM 0.33.0 and 0.34.0 admitted by construction: their sources (sdists from the package index,
downloaded once into the user cache dir, never installed: ``tests/vllm_sources.py``) are read, and

* every ``from vllm... import`` of the package resolves there, except the V1-runner modules on
  0.34 (which removed that runner; they are imported only when vLLM picks V1);
* every symbol the registry (``docs/vllm-internals.md``) names resolves there, except those its
  entry's "vLLM 0.33 / 0.34" line says are gone in that release, and each such claim is true;
* every registry entry has that line.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.test_vllm_internals_registry import SYMBOL, _entries, _vllm_imports
from tests.vllm_sources import SourceTree, vllm_tree

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ("0.33.0", "0.34.0")
STATUS = re.compile(r"^- \*\*vLLM 0\.33 / 0\.34:\*\* (.*(?:\n  .*)*)", re.MULTILINE)

#: Files that import vLLM's V1 runner modules, which vLLM 0.34 removed. Only the workers import
#: them, inside the branch taken when vLLM chose the V1 runner.
V1_RUNNER_FILES = {"vllm_glimpse/engine/cpu_runner.py", "vllm_glimpse/engine/gpu_runner.py"}


@pytest.fixture(scope="module", params=VERSIONS)
def release(request):
    return request.param, SourceTree(vllm_tree(request.param))


def _status(text: str) -> str | None:
    found = STATUS.search(text)
    return found.group(1) if found else None


def _gone_in(version: str, entry_text: str) -> set[tuple[str, str]] | None:
    """Symbols an entry says are gone in ``version`` ("0.34: gone": all of them -> None)."""
    line = _status(entry_text) or ""
    short = version.rsplit(".", 1)[0]
    if f"{short}: gone" in line:
        return None
    part = re.search(rf"{re.escape(short)}:(.*?)(?=\b0\.3\d:|$)", line, re.S)
    return set(SYMBOL.findall(part.group(1))) if part else set()


def test_every_registry_entry_says_what_0_33_and_0_34_changed():
    missing = [e for e, text in _entries().items() if e != "intro" and _status(text) is None]
    assert not missing, f"registry entries without a 'vLLM 0.33 / 0.34' line: {missing}"


def test_every_vllm_import_of_the_package_resolves(release):
    version, tree = release
    unresolved = {(module, name): files for (module, name), files in _vllm_imports().items()
                  if not (tree.has_module_or_name(module, name) if name else tree.module_file(module))}
    allowed = set(V1_RUNNER_FILES) if version == "0.34.0" else set()
    bad = {k: f for k, f in unresolved.items() if not set(f) <= allowed}
    assert not bad, f"imports that do not resolve in vLLM {version}: {bad}"
    if version == "0.34.0":
        assert {f for files in unresolved.values() for f in files} == V1_RUNNER_FILES


def test_v1_runner_modules_are_imported_only_inside_functions():
    names = {f.removesuffix(".py").replace("/", ".") for f in V1_RUNNER_FILES}
    for file in sorted((ROOT / "vllm_glimpse").rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.module in names:
                pytest.fail(f"{file.relative_to(ROOT)} imports {node.module} at module level")


def test_every_registry_symbol_resolves_unless_its_entry_says_it_is_gone(release):
    version, tree = release
    wrong, stale = [], []
    for entry, text in _entries().items():
        gone = _gone_in(version, text)
        for module, path in set(SYMBOL.findall(text)):
            ok = tree.resolves(module, path)
            said_gone = gone is None or (module, path) in gone
            if not ok and not said_gone:
                wrong.append(f"{entry} {module}:{path}")
            if ok and gone is not None and (module, path) in gone:
                stale.append(f"{entry} {module}:{path}")
    assert not wrong, f"registry symbols missing in vLLM {version}: {sorted(wrong)}"
    assert not stale, f"registry says gone in vLLM {version}, but they resolve: {sorted(stale)}"


def test_the_source_resolver_tells_missing_symbols_from_present_ones(release):
    _, tree = release
    assert tree.resolves("vllm.v1.worker.gpu.model_states.interface", "ModelState.postprocess_state")
    assert tree.resolves("vllm.v1.worker.gpu.states", "RequestState.num_computed_tokens_np")
    assert tree.resolves("vllm.v1.worker.gpu.model_states.default", "DefaultModelState.encoder_cache")
    assert not tree.resolves("vllm.v1.worker.gpu.states", "RequestState.no_such_attribute")
    assert not tree.resolves("vllm.v1.worker.no_such_module", "X")


#: What ``is_profile`` does inside MRv2's ``GPUModelRunner.execute_model``, line by line, in
#: every supported release. Our runner passes ``is_profile=True`` for a real step that prunes
#: (``vllm_glimpse/engine/runner_v2.py``), relying on the first line being its only effect there:
#: the other two are in the dummy-batch branch and under ``dummy_run``.
IS_PROFILE_USES = {
    "need_eager=is_profile or skip_compiled,",
    "is_padding=not is_profile,",
    "if dummy_run and is_profile and not valid_dummy_state_slots:",
}


@pytest.mark.parametrize("version", ("0.32", *VERSIONS))
def test_is_profile_only_forces_eager_dispatch_in_a_real_mrv2_step(version):
    if version == "0.32":
        import vllm

        tree = SourceTree(Path(vllm.__file__).parent)
    else:
        tree = SourceTree(vllm_tree(version))
    module = "vllm.v1.worker.gpu.model_runner"
    source = tree.module_file(module).read_text(encoding="utf-8")
    cls = next(n for n in ast.parse(source).body
               if isinstance(n, ast.ClassDef) and n.name == "GPUModelRunner")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "execute_model")
    body = ast.get_source_segment(source, fn).splitlines()
    signature_end = fn.body[0].lineno - fn.lineno
    uses = {line.strip() for line in body[signature_end:] if "is_profile" in line}
    assert uses == IS_PROFILE_USES, f"vLLM {version}: is_profile in execute_model: {sorted(uses)}"
    # the dummy-batch branch: is_padding= sits under the "no actual tokens" else
    branch = "\n".join(body)
    assert branch.index("InputBatch.make_dummy(") < branch.index("is_padding=not is_profile")


@pytest.mark.parametrize("version", ("0.32", *VERSIONS))
def test_every_block_caching_call_goes_through_the_coordinator(version):
    """The scheduler caps what is offered to the prefix cache by wrapping
    ``KVCacheCoordinator.cache_blocks`` (``vllm_glimpse/engine/scheduler.py``): no other caller in
    vLLM's engine core may cache a request's blocks."""
    if version == "0.32":
        import vllm

        root = Path(vllm.__file__).parent
    else:
        root = vllm_tree(version)
    core = root / "v1" / "core"
    calls = {}
    for file in sorted(core.rglob("*.py")):
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            for pattern in (".cache_full_blocks(", "manager.cache_blocks(", ".cache_blocks("):
                if pattern in code and "def " not in code:
                    calls.setdefault(file.relative_to(core).as_posix(), set()).add(pattern)
                    break
    assert calls.get("single_type_kv_cache_manager.py") == {".cache_full_blocks(", ".cache_blocks("}
    assert calls.get("kv_cache_coordinator.py") == {"manager.cache_blocks("}
    # the manager's callers reach the block pool only through the coordinator
    manager = (core / "kv_cache_manager.py").read_text(encoding="utf-8")
    assert [ln.strip() for ln in manager.splitlines() if ".cache_blocks(" in ln and "def " not in ln] \
        and all("self.coordinator.cache_blocks(" in ln for ln in manager.splitlines()
                if ".cache_blocks(" in ln and "def " not in ln)
    assert set(calls) <= {"single_type_kv_cache_manager.py", "kv_cache_coordinator.py",
                          "kv_cache_manager.py", "sched/scheduler.py", "sched/async_scheduler.py"}
