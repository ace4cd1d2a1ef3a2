"""`TrainConfig`: what a training run does, in four sections, and the named profiles.

Options arrive flat (the CLI's flags, the train DAG's `options`, a profile's values: `mode`,
`input_size`, ...); each flat name lives in exactly one section, so `TrainConfig.of(**flat)`
and `cfg.flat()` translate both ways and the registry records the flat form as before.
"""

from __future__ import annotations

from dataclasses import Field, asdict, dataclass, field, fields, replace
from typing import Any

from pipeline.detector.data import DataError, SampleSpec
from pipeline.detector.metrics import THRESHOLD_RULES
from pipeline.detector.split import DEFAULT_FRACTIONS
from pipeline.errors import cut, shown

# the choices of ModelConfig.matcher, .crop_net and .fusion (the CLI and the train DAG keep copies; tests keep them equal)
MATCHER_CHOICES = ("auto", "on", "off")
CROP_NET_CHOICES = ("auto", "off")
FUSION_CHOICES = ("val", "fitted")


@dataclass(frozen=True)
class DataConfig:
    """Which samples the run learns from, and how often each is seen."""

    samples: SampleSpec = field(default_factory=SampleSpec)
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    upsample: float = 1.0  # each class raised to >= upsample x the largest class (0: off)
    class_weights: bool = False
    synthetic_negatives: int = 0  # logo-free synthetic scenes added to the training no_logo
    synthetic_size: int = 299


@dataclass(frozen=True)
class ModelConfig:
    """The shape of what is trained: network input and head, and whether a matcher joins it."""

    input_size: int | None = None  # None: 299 with pretrained weights, 128 from scratch
    dropout: float = 0.3
    matcher: str = "auto"  # auto (when the data has boxes) | on | off
    # how calibrate picks each signal's threshold on val: wilson (the 95% Wilson lower bound of
    # precision reaches the target: holds on new photos) | point (the measured precision does)
    threshold_rule: str = "wilson"
    # val: choose on val between the fitted CNN+matcher fusion and the matcher alone | fitted
    fusion: str = "val"
    # the crop net (detector/cropnet.py), a small conv net trained on the boxes and folded into
    # the matcher's scores when that wins on val: auto (when the data has boxes and a matcher) | off
    crop_net: str = "auto"


@dataclass(frozen=True)
class FitConfig:
    """How the classifier learns."""

    mode: str = "auto"  # auto | head | full | finetune:N
    epochs: int | None = None  # full/finetune image epochs; None: per mode
    head_epochs: int = 40  # head-only epochs on cached features
    batch_size: int = 32
    learning_rate: float = 1e-3
    finetune_learning_rate: float = 1e-5
    bn_momentum: float | None = 0.9  # BatchNorm momentum when the whole network trains
    augment: bool | None = None  # None: on when the base trains from scratch
    augment_flip: bool = False  # logos with text are not mirror-symmetric: off by default
    time_budget_s: float | None = None  # stop image training after this long (checked every step)
    # the crop net's training seconds; taken out of time_budget_s when the crop net trains (the
    # classifier gets the rest, at least a minute of it)
    crop_net_budget_s: float = 420.0


@dataclass(frozen=True)
class RuntimeConfig:
    """How the run uses the machine; `deterministic` trades speed for repeatable models."""

    deterministic: bool = False  # seeded, op-deterministic, sequential augmentation (see `enable_determinism`)
    seed: int = 1234
    matcher_workers: int = 2


SECTIONS = {"data": DataConfig, "model": ModelConfig, "fit": FitConfig, "runtime": RuntimeConfig}


def option_fields() -> dict[str, Field]:
    """Every flat option name -> its dataclass field (type as written, default)."""
    return {f.name: f for cls in SECTIONS.values() for f in fields(cls)}


def _section_of() -> dict[str, str]:
    return {f.name: name for name, cls in SECTIONS.items() for f in fields(cls)}


@dataclass(frozen=True)
class TrainConfig:
    """One run's settings, by section; build it from flat option names with `of`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @classmethod
    def of(cls, **flat: Any) -> TrainConfig:
        """A config from flat option names (unknown names: DataError)."""
        return cls().with_options(**flat)

    def with_options(self, **flat: Any) -> TrainConfig:
        """A copy with flat options replaced, each in its section."""
        where = _section_of()
        unknown = set(flat) - set(where)
        if unknown:
            raise DataError(f"unknown training option(s): {', '.join(cut(str(k)) for k in sorted(unknown))}")
        parts: dict[str, dict[str, Any]] = {}
        for key, value in flat.items():
            parts.setdefault(where[key], {})[key] = value
        return replace(self, **{name: replace(getattr(self, name), **vals) for name, vals in parts.items()})

    def flat(self) -> dict[str, Any]:
        """All options by flat name, JSON-ready (what the registry records as `params.config`)."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            out.update(asdict(getattr(self, name)))
        return _jsonable(out)


PROFILES: dict[str, dict[str, Any]] = {
    # The shipped defaults: real photos, the 30-minute budget on 2 cores.
    # 24 min of image training; with boxes the crop net takes 14 of them and the classifier the
    # rest: on FL27 the crop net gains more from its minutes than a from-scratch Inception v3.
    "default": {"synthetic_negatives": 300, "upsample": 0.5, "time_budget_s": 24 * 60.0, "crop_net_budget_s": 14 * 60.0},
    # The demo: small input, from scratch, on synthetic training folders, in about a minute.
    # Bounded by epochs, never by the clock, and deterministic: the same commit trains the same
    # model (and the demo prints the same figures) on an idle or a busy machine.
    "demo": {
        "input_size": 96,
        "mode": "full",
        "epochs": 8,
        "batch_size": 32,
        "learning_rate": 2e-3,
        "augment": True,
        "dropout": 0.2,
        "time_budget_s": None,
        "deterministic": True,
        "matcher": "on",
    },
}


def resolve_config(profile: str, pretrained: bool, epochs: int | None, overrides: dict[str, Any]) -> TrainConfig:
    """The profile, then the caller's options, then the per-mode defaults filled in."""
    if profile not in PROFILES:
        raise DataError(f"unknown training profile {shown(profile)}; use one of {', '.join(PROFILES)}")
    values: dict[str, Any] = {**PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None}}
    if epochs is not None:
        values["epochs"] = epochs
    if isinstance(values.get("samples"), dict):
        values["samples"] = SampleSpec(**values["samples"])
    try:
        cfg = TrainConfig.of(**values)
    except TypeError as exc:
        raise DataError(f"bad training options: {str(exc)[:200]}") from None
    if cfg.model.threshold_rule not in THRESHOLD_RULES:
        raise DataError(f"threshold_rule must be one of {', '.join(THRESHOLD_RULES)}, not {shown(cfg.model.threshold_rule)}")
    if cfg.model.matcher not in MATCHER_CHOICES:
        raise DataError(f"matcher must be auto, on or off, not {shown(cfg.model.matcher)}")
    if cfg.model.crop_net not in CROP_NET_CHOICES:
        raise DataError(f"crop_net must be auto or off, not {shown(cfg.model.crop_net)}")
    if cfg.model.fusion not in FUSION_CHOICES:
        raise DataError(f"fusion must be val or fitted, not {shown(cfg.model.fusion)}")
    fit = cfg.fit
    mode = fit.mode if fit.mode != "auto" else ("head" if pretrained else "full")
    check_mode(mode)
    size = cfg.model.input_size or (299 if pretrained else 128)
    augment = fit.augment if fit.augment is not None else (mode == "full" and not pretrained)
    default_epochs = {"full": 12, "head": 0}.get(mode, 4)
    return cfg.with_options(mode=mode, input_size=size, augment=augment,
                            epochs=fit.epochs if fit.epochs is not None else default_epochs)


def check_mode(mode: str) -> None:
    """`head`, `full` or `finetune:N` with 1 <= N <= 11 (Inception v3 has 11 mixed blocks)."""
    if mode in ("head", "full"):
        return
    head, _, n = mode.partition(":")
    if head != "finetune" or not n.isdigit() or not 1 <= int(n) <= 11:
        raise DataError(f"training mode must be auto, head, full or finetune:N (N = 1..11 top Inception blocks), not {shown(mode)}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
