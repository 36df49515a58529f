#!/usr/bin/env python
"""Install ``seg_methods`` and build its compiled extension ``seg_methods._C``.

C++ CPU kernels are always built. CUDA kernels are added when a usable nvcc is found (or when
``FORCE_CUDA=1``), so the CUDA sources are compile-checked even on machines without a GPU.
Every op lives in ``seg_methods/layers/csrc/<op>/`` and registers itself with
``TORCH_LIBRARY_FRAGMENT(seg_methods, m)``; a new op needs no edit here.
"""
import glob
import os
import shutil
import subprocess

from setuptools import find_packages, setup


def _looks_like_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and bool(
        glob.glob(os.path.join(path, "lib64", "libcudart.so*"))
        + glob.glob(os.path.join(path, "lib", "libcudart.so*"))
    )


def _find_cuda_home():
    """Return the CUDA toolkit folder (the one whose lib64 holds libcudart), or None.

    ``nvcc`` on PATH may be a wrapper script (as on our CI machines); torch would then guess the
    wrapper's grandparent folder and the link fails with ``cannot find -lcudart``. We therefore
    check candidates for libcudart, including the binary a wrapper script ``exec``s.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for token in head.decode("utf-8", "ignore").split():
                    if token.endswith("/nvcc") and os.path.isfile(token):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _looks_like_toolkit(c):
            return c
    return None


def _nvcc_usable(cuda_home):
    if cuda_home is None:
        return False
    try:
        subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def get_extensions():
    cuda_home = _find_cuda_home()
    if cuda_home is not None and not os.environ.get("CUDA_HOME"):
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    this_dir = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join("seg_methods", "layers", "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    sources += sorted(glob.glob(os.path.join(csrc, "*", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(csrc, "*", "*.cu")))

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    no_cuda = os.environ.get("SEG_METHODS_NO_CUDA", "0") == "1"
    with_cuda = not no_cuda and (force_cuda or _nvcc_usable(cuda_home))

    define_macros = []
    # at::parallel_for is an inline OpenMP template: without -fopenmp it silently runs serially in
    # the extension. Linking picks libgomp.so.1, which resolves to the copy torch already loaded.
    extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
    extension = CppExtension
    if with_cuda:
        extension = CUDAExtension
        sources += cuda_sources
        define_macros += [("WITH_CUDA", None)]
        extra_compile_args["nvcc"] = [
            "-O3",
            "-DCUDA_HAS_FP16=1",
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__",
        ]
        # One architecture keeps the compile check fast; users with GPUs set their own list.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0")
    print(
        f"[seg_methods setup] torch {torch.__version__}; building seg_methods._C with "
        f"{'C++ CPU + CUDA' if with_cuda else 'C++ CPU only'} kernels"
        + (f" (CUDA_HOME={cuda_home})" if with_cuda else "")
    )
    return [
        extension(
            "seg_methods._C",
            sources,
            include_dirs=[os.path.join(this_dir, csrc)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


setup(
    name="seg_methods",
    version="0.1.0",
    description="Recent image-segmentation papers as Detectron2 meta-architectures",
    packages=find_packages(exclude=("configs", "tests", "tests.*", "benchmarks", "tools", "demo")),
    package_data={"seg_methods.data.datasets": ["meta/*.csv"]},
    python_requires=">=3.9",
    install_requires=[
        "fvcore",
        "pycocotools",
        "scipy",
        "panopticapi-lite",
    ],
    ext_modules=get_extensions(),
    cmdclass=_cmdclass(),
)
