"""Whether a run logs to W&B online is W&B's own credential lookup, not a check of ``WANDB_API_KEY`` and
``~/.netrc`` for api.wandb.ai alone: a self-hosted server's netrc entry, a ``$NETRC`` file and an identity
token file count too (``tasks.run.loggers.wandb_credentials_available``). Fake files only; nothing is sent
(the host is a closed local port, and the lookup does not verify the key)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1:9"  # the discard port, closed here: a request would be refused, not answered
KEY = "0123456789abcdef" * 2 + "01234567"  # 40 characters, the form of a W&B API key


def _available(tmp_path: Path, **env: str) -> tuple[bool, str]:
    """``wandb_credentials_available()`` in a fresh interpreter with an empty home and only ``env`` set."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NETRC"))}
    code = "from tasks.run.loggers import wandb_credentials_available as a; print('AVAILABLE', a())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**base, "HOME": str(home), "WANDB_BASE_URL": f"http://{HOST}", "WANDB_SILENT": "true", **env},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return "AVAILABLE True" in out.stdout, out.stdout + out.stderr


def _netrc(path: Path) -> Path:
    path.write_text(f"machine {HOST}\n  login user\n  password {KEY}\n")  # the host as W&B names it: with its port
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("source", ["netrc_variable", "home_netrc", "identity_token_file"])
def test_a_self_hosted_servers_credentials_keep_the_run_online(tmp_path, source):
    if source == "netrc_variable":
        env = {"NETRC": str(_netrc(tmp_path / "elsewhere.netrc"))}
    elif source == "home_netrc":
        (tmp_path / "home").mkdir()
        _netrc(tmp_path / "home" / ".netrc")
        env = {}
    else:
        token = tmp_path / "token.jwt"
        token.write_text("header.payload.signature")
        env = {"WANDB_IDENTITY_TOKEN_FILE": str(token)}
    available, output = _available(tmp_path, **env)
    assert available, output
    assert KEY not in output  # the key itself is never printed


def test_without_credentials_the_run_logs_offline(tmp_path):
    available, output = _available(tmp_path)
    assert not available, output
    assert _available(tmp_path, WANDB_API_KEY=KEY)[0]  # the environment's key, without asking W&B
