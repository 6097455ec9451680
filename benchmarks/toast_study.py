"""TOAST ablations on the VALIDATION split (issue 16, item 1): which parts of TOAST matter here.

    python benchmarks/toast_study.py [--append-results] [--results PATH]   # glyphs, ~20-25 CPU-min
    python benchmarks/toast_study.py --smoke                                # fixture backbone, < 30 s

Every arm is the `toast` lecture recipe (toast_core.recipes) with ONE change, trained with the
library's loop (`train`) on the same data and seed and scored on the task's validation split
(accuracy with its Wilson interval, the paired bootstrap interval of its difference to the baseline
arm on the same images, and last-layer CLS focus on the deciding object). The best arm is chosen on
validation only (ties within one image go to the recipe); test is read once, afterwards.

Reduced budget (one shared CPU thread): 50 train images per class (recipe 300), 36 steps of 32
(recipe 140, ~26%; warmup scaled 20 -> 5), one seed per arm. Pre-tuning for ~2000 steps is not run:
the shipped 400 steps took 7.6 min on 2 threads (33 ms/img), so 2000 would be ~38 min on 2 threads,
more than this study's whole budget; "none" (scratch) vs the shipped 400 steps is measured instead.
Per-group learning rates go through the loop's own `TrainConfig.head_lr_scale` (the head's lr as a
multiple of the module's, same schedule); on a checkout without that field the arm is left out.
The first run of this study (RESULTS.md history) patched the optimizer builder for the same effect.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from toast_core.core.backbone import Backbone, load_backbone, tiny_fixture_backbone
from toast_core.core.forward import Capture
from toast_core.core.stats import bootstrap_interval
from toast_core.data.base import LabeledImages
from toast_core.data.scenes import make_task_split
from toast_core.methods import build_method
from toast_core.methods.base import SteeringMethod
from toast_core.methods.toast import Toast, ToastConfig
from toast_core.storage.results_file import write_section
from toast_core.training.recipes import COMMON_TRAIN, TEST_PER_CLASS, VAL_PER_CLASS, Recipe, recipe
from toast_core.training.train import TrainConfig, TrainResult, prepare_batch, train
from toast_core.training.zoo.evaluate import score_split
from toast_core.training.zoo.train_entry import build_entry_method, task_splits

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
ZOO = REPO / "checkpoints" / "zoo"
PRETUNED_CARD = REPO / "checkpoints" / "toast_pretuned.json"
COMPETITORS = ("linear", "lora", "vpt_deep", "vpt_shallow", "full", "bitfit", "toast", "toast_lite")


@dataclass(frozen=True)
class Arm:
    """One ablation: the recipe of `entry` with these changes (everything else as the recipe)."""

    name: str
    change: str
    entry: str = "toast"
    config: dict[str, Any] = field(default_factory=dict)  # method_config overrides
    lr_mult: float = 1.0
    head_lr: float | None = None  # the head's lr as a multiple of the module's (None: the recipe's)
    freeze: tuple[str, ...] = ()  # parameter-name prefixes frozen after the build
    redraw_xi: bool = False
    uniform_selection: bool = False


#: the loop supports a separate head learning rate (TrainConfig.head_lr_scale)
HEAD_LR = "head_lr_scale" in {f.name for f in dataclasses.fields(TrainConfig)}


def head_scale(r: Recipe) -> float:
    return float(getattr(r, "head_lr_scale", 1.0))


def arms_for(depth: int, r: Recipe) -> list[Arm]:
    """The arms around recipe `r`, in priority order (a run short of time drops the last ones)."""
    half, rh = depth // 2, head_scale(r)
    alt = 10.0 if rh == 1.0 else 1.0  # the head-lr arm flips the recipe's choice
    arms = [
        Arm("baseline", f"recipe: pre-tuned init, all blocks, λ=0, decoders+ξ+head, lr {r.lr:g}, head lr ×{rh:g}"),
        Arm("pretune_none", "pre-tuning none: decoders and ξ from random init", config={"init": "scratch"}),
        Arm("lr_x0.3", f"lr ×0.3 ({r.lr * 0.3:g})", lr_mult=0.3),
        Arm("lr_x3", f"lr ×3 ({r.lr * 3:g})", lr_mult=3.0),
        Arm("fb_late_half", f"feedback only to blocks {half}..{depth - 1} (feedback_to={half})", config={"feedback_to": half}),
        Arm("fb_early_half", f"selection after block {half}, feedback to 0..{half - 1} (feedback_from={half})",
            config={"feedback_from": half}),
        Arm("var_0.1", "variational loss λ=0.1 (pre-tuning's value)", config={"var_loss_weight": 0.1}),
        Arm("var_1.0", "variational loss λ=1.0 (×10)", config={"var_loss_weight": 1.0}),
        Arm("train_head_only", "decoders and ξ frozen: only the head trains", freeze=("decoders.", "xi")),
        Arm("train_no_decoders", "decoders frozen: ξ (prompt) + head train", freeze=("decoders.",)),
        Arm("train_no_prompt", "ξ (prompt/prior) frozen: decoders + head train", freeze=("xi",)),
        Arm("toast_lite", "TOAST-Lite recipe: rank-4 LoRA on frozen decoders, P trains, lr 3e-3", entry="toast_lite"),
        Arm(f"head_lr_x{alt:g}", f"per-group lr: head ×{alt:g} of the module's lr (recipe ×{rh:g})", head_lr=alt),
        Arm("prior_uniform", "no selection prior: m ≡ 1 on every token (ξ unused)", uniform_selection=True),
        Arm("prior_redrawn", "selection prior ξ re-drawn at random (decoders pre-tuned)", redraw_xi=True),
    ]
    return [a for a in arms if a.head_lr is None or HEAD_LR]


class _UniformSelection(Toast):
    """TOAST whose selection passes every token unweighted (m = 1): what the prior ξ adds."""

    def select(self, z: Tensor) -> Tensor:
        return z.new_ones(z.shape[:2])


def build_arm(arm: Arm, task: str, backbone: Backbone, num_classes: int, seed: int) -> tuple[SteeringMethod, Recipe]:
    """The arm's module (from the library's builders) and its recipe."""
    base = recipe(task, arm.entry)
    r = dataclasses.replace(base, lr=base.lr * arm.lr_mult, method_config={**base.method_config, **arm.config})
    if arm.uniform_selection:
        method: SteeringMethod = _UniformSelection(backbone, num_classes, ToastConfig(seed=seed, **r.method_config))
    else:
        method = build_entry_method(r, backbone, num_classes, seed)
    for name, p in method.named_parameters():
        if arm.freeze and name.startswith(arm.freeze):
            p.requires_grad_(False)
    if arm.redraw_xi:
        with torch.no_grad():
            method.xi.copy_(torch.randn(method.xi.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return method, r


def arm_config(arm: Arm, r: Recipe, steps: int, seed: int) -> TrainConfig:
    """The recipe's loop settings for `steps` (warmup scaled with the budget) and the arm's head lr."""
    warmup = min(r.steps, max(1, round(COMMON_TRAIN["warmup_steps"] * steps / r.steps)))
    extra = {} if arm.head_lr is None else {"head_lr_scale": arm.head_lr}
    return r.train_config(seed, steps=steps, warmup_steps=warmup, **extra)


def train_arm(method: SteeringMethod, r: Recipe, arm: Arm, data: LabeledImages, steps: int, seed: int) -> TrainResult:
    """The library loop with the arm's settings."""
    return train(method, data, None, arm_config(arm, r, steps, seed))


def score(method: SteeringMethod, data: LabeledImages, split: str) -> dict[str, Any]:
    """`zoo.evaluate.score_split`'s numbers with per-image correctness (for paired differences)."""
    return {"split": split, **score_split(method, data, per_image=True)}


def reconstruction(method: SteeringMethod, images: Tensor) -> dict[str, float]:
    """Pass-2 feedback reconstruction: mean over feedback blocks of ‖W1_l out_l − in_l‖² / ‖in_l‖²
    (1.0 = W1 = 0; `identity` = the same error of W1 = I) and td's RMS over the stream's (how big
    the steering is). The variational loss trains exactly this error."""
    if not isinstance(method, Toast):
        return {}
    blocks = list(method.feedback_blocks)
    with torch.no_grad():
        out = method(prepare_batch(method, images), Capture(block_inputs=blocks, block_outputs=blocks))
        ins, outs = out.out.block_inputs, out.out.block_outputs
        rel = [(method.decoders[b].linear(outs[b]) - ins[b]).pow(2).sum() / ins[b].pow(2).sum() for b in blocks]
        ident = [(outs[b] - ins[b]).pow(2).sum() / ins[b].pow(2).sum() for b in blocks]
        td = out.extras["td_norm"][:, blocks].mean(0)
        stream = torch.stack([ins[b].norm(dim=-1).pow(2).mean().sqrt() for b in blocks])
    return {"recon": float(torch.stack(rel).mean()), "identity": float(torch.stack(ident).mean()),
            "td_ratio": float((td / stream).mean())}


def choose_best(rows: list[dict[str, Any]], baseline: str = "baseline") -> str:
    """Highest validation hits; ties within one image go to the recipe (`baseline`). Rows hold
    validation numbers only (val_hits, val_n): the test split is never an input here."""
    base = next(r for r in rows if r["arm"] == baseline)
    top = max(rows, key=lambda r: r["val_hits"])
    return baseline if top["val_hits"] - base["val_hits"] <= 1 else top["arm"]


def paired_delta(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """acc(a) − acc(b) on the same images and its 95% paired bootstrap interval."""
    lo, hi = bootstrap_interval((a.astype(float), b.astype(float)), lambda x, y: float(x.mean() - y.mean()))
    return float(a.mean() - b.mean()), lo, hi


def zoo_cards(task: str) -> dict[str, dict[str, Any]]:
    """Test numbers, train seconds and recipe of the shipped zoo entries (the recipes at full budget)."""
    out = {}
    for entry in COMPETITORS:
        path = ZOO / task / f"{entry}.json"
        if path.is_file():
            z = json.loads(path.read_text())["extra"]["zoo"]
            out[entry] = {**z["test"], "train_s": z.get("train_s"), "train_cpu_s": z.get("train_cpu_s"),
                          "recipe": z.get("recipe", {})}
    return out


def card_is_recipe(card: dict[str, Any] | None, r: Recipe) -> bool:
    """Whether a zoo card was trained with recipe `r` as it stands now (training settings only)."""
    if not card:
        return False
    now, then = r.describe(), card.get("recipe", {})
    keys = ("method", "steps", "batch_size", "lr", "weight_decay", "method_config", "per_class")
    return all(now.get(k) == then.get(k) for k in keys) and head_scale(r) == float(then.get("head_lr_scale", 1.0))


def _ci(v: float, lo: float, hi: float, nd: int = 3) -> str:
    return f"{v:.{nd}f} [{lo:.{nd}f}, {hi:.{nd}f}]"


def _sign(d: float, lo: float, hi: float) -> str:
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def better(d: float, lo: float) -> str:
    """The verdict of 'X is better than Y' from a difference and its interval's low end."""
    return "holds" if lo > 0 else ("holds partly" if d > 0 else "does not hold here")


def verdicts(rows: dict[str, dict[str, Any]], best: str, frozen: dict[str, Any], cards: dict[str, dict[str, Any]],
             chosen_test: dict[str, Any] | None, other: tuple[str, dict[str, dict[str, Any]]],
             rec0: dict[str, dict[str, float]], task: str) -> list[str]:
    """One line per claim: verdict, numbers, most likely reason (worded from what was measured)."""
    out: list[str] = []
    card, lin, base, pick = cards.get("toast"), cards.get("linear"), rows["baseline"], rows[best]
    toast, n = chosen_test or card, base["n"]
    fci = lambda r: _ci(r["focus_ratio"], r["focus_ratio_lo"], r["focus_ratio_hi"], 2)
    if toast and lin and card and "focus_ratio" in toast:
        ups = [t["focus_ratio_lo"] > lin["focus_ratio_hi"] for t in {id(toast): toast, id(card): card}.values()]
        v = "holds" if all(ups) else ("holds partly" if any(ups) else "does not hold here")
        flat = [k for k, r in rows.items() if "focus_ratio" in r and r["focus_ratio_hi"] < frozen["focus_ratio_lo"]]
        out.append(
            f"- **Steering refocuses attention on the task object: {v}.** Test focus ratio (last-layer CLS on the deciding "
            f"object / its area): chosen TOAST recipe ({best}) {fci(toast)}, shipped recipe {fci(card)}, unsteered backbone "
            f"(linear probe's map) {fci(lin)}, LoRA {fci(cards['lora'])}. On val the backbone's map scores {fci(frozen)}; "
            f"below it: " + (", ".join(f"{k} {rows[k]['focus_ratio']:.2f} (td/stream {rows[k]['td_ratio']:.2f})" for k in flat)
                             or "none") + ". Most likely reason: the feedback only adds W_v·td to the values of a frozen "
            f"backbone; while td stays small (chosen: td/stream {pick.get('td_ratio', float('nan')):.3f}) it can sharpen the "
            "map a little, and where td grows to the stream's size the attention flattens (focus ≈ 1); LoRA, which "
            "changes the query/value weights, moves focus far more.")
    head = rows.get("train_head_only")
    head_txt = (f"on val a head alone on the frozen pre-tuned steering scores {head['acc']:.3f} vs the recipe's "
                f"{base['acc']:.3f} (Δ {_sign(*head['delta'])}): the trained steering adds no detectable accuracy at this "
                "budget" if head else "the head-only arm was not run")
    for label, cset, t, what in ((task, cards, toast, best if chosen_test else "shipped recipe"),
                                 (other[0], other[1], other[1].get("toast"), "shipped recipe, not re-tuned")):
        if not t:
            continue
        res, wins = [], 0
        for c in ("full", "lora", "vpt_deep", "vpt_shallow"):
            if c in cset:
                wins += t["acc_lo"] > cset[c]["acc_hi"]
                res.append(f"{c} {_ci(cset[c]['acc'], cset[c]['acc_lo'], cset[c]['acc_hi'])} ({cset[c]['train_s']:.0f} s)")
        v = "holds" if wins == len(res) else ("holds partly" if wins else "does not hold here")
        out.append(
            f"- **TOAST beats fine-tuning, LoRA and VPT ({label}, {cset['toast'].get('n')} test images, recipes at ~equal "
            f"train seconds): {v}** ({wins}/{len(res)} beaten with non-overlapping intervals). TOAST ({what}) "
            f"{_ci(t['acc'], t['acc_lo'], t['acc_hi'])} ({t.get('train_s') or float('nan'):.0f} s) vs " + ", ".join(res)
            + f"; linear probe {cset['linear']['acc']:.3f}. Most likely reason: the others change the backbone's own "
            f"weights, TOAST only adds a value offset to a frozen one; {head_txt}.")
    if "pretune_none" in rows:
        d = rows["pretune_none"]["delta"]
        gain, lo, hi = 0.0 - d[0], 0.0 - d[2], 0.0 - d[1]
        why = ("the pre-tuned decoders already invert the blocks, so steering is useful from the first step" if lo > 0
               else "the inversion learned on source scenes does not turn into downstream accuracy in a short run; "
               f"with λ = 0 stage 2 also undoes it (baseline's error after tuning {base.get('recon', float('nan')):.3f})")
        out.append(
            f"- **Pre-tuning (stage 1) helps stage 2: {better(gain, lo)}.** Val acc pre-tuned − scratch {_sign(gain, lo, hi)} "
            f"(n={n}); feedback reconstruction error pre-tuned {rec0['auto'].get('recon', float('nan')):.3f} vs scratch "
            f"{rec0['scratch'].get('recon', float('nan')):.3f} (1.0 = none). Most likely reason: {why}.")
    prior = [a for a in ("prior_uniform", "prior_redrawn", "train_no_prompt") if a in rows]
    if prior:
        v = "holds" if any(rows[a]["delta"][2] < 0 for a in prior) else "does not hold here"
        uni = rows.get("prior_uniform")
        why = (f"what the selection does here is keep td small (m ≡ 1: td/stream {uni['td_ratio']:.2f}, focus "
               f"{uni['focus_ratio']:.2f}), not pick task tokens: a random ξ does as well as the pre-tuned one"
               if uni and "focus_ratio" in uni else "the mask only rescales a small td")
        out.append(
            f"- **The task-specific selection prior ξ matters: {v}.** Removing, re-drawing or freezing it (val, n={n}): "
            + ", ".join(f"{a} Δ {_sign(*rows[a]['delta'])}" for a in prior) + f". Most likely reason: {why}.")
    if "toast_lite" in rows:
        d = rows["toast_lite"]["delta"]
        v = "holds" if d[1] > -0.05 else ("does not hold here" if d[2] < 0 else "holds partly")
        out.append(
            f"- **TOAST-Lite keeps TOAST's accuracy with far fewer trainable parameters: {v}** (non-inferiority margin "
            f"0.05). Val Δ Lite − TOAST {_sign(*d)} (n={n}), trainable {rows['toast_lite']['trainable']:,} vs "
            f"{base['trainable']:,}; test (zoo cards) {cards.get('toast_lite', {}).get('acc', float('nan')):.3f} vs "
            f"{card['acc'] if card else float('nan'):.3f}. Most likely reason: the full decoders barely help here, so "
            "their low-rank form loses nothing.")
    sig = [k for k, r in rows.items() if k != "baseline" and (r["delta"][1] > 0 or r["delta"][2] < 0)]
    sig_txt = ", ".join(f"{k} {_sign(*rows[k]['delta'])}" for k in sig) or "none"
    out.append(
        f"- Other knobs (not claims): beyond noise vs the recipe (paired 95% CI, no correction for {len(rows) - 1} "
        f"comparisons): {sig_txt}. The chosen arm's val "
        f"{pick['acc']:.3f} is the best of {len(rows)} (optimistic); its test number is the honest one. "
        f"Train seconds per arm: recipe {base['train_s']:.0f} s"
        + "".join(f", {k} {rows[k]['train_s']:.0f} s" for k in ("fb_late_half", "train_head_only") if k in rows) + ".")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="glyphs")
    ap.add_argument("--steps", type=int, default=36, help="steps per arm (recipe: 140)")
    ap.add_argument("--train-per-class", type=int, default=50, help="train images per class (recipe: 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arms-minutes", type=float, default=20.0, help="no arm starts if it would end past this")
    ap.add_argument("--max-minutes", type=float, default=25.0, help="the final full-budget run only if it fits")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--append-results", action="store_true")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    elapsed = lambda: (time.perf_counter() - t_start) / 60
    steps = 2 if args.smoke else args.steps
    backbone = tiny_fixture_backbone() if args.smoke else load_backbone("embedded", device="cpu")
    if args.smoke:
        splits = task_splits(args.task, smoke=True, with_test=False)
    else:
        splits = {s: make_task_split(args.task, s, per_class=n, seed=0)
                  for s, n in (("train", args.train_per_class), ("val", VAL_PER_CLASS))}
    train_set, val = splits["train"], splits["val"]
    nc, n_val = train_set.num_classes, len(val)
    probe = val.images[:64]
    print(f"[{args.task}] {len(train_set)} train / {n_val} val images, {steps} steps × 32 per arm "
          f"({elapsed():.1f} min)", flush=True)
    frozen = score(build_method("linear", backbone, nc, {"seed": args.seed}), val, "val")  # the unsteered map
    inits = {m: build_method("toast", backbone, nc, {"seed": args.seed, "init": m}) for m in ("auto", "scratch")}
    rec0 = {m: reconstruction(module, probe) for m, module in inits.items()}
    init_source = getattr(inits["auto"], "init_source", "?")
    print(f"recipe init: {init_source}", flush=True)  # the pre-tuned module must load off the fixture
    rows: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    arm_list = arms_for(backbone.layout.depth, recipe(args.task, "toast"))
    for arm in arm_list:
        last = max((r["seconds"] for r in rows.values()), default=0.0) / 60
        if elapsed() + last > args.arms_minutes:
            skipped.append(arm.name)
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        method, r = build_arm(arm, args.task, backbone, nc, args.seed)
        result = train_arm(method, r, arm, train_set, steps, args.seed)
        s = score(method, val, "val")
        row = {"arm": arm.name, "change": arm.change, "val_hits": int(s["correct"].sum()), "val_n": s["n"], **s,
               **reconstruction(method, probe), "trainable": method.trainable_count(),
               "train_s": result.timings["train_s"], "seconds": time.perf_counter() - t0,
               "cpu_s": time.process_time() - c0, "lr": r.lr}
        row["delta"] = paired_delta(s["correct"], rows["baseline"]["correct"] if rows else s["correct"])
        rows[arm.name] = row
        print(f"[{args.task}] {arm.name:18s} val {_ci(s['acc'], s['acc_lo'], s['acc_hi'])} (n={s['n']}) "
              f"Δ {_sign(*row['delta'])} focus {s.get('focus_ratio', float('nan')):.2f} "
              f"train {row['train_s']:.0f} s (cpu {row['cpu_s']:.0f} s) [{len(rows)}/{len(arm_list)}, "
              f"{elapsed():.1f} min]", flush=True)
    best = choose_best([{"arm": k, "val_hits": v["val_hits"], "val_n": v["val_n"]} for k, v in rows.items()])
    print(f"best arm on validation: {best} ({rows[best]['acc']:.3f}); baseline {rows['baseline']['acc']:.3f}", flush=True)

    # test, once, for the chosen recipe: the zoo card when it is the recipe, else a full-budget run if it fits
    cards = zoo_cards(args.task)
    other_task = "stars" if args.task == "glyphs" else "glyphs"
    other = zoo_cards(other_task)
    chosen_test: dict[str, Any] | None = None
    test_source = "none"
    arm = next(a for a in arm_list if a.name == best)
    full_steps = 3 if args.smoke else recipe(args.task, arm.entry).steps
    est = rows[best]["seconds"] / 60 * full_steps / steps + (0 if args.smoke else 1.5)
    card_current = card_is_recipe(cards.get("toast"), recipe(args.task, "toast"))
    if best == "baseline" and not args.smoke and card_current:
        test_source = "zoo card (the recipe's full-budget run, seed 0)"
    elif elapsed() + est <= args.max_minutes:
        if args.smoke:
            test_splits = task_splits(args.task, smoke=True)
            full_train, test = test_splits["train"], test_splits["test"]
        else:
            full_train = make_task_split(args.task, "train", per_class=recipe(args.task, arm.entry).per_class, seed=0)
            test = make_task_split(args.task, "test", per_class=TEST_PER_CLASS, seed=0)
        method, r = build_arm(arm, args.task, backbone, nc, args.seed)
        c_full = time.process_time()
        result = train_arm(method, r, arm, full_train, full_steps, args.seed)
        cpu_full = time.process_time() - c_full
        chosen_test = {**score(method, test, "test"), "train_s": result.timings["train_s"], "train_cpu_s": cpu_full}
        test_source = f"this run: {best} at the recipe's full budget ({full_steps} steps, {len(full_train)} images)"
        print(f"test {best}: {_ci(chosen_test['acc'], chosen_test['acc_lo'], chosen_test['acc_hi'])} "
              f"(n={chosen_test['n']}), train {chosen_test['train_s']:.0f} s", flush=True)
    else:
        test_source = f"not measured (needs ~{est:.0f} min more): validation only"
    test = chosen_test or (cards.get("toast") if best == "baseline" and card_current else None)

    minutes = elapsed()
    table = ["| arm | what changed | val acc [95% CI] | Δ vs baseline [95% paired CI] | n | focus ratio [95% CI] "
             "| trainable | recon err | td/stream | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k, v in rows.items():
        fr = _ci(v["focus_ratio"], v["focus_ratio_lo"], v["focus_ratio_hi"], 2) if "focus_ratio" in v else "—"
        table.append(f"| {k}{' **(chosen)**' if k == best else ''} | {v['change']} | {_ci(v['acc'], v['acc_lo'], v['acc_hi'])} "
                     f"| {_sign(*v['delta'])} | {v['n']} | {fr} | {v['trainable']:,} | {v.get('recon', float('nan')):.3f} "
                     f"| {v.get('td_ratio', float('nan')):.3f} | {v['train_s']:.0f} |")
    if "focus_ratio" in frozen:
        table.append(f"| backbone (no steering) | frozen backbone's own map (reference) | — | — | {n_val} | "
                     f"{_ci(frozen['focus_ratio'], frozen['focus_ratio_lo'], frozen['focus_ratio_hi'], 2)} | — | — | — | — |")
    for line in table:
        print(line)
    comp = ["| method (zoo card, full recipe) | test acc [95% CI] | n | focus ratio [95% CI] | train s | train cpu s |",
            "|---|---|---|---|---|---|"]
    same = best == "baseline" and card_current
    named = {("toast (= the chosen recipe)" if k == "toast" and same else k): c for k, c in cards.items()}
    for name, c in [*named.items(), *([(f"{best} (chosen; this run)", chosen_test)] if chosen_test else [])]:
        fr = _ci(c["focus_ratio"], c["focus_ratio_lo"], c["focus_ratio_hi"], 2) if "focus_ratio" in c else "—"
        comp.append(f"| {name} | {_ci(c['acc'], c['acc_lo'], c['acc_hi'])} | {c['n']} | {fr} | "
                    f"{c.get('train_s') or float('nan'):.0f} | {c.get('train_cpu_s') or float('nan'):.0f} |")
    for line in comp:
        print(line)
    lines = verdicts(rows, best, frozen, cards, chosen_test, (other_task, other), rec0, args.task)
    for line in lines:
        print(line)
    pre = json.loads(PRETUNED_CARD.read_text()) if PRETUNED_CARD.is_file() else {}
    src_map = pre.get("metrics", {}).get("source_val_map", float("nan"))
    pre_note = (f"Recipe init: {init_source}. Pre-tuning: shipped module {pre.get('extra', {}).get('recipe', {}).get('steps', '?')} steps × 32, "
                f"pass-2 source val mAP {src_map} (n={pre.get('metrics', {}).get('val_images', '?')} source images, from its "
                f"card, no interval); ~2000 steps not run (400 took {pre.get('timings', {}).get('minutes', '?')} min on 2 "
                "threads: 2000 ≈ 38 min, over this study's budget). Feedback reconstruction on pass 2 ("
                f"{len(probe)} val images; 1.0 = no reconstruction, identity map = {rec0['auto'].get('identity', float('nan')):.3f}): "
                f"pre-tuned {rec0['auto'].get('recon', float('nan')):.3f} vs scratch init {rec0['scratch'].get('recon', float('nan')):.3f}; "
                f"td/stream RMS before tuning {rec0['auto'].get('td_ratio', float('nan')):.3f} (pre-tuned) / "
                f"{rec0['scratch'].get('td_ratio', float('nan')):.3f} (scratch).")
    print(pre_note)
    keys = {"scratch_val_acc": rows.get("pretune_none", {}).get("acc"), "pretuned_val_acc": rows["baseline"]["acc"],
            "lite_val_acc": rows.get("toast_lite", {}).get("acc"), "test_acc": test["acc"] if test else None,
            "recon_pretuned": rec0["auto"].get("recon"), "recon_scratch": rec0["scratch"].get("recon")}
    result_line = (f"RESULT complete={int(not skipped)} minutes={minutes:.1f} task={args.task} arms={len(rows)} "
                   f"best_arm={best} best_val_acc={rows[best]['acc']:.3f} baseline_val_acc={rows['baseline']['acc']:.3f} "
                   + " ".join(f"{k}={v:.3f}" for k, v in keys.items() if v is not None)
                   + f" val_n={n_val} steps={steps} smoke={int(args.smoke)}")
    if args.append_results:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        cmd = "python benchmarks/toast_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
        body = "\n".join([
            "## toast_study: TOAST ablations on validation (issue 16)", "",
            f"{stamp}; `OMP_NUM_THREADS=1 nice -n 5 {cmd.strip()}`; backbone {backbone.name}; {args.threads} thread; "
            f"{minutes:.1f} min.", "",
            f"Budget (REDUCED): task {args.task}; {len(train_set)} train images ({len(train_set) // nc}/class, recipe 300), "
            f"{steps} steps × 32 per arm (recipe: toast 140, toast_lite 100; warmup scaled), one seed ({args.seed}) per arm; "
            f"validation = the task's val split (n={n_val}); the best arm is chosen on validation only (ties within one "
            f"image → the recipe). Arms not run for time: {', '.join(skipped) or 'none'}. Test: {test_source}.", "",
            pre_note, "", *table, "",
            f"Test vs the other methods ({args.task}, zoo cards; each recipe gets ~1-2 CPU-minutes, train s beside it):", "",
            *comp, "", "Verdicts:", "", *lines, "", "```", result_line, "```"])
        key = "toast-study-smoke" if args.smoke else "toast-study"
        write_section(args.results, key, body)
        print(f"wrote the {key} section of {args.results}")
    print(result_line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
