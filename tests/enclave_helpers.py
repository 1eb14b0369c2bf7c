"""A fake ``nitro-cli`` for the supervisor tests: run, describe and terminate against a JSON
state file, with switches to make the enclave die, leave RUNNING, or make nitro-cli fail."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

_SCRIPT = r"""
import json, sys
from pathlib import Path

HERE = Path(__file__).parent
STATE = HERE / "state.json"
state = json.loads(STATE.read_text()) if STATE.exists() else {"enclaves": [], "started": 0}
with open(HERE / "calls.log", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
command, args = sys.argv[1], sys.argv[2:]

def opt(name, default=None):
    return args[args.index(name) + 1] if name in args else default

def save():
    # Atomically: the test reads the state while nitro-cli runs.
    (HERE / "state.tmp").write_text(json.dumps(state))
    (HERE / "state.tmp").replace(STATE)

if (HERE / f"fail-{command}").exists():
    print("Start ...", file=sys.stderr)
    print((HERE / f"fail-{command}").read_text(), file=sys.stderr)
    sys.exit(1)
if command == "run-enclave":
    state["started"] += 1
    enclave = {
        "EnclaveName": opt("--enclave-name", "enclave"),
        "EnclaveID": f"i-0123456789abcdef0-enc{state['started']:016x}",
        "ProcessID": 4242,
        "EnclaveCID": int(opt("--enclave-cid", "16")),
        "NumberOfCPUs": int(opt("--cpu-count")),
        "MemoryMiB": int(opt("--memory")),
        "State": "RUNNING",
        "Flags": "DEBUG_MODE" if "--debug-mode" in args else "NONE",
    }
    state["enclaves"].append(enclave)
    save()
    print("Start allocating memory...")
    print(f"Started enclave with enclave-cid: {enclave['EnclaveCID']}, memory: 2048 MiB")
    print(json.dumps({k: v for k, v in enclave.items() if k not in ("State", "Flags")}, indent=2))
elif command == "describe-enclaves":
    if (HERE / "dead").exists():
        state["enclaves"] = []
        save()
    if (HERE / "state-override").exists():
        for e in state["enclaves"]:
            e["State"] = (HERE / "state-override").read_text()
    print(json.dumps(state["enclaves"], indent=2))
elif command == "terminate-enclave":
    if (HERE / "dead").exists():
        state["enclaves"] = []
    wanted = opt("--enclave-id")
    before = len(state["enclaves"])
    state["enclaves"] = [e for e in state["enclaves"] if e["EnclaveID"] != wanted]
    save()
    if len(state["enclaves"]) == before:
        print("E: no such enclave", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"EnclaveID": wanted, "Terminated": True}))
else:
    sys.exit(2)
"""


class FakeNitro:
    """A fake nitro-cli in ``folder``: ``path`` is the executable to pass to the supervisor."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.path = folder / "nitro-cli"
        self.path.write_text(f"#!{sys.executable}\n{_SCRIPT}")
        os.chmod(self.path, 0o755)

    def calls(self) -> list[list[str]]:
        log = self.folder / "calls.log"
        if not log.exists():
            return []
        # Only complete lines: a nitro-cli run may be writing the last one.
        text = log.read_text()
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]

    def commands(self) -> list[str]:
        return [call[0] for call in self.calls()]

    def enclaves(self) -> list[dict[str, Any]]:
        state = self.folder / "state.json"
        return list(json.loads(state.read_text())["enclaves"]) if state.exists() else []

    def add_running(self, name: str, enclave_id: str) -> None:
        state = {"enclaves": [], "started": 100}
        state["enclaves"] = [
            {"EnclaveName": name, "EnclaveID": enclave_id, "EnclaveCID": 20, "State": "RUNNING"}
        ]
        (self.folder / "state.json").write_text(json.dumps(state))

    def kill_enclave(self) -> None:
        (self.folder / "dead").touch()

    def set_state(self, state: str) -> None:
        (self.folder / "state-override").write_text(state)

    def fail(self, command: str, message: str) -> None:
        (self.folder / f"fail-{command}").write_text(message)
