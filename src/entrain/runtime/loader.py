"""Decoding off the critical path: encoder inputs decoded a step ahead, in worker
processes, into a cache of bounded size.

An encoder rank knows, one step ahead (runtime/train.py's PlanAhead), which units it will
encode. `Loader.want` sends their items to worker processes to decode and preprocess
(image patches, video frame groups, log-mel chunks) while the current step trains;
`Loader.get` takes an item from the cache, waiting for its worker if it is still being
decoded (the wait is the step's `data_wait`), or decoding it here if nobody asked for it.
The cache holds at most `cap` bytes and drops the least recently used item first, so
memory stays flat over any number of epochs. LLM ranks decode nothing: a sample's token
ids are computed once at start-up.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from entrain.models.spec import AudioSpec, VisionSpec
from entrain.runtime.stopping import watch_parent

Key = tuple[str, int, int]
"""(modality, sample index in the data set, item index within the sample)."""


@dataclass(frozen=True)
class Job:
    """What a worker needs to decode one item (picklable: paths, sizes, the encoder spec)."""

    modality: str
    path: Path
    size: tuple
    sample: str
    spec: VisionSpec | AudioSpec


def decode(job: Job):
    """One item's encoder inputs, as numpy arrays: an image's (patches, grid); a video's
    [(patches, grid)] per temporal patch; an audio clip's (mels per chunk, valid positions
    per chunk)."""
    from entrain.runtime import inputs

    if job.modality == "image":
        return inputs.image_arrays(job.path, job.spec, job.sample)
    if job.modality == "video":
        return inputs.video_arrays(job.path, job.size, job.spec, job.sample)
    return inputs.log_mel_arrays(inputs.read_wav(job.path, job.sample), job.spec)


def _decode_here(job: Job):
    """Decode on the calling thread, outside any autocast the caller computes under (the
    Whisper features use torch on the CPU and must stay fp32)."""
    import torch

    with torch.autocast("cpu", enabled=False):
        return decode(job)


def _die_with_parent(parent: int) -> None:
    """A worker leaves when its rank is gone (killed, or ended without closing the pool):
    an orphan would hold the rank's output pipes open and decode for nobody. A Ctrl-C that
    reaches the rank's process group is the rank's to handle (it stops after its step and
    closes the pool); the worker ignores it rather than print a KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(parent, lambda: os._exit(0))


def nbytes(value) -> int:
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, tuple | list):
        return sum(nbytes(v) for v in value)
    return 0


class ByteLRU:
    """Values by key, at most `cap` bytes of them; the least recently used go first. A
    value larger than the cap is handed out but not kept. Thread-safe."""

    def __init__(self, cap: int | None):
        self.cap = cap
        self.bytes = 0
        self.evicted = 0
        self._items: OrderedDict[Key, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Key):
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Key, value, size: int | None = None) -> None:
        size = nbytes(value) if size is None else size
        with self._lock:
            if key in self._items:
                self.bytes -= self._items.pop(key)[1]
            if self.cap is not None and size > self.cap:
                return
            self._items[key] = (value, size)
            self.bytes += size
            while self.cap is not None and self.bytes > self.cap:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
                self.evicted += 1


class Loader:
    """A data set's encoder inputs through a bounded cache, decoded ahead by `workers`
    processes (0: here, when asked for)."""

    def __init__(self, job_of, cap_bytes: int | None, workers: int = 0):
        self.job_of = job_of
        self.cache = ByteLRU(cap_bytes)
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._pending: dict[Key, Future] = {}
        self._lock = threading.Lock()
        self.wait = 0.0
        """Seconds `get` waited for items not decoded yet (reset by `take_wait`)."""

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:  # spawn: a fork of a process with gloo's threads can hang
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=mp.get_context("spawn"),
                initializer=_die_with_parent,
                initargs=(os.getpid(),),
            )
        return self._pool

    def want(self, keys: Iterable[Key]) -> None:
        """Start decoding these items (those neither cached nor on their way)."""
        if not self.workers:
            return
        with self._lock:
            for key in keys:
                if key in self._pending or key in self.cache:
                    continue
                self._pending[key] = self._executor().submit(decode, self.job_of(key))

    def get(self, key: Key):
        value = self.cache.get(key)
        if value is not None:
            return value
        with self._lock:
            fut = self._pending.pop(key, None)
        t0 = time.perf_counter()
        value = fut.result() if fut is not None else _decode_here(self.job_of(key))
        self.wait += time.perf_counter() - t0
        self.cache.put(key, value)
        return value

    def take_wait(self) -> float:
        w, self.wait = self.wait, 0.0
        return w

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
