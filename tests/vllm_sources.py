"""Other vLLM releases' Python sources, read but never installed or imported: the sdist of
``vllm==VERSION`` from the package index pip is configured with, downloaded once and unpacked
(its ``vllm/`` tree only) under the user cache dir, and a static resolver of ``module:Name.attr``
symbols over that tree (module files, top-level names, class attributes through base classes)."""

from __future__ import annotations

import ast
import functools
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-glimpse" / "vllm-sdists"


def _download_sdist(version: str, dest: Path) -> Path:
    """pip's own package finder and session (the index and proxies pip is configured with): a
    plain ``pip download`` of vLLM's sdist would build its metadata, which needs its build deps."""
    from pip._internal.commands import create_command

    cmd = create_command("download")
    options, _ = cmd.parse_args(["--no-deps", "--no-binary", ":all:", f"vllm=={version}",
                                 "-d", str(dest)])
    with cmd.main_context():
        session = cmd.get_default_session(options)
        finder = cmd._build_package_finder(options=options, session=session, target_python=None,
                                           ignore_requires_python=True)
        links = [c.link for c in finder.find_all_candidates("vllm")
                 if str(c.version) == version and c.link.filename.endswith(".tar.gz")]
        if not links:
            raise RuntimeError(f"no sdist of vllm=={version} on the package index")
        response = session.get(links[0].url.split("#")[0], stream=True)
        response.raise_for_status()
        out = dest / links[0].filename
        partial = out.with_suffix(".part")
        with open(partial, "wb") as f:
            for chunk in response.iter_content(1 << 20):
                f.write(chunk)
        partial.rename(out)
        return out


def vllm_tree(version: str) -> Path:
    """The ``vllm/`` source tree of ``vllm==version`` (downloaded and unpacked on first use)."""
    root = CACHE / f"vllm-{version}"
    if (root / "vllm" / "__init__.py").exists():
        return root / "vllm"
    CACHE.mkdir(parents=True, exist_ok=True)
    archive = CACHE / f"vllm-{version}.tar.gz"
    if not archive.exists():
        archive = _download_sdist(version, CACHE)
    prefix = f"vllm-{version}/vllm/"
    # Unpacked beside its final place and renamed once complete: an interrupted run leaves no
    # partial tree that a later run would take for the release.
    staging = Path(tempfile.mkdtemp(prefix=f"vllm-{version}-", dir=CACHE))
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
        for m in members:
            m.name = m.name[len(f"vllm-{version}/"):]
        tar.extractall(staging, members=members, filter="data")
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return root / "vllm"


class SourceTree:
    """Static look-ups in one vLLM source tree."""

    def __init__(self, vllm_dir: Path) -> None:
        self.root = vllm_dir.parent

    def module_file(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.exists():
                return path
        return None

    @functools.cache  # noqa: B019 - one tree per test session
    def _module_ast(self, module: str) -> ast.Module | None:
        path = self.module_file(module)
        return None if path is None else ast.parse(path.read_text(encoding="utf-8"))

    def top_level(self, module: str) -> dict[str, ast.AST]:
        """Names a module defines or imports at top level (also inside if/try blocks)."""
        tree = self._module_ast(module)
        names: dict[str, ast.AST] = {}
        if tree is None:
            return names
        stack = list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                names[node.name] = node
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    for t in ast.walk(target):
                        if isinstance(t, ast.Name):
                            names[t.id] = node
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names[node.target.id] = node
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    names[(alias.asname or alias.name).split(".")[0]] = node
            elif isinstance(node, (ast.If, ast.Try)):
                stack.extend(node.body)
                stack.extend(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    stack.extend(handler.body)
                stack.extend(getattr(node, "finalbody", []))
        return names

    def has_module_or_name(self, module: str, name: str) -> bool:
        """``from module import name`` would work: a top-level name or a submodule."""
        if self.module_file(module) is None:
            return False
        return name in self.top_level(module) or self.module_file(f"{module}.{name}") is not None

    def _class(self, module: str, name: str, depth: int = 0) -> tuple[str, ast.ClassDef] | None:
        node = self.top_level(module).get(name)
        if isinstance(node, ast.ClassDef):
            return module, node
        if isinstance(node, ast.ImportFrom) and depth < 8:
            source = _absolute(module, node, self.module_file(module))
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return self._class(source, alias.name, depth + 1)
        return None

    def class_has(self, module: str, class_name: str, attr: str, depth: int = 0) -> bool:
        """``attr`` is defined in the class body, assigned as ``self.attr`` in it, or found the
        same way in a base class (bases followed through the modules' imports)."""
        found = self._class(module, class_name)
        if found is None or depth > 8:
            return False
        where, node = found
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    and item.name == attr:
                return True
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) \
                    and item.target.id == attr:
                return True
            if isinstance(item, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == attr for t in item.targets):
                return True
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and sub.attr == attr and isinstance(sub.ctx, ast.Store) \
                    and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                return True
        for base in node.bases:
            if isinstance(base, ast.Name) and self.class_has(where, base.id, attr, depth + 1):
                return True
            if isinstance(base, ast.Subscript) and isinstance(base.value, ast.Name) \
                    and self.class_has(where, base.value.id, attr, depth + 1):
                return True
        return False

    def resolves(self, module: str, path: str) -> bool:
        """``module:Name`` or ``module:Class.attr`` (deeper paths: their first two parts)."""
        parts = path.split(".")
        if not self.has_module_or_name(module, parts[0]):
            return False
        if len(parts) == 1:
            return True
        if self._class(module, parts[0]) is None:  # a module-level object's attribute
            return True
        return self.class_has(module, parts[0], parts[1])


def _absolute(module: str, node: ast.ImportFrom, path: Path | None) -> str:
    if not node.level:
        return node.module or ""
    package = module if path is not None and path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        package = package.rsplit(".", 1)[0]
    return f"{package}.{node.module}" if node.module else package
