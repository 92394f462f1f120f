"""Wheels of mer_jax's runtime dependencies that the lent GPU machine's image lacks, in
.whl/ (git-ignored), for `benchmarks/gpu.sh` to install there (nothing can be fetched on
that machine).

    .venv/bin/python benchmarks/gpu_wheels.py

The dependency closure is read from this environment's installed metadata and each wheel
is pinned to the version installed here (what the tests ran against). JAX and jaxlib stay
the image's (its CUDA plugin matches them; the whole test suite passes on jax 0.11.2,
the image's version); flax, optax, orbax-checkpoint and chex are pure Python and are carried
at this environment's versions, so that the image's versions do not matter.
"""

import importlib.metadata
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The `nvidia-h200` image's packages as the device tool's KINDS.md listed them on
# 2026-11-17 (normalised names).
IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
xarray xxhash yarl zipp
""".split())
CARRIED_ANYWAY = {"flax", "optax", "orbax-checkpoint", "chex"}
KEEP_THE_IMAGES = {"jax", "jaxlib"}


def normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(root: str = "mer_jax") -> dict[str, str]:
  """{normalised name: installed version} of `root`'s dependencies, extras left out."""
  found, todo = {}, [root]
  while todo:
    name = normalise(todo.pop())
    if name in found:
      continue
    try:
      distribution = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      continue  # a marker-excluded requirement (another platform or Python)
    found[name] = distribution.version
    for requirement in distribution.requires or []:
      if "extra ==" not in requirement:
        todo.append(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])
  del found[normalise(root)]
  return found


def main() -> None:
  wanted = {name: version for name, version in sorted(runtime_closure().items())
            if name not in KEEP_THE_IMAGES and (name not in IMAGE or name in CARRIED_ANYWAY)}
  folder = os.path.join(ROOT, ".whl")
  os.makedirs(folder, exist_ok=True)
  # `pip wheel` takes a platform wheel where one exists and builds a pure-Python sdist
  # (promise) into one; this machine and the image are both x86-64 Linux, CPython 3.12.
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", folder,
                  *(f"{name}=={version}" for name, version in wanted.items())], check=True)
  size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
  print(f"{len(wanted)} wheels in {folder} ({size / 2**20:.1f} MiB; the device tool carries "
        f"64 MiB): {', '.join(wanted)}")


if __name__ == "__main__":
  main()
