"""Turn benchmark rows into the JSON document, the plot and the Markdown table."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
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
SYSTEM_ORDER = (
    "vrpc",
    "vrpc-plaintext",
    "vrpc-baseline",
    "raw-echo",
    "byte-echo",
    "grpc-aio",
    "blocking-echo",
)
# The per-repetition measures a row summarises (mb_per_s is derived from calls_per_s).
MEASURES = (
    "calls_per_s",
    "mb_per_s",
    "p50_us",
    "p99_us",
    "server_cpu_us_per_call",
    "client_cpu_us_per_call",
)
# Peers every row is compared with: (row field, peer system).
PEERS = (
    ("ratio_raw_echo", "raw-echo"),
    ("ratio_byte_echo", "byte-echo"),
    ("ratio_grpc", "grpc-aio"),
)
MET, MISSED, NOISY, NO_DATA = "met", "missed", "too noisy", "no data"
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


def stats(values: Sequence[float | None]) -> dict[str, float] | None:
    """Median, quartiles (inclusive method) and extremes of the values that are not None."""
    vals = sorted(float(v) for v in values if v is not None)
    if not vals:
        return None
    if len(vals) == 1:
        q1 = q3 = vals[0]
    else:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return {
        "median": statistics.median(vals),
        "q1": q1,
        "q3": q3,
        "min": vals[0],
        "max": vals[-1],
        "n": len(vals),
    }


def _median(values: Sequence[float | None]) -> float | None:
    s = stats(values)
    return None if s is None else s["median"]


def make_row(
    system: str, loop: str, case: dict[str, Any], runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """A row from one pair's repetitions of one case (in repetition order)."""
    size = case["payload_bytes"]
    runs = [dict(r) for r in runs]
    for r in runs:
        r["mb_per_s"] = r["calls_per_s"] * size / 1e6 if case["case"] != "verify" else None
    row: dict[str, Any] = {
        "system": system,
        "loop": loop,
        "case": case["case"],
        "payload_bytes": size,
        "concurrency": case["concurrency"],
    }
    row["stats"] = {m: stats([r.get(m) for r in runs]) for m in MEASURES}
    for m in MEASURES:
        row[m] = _median([r.get(m) for r in runs])
    rates = [r["calls_per_s"] for r in runs]
    row["runs"] = runs
    row["spread"] = max(rates) / min(rates) if rates and min(rates) > 0 else None
    row["calls"] = sum(r["calls"] for r in runs)
    return row


def _key(row: dict[str, Any], loop: str | None = None) -> tuple[Any, ...]:
    return (row["case"], row["payload_bytes"], row["concurrency"], loop or row["loop"])


def paired(
    a: dict[str, Any] | None, b: dict[str, Any] | None, field: str = "calls_per_s"
) -> list[float]:
    """``a``'s figure over ``b``'s, repetition by repetition (they ran next to each other)."""
    if a is None or b is None:
        return []
    out = []
    for ra, rb in zip(a["runs"], b["runs"], strict=False):
        va, vb = ra.get(field), rb.get(field)
        if va is not None and vb:
            out.append(float(va) / float(vb))
    return out


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """ratio_raw_echo / ratio_byte_echo / ratio_grpc: the median over repetitions of calls/s
    over the peer's at the same case, size, concurrency and loop, each repetition against the
    peer's run of the same repetition (the blocking floor, which has no loop, is compared with
    the uvloop peers); ``ratio_stats`` holds their spread."""
    by_system: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    for row in rows:
        by_system.setdefault(row["system"], {})[_key(row)] = row
    for row in rows:
        loop = "uvloop" if row["loop"] == "none" else row["loop"]
        row.setdefault("ratio_stats", {})
        for name, peer in PEERS:
            other = by_system.get(peer, {}).get(_key(row, loop))
            s = stats(paired(row, other)) if row["case"] != "verify" else None
            row[name] = None if s is None else s["median"]
            row["ratio_stats"][peer] = s


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


def verdict(s: dict[str, float] | None, target: float, higher: bool) -> str:
    """Judge a target on the spread of its per-repetition values: met when the whole
    interquartile range is on the good side of the target, missed when it is all on the bad
    side, too noisy to judge when it straddles the target."""
    if s is None:
        return NO_DATA
    worse, better = (s["q1"], s["q3"]) if higher else (s["q3"], s["q1"])
    good = (lambda v: v >= target) if higher else (lambda v: v <= target)
    if good(worse):
        return MET
    if not good(better):
        return MISSED
    return NOISY


def judge(
    name: str, values: list[float], target: float, *, higher: bool = True, unit: str = "x"
) -> dict[str, Any]:
    s = stats(values)
    result: dict[str, Any] = {
        "name": name,
        "values": values,
        "value": None if s is None else s["median"],
        "stats": s,
        "target": target,
        "unit": unit,
        "higher_is_better": higher,
        "verdict": verdict(s, target, higher),
        "shortfall_factor": None,
    }
    if result["verdict"] == MISSED and s is not None and s["median"]:
        # How many times short of the goal the median is.
        m = s["median"]
        result["shortfall_factor"] = target / m if higher else m / target
    return result


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The project's targets (uvloop, Unix socket, encrypted vrpc), each judged on the
    per-repetition values of this run."""
    kib64, mib = 64 * 1024, 1024 * 1024
    v64 = _find(rows, "vrpc", "unary", 64, 64)
    r64 = _find(rows, "raw-echo", "unary", 64, 64)
    g64 = _find(rows, "grpc-aio", "unary", 64, 64)
    v1 = _find(rows, "vrpc", "unary", 64, 1)
    r1 = _find(rows, "raw-echo", "unary", 64, 1)
    vm = _find(rows, "vrpc", "unary", mib, 4)
    pm = _find(rows, "vrpc-plaintext", "unary", mib, 4)
    rm = _find(rows, "raw-echo", "unary", mib, 4)
    vs = _find(rows, "vrpc", "server-stream", kib64, 1)
    rs = _find(rows, "raw-echo", "server-stream", kib64, 1)
    hs = _find(rows, "vrpc", "handshake", 0, 1)
    handshake_ms = [r["p50_us"] / 1000 for r in hs["runs"] if r.get("p50_us")] if hs else []
    return [
        judge("1 MiB x4: vrpc / raw-echo MB/s", paired(vm, rm), 0.8),
        judge("1 MiB x4: encrypted / plaintext MB/s", paired(vm, pm), 0.9),
        judge("stream 64 KiB items: vrpc / raw-echo MB/s", paired(vs, rs), 0.5),
        judge("handshake p50", handshake_ms, 1.5, higher=False, unit="ms"),
        judge("64 B x64: vrpc / raw-echo calls/s", paired(v64, r64), 0.5),
        judge("64 B x64: vrpc / grpc-aio calls/s", paired(v64, g64), 30.0),
        judge("64 B x1: vrpc p50 / raw-echo p50", paired(v1, r1, "p50_us"), 1.3, higher=False),
        judge(
            "1 MiB x4: server CPU per call, vrpc / raw-echo",
            paired(vm, rm, "server_cpu_us_per_call"),
            2.0,
            higher=False,
        ),
    ]


def _fig(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def target_line(t: dict[str, Any]) -> str:
    if t["verdict"] == NO_DATA:
        return f"target {t['name']}: no data"
    s = t["stats"]
    cmp = ">=" if t["higher_is_better"] else "<="
    v = t["verdict"]
    if v == MISSED:
        v = f"MISSED by {t['shortfall_factor']:.2f}x"
    elif v == NOISY:
        v = "TOO NOISY to judge"
    return (
        f"target {t['name']}: median {_fig(s['median'])} {t['unit']} "
        f"(IQR {_fig(s['q1'])}-{_fig(s['q3'])}, range {_fig(s['min'])}-{_fig(s['max'])}, "
        f"n={s['n']}) ({cmp} {t['target']:g}): {v}"
    )


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


# One colour per system, far apart; line style tells the event loop.
COLOURS = {
    "vrpc": "#1f77b4",  # blue
    "vrpc-plaintext": "#9467bd",  # purple
    "vrpc-baseline": "#17becf",  # cyan
    "raw-echo": "#ff7f0e",  # orange
    "byte-echo": "#d62728",  # red
    "grpc-aio": "#2ca02c",  # green
    "blocking-echo": "#7f7f7f",  # grey
}
LINESTYLES = {"uvloop": "-", "asyncio": "--", "none": ":"}


def plot(result: dict[str, Any], path: Path) -> None:
    """calls/s and MB/s against payload size, one line per system and loop, log scales; bars
    span each point's repetitions (min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    unary = [r for r in result["rows"] if r["case"] == "unary"]
    concurrencies = sorted({r["concurrency"] for r in unary if r["concurrency"] != 4})
    if not concurrencies:
        concurrencies = [1]
    sizes = sorted({r["payload_bytes"] for r in unary})
    fig, axes = plt.subplots(
        len(concurrencies), 2, figsize=(13, 4.2 * len(concurrencies)), squeeze=False
    )
    handles: dict[str, Any] = {}
    for i, conc in enumerate(concurrencies):
        for j, (field, label) in enumerate((("calls_per_s", "calls/s"), ("mb_per_s", "MB/s"))):
            ax = axes[i][j]
            series: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for r in unary:
                if r["concurrency"] == conc or (r["system"] == "blocking-echo" and conc == 1):
                    series.setdefault((r["system"], r["loop"]), []).append(r)
            order = sorted(
                series, key=lambda k: (SYSTEM_ORDER.index(k[0]), list(LINESTYLES).index(k[1]))
            )
            for system, loop in order:
                points = sorted(series[(system, loop)], key=lambda r: r["payload_bytes"])
                xs = [p["payload_bytes"] for p in points]
                ys = [p[field] for p in points]
                lo = [p[field] - (p["stats"][field] or {}).get("min", p[field]) for p in points]
                hi = [(p["stats"][field] or {}).get("max", p[field]) - p[field] for p in points]
                line = ax.errorbar(
                    xs,
                    ys,
                    yerr=[lo, hi],
                    marker="o",
                    markersize=4,
                    capsize=3,
                    linestyle=LINESTYLES.get(loop, "-"),
                    color=COLOURS.get(system, "k"),
                    label=f"{system} ({loop})",
                )
                handles.setdefault(f"{system} ({loop})", line)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(sizes))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([_size(n) for n in sizes])
            ax.set_xlabel("payload")
            ax.set_ylabel(label)
            ax.set_title(f"unary echo, {conc} in flight: {label}")
            ax.grid(True, which="both", alpha=0.3)
    fig.legend(
        list(handles.values()),
        list(handles.keys()),
        loc="center left",
        bbox_to_anchor=(0.83, 0.5),
        fontsize=9,
        title="system (event loop)",
    )
    title = plot_title(result)
    fig.suptitle(title, color="#b00000" if result["settings"].get("quick") else "black")
    fig.tight_layout(rect=(0, 0, 0.82, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_title(result: dict[str, Any]) -> str:
    s = result["settings"]
    title = (
        f"vrpc benchmarks {result['git_revision'][:12]} ({result['machine']['cpu']}); "
        f"median of {s['reps']} interleaved repetitions, bars: min-max"
    )
    if s.get("quick"):
        title = "QUICK RUN (harness check only, figures mean nothing)\n" + title
    return title


def _ranged(s: dict[str, float] | None, digits: int = 0) -> str:
    if s is None:
        return "-"
    return f"{_num(s['median'], digits)} ({_num(s['min'], digits)}-{_num(s['max'], digits)})"


def _ratio(s: dict[str, float] | None) -> str:
    if s is None:
        return "-"
    return f"{s['median']:.3g} ({s['min']:.3g}-{s['max']:.3g})"


CPU_CASES = (
    ("unary", 64, 1),
    ("unary", 64, 64),
    ("unary", 1024 * 1024, 4),
    ("server-stream", 64 * 1024, 1),
)
CPU_SYSTEMS = ("vrpc", "vrpc-plaintext", "raw-echo", "byte-echo")


def cpu_table(rows: list[dict[str, Any]]) -> list[str]:
    """Server and client CPU µs per call (uvloop) of vrpc and its ceilings, side by side."""
    present = [
        s for s in CPU_SYSTEMS if any(r["system"] == s and r["loop"] == "uvloop" for r in rows)
    ]
    if not present:
        return []
    lines = [
        "",
        "### CPU per call (uvloop; µs, server / client, median of the repetitions)",
        "",
        "| case | " + " | ".join(present) + " |",
        "|---|" + "---|" * len(present),
    ]
    for case, size, conc in CPU_CASES:
        cells = []
        for system in present:
            row = _find(rows, system, case, size, conc)
            if row is None:
                cells.append("-")
                continue
            server = _num(row["server_cpu_us_per_call"], 1)
            client = _num(row["client_cpu_us_per_call"], 1)
            cells.append(f"{server} / {client}")
        label = f"{case} {_size(size)} x{conc}" if case == "unary" else f"{case} {_size(size)}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _mem(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024:,.1f} KiB"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    s = result["settings"]
    lines = [
        f"Produced by `{result['command']}` at {result['created']}, "
        f"revision `{result['git_revision'][:12]}`; {m['cpu']}, {m['cores']} cores, "
        f"Linux {m['kernel']}, Python {m['python']}, uvloop {m['packages'].get('uvloop')}, "
        f"grpcio {m['packages'].get('grpcio')}, cryptography {m['packages'].get('cryptography')}. "
        f"Each figure is the median of {s['reps']} repetitions of {s['duration']} s, "
        f"interleaved across systems; (a-b) is the lowest and highest repetition, and each ratio "
        f"is taken repetition by repetition.",
    ]
    if s.get("quick"):
        lines += ["", "**Quick run: it checks the harness; its figures mean nothing.**"]
    lines += [
        "",
        "### Targets (uvloop, Unix socket, encrypted vrpc)",
        "",
        "A target is met when the interquartile range of its per-repetition values lies on the "
        "good side of the goal, missed when it lies on the other side, and too noisy to judge "
        "when it straddles the goal.",
        "",
        "| target | median | IQR | range | goal | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for t in result["targets"]:
        cmp = ">=" if t["higher_is_better"] else "<="
        st = t["stats"]
        if st is None:
            lines.append(f"| {t['name']} | - | - | - | {cmp} {t['target']:g} | no data |")
            continue
        v = t["verdict"]
        if v == MISSED:
            v = f"**missed** by {t['shortfall_factor']:.2f}x"
        elif v == NOISY:
            v = "*too noisy to judge*"
        lines.append(
            f"| {t['name']} | {_fig(st['median'])} {t['unit']} | {_fig(st['q1'])}-{_fig(st['q3'])} "
            f"| {_fig(st['min'])}-{_fig(st['max'])} | {cmp} {t['target']:g} | {v} |"
        )
    noisy = [t for t in result["targets"] if t["verdict"] == NOISY]
    if noisy:
        lines += [
            "",
            f"The machine was too noisy to judge {len(noisy)} of {len(result['targets'])} "
            "targets in this run.",
        ]
    lines += cpu_table(result["rows"])
    lines += [
        "",
        "### All rows",
        "",
        "| system | loop | case | payload | in flight | calls/s | MB/s | p50 µs | p99 µs "
        "| server CPU µs/call | client CPU µs/call | x raw-echo | x byte-echo | x grpc-aio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        st = r["stats"]
        rs = r.get("ratio_stats", {})
        lines.append(
            f"| {r['system']} | {r['loop']} | {r['case']} | {_size(r['payload_bytes'])} "
            f"| {r['concurrency']} | {_ranged(st['calls_per_s'])} | {_num(r['mb_per_s'], 1)} "
            f"| {_num(r['p50_us'], 1)} | {_num(r['p99_us'], 1)} "
            f"| {_ranged(st['server_cpu_us_per_call'], 2)} "
            f"| {_ranged(st['client_cpu_us_per_call'], 2)} | {_ratio(rs.get('raw-echo'))} "
            f"| {_ratio(rs.get('byte-echo'))} | {_ratio(rs.get('grpc-aio'))} |"
        )
    memory = result.get("memory") or []
    if memory:
        lines += [
            "",
            "### Memory a connection holds (server process)",
            "",
            "| system | loop | at rest, Python heap | at rest, RSS | peak over one call, "
            "Python heap | peak over one call, RSS |",
            "|---|---|---|---|---|---|",
        ]
        for mem in memory:
            lines.append(
                f"| {mem['system']} | {mem['loop']} | {_mem(mem['traced_per_connection_bytes'])} "
                f"| {_mem(mem['rss_per_connection_bytes'])} "
                f"| {_mem(mem['traced_call_peak_bytes'])} ({_size(mem['call_bytes'])} call) "
                f"| {_mem(mem['rss_call_peak_bytes'])} |"
            )
    ab = markdown_baseline(result)
    if ab:
        lines += ["", ab]
    flow = result.get("flow_control")
    if flow:
        lines += ["", "### Flow control", "", flow_line(flow)]
    for note in result["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines)


BASELINE = "vrpc-baseline"


def baseline_table(rows: list[dict[str, Any]]) -> list[str]:
    """vrpc against ``vrpc-baseline`` (another revision run beside it), case by case: calls/s
    and p50 taken repetition by repetition, as median (interquartile range) and extremes."""
    base = {_key(r): r for r in rows if r["system"] == BASELINE}
    if not base:
        return []
    lines = [
        "| loop | case | vrpc / baseline calls/s | IQR | range | vrpc / baseline p50 | IQR |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        other = base.get(_key(row))
        if row["system"] != "vrpc" or other is None:
            continue
        rate, p50 = stats(paired(row, other)), stats(paired(row, other, "p50_us"))
        what = row_label(row).split(" ", 1)[1]
        lines.append(
            f"| {row['loop']} | {what} | {_fmt_stats(rate)} | {_fmt_iqr(rate)} "
            f"| {_fmt_range(rate)} | {_fmt_stats(p50)} | {_fmt_iqr(p50)} |"
        )
    return lines


def markdown_baseline(result: dict[str, Any]) -> str:
    table = baseline_table(result["rows"])
    if not table:
        return ""
    return "\n".join([f"### Against the baseline ({result.get('baseline', '?')})", "", *table])


def _fmt_stats(s: dict[str, float] | None) -> str:
    return "-" if s is None else f"{s['median']:.3f}"


def _fmt_iqr(s: dict[str, float] | None) -> str:
    return "-" if s is None else f"{s['q1']:.3f}-{s['q3']:.3f}"


def _fmt_range(s: dict[str, float] | None) -> str:
    return "-" if s is None else f"{s['min']:.3f}-{s['max']:.3f}"


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


def memory_line(mem: dict[str, Any]) -> str:
    return (
        f"memory {mem['system']}/{mem['loop']}: per connection at rest "
        f"{_mem(mem['traced_per_connection_bytes'])} Python heap, "
        f"{_mem(mem['rss_per_connection_bytes'])} RSS; over one {_size(mem['call_bytes'])} call "
        f"+{_mem(mem['traced_call_peak_bytes'])} Python heap, "
        f"+{_mem(mem['rss_call_peak_bytes'])} RSS (peaks)"
    )
