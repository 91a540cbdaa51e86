"""Evaluation reports: the results table (paper Table 1), the efficiency table (Table 2), and plots (Figure 3, per-turn
accuracy, accuracy against time to first token, the MetaCompress matrix P of Figures 6-7).

Input: one *summary* dict per evaluated (method, rate), as ``stages.evaluate.summarise`` makes it::

    {"method": "sample", "rate": 0.9 (None for "full"), "dialogues": 120, "Acc_1": .., .., "Acc_T": .., "Avg": ..,
     "agreement": .. (percent of turns equal to the full-token model's answer, or None),
     "ttft_ms", "ttft_ms_std", "e2e_ms", "e2e_ms_std", "peak_mem_gb", "tflops", "kv_cache_len", "visual_tokens"}

and per-turn efficiency rows ``{"method", "rate", "turn", "ttft_ms", "decode_ms", "total_ms", "peak_mem_mb",
"prefill_gflops", "kv_cache_len", "visual_tokens"}``. Accuracies are percentages. Everything here is plain Python
plus matplotlib (Agg backend, no display).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from statistics import NormalDist

LABELS = {"full": "Base", "random": "Random", "sample": "Sample", "spatial": "Spatial", "fastv": "FastV",
          "fastv_k1": "FastV (K=1)", "tome": "ToMe", "prumerge": "PruMerge", "prumerge_plus": "PruMerge+",
          "prumerge_adaptive": "PruMerge (adaptive)", "visionzip": "VisionZip",
          "metacompress": "MetaCompress", "tprl": "TPRL"}
EFFICIENCY_COLUMNS = [("TTFT (ms)", "ttft_ms", "ttft_ms_std"), ("E2ET (ms)", "e2e_ms", "e2e_ms_std"),
                      ("Mem. (GB)", "peak_mem_gb", None), ("TFLOPs", "tflops", None),
                      ("KV cache", "kv_cache_len", None), ("Visual tokens", "visual_tokens", None)]
Z95 = NormalDist().inv_cdf(0.975)  # the half-width of a 95 % normal interval, in standard errors


def label(method: str) -> str:
    return LABELS.get(method, method)


def turn_columns(summaries: list[dict]) -> list[str]:
    """Acc_1 .. Acc_T for the longest dialogue length present."""
    turns = max((int(k.split("_")[1]) for s in summaries for k in s if k.startswith("Acc_")), default=0)
    return [f"Acc_{t}" for t in range(1, turns + 1)]


def rates_of(summaries: list[dict]) -> list[float]:
    return sorted({s["rate"] for s in summaries if s["rate"] is not None})


def blocks(summaries: list[dict]) -> list[tuple[float | None, list[dict]]]:
    """One block per reduction rate: Base (the full-token model) first, then the methods in the given order. With no
    reduced method at all, one block holding Base alone (rate None)."""
    base = [s for s in summaries if s["method"] == "full"]
    rates = rates_of(summaries)
    if not rates:
        return [(None, base)]
    return [(r, base + [s for s in summaries if s["method"] != "full" and s["rate"] == r]) for r in rates]


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def results_rows(summaries: list[dict]) -> tuple[list[str], list[list]]:
    """Header and rows of the results table: rate, method, Acc_1..Acc_T, Avg, Agree (teacher agreement, %), and
    where MetaCompress ran at that rate its paired gap to the row (``vs_MetaCompress``, points) and the half-width
    of that gap's 95 % interval (``vs_MetaCompress_ci95``)."""
    turns = turn_columns(summaries)
    header = ["rate", "method"] + turns + ["Avg", "Agree", "vs_MetaCompress", "vs_MetaCompress_ci95"]
    rows = []
    for rate, members in blocks(summaries):
        for s in members:
            se = s.get("vs_metacompress_se")
            rows.append([rate, label(s["method"])] + [s.get(t) for t in turns] + [s["Avg"], s.get("agreement"),
                        s.get("vs_metacompress"), None if se is None else Z95 * se])
    return header, rows


def efficiency_rows(summaries: list[dict]) -> tuple[list[str], list[list]]:
    header = ["rate", "method"]
    for name, key, std in EFFICIENCY_COLUMNS:
        header += [key] + ([std] if std else [])
    rows = []
    for rate, members in blocks(summaries):
        for s in members:
            row = [rate, label(s["method"])]
            for _, key, std in EFFICIENCY_COLUMNS:
                row += [s.get(key)] + ([s.get(std)] if std else [])
            rows.append(row)
    return header, rows


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    return path


def _block_title(rate: float | None) -> str:
    return "Full-token model" if rate is None else f"Reduction rate {rate * 100:g}%"


def results_markdown(summaries: list[dict], title: str = "Accuracy per turn (%)") -> str:
    """Table 1 as Markdown: per rate a block with Base first; the best reduced method's Avg in bold."""
    turns = turn_columns(summaries)
    lines = [f"## {title}", ""]
    for rate, members in blocks(summaries):
        reduced = [s["Avg"] for s in members if s["method"] != "full"]
        best = max(reduced) if reduced else None
        lines += [f"### {_block_title(rate)}", "", "| Method | " + " | ".join(turns) + " | Avg | Agree |",
                  "|---|" + "---:|" * (len(turns) + 2)]
        for s in members:
            avg = _fmt(s["Avg"])
            if s["method"] != "full" and s["Avg"] == best:
                avg = f"**{avg}**"
            lines.append(f"| {label(s['method'])} | " + " | ".join(_with_spread(s, t) for t in turns)
                         + f" | {avg}{_spread(s, 'Avg')} | {_fmt(s.get('agreement'))} |")
        lines += ["", standing(members), ""] if any(s["method"] == "metacompress" for s in members) else [""]
    lines.append("Agree: share of turns whose answer equals the full-token model's answer (%)."
                 + (" ± : standard deviation over `evaluate.seeds` (stochastic methods)."
                    if any(s.get("Avg_std") is not None for s in summaries) else "")
                 + (" Gap: MetaCompress's Avg minus the method's, over the dialogues both evaluated, ± the 95 % "
                    "interval of that paired difference (pipeline.metrics.paired_avg_difference)."
                    if any(s.get("vs_metacompress") is not None for s in summaries) else ""))
    return "\n".join(lines) + "\n"


def standing(members: list[dict]) -> str:
    """One line on MetaCompress against the other reduced methods of one rate: which it does not beat (Avg at
    least its own), or that it beats every one. Where the summaries carry the paired difference
    (``vs_metacompress``, stages.evaluate.summary), each gap is given with its 95 % interval."""
    ours = next(s["Avg"] for s in members if s["method"] == "metacompress")
    if ours is None:
        return ""
    others = [s for s in members if s["method"] not in ("full", "metacompress") and s["Avg"] is not None]
    unbeaten = [f"{label(s['method'])} ({_fmt(s['Avg'])}{gap_text(s, ', gap ')})" for s in others if s["Avg"] >= ours]
    if unbeaten:
        return f"MetaCompress ({_fmt(ours)}) does not beat: {', '.join(unbeaten)}."
    line = f"MetaCompress ({_fmt(ours)}) beats every other method evaluated here ({len(others)})"
    closest = max(others, key=lambda s: s["Avg"], default=None)
    if closest is None or not gap_text(closest, ""):
        return line + "."
    return f"{line}; the closest, {label(closest['method'])} ({_fmt(closest['Avg'])}), by {gap_text(closest, '')}."


def gap_text(s: dict, prefix: str) -> str:
    """MetaCompress's Avg minus this method's over the same dialogues, ± the half-width of its 95 % interval;
    nothing without a paired comparison."""
    if s.get("vs_metacompress") is None:
        return ""
    se = s.get("vs_metacompress_se")
    gap = round(s["vs_metacompress"], 2) + 0.0  # + 0.0: a tie reads +0.00, not -0.00
    return f"{prefix}{gap:+.2f}" + ("" if se is None else f" ± {_fmt(Z95 * se)}")


def _spread(s: dict, key: str) -> str:
    """" ± std" over the seeds of a stochastic method (``<key>_std`` in its summary), else nothing."""
    return f" ± {_fmt(s[key + '_std'])}" if s.get(key + "_std") is not None else ""


def _with_spread(s: dict, key: str) -> str:
    return _fmt(s.get(key)) + _spread(s, key)


def efficiency_markdown(summaries: list[dict], batch_size: int | None = None) -> str:
    """Table 2 as Markdown: TTFT and E2ET as mean (± std) per dialogue, peak memory, prefill TFLOPs."""
    lines = ["## Efficiency", ""]
    for rate, members in blocks(summaries):
        lines += [f"### {_block_title(rate)}", "", "| Method | " + " | ".join(c[0] for c in EFFICIENCY_COLUMNS) + " |",
                  "|---|" + "---:|" * len(EFFICIENCY_COLUMNS)]
        for s in members:
            cells = []
            for _, key, std in EFFICIENCY_COLUMNS:
                digits = 1 if key in ("ttft_ms", "e2e_ms", "kv_cache_len") else 3
                if key == "tflops":  # 4 significant digits: tiny reference models run at a few MFLOPs
                    cell = "-" if s.get(key) is None else f"{s[key]:.4g}"
                else:
                    cell = _fmt(s.get(key), 0 if key == "visual_tokens" else digits)
                if std and s.get(std) is not None:
                    cell += f" (± {_fmt(s[std], 1)})"
                cells.append(cell)
            lines.append(f"| {label(s['method'])} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("TTFT: time to the first answer token of turn 1 (vision tower + reducer + prefill). E2ET: end-to-end "
                 "time of a whole dialogue. Mem.: peak memory (GPU allocated, or process RSS on CPU). TFLOPs: prefill "
                 "FLOPs of all turns of a dialogue." + (f" Dialogues run in batches of {batch_size}; times are those "
                                                        "of the batched calls." if batch_size else ""))
    return "\n".join(lines) + "\n"


# --- plots ---------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _methods(summaries: list[dict]) -> list[str]:
    return list(dict.fromkeys(s["method"] for s in summaries if s["method"] != "full"))


def plot_accuracy_vs_rate(summaries: list[dict], path: Path) -> Path:
    """Figure 3: average accuracy against the reduction rate, one line per method, Base as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in _methods(summaries):
        pts = sorted((s["rate"], s["Avg"]) for s in summaries if s["method"] == m)
        ax.plot([100 * r for r, _ in pts], [a for _, a in pts], marker="o", label=label(m))
    for s in summaries:
        if s["method"] == "full":
            ax.axhline(s["Avg"], color="black", linestyle="--", label="Base")
    ax.set_xlabel("reduction rate (%)")
    ax.set_ylabel("average accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_per_turn(summaries: list[dict], path: Path) -> Path:
    """Accuracy of each turn, one panel per reduction rate, one line per method (Base in black)."""
    plt = _pyplot()
    turns = turn_columns(summaries)
    groups = blocks(summaries)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, (rate, members) in zip(axes[0], groups):
        for s in members:
            style = {"color": "black", "linestyle": "--"} if s["method"] == "full" else {}
            ax.plot(range(1, len(turns) + 1), [s.get(t, float("nan")) for t in turns], marker="o",
                    label=label(s["method"]), **style)
        ax.set_title(_block_title(rate))
        ax.set_xticks(range(1, len(turns) + 1))
        ax.set_xlabel("turn")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_vs_ttft(summaries: list[dict], path: Path) -> Path:
    """Average accuracy against the time to first token of turn 1; each point a (method, rate)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in ["full"] + _methods(summaries):
        pts = [s for s in summaries if s["method"] == m and s.get("ttft_ms") is not None]
        if not pts:
            continue
        ax.scatter([s["ttft_ms"] for s in pts], [s["Avg"] for s in pts], label=label(m),
                   marker="*" if m == "full" else "o", s=80 if m == "full" else 30)
        for s in pts:
            if s["rate"] is not None:
                ax.annotate(f"{s['rate'] * 100:g}%", (s["ttft_ms"], s["Avg"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xlabel("time to first token, turn 1 (ms)")
    ax.set_ylabel("average accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_matrices(items: list[dict], path: Path, rows_shown: int = 4) -> Path:
    """Figures 6-7: per image one row of panels: the image, P^T as a heat map (original token index x reduced
    token index), and ``rows_shown`` rows of P (reduced tokens spread over the sequence) reshaped on the image grid.

    ``items``: dicts with ``title``, ``matrix`` (m, n) numpy, ``grid`` (h, w) (the base image grid) or None,
    ``indices`` (h * w sequence positions of that grid, row-major; default the first h * w) and ``image``
    (H, W, 3) uint8 numpy or None.
    """
    import numpy as np

    plt = _pyplot()
    cols = 2 + rows_shown
    fig, axes = plt.subplots(len(items), cols, figsize=(2.4 * cols, 2.4 * len(items)), squeeze=False)
    for row_axes, item in zip(axes, items):
        p = np.asarray(item["matrix"], dtype=np.float32)
        m, n = p.shape
        ax = row_axes[0]
        if item.get("image") is not None:
            ax.imshow(item["image"])
        ax.set_title(item["title"], fontsize=7)
        ax.axis("off")
        ax = row_axes[1]
        ax.imshow(p.T, aspect="auto", cmap="Blues", interpolation="nearest")
        ax.set_xlabel("reduced token", fontsize=7)
        ax.set_ylabel("original token", fontsize=7)
        ax.set_title(f"P^T ({n} x {m})", fontsize=7)
        ax.tick_params(labelsize=6)
        picks = np.unique(np.linspace(0, m - 1, rows_shown).round().astype(int))
        for k, ax in enumerate(row_axes[2:]):
            ax.axis("off")
            if k >= len(picks) or item.get("grid") is None:
                continue
            h, w = item["grid"]
            cells = p[picks[k], item["indices"]] if item.get("indices") is not None else p[picks[k], : h * w]
            ax.imshow(np.asarray(cells).reshape(h, w), cmap="Blues", interpolation="nearest")
            ax.set_title(f"row {picks[k]} of P", fontsize=7)
    return _save(fig, path)


def write_reports(summaries: list[dict], per_turn: list[dict], out_dir: str | Path, matrices: list[dict] | None = None,
                  batch_size: int | None = None) -> list[Path]:
    """Every table and plot into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = results_rows(summaries)
    paths = [write_csv(out / "results.csv", header, rows)]
    (out / "results.md").write_text(results_markdown(summaries))
    header, rows = efficiency_rows(summaries)
    paths += [out / "results.md", write_csv(out / "efficiency.csv", header, rows)]
    (out / "efficiency.md").write_text(efficiency_markdown(summaries, batch_size))
    keys = ["method", "rate", "turn", "ttft_ms", "decode_ms", "total_ms", "peak_mem_mb", "prefill_gflops",
            "kv_cache_len", "visual_tokens"]
    paths += [out / "efficiency.md",
              write_csv(out / "efficiency_per_turn.csv", keys, [[r.get(k) for k in keys] for r in per_turn]),
              plot_accuracy_vs_rate(summaries, out / "accuracy_vs_rate.png"),
              plot_per_turn(summaries, out / "accuracy_per_turn.png"),
              plot_accuracy_vs_ttft(summaries, out / "accuracy_vs_ttft.png")]
    if matrices:
        paths.append(plot_matrices(matrices, out / "metacompress_matrices.png"))
    return paths
