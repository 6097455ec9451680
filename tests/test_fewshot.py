"""Few-shot evaluation's shared work and its public API: the linear probe trained on cached features is
exactly `train()`, FORT's importance reuses the episode's ridge head and is computed once for every
FORT method, `tune_episode` keeps the tuned module, and the benchmark's worker processes give the
same results as one process (paired episodes, deterministic per seed) and stop at the guard.

Tiny fixture backbone on one CPU thread.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytest
import torch

from benchmarks import fewshot as bench
from toast_core.core.backbone import Backbone
from toast_core.data.episodes import sample_episode
from toast_core.methods import build_method
from toast_core.methods.fort import position_importance
from toast_core.training.fewshot import (
    EpisodeCache,
    FewShotConfig,
    MethodSpec,
    run_episode,
    tune_episode,
)
from toast_core.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def episode():
    return sample_episode(bench.smoke_task(3, n_classes=4, per_class=5), 3, 2, 2, (0, 1))


def test_linear_probe_on_cached_features_is_exactly_train(fixture_backbone: Backbone, episode) -> None:
    """Same batches, AdamW groups, lr, clipping: identical head and loss, with no backbone forward."""
    cache = EpisodeCache(fixture_backbone, episode, FewShotConfig(n_way=3, k_shot=2, n_query=2))
    tc = TrainConfig(steps=7, batch_size=4, lr=1e-2, weight_decay=0.01, min_lr=0.3, grad_clip=0.5, seed=5)
    slow, fast = build_method("linear", fixture_backbone, 3), build_method("linear", fixture_backbone, 3)
    loss = train(slow, episode.support, None, tc).final["train_loss"]
    assert train(fast, episode.support, None, tc, features=cache.features).final["train_loss"] == loss
    with pytest.raises(ValueError, match="one row per image"):
        train(fast, episode.support, None, tc, features=cache.features[:1])
    assert torch.equal(slow.head.weight, fast.head.weight) and torch.equal(slow.head.bias, fast.head.bias)
    assert not torch.equal(fast.head.weight, build_method("linear", fixture_backbone, 3).head.weight)  # it trained


def test_importance_reuses_the_ridge_head_and_is_shared(fixture_backbone: Backbone, episode) -> None:
    config = FewShotConfig(n_way=3, k_shot=2, n_query=2, steps=1)
    cache = EpisodeCache(fixture_backbone, episode, config)
    fresh = position_importance(cache.reference, cache.x, cache.labels, head_agg="mean")
    assert torch.allclose(position_importance(cache.reference, cache.x, cache.labels, head_agg="mean", ridge=cache.head),
                          fresh, atol=1e-6)
    runs = [
        tune_episode(fixture_backbone, MethodSpec(name, name, lr=1e-3), episode, config, cache=cache)
        for name in ("fort_full", "fort_lora")
    ]
    assert len(cache._importance) == 1  # one rollout for both FORT methods
    assert torch.allclose(next(iter(cache._importance.values())), fresh, atol=1e-6)
    assert torch.equal(runs[0].module.prompt_targets, runs[1].module.prompt_targets)


def test_tune_episode_keeps_the_module_and_agrees_with_run_episode(fixture_backbone: Backbone, episode) -> None:
    config = FewShotConfig.for_episode(episode, steps=2)
    assert (config.n_way, config.k_shot, config.n_query, config.episodes) == (3, 2, 2, 1)
    spec = MethodSpec("FT", "full", lr=1e-3)
    tuned = tune_episode(fixture_backbone, spec, episode, config)
    assert tuned.module.name == "full" and tuned.view.map.shape[0] == len(episode.query)
    assert tuned.result.acc == pytest.approx(float(np.mean(tuned.view.pred == episode.query.labels.numpy())))
    # the kept module is the tuned one: its weights moved, and re-scoring it reproduces the result
    start = build_method("full", fixture_backbone, 3)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.module.model.parameters(), start.model.parameters()))
    again = run_episode(fixture_backbone, spec, episode, 0, config)
    assert (again.acc, again.focus, again.train_loss) == (tuned.result.acc, tuned.result.focus, tuned.result.train_loss)
    assert tuned.result.cpu_seconds > 0


def _args(episodes: int, workers: int) -> argparse.Namespace:
    return bench.parse(["--smoke", "--episodes", str(episodes), "--workers", str(workers)])


def _collect(args: argparse.Namespace, deadline: float) -> dict[tuple[str, int, int, str], tuple]:
    units = [bench.Unit(t, s, i) for i in range(args.episodes) for t in bench.task_names(True) for s in bench.SHOTS]
    out = {}
    for got in bench.run_all(units, args, deadline):
        if got is None:
            continue
        for label, rs in got.results.items():
            for r in rs:
                out[(got.unit.task, got.unit.shot, r.episode, label)] = (r.acc, r.focus, r.train_loss, r.prompt_on_object)
    return out


def test_benchmark_workers_give_the_same_paired_results_and_respect_the_guard() -> None:
    one = _collect(_args(1, 1), time.time() + 600)
    two = _collect(_args(1, 2), time.time() + 600)
    assert len(one) == 2 * 2 * 5  # tasks × shots × methods, one episode each
    assert one == two
    assert _collect(_args(1, 1), time.time() - 1) == {}  # past the guard: no episode starts


def test_benchmark_smoke_prints_every_cell_and_the_result_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--smoke", "--workers", "1", "--episodes", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("| FT+FORT | 2 |") == 4 and "projection for 100 episodes per cell" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT minutes=") and "fort_gain_1shot=" in last and "complete=1" in last
