"""Properties of the root Dockerfile: one multi-stage build, a target per service image.

Static checks only (there is no Docker engine in the test environment); deploy/check.sh lints the
same file with hadolint and checkov.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
# Build target (the chart's component name) -> the module its image runs.
TARGETS = {
    "emr-gateway": "emr_gateway",
    "hospital-agent": "hospital_agent",
    "aggregator": "aggregator",
    "inference": "inference",
}
UID = 10001


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                out[key] = value
        return out

    def labels(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("LABEL"):
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                out[key] = value
        return out


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each instruction: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return out


def global_args() -> dict[str, str]:
    """The ARGs before the first FROM (usable in FROM lines), with their defaults."""
    out: dict[str, str] = {}
    for keyword, args in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            break
        assert keyword == "ARG", f"only ARG may precede the first FROM, not {keyword}"
        key, _, value = args.partition("=")
        out[key] = value
    return out


def stages() -> dict[str, Stage]:
    result: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, args in _instructions(DOCKERFILE.read_text()):
        if keyword == "ARG" and current is None:
            continue  # a global ARG (see global_args)
        if keyword == "FROM":
            words = args.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"every stage is named: FROM {args}"
            current = Stage(base=words[0], name=words[2])
            assert current.name not in result, f"stage {current.name} twice"
            result[current.name] = current
        else:
            assert current is not None, f"{keyword} before the first FROM"
            current.instructions.append((keyword, args))
    return result


def test_the_per_service_dockerfiles_are_gone() -> None:
    assert DOCKERFILE.is_file()
    assert sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "services").rglob("Dockerfile")) == []


def test_one_target_per_service_each_on_the_shared_runtime_stage() -> None:
    found = stages()
    assert list(found) == ["build", "runtime", *TARGETS]
    # The base is a build argument (make images builds a local Debian 12 one where no registry
    # is reachable); its default is the official image.
    assert found["build"].base == found["runtime"].base == "${BASE_IMAGE}"
    assert global_args() == {"BASE_IMAGE": "python:3.11-slim-bookworm"}
    for target in TARGETS:
        assert found[target].base == "runtime", target


def test_each_target_only_labels_its_image_and_runs_its_module() -> None:
    found = stages()
    for target, module in TARGETS.items():
        stage = found[target]
        assert {kw for kw, _ in stage.instructions} == {"LABEL", "CMD"}, target
        (cmd,) = stage.all("CMD")
        assert json.loads(cmd) == ["python", "-m", f"services.{module}"], target
        assert (ROOT / "services" / module / "__main__.py").is_file(), target
        assert stage.labels()["org.opencontainers.image.title"] == f"fibemrss-{target}", target


def test_the_virtualenv_is_built_once_from_the_projects_wheel_in_the_wheelhouse() -> None:
    found = stages()
    build = found["build"]
    # The wheelhouse (deploy/images/wheelhouse.sh: the project's wheel and its dependencies,
    # resolved with constraints.txt) is the only input: no source folder is copied, so the image
    # follows the package layout that pyproject.toml declares, and pip never reaches an index.
    assert build.all("ARG") == ["WHEELHOUSE=var/wheelhouse"]
    assert build.all("COPY") == ["${WHEELHOUSE}/ /wheels/"]
    assert build.env()["PIP_NO_INDEX"] == "1"
    (install,) = [run for run in build.all("RUN") if "pip install" in run]
    assert "--find-links /wheels fibemrss==0.1.0" in install
    wheelhouse = (ROOT / "deploy" / "images" / "wheelhouse.sh").read_text()
    assert "-c constraints.txt" in wheelhouse
    # Only the runtime stage takes the virtualenv; the targets inherit it.
    copies_from_build = [
        (name, args) for name, stage in found.items() for args in stage.all("COPY") if "--from=" in args
    ]
    assert copies_from_build == [("runtime", "--from=build /opt/venv /opt/venv")]


def test_every_copied_path_is_in_the_build_context() -> None:
    # .dockerignore excludes everything, then admits what the build copies.
    admitted = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    defaults = dict(a.partition("=")[::2] for a in stages()["build"].all("ARG"))
    for args in stages()["build"].all("COPY"):
        for source in args.split()[:-1]:
            for key, value in defaults.items():
                source = source.replace("${" + key + "}", value)
            assert source.rstrip("/") in admitted, source


def test_the_shared_stage_runs_as_a_fixed_non_root_user_on_a_read_only_root() -> None:
    found = stages()
    runtime = found["runtime"]
    assert runtime.all("USER") == [f"{UID}:{UID}"]
    for name, stage in found.items():
        if name != "runtime":
            assert stage.all("USER") == [], f"USER belongs in the runtime stage only ({name})"
    env = runtime.env()
    assert env["HOME"] == "/tmp"
    assert env["XDG_CACHE_HOME"].startswith("/tmp/")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert runtime.all("WORKDIR") == ["/tmp"]
    assert runtime.all("STOPSIGNAL") == ["SIGTERM"]
    # The chart runs the pods as the same numeric user.
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "fibemrss" / "values.yaml").read_text())
    assert (values["runAsUser"], values["runAsGroup"]) == (UID, UID)


def test_the_shared_stage_exposes_and_listens_on_the_charts_ports() -> None:
    runtime = stages()["runtime"]
    ports = yaml.safe_load((ROOT / "deploy" / "helm" / "fibemrss" / "values.yaml").read_text())["ports"]
    (expose,) = runtime.all("EXPOSE")
    assert expose.split() == [str(ports[p]) for p in ("grpc", "metrics", "health")]
    env = runtime.env()
    assert env["FIBEMRSS_LISTEN"] == f"0.0.0.0:{ports['grpc']}"
    assert env["FIBEMRSS_METRICS_LISTEN"] == f"0.0.0.0:{ports['metrics']}"
    assert env["FIBEMRSS_HEALTH_LISTEN"] == f"0.0.0.0:{ports['health']}"


def test_the_runbook_builds_every_target() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    assert "services/$s/Dockerfile" not in runbook
    (loop,) = [line.split() for line in runbook.splitlines() if line.strip().startswith("for t in ")]
    assert sorted(word.rstrip(";") for word in loop[3:-1]) == sorted(TARGETS)
    assert 'docker build --target "$t"' in runbook
