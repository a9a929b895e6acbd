"""GlimpsePrune inside the vLLM engine (vLLM 0.32-0.34; Model Runner V2, and the V1 runner where
vLLM picks it).

One file per job:

* :mod:`.plan` — what the runner tells the model about a step (which requests prune, where their
  images and glimpse token sit in the batch) and what the model answers (who survived).
* :mod:`vllm_glimpse.models.glimpse_lm` — the model side: the glimpse token, layers 0..K, the
  keep decision at layer K, the survivors through layers K+1.. (where the keep decision is made).
* :mod:`.prune_step` — the keep decision for every request of the step at once (one VIP call,
  the keep rule and compaction indices for all requests, one host synchronisation).
* :mod:`.kv` — where KV is moved: the survivors' K/V of layers 0..K, read back from the paged
  cache, into compacted cache slots.
* :mod:`.model_states` — the worker side on Model Runner V2 (where the worker learns a pruned
  request's new length): plans the step, rebuilds attention metadata mid-forward, shrinks the
  request's device state after the step; :mod:`.runner_v2` — the two MRv2 runner overrides (stats
  on the output, the profiling reservation), mixed in by :mod:`.gpu_runner_v2` / :mod:`.cpu_runner_v2`.
* :mod:`.runner` — the same worker side on the V1 runner; platform-neutral, mixed into vLLM's V1
  runner by :mod:`.gpu_runner` and :mod:`.cpu_runner`.
* :mod:`.scheduler` — the scheduler side: learns each pruned request's new length, frees the tail
  KV blocks, recomputes a preempted pruned request from its original prompt.
* :mod:`.gpu_worker`, :mod:`.cpu_worker` — the workers that build our runner. Modules with
  ``cpu`` in their name import vLLM's CPU worker code and are loaded only on the CPU platform.
* :mod:`.engine_config` — the engine settings GlimpsePrune needs, applied when it is on.
"""
