"""The GPU fast path: how the network runs (`Acceleration`, `NetRunner`) and how noise reaches
the device (`PrefetchNoise`).

Every option runs on the CPU too (CUDA-only ones are no-ops there), and none changes the
sampler's float32 arithmetic. The options and why each helps: docs/performance.md#the-gpu-fast-path.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from sdedit.conditioning import Conditioning, NetCall

logger = logging.getLogger(__name__)

__all__ = ["Acceleration", "NetRunner", "PrefetchNoise", "compile_regions", "repeated_blocks"]

MAX_GRAPHS = 8
"""CUDA graphs kept per runner (one per input shape); further shapes run eagerly."""


@dataclass(frozen=True)
class Acceleration:
    """How the network runs (each field: docs/performance.md#the-gpu-fast-path). `autocast`
    (bf16 / fp16 or None) is for fp32 weights; `noise_threads` 0 draws inline."""

    autocast: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    compile_regional: bool = False
    cuda_graphs: bool = False
    noise_threads: int = 0
    noise_depth: int = 2

    def __post_init__(self) -> None:
        if self.autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast={self.autocast!r} is not allowed; allowed: None, "
                             "torch.bfloat16, torch.float16")
        if self.noise_threads < 0 or self.noise_depth < 1:
            raise ValueError(f"noise_threads={self.noise_threads}, noise_depth="
                             f"{self.noise_depth}; allowed: noise_threads >= 0, noise_depth >= 1")

    @classmethod
    def default(cls, device: torch.device | str, dtype: torch.dtype) -> Acceleration:
        """What helps on `device`: autocast for a half `dtype`; on CUDA also channels_last and
        noise threads. Compile and CUDA graphs stay opt-in (their warm-up is slow)."""
        device = torch.device(device)
        half = dtype if dtype in (torch.bfloat16, torch.float16) else None
        if device.type != "cuda":
            return cls(autocast=half)
        return cls(autocast=half, channels_last=True, noise_threads=default_noise_threads())


def repeated_blocks(net: torch.nn.Module) -> set[str]:
    """Class names of a network's repeated blocks: diffusers' `_repeated_blocks`, else the
    class of each ModuleList of two or more blocks of one class."""
    names = set(getattr(net, "_repeated_blocks", None) or [])
    if not names:
        for module in net.modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and \
                    len({type(block) for block in module}) == 1:
                names.add(type(module[0]).__name__)
    return names


def compile_regions(net: torch.nn.Module, options: dict[str, Any]) -> set[str]:
    """torch.compile each repeated block of `net` in place (`repeated_blocks`); their names."""
    names = repeated_blocks(net)
    for module in net.modules():
        if type(module).__name__ in names:
            module.compile(**options)
    return names


def default_noise_threads() -> int:
    """Threads for noise on a GPU machine: up to 8, leaving two cores to the driver thread."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cpus or 1) - 2))


class NetRunner:
    """Calls a network through its family's `NetCall` as `accel` says; `dtype` is the weights'
    compute dtype (inputs are cast to it, the output comes back float32)."""

    def __init__(self, net: torch.nn.Module, accel: Acceleration, device: torch.device,
                 call: NetCall, dtype: torch.dtype = torch.float32) -> None:
        self.accel = accel
        self.dtype = dtype
        self.device = device
        self.call = call
        self.graphs = accel.cuda_graphs and device.type == "cuda"
        if accel.cuda_graphs and not self.graphs:
            logger.info("cuda_graphs requested on %s: ignored (CUDA only)", device)
        if self.graphs and not getattr(call, "graph_safe", True):
            logger.info("cuda_graphs requested: ignored (this family's network call reads "
                        "per-row lengths on the host, which a captured graph would freeze)")
            self.graphs = False
        layout = torch.channels_last if accel.channels_last else torch.contiguous_format
        net = net.to(memory_format=layout)
        self.module: Any = net
        if accel.compile_regional:
            options = {"backend": accel.compile_backend}
            if accel.compile_backend == "inductor" and accel.compile_mode is not None:
                options["mode"] = accel.compile_mode
            names = compile_regions(net, options)
            logger.info("regional torch.compile of %s", ", ".join(sorted(names)) or "nothing")
        elif accel.compile:
            mode = accel.compile_mode
            if self.graphs:
                mode, self.graphs = "reduce-overhead", False
            options: dict[str, Any] = {"backend": accel.compile_backend}
            if accel.compile_backend == "inductor" and mode is not None:
                options["mode"] = mode
            self.module = torch.compile(net, **options)
        self._captured: dict[tuple[Any, ...], tuple[torch.Tensor, ...] | Any] = {}
        self._pool: Any = None
        self._stream: Any = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor,
                 cond: Conditioning | None = None) -> torch.Tensor:
        """x float32 (B, C, H, W), t (B,) network times, cond of B rows or None -> float32
        (B, C, H, W), contiguous, owned by the caller."""
        if self.graphs:
            return self._replay(x, t, cond)
        return self._forward(x, t, cond, cache=True)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None,
                 cache: bool) -> torch.Tensor:
        if self.dtype != torch.float32:  # low-precision weights: their dtype in, float32 out
            x = x.to(self.dtype)
            cond = None if cond is None else cond.to(self.dtype)
        if self.accel.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        half = self.accel.autocast
        with torch.autocast(self.device.type, dtype=half or torch.bfloat16,
                            enabled=half is not None, cache_enabled=cache):
            out = self.call(self.module, x, t, cond)
        return out.to(torch.float32, memory_format=torch.contiguous_format, copy=True)

    def _replay(self, x: torch.Tensor, t: torch.Tensor,
                cond: Conditioning | None) -> torch.Tensor:
        key = (tuple(x.shape), t.dtype, tuple(t.shape), None if cond is None else cond.key())
        entry = self._captured.get(key)
        if entry is None:
            if len(self._captured) >= MAX_GRAPHS:
                return self._forward(x, t, cond, cache=True)
            entry = self._capture(x, t, cond)
            self._captured[key] = entry
        static_x, static_t, static_cond, static_out, graph = entry
        static_x.copy_(x)
        static_t.copy_(t)
        if static_cond is not None and cond is not None:
            static_cond.copy_(cond)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: torch.Tensor, t: torch.Tensor,
                 cond: Conditioning | None) -> tuple[Any, ...]:
        """Warm up on a side stream, then capture one forward (same stream, shared pool)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(self.device)
        static_x, static_t = x.clone(), t.clone()
        static_cond = None if cond is None else cond.clone()
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for _ in range(3):
                self._forward(static_x, static_t, static_cond, cache=False)
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the noise threads may allocate pinned memory meanwhile
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream,
                              capture_error_mode="thread_local"):
            static_out = self._forward(static_x, static_t, static_cond, cache=False)
        logger.info("captured a CUDA graph for input %s", tuple(x.shape))
        return static_x, static_t, static_cond, static_out, graph


class PrefetchNoise:
    """`SeedNoise`'s draws, bit-identical, drawn ahead in threads to overlap the network (one
    thread at a time advances a sample's generator). `pool`: shared threads `close` leaves
    running, instead of `threads` of its own."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, int, int], device: torch.device,
                 threads: int, depth: int = 2, pool: Executor | None = None) -> None:
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.shape = shape
        self.device = device
        self.pin = device.type == "cuda"
        self.locks = [threading.Lock() for _ in seeds]
        self.ready: list[deque[torch.Tensor]] = [deque() for _ in seeds]
        self.changed = threading.Condition()
        self.error: BaseException | None = None
        self.closed = False
        self.own_pool = pool is None
        self.pool: Executor = pool or ThreadPoolExecutor(max(1, threads),
                                                         thread_name_prefix="sdedit-noise")
        for i in range(len(seeds)):
            for _ in range(depth):
                self.pool.submit(self._draw, i)

    def _draw(self, i: int) -> None:
        if self.closed:  # a draw queued in a shared pool after close(): nothing to do
            return
        try:
            with self.locks[i]:
                buffer = torch.empty(self.shape, pin_memory=self.pin)
                torch.randn(self.shape, generator=self.generators[i], out=buffer)
                with self.changed:
                    self.ready[i].append(buffer)
                    self.changed.notify_all()
        except BaseException as exc:  # surfaced to the caller by __call__
            with self.changed:
                self.error = exc
                self.changed.notify_all()

    def __call__(self, rows: list[int]) -> torch.Tensor:
        """float32 (len(rows), C, H, W) on the device: the next draw of each listed sample."""
        draws = []
        with self.changed:
            for i in rows:
                while not self.ready[i]:
                    if self.error is not None:
                        raise RuntimeError("noise prefetch thread failed") from self.error
                    self.changed.wait()
                draws.append(self.ready[i].popleft())
        for i in rows:
            self.pool.submit(self._draw, i)
        if not self.pin:
            return torch.stack(draws).to(self.device)
        out = torch.empty((len(rows), *self.shape), device=self.device)
        for j, draw in enumerate(draws):
            out[j].copy_(draw, non_blocking=True)
        return out

    def close(self) -> None:
        """Stop drawing, drop unused draws, and stop the threads unless the pool is shared."""
        self.closed = True
        if self.own_pool:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PrefetchNoise:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
