"""Model folders and released weights: the msgpack release format, loading any model folder, and the
registry of the weights that ship with the package.

A release folder (``export_model``; what ``checkpoints/`` holds) is self-contained and needs no orbax::

    config.json        the full Config (lgcn_jax.config)
    params.msgpack     parameters and BatchNorm statistics (flax serialization)
    shape_model.npz    the PCA shape model (lgcn_jax.shape_model)

``load_model`` also reads a training workdir (its orbax checkpoints, ``lgcn_jax.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
from flax import serialization

from lgcn_jax import checkpoint, network
from lgcn_jax.config import Config, read_config, write_config
from lgcn_jax.errors import CheckpointError, ShapeModelError
from lgcn_jax.files import atomic_path
from lgcn_jax.machine import DEFAULTS, defaults
from lgcn_jax.predict import Model
from lgcn_jax.shape_model import FILENAME as SHAPE_MODEL_FILE
from lgcn_jax.shape_model import load_shape_model, save_shape_model

__all__ = ["PARAMS_FILE", "PRETRAINED", "DEFAULT_WEIGHTS", "export_params", "load_params", "load_model", "export_model",
           "pretrained_path", "released_names", "is_folder", "checkpoint_path", "load_pretrained", "default_weights",
           "default_model", "resolve_model"]

PARAMS_FILE = "params.msgpack"
PRETRAINED = "300w_paper"  # load_pretrained()'s default: the paper's network
# What detect(), track() and lgcn-detect use without a model (lgcn_jax.machine): the small network where JAX
# runs on the CPU, the paper's where it has an accelerator.
DEFAULT_WEIGHTS = {kind: d.weights for kind, d in DEFAULTS.items()}


def export_params(directory: str, params: network.LGCNParams, config: Config) -> None:
    """Write a compact, orbax-free checkpoint: config.json and params.msgpack (flax serialization)."""
    # The data folder is machine-specific; a released checkpoint should not point into someone's disk.
    write_config(directory, dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir="")))
    with atomic_path(os.path.join(directory, PARAMS_FILE)) as tmp, open(tmp, "wb") as f:
        f.write(serialization.msgpack_serialize(jax.device_get({"params": params.params, "batch_stats": params.batch_stats})))


def _load_release(path: str, config: Config) -> network.LGCNParams:
    # Shapes only: running init (a compiled forward pass) would cost seconds for the paper network.  The key is
    # made inside the trace: made outside, it is two small programs compiled in every fresh process.
    template = jax.eval_shape(lambda: network.init(jax.random.key(0), config, image_size=config.data.image_size))
    expected = {"params": template.params, "batch_stats": template.batch_stats}
    file = os.path.join(path, PARAMS_FILE)
    try:
        with open(file, "rb") as f:
            state = serialization.msgpack_restore(f.read())
        restored = serialization.from_state_dict(expected, state)
        shapes = jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, restored, expected)
        if not all(jax.tree_util.tree_leaves(shapes)):
            raise ValueError("array shapes differ from the network in config.json")
    except Exception as e:  # msgpack, key and shape errors alike
        raise CheckpointError(f"cannot load {file}: {type(e).__name__}: {e}\nIt is corrupt or does not match {path}/config.json; re-export it.") from e
    # On the device once: host arrays would be copied there again at every call of the network.
    restored = jax.device_put(restored)
    return template.replace(params=restored["params"], batch_stats=restored["batch_stats"])


def load_params(path: str, which: str = "best") -> tuple[network.LGCNParams, Config]:
    """Network parameters and config of a model folder: a release (config.json + params.msgpack) or a
    training workdir (its best checkpoint, or ``which="last"``; the latest if there is no best)."""
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path} is a file; a model is a folder: a run_train.py workdir or an exported checkpoint")
    config = read_config(path)
    if os.path.exists(os.path.join(path, PARAMS_FILE)):
        return _load_release(path, config), config
    if not checkpoint.has_checkpoints(path):
        # Checked before anything is created in the user's folder.
        raise CheckpointError(f"{path} holds config.json but neither {PARAMS_FILE} (an exported model) nor last/ or best/ "
                              f"(a run_train.py workdir): copy the missing {PARAMS_FILE} back, or train first with "
                              f"`python run_train.py --workdir {path}`")
    return checkpoint.restore_params(path, config, which), config


def load_model(path: str, which: str = "best", require_shape_model: bool = True, name: str | None = None) -> Model:
    """Load a trained model from a run_train.py workdir or a model folder (``export_model``'s).

    ``name`` is recorded as ``Model.name`` (default: the folder).  Raises CheckpointError /
    ShapeModelError naming the missing or corrupt file.
    """
    if not os.path.exists(path) and os.path.isdir(pretrained_path(path)):
        raise CheckpointError(f"no folder {path!r} here; {path!r} is a released checkpoint: load_pretrained({path!r}) "
                              f"(--checkpoint {path} for run_eval.py and lgcn-detect)")
    params, config = load_params(path, which=which)
    if require_shape_model or os.path.exists(os.path.join(path, SHAPE_MODEL_FILE)):
        shape_model = load_shape_model(path)
    else:
        shape_model = None
    if shape_model is not None:
        if shape_model.image_size != config.data.image_size or shape_model.num_landmarks != params.config.num_landmarks:
            raise ShapeModelError(
                f"{path}/{SHAPE_MODEL_FILE} was built for {shape_model.num_landmarks} landmarks on {shape_model.image_size} px crops, "
                f"but the network predicts {params.config.num_landmarks} on {config.data.image_size} px; rebuild it with "
                f"`python run_train.py --workdir {path} --shape_model_only`"
            )
    return Model.from_config(params, shape_model, config, name=os.path.abspath(path) if name is None else name)


def export_model(model: Model, directory: str) -> str:
    """Write ``model`` as a self-contained model folder (config.json, params.msgpack, shape_model.npz)."""
    export_params(directory, model.params, model.config)
    if model.shape_model is not None:
        save_shape_model(directory, model.shape_model)
    return directory


def _checkpoints_dir() -> str:
    env = os.environ.get("LGCN_CHECKPOINTS")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(here, "checkpoints")  # a wheel install (pyproject.toml maps checkpoints/ there)
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(here), "checkpoints")  # a checkout


def pretrained_path(name: str = PRETRAINED) -> str:
    """The folder of the released checkpoint ``name``."""
    return os.path.join(_checkpoints_dir(), name)


def released_names() -> list[str]:
    """The names of the released weights that this installation holds."""
    root = _checkpoints_dir()
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []


def _released_path(name: str, missing: str, fix: str) -> str:
    """``pretrained_path(name)``, or a ``CheckpointError`` saying ``missing``, listing the released names, and ``fix``."""
    path = pretrained_path(name)
    if not os.path.isdir(path):
        raise CheckpointError(f"{missing} at {path}; available: {released_names()}. Set LGCN_CHECKPOINTS to the folder "
                              f"holding it, or {fix}")
    return path


def is_folder(spec: str) -> bool:
    """Whether a ``--checkpoint``-like argument names a folder (an existing one, or anything with a path
    separator) rather than released weights (a bare name such as ``300w_cpu``)."""
    spec = os.fspath(spec)
    return os.path.isdir(os.path.expanduser(spec)) or os.sep in spec or bool(os.altsep and os.altsep in spec)


def checkpoint_path(checkpoint_name: str | None = None) -> str:
    """A ``--checkpoint`` argument as a folder: a folder as given (``is_folder``), else the released weights of
    that name, and ``PRETRAINED`` for None; an unknown name is a ``CheckpointError`` listing the released ones."""
    if not checkpoint_name:
        return _released_path(PRETRAINED, f"no released checkpoint {PRETRAINED!r}", "pass one")
    if is_folder(checkpoint_name):
        return checkpoint_name
    return _released_path(checkpoint_name, f"no checkpoint folder {checkpoint_name!r} here and no released checkpoint "
                                           "of that name", "give a path")


@functools.lru_cache(maxsize=4)
def load_pretrained(name: str = PRETRAINED) -> Model:
    """The released weights ``name``: ``checkpoints/NAME`` of the checkout, ``lgcn_jax/checkpoints/NAME`` in an
    installed wheel, or ``$LGCN_CHECKPOINTS/NAME`` where that is set.

    ``300w_paper`` (the default) is the paper's network trained on real 300-W faces; ``300w_cpu42``,
    ``300w_cpu48`` and ``300w_cpu`` a small network of the same family for CPUs, trained for 42x42, 48x48
    and 64x64 crops; ``synthetic_quick`` the quick preset trained on the synthetic faces of ``data_prep``
    (tests and the offline demo; not for real photos).  checkpoints/README.md gives their training commands,
    their numbers, and the 300-W licence (non-commercial research).  Other weights in the same layout
    (``export_model``) load by their name.
    """
    return load_model(_released_path(name, f"no released checkpoint {name!r}", "pass params= explicitly"), name=name)


def default_weights(backend: str | None = None) -> str:
    """The released weights that serve JAX's ``backend`` (default: ``jax.default_backend()``): the
    paper network on a GPU or TPU, the small one on a CPU (``lgcn_jax.machine.DEFAULTS``)."""
    return defaults(backend).weights


def default_model() -> Model:
    """``load_pretrained(default_weights())``: the model of ``detect``, ``track`` and ``lgcn-detect`` when none is given."""
    return load_pretrained(default_weights())


def resolve_model(model, what: str = "params") -> Model:
    """``model`` as a ``Model``: None is ``default_model()``; a name or folder is loaded (released weights by
    name, else the folder); a ``Model`` is itself."""
    if model is None:
        return default_model()
    if isinstance(model, (str, os.PathLike)):
        spec = os.fspath(model)
        path = checkpoint_path(spec)  # an unknown name: a CheckpointError listing the released ones
        return load_model(path) if is_folder(spec) else load_pretrained(spec)
    if not isinstance(model, Model):
        raise TypeError(f"{what} must be a lgcn_jax.Model, the name of released weights (e.g. '300w_cpu') or a checkpoint "
                        f"folder, or None for the default model; got {type(model).__name__}")
    return model
