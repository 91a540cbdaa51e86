"""``metacompress analyze compressor``: what a trained compressor does, against a fresh one and the oracle
(docs/design.md §4.3)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.commands.analyze_oracle import FittedP, _fmt, _mean, _pred_loss, _run_method

COMPRESSOR_DOC = """What a trained compressor does (docs/design.md §4.3):

    metacompress analyze compressor --model DIR --compressor DIR --dialogues FILE --rate 0.9 [--n 16]
        [--oracle-steps 300] [--out analysis/compressor]

For each of the first N dialogues, on the model's own features: P of the trained compressor and of a freshly
initialised one of the same configuration ('init'), and with --oracle-steps the per-image oracle of the same rate.
For each P: row entropy (nats; log n is a uniform row) and effective tokens per row (exp of it), the effective number
of input tokens that receive mass, the largest column share, the spread between rows (mean total variation between
two rows; 0 = every row the same), the mass inside the pooling windows and within one query spacing of the window
centre (image units: whether a row stays where its output slot says), and, on MT-Shapes with a LLaVA-1.5 grid, the
share of the mass on object patches against their share of the area; the distance to the oracle (total variation of
the column shares, and of each oracle row to the nearest row of P). Accuracy per turn (own history) and the first
answer token's KL per turn (teacher history) for the compressor, the oracle and --methods. With a training log, the
curves of loss, KL, entropy and collapse. Writes compressor_analysis.json / .md and plots into --out.
"""


# --- analyze compressor ------------------------------------------------------------------------------------------
def _object_masks(adapter, dialogue, encoded, scenes) -> tuple:
    """(object patches, patches of the objects the turns ask about) as (n,) bool tensors, or (None, None) when the
    dialogue has no MT-Shapes scene or the layout is not one LLaVA-1.5 grid."""
    import numpy as np
    import torch

    from pipeline.datasets.mt_shapes import patch_labels

    scene = scenes.get(dialogue.meta.get("scene_id", dialogue.dialogue_id)) if scenes else None
    segments = encoded.layout.segments
    if scene is None or adapter.family != "llava" or len(segments) != 1 or encoded.layout.newlines:
        return None, None
    objects = patch_labels(scene, segments[0].height, segments[0].width)["object"].reshape(-1)
    asked = sorted({int(o) for t in dialogue.turns for o in (t.meta or {}).get("objects", [])})
    return torch.from_numpy(objects >= 0), torch.from_numpy(np.isin(objects, asked))


def analyse_compressor_dialogue(adapter, dialogue, compressor, initial, methods: dict, args, score, scenes) -> dict:
    import torch

    from compress.analysis import matrix_statistics
    from compress.lvlm.methods import Method
    from compress.lvlm.session import ChatSession
    from compress.oracle import fit_oracle
    from compress.reduction import num_keep

    vqa = not args.no_vqa_suffix
    teacher = ChatSession(adapter, "full", max_new_tokens=args.max_new_tokens, vqa=vqa)
    teacher.set_image(dialogue.image)
    turns = [teacher.ask(q) for q in dialogue.questions]
    teacher_ids, teacher_first = [r.answer_ids for r in turns], [r.first_logits for r in turns]
    encoded = teacher.batch.encoded[0]
    x, layout = encoded.tokens, encoded.layout
    m = num_keep(x.shape[0], args.rate)
    record = {"dialogue_id": dialogue.dialogue_id, "num_tokens": int(x.shape[0]), "num_keep": m}
    with torch.no_grad():
        p = compressor(x.to(compressor.w_key.dtype), m, layout).matrix
        p0 = initial(x.to(initial.w_key.dtype), m, layout).matrix
    objects, asked = _object_masks(adapter, dialogue, encoded, scenes)
    oracle = None
    if args.oracle_steps > 0 and any(teacher_ids):
        loss_fn = _pred_loss(adapter, dialogue.questions, teacher_ids, encoded, m, args.topk, vqa)
        fit = fit_oracle(x, m, loss_fn, steps=args.oracle_steps, lr=args.lr, seed=args.seed)
        oracle = fit.reduction.matrix.detach()
        methods = {**methods, "oracle": Method("oracle", "feature", FittedP(fit.reduction))}
    record["matrices"] = {}
    for name, mat in (("trained", p), ("init", p0), ("oracle", oracle)):
        if mat is None:
            continue
        stats = matrix_statistics(mat, compressor.kernel_size, objects, oracle if name != "oracle" else None, layout)
        if asked is not None:
            stats["asked_mass"], stats["asked_area"] = matrix_statistics(mat, mask=asked)["mask_mass"], \
                float(asked.double().mean())
        record["matrices"][name] = stats
    record["column_share"] = (p.double().sum(0) / m).cpu().tolist()
    record["grid"] = [layout.segments[0].height, layout.segments[0].width] if len(layout.segments) == 1 else None
    record["methods"] = {}
    for name, method in methods.items():
        image = dialogue.image if method.kind == "vision" else encoded
        try:
            record["methods"][name] = _run_method(adapter, method, args.rate, dialogue, image, teacher_ids,
                                                  teacher_first, args, score)
        except ValueError as err:
            record["methods"][name] = {"error": str(err)}
    return record


def read_curves(path) -> list[dict]:
    """Step metrics from a JSON-lines training log (one object with ``step`` per line)."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i}: not JSON ({err}); a training log holds one JSON object per line") from err
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{i}: no 'step' key; each line must be an object like {{\"step\": 1, ...}}")
        rows.append(row)
    return rows


def summarise_compressor(records: list[dict], args, curves: list[dict]) -> dict:
    from pipeline.metrics import per_turn_accuracy

    matrices = {}
    for name in ("trained", "init", "oracle"):
        per = [r["matrices"][name] for r in records if name in r["matrices"]]
        if per:
            matrices[name] = {k: _mean([s.get(k) for s in per]) for k in per[0]}
    methods = {}
    for name in (records[0]["methods"] if records else []):
        per = [r["methods"][name] for r in records if "error" not in r["methods"].get(name, {"error": 1})]
        if not per:
            continue
        acc = per_turn_accuracy([q["scores"] for q in per])
        turns = max(len(q["kl"]) for q in per)
        kl = {f"KL_{t + 1}": _mean([q["kl"][t] for q in per if len(q["kl"]) > t]) for t in range(turns)}
        kl["KL_avg"] = _mean(list(kl.values()))
        methods[name] = {**acc, **kl}
    curve = {}
    if curves:
        first, last = curves[0], curves[-1]
        curve = {"steps": len(curves), "first": first, "last": last}
    return {"model": str(args.model), "compressor": str(args.compressor), "dialogues_file": str(args.dialogues),
            "rate": args.rate, "dialogues": len(records), "oracle_steps": args.oracle_steps,
            "matrices": matrices, "methods": methods, "curves": curve}


MATRIX_ROWS = [("row_entropy", "row entropy (nats)", 3), ("log_n", "log n (a uniform row)", 3),
               ("effective_tokens", "effective tokens per row", 2),
               ("effective_columns", "input tokens that receive mass (effective number)", 1),
               ("max_column_share", "largest column share", 4), ("uniform_share", "uniform share 1/n", 4),
               ("row_spread", "spread between rows (TV; 0 = all rows the same)", 3),
               ("window_mass", "mass inside the pooling windows", 3),
               ("near_mass", "mass within one query spacing of the window centre", 3),
               ("rectangle_mass", "mass inside the row's rectangle of Spatial", 3),
               ("mask_mass", "mass on object patches", 3), ("mask_area", "object patches' share of the area", 3),
               ("asked_mass", "mass on the asked objects' patches", 3),
               ("asked_area", "asked objects' share of the area", 3),
               ("oracle_column_tv", "distance to the oracle: column shares (TV)", 3),
               ("oracle_row_tv", "distance to the oracle: nearest rows (TV)", 3)]


def compressor_markdown(summary: dict) -> str:
    from pipeline.reports import label

    mats = summary["matrices"]
    names = list(mats)
    lines = [f"# Compressor analysis: {Path(summary['compressor']).name} on {Path(summary['model']).name}, "
             f"rate {summary['rate']:g}", "",
             f"{summary['dialogues']} dialogues of `{summary['dialogues_file']}`. Columns: the trained P, a freshly "
             "initialised compressor of the same configuration (init)" +
             (f", the per-image oracle ({summary['oracle_steps']} SGD steps)" if "oracle" in mats else "") +
             "; means over the dialogues.", "",
             "## The matrix P", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, text, digits in MATRIX_ROWS:
        if any(mats[n].get(key) is not None for n in names):
            lines.append(f"| {text} | " + " | ".join(_fmt(mats[n].get(key), digits) for n in names) + " |")
    lines.append("")
    if summary["methods"]:
        first = next(iter(summary["methods"].values()))
        accs = [k for k in first if k.startswith("Acc_")]
        kls = [k for k in first if k.startswith("KL_")]
        head = ["Method", *accs, "Avg", *kls]
        lines += ["## Accuracy (%) and KL per turn", "",
                  "KL(teacher || method) of the first answer token of each turn, history = the teacher's answers.",
                  "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, row in summary["methods"].items():
            title = "Oracle (per-image P)" if name == "oracle" else label(name)
            lines.append("| " + " | ".join([title] + [_fmt(row[k], 1) for k in accs + ["Avg"]] +
                                           [_fmt(row[k], 4) for k in kls]) + " |")
        lines.append("")
    if summary["curves"]:
        c = summary["curves"]
        keys = [k for k in ("loss", "kl", "entropy", "collapse", "heldout_kl") if k in c["last"] or k in c["first"]]
        lines += ["## Training", "", f"{c['steps']} logged steps; first -> last: " +
                  ", ".join(f"{k} {_fmt(c['first'].get(k), 4)} -> {_fmt(c['last'].get(k), 4)}" for k in keys), "",
                  "![curves](training_curves.png)", ""]
    lines += ["![row entropy](row_entropy.png)", ""]
    return "\n".join(lines)


def compressor_plots(records: list[dict], curves: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name in ("trained", "init", "oracle"):
        vals = [r["matrices"][name]["row_entropy"] for r in records if name in r["matrices"]]
        if vals:
            ax.hist(vals, bins=20, alpha=0.5, label=name)
    if records:
        ax.axvline(float(np.log(records[0]["num_tokens"])), color="k", lw=0.8, ls="--", label="log n")
    ax.set_xlabel("mean row entropy of P per image (nats)")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "row_entropy.png", dpi=120)
    plt.close(fig)
    written.append("row_entropy.png")
    grids = [r for r in records if r.get("grid")]
    if grids:
        r = grids[0]
        fig, ax = plt.subplots(figsize=(4, 3.6))
        im = ax.imshow(np.asarray(r["column_share"]).reshape(r["grid"]), cmap="viridis")
        fig.colorbar(im, ax=ax)
        ax.set_title(f"column share of P, {r['dialogue_id']}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "column_share.png", dpi=120)
        plt.close(fig)
        written.append("column_share.png")
    if curves:
        keys = [k for k in ("loss", "kl", "entropy", "collapse") if any(k in c for c in curves)]
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
        for ax, k in zip(np.atleast_1d(axes), keys):
            pts = [(c["step"], c[k]) for c in curves if k in c]
            ax.plot([s for s, _ in pts], [v for _, v in pts], lw=0.9)
            ax.set_title(k)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out / "training_curves.png", dpi=120)
        plt.close(fig)
        written.append("training_curves.png")
    return written


def run_compressor(args: argparse.Namespace) -> int:
    if not 0.0 < args.rate < 1.0:
        raise ValueError(f"--rate {args.rate} is outside (0, 1): it is the share of visual tokens removed")
    for flag, value in (("--n", args.n), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be at least 1")
    if args.oracle_steps < 0:
        raise ValueError(f"--oracle-steps {args.oracle_steps} must be >= 0 (0: no oracle)")

    import torch

    from compress.lvlm import load_adapter, model_family
    from compress.lvlm.methods import available_methods, get_method
    from compress.metacompress import MetaCompress
    from infra.reference.targets import scenes_for
    from pipeline.dialogues import load_dialogues
    from pipeline.metrics import score

    model_family(args.model)
    compressor = MetaCompress.from_pretrained(args.compressor)
    dialogues = load_dialogues(args.dialogues)[: args.n]
    if not dialogues:
        raise ValueError(f"{args.dialogues} holds no dialogue")
    curves_path = Path(args.curves) if args.curves else Path(args.compressor) / "train_log.jsonl"
    if args.curves and not curves_path.is_file():
        raise FileNotFoundError(f"--curves {args.curves}: no such file")
    curves = read_curves(curves_path) if curves_path.is_file() else []
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = set(available_methods()) - {"full", "metacompress"}
    for name in names:
        if name not in known:
            raise ValueError(f"--methods: {name!r} is not a baseline; known: {', '.join(sorted(known))}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = load_adapter(args.model, device=device,
                           dtype=torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    adapter.model.requires_grad_(False)
    compressor.to(adapter.device)
    torch.manual_seed(args.seed)
    initial = MetaCompress(**MetaCompress.init_kwargs(compressor.config)).to(adapter.device)
    methods = {"metacompress": get_method("metacompress", args.compressor)}
    methods["metacompress"].fn.to(adapter.device)
    methods.update({n: get_method(n) for n in names})
    scenes = scenes_for(args.dialogues)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, d in enumerate(dialogues):
        print(f"[{i + 1}/{len(dialogues)}] {d.dialogue_id}", file=sys.stderr, flush=True)
        records.append(analyse_compressor_dialogue(adapter, d, compressor, initial, methods, args, score, scenes))
    summary = summarise_compressor(records, args, curves)
    summary["plots"] = compressor_plots(records, curves, out)
    with open(out / "compressor_matrices.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (out / "compressor_analysis.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "compressor_analysis.md").write_text(compressor_markdown(summary))
    print(compressor_markdown(summary))
    return 0
