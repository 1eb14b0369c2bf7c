"""Turn benchmark rows into the JSON document, the plot and the Markdown table."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
PACKAGES = (
    "vrpc",
    "uvloop",
    "grpcio",
    "cryptography",
    "msgpack",
    "msgspec",
    "cbor2",
    "matplotlib",
    "pyinstrument",
)
SYSTEM_ORDER = ("vrpc", "vrpc-plaintext", "raw-echo", "grpc-aio", "blocking-echo")
CASE_ORDER = ("unary", "server-stream", "handshake", "verify")


def _size(n: int) -> str:
    if n >= 1024 * 1024 and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} B"


def row_label(row: dict[str, Any]) -> str:
    what = row["case"]
    if row["case"] in ("unary", "server-stream"):
        what += f" {_size(row['payload_bytes'])} x{row['concurrency']}"
    return f"{row['system']}/{row['loop']} {what}"


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def row_line(row: dict[str, Any]) -> str:
    return (
        f"{row_label(row):<42} {_num(row['calls_per_s']):>10} calls/s "
        f"{_num(row['mb_per_s'], 1):>8} MB/s  p50 {_num(row['p50_us'], 1)} us  "
        f"p99 {_num(row['p99_us'], 1)} us  CPU us/call: "
        f"server {_num(row['server_cpu_us_per_call'], 2)} "
        f"client {_num(row.get('client_cpu_us_per_call'), 2)}"
    )


def _key(row: dict[str, Any], loop: str | None = None) -> tuple[Any, ...]:
    return (row["case"], row["payload_bytes"], row["concurrency"], loop or row["loop"])


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """ratio_raw_echo / ratio_grpc: calls/s over the peer's at the same case, size, concurrency
    and loop (the blocking floor, which has no loop, is compared with the uvloop peers)."""
    by_system: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    for row in rows:
        by_system.setdefault(row["system"], {})[_key(row)] = row
    for row in rows:
        loop = "uvloop" if row["loop"] == "none" else row["loop"]
        for field, peer in (("ratio_raw_echo", "raw-echo"), ("ratio_grpc", "grpc-aio")):
            other = by_system.get(peer, {}).get(_key(row, loop))
            ok = other is not None and other["calls_per_s"] and row["case"] != "verify"
            row[field] = row["calls_per_s"] / other["calls_per_s"] if ok and other else None


def _git_revision(root: Path) -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "vrpc", "services", "benchmarks"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
    }


def _find(
    rows: list[dict[str, Any]], system: str, case: str, size: int, conc: int, loop: str = "uvloop"
) -> dict[str, Any] | None:
    for row in rows:
        if (row["system"], row["case"], row["payload_bytes"], row["concurrency"], row["loop"]) == (
            system,
            case,
            size,
            conc,
            loop,
        ):
            return row
    return None


def _target(
    name: str, value: float | None, target: float, *, higher: bool = True, unit: str = "x"
) -> dict[str, Any]:
    if value is None:
        return {"name": name, "value": None, "target": target, "unit": unit, "met": None}
    met = value >= target if higher else value <= target
    # "by" is the factor by which the figure falls short (>1 means missed by that much).
    by = (target / value if higher else value / target) if value else None
    return {
        "name": name,
        "value": value,
        "target": target,
        "unit": unit,
        "higher_is_better": higher,
        "met": met,
        "shortfall_factor": None if met else by,
    }


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The project's targets (uvloop, Unix socket, encrypted vrpc), judged on this run."""
    kib64, mib = 64 * 1024, 1024 * 1024
    v64 = _find(rows, "vrpc", "unary", 64, 64)
    p64 = _find(rows, "vrpc-plaintext", "unary", 64, 64)
    v1 = _find(rows, "vrpc", "unary", 64, 1)
    r1 = _find(rows, "raw-echo", "unary", 64, 1)
    vm = _find(rows, "vrpc", "unary", mib, 4)
    pm = _find(rows, "vrpc-plaintext", "unary", mib, 4)
    rm = _find(rows, "raw-echo", "unary", mib, 4)
    vs = _find(rows, "vrpc", "server-stream", kib64, 1)
    unary64k = [r for r in (_find(rows, "vrpc", "unary", kib64, c) for c in (1, 64)) if r]
    hs = _find(rows, "vrpc", "handshake", 0, 1)

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, field: str) -> float | None:
        if a is None or b is None or not b[field] or a[field] is None:
            return None
        return float(a[field]) / float(b[field])

    def field(row: dict[str, Any] | None, name: str) -> float | None:
        return None if row is None or row[name] is None else float(row[name])

    best_unary = max(unary64k, key=lambda r: r["mb_per_s"]) if unary64k else None
    return [
        _target("64 B x64: vrpc / grpc-aio calls/s", field(v64, "ratio_grpc"), 20.0),
        _target("64 B x64: vrpc / raw-echo calls/s", field(v64, "ratio_raw_echo"), 0.35),
        _target("64 B x64: vrpc calls/s", field(v64, "calls_per_s"), 100_000, unit="calls/s"),
        _target("64 B x1: vrpc p50 / raw-echo p50", ratio(v1, r1, "p50_us"), 1.5, higher=False),
        _target("1 MiB x4: vrpc / raw-echo MB/s", ratio(vm, rm, "mb_per_s"), 0.8),
        _target(
            "stream 64 KiB items: MB/s / best unary 64 KiB MB/s",
            ratio(vs, best_unary, "mb_per_s"),
            0.8,
        ),
        _target(
            "handshake p50",
            None if hs is None else hs["p50_us"] / 1000,
            5.0,
            higher=False,
            unit="ms",
        ),
        _target("64 B x64: encrypted / plaintext calls/s", ratio(v64, p64, "calls_per_s"), 0.75),
        _target("1 MiB x4: encrypted / plaintext MB/s", ratio(vm, pm, "mb_per_s"), 0.85),
    ]


def target_line(t: dict[str, Any]) -> str:
    if t["met"] is None:
        return f"target {t['name']}: no data"
    cmp = ">=" if t["higher_is_better"] else "<="
    verdict = "met" if t["met"] else f"MISSED by {t['shortfall_factor']:.2f}x"
    return f"target {t['name']}: {t['value']:,.3g} {t['unit']} ({cmp} {t['target']:g}): {verdict}"


def build(
    rows: list[dict[str, Any]],
    *,
    settings: dict[str, Any],
    command: str,
    notes: list[str],
    root: Path,
) -> dict[str, Any]:
    def order(row: dict[str, Any]) -> tuple[Any, ...]:
        return (
            CASE_ORDER.index(row["case"]),
            SYSTEM_ORDER.index(row["system"]),
            ("uvloop", "asyncio", "none").index(row["loop"]),
            row["payload_bytes"],
            row["concurrency"],
        )

    rows = sorted(rows, key=order)
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "git_revision": _git_revision(root),
        "machine": machine(),
        "settings": settings,
        "notes": notes,
        "rows": rows,
        "targets": targets(rows),
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """calls/s and MB/s against payload size, one line per system and loop, log scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unary = [r for r in result["rows"] if r["case"] == "unary"]
    concurrencies = sorted({r["concurrency"] for r in unary if r["concurrency"] in (1, 8, 64)})
    fig, axes = plt.subplots(
        len(concurrencies), 2, figsize=(12, 4.2 * len(concurrencies)), squeeze=False
    )
    colours = dict(zip(SYSTEM_ORDER, ["C0", "C1", "C2", "C3", "C4"], strict=True))
    for i, conc in enumerate(concurrencies):
        for j, (field, label) in enumerate((("calls_per_s", "calls/s"), ("mb_per_s", "MB/s"))):
            ax = axes[i][j]
            series: dict[tuple[str, str], list[tuple[int, float]]] = {}
            for r in unary:
                if r["concurrency"] == conc:
                    series.setdefault((r["system"], r["loop"]), []).append(
                        (r["payload_bytes"], r[field])
                    )
            for (system, loop), points in sorted(series.items()):
                points.sort()
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    marker="o",
                    linestyle="--" if loop == "asyncio" else "-",
                    color=colours.get(system, "k"),
                    label=f"{system} ({loop})",
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("payload (bytes)")
            ax.set_ylabel(label)
            ax.set_title(f"unary echo, {conc} in flight: {label}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"vrpc benchmarks {result['git_revision'][:12]} ({result['machine']['cpu']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Produced by `{result['command']}` (`make bench`) at {result['created']}, "
        f"revision `{result['git_revision'][:12]}`; {m['cpu']}, {m['cores']} cores, "
        f"Linux {m['kernel']}, Python {m['python']}, uvloop {m['packages'].get('uvloop')}, "
        f"grpcio {m['packages'].get('grpcio')}, cryptography {m['packages'].get('cryptography')}. "
        f"Each figure is the median of {result['settings']['runs']} runs of "
        f"{result['settings']['duration']} s; spread = max/min calls/s over the runs.",
        "",
        "### Targets (uvloop, Unix socket, encrypted vrpc)",
        "",
        "| target | this run | goal | verdict |",
        "|---|---|---|---|",
    ]
    for t in result["targets"]:
        if t["met"] is None:
            lines.append(f"| {t['name']} | - | {t['target']:g} | no data |")
            continue
        cmp = ">=" if t["higher_is_better"] else "<="
        verdict = "met" if t["met"] else f"**missed** by {t['shortfall_factor']:.2f}x"
        value = f"{t['value']:,.0f}" if t["value"] >= 1000 else f"{t['value']:.3g}"
        lines.append(f"| {t['name']} | {value} {t['unit']} | {cmp} {t['target']:g} | {verdict} |")
    lines += [
        "",
        "### All rows",
        "",
        "| system | loop | case | payload | in flight | calls/s | MB/s | p50 µs | p99 µs "
        "| server CPU µs/call | client CPU µs/call | x raw-echo | x grpc-aio | spread |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ratio_raw = f"{r['ratio_raw_echo']:.2f}" if r.get("ratio_raw_echo") else "-"
        ratio_grpc = f"{r['ratio_grpc']:.1f}" if r.get("ratio_grpc") else "-"
        lines.append(
            f"| {r['system']} | {r['loop']} | {r['case']} | {_size(r['payload_bytes'])} "
            f"| {r['concurrency']} | {_num(r['calls_per_s'])} | {_num(r['mb_per_s'], 1)} "
            f"| {_num(r['p50_us'], 1)} | {_num(r['p99_us'], 1)} "
            f"| {_num(r['server_cpu_us_per_call'], 2)} "
            f"| {_num(r.get('client_cpu_us_per_call'), 2)} | {ratio_raw} | {ratio_grpc} "
            f"| {_num(r['spread'], 2)} |"
        )
    flow = result.get("flow_control")
    if flow:
        lines += ["", "### Flow control", "", flow_line(flow)]
    for note in result["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines)


def flow_line(flow: dict[str, Any]) -> str:
    held = flow["max_buffered_bytes"] <= flow["bound_bytes"]
    return (
        f"A server stream of {flow['items']} items of {_size(flow['item_bytes'])} to a consumer "
        f"taking one every {flow['consumer_delay_ms']:g} ms: at most "
        f"{flow['max_buffered_bytes']:,} bytes waited on the receiving side (window "
        f"{flow['window_bytes']:,} bytes; bound window + one message = "
        f"{flow['bound_bytes']:,}): {'held' if held else '**exceeded**'}."
    )


def write_markdown(result: dict[str, Any], path: Path) -> None:
    """Replace the text between the bench markers of ``path`` (created if missing)."""
    block = f"{BEGIN}\n{markdown(result)}\n{END}"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = (text or "# Performance\n\n") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
