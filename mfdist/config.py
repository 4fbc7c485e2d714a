"""Config: YAML -> nested frozen dataclasses with defaults, ``--set`` overrides, validation.

Every key has a type; unknown keys, wrong types and invalid values raise
:class:`ConfigError` naming the full key path (``train.rank``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional
from urllib.parse import urlsplit

import yaml

from mfdist.errors import ConfigError


@dataclass(frozen=True)
class RunConfig:
    name: str = "mfdist"
    run_id: Optional[str] = None
    seed: int = 42
    checkpoint_dir: str = "./lake/_checkpoints"
    keep_checkpoints: bool = False


@dataclass(frozen=True)
class SparkConfig:
    master: Optional[str] = None
    conf: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ColumnsConfig:
    user: str = "user_id"
    item: str = "item_id"
    rating: str = "rating"
    timestamp: Optional[str] = None


@dataclass(frozen=True)
class SyntheticConfig:
    users: int = 20_000
    items: int = 2_000
    ratings: int = 1_000_000
    rank: int = 8
    seed: int = 7
    noise: float = 0.5


@dataclass(frozen=True)
class InputConfig:
    path: Optional[str] = None
    format: Literal["parquet", "csv", "tsv", "movielens", "synthetic", "delta", "table"] = "synthetic"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    header: bool = True
    rating_range: list[float] = field(default_factory=lambda: [1.0, 5.0])
    implicit: bool = False
    duplicates: Literal["last", "mean", "error"] = "last"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class SplitConfig:
    method: Literal["random", "per_user", "temporal", "file"] = "random"
    test_fraction: float = 0.2
    test_path: Optional[str] = None


@dataclass(frozen=True)
class TrainerSettings:
    """The settings a trainer may take for itself (``train.als.*``, ``train.dsgd.*``); unset: see resolve_trainer."""

    rank: Optional[int] = None
    epochs: Optional[int] = None
    reg: Optional[float] = None
    bias_reg: Optional[float] = None
    bias_rounds: Optional[int] = None  # ALS: backfitting rounds of biases and factors
    step_size: Optional[float] = None  # DSGD's initial base step; rows scale it by AdaGrad


# Each trainer's own defaults, used where neither train.<algorithm>.<key> nor train.<key> is set.
# ALS: Spark's rank 10 / reg 0.1. DSGD: chosen on MovieLens 100k and four planted sets together
# (bench/defaults.py, README): reg 0.15 is best on MovieLens (u1 0.9176) and 0-10 ratings, 0.1 on
# continuous planted and very sparse ratings; 0.12 is within 0.008 of the best on each but the
# planted set (0.6316 vs 0.6102, still ahead of ALS's 0.6509).
TRAINER_DEFAULTS = {
    "als": TrainerSettings(rank=10, epochs=10, reg=0.1, bias_reg=1.0, bias_rounds=3, step_size=0.1),
    "dsgd": TrainerSettings(rank=50, epochs=40, reg=0.12, bias_reg=1.0, bias_rounds=3, step_size=0.05),
}
TRAINER_KEYS = tuple(f.name for f in dataclasses.fields(TrainerSettings))


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """DSGD: hold out a seeded slice of the training ratings and stop when its RMSE stops improving."""

    enabled: bool = False
    patience: int = 3  # epochs without an improvement of more than min_delta
    min_delta: float = 0.0
    validation_fraction: float = 0.05  # of the training ratings, by a hash of (seed, user, item)


@dataclass(frozen=True)
class TrainConfig:
    algorithm: Literal["als", "dsgd"] = "als"
    # Shared by both trainers when set; the chosen trainer's section and defaults fill the rest.
    rank: Optional[int] = None
    epochs: Optional[int] = None
    reg: Optional[float] = None
    bias_reg: Optional[float] = None
    bias_rounds: Optional[int] = None
    step_size: Optional[float] = None
    als: TrainerSettings = field(default_factory=TrainerSettings)
    dsgd: TrainerSettings = field(default_factory=TrainerSettings)
    biases: bool = True
    implicit_alpha: float = 1.0
    nonnegative: bool = False
    blocks: Optional[int] = None
    checkpoint_interval: int = 5
    # DSGD's per-epoch test RMSE: every eval_every epochs (and the last), on at most eval_sample
    # test ratings; the evaluate stage scores every test rating once at the end.
    eval_every: int = 1
    eval_sample: int = 100_000
    # DSGD: train.epochs is the most; the fit stops once the kept epoch's training objective has
    # fallen by less than this share over the last 3 epochs (0: always run train.epochs).
    tol: float = 0.005
    # DSGD: choose reg on the validation slice (train.early_stopping.validation_fraction) along a
    # path of regs from train.reg / 4 up to train.reg * 4, each started from the last one's factors.
    tune_reg: bool = False
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # DSGD: start from the factors and biases of a published run (warm_start_run, else the newest
    # succeeded run under output.root); ids new since then start as in a cold start.
    warm_start: bool = False
    warm_start_run: Optional[str] = None


def resolve_trainer(t: TrainConfig) -> TrainConfig:
    """``t`` with every trainer setting set: train.<algorithm>.<key>, else train.<key>, else the trainer's default."""
    sources = (getattr(t, t.algorithm), t, TRAINER_DEFAULTS[t.algorithm])
    return dataclasses.replace(t, **{
        key: next(getattr(s, key) for s in sources if getattr(s, key) is not None) for key in TRAINER_KEYS
    })


@dataclass(frozen=True)
class SampleConfig:
    users: int = 2_000
    items: int = 1_000
    strategy: Literal["top_active", "random"] = "top_active"
    max_ratings: int = 5_000_000


@dataclass(frozen=True)
class RefineConfig:
    enabled: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sample: SampleConfig = field(default_factory=SampleConfig)
    epochs: int = 200
    lr: float = 0.01
    head: Literal["none", "mlp"] = "none"
    validation_fraction: float = 0.2
    patience: int = 10


@dataclass(frozen=True)
class EvaluateConfig:
    k: int = 10
    metrics: list[str] = field(
        default_factory=lambda: ["rmse", "mae", "precision", "recall", "ndcg", "map", "coverage"]
    )
    relevance_threshold: Optional[float] = None


@dataclass(frozen=True)
class OutputConfig:
    root: str = "./lake"
    format: Literal["parquet", "delta"] = "parquet"
    database: Optional[str] = None
    top_n: int = 10
    similar_items: int = 10
    cold_start_popular: bool = False
    broadcast_max_mb: int = 256


@dataclass(frozen=True)
class MlflowConfig:
    enabled: bool = False
    experiment: Optional[str] = None  # MLflow's default experiment when unset
    tracking_uri: Optional[str] = None  # MLflow's own default when unset (MLFLOW_TRACKING_URI; Databricks: the workspace)


@dataclass(frozen=True)
class TrackingConfig:
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass(frozen=True)
class FoldinConfig:
    """jobs/foldin.py: solve the factors of the given ratings' users (or items) against a published run's other side."""

    base_run: Optional[str] = None
    side: Literal["users", "items"] = "users"


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    input: InputConfig = field(default_factory=InputConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    foldin: FoldinConfig = field(default_factory=FoldinConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


METRIC_NAMES = ("rmse", "mae", "precision", "recall", "ndcg", "map", "coverage")


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the type ``hint``, raising ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        # Spark conf values are strings to Spark; YAML may read 4 or true.
        return {str(k): _scalar_str(v, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _scalar_str(value: Any, key: str) -> str:
    if isinstance(value, (dict, list)) or value is None:
        raise ConfigError(f"{key}: expected a scalar value, got {value!r}")
    return str(value).lower() if isinstance(value, bool) else str(value)


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known under {prefix or 'top level'}: {', '.join(sorted(names))})")
    return cls(**{k: _convert(v, hints[k], prefix + k) for k, v in raw.items()})


def _set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    """Set ``path`` (``a.b.c``) in ``raw``; keys under a dict-typed field may contain dots."""
    parts = path.split(".")
    node, cls = raw, Config
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])}")
        hint = hints[part]
        if i == len(parts) - 1:
            node[part] = value
            return
        if typing.get_origin(hint) is dict:
            node.setdefault(part, {})[".".join(parts[i + 1 :])] = value
            return
        if not dataclasses.is_dataclass(hint):
            raise ConfigError(f"config key {'.'.join(parts[: i + 1])} has no sub-keys")
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node, cls = child, hint


def _clear_trainer_sections(raw: dict[str, Any], key: str) -> None:
    """``--set train.rank=32`` means rank 32 whichever trainer runs: drop the file's train.als.rank / train.dsgd.rank."""
    section, _, name = key.partition(".")
    if section == "train" and name in TRAINER_KEYS:
        for trainer in TRAINER_DEFAULTS:
            own = raw["train"].get(trainer)
            if isinstance(own, dict):
                own.pop(name, None)


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.path=value`` strings; values are YAML scalars or lists."""
    out = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key.path=value")
        try:
            out.append((key.strip(), yaml.safe_load(text) if text else ""))
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value {text!r}: {exc.problem}") from None
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML ``path`` (or defaults), apply ``--set`` overrides and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    for key, value in parse_overrides(overrides or []):
        _set_path(raw, key, value)
        _clear_trainer_sections(raw, key)
    cfg = config_from_dict(raw)
    if cfg.run.run_id is None:
        run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_id=run_id))
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A validated Config from nested sections (a YAML file's, or a run's recorded ``Config.to_dict()``),
    its trainer settings resolved for ``train.algorithm``."""
    cfg = _build(Config, raw)
    cfg = dataclasses.replace(cfg, train=resolve_trainer(cfg.train))
    validate(cfg)
    return cfg


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# A run_id becomes a folder name (<table>/run_id=<id>, <checkpoint_dir>/<id>) and a SQL literal.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
# output.database: a SQL identifier, optionally catalog-qualified (Unity Catalog's catalog.schema).
DATABASE_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}(\.[A-Za-z_][A-Za-z0-9_]{0,127})?")


def check_run_id(run_id: str, key: str = "run.run_id") -> None:
    """Raise ConfigError unless ``run_id`` is a safe folder name: letters, digits, ``._-``, not . or .."""
    _require(
        bool(RUN_ID_PATTERN.fullmatch(run_id)) and run_id not in (".", ".."), key,
        f"{run_id!r} is not a safe run id: use 1-128 letters, digits, '.', '_' or '-' (not '.' or '..')",
    )


def _location(path: str) -> tuple[str, str, list[str]]:
    """(scheme, authority, folder names) of a path or URI; schemeless paths are made absolute."""
    parts = urlsplit(path)
    folders = parts.path if parts.scheme else os.path.abspath(path)
    return parts.scheme or "file", parts.netloc, [p for p in folders.split("/") if p not in ("", ".")]


def _contains(parent: str, child: str) -> bool:
    """Whether ``child`` is ``parent`` or lies under it."""
    (s1, a1, p1), (s2, a2, p2) = _location(parent), _location(child)
    return (s1, a1) == (s2, a2) and p2[: len(p1)] == p1


def _check_path(path: str, key: str) -> None:
    _require(bool(path.strip()) and path == path.strip(), key, f"{path!r}: expected a path or URI")
    _require(not any(ord(c) < 32 for c in path), key, f"{path!r}: control characters in a path")
    _require(".." not in urlsplit(path).path.split("/"), key, f"{path}: '..' is not allowed in a path")


_TRAINER_MINIMUM = {"rank": 1, "epochs": 1, "reg": 0, "bias_reg": 0, "bias_rounds": 1}  # step_size: > 0


def _check_trainer_settings(settings: TrainConfig | TrainerSettings, prefix: str) -> None:
    """Range checks of the trainer settings that are set (all of them, once resolved)."""
    for key in TRAINER_KEYS:
        value = getattr(settings, key)
        if value is None:
            continue
        if key == "step_size":
            _require(value > 0, f"{prefix}.{key}", f"must be > 0, got {value}")
        else:
            _require(value >= _TRAINER_MINIMUM[key], f"{prefix}.{key}", f"must be >= {_TRAINER_MINIMUM[key]}, got {value}")


def validate(cfg: Config) -> None:
    """Value checks in the spirit of Spark's ParamValidators."""
    lo_hi = cfg.input.rating_range
    _require(len(lo_hi) == 2 and lo_hi[0] < lo_hi[1], "input.rating_range", f"expected [lo, hi] with lo < hi, got {lo_hi}")
    _require(cfg.input.format == "synthetic" or bool(cfg.input.path), "input.path", f"required for input.format={cfg.input.format}")
    syn = cfg.input.synthetic
    for name in ("users", "items", "ratings", "rank"):
        _require(getattr(syn, name) >= 1, f"input.synthetic.{name}", "must be >= 1")
    _require(syn.noise >= 0, "input.synthetic.noise", "must be >= 0")
    _require(0 < cfg.split.test_fraction < 1, "split.test_fraction", f"must be in (0, 1), got {cfg.split.test_fraction}")
    _require(cfg.split.method != "file" or bool(cfg.split.test_path), "split.test_path", "required for split.method=file")
    t = cfg.train
    # The sections first, so an error names the key that was given.
    for prefix, settings in (("train.als", t.als), ("train.dsgd", t.dsgd), ("train", t)):
        _check_trainer_settings(settings, prefix)
    _require(t.implicit_alpha >= 0, "train.implicit_alpha", f"must be >= 0, got {t.implicit_alpha}")
    es = t.early_stopping
    _require(es.patience >= 1, "train.early_stopping.patience", f"must be >= 1, got {es.patience}")
    _require(es.min_delta >= 0, "train.early_stopping.min_delta", f"must be >= 0, got {es.min_delta}")
    _require(
        0 < es.validation_fraction < 1, "train.early_stopping.validation_fraction", f"must be in (0, 1), got {es.validation_fraction}",
    )
    _require(
        not es.enabled or t.algorithm == "dsgd", "train.early_stopping.enabled",
        "applies to train.algorithm: dsgd (Spark ALS fits all its train.epochs iterations in one call)",
    )
    _require(
        not t.tune_reg or t.algorithm == "dsgd", "train.tune_reg",
        "applies to train.algorithm: dsgd (Spark ALS fits one reg per call; tune it with Spark's TrainValidationSplit)",
    )
    _require(
        not t.warm_start or t.algorithm == "dsgd", "train.warm_start",
        "applies to train.algorithm: dsgd (Spark ALS takes no initial model, SPARK-21386); "
        "to add new users to an ALS run without retraining, use jobs/foldin.py",
    )
    _require(t.warm_start_run is None or t.warm_start, "train.warm_start_run", "names the run to start from; set train.warm_start: true too")
    _require(t.blocks is None or t.blocks >= 1, "train.blocks", f"must be >= 1, got {t.blocks}")
    _require(t.checkpoint_interval >= 1, "train.checkpoint_interval", "must be >= 1")
    r = cfg.refine
    _require(r.sample.users >= 1 and r.sample.items >= 1, "refine.sample", "users and items must be >= 1")
    _require(r.sample.max_ratings >= 1, "refine.sample.max_ratings", "must be >= 1")
    _require(r.epochs >= 1, "refine.epochs", "must be >= 1")
    _require(r.lr > 0, "refine.lr", "must be > 0")
    _require(0 < r.validation_fraction < 1, "refine.validation_fraction", "must be in (0, 1)")
    _require(r.patience >= 1, "refine.patience", "must be >= 1")
    _require(
        not (r.enabled and cfg.input.implicit), "refine.enabled",
        "refinement fits explicit ratings by RMSE; turn it off for input.implicit=true",
    )
    _require(cfg.evaluate.k >= 1, "evaluate.k", "must be >= 1")
    bad = sorted(set(cfg.evaluate.metrics) - set(METRIC_NAMES))
    _require(not bad, "evaluate.metrics", f"unknown metric {bad[0] if bad else ''} (known: {', '.join(METRIC_NAMES)})")
    _require(t.eval_every >= 1, "train.eval_every", "must be >= 1")
    _require(t.eval_sample >= 1, "train.eval_sample", "must be >= 1")
    _require(0 <= t.tol < 1, "train.tol", "must be in [0, 1)")
    if cfg.run.run_id is not None:
        check_run_id(cfg.run.run_id)
    for key, named in (("train.warm_start_run", t.warm_start_run), ("foldin.base_run", cfg.foldin.base_run)):
        if named is not None:
            check_run_id(named, key)
    o = cfg.output
    _check_path(o.root, "output.root")
    _check_path(cfg.run.checkpoint_dir, "run.checkpoint_dir")
    _require(
        not _contains(cfg.run.checkpoint_dir, o.root), "run.checkpoint_dir",
        f"{cfg.run.checkpoint_dir} contains output.root {o.root}: a run's checkpoint folder <checkpoint_dir>/<run_id> "
        "could then be a folder of the lake; use a folder of its own, such as <output.root>/_checkpoints",
    )
    _require(
        o.database is None or bool(DATABASE_PATTERN.fullmatch(o.database)), "output.database",
        f"{o.database!r} is not a SQL identifier (letters, digits, _; optionally catalog.schema)",
    )
    _require(o.top_n >= 0, "output.top_n", "must be >= 0")
    _require(o.similar_items >= 0, "output.similar_items", "must be >= 0")
    _require(o.broadcast_max_mb >= 0, "output.broadcast_max_mb", "must be >= 0")
