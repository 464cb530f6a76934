"""The CPU test image, built once per session with docker/build.sh (import the fixture into a test module).

The build uses its own state directory (build context, generated containers.conf) under the system's temp
directory, so a developer's build/docker/ is never touched; podman's layer cache is shared, so a rebuild
after a change under src/ takes seconds. Cold (no base image, no layers): about 4 minutes on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "docker" / "build.sh"
RUN = REPO / "docker" / "run.sh"
TAG = "tsdia:ci"
IMAGE = f"localhost/{TAG}"  # how podman names a locally built tag
STATE_DIR = Path(tempfile.gettempdir()) / "tsdia-docker-tests"


@dataclass(frozen=True)
class Image:
    tag: str
    ref: str  # the fully qualified name (what slurm.container.image needs for podman)
    env: dict[str, str]  # the engine's settings (CONTAINERS_CONF for podman), for docker/run.sh and jobs
    build_s: float

    def run(
        self, *args: str, exp: Path | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """`docker/run.sh --image TAG [--exp EXP] ARGS...`."""
        cmd = [str(RUN), "--image", self.tag, *(["--exp", str(exp)] if exp else []), *args]
        return subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )


def skip_reason() -> str | None:
    """Why the container tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "no root: no podman (the image's storage is shared with the local Slurm cluster's jobs)"
    if shutil.which("podman") is None and shutil.which("apt-get") is None:
        return "no podman, and no apt-get to install it (docker/build.sh needs one)"
    return None


@pytest.fixture(scope="session")
def tsdia_image() -> Image:
    """`docker/build.sh cpu --tag tsdia:ci`, once per session (seconds when the layers are cached)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TSDIA_STATE_DIR": str(STATE_DIR), "TSDIA_ENGINE": "podman"}
    start = time.monotonic()
    done = subprocess.run(
        [str(BUILD), "cpu", "--tag", TAG],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        pytest.fail(f"docker/build.sh cpu failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    env["CONTAINERS_CONF"] = str(STATE_DIR / "containers.conf")
    return Image(TAG, IMAGE, env, time.monotonic() - start)
