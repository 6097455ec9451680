"""Training: everything that fits steering modules and scores them. `train` is the one loop (with
`evaluation`, `feature_cache`, `distributed` for DDP), `fewshot` the episode learners, `recipes` the
released settings, `pretrain` / `pretune` / `eval_backbone` build the embedded checkpoints, and `zoo`
trains and ships the lecture zoo."""
