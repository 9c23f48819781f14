"""The memory plan: what one actor's device holds at its peak, from config files alone.

Each part is built with fake tensors (shapes and dtypes, no memory, no weights read) at its
precision, its weights counted, and run once under a dispatch mode that tracks the bytes of
every live tensor: so a job is sized before any weights exist on the machine. What the plan
adds and how it was checked: docs/performance.md#the-memory-plan. Sizes in GiB (2^30 bytes).
"""

from __future__ import annotations

import contextlib
import functools
import json
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sdedit.conditioning import Conditioning, NetCall
from sdedit.families import ModelLayout, family_named
from sdedit.latent import LatentCodec, chunk_size
from sdedit.precision import COMPUTE_DTYPES, Precision, cast_module, layerwise_fp8, weight_bytes
from sdedit.prompts import MAX_CACHE_BYTES

__all__ = ["GIB", "GPU_CLASSES", "RUNTIME_BYTES", "MemoryPlan", "plan_memory", "trace_peak"]

GIB = 2**30
RUNTIME_BYTES = GIB
"""The CUDA context and cuBLAS / cuDNN workspaces, added to every plan (assumed, not traced)."""
GPU_CLASSES: tuple[tuple[int, str, int], ...] = (
    (16, "T4", 15360), (24, "L4, A10G", 23034), (48, "L40S", 46068),
    (80, "H100, A100", 81559), (141, "H200", 143771))
"""(nominal GB, common cards, MiB the smallest of them reports): what "fits 24 GB" means."""
TEXT_TOKENS = 512
"""Most tokens per prompt a text encoder is traced with (else its max_position_embeddings)."""


class _Tracker(TorchDispatchMode):
    """Bytes of the tensor storages made inside it and still alive, and their peak."""

    def __init__(self, exclude: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        self._keep = [t.untyped_storage() for t in exclude]
        for storage in self._keep:
            self.live[storage._cdata] = 0

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._add(item)
        return out


def trace_peak(fn: Callable[[], Any], exclude: Sequence[torch.Tensor]) -> int:
    """Peak bytes of the tensors `fn` makes (inside a fake mode), beyond `exclude`."""
    tracker = _Tracker(exclude)
    with tracker, torch.no_grad():
        result = fn()
    del result
    return tracker.peak


@dataclass
class MemoryPlan:
    """One actor's device memory at its peak, in bytes: `weights` part -> (precision, bytes),
    activation peaks of `net` (None = not estimated), `vae` and `text`, the `batch`'s own
    tensors; planned for `batch_size` images of `size` (H, W), `rows` network rows."""

    weights: dict[str, tuple[str, int]]
    net: int | None
    vae: int
    text: int
    batch: int
    size: tuple[int, int]
    batch_size: int
    rows: int
    net_name: str
    notes: list[str] = field(default_factory=list)

    def part(self, kind: str) -> int:
        """Weight bytes of "net", "vae" or "text" (all text encoders)."""
        if kind == "net":
            return self.weights[self.net_name][1]
        if kind == "vae":
            return self.weights.get("vae", ("", 0))[1]
        return sum(b for name, (_, b) in self.weights.items() if name.startswith("text_encoder"))

    def peak(self, offload: str = "none") -> int:
        """Bytes at the peak with offload "none" or "text"."""
        fixed = self.batch + MAX_CACHE_BYTES + RUNTIME_BYTES
        net, vae, text = self.part("net"), self.part("vae"), self.part("text")
        acts = max(self.net or 0, self.vae)
        if offload == "text":
            return fixed + max(net + vae + acts, text + vae + self.text)
        return fixed + net + vae + text + max(acts, self.text)

    def offload_for(self, gib: float) -> str | None:
        """The offload that fits `gib` (none first), or None."""
        return next((o for o in ("none", "text") if self.peak(o) <= gib * GIB), None)

    def fits(self) -> list[str]:
        """One phrase per GPU class: "24 GB (L4, A10G): with offload text", ..."""
        out = []
        for nominal, cards, mib in GPU_CLASSES:
            offload = self.offload_for(mib / 1024)
            verdict = "no" if offload is None else "yes" if offload == "none" else \
                "with offload text"
            out.append(f"{nominal} GB ({cards}): {verdict}")
        return out

    def lines(self, offload: str = "none") -> list[str]:
        """The plan as text: the total, then its parts and the GPU sizes it fits."""
        def gb(n: int | None) -> str:
            return "not estimated" if n is None else f"{n / GIB:.1f} GB"

        h, w = self.size
        head = [f"memory per actor: about {gb(self.peak(offload))} (offload {offload}; "
                f"{self.batch_size} image(s) of {w}x{h} per batch, {self.rows} network rows)"]
        parts = [f"  weights {name}: {gb(b)} ({precision})"
                 for name, (precision, b) in self.weights.items()]
        parts += [f"  activations: network {gb(self.net)}, VAE {gb(self.vae)} (in chunks of "
                  f"1024x1024 px, tiled above its sample size), text encoders {gb(self.text)}",
                  f"  batch tensors {gb(self.batch)}, prompt cache up to "
                  f"{gb(MAX_CACHE_BYTES)}, CUDA context and workspaces {gb(RUNTIME_BYTES)} "
                  "(assumed)"]
        if offload == "none" and self.peak("text") < self.peak("none"):
            parts.append(f"  with compute.offload text: about {gb(self.peak('text'))}")
        return head + parts + ["  fits: " + "; ".join(self.fits())] + \
            [f"  note: {note}" for note in self.notes]


def _class(config: dict[str, Any]) -> type:
    """The diffusers or transformers class a component config names."""
    import diffusers
    import transformers

    name = config.get("_class_name")
    if name:
        return getattr(diffusers, name)
    return getattr(transformers, (config.get("architectures") or ["?"])[0])


def _build(config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """A module of `config` with floating parameters of `dtype` (fp16: the class's
    `_keep_in_fp32_modules` float32), on the default device or inside a fake mode."""
    cls = _class(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if hasattr(cls, "from_config") and not hasattr(cls, "config_class"):
            module = cls.from_config(config)
        else:
            settings = {k: v for k, v in config.items() if not k.startswith("_")}
            module = cls(cls.config_class(**settings))
    finally:
        torch.set_default_dtype(previous)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if dtype == torch.float16 and keep:  # .data: fake tensors refuse Module.to's swap
        for name, sub in module.named_modules():
            if any(part in name.split(".") for part in keep):
                for param in sub.parameters():
                    param.data = param.data.float()
    return module.eval().requires_grad_(False)


@contextlib.contextmanager
def _fake() -> Iterator[Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def plan_memory(layout: ModelLayout, precision: Precision, *, batch_size: int,
                size: tuple[int, int], guided: bool, autocast: torch.dtype | None = None
                ) -> MemoryPlan:
    """The memory plan of `layout` at `precision` for batches of `batch_size` (H, W) pixel
    images; `guided` doubles the network's rows; `autocast` applies to fp32 weights."""
    rows = batch_size * (2 if guided else 1)
    net_name = "transformer" if "transformer" in layout.configs else "unet"
    notes: list[str] = []
    h, w = size
    weights = {net_name: (precision.net, _weights(layout.configs[net_name], precision.net))}
    texts = [n for n in layout.part_names() if n.startswith("text_encoder") and
             n in layout.configs]
    if "vae" in layout.configs:
        weights["vae"] = (precision.vae, _weights(layout.configs["vae"], precision.vae))
    for name in texts:
        weights[name] = (precision.text, _weights(_loaded_config(layout, name), precision.text))
    family = family_named(layout.family)
    with _fake():
        codec = None
        if "vae" in layout.configs:
            codec = family.codec(_build(layout.configs["vae"], COMPUTE_DTYPES[precision.vae]))
            shape = (codec.channels, h // codec.factor, w // codec.factor)
        else:
            shape = (layout.in_channels, h, w)
        net = _build(layout.configs[net_name], COMPUTE_DTYPES[precision.net])
        net_act = _net_peak(family.plan_inputs(layout, rows, size), net, (rows, *shape),
                            autocast or precision.compute)
        del net
        vae_act, text_act = 0, 0
        batch = 2 * batch_size * 3 * h * w * 4
        if codec is not None:
            vae_act = _vae_peak(codec, batch_size, size)
            batch += 6 * batch_size * shape[0] * shape[1] * shape[2] * 4
            del codec
        for name in texts:
            config = json.dumps(_loaded_config(layout, name), sort_keys=True)
            text_act = max(text_act, _text_peak(config, precision.text, rows))
    return MemoryPlan(weights, net_act, vae_act, text_act, batch, size, batch_size, rows,
                      net_name, notes)


def _loaded_config(layout: ModelLayout, name: str) -> dict[str, Any]:
    """Part `name`'s config, naming the transformers class the pipeline loads: the one
    model_index.json gives it where it names one (Z-Image's text encoder is loaded as the
    Qwen3Model of its index; its config's `architectures` say Qwen3ForCausalLM, which would
    add a language-model head the run never computes)."""
    config = layout.configs[name]
    entry = (layout.configs.get("index") or {}).get(name)
    if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" and entry[1]:
        return {**config, "architectures": [entry[1]]}
    return config


def _weights(config: dict[str, Any], precision: str) -> int:
    """Bytes of a part's weights at `precision` as `apply_precision` gives it (cached per
    config: T5-XXL is in several pipelines)."""
    return _weights_of(json.dumps(config, sort_keys=True), precision)


@functools.lru_cache(maxsize=64)
def _weights_of(config_json: str, precision: str) -> int:
    config = json.loads(config_json)
    with torch.device("meta"):
        module = _build(config, torch.float32)
    if precision == "fp8":
        cast_module(module, "bf16")
        layerwise_fp8(module)
    else:
        cast_module(module, precision)
    return weight_bytes(module)


def _net_peak(inputs: tuple[NetCall, Conditioning | None], net: torch.nn.Module,
              shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """The activation peak of one network call on state (rows, C, h, w)."""
    call, cond = inputs
    x, t = torch.zeros(shape), torch.zeros(shape[0])
    exclude = [*net.parameters(), *net.buffers(), x, t]
    if cond is not None:
        exclude += [*cond.rows.values(), *cond.shared.values()]
    low = next(net.parameters()).dtype != torch.float32

    def run() -> torch.Tensor:
        if low:  # as NetRunner: its dtype in, float32 out
            return call(net, x.to(dtype), t, None if cond is None else cond.to(dtype)).float()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32,
                            cache_enabled=False):
            return call(net, x, t, cond).float()

    return trace_peak(run, exclude)


def _vae_peak(codec: LatentCodec, batch: int, size: tuple[int, int]) -> int:
    """The larger activation peak of encoding and decoding a batch, as `LatentCodec` runs them."""
    vae = codec.vae
    codec.bound_memory()
    factor, channels, dtype = codec.factor, codec.channels, codec.dtype
    images = torch.zeros(batch, 3, *size)
    latents = torch.zeros(batch, channels, size[0] // factor, size[1] // factor)
    exclude = [*vae.parameters(), *vae.buffers(), images, latents]
    tile = int(getattr(vae, "tile_sample_min_size", 0) or   # AutoencoderKL's or the video VAEs'
               getattr(vae, "tile_sample_min_height", 0) or 0)
    if tile and max(size) > tile:  # tiled: one tile's peak + the image and its tiles
        images, latents = images[:1, :, :tile, :tile], latents[:1, :, :tile // factor,
                                                               :tile // factor]
        whole = 2 * 3 * size[0] * size[1] * 4
        vae.disable_tiling()
    else:
        whole = 0
    k = chunk_size(*images.shape[2:])
    encode = trace_peak(lambda: torch.cat([codec.posterior_mean(part.to(dtype)).float()
                                           for part in images.split(k)]), exclude)
    decode = trace_peak(lambda: torch.cat([codec.pixels(part.to(dtype)).float()
                                           for part in latents.split(k)]), exclude)
    return max(encode, decode) + whole


@functools.lru_cache(maxsize=64)
def _text_peak(config_json: str, precision: str, rows: int) -> int:
    """A text encoder's activation peak on `rows` prompts of its longest token sequence."""
    config = json.loads(config_json)
    encoder = _build(config, COMPUTE_DTYPES[precision])
    length = min(int(config.get("max_position_embeddings") or TEXT_TOKENS), TEXT_TOKENS)
    tokens = torch.zeros(rows, length, dtype=torch.long)
    exclude = [*encoder.parameters(), *encoder.buffers(), tokens]
    return trace_peak(lambda: encoder(tokens, output_hidden_states=True), exclude)
