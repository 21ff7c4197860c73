"""Fixtures: the test images (built once per run with umoci and skopeo) and real registries
(Debian's docker-registry, anonymous and behind bearer-token auth)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotstart.emulate.registry import DockerRegistry, TokenService
from tests.image import builder
from tests.image.builder import OciBuilder, dir_, file, hardlink, opaque, symlink, whiteout

SITE = "usr/local/lib/python3.11/site-packages"
WEIGHTS = 2 * 1024 * 1024

# What each rule must find in the bloat image, byte for byte (see bloat_layers).
EXPECTED = {
    "package-caches": 30000 + 6000,
    "baked-weights": WEIGHTS,
    "apt-lists-caches": 13000 + 2000,
    "build-artifacts": 17000 + 1500,
    "profilers": 11000,
    "compilers-headers": 3000 + 5000 + 7000 + 9000,
    "bytecode-outside-site-packages": 3000,
    "tests-docs-in-site-packages": 4000 + 1000,
    "nvidia-wheels-duplicate-cuda": 50000,
    "several-frameworks": 100,
    "triton-backends-unused": 4000 + 9000 + 12000,
}
# Hidden by later layers: the pip cache (whiteout of /root/.cache), the first server.py
# (overwritten), tensorflow's first files (opaque directory). The hardlinked config keeps its
# bytes alive through its second name.
HIDDEN_BY_LAYER = {0: 0, 1: 30000 + 500 + 8000, 2: 2000, 3: 0}
NOT_COUNTED = {"triton-backends-unused"}  # which backends are used is not known by default


def bloat_layers() -> list[tuple[str, list[builder.Member]]]:
    cuda = "usr/local/cuda-12.4"
    return [
        (
            "FROM nvidia/cuda:12.4-devel (stand-in)",
            [
                dir_("usr"),
                dir_("usr/local"),
                dir_(cuda),
                dir_(f"{cuda}/lib64"),
                file(f"{cuda}/lib64/libcublas.so.12.4.5.8", 40000),
                symlink(f"{cuda}/lib64/libcublas.so.12", "libcublas.so.12.4.5.8"),
                dir_(f"{cuda}/include"),
                file(f"{cuda}/include/cuda.h", 3000),
                dir_(f"{cuda}/bin"),
                file(f"{cuda}/bin/nvcc", 5000),
                dir_("usr/bin"),
                file("usr/bin/gcc-12", 7000),
                dir_("usr/lib"),
                dir_("usr/lib/gcc"),
                dir_("usr/lib/gcc/x86_64-linux-gnu"),
                dir_("usr/lib/gcc/x86_64-linux-gnu/12"),
                file("usr/lib/gcc/x86_64-linux-gnu/12/cc1", 9000),
                dir_("opt"),
                dir_("opt/nvidia"),
                dir_("opt/nvidia/nsight-systems-2024.1"),
                dir_("opt/nvidia/nsight-systems-2024.1/bin"),
                file("opt/nvidia/nsight-systems-2024.1/bin/nsys", 11000),
                dir_("var"),
                dir_("var/lib"),
                dir_("var/lib/apt"),
                dir_("var/lib/apt/lists"),
                file("var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease", 13000),
                file("var/lib/apt/lists/lock", 0),
                dir_("var/cache"),
                dir_("var/cache/apt"),
                file("var/cache/apt/pkgcache.bin", 2000),
                dir_("etc"),
                file("etc/big.conf", 7777),
                hardlink("etc/big.link", "etc/big.conf"),
            ],
        ),
        (
            "RUN pip install -r requirements.txt",
            [
                dir_("root"),
                dir_("root/.cache"),
                dir_("root/.cache/pip"),
                file("root/.cache/pip/http/ab/cd/wheel-body", 30000),
                dir_("opt/conda"),
                dir_("opt/conda/pkgs"),
                file("opt/conda/pkgs/foo-1.0.tar.bz2", 6000),
                dir_(f"{SITE}"),
                dir_(f"{SITE}/nvidia"),
                file(f"{SITE}/nvidia/cublas/lib/libcublas.so.12", 50000),
                file(f"{SITE}/nvidia/cudnn/lib/libcudnn.so.9", 20000),
                file(f"{SITE}/torch/__init__.py", 1000),
                file(f"{SITE}/torch/lib/libtorch_cuda.so", 60000),
                file(f"{SITE}/tensorflow/__init__.py", 500),
                file(f"{SITE}/tensorflow/libtf.so", 8000),
                file(f"{SITE}/numpy/tests/test_core.py", 4000),
                file(f"{SITE}/numpy/doc/readme.txt", 1000),
                file(f"{SITE}/numpy/__pycache__/core.cpython-311.pyc", 700),
            ],
        ),
        (
            "COPY . /app",
            [
                dir_("app"),
                file("app/server.py", 2000),
                file("app/__pycache__/server.cpython-311.pyc", 3000),
                file("app/.git/objects/pack/pack-1.pack", 17000),
                file("app/build/lib/fast.o", 1500),
                file("models/llama/model.safetensors", WEIGHTS),
                file("opt/tritonserver/backends/python/libtriton_python.so", 4000),
                file("opt/tritonserver/backends/onnxruntime/libort.so", 9000),
                file("opt/tritonserver/backends/tensorrt/libtrt.so", 12000),
            ],
        ),
        (
            "RUN rm -rf /root/.cache && reinstall tensorflow",
            [
                whiteout("root/.cache"),
                file("app/server.py", 2500),
                hardlink("app/server2.py", "app/server.py"),
                whiteout("etc/big.conf"),
                dir_(f"{SITE}/tensorflow"),
                file(f"{SITE}/tensorflow/__init__.py", 100),
                opaque(f"{SITE}/tensorflow"),
            ],
        ),
    ]


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bloat image as an OCI layout (tag v1), v2 (torch reinstalled over the first), and
    its copies: docker-archive, oci-archive, zstd OCI layout."""
    root = tmp_path_factory.mktemp("images")
    b = OciBuilder(root / "oci", "v1")
    for created_by, members in bloat_layers():
        b.layer(members, created_by)
    builder.run("umoci", "tag", "--image", f"{root / 'oci'}:v1", "v2")
    OciBuilder(root / "oci", "v2", new=False).layer(
        [
            file(f"{SITE}/torch/__init__.py", 1000),
            file(f"{SITE}/torch/lib/libtorch_cuda.so", 60000),
        ],
        "RUN pip install torch==2.5",
    )
    builder.skopeo(f"oci:{root / 'oci'}:v1", f"docker-archive:{root / 'docker.tar'}:team/app:v1")
    builder.skopeo(f"oci:{root / 'oci'}:v1", f"oci-archive:{root / 'oci.tar'}:v1")
    builder.skopeo(
        f"oci:{root / 'oci'}:v1", f"oci:{root / 'zstd'}:v1", "--dest-compress-format", "zstd"
    )
    return {
        "oci": root / "oci",
        "docker": root / "docker.tar",
        "oci-archive": root / "oci.tar",
        "zstd": root / "zstd",
    }


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRegistry]:
    reg = DockerRegistry(tmp_path_factory.mktemp("registry"))
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


USERS = {"alice": "s3cret"}


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRegistry]:
    d = tmp_path_factory.mktemp("token-registry")
    reg = DockerRegistry(d / "registry", TokenService(d / "token", USERS))
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def docker_config(dir_: Path, registry: str, user: str, password: str) -> Path:
    """A ~/.docker/config.json as `docker login` writes it."""
    dir_.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (dir_ / "config.json").write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
    return dir_
