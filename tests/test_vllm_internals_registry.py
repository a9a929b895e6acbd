"""docs/vllm-internals.md, the registry of the vLLM internals the plugin depends on, cannot go
stale in the directions that break users:

* every symbol it names (```vllm.module:Name.attr```) exists in the installed vLLM, so an
  upgrade that renames or drops one fails here with the registry entry's id;
* every ``from vllm... import ...`` in the package (``vllm_glimpse/``, ``kernels/``) is named in it,
  so a new dependency on vLLM cannot be added without an entry;
* every patch ``vllm_glimpse.patches.apply_all`` applies, and every vLLM module a patch waits for,
  has an entry;
* the FlashAttention cache layout our KV reads and Triton kernels assume is the one vLLM's writer
  uses.

No engine starts; the vLLM modules named are imported in this process, except vLLM's CPU worker
module (importing it replaces ``torch.cuda.Event`` and more for the whole process), which is
checked from its source.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "docs" / "vllm-internals.md"
CODE_DIRS = (ROOT / "vllm_glimpse", ROOT / "kernels")

#: vLLM modules checked from their source instead of imported (importing them changes torch for
#: the whole test process; see registry entry W2).
NOT_IMPORTED = {"vllm.v1.worker.cpu_worker"}

SYMBOL = re.compile(r"`(vllm(?:\.\w+)*):([A-Za-z_][\w.]*)`")
ENTRY = re.compile(r"^### (\w+)\. (.*)$", re.MULTILINE)


def _registry_text() -> str:
    return REGISTRY.read_text(encoding="utf-8")


def _entries() -> dict[str, str]:
    """Entry id -> its text; text before the first entry is filed under "intro"."""
    text = _registry_text()
    heads = list(ENTRY.finditer(text))
    entries = {"intro": text[: heads[0].start()] if heads else text}
    for i, head in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        entries[head.group(1)] = text[head.start():end]
    return entries


def _named_symbols() -> list[tuple[str, str, str]]:
    """(entry id, module, attribute path) for every symbol the registry names."""
    out = []
    for entry, text in _entries().items():
        for module, path in SYMBOL.findall(text):
            out.append((entry, module, path))
    return out


# ---- resolving a symbol ------------------------------------------------------------------------


def _assigned_in_source(cls: type, name: str) -> bool:
    """``self.<name> = ...`` (or annotated, or in a tuple assignment) in a vLLM class of the MRO."""
    pattern = re.compile(rf"\bself\.{re.escape(name)}\s*(?::[^=\n]+)?=[^=]"
                         rf"|\bself\.{re.escape(name)}\s*,[^\n]*=[^=]")
    for klass in cls.__mro__:
        if not klass.__module__.startswith("vllm"):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if pattern.search(source):
            return True
    return False


def _declares_instance_attribute(cls: type, name: str) -> bool:
    if dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}:
        return True
    if name in getattr(cls, "__struct_fields__", ()):  # msgspec structs
        return True
    if any(name in getattr(klass, "__annotations__", {}) for klass in cls.__mro__):
        return True
    return _assigned_in_source(cls, name)


def _resolve(module_name: str, path: str) -> str | None:
    """None if ``module:path`` exists in the installed vLLM, else why not."""
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        return f"module {module_name} does not import ({type(exc).__name__}: {exc})"
    parts = path.split(".")
    for i, part in enumerate(parts):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        where = ".".join([module_name.rsplit(".", 1)[-1], *parts[:i]]) if i else module_name
        if inspect.isclass(obj) and i == len(parts) - 1 and _declares_instance_attribute(obj, part):
            return None
        return f"{where} has no attribute {part!r}"
    return None


def _resolve_from_source(module_name: str, path: str) -> str | None:
    """As :func:`_resolve`, from the module's source (module-level names, class members)."""
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        return f"module {module_name} is not installed"
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    top: dict[str, ast.AST | None] = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            top[node.name] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                top[(alias.asname or alias.name).split(".")[0]] = None
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    top[target.id] = None
    head, *rest = path.split(".")
    if head not in top:
        return f"{module_name} defines or imports no {head!r}"
    if not rest:
        return None
    node = top[head]
    if not isinstance(node, ast.ClassDef) or len(rest) != 1:
        return f"cannot check {path!r} from source (only Class.member)"
    members = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    members |= {t.id for n in node.body if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Name)}
    if rest[0] in members:
        return None
    return f"{module_name}.{head} defines no {rest[0]!r} (inherited members are not checked)"


# ---- the tests ---------------------------------------------------------------------------------


def test_resolver_tells_missing_symbols_from_present_ones():
    """The check below can fail: made-up names are reported, real instance attributes (set in
    ``__init__``, dataclass fields) and class members are found."""
    runner = "vllm.v1.worker.gpu_model_runner"
    assert _resolve(runner, "GPUModelRunner.input_batch") is None  # self.input_batch = ...
    assert _resolve(runner, "GPUModelRunner._prepare_inputs") is None
    assert _resolve("vllm.v1.attention.backend", "CommonAttentionMetadata.slot_mapping") is None
    assert "no attribute 'no_such_attribute'" in _resolve(runner, "GPUModelRunner.no_such_attribute")
    assert "no attribute 'NoSuchRunner'" in _resolve(runner, "NoSuchRunner")
    assert "does not import" in _resolve("vllm.v1.no_such_module", "X")
    cpu_worker = "vllm.v1.worker.cpu_worker"
    assert _resolve_from_source(cpu_worker, "CPUWorker.init_device") is None
    assert _resolve_from_source(cpu_worker, "CPUModelRunner") is None
    assert "defines no 'no_such_method'" in _resolve_from_source(cpu_worker, "CPUWorker.no_such_method")
    assert "no 'NoSuchName'" in _resolve_from_source(cpu_worker, "NoSuchName")


def test_every_named_symbol_exists_in_installed_vllm():
    import vllm

    symbols = _named_symbols()
    assert len(symbols) > 100, "the registry names fewer symbols than expected: was it parsed?"
    missing = []
    for entry, module, path in symbols:
        resolve = _resolve_from_source if module in NOT_IMPORTED else _resolve
        why = resolve(module, path)
        if why is not None:
            missing.append(f"{entry}: `{module}:{path}`: {why}")
    assert not missing, (
        f"docs/vllm-internals.md names symbols vLLM {vllm.__version__} does not have "
        "(update the entry and the code it describes):\n" + "\n".join(missing))


def _vllm_imports() -> dict[tuple[str, str | None], list[str]]:
    """(module, imported name or None for ``import vllm.x``) -> files importing it."""
    found: dict[tuple[str, str | None], list[str]] = {}
    for directory in CODE_DIRS:
        for file in sorted(directory.rglob("*.py")):
            tree = ast.parse(file.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                        and (node.module == "vllm" or node.module.startswith("vllm.")):
                    for alias in node.names:
                        found.setdefault((node.module, alias.name), []).append(
                            str(file.relative_to(ROOT)))
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.startswith("vllm."):
                            found.setdefault((alias.name, None), []).append(
                                str(file.relative_to(ROOT)))
    return found


def test_every_vllm_import_of_the_package_is_in_the_registry():
    named = {(module, path) for _, module, path in _named_symbols()}
    named_modules = {module for module, _ in named}
    imports = _vllm_imports()
    assert ("vllm.v1.core.sched.scheduler", "Scheduler") in imports  # the scan found the code
    unlisted = []
    for (module, name), files in sorted(imports.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        if name is None:
            listed = module in named_modules
        else:  # the name itself, or one of its members (``Class.method``)
            listed = any(m == module and (path == name or path.startswith(name + "."))
                         for m, path in named)
        if not listed:
            what = module if name is None else f"{module}:{name}"
            unlisted.append(f"`{what}` (imported by {', '.join(sorted(set(files)))})")
    assert not unlisted, ("vLLM symbols imported by the package but not named in "
                          "docs/vllm-internals.md (add an entry: why, how, what would remove "
                          "it):\n" + "\n".join(unlisted))


def _apply_all_patches() -> list[str]:
    from vllm_glimpse import patches

    tree = ast.parse(inspect.getsource(patches.apply_all))
    return [node.func.id for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]


def test_every_patch_has_a_registry_entry():
    headings = {m.group(2) for m in ENTRY.finditer(_registry_text())}
    patches = _apply_all_patches()
    assert "add_plugin_cli_flags" in patches  # the scan found apply_all's calls
    missing = [p for p in patches if not any(f"`{p}`" in h for h in headings)]
    assert not missing, ("patches applied by vllm_glimpse.patches.apply_all with no entry "
                         "headed by their name in docs/vllm-internals.md: " + ", ".join(missing))


def test_every_module_a_patch_waits_for_is_in_the_registry():
    source = (ROOT / "vllm_glimpse" / "patches.py").read_text(encoding="utf-8")
    waited = set(re.findall(r'_after_import\(\s*"([\w.]+)"', source))
    assert "vllm.engine.arg_utils" in waited
    named_modules = {module for _, module, _ in _named_symbols()}
    assert not waited - named_modules, (
        "modules patched by vllm_glimpse/patches.py with no symbol of theirs named in "
        f"docs/vllm-internals.md: {sorted(waited - named_modules)}")


def test_flash_attention_cache_layout_is_the_one_our_views_assume():
    """Registry entry W5: ``vllm_glimpse.engine.kv.flash_attention_views`` and the Triton kernels
    read FlashAttention's cache as ``kv_cache.transpose(1, 2).split(head_size, -1)`` of a
    ``[blocks, kv_heads, block_size, 2 * head_size]`` tensor, as vLLM's own writer does."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    from vllm_glimpse.engine.kv import flash_attention_views

    writer = inspect.getsource(FlashAttentionImpl.do_kv_cache_update)
    ours = inspect.getsource(flash_attention_views)
    split = re.compile(r"transpose\(1,\s*2\)\.split\(\s*[\w.]*head_size,\s*dim=-1\)")
    assert split.search(writer), (
        "vLLM's FlashAttentionImpl.do_kv_cache_update no longer splits the cache as "
        "kv_cache.transpose(1, 2).split(head_size, dim=-1): registry entry W5, "
        "vllm_glimpse/engine/kv.py and kernels/*_triton.py assume that layout")
    assert split.search(ours)


@pytest.mark.parametrize("module", sorted(NOT_IMPORTED))
def test_modules_checked_from_source_are_named_and_installed(module):
    assert importlib.util.find_spec(module) is not None
    assert any(m == module for _, m, _ in _named_symbols())
