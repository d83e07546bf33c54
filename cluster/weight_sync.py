"""Weight sync: the learner's new weights into every vLLM engine, by one of two transports
(``rollout.weight_transport``).

Both ship the same thing: the parameters the engines store (Hugging Face names, LoRA merged, tied aliases left
out), in the engines' dtype, packed into buckets of ``rollout.weight_bucket_mb`` (``policies/weight_buckets.py``),
taken straight from learner 0's torch module (``TokenPolicyLearner.weight_buckets``). The driver only orchestrates
versions; the bytes never pass through it. Each engine checks the names against its checkpoint's before it
touches the engine, and loads bucket by bucket through vLLM's lazy ``reload_weights(weights_iterator=...)``.

- ``object_store``: learner 0 puts one Ray object per bucket from its own process and hands back only the
  ObjectRefs; each engine fetches bucket k + 1 while it loads bucket k. Engines on one node map the node's single
  copy (Ray's object store is per node). The refs of the last push are what a restarted engine is given back.
- ``collective``: a ``torch.distributed`` broadcast from learner 0 (rank 0: the driver when
  ``cluster.num_learners`` is 0, else learner 0's actor) to the engines (ranks 1..N), in a process group of its own
  built at the trainer's start (vLLM's in-process engine already owns the actor's default group): gloo over a
  ``TCPStore`` on CPU, NCCL through vLLM's ``StatelessProcessGroup`` + ``PyNcclCommunicator`` when the learners and
  the engines have GPUs. Per sync: the bucket layouts (names, shapes, dtype) first, then one flat buffer per bucket,
  the next one in flight while the engine loads the last. The engines' side is :class:`WeightReceiverExtension`, a
  vLLM worker extension reached with ``llm.collective_rpc``. A restarted engine has left the group: it gets the
  current weights by an object-store push from learner 0, and the group is rebuilt for everyone before the next
  broadcast; an engine lost during a broadcast makes that sync an object-store push for all (the same restart
  handling as every other call), and the group is rebuilt too.

With ``rollout.lora_weights: adapters`` (:class:`AdapterSync`, over the object store) only the LoRA adapters travel,
in one bucket layout like the weights': each engine was built with vLLM's LoRA support and holds the checkpoint's
base weights from its start (never resent); it writes the adapters as a peft adapter directory and serves every
request with them, as a new LoRA each version (the last one removed).

Every wait has a deadline (``cluster.actor_timeout_s``, also the process group's timeout).
"""

from __future__ import annotations

import pickle
import socket
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Iterator

import torch

from cluster.supervision import ActorTimeoutError
from policies.weight_buckets import BucketLayout, unpack_bucket

if TYPE_CHECKING:
    from cluster.config import ExperimentConfig
    from cluster.rollout import RolloutGroup

EXTENSION = "cluster.weight_sync.WeightReceiverExtension"  # LLM(worker_extension_cls=...) of every rollout actor


class WeightGroupBroken(RuntimeError):
    """A broadcast did not reach every engine (one was lost, or the group failed): the sync falls back to the
    object store and the group is rebuilt before the next one."""


# ------------------------------------------------------------------------------------------------ driver side
class WeightSync:
    """The driver's side of a transport: :meth:`push` brings every engine to ``version``; ``bytes_per_engine`` is
    what the last push moved to each engine."""

    adapters = False  # what learner 0 publishes: whole merged weights, or only the LoRA adapters (AdapterSync)

    def __init__(self, learners: Any, rollouts: RolloutGroup, dtype: str, bucket_bytes: int, timeout_s: float) -> None:
        self.learners, self.rollouts = learners, rollouts
        self.dtype, self.bucket_bytes, self.timeout_s = dtype, bucket_bytes, timeout_s
        self.bytes_per_engine = self.num_buckets = 0  # of the last push

    def push(self, version: int) -> None:
        """Every engine holds learner 0's current weights as ``version`` (or the call raises)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Release what the transport holds (the broadcast group); the engines and learners stay."""

    def publish(self) -> tuple[list[BucketLayout], list[Any]]:
        """Learner 0's buckets put into the object store from its own process: layouts and ObjectRefs."""
        dtype, size, adapters = self.dtype, self.bucket_bytes, self.adapters
        results = on_learners(self.learners, lambda learner: learner.put_weight_buckets(dtype, size, adapters),
                              self.timeout_s)
        layouts, refs = next(r for r in results if r is not None)
        self.bytes_per_engine, self.num_buckets = sum(layout.nbytes for layout in layouts), len(layouts)
        return layouts, refs


class ObjectStoreSync(WeightSync):
    """``rollout.weight_transport: object_store``: learner 0 puts the buckets, every engine fetches them."""

    def push(self, version: int) -> None:
        layouts, refs = self.publish()
        self.rollouts.load_buckets(layouts, refs, version)


class AdapterSync(WeightSync):
    """``rollout.lora_weights: adapters``: learner 0 puts only the LoRA adapters, every engine fetches them and
    serves them with vLLM's LoRA on top of its base weights (``VLLMRolloutActor.load_adapters``)."""

    adapters = True

    def push(self, version: int) -> None:
        layouts, refs = self.publish()
        self.rollouts.load_adapters(layouts, refs, version)


class CollectiveSync(WeightSync):
    """``rollout.weight_transport: collective``: a broadcast from learner 0 into every engine's worker extension."""

    def __init__(self, learners: Any, rollouts: RolloutGroup, dtype: str, bucket_bytes: int, timeout_s: float,
                 backend: str = "gloo") -> None:
        super().__init__(learners, rollouts, dtype, bucket_bytes, timeout_s)
        self.backend, self.key = backend, f"tokengym-weights-{uuid.uuid4().hex[:8]}"
        self.connected = False
        self.connect()

    def connect(self) -> None:
        """(Re)build the group: learner 0 listens, every engine joins as rank i + 1 (dropping any group it was in),
        then learner 0 joins."""
        key, world, timeout, backend = self.key, len(self.rollouts.actors) + 1, self.timeout_s, self.backend
        host, port = next(r for r in on_learners(
            self.learners, lambda learner: sender_listen(learner, key, world, timeout, backend), timeout) if r)
        refs = [a.join_weight_group.remote(host, port, i + 1, world, timeout, backend)
                for i, a in enumerate(self.rollouts.actors)]
        on_learners(self.learners, lambda learner: sender_join(learner, key), timeout)
        self.rollouts.pool.call("join weight group", lambda i, a: refs[i])
        self.connected = True

    def push(self, version: int) -> None:
        if not self.connected:  # an engine restarted since the last broadcast: everyone joins a new group
            self.connect()
        key, dtype, size, timeout = self.key, self.dtype, self.bucket_bytes, self.timeout_s
        try:
            sent = self.rollouts.broadcast_weights(
                version, lambda: on_learners(self.learners, lambda learner: sender_broadcast(learner, key, dtype, size),
                                             timeout),
                resend=self._resend,
            )
            self.bytes_per_engine, self.num_buckets = next(n for n in sent if n is not None)
        except WeightGroupBroken:
            self.connected = False
            self.rollouts.load_buckets(*self.publish(), version)

    def _resend(self, actor: Any, version: int) -> Any:
        """A restarted engine is out of the group: the current weights by the object store, and a new group before
        the next broadcast."""
        self.connected = False
        layouts, refs = self.publish()
        return actor.load_buckets.remote(layouts, refs, version)

    def shutdown(self) -> None:
        """Close learner 0's end when it lives in the driver; a learner actor's and the engines' ends go with their
        processes (shutdown also runs after failures, when those may be gone)."""
        if self.learners.is_local:
            key = self.key
            on_learners(self.learners, lambda learner: sender_close(learner, key), self.timeout_s)
        self.connected = False


def make_weight_sync(cfg: ExperimentConfig, learners: Any, rollouts: RolloutGroup) -> WeightSync:
    """The run's transport (``rollout.weight_transport``), connected."""
    args = (learners, rollouts, cfg.rollout.dtype, cfg.rollout.weight_bucket_mb << 20, cfg.cluster.actor_timeout_s)
    if cfg.rollout.lora_weights == "adapters":  # the config checked policy.lora_rank > 0 and object_store
        return AdapterSync(*args)
    if cfg.rollout.weight_transport == "object_store":
        return ObjectStoreSync(*args)
    gpus = cfg.cluster.num_learners > 0 and cfg.cluster.num_gpus_per_learner > 0 and cfg.rollout.num_gpus_per_actor > 0
    return CollectiveSync(*args, backend="nccl" if gpus else "gloo")


def on_learners(learners: Any, fn: Any, timeout_s: float) -> list[Any]:
    """``fn(learner)`` on every learner (the driver's own when local), their values; a learner's exception raised."""
    from cluster.rollout import unwrap_ray_errors
    from policies.learner import learner_results  # RLlib: imported where learners exist, not in every engine

    kwargs = {} if learners.is_local else {"timeout_seconds": timeout_s}
    results = unwrap_ray_errors(lambda: learner_results(learners.foreach_learner(fn, **kwargs)), where="learner")
    if not learners.is_local and len(results) < len(learners):
        raise ActorTimeoutError(f"learner did not finish a weight sync call within {timeout_s:g} s "
                                "(cluster.actor_timeout_s)")
    return results


# ------------------------------------------------------------------------------------------------ the group
class BroadcastGroup:
    """A process group of its own between learner 0 (rank 0) and the engines: ``broadcast`` from rank 0, async."""

    device = "cpu"

    def broadcast(self, tensor: torch.Tensor) -> Any:
        raise NotImplementedError

    def send_object(self, obj: Any) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(self.device)
        self.broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=self.device)).wait()
        self.broadcast(data).wait()

    def receive_object(self) -> Any:
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.broadcast(size).wait()
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        self.broadcast(data).wait()
        return pickle.loads(data.cpu().numpy().tobytes())


class GlooGroup(BroadcastGroup):
    """gloo over a ``TCPStore`` whose server runs in rank 0, on CPU. Built directly, not with
    ``init_process_group``: the engine's process already has vLLM's default group."""

    def __init__(self, store: Any, rank: int, world_size: int, timeout_s: float) -> None:
        import torch.distributed as dist

        self.store = store  # kept: the server of rank 0 lives in this object
        self.pg = dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))

    @staticmethod
    def listen(world_size: int, timeout_s: float) -> Any:
        import torch.distributed as dist

        return dist.TCPStore("0.0.0.0", 0, world_size, True, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)

    @staticmethod
    def connect(host: str, port: int, world_size: int, timeout_s: float) -> Any:
        import torch.distributed as dist

        return dist.TCPStore(host, port, world_size, False, timeout=timedelta(seconds=timeout_s))

    def broadcast(self, tensor: torch.Tensor) -> Any:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        return self.pg.broadcast([tensor], opts)


class NcclGroup(BroadcastGroup):
    """NCCL on the current CUDA device, the way vLLM's own RLHF examples build it: ``StatelessProcessGroup`` (a
    TCP store, no global state) + ``PyNcclCommunicator``. Its broadcasts are stream-ordered: done on return."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float,
                 listen_socket: socket.socket | None = None) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        self.device = f"cuda:{torch.cuda.current_device()}"
        pg = StatelessProcessGroup.create(host, port, rank, world_size, store_timeout=int(timeout_s),
                                          listen_socket=listen_socket)
        self.comm = PyNcclCommunicator(pg, device=self.device)

    def broadcast(self, tensor: torch.Tensor) -> Any:
        self.comm.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
        return _Done()


class _Done:
    def wait(self) -> None:
        torch.cuda.current_stream().synchronize()


# ------------------------------------------------------------------------------------------------ learner 0's side
_SENDERS: dict[str, dict[str, Any]] = {}  # per process: the groups whose rank 0 lives here, by CollectiveSync.key


def sender_listen(learner: Any, key: str, world_size: int, timeout_s: float, backend: str) -> tuple[str, int] | None:
    """Learner 0 opens the group's rendezvous (others: None), replacing the group it had under ``key``; its address
    for the engines."""
    import ray

    if learner._learner_index != 0:
        return None
    host = ray.util.get_node_ip_address()
    if backend == "gloo":
        store = GlooGroup.listen(world_size, timeout_s)
        _SENDERS[key] = {"backend": backend, "store": store, "world": world_size, "timeout": timeout_s}
        return host, store.port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # a free port, held until the store takes it over
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("", 0))
    sock.listen()
    port = sock.getsockname()[1]
    _SENDERS[key] = {"backend": backend, "host": host, "port": port, "sock": sock, "world": world_size,
                     "timeout": timeout_s}
    return host, port


def sender_join(learner: Any, key: str) -> None:
    """Learner 0 joins as rank 0 (returns once every engine has joined)."""
    if learner._learner_index != 0:
        return
    s = _SENDERS[key]
    if s["backend"] == "gloo":
        s["group"] = GlooGroup(s["store"], 0, s["world"], s["timeout"])
    else:
        s["group"] = NcclGroup(s["host"], s["port"], 0, s["world"], s["timeout"], s["sock"])


def sender_broadcast(learner: Any, key: str, dtype: str, bucket_bytes: int) -> tuple[int, int] | None:
    """Learner 0 broadcasts its weights: the layouts, then each bucket (the next packed while the last is sent);
    returns the bytes each engine received and the number of buckets."""
    if learner._learner_index != 0:
        return None
    group: BroadcastGroup = _SENDERS[key]["group"]
    layouts, buckets = learner.weight_buckets(dtype, bucket_bytes, group.device)
    group.send_object(layouts)
    in_flight = None
    for bucket in buckets:
        work = group.broadcast(bucket)
        if in_flight is not None:
            in_flight.wait()
        in_flight = work
    if in_flight is not None:
        in_flight.wait()
    return sum(layout.nbytes for layout in layouts), len(layouts)


def sender_close(learner: Any, key: str) -> None:
    """Learner 0's end of the group closes (its store's server with it)."""
    _SENDERS.pop(key, None)


# ------------------------------------------------------------------------------------------------ the engines' side
class WeightReceiverExtension:
    """Mixed into every vLLM worker of a rollout actor (``LLM(worker_extension_cls=EXTENSION)``); the actor calls
    these with ``llm.collective_rpc(name, args=...)``. ``self`` is the vLLM worker (its ``reload_weights``)."""

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, timeout_s: float,
                          backend: str) -> None:
        """Join rank 0's group (a rebuilt one replaces the last)."""
        if backend == "gloo":
            self.weight_group = GlooGroup(GlooGroup.connect(host, port, world_size, timeout_s), rank, world_size,
                                          timeout_s)
        else:
            self.weight_group = NcclGroup(host, port, rank, world_size, timeout_s)

    def receive_weight_layouts(self) -> list[BucketLayout]:
        """The layouts rank 0 broadcasts first: the names are checked before any weight is loaded."""
        return self.weight_group.receive_object()

    def load_broadcast_weights(self, layouts: list[BucketLayout]) -> None:
        """Receive every bucket into the engine through ``reload_weights`` (lazy: bucket k + 1 arrives while bucket
        k is loaded)."""
        self.reload_weights(weights_iterator=received_weights(self.weight_group, layouts))

    def drain_broadcast_weights(self, layouts: list[BucketLayout]) -> None:
        """Receive and drop every bucket (refused names): rank 0 is not left waiting."""
        for _ in received_weights(self.weight_group, layouts):
            pass


def received_weights(group: BroadcastGroup, layouts: list[BucketLayout]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of each bucket as it arrives, with the next bucket's receive already posted."""
    buffers = [torch.empty(layouts[0].nbytes, dtype=torch.uint8, device=group.device)] if layouts else []
    pending = [group.broadcast(buffers[0])] if layouts else []
    for k, layout in enumerate(layouts):
        if k + 1 < len(layouts):
            buffers.append(torch.empty(layouts[k + 1].nbytes, dtype=torch.uint8, device=group.device))
            pending.append(group.broadcast(buffers[k + 1]))
        pending[k].wait()
        yield from unpack_bucket(layout, buffers[k])
        buffers[k] = pending[k] = None  # bounded memory: at most two buckets held


def fetched_weights(layouts: list[BucketLayout], refs: list[Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of object-store buckets, fetching bucket k + 1 to this node while bucket k is loaded.
    A bucket is the object store's read-only memory, viewed in place (no copy: ``reload_weights`` only reads)."""
    import warnings

    import ray

    for k, (layout, ref) in enumerate(zip(layouts, refs)):
        if k + 1 < len(refs):
            ray.wait([refs[k + 1]], timeout=0, fetch_local=True)  # starts the transfer, returns at once
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = torch.from_numpy(ray.get(ref))
        yield from unpack_bucket(layout, raw)
