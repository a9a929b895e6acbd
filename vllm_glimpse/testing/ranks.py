"""What each tensor-parallel rank decided, for tests (``LLM.collective_rpc`` callables).

Each worker process of a tensor-parallel engine runs its own copy of the model and makes its
own GlimpsePrune keep decision; only the first rank's result reaches the scheduler. To check
that every rank kept the same rows, tests install a recorder on every worker::

    llm.collective_rpc(record_keep_decisions)
    ... generate ...
    per_rank = llm.collective_rpc(recorded_keep_decisions)  # one dict per rank

The functions run in the worker (``self`` is the worker); they live in an importable module so
that vLLM can send them to worker processes.
"""

from __future__ import annotations

_LOG = "_vllm_glimpse_keep_log"


def record_keep_decisions(worker) -> int:
    """Wrap the worker's model forward to log ``{request id: [kept rows, ...]}`` (one entry per
    prune: a preempted request is pruned again when recomputed). Returns the worker's rank."""
    model = worker.model_runner.get_model()
    if _LOG not in model.__dict__:
        model.__dict__[_LOG] = {}
        inner = model.forward

        def forward(*args, **kwargs):
            plan = model.glimpse_plan
            out = inner(*args, **kwargs)
            if plan is not None:
                for req_id, result in plan.results.items():
                    model.__dict__[_LOG].setdefault(req_id, []).append(result.kept_rows.tolist())
            return out

        model.forward = forward
    return worker.rank


def recorded_keep_decisions(worker) -> tuple[int, dict[str, list[list[int]]]]:
    """(rank, the log since :func:`record_keep_decisions`), and clears the log."""
    model = worker.model_runner.get_model()
    log = dict(model.__dict__.get(_LOG, {}))
    model.__dict__.get(_LOG, {}).clear()
    return worker.rank, log
