"""The job spec as frozen, typed dataclasses: every setting declared once, with its check.

`affects` says whether a setting changes the outputs: "later" settings join the fingerprint only
when they differ from their default, so that old jobs resume unchanged. The settings:
docs/jobs.md."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.images import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, OUTPUT_FORMATS
from pipeline.job.validation import (
    REQUIRED,
    Check,
    choice,
    number,
    optional,
    string,
    text,
    typed,
)
from pipeline.redaction import redact
from sdedit import DTYPES as DEVICE_DTYPES
from sdedit import MAX_GUIDANCE, WEIGHTS_DTYPES, Lora
from sdedit import OFFLOAD_SETTINGS as OFFLOADS
from sdedit import SAMPLERS as ENGINE_SAMPLERS

__all__ = ["DEVICES", "DTYPES", "FINGERPRINT_VERSION", "IMAGE_FORMATS", "MAX_PROMPT_CHARS",
           "METRICS", "SAMPLERS", "SECTIONS", "ActorsSpec", "ComputeSpec", "InputSpec", "JobSpec",
           "ModelSpec", "OutputSpec", "ScoreSpec", "SdeditSpec", "setting"]

SAMPLERS = tuple(ENGINE_SAMPLERS)
IMAGE_FORMATS = tuple(OUTPUT_FORMATS)
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", *DEVICE_DTYPES)
FINGERPRINT_VERSION = 1

Affects = Literal["v1", "later"] | None


def setting(default: Any, check: Check, *, affects: Affects = None) -> Any:
    """A spec field: its `default` (REQUIRED: must be given; lists and dicts copied per spec),
    the `check` of its YAML value, and whether (and since when) it changes the outputs."""
    meta = {"check": check, "affects": affects}
    if default is REQUIRED:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return field(default=default, metadata=meta)


def _shard_list(value: Any) -> bool:
    items = [value] if isinstance(value, str) else value
    return isinstance(items, list) and bool(items) and all(
        isinstance(item, str) and item.strip() for item in items)


_OPTIONS = typed("a mapping of fsspec storage options", "is not a mapping with string keys",
                  lambda v: v is None or (isinstance(v, Mapping) and all(
                      isinstance(k, str) for k in v)),
                  lambda v: copy.deepcopy(dict(v or {})))
_EXT = optional(string("a member extension such as png or mask.png",
                       re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"), strip="."))
_INT = functools.partial(number, integer=True)
MAX_PROMPT_CHARS = 10_000
"""The longest prompt in characters, job or row: far above what any text encoder reads, low
enough that records repeating it stay small."""
_TEXT = text(MAX_PROMPT_CHARS)
_BOOL = typed("true or false", "is not a boolean", lambda v: isinstance(v, bool))
_LORA = Check("a list of {source, scale} mappings", lambda v: v)  # read by load._JobReader.lora
_ACTORS = Check("an integer >= 1 or a mapping with keys max, min", _INT(1).convert)  # .actors
LORA_CHECKS = {"source": string("a LoRA file or folder (local, hub id or fsspec URL)"),
               "scale": number(-10, 10)}
"""The keys of one `model.lora` item."""
NAME = string("letters, digits, '_', '.' and '-'", re.compile(r"^[A-Za-z0-9_.-]+$"))
"""The check of the job's `name`."""


@dataclass(frozen=True)
class ModelSpec:
    """The pretrained denoiser: a local dir, a hub id (org/name) or an fsspec URL."""

    source: str = setting(REQUIRED, string("a local directory, a hub id such as "
                                           "google/ddpm-ema-bedroom-256 or an fsspec URL"),
                          affects="v1")
    storage_options: Mapping[str, Any] = setting({}, _OPTIONS)
    lora: tuple[Lora, ...] = setting((), _LORA, affects="later")
    """LoRAs fused into the model (`sdedit.lora`); URL sources read with storage_options."""
    weights_dtype: str = setting("auto", choice(WEIGHTS_DTYPES), affects="later")
    """The precision of the model's weights (`sdedit.precision`); auto = the family's published
    one (`pipeline.job.memory.weights_request`)."""


@dataclass(frozen=True)
class InputSpec:
    """Input WebDataset shards (patterns, expanded by `pipeline.input.shards`) and members."""

    shards: tuple[str, ...] = setting(REQUIRED, typed(
        "a URL, brace range ({000000..000127}) or glob, or a list of them",
        "is not a non-empty string or a non-empty list of them", _shard_list,
        lambda v: (v,) if isinstance(v, str) else tuple(v)))
    image: str | None = setting(None, _EXT, affects="v1")
    """Member extension of the guide image; None = first of png, jpg, jpeg, webp present."""
    mask: str | None = setting(None, _EXT, affects="v1")
    """Member extension of the optional mask (white = regenerate), e.g. "mask.png"."""
    storage_options: Mapping[str, Any] = setting({}, _OPTIONS)
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, _INT(1, 2**40), affects="later")
    """Largest width x height of a guide or mask, read from its header; larger: a "size" row."""


@dataclass(frozen=True)
class OutputSpec:
    """Where output shards, manifests and commit markers go, and how images are encoded."""

    path: str = setting(REQUIRED, string("a local path or fsspec URL"))
    image_format: str = setting("png", choice(IMAGE_FORMATS), affects="v1")
    include_guide: bool = setting(True, _BOOL, affects="v1")
    storage_options: Mapping[str, Any] = setting({}, _OPTIONS)
    png_compress_level: int = setting(1, _INT(0, 9))
    """zlib level of PNG outputs, 0-9: file size and time only, never pixels."""
    jpeg_quality: int = setting(DEFAULT_QUALITY, _INT(0, 100), affects="later")
    """Quality 0-100 of jpg outputs (Pillow's scale); changes their pixels."""
    webp_quality: int = setting(DEFAULT_QUALITY, _INT(0, 100), affects="later")
    """Quality 0-100 of (lossy) webp outputs, as jpeg_quality."""

    def quality(self) -> int | None:
        """The quality the output format uses: jpeg_quality, webp_quality, or None (png)."""
        return {"jpg": self.jpeg_quality, "webp": self.webp_quality}.get(self.image_format)


@dataclass(frozen=True)
class SdeditSpec:
    """The SDEdit parameters; all of them change the outputs."""

    t0: float = setting(0.5, number(0, 1, open_low=True), affects="v1")
    sampler: str = setting("ddpm", choice(SAMPLERS), affects="v1")
    steps: int | None = setting(None, optional(_INT(1)), affects="v1")
    """Reverse steps; None = the sampler's default."""
    repeats: int = setting(1, _INT(1), affects="v1")
    samples_per_input: int = setting(1, _INT(1, 100), affects="v1")
    seed: int = setting(0, _INT(0, 2**63 - 1), affects="v1")
    eta: float = setting(0.0, number(0), affects="v1")
    """DDIM stochasticity; only used by sampler ddim."""
    prompt: str | None = setting(None, _TEXT, affects="later")
    """Text-conditioned models: the prompt of rows that set none (None = "")."""
    negative_prompt: str | None = setting(None, _TEXT, affects="later")
    """Text-conditioned models: the negative prompt of rows that set none (None = "")."""
    guidance_scale: float | None = setting(None, optional(number(0, MAX_GUIDANCE)),
                                           affects="later")
    """Classifier-free guidance g in [1, 100] (1 = conditional pass only), or the guidance input
    in [0, 100] of a guidance-distilled model; None = the family's default; the model checks its
    low end."""


@dataclass(frozen=True)
class ActorsSpec:
    """Autoscaling bounds of the actor pool."""

    min: int = 1
    max: int = 1


@dataclass(frozen=True)
class ComputeSpec:
    """Where and how the work runs; never changes the outputs beyond float rounding."""

    device: str = setting("auto", choice(DEVICES))
    dtype: str = setting("auto", choice(DTYPES))
    batch_size: int = setting(8, _INT(1, 4096))
    gpus_per_actor: float = setting(1.0, number(0, 8))
    """Used when the device resolves to cuda."""
    cpus_per_actor: float | None = setting(None, optional(number(0, open_low=True)))
    """None = decided by the runner."""
    actors: ActorsSpec = field(default_factory=ActorsSpec,
                               metadata={"check": _ACTORS, "affects": None})
    shard_retries: int = setting(2, _INT(0, 100))
    host_threads: int | None = setting(None, optional(_INT(1, 256)))
    """Threads decoding and encoding beside the device; None = the actor's CPUs, >= 2."""
    offload: str = setting("auto", choice(OFFLOADS))
    """none | text (text encoders in host memory, swapped in to encode) | auto (text only when
    the memory plan does not fit the GPU without it)."""
    gpu_memory_gb: float | None = setting(None, optional(number(1, 4096)))
    """The memory of each GPU in GB (2^30 bytes); a job whose memory plan exceeds it is refused."""
    compile: bool = setting(False, _BOOL)
    """torch.compile the network's repeated blocks (a warm-up per actor, then faster GPU steps)."""
    shard_timeout_s: float | None = setting(None, optional(number(0, open_low=True)))
    """Seconds an attempt at a shard may take before it fails and is retried; None = derived
    (`pipeline.driver.schedule`)."""


METRICS = ("ssim", "clip_score", "aesthetic", "embedding")
"""The per-row scorers a `score:` section may name (`pipeline.score`)."""
CLIP_METRICS = ("clip_score", "aesthetic", "embedding")
"""The scorers that need the CLIP model (one forward serves all three)."""


def _metric_list(value: Any) -> bool:
    return isinstance(value, list) and all(item in METRICS for item in value)


_METRICS = typed("a list of " + ", ".join(METRICS), "is not a list of known scorers",
                 _metric_list, lambda v: tuple(m for m in METRICS if m in v))


@dataclass(frozen=True)
class ScoreSpec:
    """Per-row scores of the outputs (`scores/{stem}.parquet`); never in the fingerprint."""

    metrics: tuple[str, ...] = setting((), _METRICS)
    """The scorers, any subset of METRICS; none = no scoring."""
    clip_model: str = setting("openai/clip-vit-large-patch14", string(
        "a CLIP model (CLIPModel + CLIPProcessor): a hub id, a local folder or an fsspec URL"))
    aesthetic_model: str | None = setting(None, optional(string(
        "the LAION improved aesthetic predictor's state dict (.pth or .safetensors): a local "
        "file or an fsspec URL (hf://, s3://, https://)")))
    """Needed by the aesthetic scorer; an MLP on the CLIP image embedding."""
    prompt: str | None = setting(None, _TEXT)
    """The text of clip_score for rows edited without a prompt (unconditional models)."""
    batch_size: int | None = setting(None, optional(_INT(1, 4096)))
    """Images per scorer call; None = compute.batch_size."""
    storage_options: Mapping[str, Any] = setting({}, _OPTIONS)
    """fsspec options of URL scorer models."""

    @property
    def enabled(self) -> bool:
        return bool(self.metrics)

    @property
    def uses_clip(self) -> bool:
        return any(m in CLIP_METRICS for m in self.metrics)

    def settings(self) -> dict[str, Any]:
        """What the scores depend on (the models only where a scorer uses them): the same
        settings give the same scores."""
        data: dict[str, Any] = {"metrics": list(self.metrics)}
        if self.uses_clip:
            data["clip_model"] = self.clip_model
        if "clip_score" in self.metrics:
            data["prompt"] = self.prompt
        if "aesthetic" in self.metrics:
            data["aesthetic_model"] = self.aesthetic_model
        return data


SECTIONS: dict[str, type] = {"model": ModelSpec, "input": InputSpec, "output": OutputSpec,
                             "sdedit": SdeditSpec, "compute": ComputeSpec,
                             "score": ScoreSpec}
"""The job's sections, in the order a job file lists them."""


@dataclass(frozen=True)
class JobSpec:
    """A validated job; build it with `pipeline.job.load.load_spec` or `parse_spec`."""

    name: str
    model: ModelSpec
    input: InputSpec
    output: OutputSpec
    sdedit: SdeditSpec = field(default_factory=SdeditSpec)
    compute: ComputeSpec = field(default_factory=ComputeSpec)
    score: ScoreSpec = field(default_factory=ScoreSpec)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain JSON values; secrets in storage options become "***"."""
        data = dataclasses.asdict(self)
        for section in ("model", "input", "output", "score"):
            data[section]["storage_options"] = redact(data[section]["storage_options"])
        data["input"]["shards"] = list(self.input.shards)
        data["score"]["metrics"] = list(self.score.metrics)
        data["model"]["lora"] = _plain(self.model.lora)
        return data

    def output_affecting(self) -> dict[str, Any]:
        """The settings that change the outputs; resuming requires them to be unchanged.

        A "later" setting counts only when it differs from its default, so a job that keeps the
        default keeps its fingerprint and resumes."""
        data: dict[str, Any] = {"fingerprint_version": FINGERPRINT_VERSION}
        for section, cls in SECTIONS.items():
            values = getattr(self, section)
            for f in dataclasses.fields(cls):
                affects, value = f.metadata.get("affects"), getattr(values, f.name)
                if affects == "v1" or (affects == "later" and value != default_of(f)):
                    data.setdefault(section, {})[f.name] = _plain(value)
        return data

    def fingerprint(self) -> str:
        """sha256 hex digest of the canonical JSON of `output_affecting()`."""
        canonical = json.dumps(self.output_affecting(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def default_of(f: dataclasses.Field) -> Any:
    """The declared default of a dataclass field, or REQUIRED."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def _plain(value: Any) -> Any:
    """A setting as JSON / YAML values (a tuple of dataclasses -> a list of mappings)."""
    if isinstance(value, tuple):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return value
