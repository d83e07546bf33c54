"""Placement: the run's Ray placement group, built once from the config and handed to whoever starts actors.

One placement group reserves every actor's resources at once, so a run on a shared cluster either gets all it needs
or waits for it (up to ``cluster.actor_timeout_s``, then a one-line error saying what is missing), instead of
starting some engines and leaving the rest pending; and its resources stay reserved for the whole run, also while a
lost actor restarts. The group belongs to the driver's job: Ray frees it when the driver exits, however it exits.

Its bundles (:func:`plan_placement`, pure and unit-tested without Ray):

- ``disaggregated`` (default): a bundle per rollout engine, one per learner actor, one for the reward model;
- ``colocated``: one bundle per learner holding that learner and its share of the engines (on one node, sharing its
  GPUs with fractional GPU amounts), and one for the reward model.

Each bundle holds its members' CPUs, GPUs and custom resources (``rollout.resources``,
``cluster.learner_resources``, ``reward_model.resources``): a member with a custom resource can only be placed on a
node started with it, which is how engines and learners are pinned to node pools. ``cluster.placement_strategy``
(PACK, SPREAD, STRICT_PACK, STRICT_SPREAD) lays the bundles over the nodes.

Engines and the reward model are started in their own bundle (``PlacementGroupSchedulingStrategy(group, index)``;
Ray restarts a lost actor with the same strategy, so it comes back there). RLlib's ``LearnerGroup`` takes the group
but places each learner in any bundle with room (it gives no bundle index), so the trainer starts the engines and the
reward model first: what is left free is then exactly one learner's share in each learner bundle. RLlib removes the
group it was given when its learners shut down; :meth:`Placement.remove` after that is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from cluster.config import ExperimentConfig
from cluster.supervision import ClusterError

Resources = dict[str, float]


class PlacementError(ClusterError):
    """The run's placement group could not be placed in time; the message says what is missing."""


@dataclass(frozen=True)
class Bundle:
    """One bundle of the group: who goes in it, and the resources it reserves (the sum of theirs)."""

    members: tuple[str, ...]  # e.g. ("learner 0", "rollout actor 0", "rollout actor 1")
    resources: Resources


@dataclass(frozen=True)
class PlacementPlan:
    """The bundles of a run's placement group, and which bundle each actor goes to."""

    bundles: tuple[Bundle, ...]
    strategy: str
    engine: Resources  # what one rollout actor asks Ray for
    learner: Resources  # what one learner actor asks Ray for (RLlib's rule: 1 CPU without a GPU, none with one)
    reward_model: Resources  # what the reward-model actor asks Ray for
    engine_bundles: tuple[int, ...]  # rollout actor i goes to bundle engine_bundles[i]
    reward_model_bundle: int | None  # None: no reward model

    def total(self) -> Resources:
        """Every bundle's resources added up: what the run reserves."""
        return add(*(b.resources for b in self.bundles))

    def describe(self, index: int) -> str:
        """Bundle ``index`` for messages: "learner 0 + rollout actors 0-1 {CPU: 3, GPU: 1}"."""
        bundle = self.bundles[index]
        return f"{' + '.join(bundle.members)} {format_resources(bundle.resources)}"

    def summary(self) -> str:
        """The plan as YAML comment lines (``tokengym train --dry-run`` prints them under the config)."""
        lines = [f"# the run's placement group ({self.strategy}), reserved on Ray before any actor starts:"]
        lines += [f"#   bundle {i}: {self.describe(i)}" for i in range(len(self.bundles))]
        return "\n".join(lines)


def add(*parts: Mapping[str, float], times: Sequence[int] | None = None) -> Resources:
    """The sum of resource dicts (``times[i]`` copies of ``parts[i]``), zero amounts left out (Ray rejects none, but
    a bundle of only zeros is invalid, and zeros only clutter messages)."""
    out: Resources = {"CPU": 0.0, "GPU": 0.0}  # first in messages
    for part, n in zip(parts, times if times is not None else [1] * len(parts)):
        for name, amount in part.items():
            out[name] = out.get(name, 0.0) + n * float(amount)
    return {name: amount for name, amount in out.items() if amount > 0}


def format_resources(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in resources.items()) + "}"


def plan_placement(cfg: ExperimentConfig, learners: bool = True) -> PlacementPlan:
    """The bundles of ``cfg``'s run (``learners=False``: engines and reward model only, e.g. ``tokengym eval``).

    A learner in the driver's process (``cluster.num_learners=0``) has no bundle: the driver is not a Ray actor.
    """
    r, c, rm = cfg.rollout, cfg.cluster, cfg.reward_model
    engine = add({"CPU": r.num_cpus_per_actor, "GPU": r.num_gpus_per_actor}, r.resources)
    learner = add({"CPU": 1 if c.num_gpus_per_learner == 0 else 0, "GPU": c.num_gpus_per_learner},
                  c.learner_resources)
    scorer = add({"CPU": 1, "GPU": rm.num_gpus}, rm.resources)
    num_learners = c.num_learners if learners else 0
    bundles: list[Bundle] = []
    if c.placement == "colocated" and num_learners > 0:
        per = r.num_actors // num_learners  # the config checks that it divides
        for k in range(num_learners):
            engines = f"rollout actor {k * per}" if per == 1 else f"rollout actors {k * per}-{(k + 1) * per - 1}"
            bundles.append(Bundle((f"learner {k}", engines), add(learner, engine, times=[1, per])))
        engine_bundles = tuple(i // per for i in range(r.num_actors))
    else:
        bundles += [Bundle((f"rollout actor {i}",), engine) for i in range(r.num_actors)]
        engine_bundles = tuple(range(r.num_actors))
        bundles += [Bundle((f"learner {k}",), learner) for k in range(num_learners)]
    reward_model_bundle = None
    if rm.path is not None:
        reward_model_bundle = len(bundles)
        bundles.append(Bundle(("reward model",), scorer))
    return PlacementPlan(tuple(bundles), c.placement_strategy, engine, learner, scorer, engine_bundles,
                         reward_model_bundle)


def unplaced_reason(plan: PlacementPlan, nodes: Sequence[Mapping[str, float]], available: Mapping[str, float]) -> str:
    """Why ``plan`` is not placed, given each alive node's total resources and what the cluster has free now."""
    for i, bundle in enumerate(plan.bundles):
        if not any(fits(bundle.resources, node) for node in nodes):
            lacking = [name for name in bundle.resources if not any(node.get(name, 0) > 0 for node in nodes)]
            why = (f"no node has {', '.join(lacking)} (start one with ray start --resources)" if lacking else
                   "no node is that large")
            return f"{plan.describe(i)} fits on no node: {why}"
    need = plan.total()
    offered = add(*nodes)
    short = {name: amount for name, amount in need.items() if offered.get(name, 0) < amount}
    if short:
        has = ", ".join(f"{name} {offered.get(name, 0):g} of {amount:g}" for name, amount in short.items())
        return f"the cluster is too small: it has {has} needed"
    if plan.strategy == "STRICT_PACK" and not any(fits(need, node) for node in nodes):
        return f"STRICT_PACK needs one node with {format_resources(need)}; none is that large"
    if plan.strategy == "STRICT_SPREAD" and len(nodes) < len(plan.bundles):
        return f"STRICT_SPREAD needs {len(plan.bundles)} nodes, one per bundle; the cluster has {len(nodes)}"
    busy = {name: amount for name, amount in need.items() if available.get(name, 0) < amount}
    if busy:
        free = ", ".join(f"{name} {available.get(name, 0):g} of {amount:g}" for name, amount in busy.items())
        return f"other work holds the resources: free now {free} needed"
    return f"the free resources are spread over nodes so that no {plan.strategy} layout fits"


def fits(need: Mapping[str, float], node: Mapping[str, float]) -> bool:
    return all(node.get(name, 0) >= amount for name, amount in need.items())


class Placement:
    """The run's placement group on Ray, placed (or a :class:`PlacementError`), and each actor's Ray options in it."""

    def __init__(self, plan: PlacementPlan, timeout_s: float, name: str = "") -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.plan = plan
        # Named, so that `ray list placement-groups` on a shared cluster says whose it is.
        self.group = placement_group([dict(b.resources) for b in plan.bundles], strategy=plan.strategy, name=name)
        try:
            ray.get(self.group.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.remove()
            nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n["Alive"]]
            raise PlacementError(
                f"the run's placement group ({len(plan.bundles)} bundles, {plan.strategy}) was not placed within "
                f"{timeout_s:g} s (cluster.actor_timeout_s): {unplaced_reason(plan, nodes, ray.available_resources())}"
            ) from None

    def engine_options(self, index: int) -> dict[str, Any]:
        """``ray.remote`` options of rollout actor ``index``: its resources, in its bundle."""
        return self._options(self.plan.engine, self.plan.engine_bundles[index])

    def reward_model_options(self) -> dict[str, Any]:
        return self._options(self.plan.reward_model, self.plan.reward_model_bundle)

    def _options(self, resources: Resources, bundle: int | None) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
        return {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0), "resources": custom,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle)}

    def remove(self) -> None:
        """Free the group (its actors end with it); removing a group already removed does nothing."""
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.group)
