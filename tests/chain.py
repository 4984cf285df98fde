"""The stages upstream of rl and posttrain, run in-process into one folder, for test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentforge.config import Params
from latentforge.tasks import cache, generator, judge, prepare, tokenizer


def train_through_generator(root: Path, params: Params) -> Path:
    """prepare -> judge -> tokenizer -> cache -> generator into root/<name> (prepared, judge,
    evaluator, tokenizer, cache, generator), run from `root` so their checkpoints land under
    it. Returns root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        prepare.run(params.prepare, out_dir=root / "prepared")
        judge.run(params, out_dir=root / "judge", prepared_dir=root / "prepared")
        tokenizer.run(params, out_dir=root / "tokenizer", prepared_dir=root / "prepared",
                      judge_dir=root / "judge", plot_file=root / "prefix.csv")
        cache.run(params, out_dir=root / "cache", prepared_dir=root / "prepared",
                  tokenizer_dir=root / "tokenizer")
        generator.run(params, out_dir=root / "generator", cache_dir=root / "cache",
                      tokenizer_dir=root / "tokenizer", evaluator_dir=root / "evaluator",
                      prepared_dir=root / "prepared")
    return root
