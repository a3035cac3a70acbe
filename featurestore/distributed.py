"""Collection on a Ray cluster, into the same store layout and with the same chunk-commit protocol.

The driver (this process) owns the manifest: it validates the store, hands chunks of dataset rows to Ray
actors and commits each returned chunk record. Each actor loads the model once and writes a chunk's files
straight into the store under names that carry an attempt id, so two attempts at one chunk (a worker that
died mid-write, a straggler) never collide. The driver commits exactly one attempt per chunk and deletes the
files of every other; files no committed record lists are invisible to readers and swept on the next run.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .collection import (ChunkCollector, CollectOptions, _all_done, _n_rows, _prepare_store, check_options, describe_data,
                      describe_model, finish_collection, record_static_tables, start_run, write_static_tables)
from .capture import refuse_nonfinite_weights
from .data import open_dataset
from .errors import UserError
from .manifest import Manifest, now, writer_lock
from .storage import is_remote, store_path

RAY_MISSING = "--ray needs Ray, an optional extra: pip install 'featurestore[ray]'"


def import_ray(loopback: bool = False):
    """Ray, or the one-line error naming the extra that installs it.

    ``loopback``: a cluster this process starts binds its node to 127.0.0.1 (Ray reads this at import time).
    """
    if loopback and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


@dataclass
class ClusterOptions:
    address: str = "local"  # local: a new cluster on this machine (127.0.0.1); auto: the one `ray start` began here;
    # HOST:PORT or ray://HOST:PORT: that cluster
    num_workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    in_flight_per_worker: int = 2  # the second keeps a worker busy while the driver commits the first
    max_worker_failures: int | None = None  # default: 2 × num_workers
    runtime_env: dict | None = None  # Ray runtime_env of the actors (e.g. {"env_vars": {...}} for object-store access)
    # test hook: the first worker exits its process after writing the files of this many + 1 chunks
    fail_after_chunks: int | None = field(default=None, repr=False)


@dataclass
class DriverStats:
    """What the driver spent per chunk outside waiting for workers (reading rows, committing, submitting)."""
    chunks: int = 0
    duplicates: int = 0
    worker_failures: int = 0
    driver_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def overhead_per_chunk_ms(self) -> float:
        return 1000 * self.driver_seconds / max(self.chunks, 1)


class CollectWorker:
    """A Ray actor: loads the model once and turns chunks of rows into written chunk files."""

    def __init__(self, model: str, root: str, options: dict, fail_after_chunks: int | None = None):
        from .modeling import default_device, load_model, load_tokenizer

        self.opts = CollectOptions(**options)
        self.root = store_path(root)
        self.device = self.opts.device or default_device()
        self.net, self.ckpt = load_model(model, dtype=self.opts.dtype, device=self.device, revision=self.opts.revision,
                                         require_adapter=self.opts.source == "transcoder" or self.opts.adapters == "on")
        self.tokenizer = load_tokenizer(self.opts.tokenizer or self.ckpt.path)
        self.info, self.layers, self.source_settings, self.neurons = describe_model(self.ckpt, self.tokenizer, self.opts, self.device)
        refuse_nonfinite_weights(self.net, max(self.layers))  # before the driver writes anything
        self.collector = ChunkCollector(self.root, self.net, self.tokenizer, self.opts, self.layers, self.neurons, self.device)
        self.fail_after_chunks = fail_after_chunks
        self.done = 0

    def describe(self) -> dict:
        return {"info": self.info, "source_settings": self.source_settings, "host": os.uname().nodename}

    def write_static(self, vocab: bool, logit_lens: bool) -> dict:
        return write_static_tables(self.root, self.net, self.tokenizer, self.opts.source, self.layers, self.neurons,
                                   vocab=vocab, logit_lens=logit_lens)

    async def run_chunk(self, chunk: int, rows: list, row_range: tuple[int, int], with_tokens: bool, attempt: str) -> dict:
        # The forward passes block this actor's event loop; awaiting the writes lets the next chunk's passes run meanwhile.
        future = self.collector.submit_chunk(chunk, rows, row_range, with_tokens, attempt=attempt)
        record = await asyncio.wrap_future(future)
        self.done += 1
        if self.fail_after_chunks is not None and self.done > self.fail_after_chunks:
            os._exit(1)  # test hook: die with this chunk's files written but never reported
        return record


def collect_distributed(model: str, data: str, store: str | Path, cluster: ClusterOptions | None = None,
                        stats: DriverStats | None = None, **options):
    """``featurestore.collect`` on Ray actors; the same store (same rows) as a single-process run."""
    from .store import Store

    cluster = cluster or ClusterOptions()
    ray = import_ray(loopback=cluster.address == "local")
    if cluster.num_workers < 1:
        raise UserError("--num-workers must be at least 1")
    opts = CollectOptions(**options)
    check_options(opts)
    stats = stats if stats is not None else DriverStats()
    store_dir = store_path(store)
    store_dir = store_dir if is_remote(store_dir) else store_dir.absolute()
    dataset = open_dataset(data)
    data_info, settings = describe_data(data, dataset, opts)
    started_ray = connect(ray, cluster.address)
    pool = _WorkerPool(ray, model, store_dir, opts, cluster)
    try:
        with writer_lock(store_dir):
            described = pool.start()
            manifest = _prepare_store(store_dir, described["info"], data_info, settings, opts, described["source_settings"])
            need_vocab, need_lens = manifest.data.get("vocab") is None, opts.source not in manifest.data["logit_lens"]
            if need_vocab or need_lens:
                record_static_tables(manifest, opts.source, pool.call_first("write_static", need_vocab, need_lens))
            run = start_run(manifest, opts, workers=cluster.num_workers)
            remove_orphans(manifest, opts.source)
            _Driver(ray, manifest, dataset, opts, pool, stats).run()
            remove_orphans(manifest, opts.source)
            if _all_done(manifest, dataset, opts):
                run["finished"] = now()
                manifest.save()
                finish_collection(manifest, opts)
    finally:
        pool.stop()
        if started_ray:
            ray.shutdown()
    return Store(store_dir)


def cluster_collect(address: str, num_workers: int | None = None, gpus_per_worker: float | None = None):
    """A ``collect(model, data, store, **options)`` that runs on Ray (what ``collect --ray`` calls)."""
    import_ray(loopback=address == "local")  # fail on the missing extra before anything is read
    cluster = ClusterOptions(address=address, num_workers=num_workers or 1, gpus_per_worker=gpus_per_worker or 0)

    def run(model: str, data: str, store, **options):
        return collect_distributed(model, data, store, cluster, **options)

    return run


def connect(ray, address: str) -> bool:
    """Join (or start) the cluster unless this process already did; True when this call started the connection."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, logging_level="warning")
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot reach the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
    return True


def _cause(ray, exc: Exception) -> str:
    """One line saying why a worker call failed: the worker's own exception message when there is one."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and cause is not None:
        return str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    user = [line for line in lines if "UserError" in line]
    return (user[-1].split("UserError:", 1)[-1].strip() if user else lines[0] if lines else type(exc).__name__)


class _WorkerPool:
    """The actors, their handles by slot, and replacement of a slot whose actor died."""

    def __init__(self, ray, model: str, root: Path, opts: CollectOptions, cluster: ClusterOptions):
        self.ray, self.model, self.root, self.opts, self.cluster = ray, model, root, opts, cluster
        self.options = {k: v for k, v in asdict(opts).items() if k not in ("stop_after_chunks", "progress")}
        self.remote_class = ray.remote(CollectWorker).options(num_cpus=cluster.cpus_per_worker, num_gpus=cluster.gpus_per_worker,
                                                              max_restarts=0, runtime_env=cluster.runtime_env)
        self.actors: list = []

    def _spawn(self, fail_after: int | None = None):
        return self.remote_class.remote(self.model, str(self.root), self.options, fail_after)

    def start(self) -> dict:
        """Start every actor, wait until each has loaded the model, and check they all describe the same one."""
        self.actors = [self._spawn(self.cluster.fail_after_chunks if slot == 0 else None)
                       for slot in range(self.cluster.num_workers)]
        try:
            described = self.ray.get([actor.describe.remote() for actor in self.actors])
        except self.ray.exceptions.RayError as exc:
            raise UserError(f"a Ray worker could not load the model: {_cause(self.ray, exc)}") from None
        first = described[0]
        for other in described[1:]:
            if other["info"] != first["info"] or other["source_settings"] != first["source_settings"]:
                raise UserError(f"Ray workers on {first['host']} and {other['host']} loaded different models or dtypes; "
                                "give every node the same checkpoint (and --dtype)")
        return first

    def call_first(self, method: str, *args):
        try:
            return self.ray.get(getattr(self.actors[0], method).remote(*args))
        except self.ray.exceptions.RayError as exc:
            raise UserError(f"a Ray worker failed: {_cause(self.ray, exc)}") from None

    def replace(self, slot: int, dead) -> None:
        if self.actors[slot] is dead:
            self.ray.kill(dead, no_restart=True)
            self.actors[slot] = self._spawn()

    def stop(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []


class _Driver:
    """Assigns chunks to actors, commits what they return, reassigns what a dead actor held."""

    def __init__(self, ray, manifest: Manifest, dataset, opts: CollectOptions, pool: _WorkerPool, stats: DriverStats):
        self.ray, self.manifest, self.dataset, self.opts, self.pool, self.stats = ray, manifest, dataset, opts, pool, stats
        self.n_rows = _n_rows(dataset, opts)
        self.pending: dict = {}  # ObjectRef -> (slot, actor, chunk)
        self.max_failures = pool.cluster.max_worker_failures
        if self.max_failures is None:
            self.max_failures = 2 * pool.cluster.num_workers

    def _row_range(self, chunk: int) -> tuple[int, int]:
        return chunk * self.opts.chunk_size, min(self.n_rows, (chunk + 1) * self.opts.chunk_size)

    def _submit(self, slot: int, chunk: int) -> None:
        start, stop = self._row_range(chunk)
        actor = self.pool.actors[slot]
        rows = list(self.dataset.rows(start, stop))
        with_tokens = not self.manifest.has_tokens(chunk)
        ref = actor.run_chunk.remote(chunk, rows, (start, stop), with_tokens, uuid.uuid4().hex[:8])
        self.pending[ref] = (slot, actor, chunk)

    def _fill(self, slot: int, queue: deque) -> None:
        in_flight = sum(1 for s, _, _ in self.pending.values() if s == slot)
        while queue and in_flight < self.pool.cluster.in_flight_per_worker:
            self._submit(slot, queue.popleft())
            in_flight += 1

    def run(self) -> None:
        opts, stats = self.opts, self.stats
        chunks = range(-(-self.n_rows // opts.chunk_size))
        done = self.manifest.committed(opts.source)
        queue = deque(c for c in chunks if c not in done)
        if not queue:
            print(f"store already holds all {len(done)} chunks of {opts.source} activations; nothing to do", file=sys.stderr)
            return
        todo_rows = sum(self._row_range(c)[1] - self._row_range(c)[0] for c in queue)
        bar = tqdm(total=todo_rows, unit="seq", desc=f"collect {opts.source} on {self.pool.cluster.num_workers} Ray workers",
                   disable=not opts.progress, file=sys.stderr)
        started = time.perf_counter()
        n_tokens = 0
        try:
            tick = time.perf_counter()
            for slot in range(len(self.pool.actors)):
                self._fill(slot, queue)
            stats.driver_seconds += time.perf_counter() - tick
            while self.pending:
                ready, _ = self.ray.wait(list(self.pending), num_returns=1)
                tick = time.perf_counter()
                ref = ready[0]
                slot, actor, chunk = self.pending.pop(ref)
                try:
                    record = self.ray.get(ref)
                except self.ray.exceptions.RayActorError as exc:
                    self._worker_died(slot, actor, chunk, queue, exc)
                except self.ray.exceptions.RayError as exc:
                    raise UserError(f"collection failed on chunk {chunk}: {_cause(self.ray, exc)}") from None
                else:
                    self._check_visible(record)
                    if commit_attempt(self.manifest, record, stats):
                        bar.update(record["rows"][1] - record["rows"][0])
                        n_tokens += record["n_tokens"]
                        bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - started, 1e-9):,.0f}", refresh=False)
                self._fill(slot, queue)
                stats.driver_seconds += time.perf_counter() - tick
        finally:
            stats.wall_seconds += time.perf_counter() - started
            bar.close()

    def _check_visible(self, record: dict) -> None:
        """A worker on another node writing to its own disk would lose the chunk: refuse before committing."""
        root = self.manifest.root
        if is_remote(root):
            return
        missing = [f for files in record["files"].values() for f in files if not (root / f).is_file()]
        if missing:
            raise UserError(f"a Ray worker wrote {missing[0]} where this driver cannot see it: a local --store must be "
                            "on a filesystem every node shares (or use an object-store URI such as s3://bucket/store)")

    def _worker_died(self, slot: int, actor, chunk: int, queue: deque, exc: Exception) -> None:
        """Put the chunk back at the head of the queue and give the slot a fresh actor (once per death)."""
        queue.appendleft(chunk)
        if self.pool.actors[slot] is actor:
            self.stats.worker_failures += 1
            if self.stats.worker_failures > self.max_failures:
                raise UserError(f"{self.stats.worker_failures} Ray workers died (last: {_cause(self.ray, exc)}); "
                                "committed chunks are kept, rerun to resume")
            print(f"Ray worker {slot} died; chunk {chunk} goes to a new worker", file=sys.stderr)
            self.pool.replace(slot, actor)


def commit_attempt(manifest: Manifest, record: dict, stats: DriverStats | None = None) -> bool:
    """Commit a worker's chunk record unless another attempt at that chunk already was; a losing attempt's files
    are deleted. Only the driver calls this, so the check and the commit cannot interleave."""
    stats = stats if stats is not None else DriverStats()
    if record["chunk"] in manifest.committed(record["source"]):
        stats.duplicates += 1
        delete_files(manifest.root, [f for files in record["files"].values() for f in files])
        return False
    record["committed"] = now()
    manifest.commit_chunk(record)
    stats.chunks += 1
    return True


def delete_files(root: Path, files: list[str]) -> None:
    for rel in files:
        (root / rel).unlink(missing_ok=True)


def remove_orphans(manifest: Manifest, source: str) -> list[str]:
    """Delete chunk files (and temporaries) that no committed record lists: losing or interrupted attempts.

    Only the driver, holding the store's writer lock with no worker running, calls this.
    """
    root = manifest.root
    listed = set(manifest.files("activations", source)) | set(manifest.files("feature_stats", source))
    listed |= set(manifest.files("neuron_windows", source)) | set(manifest.files("neuron_counts", source))
    listed |= set(manifest.files("tokens")) | set(manifest.files("sequences"))
    directories = [root / "tokens", root / "sequences"]
    for table in ("activations", "feature_stats", "neuron_windows", "neuron_counts"):
        directories += sorted((root / table / f"source={source}").glob("layer=*"))
    removed = []
    for directory in directories:
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            rel = path.relative_to(root).as_posix()
            if path.name.lstrip(".").startswith("chunk-") and rel not in listed and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(rel)
    return removed

