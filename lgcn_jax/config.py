"""Configuration as data: one frozen dataclass tree, presets, and CLI overrides.

Every number of the architecture, the loss and the training schedule lives
here; docs/architecture.md says where each default comes from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from typing import Any, Mapping, Sequence

from lgcn_jax.errors import CheckpointError
from lgcn_jax.files import atomic_path

__all__ = [
    "ModelConfig",
    "TrainConfig",
    "DataConfig",
    "PostprocessConfig",
    "ExecutionConfig",
    "Config",
    "PRESETS",
    "EXECUTION_FIELDS",
    "get_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "read_config",
    "write_config",
    "CONFIG_FILE",
]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The LGCN network.  Defaults are the authors' 128-filter model."""

    num_landmarks: int = 68
    num_filters: int = 128
    local_5x5_layers: int = 5  # local-context subnet: 5x5 conv-BN-ReLU blocks ...
    local_3x3_layers: int = 10  # ... followed by 3x3 blocks
    global_layers: int = 7  # global-context subnet: dilated 3x3 blocks
    global_dilation: int = 4
    # Kernel of the kernel convolution: a mixture of isotropic Gaussians fitted to
    # the 45x45 kernel the authors released (max deviation 0.8% of its peak).
    kernel_size: int = 45
    kernel_weights: tuple[float, ...] = (0.2215, 0.3424, 0.4283)
    kernel_sigmas: tuple[float, ...] = (1.1203, 3.871, 7.9291)
    kernel_output_scale: float = 0.01  # blurred maps are scaled by this
    activation_scale: float = 0.1  # ReLU output is scaled by this
    dropout_rate: float = 0.1
    # 0: inference uses the statistics of the last training batch, as the authors'
    # CNTK setting (time constant 0) does; an average lags behind fast-moving weights.
    bn_momentum: float = 0.0
    bn_epsilon: float = 1e-5
    init_scale: float = 0.141421  # multiplies the He-normal std of every conv


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How the network runs, not what it computes: a checkpoint made with any of these settings restores,
    resumes, fine-tunes and evaluates with any other (the same weights; the results differ by float rounding)."""

    # How the dilated global convolutions run, not what they compute: True runs the global subnet on
    # the dilation x dilation interleaved sub-grids of its input as separate images (plain 3x3 convs;
    # when the map side divides by the dilation), False uses dilated convolutions.  Same function and
    # weights either way; see network.to_phases for why.
    dilation_as_phases: bool = True
    # Arithmetic of the convolution blocks: "float32", or "bfloat16" for the convolutions and the
    # activations they read and write (half the memory traffic; bf16 tensor cores on GPUs); BatchNorm,
    # ReLU and dropout compute in f32 on the way.  Parameters, BatchNorm statistics, the 1x1 heads,
    # the blur, the outputs and the loss stay f32, so weights and checkpoints are the same either way.
    compute_dtype: str = "float32"
    # True: each block's BatchNorm -> ReLU -> dropout is one op with a hand-written backward pass
    # that saves only the convolution output and the dropout mask (lgcn_jax/batch_norm.py); False
    # leaves the same arithmetic to autodiff.  Same function and weights either way.
    fused_batch_norm: bool = True
    # True: inference with float32 blocks folds each BatchNorm and the activation scale into the
    # convolution before it (batch_norm.fold_into_conv), so a block is one convolution + ReLU, which a
    # GPU runs as one cuDNN call.  Training, compute_dtype=bfloat16 and False run the unfolded
    # arithmetic.  Same function (to float rounding) and weights either way.
    fold_batch_norm: bool = True
    # True: where the local subnet has fewer features than landmarks, the main head's 1x1 convolution runs
    # after the blur instead of before it (the blur is linear: blur(x W + b) = blur(x) W + blur(1) b), so
    # fewer maps are blurred; with fold_batch_norm, inference also composes that head into the first global
    # block's convolution, which then reads the blurred features.  Same function (to float rounding) and weights.
    blur_features: bool = True
    # How the blur's two matmuls take a batch: "image" runs them one image at a time (on a CPU faster
    # per image for batches: the intermediate maps stay in cache), "batch" as one batched
    # matmul each (GPUs; the exported ONNX and TFLite graphs), "auto" the first on a CPU and the second
    # elsewhere, chosen when the program is lowered for its platform.  Same function either way.
    blur_batching: str = "auto"


BLUR_BATCHING = ("auto", "image", "batch")

# The fields of ExecutionConfig; configs written before it existed keep them in their "model" section.
EXECUTION_FIELDS = frozenset(f.name for f in dataclasses.fields(ExecutionConfig))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation.  Defaults follow the authors' training script (momentum SGD)."""

    batch_size: int = 16
    num_steps: int = 19700  # ~100 epochs of the 3148 300-W training faces at batch 16
    optimizer: str = "momentum"  # "momentum" (authors) or "adam"
    learning_rate: float = 0.016  # per-sample 0.001 of the authors x batch 16 (mean loss)
    lr_decay_steps: tuple[int, ...] = (1970, 3940, 5910, 7880, 9850)  # epochs 11, 21, 31, 41, 51
    lr_decay_factors: tuple[float, ...] = (0.5, 0.4, 0.5, 0.5, 0.4)  # 1e-3 -> 5e-4 -> 2e-4 -> 1e-4 -> 5e-5 -> 2e-5
    momentum: float = 0.9
    grad_clip: float = 0.1  # element-wise clipping of the gradient (0 disables)
    loss_scale: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_batches: int = 0  # 0: the whole validation split
    # Before each validation and in every saved best checkpoint, BatchNorm statistics are the
    # population statistics of this many batches of (unaugmented) training crops; 0 keeps the
    # statistics of the last training batch (the authors' CNTK behaviour).
    bn_recalibration_batches: int = 50
    # A batch whose loss or gradient is not finite: stop the run (False; the last good checkpoint is
    # kept) or leave the parameters unchanged for that batch and go on, counting such batches (True).
    skip_nonfinite: bool = False
    # Fine-tuning: a fresh run starts from these weights instead of random ones. A checkpoint folder
    # (a workdir's best checkpoint, or an exported folder) or the name of released weights
    # ("300w_paper"). The network must be the same; its parameters and BatchNorm statistics are
    # taken, the optimiser starts afresh at step 0. A run that resumes restores its own checkpoint.
    init_from: str = ""
    # Distillation: another network's heatmaps of each training crop (computed once at the start and kept in
    # WORKDIR/teacher_maps.npz) take this share of the loss's target, moved with the crop by the augmentation.
    # A checkpoint folder or released weights ("300w_paper") of the same dataset and landmarks; "" for none.
    distill_from: str = ""
    distill_weight: float = 0.5


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where faces come from and how they are augmented."""

    dataset: str = "synthetic"  # "synthetic" (built locally, no download) or "300w"
    data_dir: str = ""  # TFDS data dir; "" -> ~/tensorflow_datasets
    image_size: int = 96
    augment: bool = True
    max_rotation_deg: float = 15.0
    max_scale_delta: float = 0.1
    max_shift_frac: float = 0.05
    flip: bool = True
    brightness_delta: float = 0.15
    contrast_range: tuple[float, float] = (0.7, 1.3)
    num_parallel_calls: int = -1  # threads of the tf.data stream (-1: tf.data.AUTOTUNE)
    # Training stream: "tf" (tf.data gathers and prefetches on its threads), "jax" (NumPy, no TensorFlow)
    # or "auto" (tf where TensorFlow is installed); either way the step augments on the device.
    pipeline: str = "auto"
    # 300-W: faces held out of train (whole photos, picked by a hash of the file name) on which
    # the best checkpoint is selected; the test subsets are never used for selection.  0: no holdout
    # (validation then falls back to the common subset, which the log warns about).
    validation_faces: int = 200


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    """Heatmaps -> landmarks with the PCA shape model.  Defaults are the authors' [M], except the sub-pixel
    peak fits, test-time mirroring and the x offset, which are ours (docs/architecture.md)."""

    use_shape_model: bool = True  # False: per-map arg-max with sub-pixel refinement only
    num_components: int = 12  # principal components used in the fit (at most those stored)
    confidence_threshold: float = 0.1  # heatmap value at a point for it to count in the rotation estimate
    weight_floor: float = 0.01  # heatmap values at or below this carry no weight in the fit
    constraints: bool = True  # keep the fit within the coordinate orders of all training shapes
    # Local refits use only pixels within these half-widths (pixels of a 96-pixel heatmap,
    # scaled with the heatmap size) of the previous fit; () switches local fitting off.
    local_windows: tuple[int, ...] = (20, 7)
    blend: bool = True  # final point: mix of the fit and the nearest local maximum, by its value
    # Sub-pixel refinement of every peak (the arg-max, and the local maximum of the blend): 1 fits a parabola to
    # the logs of a pixel and its two neighbours along x and y; r > 1 fits a 2D quadratic to the logs of the
    # (2r+1)^2 window by least squares (r in pixels of a 96-pixel heatmap, scaled with the heatmap size).
    peak_fit_radius: int = 8
    solver_iterations: int = 30  # interior-point iterations of the constrained least squares
    # Test-time mirroring: the network also runs on the mirrored image, and its heatmaps, mirrored back with
    # the 68-point permutation, are averaged with the image's before decoding.  Twice the network's cost;
    # not in the paper (docs/decoding.md has what it changes).
    flip_test: bool = False
    # Added to every decoded x (pixels of the heatmaps).  Mirror augmentation mirrors the labels about the
    # crop's centre; where a dataset's labels sit off the image content horizontally (300-W: ~0.3 px of a
    # 96-px crop), the mirrored half of training cancels that offset, so the network cannot learn it and its x
    # is biased by minus the offset.  Measured on held-out training faces (evaluation.horizontal_offset).
    x_offset: float = 0.0


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    execution: ExecutionConfig = ExecutionConfig()


def _quick() -> Config:
    # Small enough to train to a useful NME on 2 CPU cores in a few minutes.
    # 64x64 inputs with the kernel scaled by 2/3 (31x31): the blur's cost grows with
    # the cube of the side, and this keeps a step well under a second on 2 cores.
    s = 2.0 / 3.0
    paper = ModelConfig()
    return Config(
        model=ModelConfig(
            num_filters=16, local_5x5_layers=2, local_3x3_layers=3, global_layers=3, dropout_rate=0.0,
            kernel_size=31, kernel_sigmas=tuple(round(x * s, 4) for x in paper.kernel_sigmas), global_dilation=3,
        ),
        data=DataConfig(image_size=64),
        train=TrainConfig(
            batch_size=16,
            num_steps=600,
            optimizer="adam",
            learning_rate=2e-3,
            lr_decay_steps=(400, 520),
            lr_decay_factors=(0.3, 0.3),
            grad_clip=0.0,
            log_every=20,
            eval_every=200,
            checkpoint_every=100,
        ),
    )


def _cpu() -> Config:
    # What two CPU cores train on real 300-W faces in about 100 minutes (10 img/s): 32 filters,
    # 3 + 6 local and 4 global blocks, 64x64 crops with the kernel scaled as in "quick" and, as there,
    # no dropout; 3800 steps of 16 are 33 epochs of the 1813 training faces left after the holdout.
    quick = _quick()
    return dataclasses.replace(
        quick,
        model=dataclasses.replace(quick.model, num_filters=32, local_5x5_layers=3, local_3x3_layers=6, global_layers=4),
        data=dataclasses.replace(quick.data, dataset="300w"),
        train=dataclasses.replace(quick.train, num_steps=3800, lr_decay_steps=(2800, 3400), log_every=25,
                                  eval_every=200, checkpoint_every=200),
    )


PRESETS: dict[str, Any] = {
    "paper": lambda: Config(),
    "paper64": lambda: Config(model=ModelConfig(num_filters=64)),
    "quick": _quick,
    "cpu": _cpu,
}


def get_config(preset: str = "paper") -> Config:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]()


def _parse_value(text: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is tuple:
        args = typing.get_args(typ)
        elem = args[0]
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        vals = tuple(_parse_value(p.strip(), elem, key) for p in parts)
        if len(args) == 2 and args[1] is not Ellipsis and len(vals) != len(args):
            raise ValueError(f"{key} needs {len(args)} comma-separated values, got {text!r}")
        return vals
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        if typ is str:
            return text
    except ValueError:
        pass
    raise ValueError(f"cannot read {text!r} as {getattr(typ, '__name__', typ)} for {key}")


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Return ``config`` with ``section.field=value`` overrides applied.

    >>> apply_overrides(get_config("paper"), ["model.num_filters=64"]).model.num_filters
    64
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.field=value (e.g. model.num_filters=64)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        sections = {f.name for f in dataclasses.fields(Config)}
        if len(parts) != 2 or parts[0] not in sections:
            raise ValueError(f"unknown config key {key!r}; keys look like section.field with section in {sorted(sections)}")
        section_name, field_name = parts
        if section_name == "model" and field_name in EXECUTION_FIELDS:
            section_name = "execution"  # the spelling of configs before ExecutionConfig
        section = getattr(config, section_name)
        hints = typing.get_type_hints(type(section))
        if field_name not in hints:
            raise ValueError(
                f"unknown config key {key!r}; fields of {section_name}: {', '.join(sorted(hints))}"
            )
        value = _parse_value(text.strip(), hints[field_name], key)
        config = dataclasses.replace(config, **{section_name: dataclasses.replace(section, **{field_name: value})})
    validate(config)
    return config


def validate(config: Config) -> None:
    m, t, d = config.model, config.train, config.data
    if m.kernel_size % 2 == 0 or m.kernel_size < 1:
        raise ValueError(f"model.kernel_size must be odd and positive, got {m.kernel_size}")
    if len(m.kernel_weights) != len(m.kernel_sigmas):
        raise ValueError("model.kernel_weights and model.kernel_sigmas need the same length")
    if len(t.lr_decay_steps) != len(t.lr_decay_factors):
        raise ValueError("train.lr_decay_steps and train.lr_decay_factors need the same length")
    if t.optimizer not in ("momentum", "adam"):
        raise ValueError(f"train.optimizer must be 'momentum' or 'adam', got {t.optimizer!r}")
    if d.dataset not in ("synthetic", "300w"):
        raise ValueError(f"data.dataset must be 'synthetic' or '300w', got {d.dataset!r}")
    for name in ("num_filters", "num_landmarks"):
        if getattr(m, name) < 1:
            raise ValueError(f"model.{name} must be positive")
    if config.execution.blur_batching not in BLUR_BATCHING:
        raise ValueError(f"execution.blur_batching must be one of {', '.join(map(repr, BLUR_BATCHING))}, got {config.execution.blur_batching!r}")
    if config.execution.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"execution.compute_dtype must be 'float32' or 'bfloat16', got {config.execution.compute_dtype!r}")
    if d.pipeline not in ("auto", "tf", "jax"):
        raise ValueError(f"data.pipeline must be 'auto', 'tf' or 'jax', got {d.pipeline!r}")
    if d.validation_faces < 0:
        raise ValueError(f"data.validation_faces must be >= 0, got {d.validation_faces}")
    if t.batch_size < 1 or t.num_steps < 0:
        raise ValueError("train.batch_size must be positive and train.num_steps non-negative")
    for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        if getattr(t, name) < 1:
            raise ValueError(f"train.{name} must be at least 1, got {getattr(t, name)} (a large value makes it rare)")
    if not (math.isfinite(t.learning_rate) and t.learning_rate > 0):
        raise ValueError(f"train.learning_rate must be a positive number, got {t.learning_rate}")
    if not 0.0 <= t.distill_weight <= 1.0:
        raise ValueError(f"train.distill_weight is the teacher's share of the target, in [0, 1]; got {t.distill_weight}")
    if not 0.0 <= m.dropout_rate < 1.0:
        raise ValueError(f"model.dropout_rate must be in [0, 1), got {m.dropout_rate}")
    if d.image_size < 8:
        raise ValueError(f"data.image_size must be at least 8 pixels, got {d.image_size}")
    pp = config.postprocess
    if pp.num_components < 1 or pp.solver_iterations < 1:
        raise ValueError("postprocess.num_components and postprocess.solver_iterations must be positive")
    if not math.isfinite(pp.x_offset):
        raise ValueError(f"postprocess.x_offset must be a finite number of pixels, got {pp.x_offset}")
    if pp.flip_test and m.num_landmarks != 68:
        raise ValueError(f"postprocess.flip_test needs the 68-point markup (its left/right permutation), not {m.num_landmarks} points")
    if not isinstance(pp.peak_fit_radius, int) or isinstance(pp.peak_fit_radius, bool) or pp.peak_fit_radius < 1:
        raise ValueError(f"postprocess.peak_fit_radius must be an integer >= 1 (1: the 3-point fit), got {pp.peak_fit_radius!r}")
    if any(w < 1 for w in pp.local_windows):
        raise ValueError(f"postprocess.local_windows must be positive half-widths, got {pp.local_windows}")


def config_to_dict(config: Config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _check_stored(value: Any, typ: Any, key: str) -> Any:
    """A value read from JSON as the field's type (lists -> tuples, ints -> floats where floats are due)."""
    if typing.get_origin(typ) is tuple:
        args = typing.get_args(typ)
        if isinstance(value, (list, tuple)) and (args[-1] is Ellipsis or len(value) == len(args)):
            return tuple(_check_stored(v, args[0], key) for v in value)
    elif typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{key} is {value!r}, not of type {getattr(typ, '__name__', typ)}")


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """A Config from ``config_to_dict``'s output (e.g. a stored config.json): unknown fields, values of
    the wrong type and invalid values raise ValueError naming the field.  A config written before the
    ``execution`` section existed (its fields in ``model``) reads as it was meant."""
    sections_known = {f.name for f in dataclasses.fields(Config)}
    unknown = set(d) - sections_known
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)} in stored config (an lgcn_jax config has {', '.join(sorted(sections_known))})")
    d = {name: dict(d.get(name, {})) for name in sections_known}
    for name in EXECUTION_FIELDS & set(d["model"]):
        d["execution"].setdefault(name, d["model"].pop(name))
    sections = {}
    for f in dataclasses.fields(Config):
        cls = _SECTIONS[f.name]
        hints = typing.get_type_hints(cls)
        raw = d[f.name]
        unknown = set(raw) - set(hints)
        if unknown:
            raise ValueError(f"unknown {f.name} fields in stored config: {sorted(unknown)}")
        kwargs = {k: _check_stored(v, hints[k], f"{f.name}.{k}") for k, v in raw.items()}
        sections[f.name] = cls(**kwargs)
    config = Config(**sections)
    validate(config)
    return config


_SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "postprocess": PostprocessConfig, "execution": ExecutionConfig}
CONFIG_FILE = "config.json"


def read_config(folder: str) -> Config:
    """The ``config.json`` of a workdir or model folder; ``CheckpointError`` naming it when absent or unreadable."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist: {folder} is not an lgcn_jax workdir or checkpoint folder "
                              f"(train one with run_train.py --workdir {folder})")
    try:
        with open(path) as f:
            return config_from_dict(json.load(f))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt or from an incompatible lgcn_jax version ({e}); move it away or use another --workdir") from e


def write_config(folder: str, config: Config) -> str:
    """Write ``folder/config.json`` (atomically: never a half-written config); returns its path."""
    path = os.path.join(folder, CONFIG_FILE)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
    return path
