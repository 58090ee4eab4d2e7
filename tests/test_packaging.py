"""A wheel of the project (what `pip install .` or `pip install git+...` installs) works outside the checkout.

The editable install of the README finds everything in the checkout; a wheel holds only what pyproject.toml
declares, so the released weights and the YuNet detector files must be declared there.  Built from a copy of the
sources, without network (no build isolation).  TensorFlow is an extra: a plain install does not pull it in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import lgcn_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "run_train.py", "run_eval.py", "lgcn_jax", "data_prep", "checkpoints")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", minversion="77")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    out = tmp / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(out), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (path,) = out.glob("lgcn_jax-*.whl")
    return path


def test_the_wheel_holds_the_weights_the_detector_and_the_command_modules(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert f"\nVersion: {lgcn_jax.__version__}\n" in metadata  # one version, in lgcn_jax/__init__.py
    released = [d for d in os.listdir(os.path.join(ROOT, "checkpoints")) if os.path.isdir(os.path.join(ROOT, "checkpoints", d))]
    assert {"300w_paper", "300w_cpu42", "300w_cpu48", "300w_cpu", "synthetic_quick"} <= set(released)
    for name in released:
        for f in os.listdir(os.path.join(ROOT, "checkpoints", name)):
            assert f"lgcn_jax/checkpoints/{name}/{f}" in names
    for f in os.listdir(os.path.join(ROOT, "lgcn_jax", "weights")):
        if f != "__pycache__":
            assert f"lgcn_jax/weights/{f}" in names
    assert {"lgcn_jax/cli/train.py", "lgcn_jax/checkpoints/README.md", "data_prep/build_300w.py"} <= names
    for command, target in (("lgcn-train", "lgcn_jax.cli.train:main"), ("lgcn-eval", "lgcn_jax.cli.eval:main"),
                            ("lgcn-detect", "lgcn_jax.cli.detect:main"), ("lgcn-export", "lgcn_jax.cli.export:main"),
                            ("lgcn-extract", "lgcn_jax.cli.extract:main")):
        assert f"{command} = {target}" in entry_points
    assert not any(n.startswith(("tests/", "bench/", "docs/")) for n in names)
    # Inference and TF-free training need no TensorFlow; building datasets and the tf.data stream take the extra.
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    plain = [r for r in requires if "extra ==" not in r]
    assert plain and not [r for r in plain if r.lower().startswith(("tensorflow", "tf-", "tensorflow-datasets"))], plain
    assert any(r.startswith("tensorflow-cpu") and 'extra == "data"' in r for r in requires), requires
    # The exporters and the runtimes they target are an extra too (lgcn-export names it when missing).
    assert not [r for r in plain if r.lower().startswith(("jax2onnx", "onnx", "ai-edge-litert"))], plain
    assert any(r.startswith("jax2onnx") and 'extra == "export"' in r for r in requires), requires
    # lgcn-extract's Ray and pyarrow: the [extract] extra, never a plain install's.
    assert not [r for r in plain if r.lower().startswith(("ray", "pyarrow"))], plain
    assert any(r.startswith("ray[data]") and 'extra == "extract"' in r for r in requires), requires


def test_an_installed_wheel_loads_the_default_weights_from_inside_the_package(wheel, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    probe = (
        "import json, lgcn_jax, lgcn_jax.cli.train, lgcn_jax.cli.eval\n"
        "from lgcn_jax.release import PRETRAINED, pretrained_path\n"
        "m = lgcn_jax.load_pretrained()\n"
        "print(json.dumps({'files': [lgcn_jax.__file__, lgcn_jax.cli.train.__file__, lgcn_jax.cli.eval.__file__],\n"
        "                  'weights': pretrained_path(), 'name': PRETRAINED, 'filters': m.config.model.num_filters}))\n"
    )
    def tree():
        return sorted((os.path.relpath(os.path.join(d, f), target), os.path.getmtime(os.path.join(d, f)))
                      for d, _, fs in os.walk(target) if "__pycache__" not in d for f in fs)

    before = tree()
    env = {k: v for k, v in os.environ.items() if k != "LGCN_CHECKPOINTS"}
    env["PYTHONPATH"] = str(target)  # ahead of the editable install of the checkout
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for f in got["files"]:
        assert os.path.realpath(f).startswith(os.path.realpath(target)), f
    assert os.path.realpath(got["weights"]) == os.path.realpath(target / "lgcn_jax" / "checkpoints" / got["name"])
    with open(os.path.join(ROOT, "checkpoints", got["name"], "config.json")) as f:
        assert got["filters"] == json.load(f)["model"]["num_filters"]
    assert tree() == before  # site-packages may be read-only: loading writes nothing there


def test_every_module_has_a_place_in_the_layers():
    """pyproject.toml's import-linter contract (checked by `lint-imports` in .ci/run) names every module of the
    package, so a new one cannot slip past the layering unplaced."""
    import pkgutil
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    placed = {name.strip() for layer in layers for name in layer.replace(":", "|").split("|")}
    modules = {f"lgcn_jax.{m.name}" for m in pkgutil.iter_modules(lgcn_jax.__path__) if m.name not in ("weights", "checkpoints")}
    assert modules == placed, (sorted(modules - placed), sorted(placed - modules))


def test_detect_runs_where_tensorflow_is_not_installed(tmp_path):
    """lgcn-detect on a photo with TensorFlow made unimportable (as after `pip install lgcn_jax` without extras):
    it finds the face and never imports TensorFlow; .ci/run also installs the package without extras and runs it."""
    import matplotlib

    photo = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
            "from lgcn_jax.cli.detect import main\n"
            f"rc = main([{photo!r}, '--out', {str(tmp_path)!r}, '--no_progress', '--no_cache'])\n"
            "assert not [m for m in sys.modules if m.startswith('tensorflow') and sys.modules[m] is not None], 'TF was imported'\n"
            "sys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads((tmp_path / "grace_hopper.json").read_text())["faces"]) == 1
