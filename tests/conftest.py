import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
# One XLA compilation cache for the session: the many tests that run run_train.py, run_eval.py or a
# script in a fresh Python (they inherit this environment) compile the same tiny networks again, about
# 5 s a process on 2 cores.  Only compilations over half a second are stored; the folder goes at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lgcn_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import dataclasses
import struct
import zlib

import pytest

from lgcn_jax.config import Config, DataConfig, ModelConfig, TrainConfig

TINY_SPLITS = {"train": 48, "validation": 16, "test": 16}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Real 300-W faces for the tests that need them (non-commercial research data, never in this repository).
DEFAULT_REAL_300W = os.path.join(os.path.dirname(ROOT), "shared", "data", "300w_partial")


def _memory_maps() -> tuple[int, int]:
    """This process's memory mappings and the kernel's limit on them ((0, 0) where /proc does not tell)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            used = f.read().count(b"\n")
        with open("/proc/sys/vm/max_map_count") as f:
            return used, int(f.read())
    except (OSError, ValueError):
        return 0, 0


@pytest.fixture(autouse=True)
def _under_the_memory_map_limit():
    """Frees JAX's compiled programs when this worker nears the kernel's limit on memory mappings.

    XLA's CPU backend maps every kernel of a compiled program on its own (a post-processing program holds
    ~500 kernels, ~550 mappings), and they stay while the program is cached.  A pytest worker compiles
    hundreds of programs; past vm.max_map_count (65530 by default) LLVM cannot map the next one and the
    process aborts ("Unable to allocate section memory"): the crash that used to hit one test of the suite
    in some full runs.  Later tests compile again what they need (most of it from the persistent cache)."""
    yield
    used, limit = _memory_maps()
    if limit and used > limit // 2:
        import jax

        jax.clear_caches()


def pytest_addoption(parser):
    parser.addoption("--real-300w", default=os.environ.get("LGCN_300W_DIR", DEFAULT_REAL_300W), metavar="DIR",
                     help="folder of 300-W faces laid out as the official archives (afw/, helen/, lfpw/, ...); tests that "
                          "need it skip where it is absent (default: $LGCN_300W_DIR or ../shared/data/300w_partial)")


@pytest.fixture(scope="session")
def real_300w(request) -> str:
    """The folder of real 300-W faces (``--real-300w``); the test is skipped where it is absent."""
    path = request.config.getoption("--real-300w")
    if not os.path.isdir(path):
        pytest.skip(f"no 300-W faces at {path} (--real-300w DIR or LGCN_300W_DIR)")
    return path


def write_bomb_png(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height 8-bit gray pixels, with (almost) no pixel data: what Pillow refuses
    as a decompression bomb when it is more than twice PIL.Image.MAX_IMAGE_PIXELS."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def all_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (pjit, custom_jvp/vjp, ...), in order."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(v, "jaxpr", v)  # a ClosedJaxpr holds its Jaxpr
                if hasattr(inner, "eqns"):
                    yield from all_eqns(inner)


def tiny_config(**train_overrides) -> Config:
    """A network small enough for many unit tests to run in seconds."""
    model = ModelConfig(num_filters=8, local_5x5_layers=1, local_3x3_layers=1, global_layers=1, global_dilation=2,
                        kernel_size=15, kernel_sigmas=(0.75, 2.0, 4.0), dropout_rate=0.0)
    train = TrainConfig(batch_size=4, num_steps=6, optimizer="adam", learning_rate=1e-3, lr_decay_steps=(), lr_decay_factors=(),
                        grad_clip=0.0, log_every=2, eval_every=3, checkpoint_every=2, keep_checkpoints=2)
    train = dataclasses.replace(train, **train_overrides)
    return Config(model=model, train=train, data=DataConfig(image_size=32))


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
    """A TFDS data dir holding a small build of the synthetic-faces builder."""
    from data_prep import synthetic_tfds

    old = dict(synthetic_tfds.SPLIT_SIZES)
    synthetic_tfds.SPLIT_SIZES.update(TINY_SPLITS)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    try:
        from lgcn_jax import datasets

        datasets.load_split(DataConfig(data_dir=data_dir), "train")
    finally:
        synthetic_tfds.SPLIT_SIZES.clear()
        synthetic_tfds.SPLIT_SIZES.update(old)
    return data_dir


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, synthetic_data_dir):
    """A workdir after a few steps of the tiny config: checkpoints, config.json and shape_model.npz."""
    import lgcn_jax

    workdir = str(tmp_path_factory.mktemp("run") / "ckpt")
    cfg = lgcn_jax.apply_overrides(tiny_config(num_steps=4, eval_every=4, checkpoint_every=4), [f"data.data_dir={synthetic_data_dir}"])
    lgcn_jax.train_and_evaluate(cfg, workdir, progress=False)
    return workdir
