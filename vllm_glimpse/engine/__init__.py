"""GlimpsePrune inside the vLLM engine (vLLM 0.32, V1 model runner).

One file per job:

* :mod:`.plan` — what the runner tells the model about a step (which requests prune, where their
  images and glimpse token sit in the batch) and what the model answers (who survived).
* :mod:`vllm_glimpse.models.glimpse_lm` — the model side: the glimpse token, layers 0..K, the
  keep decision at layer K, the survivors through layers K+1.. (where the keep decision is made).
* :mod:`.kv` — moving the survivors' K/V of layers 0..K into compacted cache slots.
* :mod:`.runner` — the worker side: builds the plan, rebuilds attention metadata mid-forward,
  shrinks the request's state after the step (prompt, block table, positions).
* :mod:`.scheduler` — the scheduler side: learns each pruned request's new length, frees the tail
  KV blocks, recomputes a preempted pruned request from its original prompt.
* :mod:`.worker` — the CPU / GPU workers that build our runner.
* :mod:`.engine_config` — the engine settings GlimpsePrune needs, applied when it is on.
"""
