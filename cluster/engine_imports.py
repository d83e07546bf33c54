"""A rollout actor's imports (torch, transformers, vLLM: ~6 s of one core), made in a Ray worker before it becomes
the actor. The local Ray that ``cluster.run.init_ray`` starts for a run whose workers are all rollout actors with CPU
engines (``cluster.run.preloads_engine_imports``) has every Python worker import this module before it takes work,
and starts one worker per rollout actor as soon as the driver connects: the imports run while the driver is still
preparing the run (its own imports, the policy), and the actor finds them done (its ``startup/actor_import_s``: 0).
Where the import fails, Ray logs it in the worker's log and the actor imports again, raising what it raises."""

import os

from cluster.console import collector_paused, freeze_heap

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as VLLMRolloutActor sets it before its import
with collector_paused():  # as in VLLMRolloutActor.__init__
    import cluster.rollout  # noqa: F401
    from vllm import LLM, SamplingParams  # noqa: F401
    from vllm.platforms import current_platform  # noqa: F401
freeze_heap()
