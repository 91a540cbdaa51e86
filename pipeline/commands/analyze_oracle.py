"""``metacompress analyze oracle``: the per-image oracle analysis (paper section 4, figures 1 and 5; docs/design.md §4.3).

    metacompress analyze oracle --model DIR --dialogues FILE --rate 0.75 [--n 8] [--steps 500] [--compressor DIR]

For each of the first N dialogues: the full-token model answers every turn (greedy, its own history: the teacher);
the per-image matrix P of ``compress.oracle`` is fitted on L_pred + L_entropy, L_pred being the KL of the model's
teacher-forced answer-token distributions on P @ X_IMG against the teacher's (top-k KL with ``--topk K``, the full
vocabulary KL with ``--topk 0``). Then:

(a) accuracy per turn (VQA soft accuracy for VQA-v2, exact match otherwise) with the model's own history, and the KL
    of the first answer token of each turn against the teacher's (history: the teacher's answers, so every method
    sees the same context; FastV included), for the oracle, MetaCompress (with --compressor) and the baselines;
(b) for the tokens the oracle keeps (argmax of some row of P, or ``--keep-rule mass``) against all tokens, the
    distributions of [CLS] attention (LLaVA-1.5), FastV-style importance and prompt attention (compress.analysis
    says exactly which), with the share of kept tokens among each image's top ``--top-fraction`` tokens.

Writes ``oracle_analysis.json``, ``oracle_analysis.md``, ``oracle_tokens.jsonl`` (per-dialogue scores and kept
masks, for re-plotting) and ``attention_<score>.png`` / ``oracle_loss.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DEFAULT_METHODS = "random,sample,spatial,fastv,tome,prumerge,prumerge_plus,visionzip"
LLAVA_ONLY = ("prumerge", "prumerge_plus")  # refused for LLaVA-NeXT, as in the paper
SCORE_TEXT = {
    "cls": "[CLS] -> patch attention, CLIP encoder layer {cls_layer} (mean over heads)",
    "fastv": "FastV importance: last prompt token -> image, LLM layer {fastv_layer} (mean over heads)",
    "prompt": "prompt attention: text after the image -> image, LLM layer 0 (mean over heads and query tokens)",
}


# --- per-dialogue work -------------------------------------------------------------------------------------------
def _kl(teacher_logits, student_logits):
    """KL(softmax(teacher) || softmax(student)) per row of (..., V) logits, float32."""
    import torch

    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1)


class FittedP:
    """The oracle's fitted reduction as a feature reducer. On a 3-D rotary family its tokens take MetaCompress's
    positions (pooling windows' centres, ``compress.lvlm.base.window_centre_positions``), during the fit as after."""

    positions_at_window_centres = True

    def __init__(self, reduction) -> None:
        self.reduction = reduction

    def __call__(self, tokens, k, layout=None):
        return self.reduction


def _pred_loss(adapter, questions, teacher_ids, encoded, m: int, topk: int, vqa: bool):
    """L_pred(tokens, P) for fit_oracle: KL of the answer-token distributions on ``tokens`` (m, d) against the
    full-token teacher's (teacher-forced on its own answers), with cached-style top-k targets when ``topk`` > 0."""
    import torch

    from compress.losses import topk_kl
    from compress.lvlm.base import window_centre_positions
    from compress.lvlm.session import answer_logits

    full = adapter.visual_positions(encoded)  # None for 1-D families
    reduced = None if full is None else window_centre_positions(full, m)

    def logits(tokens, positions):
        return answer_logits(adapter, tokens, questions, teacher_ids, vqa, image_positions=positions).logits

    with torch.no_grad():
        teacher = logits(encoded.tokens, full).float()
    vocab = teacher.shape[-1]
    if 0 < topk < vocab:
        top_lp, top_ids = torch.log_softmax(teacher, -1).topk(topk, -1)

        def loss(tokens, p):
            return topk_kl(logits(tokens, reduced), top_lp, top_ids)
    else:
        def loss(tokens, p):
            return _kl(teacher, logits(tokens, reduced)).mean()
    return loss


def _run_method(adapter, method, rate, dialogue, image, teacher_ids, teacher_first, args, score) -> dict:
    """Accuracy per turn (own history) and first-token KL per turn (teacher history) of one method on one dialogue."""
    from compress.lvlm.session import ChatSession

    opts = dict(vqa=not args.no_vqa_suffix, fastv_k=args.fastv_k)
    own = ChatSession(adapter, method, rate, max_new_tokens=args.max_new_tokens, **opts)
    own.set_image(image)
    answers = [own.ask(q).answer for q in dialogue.questions]
    visual = int(own.fastv_kept.numel()) if own.fastv_kept is not None else int(own.image_tokens.shape[0])
    forced = ChatSession(adapter, method, rate, max_new_tokens=1, history="reference", **opts)
    forced.set_image(image)
    firsts = [forced.ask(q, ids).first_logits for q, ids in zip(dialogue.questions, teacher_ids)]
    kls = [float(_kl(t, s)) for t, s in zip(teacher_first, firsts)]
    scores = [score(dialogue.source, a, list(t.answers)) for a, t in zip(answers, dialogue.turns)]
    return {"answers": answers, "scores": scores, "kl": kls, "visual_tokens": visual}


def analyse_dialogue(adapter, dialogue, methods: dict, args, score) -> dict:
    """Teacher, oracle fit, every method, attention scores and kept mask of one dialogue (see the module doc)."""
    import torch

    from compress.analysis import clip_cls_attention, kept_tokens, prompt_attention
    from compress.losses import entropy_loss
    from compress.lvlm.methods import Method
    from compress.lvlm.session import ChatSession
    from compress.oracle import fit_oracle
    from compress.reduction import num_keep

    vqa = not args.no_vqa_suffix
    teacher = ChatSession(adapter, "full", max_new_tokens=args.max_new_tokens, vqa=vqa)
    teacher.set_image(dialogue.image)
    turns = [teacher.ask(q) for q in dialogue.questions]
    teacher_ids = [r.answer_ids for r in turns]
    teacher_first = [r.first_logits for r in turns]
    encoded = teacher.batch.encoded[0]
    record = {"dialogue_id": dialogue.dialogue_id, "source": dialogue.source,
              "teacher_answers": [r.answer for r in turns]}
    if not any(teacher_ids):
        record["skipped"] = "the full-token model answered every turn with the stop token: L_pred has no tokens"
        return record
    x = encoded.tokens
    m = num_keep(x.shape[0], args.rate)
    loss_fn = _pred_loss(adapter, dialogue.questions, teacher_ids, encoded, m, args.topk, vqa)
    fit = fit_oracle(x, m, loss_fn, steps=args.steps, lr=args.lr, entropy_weight=args.entropy_weight, seed=args.seed,
                     init=args.init, optimizer=args.optimizer)
    record["oracle_losses"] = fit.losses
    with torch.no_grad():  # the two terms at the fitted P: how close the oracle gets to the teacher
        p = fit.reduction.matrix
        record["oracle_pred_loss"] = float(loss_fn(fit.reduction.tokens, p))
        record["oracle_entropy"] = float(entropy_loss(p))
    oracle = Method("oracle", "feature", FittedP(fit.reduction))
    rows = {"full": (Method("full", "none"), None), "oracle": (oracle, args.rate)}
    rows.update({name: (method, args.rate) for name, method in methods.items()})
    record["methods"] = {}
    for name, (method, rate) in rows.items():
        image = dialogue.image if method.kind == "vision" else encoded  # cached X_IMG where the method allows
        try:
            record["methods"][name] = _run_method(adapter, method, rate, dialogue, image, teacher_ids,
                                                  teacher_first, args, score)
        except ValueError as err:  # a method that cannot run at this rate / on this model (ToMe on a shallow tower)
            record["methods"][name] = {"error": str(err)}

    layers = sorted({0, args.fastv_k - 1})
    pa = prompt_attention(adapter, x, dialogue.questions[0], layers, vqa, adapter.visual_positions(encoded))
    scores = {"prompt": pa.prompt_scores([0]), "fastv": pa.last_token_scores(args.fastv_k - 1)}
    if adapter.family == "llava":
        tower = adapter.model.model.vision_tower
        scores["cls"] = clip_cls_attention(tower, encoded.pixel_values, args.cls_layer,
                                           include_cls=adapter.select_strategy == "full")[0]
    kept = kept_tokens(fit.reduction.matrix, args.keep_rule)
    record["num_tokens"], record["num_keep"] = int(x.shape[0]), m
    record["scores"] = {k: v.float().cpu().tolist() for k, v in scores.items()}
    record["kept"] = kept.cpu().tolist()
    return record


# --- aggregation and reports -------------------------------------------------------------------------------------
def summarise(records: list[dict], args, family: str) -> dict:
    import torch

    from compress.analysis import kept_statistics
    from pipeline.metrics import per_turn_accuracy

    done = [r for r in records if "skipped" not in r]
    methods, errors = {}, {}
    for name in (done[0]["methods"] if done else []):
        per = [r["methods"][name] for r in done if "error" not in r["methods"][name]]
        errors.update({f"{name}/{r['dialogue_id']}": r["methods"][name]["error"] for r in done
                       if "error" in r["methods"][name]})
        if not per:
            continue
        acc = per_turn_accuracy([p["scores"] for p in per])
        turns = max(len(p["kl"]) for p in per)
        kl = {f"KL_{t + 1}": _mean([p["kl"][t] for p in per if len(p["kl"]) > t]) for t in range(turns)}
        kl["KL_avg"] = _mean(list(kl.values()))
        methods[name] = {**acc, **kl, "visual_tokens": _mean([p["visual_tokens"] for p in per])}
    attention = {}
    for kind in (("cls",) if family == "llava" else ()) + ("fastv", "prompt"):
        scores = [torch.tensor(r["scores"][kind]) for r in done]
        kept = [torch.tensor(r["kept"]) for r in done]
        if scores:
            text = SCORE_TEXT[kind].format(cls_layer=args.cls_layer, fastv_layer=args.fastv_k - 1)
            attention[kind] = {"what": text, **kept_statistics(scores, kept, args.top_fraction).to_json()}
    oracle = {"final_loss": _mean([r["oracle_losses"][-1] for r in done]),
              "first_loss": _mean([r["oracle_losses"][0] for r in done]),
              "final_pred_loss": _mean([r["oracle_pred_loss"] for r in done]),
              "final_entropy": _mean([r["oracle_entropy"] for r in done])}
    return {"model": str(args.model), "family": family, "dialogues_file": str(args.dialogues), "rate": args.rate,
            "dialogues": len(done), "skipped": {r["dialogue_id"]: r["skipped"] for r in records if "skipped" in r},
            "oracle": {"steps": args.steps, "lr": args.lr, "entropy_weight": args.entropy_weight, "init": args.init,
                       "optimizer": args.optimizer,
                       "pred_loss": f"top-{args.topk} KL" if args.topk > 0 else "full-vocabulary KL", **oracle},
            "keep_rule": args.keep_rule, "top_fraction": args.top_fraction,
            "kl": "KL(teacher || method) of the first answer token of each turn, history = the teacher's answers",
            "methods": methods, "method_errors": errors, "attention": attention}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(summary: dict) -> str:
    from pipeline.reports import label

    lines = [f"# Oracle analysis: {Path(summary['model']).name}, rate {summary['rate']:g}", "",
             f"{summary['dialogues']} dialogues of `{summary['dialogues_file']}`; oracle: {summary['oracle']['steps']} "
             f"{summary['oracle'].get('optimizer', 'sgd').upper()} steps from a {summary['oracle'].get('init', 'random')} "
             f"start, lr {summary['oracle']['lr']:g}, L_pred = {summary['oracle']['pred_loss']} + "
             f"{summary['oracle']['entropy_weight']:g} L_entropy (mean loss {_fmt(summary['oracle']['first_loss'], 4)}"
             f" -> {_fmt(summary['oracle']['final_loss'], 4)}; at the end L_pred {_fmt(summary['oracle']['final_pred_loss'], 4)}, "
             f"L_entropy {_fmt(summary['oracle']['final_entropy'], 4)}).", ""]
    if summary.get("not_run"):
        lines += [f"Not run: {', '.join(f'{k} ({v})' for k, v in summary['not_run'].items())}.", ""]
    if summary["skipped"]:
        lines += [f"Skipped: {', '.join(f'{k} ({v})' for k, v in summary['skipped'].items())}", ""]
    methods = summary["methods"]
    if methods:
        first = next(iter(methods.values()))
        accs = [k for k in first if k.startswith("Acc_")]
        kls = [k for k in first if k.startswith("KL_")]
        head = ["Method", *accs, "Avg", *kls, "Visual tokens"]
        lines += ["## (a) Accuracy (%) and KL against the full-token teacher", "", f"KL: {summary['kl']}.", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, row in methods.items():
            title = "Oracle (per-image P)" if name == "oracle" else label(name)
            cells = [title] + [_fmt(row[k], 1) for k in accs + ["Avg"]] + [_fmt(row[k], 4) for k in kls]
            lines.append("| " + " | ".join(cells + [_fmt(row["visual_tokens"], 1)]) + " |")
        lines.append("")
    if summary["method_errors"]:
        lines += ["Methods that could not run (left out of the table where they failed on every dialogue):", ""]
        lines += [f"- {k}: {v}" for k, v in summary["method_errors"].items()] + [""]
    if summary["attention"]:
        pct = f"{100 * summary['top_fraction']:g} %"
        lines += ["## (b) Kept tokens against attention", "",
                  f"Kept: {'argmax of some row of P' if summary['keep_rule'] == 'argmax' else 'the m largest column masses of P'}."
                  f" Top-attended: each image's top {pct} by the score. AUC: P(kept token scores above a dropped one), "
                  "0.5 = unrelated. Relative score: score x n / sum (1 = uniform).", "",
                  "| Score | kept | kept in top | share of kept in top | chance | recall of top | AUC | "
                  "rel. score kept / all |", "|---|---|---|---|---|---|---|---|"]
        for kind, s in summary["attention"].items():
            lines.append(f"| {s['what']} | {s['kept']} | {s['kept_in_top']} | {100 * s['share_of_kept_in_top']:.2f} % | "
                         f"{100 * s['chance']:.2f} % | {100 * s['recall_of_top']:.2f} % | {_fmt(s['auc'], 3)} | "
                         f"{_fmt(s['mean_relative_score_kept'])} / {_fmt(s['mean_relative_score_all'])} |")
        lines += [""] + [f"![{k}](attention_{k}.png)" for k in summary["attention"]] + [""]
    return "\n".join(lines)


def plots(records: list[dict], summary: dict, out: Path) -> list[str]:
    """Histograms like figure 1b/1c (relative score of all tokens vs kept tokens, densities) and the loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from compress.analysis import relative_scores

    done = [r for r in records if "skipped" not in r]
    written = []
    for kind, stats in summary["attention"].items():
        rel = [relative_scores(torch.tensor(r["scores"][kind])).numpy() for r in done]
        kept = [np.asarray(r["kept"], dtype=bool) for r in done]
        all_v, kept_v = np.concatenate(rel), np.concatenate([v[k] for v, k in zip(rel, kept)])
        lo, hi = (float(v) for v in np.quantile(all_v, [0.0, 0.995]))
        bins = np.linspace(lo, max(hi, lo + 1e-6), 40)  # the top 0.5 % is clipped into the last bin
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.hist(np.clip(all_v, lo, bins[-1]), bins=bins, density=True, alpha=0.5, label=f"all ({all_v.size})")
        if kept_v.size:
            ax.hist(np.clip(kept_v, lo, bins[-1]), bins=bins, density=True, alpha=0.6, label=f"kept ({kept_v.size})")
        ax.set_xlabel("relative score (score x n / sum; 1 = uniform)")
        ax.set_ylabel("density")
        ax.set_title(stats["what"], fontsize=7)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"attention_{kind}.png", dpi=120)
        plt.close(fig)
        written.append(f"attention_{kind}.png")
    if done:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for r in done:
            ax.plot(r["oracle_losses"], lw=0.8, label=r["dialogue_id"])
        ax.set_xlabel("SGD step")
        ax.set_ylabel("L_pred + L_entropy")
        ax.set_yscale("log" if all(v > 0 for r in done for v in r["oracle_losses"]) else "linear")
        if len(done) <= 8:
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "oracle_loss.png", dpi=120)
        plt.close(fig)
        written.append("oracle_loss.png")
    return written


# --- the command -------------------------------------------------------------------------------------------------
def run_oracle(args: argparse.Namespace) -> int:
    if not 0.0 < args.rate < 1.0:
        raise ValueError(f"--rate {args.rate} is outside (0, 1): it is the share of visual tokens removed")
    for flag, value in (("--n", args.n), ("--steps", args.steps), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be at least 1")
    if args.topk < 0:
        raise ValueError(f"--topk {args.topk} must be >= 0 (0: full-vocabulary KL)")
    if not 0.0 < args.top_fraction <= 1.0:
        raise ValueError(f"--top-fraction {args.top_fraction} must be in (0, 1]")

    from compress.lvlm import model_family
    from compress.lvlm.methods import available_methods, get_method
    from pipeline.dialogues import load_dialogues

    family = model_family(args.model)  # a bad directory fails before anything loads
    dialogues = load_dialogues(args.dialogues)[: args.n]
    if not dialogues:
        raise ValueError(f"{args.dialogues} holds no dialogue")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = available_methods()
    for name in names:
        if name not in known or name in ("full", "metacompress"):
            raise ValueError(f"--methods: {name!r} is not a baseline; known: "
                             f"{', '.join(sorted(set(known) - {'full', 'metacompress'}))}")
    not_run = {n: "LLaVA-1.5 only" for n in names if family != "llava" and n in LLAVA_ONLY}
    methods = {n: get_method(n) for n in names if n not in not_run}
    if args.compressor:
        methods["metacompress"] = get_method("metacompress", args.compressor)

    import torch

    from compress.lvlm import load_adapter
    from pipeline.metrics import score

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    adapter = load_adapter(args.model, device=device,
                           dtype=torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    adapter.model.requires_grad_(False)  # gradients flow to P only
    for m in methods.values():
        if isinstance(m.fn, torch.nn.Module):
            m.fn.to(adapter.device)
    n_layers = adapter.text_config.num_hidden_layers
    if not 1 <= args.fastv_k < n_layers:
        raise ValueError(f"--fastv-k {args.fastv_k} must be in [1, {n_layers - 1}] for a {n_layers}-layer LLM")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, d in enumerate(dialogues):
        print(f"[{i + 1}/{len(dialogues)}] {d.dialogue_id}", file=sys.stderr, flush=True)
        records.append(analyse_dialogue(adapter, d, methods, args, score))
    summary = summarise(records, args, family)
    summary["not_run"] = not_run
    with open(out / "oracle_tokens.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    summary["plots"] = plots(records, summary, out)
    (out / "oracle_analysis.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "oracle_analysis.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0
