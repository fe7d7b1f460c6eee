"""Live weight sync from a megatron-core model into running vLLM engines (the RL loop: vLLM generates, Megatron trains).

    from mcore_transformers.vllm import WORKER_EXTENSION, update_weights
    llm = LLM(folder, worker_extension_cls=WORKER_EXTENSION) if rank == 0 else None   # an engine on the sender
    ...train...
    report = update_weights(model, llm)          # collective over the model's ranks; the engine keeps serving

`update_weights` streams exactly what `save_pretrained` writes (HF names and layouts, vocabulary padding cut,
experts per expert), gathered over tp / pp / ep by the ranks that hold them, to global rank 0, which hands them to
vLLM's own in-place reload (`Worker.reload_weights`: each layer restored to its checkpoint layout, loaded with the
model's `load_weights`, then re-processed for vLLM's kernels). How the bytes travel:

- "group" (the engine's workers run in their own processes, vLLM's default): a torch.distributed group between the
  sender and the engine's workers (gloo on CPU, nccl on GPU), created once per engine. The tensors are packed into
  flat buckets of `bucket_bytes`; each bucket is one broadcast, and vLLM's `collective_rpc` carries only the plan.
  At most two buckets are in flight on either side.
- "direct" (the worker runs in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0 and a "uni" executor): the tensors
  are handed over by reference, one at a time, as they are gathered.
- `RemoteEngine(host, port)`: an engine that another process drives. That process calls
  `serve_weight_updates(llm, host, port)` between its generation batches; the sender announces each update on a
  TCP store and broadcasts the buckets into the same kind of group.

Before the first byte is applied the engine checks the plan (names and shapes) against the checkpoint it was
started from; a mismatch raises on every rank of the model and the engine keeps its weights. vLLM is an optional
dependency, imported only here and only where an engine lives.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from .conversion.exporter import iter_hf_tensors
from .errors import MCoreTransformersError
from .runtime.parallel import broadcast_from_rank0, is_rank0

WORKER_EXTENSION = "mcore_transformers.vllm.WeightReceiver"
ALIGN = 64  # byte alignment of each tensor inside a bucket (any dtype can be viewed at such an offset)
TIMEOUT = datetime.timedelta(minutes=10)


class WeightSyncError(MCoreTransformersError):
    """An update vLLM cannot take as given (another model, a name or shape the engine lacks, an engine on the wrong rank)."""


# ---- the plan: which tensors, in which bucket, at which byte offset -----------------------------------------
@dataclass(frozen=True)
class Bucket:
    nbytes: int
    items: tuple[tuple[str, tuple[int, ...], str, int], ...]  # (HF name, shape, dtype name, byte offset)


def plan_buckets(specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: Optional[int]) -> list[Bucket]:
    """Consecutive tensors packed into buckets of at most `bucket_bytes` (each tensor whole, offsets aligned);
    `bucket_bytes=None`: one bucket per tensor (one collective per tensor, what buckets are measured against)."""
    if bucket_bytes is None:
        return [bucket for spec in specs for bucket in plan_buckets([spec], _nbytes(spec[1], spec[2]))]
    buckets, items, used = [], [], 0
    for name, shape, dtype in specs:
        size = _nbytes(shape, dtype)
        if size > bucket_bytes:
            raise WeightSyncError(
                f"{name} holds {size / 2**20:.1f} MiB, more than bucket_bytes={bucket_bytes / 2**20:.1f} MiB: every "
                "tensor travels whole in one bucket. Pass a larger bucket_bytes (at least the largest tensor)."
            )
        start = -(-used // ALIGN) * ALIGN
        if items and start + size > bucket_bytes:
            buckets.append(Bucket(used, tuple(items)))
            items, start = [], 0
        items.append((name, tuple(shape), str(dtype).removeprefix("torch."), start))
        used = start + size
    if items:
        buckets.append(Bucket(used, tuple(items)))
    return buckets


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.tensor([], dtype=dtype).element_size()


def bucket_views(buffer: torch.Tensor, bucket: Bucket) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of `bucket` as views of its flat byte buffer."""
    for name, shape, dtype, offset in bucket.items:
        dtype = getattr(torch, dtype)
        yield name, buffer[offset : offset + _nbytes(shape, dtype)].view(dtype).view(shape)


def _as_json(buckets: list[Bucket]) -> list:
    return [[bucket.nbytes, [list(item[:1]) + [list(item[1])] + list(item[2:]) for item in bucket.items]] for bucket in buckets]


def _from_json(data: list) -> list[Bucket]:
    return [Bucket(nbytes, tuple((name, tuple(shape), dtype, offset) for name, shape, dtype, offset in items))
            for nbytes, items in data]


# ---- the engine side: mixed into vLLM's worker (worker_extension_cls=WORKER_EXTENSION) ----------------------
class WeightReceiver:
    """Methods vLLM adds to its worker class; called through `LLM.collective_rpc` by the sender or its host."""

    def mcore_check(self, specs: list, config: dict) -> dict:
        """Refuse (before any byte is applied) an update for another model: names and shapes are checked against
        the checkpoint the engine was started from, a few config sizes against the engine's config."""
        hf_config = self.model_runner.model_config.hf_config
        differing = {key: (value, getattr(hf_config, key, None)) for key, value in config.items()
                     if getattr(hf_config, key, value) != value}
        if differing:
            raise WeightSyncError(
                f"This vLLM engine serves another model: {', '.join(f'{k}={v[1]} (update: {v[0]})' for k, v in differing.items())}. "
                "Start the engine from the folder the model was loaded from (or saved to)."
            )
        served = _checkpoint_shapes(self.model_runner.model_config.model)
        unknown = [name for name, _, _ in specs if name not in served]
        wrong = [f"{name} {tuple(shape)} (engine: {served[name]})" for name, shape, _ in specs
                 if name in served and tuple(shape) != served[name]]
        if unknown or wrong:
            raise WeightSyncError(
                f"The update does not fit this vLLM engine: {len(unknown)} tensor(s) it does not have "
                f"({unknown[:4]}) and {len(wrong)} of another shape ({wrong[:4]}). Nothing was applied."
            )
        return {"tensors": len(specs)}

    def mcore_join(self, host: str, port: int, world_size: int, key: str) -> None:
        """Join the transport group of one sender (rank 0 of the group) as rank 1 + this worker's rank."""
        store = dist.PrefixStore(key, dist.TCPStore(host, port, world_size, is_master=False, timeout=TIMEOUT))
        self._mcore_group = _new_group(store, 1 + self.rank, world_size, self.device.type)

    def mcore_receive(self, plan: list) -> dict:
        """Receive the buckets of `plan` from the group and reload them into the model in place. Bucket k + 1 is
        received while bucket k is loaded; each bucket gets a fresh buffer (the loader may keep views of it)."""
        group, buckets = self._mcore_group, _from_json(plan)
        waited = {"transport": 0.0}

        def post(bucket: Bucket):
            buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
            return buffer, group.broadcast(buffer, 0)

        def tensors():
            pending = post(buckets[0]) if buckets else None
            for index, bucket in enumerate(buckets):
                buffer, work = pending
                start = time.perf_counter()
                work.wait()
                waited["transport"] += time.perf_counter() - start
                if index + 1 < len(buckets):
                    pending = post(buckets[index + 1])
                yield from bucket_views(buffer, bucket)

        start = time.perf_counter()
        self.reload_weights(weights_iterator=tensors())
        return {"bytes": sum(bucket.nbytes for bucket in buckets), "transport_s": waited["transport"],
                "load_weights_s": time.perf_counter() - start - waited["transport"]}

    def mcore_reload(self, tensors) -> dict:
        """The direct transport: `tensors` (an iterator of (HF name, tensor)) comes by reference, in this process."""
        start = time.perf_counter()
        self.reload_weights(weights_iterator=tensors)
        return {"load_weights_s": time.perf_counter() - start}


def _checkpoint_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download

        folder = snapshot_download(folder, local_files_only=True)
    shapes = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _new_group(store, rank: int, size: int, device_type: str):
    """A process group outside torch.distributed's default world (the trainer's world stays as it is)."""
    if device_type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, size)
    return dist.ProcessGroupGloo(store, rank, size, TIMEOUT)


# ---- the sender side -----------------------------------------------------------------------------------------
@dataclass
class SyncReport:
    """What one `update_weights` moved and where the time went (seconds per stage, measured on the sender)."""

    transport: str
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    seconds: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)  # the receiving side's own timings (load_weights, transport)

    @property
    def gbps(self) -> float:
        total = self.seconds.get("total", 0.0)
        return self.bytes / total / 1e9 if total else 0.0


@dataclass
class RemoteEngine:
    """A vLLM engine that another process drives (it calls `serve_weight_updates(llm, host, port)`)."""

    host: str = "127.0.0.1"
    port: int = 29622
    timeout: datetime.timedelta = TIMEOUT


class _Channel:
    """Sender's side of one engine: the TCP store, the group with the engine's workers, the update counter."""

    def __init__(self, host: str, port: int, engine_workers: Optional[int], timeout: datetime.timedelta):
        self.store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timeout)
        self.host, self.port, self.updates, self.group, self.workers = host, self.store.port, 0, None, engine_workers


_CHANNELS: dict[int, _Channel] = {}


def update_weights(model, engine, *, bucket_bytes: Optional[int] = 512 * 2**20, dtype: Optional[torch.dtype] = None,
                   transport: str = "auto") -> SyncReport:
    """Collective over every rank of `model`: push its current weights into `engine`, which keeps serving.

    `engine` is a `vllm.LLM` started with `worker_extension_cls=WORKER_EXTENSION`, or a `RemoteEngine`, on global
    rank 0, and None on every other rank (an in-process engine started without the extension, such as TRL's colocated
    one, is reached with plain functions through `collective_rpc`). `dtype` casts what is sent (e.g. bfloat16 for an
    engine serving bf16).
    `transport`: "auto" (direct when the engine's worker runs in this process, else "group"), "direct", "group".
    Returns a `SyncReport` (on rank 0; other ranks get one with their own gather time).
    """
    start = time.perf_counter()
    holds = [engine is not None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        holds = [None] * dist.get_world_size()
        dist.all_gather_object(holds, engine is not None)
    if not holds[0] or any(holds[1:]):
        raise WeightSyncError(
            "update_weights needs the engine on global rank 0 only (the rank that assembles the full tensors) and "
            f"None on the others; engines were passed on ranks {[r for r, h in enumerate(holds) if h]}."
        )
    plan = model.export_plan()
    specs = [(name, shape, dtype or sent) for name, shape, sent in exported_specs(model)]
    buckets = plan_buckets(specs, bucket_bytes)  # refuses a tensor larger than a bucket on every rank, first
    report = SyncReport(transport="", tensors=len(specs), bytes=sum(b.nbytes for b in buckets), buckets=len(buckets))
    if is_rank0():
        report.transport = _choose_transport(engine, transport)
    report.transport = broadcast_from_rank0(report.transport)
    _fail_everywhere(lambda: _check(engine, specs, model.config) if is_rank0() else None)

    stream = iter_hf_tensors(model._bound, model.shard_layout, plan, to="rank0")
    if report.transport == "direct":
        if is_rank0():
            report.engine = _call(engine, "mcore_reload", _cast(stream, dtype))[0]
        else:
            for _ in stream:
                pass
    else:
        _send_buckets(engine, stream, buckets, dtype, report)
    report.seconds["total"] = time.perf_counter() - start
    return report


def update_adapter(peft_model, engine, name: str = "default", lora_id: int = 1, folder: Optional[str] = None):
    """Collective: push the LoRA adapter `name` of a PEFT-wrapped megatron model into `engine` (rank 0; None
    elsewhere) and return the `LoRARequest` to generate with (rank 0; None elsewhere).

    vLLM 0.32 loads LoRA adapters from a folder only (`LoRARequest.lora_path`), so the adapter is written as an HF
    PEFT folder (`save_adapter`, HF module names, whole across tp / pp) and loaded with `load_inplace=True`, which
    replaces the engine's copy of that adapter between requests; the base weights are untouched. The folder
    (default: a temporary one that is kept for the engine) must be readable by the engine's processes.
    """
    import tempfile

    from .peft import save_adapter

    if (engine is not None) != is_rank0():
        raise WeightSyncError("update_adapter needs the engine on global rank 0 only, and None on the others.")
    if folder is None:
        folder = broadcast_from_rank0(tempfile.mkdtemp(prefix="mcore-adapter-") if is_rank0() else None)
    save_adapter(peft_model, folder, selected_adapters=[name])  # "default" into folder, another into folder/name
    request = None
    if is_rank0():
        from vllm.lora.request import LoRARequest

        path = folder if name == "default" else os.path.join(folder, name)
        request = LoRARequest(name, lora_id, path, load_inplace=True)
        engine.llm_engine.add_lora(request)
    return request


def _choose_transport(engine, wanted: str) -> str:
    if isinstance(engine, RemoteEngine):
        if wanted == "direct":
            raise WeightSyncError("A RemoteEngine runs in another process: transport='direct' cannot reach it.")
        return "group"
    # UniProcExecutor, or its subclass ExecutorWithExternalLauncher (TRL's colocated engine): the worker is in this process
    in_process = type(engine.llm_engine.engine_core).__name__ == "InprocClient" and any(
        cls.__name__ == "UniProcExecutor" for cls in type(engine.llm_engine.engine_core.engine_core.model_executor).__mro__
    )
    if wanted == "direct" and not in_process:
        raise WeightSyncError(
            "transport='direct' needs the engine's worker in this process: start it with "
            "VLLM_ENABLE_V1_MULTIPROCESSING=0 and distributed_executor_backend='uni', or use transport='group'."
        )
    return wanted if wanted != "auto" else ("direct" if in_process else "group")


def _check(engine, specs, config) -> None:
    sizes = {key: getattr(config, key) for key in ("vocab_size", "hidden_size", "num_hidden_layers", "model_type")
             if hasattr(config, key)}
    wire = [(name, list(shape), str(dtype)) for name, shape, dtype in specs]
    if isinstance(engine, RemoteEngine):
        channel = _channel(engine, None)
        channel.updates += 1
        key = f"mcore/update/{channel.updates}"
        channel.store.set(f"{key}/check", json.dumps({"specs": wire, "config": sizes}))
        answer = json.loads(channel.store.get(f"{key}/checked"))  # the host runs the engine's check
        if answer.get("error"):
            raise WeightSyncError(answer["error"])
        return
    _call(engine, "mcore_check", wire, sizes)


def _send_buckets(engine, stream, buckets: list[Bucket], dtype, report: SyncReport) -> None:
    """Rank 0 fills each bucket as its tensors arrive and broadcasts it to the engine's workers; the other ranks
    take part in the gathers (the stream's collectives) and send nothing themselves."""
    seconds = report.seconds
    seconds.update(gather=0.0, pack=0.0, transport=0.0)
    if not is_rank0():
        began = time.perf_counter()
        for _ in stream:
            pass
        seconds["gather"] = time.perf_counter() - began
        return
    channel = _channel(engine, None if isinstance(engine, RemoteEngine) else engine)
    receiving = _start_receiving(engine, channel, buckets)
    device = "cuda" if isinstance(channel.group, getattr(dist, "ProcessGroupNCCL", ())) else "cpu"
    largest = max(bucket.nbytes for bucket in buckets)
    buffers = [torch.empty(largest, dtype=torch.uint8, device=device) for _ in range(min(2, len(buckets)))]
    try:
        tensors, in_flight = iter(stream), None
        for index, bucket in enumerate(buckets):
            buffer = buffers[index % len(buffers)][: bucket.nbytes]
            if in_flight is not None and len(buffers) == 1:
                in_flight.wait()  # one buffer only: it must have left before it is refilled
            for name, view in bucket_views(buffer, bucket):
                began = time.perf_counter()
                sent_name, tensor = next(tensors)
                seconds["gather"] += time.perf_counter() - began
                if sent_name != name:
                    raise WeightSyncError(f"Internal: the export stream gave {sent_name} where the plan has {name}.")
                began = time.perf_counter()
                view.copy_(tensor)  # casts to the plan's dtype
                seconds["pack"] += time.perf_counter() - began
            began = time.perf_counter()
            if in_flight is not None:
                in_flight.wait()  # the previous bucket has left: its buffer may be refilled next
            in_flight = channel.group.broadcast(buffer, 0)  # sent while the next bucket is gathered and packed
            seconds["transport"] += time.perf_counter() - began
        if in_flight is not None:
            began = time.perf_counter()
            in_flight.wait()
            seconds["transport"] += time.perf_counter() - began
    finally:
        receiving.join()
    if receiving.error is not None:
        raise receiving.error
    report.engine = receiving.result


class _Receiving(threading.Thread):
    """The engine's receive call, running while this thread's caller broadcasts (collective_rpc blocks)."""

    def __init__(self, call):
        super().__init__(daemon=True)
        self.call, self.result, self.error = call, None, None
        self.start()

    def run(self):
        try:
            self.result = self.call()
        except BaseException as err:  # re-raised by the sender
            self.error = err


def _start_receiving(engine, channel: _Channel, buckets: list[Bucket]) -> _Receiving:
    plan = _as_json(buckets)
    if isinstance(engine, RemoteEngine):
        key = f"mcore/update/{channel.updates}"
        channel.store.set(f"{key}/plan", json.dumps(plan))
        return _Receiving(lambda: json.loads(channel.store.get(f"{key}/done")))
    return _Receiving(lambda: _call(engine, "mcore_receive", plan)[0])


def _channel(engine, llm) -> _Channel:
    """The sender's channel to an engine, made (and its group joined by the engine's workers) on first use."""
    key = id(engine)
    channel = _CHANNELS.get(key)
    if channel is not None and channel.group is not None:
        return channel
    if isinstance(engine, RemoteEngine):
        channel = channel or _Channel(engine.host, engine.port, None, engine.timeout)
        _CHANNELS[key] = channel
        workers = int(channel.store.get("mcore/workers"))  # written by serve_weight_updates once it connected
    else:
        workers = engine.llm_engine.vllm_config.parallel_config.world_size
        channel = _Channel("127.0.0.1", 0, workers, TIMEOUT)
        _CHANNELS[key] = channel
        joining = _Receiving(lambda: _call(engine, "mcore_join", channel.host, channel.port, 1 + workers, "mcore"))
    channel.group = _new_group(dist.PrefixStore("mcore", channel.store), 0, 1 + workers,
                               "cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(engine, RemoteEngine):
        joining.join()
        if joining.error is not None:
            raise joining.error
    return channel


def _call(engine, method: str, *args) -> list:
    if engine.llm_engine.vllm_config.parallel_config.worker_extension_cls == WORKER_EXTENSION:
        return engine.collective_rpc(method, args=args)
    # An engine started without our extension (TRL's colocated engine): the same method, sent as a function that
    # vLLM calls with the worker (vLLM's collective_rpc takes a callable as well as a method name).
    return engine.collective_rpc(functools.partial(_receiver_method, method), args=args)


def _receiver_method(method: str, worker, *args):
    return getattr(WeightReceiver, method)(worker, *args)


def _cast(stream, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in stream:
        yield name, tensor if dtype is None else tensor.to(dtype)


def _fail_everywhere(step) -> None:
    """Run `step` (on rank 0) and raise its error on every rank, so that no rank waits for a transfer."""
    error = None
    try:
        step()
    except Exception as err:  # noqa: BLE001 - re-raised below on every rank
        error = err if isinstance(err, WeightSyncError) else WeightSyncError(f"{type(err).__name__}: {err}")
    error = broadcast_from_rank0(error)
    if error is not None:
        raise error


# What torchrun tells its ranks: vLLM's spawned engine processes must not believe they are ranks of that world.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def start_engine(model: str, **kwargs):
    """`vllm.LLM(model, worker_extension_cls=WORKER_EXTENSION, **kwargs)`, started so that it works inside a
    torchrun rank: the launcher's variables are hidden from the engine's processes while they start."""
    from vllm import LLM

    kwargs.setdefault("worker_extension_cls", WORKER_EXTENSION)
    saved = {name: os.environ.pop(name) for name in LAUNCHER_VARIABLES if name in os.environ}
    try:
        return LLM(model=model, **kwargs)
    finally:
        os.environ.update(saved)


# ---- the host of a RemoteEngine ------------------------------------------------------------------------------
def serve_weight_updates(llm, host: str, port: int, count: int = 1, timeout: datetime.timedelta = TIMEOUT) -> list:
    """In the process that drives `llm`: connect to the sender's store, then take `count` updates, each checked
    and applied between this process's own generation calls. Returns the engine's reports."""
    store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    workers = llm.llm_engine.vllm_config.parallel_config.world_size
    if not hasattr(llm, "_mcore_joined"):
        store.set("mcore/workers", str(workers))
        llm.collective_rpc("mcore_join", args=(host, port, 1 + workers, "mcore"))
        llm._mcore_joined = True
        llm._mcore_updates = 0
    reports = []
    for _ in range(count):
        llm._mcore_updates += 1
        key = f"mcore/update/{llm._mcore_updates}"
        request = json.loads(store.get(f"{key}/check"))
        try:
            llm.collective_rpc("mcore_check", args=(request["specs"], request["config"]))
        except Exception as err:  # noqa: BLE001 - told to the sender, which raises it
            store.set(f"{key}/checked", json.dumps({"error": str(err)}))
            continue
        store.set(f"{key}/checked", json.dumps({}))
        plan = json.loads(store.get(f"{key}/plan"))
        report = llm.collective_rpc("mcore_receive", args=(plan,))[0]
        store.set(f"{key}/done", json.dumps(report))
        reports.append(report)
    return reports


def exported_specs(model) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(HF name, shape, dtype) of every tensor `update_weights` sends, in order (collective the first time)."""
    return [(name, tuple(shape), entry.dtype) for entry in model.export_plan() for name, shape in zip(entry.names, entry.shapes)]


__all__ = ["WORKER_EXTENSION", "RemoteEngine", "SyncReport", "WeightReceiver", "WeightSyncError", "exported_specs",
           "plan_buckets", "serve_weight_updates", "start_engine", "update_adapter", "update_weights"]

