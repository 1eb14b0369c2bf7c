"""The README's shell commands run as written: every ```sh line is either run (in one bash
script, as a user would type them) or skipped for a stated reason (hardware, or a command whose
own tests cover it and which is too heavy to repeat here)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A command is skipped when it starts with one of these; each says why.
SKIPPED = {
    "make demo": "installs the environment (minutes); the demo itself runs in tests/test_demo.py",
    "make test": "the whole suite, including the vsock lab VM",
    "vrpc serve services.keyvault.impl:create_server --listen vsock://": "needs AF_VSOCK",
    "vrpc attest policy measurements.json": "needs nitro-cli's measurements of a built image",
    "vrpc relay": "listens on every interface and relays to AF_VSOCK",
    "vrpc enclave run": "needs nitro-cli and a Nitro host (tests/test_enclave_supervisor.py)",
}


def _commands() -> list[str]:
    """The README's ```sh lines, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            command = line.split(" # ", 1)[0].strip() if " # " in line else line.strip()
            if command and not command.startswith("#"):
                commands.append(re.sub(r"\s+", " ", command))
    return commands


def _skip_reason(command: str) -> str | None:
    for prefix, reason in SKIPPED.items():
        if command.startswith(prefix):
            return reason
    return None


def test_every_readme_command_is_run_or_skipped_for_a_reason() -> None:
    commands = _commands()
    run = [c for c in commands if _skip_reason(c) is None]
    skipped = [c for c in commands if _skip_reason(c) is not None]
    # Every skip rule still matches a command (a stale rule would hide a new one).
    for prefix in SKIPPED:
        assert any(c.startswith(prefix) for c in skipped), prefix
    assert any(c.startswith("vrpc call") for c in run)
    assert any(c.startswith("vrpc serve") for c in run)


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    socket_path = tmp_path / "echo.sock"
    lines = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for command in _commands():
        if _skip_reason(command) is not None:
            continue
        if command == "source .venv/bin/activate":
            # The environment that runs this test stands for the checkout's .venv.
            command = f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH"
        # One socket per run (the README's /tmp/echo.sock could be someone else's).
        command = command.replace("/tmp/echo.sock", str(socket_path))
        lines.append(command)
        if command.endswith("&"):
            # A person types the next command after the server is up: wait for it (bounded).
            lines.append(
                f"for _ in $(seq 200); do [ -S {shlex.quote(str(socket_path))} ] && break; "
                "sleep 0.05; done"
            )
    script = "\n".join(lines) + "\n"
    (tmp_path / "docs").symlink_to(ROOT / "docs")  # the README's paths are relative to the root
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRPC_")}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's vrpc and services, as an editable install
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        f"{script}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    out = result.stdout
    assert '{"$b64": "aGVsbG8="}' in out  # the echo call
    assert out.count('{"$b64": "Wlpa"}') == 2  # the stream, arguments by name
    assert "echo.v1\n" in out and "arguments:" in out  # describe
    assert '"SERVING"' in out  # the out-of-process client trusting the dev server
    assert "NOT VERIFIED" in out and "VALID at" in out  # inspect, verify
    assert (tmp_path / "dev-root.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
