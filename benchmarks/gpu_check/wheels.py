"""The wheels the GPU machine lacks, carried to it in the git-ignored folder `.whl/`.

    python -m benchmarks.gpu_check.wheels            # fetch into .whl/ (replacing it), then check
    python -m benchmarks.gpu_check.wheels check      # check .whl/ only

The GPU machine (device tool, kind nvidia-h200) has no network; its image has Python 3.12, torch
2.11, transformers 5.17 and accelerate 1.15 but no trl or datasets (`IMAGE` below is its package
list, read on 2026-11-17). Binary wheels come from the registry as the device notes say (`pip
download --no-deps --only-binary=:all: --python-version 3.12 ...`, one version each). DeepSpeed
publishes only a source archive: it is built here into a pure-Python wheel with no compiled ops
(`DS_BUILD_OPS=0`), which is all the check needs (torch's AdamW, no DeepSpeed optimizer).

The check: exactly the listed wheels, one each, each installable on CPython 3.12 manylinux x86_64;
every requirement of each (and of tike-trl itself) met by another carried wheel or by the image
(by version where the image's is known); and the total small enough to travel.
"""

from __future__ import annotations

import email
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
WHEEL_DIR = ROOT / ".whl"
# name: version; the versions this project is tested with
WHEELS = {
    "trl": "1.16.0",
    "datasets": "5.2.0",
    "dill": "0.4.1",  # datasets
    "multiprocess": "0.70.19",  # datasets
    "peft": "0.21.2",  # the image has a peft of unknown version: carry the tested one
    "hjson": "3.1.0",  # deepspeed
    "pydantic": "2.14.4",  # deepspeed
    "pydantic-core": "2.50.5",  # pydantic (compiled: cp312 manylinux)
    "annotated-types": "0.8.0",  # pydantic
    "typing-inspection": "0.4.5",  # pydantic
    "typing-extensions": "4.16.0",  # pydantic needs >= 4.16; the image's version is unknown
    "math-verify": "0.9.0",  # tike-trl's math rewards
    "latex2sympy2-extended": "1.11.0",  # math-verify
    "antlr4-python3-runtime": "4.13.2",  # latex2sympy2-extended
}
BUILT = {"deepspeed": "0.19.8"}  # source archive only on PyPI: built here, no ops
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PLATFORMS += ("manylinux1_x86_64",)
MAX_WHEELS_BYTES = 32 * 2**20  # the device takes 64 MiB in all, the working tree included

# the GPU image's Python packages (device notes, KINDS.md, read 2026-11-17)
IMAGE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()
# the versions a session saw there (KINDS.md's pip list, 2026-11)
IMAGE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}
MARKER_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def fetch(dest: Path = WHEEL_DIR, python: str = sys.executable) -> None:
    """Replace `dest` with exactly the carried set."""
    for old in dest.glob("*.whl"):
        old.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pins = [f"{name}=={version}" for name, version in WHEELS.items()]
    pip = [python, "-m", "pip"]
    subprocess.run(
        [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
        + ["--implementation", "cp", *platforms, "-d", str(dest), *pins],
        check=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, version in BUILT.items():
            pin = f"{name}=={version}"
            subprocess.run([*pip, "download", "-q", "--no-deps", "--no-binary=:all:", "-d", tmp, pin], check=True)
            (sdist,) = Path(tmp).glob(f"{name}-{version}.tar.gz")
            subprocess.run(
                [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), str(sdist)],
                check=True,
                env={**os.environ, "DS_BUILD_OPS": "0"},
            )


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        return email.message_from_bytes(z.read(name))


def _installable(tags) -> bool:
    return any(
        t.interpreter in ("py3", "cp312", "py312")
        and t.abi in ("none", "abi3", "cp312")
        and (t.platform == "any" or t.platform in PLATFORMS)
        for t in tags
    )


def _pyproject_requirements() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def check(dest: Path = WHEEL_DIR) -> list[str]:
    """Problems with the carried set in `dest` (none: it is complete); prints the table."""
    problems = []
    wanted = {canonicalize_name(n): v for n, v in {**WHEELS, **BUILT}.items()}
    found: dict[str, tuple[Version, Path]] = {}
    for wheel in sorted(dest.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if name in found:
            problems.append(f"two wheels of {name}: {found[name][1].name}, {wheel.name}")
        found[name] = (version, wheel)
        if not _installable(tags):
            problems.append(f"{wheel.name}: not installable on CPython 3.12, manylinux x86_64")
    for name, version in wanted.items():
        if name not in found:
            problems.append(f"missing: {name}=={version}")
        elif found[name][0] != Version(version):
            problems.append(f"{name}: {found[name][0]} carried, {version} wanted")
    problems += [f"not in the list: {found[name][1].name}" for name in found if name not in wanted]
    image = {canonicalize_name(n) for n in IMAGE}
    versions = {canonicalize_name(n): Version(v) for n, v in IMAGE_VERSIONS.items()}
    carried = {name: version for name, (version, _) in found.items()}
    unknown = set()
    needs = [(w.name, r) for _, w in found.values() for r in _metadata(w).get_all("Requires-Dist") or []]
    needs += [("tike-trl (pyproject.toml)", r) for r in _pyproject_requirements()]
    for who, line in needs:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(MARKER_ENV):
            continue  # an extra, or another platform
        name = canonicalize_name(req.name)
        have = carried.get(name, versions.get(name))
        if name not in carried and name not in image:
            problems.append(f"{who} needs {line}: neither carried nor on the image")
        elif have is None:
            if req.specifier:
                unknown.add(f"{req.name}{req.specifier}")
        elif req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{who} needs {line}: {have} {'carried' if name in carried else 'on the image'}")
    total = sum(w.stat().st_size for _, w in found.values())
    for name, (version, wheel) in sorted(found.items()):
        print(f"{wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:6.2f} MiB  total, {len(found)} wheels")
    if unknown:
        print("met on the image only if its (unrecorded) versions fit:", ", ".join(sorted(unknown)))
    if total > MAX_WHEELS_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB of wheels: more than {MAX_WHEELS_BYTES / 2**20:.0f} MiB")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] not in ([], ["check"]):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    if not argv:
        fetch()
    problems = check()
    for problem in problems:
        print("problem:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
