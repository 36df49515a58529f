#!/usr/bin/env python3
"""Create or refresh the project's virtual environment (idempotent, fast when nothing changed).

Steps, each skipped when already up to date:
  1. create ``.venv`` with the interpreter running this script;
  2. ``pip install -r requirements.txt`` (skipped when the file's hash is unchanged);
  3. detectron2: keep an importable one; else build the official source from GitHub when it is
     reachable; else install the PyPI re-upload of its Python sources (``sal-detectron2``) with a
     fallback ``detectron2/_C.py`` whose functions raise a clear NotImplementedError naming the op;
  4. build ``seg_methods._C`` in place (editable install), again only when sources changed.

It prints which detectron2 install path it used. Run with ``--venv DIR`` to choose the folder.
Only the standard library is used here: this runs before the venv exists.
"""
import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D2_GIT = "git+https://github.com/facebookresearch/detectron2.git"
D2_FALLBACK = "sal-detectron2==0.7.2"

# Written next to detectron2/ when its compiled ops are unavailable (Python-only install).
D2_FALLBACK_C = '''\
"""Placeholder for detectron2's compiled ops, written by seg_methods' tools/bootstrap.py.

This detectron2 was installed from its Python sources only (no C++/CUDA build was possible on
this machine). Every compiled op raises NotImplementedError naming the op. seg_methods does not
need them: it uses COCOEvaluator(use_fast_impl=False) and no rotated boxes or deformable conv.
"""

SEG_METHODS_FALLBACK = True


def has_cuda():
    return False


def get_compiler_version():
    return "not built (seg_methods fallback _C)"


def get_cuda_version():
    return "not built (seg_methods fallback _C)"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*args, **kwargs):
        raise NotImplementedError(
            f"detectron2 compiled op '{name}' is not available: detectron2 was installed from "
            "Python sources without its C++/CUDA extension (fallback by seg_methods bootstrap). "
            "Install the official detectron2 from source to use it."
        )

    return _missing
'''


def log(msg):
    print(f"[bootstrap] {msg}", flush=True)


def run(cmd, **kw):
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)


def file_hash(paths):
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def venv_dir(py):
    return os.path.dirname(os.path.dirname(py))


def venv_python(venv):
    return os.path.join(venv, "bin", "python")


def py_ok(py, code, timeout=300):
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=timeout)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def load_state(venv):
    try:
        with open(os.path.join(venv, ".seg_methods_bootstrap.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def save_state(venv, state):
    with open(os.path.join(venv, ".seg_methods_bootstrap.json"), "w") as f:
        json.dump(state, f, indent=1)


def ensure_venv(venv):
    py = venv_python(venv)
    if os.path.exists(py):
        ok, _ = py_ok(py, "import sys")
        if ok:
            return py
        log(f"{venv} is broken; recreating it")
        shutil.rmtree(venv)
    log(f"creating virtual environment {venv} with {sys.executable}")
    run([sys.executable, "-m", "venv", venv])
    return py


def ensure_requirements(py, state):
    req = os.path.join(ROOT, "requirements.txt")
    digest = file_hash([req])
    if state.get("requirements") == digest:
        return
    t = time.time()
    run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", req])
    state["requirements"] = digest
    log(f"requirements installed in {time.time() - t:.0f}s")


def site_packages(py):
    out = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def github_reachable(timeout=10):
    if shutil.which("git") is None:
        return False
    try:
        subprocess.run(
            ["git", "ls-remote", "https://github.com/facebookresearch/detectron2.git", "HEAD"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        return True
    except (subprocess.SubprocessError, OSError):
        return False


def install_d2_fallback(py, venv):
    target = os.path.join(venv, "detectron2-src")
    if os.path.isdir(target):
        shutil.rmtree(target)
    run(
        [
            py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
            "--target", target, "--python-version", "3.10", "--only-binary=:all:", D2_FALLBACK,
        ]
    )
    d2 = os.path.join(target, "detectron2")
    for so in glob.glob(os.path.join(d2, "_C*.so")):
        os.remove(so)  # built for CPython 3.10, cannot load here
    with open(os.path.join(d2, "_C.py"), "w") as f:
        f.write(D2_FALLBACK_C)
    with open(os.path.join(site_packages(py), "seg_methods_detectron2.pth"), "w") as f:
        f.write(target + "\n")


def ensure_detectron2(py, venv, state):
    ok, msg = py_ok(py, "import detectron2, detectron2.engine, detectron2.evaluation")
    if ok:
        how = state.get("detectron2", "already importable (installed outside this bootstrap)")
        log(f"detectron2: {how}")
        return
    if github_reachable():
        try:
            run(
                [py, "-m", "pip", "install", "-q", "--no-build-isolation", D2_GIT],
                timeout=3600,
            )
            state["detectron2"] = "official source from GitHub (compiled ops)"
        except subprocess.SubprocessError as e:
            log(f"official detectron2 build failed ({e}); using the Python-only fallback")
    if "detectron2" not in state or not py_ok(py, "import detectron2")[0]:
        install_d2_fallback(py, venv)
        state["detectron2"] = (
            f"PyPI re-upload {D2_FALLBACK} (Python sources only; compiled detectron2 ops raise "
            "NotImplementedError via a fallback _C module)"
        )
    ok, msg = py_ok(py, "import detectron2, detectron2.engine, detectron2.evaluation")
    if not ok:
        raise SystemExit(f"[bootstrap] detectron2 still cannot be imported:\n{msg}")
    log(f"detectron2: {state['detectron2']}")


def ext_sources():
    files = glob.glob(os.path.join(ROOT, "seg_methods", "layers", "csrc", "**", "*"), recursive=True)
    files = [f for f in files if os.path.isfile(f)]
    return files + [os.path.join(ROOT, "setup.py")]


def ensure_extension(py, state):
    digest = file_hash(ext_sources())
    built = glob.glob(os.path.join(ROOT, "seg_methods", "_C*.so"))
    if state.get("extension") == digest and built:
        ok, _ = py_ok(py, "import torch, seg_methods._C")
        if ok:
            return
    t = time.time()
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    cmd = [
        py, "-m", "pip", "install", "-v", "--disable-pip-version-check", "--no-deps", "--use-pep517",
        "--no-build-isolation", "-e", ROOT,
    ]
    log("$ " + " ".join(cmd))
    log_path = os.path.join(venv_dir(py), "seg_methods_build.log")
    with open(log_path, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path) as f:
            lines = f.readlines()
        errors = [ln for ln in lines if "error" in ln.lower()][:40]
        sys.stderr.write("".join(errors) + "".join(lines[-60:]))
        raise SystemExit(
            f"[bootstrap] building seg_methods._C failed (exit {proc.returncode}); full log: {log_path}"
        )
    state["extension"] = digest
    ok, info = py_ok(
        py,
        "import torch, seg_methods._C as C; print('CUDA kernels' if C.has_cuda() else 'CPU kernels only')",
    )
    if not ok:
        raise SystemExit(f"[bootstrap] seg_methods._C does not import after the build:\n{info}")
    log(f"seg_methods._C built in {time.time() - t:.0f}s ({info})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", default=os.path.join(ROOT, ".venv"))
    args = parser.parse_args()
    venv = os.path.abspath(args.venv)
    t = time.time()
    py = ensure_venv(venv)
    state = load_state(venv)
    ensure_requirements(py, state)
    save_state(venv, state)
    ensure_detectron2(py, venv, state)
    save_state(venv, state)
    ensure_extension(py, state)
    save_state(venv, state)
    log(f"environment ready in {time.time() - t:.0f}s: {venv}")


if __name__ == "__main__":
    main()
