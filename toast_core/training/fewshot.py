"""N-way K-shot evaluation of steering methods: a fresh module per episode, tuned on the support set.

Per episode and method: build the method fresh, give it a head fitted on the support features
(`head_init="ridge"`, FORT's classifier initialisation; "random" keeps the method's own init), for
FORT methods compute the position prompts, tune with the shared training loop (`train()`, batch =
n_way, constant lr, AdamW), then score the query set: accuracy, and the focus on the deciding object
(share of the last layer's head-mean CLS attention over patches that falls on the query's mask,
beside the mask's area share, its chance level). Summaries give the mean with a 95% CI
(1.96 · sample std / √episodes) and paired differences over the same episodes.

The official FORT setting is 20-way (1 or 5 shot) wherever a data set has at least 20 classes
(`official_n_way`); the built-in tasks have 8 ("stars") and 10 ("glyphs") classes, so they are
evaluated 5-way. Any `LabeledImages` works (built-in tasks via `task_pool`, image folders, uploads).

Shared work (`EpisodeCache`): at init every method here (linear, full, LoRA, BitFit and their FORT
versions) computes exactly the frozen backbone's forward, so the support features, the ridge head and
FORT's importance (with the same ridge head) are computed once per episode on the frozen backbone,
and every FORT method of the episode trains towards the same prompts; a method whose initial features
differ (checked on one support image) gets its own. The linear probe's backbone stays frozen, so it
trains on those cached features (`train(..., features=...)`: the same batches, optimiser and schedule,
without a backbone forward per step) and is scored with one forward of the queries.

`tune_episode` keeps the tuned module and its query attention (the app's few-shot page);
`run_episode` keeps only the scores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from toast_core.core.backbone import Backbone
from toast_core.data.base import LabeledImages
from toast_core.data.episodes import Episode, episodes, sample_episode
from toast_core.methods import build_method
from toast_core.methods.base import SteeringMethod
from toast_core.methods.fort import (
    FortMixin,
    position_importance,
    prompt_targets,
    ridge_head,
    support_features,
)
from toast_core.training.train import TrainConfig, prepare_batch, train, view_over
from toast_core.views import AttentionView, focus_share, focus_summary

HEAD_INITS = ("ridge", "random")
OFFICIAL_WAYS = 20


def official_n_way(num_classes: int) -> int:
    """FORT's 20-way where the data has >= 20 classes, else 5-way (the built-in tasks: 8 and 10)."""
    return OFFICIAL_WAYS if num_classes >= OFFICIAL_WAYS else 5


@dataclass
class MethodSpec:
    """One method in a few-shot comparison: registry name + settings, its lr, optional caps."""

    label: str
    method: str
    config: dict[str, Any] = field(default_factory=dict)
    lr: float = 1e-4
    steps: int | None = None  # None: FewShotConfig's steps / epochs
    episodes: int | None = None  # None: all of FewShotConfig.episodes


@dataclass
class FewShotConfig:
    """Episode shape and tuning recipe shared by every method of a comparison.

    steps None = `epochs` passes over the support set at batch n_way (official: 5 for full FT, 10
    for LoRA). Constant lr (the official loop has no schedule), AdamW, weight decay on ≥2-d tensors.
    """

    n_way: int = 5
    k_shot: int = 1
    n_query: int = 15
    episodes: int = 100
    seed: int = 0
    epochs: int = 5
    steps: int | None = None
    batch_size: int | None = None
    weight_decay: float = 0.01
    grad_clip: float | None = None
    head_init: str = "ridge"
    ridge_lam: float = 50.0
    eval_batch_size: int = 64
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}; got {self.head_init!r}.")
        if self.episodes < 1 or self.epochs < 1:
            raise ValueError("episodes and epochs must be >= 1.")

    @classmethod
    def for_episode(cls, episode: Episode, **settings: Any) -> FewShotConfig:
        """The config whose episode shape is this episode's (n_way from its classes), one episode."""
        n_way = len(episode.support.class_names)
        shape = {"n_way": n_way, "k_shot": max(1, len(episode.support) // n_way),
                 "n_query": max(1, len(episode.query) // n_way), "episodes": 1}
        return cls(**{**shape, **settings})

    def steps_for(self, spec: MethodSpec) -> int:
        if spec.steps is not None:
            return spec.steps
        if self.steps is not None:
            return self.steps
        batch = self.batch_size or self.n_way
        return self.epochs * math.ceil(self.n_way * self.k_shot / batch)


@dataclass
class EpisodeResult:
    """One method on one episode. focus/area are means over the query images (None without masks);
    prompt_on_object: share of the FORT prompts' mass on the support masks (FORT methods only)."""

    label: str
    episode: int
    acc: float
    focus: float | None
    area: float | None
    steps: int
    seconds: float
    train_loss: float
    prompt_on_object: float | None = None
    cpu_seconds: float = 0.0  # CPU time of this process (= compute on one thread; load-independent)


@dataclass
class FewShotSummary:
    """Mean ± 95% CI over the episodes one method completed."""

    label: str
    method: str
    n_way: int
    k_shot: int
    episodes: int
    acc: float
    acc_ci95: float
    focus: float | None
    focus_ci95: float | None
    area: float | None
    prompt_on_object: float | None
    seconds: float
    results: list[EpisodeResult]
    cpu_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the 95% half-width 1.96 · s / √n (s = sample std; 0 for one value, nan for none)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(v.size))


def paired_difference(a: FewShotSummary, b: FewShotSummary, key: str = "acc") -> tuple[float, float, int]:
    """a − b over the episodes both completed (same episodes → paired): (mean, 95% half-width, n)."""
    va = {r.episode: getattr(r, key) for r in a.results}
    vb = {r.episode: getattr(r, key) for r in b.results}
    common = sorted(set(va) & set(vb))
    diffs = [va[e] - vb[e] for e in common if va[e] is not None and vb[e] is not None]
    mean, ci = mean_ci95(diffs)
    return mean, ci, len(diffs)


def task_pool(task: str, per_class: int = 20, seed: int = 0, split: str = "test") -> LabeledImages:
    """A built-in task's images to draw episodes from (masks = the deciding object)."""
    from toast_core.data.scenes import make_task_split

    return make_task_split(task, split, per_class, seed)


# --- one episode ------------------------------------------------------------------------------------
class EpisodeCache:
    """Frozen-backbone work shared by every method of one episode, done once: the prepared support
    input, its frozen features, the ridge head on them, and FORT's importance per setting (so
    FT+FORT and LoRA+FORT train towards the same position prompts)."""

    def __init__(self, backbone: Backbone, episode: Episode, config: FewShotConfig):
        self.episode, self.config = episode, config
        self.reference = SteeringMethod(backbone, config.n_way)  # the frozen forward + a head
        self.x = prepare_batch(self.reference, episode.support.images)
        self.labels = episode.support.labels.to(self.x.device)
        self.features = support_features(self.reference, self.x)
        self.head = ridge_head(self.features, self.labels, config.n_way, config.ridge_lam)
        self._importance: dict[tuple[Any, ...], Tensor] = {}

    def same_start(self, method: SteeringMethod) -> bool:
        """Does the fresh method compute the frozen forward (checked on the first support image)?"""
        return bool(torch.allclose(support_features(method, self.x[:1]), self.features[:1], atol=1e-5, rtol=1e-4))

    def importance(self, cfg: Any) -> Tensor:
        """FORT's importance of the support images for these settings (ridge importance head)."""
        key = (cfg.lam, cfg.head_agg, cfg.keep_top, cfg.ridge_lam)
        if key not in self._importance:
            fitted = self.head if cfg.ridge_lam == self.config.ridge_lam else None
            self._importance[key] = position_importance(
                self.reference, self.x, self.labels, lam=cfg.lam, head_agg=cfg.head_agg,
                keep_top=cfg.keep_top, importance_head="ridge", ridge_lam=cfg.ridge_lam, ridge=fitted,
            )
        return self._importance[key]


@dataclass
class TunedEpisode:
    """One method tuned on an episode's support set and scored on its query set, with the tuned
    module and its query attention kept (what the app's few-shot page shows)."""

    result: EpisodeResult
    module: SteeringMethod
    view: AttentionView  # last-layer head-mean CLS attention of every query image


def _set_head(method: SteeringMethod, weight: Tensor, bias: Tensor) -> None:
    with torch.no_grad():
        method.head.weight.copy_(weight)
        if method.head.bias is not None:
            method.head.bias.copy_(bias)


def _prepare_fort(method: SteeringMethod, cache: EpisodeCache, shared: bool) -> float | None:
    """Position prompts for a FORT method (shared importance where valid); returns their mass on the
    support masks, if the data has masks."""
    assert isinstance(method, FortMixin)
    cfg = method.config
    if shared and cfg.importance_head == "ridge":
        imp = cache.importance(cfg)
        method.set_prompts(cache.x, prompt_targets(imp, method.prompt_count(), cfg.prompt_weights), imp)
    else:
        method.prepare_prompts(cache.episode.support)
    masks = cache.episode.support.masks
    if masks is None or method.prompt_targets is None:
        return None
    grid = method.layout.grid
    maps = method.prompt_targets.reshape(-1, *grid).cpu().numpy()
    return float(np.mean(focus_share(maps, masks)))


def _head_only(method: SteeringMethod, shared: bool) -> bool:
    """May this method train on the episode's support features? A head-only method (its declared
    frozen stage is the pooled feature, `train` checks the rest) on the frozen forward, on CPU (no
    autocast, so its steps equal the uncached ones)."""
    return method.frozen_stage_kind == "features" and shared and method.head.weight.device.type == "cpu"


def score_view(view: AttentionView, query: LabeledImages) -> tuple[float, float | None, float | None]:
    """Accuracy and (with masks) mean focus share / area share of a query view."""
    acc = float((view.pred == query.labels.numpy()).sum()) / max(len(query), 1)
    if query.masks is None:
        return acc, None, None
    focus = focus_summary(view.map, query.masks)
    return acc, focus["focus_share"], focus["area_share"]


def score_queries(method: SteeringMethod, query: LabeledImages, batch_size: int = 64) -> tuple[float, float | None, float | None]:
    """Accuracy and (with masks) mean focus share / area share of last-layer CLS attention, one forward."""
    return score_view(view_over(method, query.images, "cls", batch_size, layer=-1, head="mean"), query)


def tune_episode(
    backbone: Backbone,
    spec: MethodSpec,
    episode: Episode,
    config: FewShotConfig,
    *,
    index: int = 0,
    cache: EpisodeCache | None = None,
) -> TunedEpisode:
    """Build `spec` fresh, initialise its head, prepare FORT prompts, tune on the support set, score
    the queries; keeps the tuned module. `index` seeds the training (seed · 100003 + index)."""
    t0, c0 = time.perf_counter(), time.process_time()
    cache = cache or EpisodeCache(backbone, episode, config)
    method = build_method(spec.method, backbone, config.n_way, dict(spec.config))
    shared = cache.same_start(method)
    if config.head_init == "ridge":
        w, b = cache.head if shared else ridge_head(
            support_features(method, cache.x), cache.labels, config.n_way, config.ridge_lam
        )
        _set_head(method, w, b)
    on_object = _prepare_fort(method, cache, shared) if isinstance(method, FortMixin) else None
    steps = config.steps_for(spec)
    tc = TrainConfig(
        steps=steps,
        batch_size=config.batch_size or config.n_way,
        lr=spec.lr,
        weight_decay=config.weight_decay,
        min_lr=1.0,
        grad_clip=config.grad_clip,
        seed=config.seed * 100_003 + index,
        device=config.device,
    )
    loss = float("nan")
    if steps > 0:
        features = cache.features if _head_only(method, shared) else None
        loss = float(train(method, episode.support, None, tc, features=features).final.get("train_loss", float("nan")))
    view = view_over(method, episode.query.images, "cls", config.eval_batch_size, layer=-1, head="mean")
    acc, focus, area = score_view(view, episode.query)
    result = EpisodeResult(
        label=spec.label,
        episode=index,
        acc=acc,
        focus=focus,
        area=area,
        steps=steps,
        seconds=time.perf_counter() - t0,
        train_loss=loss,
        prompt_on_object=on_object,
        cpu_seconds=time.process_time() - c0,
    )
    return TunedEpisode(result, method, view)


def run_episode(
    backbone: Backbone,
    spec: MethodSpec,
    episode: Episode,
    index: int,
    config: FewShotConfig,
    cache: EpisodeCache | None = None,
) -> EpisodeResult:
    """`tune_episode` without keeping the module: the scores of `spec` on this episode."""
    return tune_episode(backbone, spec, episode, config, index=index, cache=cache).result


# --- many episodes ---------------------------------------------------------------------------------
def summarise(spec: MethodSpec, config: FewShotConfig, results: list[EpisodeResult]) -> FewShotSummary:
    acc, acc_ci = mean_ci95([r.acc for r in results])
    foc = [r.focus for r in results if r.focus is not None]
    focus, focus_ci = mean_ci95(foc) if foc else (None, None)
    areas = [r.area for r in results if r.area is not None]
    prompts = [r.prompt_on_object for r in results if r.prompt_on_object is not None]
    return FewShotSummary(
        label=spec.label,
        method=spec.method,
        n_way=config.n_way,
        k_shot=config.k_shot,
        episodes=len(results),
        acc=acc,
        acc_ci95=acc_ci,
        focus=focus,
        focus_ci95=focus_ci,
        area=float(np.mean(areas)) if areas else None,
        prompt_on_object=float(np.mean(prompts)) if prompts else None,
        seconds=float(sum(r.seconds for r in results)),
        results=results,
        cpu_seconds=float(sum(r.cpu_seconds for r in results)),
    )


def run_episodes(
    backbone: Backbone,
    data: LabeledImages,
    specs: Sequence[MethodSpec],
    config: FewShotConfig,
    episode_ids: Sequence[int],
    *,
    progress: Callable[[EpisodeResult], None] | None = None,
    deadline: float | None = None,
) -> dict[str, list[EpisodeResult]]:
    """Every method on the given episodes (episode i is drawn with seed (config.seed, i), so the same
    ids give the same episodes to every method and every call: paired). A spec with `episodes=n` skips
    ids >= n. `deadline` (a time.monotonic() value) stops before the next episode, keeping what finished."""
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Method labels must be unique: {labels}.")
    results: dict[str, list[EpisodeResult]] = {s.label: [] for s in specs}
    for index in episode_ids:
        active = [s for s in specs if s.episodes is None or index < s.episodes]
        if not active:
            continue
        if deadline is not None and time.monotonic() > deadline:
            break
        episode = sample_episode(data, config.n_way, config.k_shot, config.n_query, (config.seed, index))
        cache = EpisodeCache(backbone, episode, config)
        for spec in active:
            res = run_episode(backbone, spec, episode, index, config, cache)
            results[spec.label].append(res)
            if progress is not None:
                progress(res)
    return results


def evaluate_fewshot(
    backbone: Backbone,
    data: LabeledImages,
    specs: Sequence[MethodSpec],
    config: FewShotConfig | None = None,
    *,
    progress: Callable[[EpisodeResult], None] | None = None,
    deadline: float | None = None,
) -> dict[str, FewShotSummary]:
    """`config.episodes` paired episodes for every method; summaries (mean ± 95% CI) by label."""
    config = config or FewShotConfig()
    episodes(data, config.n_way, config.k_shot, config.n_query, 0, config.seed)  # validate up front
    results = run_episodes(
        backbone, data, specs, config, range(config.episodes), progress=progress, deadline=deadline
    )
    return {s.label: summarise(s, config, results[s.label]) for s in specs}


__all__ = [
    "EpisodeCache",
    "EpisodeResult",
    "FewShotConfig",
    "FewShotSummary",
    "MethodSpec",
    "evaluate_fewshot",
    "mean_ci95",
    "official_n_way",
    "paired_difference",
    "run_episode",
    "run_episodes",
    "score_queries",
    "score_view",
    "summarise",
    "task_pool",
    "tune_episode",
    "TunedEpisode",
]
