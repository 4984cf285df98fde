"""The equal-count comparison with held-out real images (tasks/generator.at_real_count): one
count and one class composition for both sets, so a generator that draws from the real
distribution scores at the real images' floor."""

from __future__ import annotations

import numpy as np
import pytest

from latentforge import metrics
from latentforge.tasks import generator
from latentforge.tasks.generator import EQUAL_COUNT_SUBSETS, at_real_count, class_matched_rows

CLASSES, DIM = 10, 16


def clustered(rng: np.random.Generator, centres: np.ndarray, per_class: list[int]
              ) -> tuple[np.ndarray, np.ndarray]:
    """Features clustered by class (centres far apart, as an evaluator's are), and labels."""
    labels = np.repeat(np.arange(len(per_class)), per_class)
    return centres[labels] + rng.normal(size=(len(labels), centres.shape[1])), labels


@pytest.fixture
def population() -> tuple[np.random.Generator, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng, rng.normal(scale=4.0, size=(CLASSES, DIM))


def test_class_matched_rows_draw_each_class_count() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2, 0, 1, 2, 2])
    rows = class_matched_rows(labels, {0: 2, 1: 1, 2: 3}, np.random.default_rng(0))
    assert list(rows) == sorted(set(rows.tolist()))  # sorted, no repeats
    assert np.bincount(labels[rows]).tolist() == [2, 1, 3]
    whole = class_matched_rows(labels, {0: 2, 1: 3, 2: 5}, np.random.default_rng(1))
    assert whole.tolist() == list(range(10))  # every row when the counts are the class sizes


def test_a_generator_drawing_from_the_real_distribution_scores_at_the_floor(population) -> None:
    """Generated sets from the real distribution (50 per class) against a held-out real set of
    the default digits' shape (18 per class, one class 17): the ratio of their FDs at equal
    counts stays near 1. Random subsets (the old comparison) gave class proportions of their
    own and FD ratios of several times."""
    rng, centres = population
    ref, _ = clustered(rng, centres, [160] * CLASSES)
    real, real_labels = clustered(rng, centres, [18] * 8 + [17, 18])
    ratios, random_ratios = [], []
    for seed in range(5):
        gen, gen_labels = clustered(rng, centres, [50] * CLASSES)
        generated, floor = at_real_count(ref, gen, gen_labels, real, real_labels, seed=seed)
        assert generated["n"] == floor["n"] == 179
        ratios.append(generated["fd_at_n"] / floor["fd_at_n"])
        pick = np.random.default_rng(seed).choice(len(gen), 179, replace=False)
        random_ratios.append(metrics.fd_from_features(ref, gen[pick]) / floor["fd_at_n"])
    assert 0.7 < np.mean(ratios) < 1.4, ratios
    # What the class matching removes: random subsets' class proportions alone inflate FD.
    assert np.mean(random_ratios) > 1.5 * np.mean(ratios), (random_ratios, ratios)


def test_real_images_of_the_requested_classes_only(population, monkeypatch) -> None:
    """A class the generated set lacks is left out of both sets; a class with fewer generated
    than real images takes that many of each; both sides draw those class counts."""
    rng, centres = population
    ref, _ = clustered(rng, centres, [40] * CLASSES)
    real, real_labels = clustered(rng, centres, [10] * CLASSES)
    gen, gen_labels = clustered(rng, centres, [20] * 8 + [4, 0])
    drawn: list[list[int]] = []

    def recording(labels, counts, rng):
        rows = class_matched_rows(labels, counts, rng)
        drawn.append(np.bincount(labels[rows], minlength=CLASSES).tolist())
        return rows

    monkeypatch.setattr(generator, "class_matched_rows", recording)
    generated, floor = at_real_count(ref, gen, gen_labels, real, real_labels)
    assert generated["n"] == floor["n"] == 8 * 10 + 4
    expected = [10] * 8 + [4, 0]
    assert drawn == [expected] * (1 + EQUAL_COUNT_SUBSETS)  # the real set, then each draw
    for key in ("fd_at_n", "kid_at_n", "precision_at_n", "recall_at_n"):
        assert np.isfinite(generated[key]) and np.isfinite(floor[key]), key


def test_mismatched_or_disjoint_labels_are_refused(population) -> None:
    rng, centres = population
    ref, _ = clustered(rng, centres, [20] * CLASSES)
    real, real_labels = clustered(rng, centres, [5] * CLASSES)
    gen, gen_labels = clustered(rng, centres, [5] * CLASSES)
    with pytest.raises(ValueError, match="differ in length"):
        at_real_count(ref, gen, gen_labels[:-1], real, real_labels)
    with pytest.raises(ValueError, match="share 0 image"):
        at_real_count(ref, gen, np.full(len(gen), 99), real, real_labels)


def test_one_draw_when_every_class_is_used_whole(population, monkeypatch) -> None:
    """Generated classes no larger than the real ones are taken whole: one panel, not five
    identical ones."""
    rng, centres = population
    ref, _ = clustered(rng, centres, [40] * CLASSES)
    real, real_labels = clustered(rng, centres, [10] * CLASSES)
    gen, gen_labels = clustered(rng, centres, [6] * CLASSES)
    calls: list[int] = []

    def counting(labels, counts, rng):
        calls.append(len(labels))
        return class_matched_rows(labels, counts, rng)

    monkeypatch.setattr(generator, "class_matched_rows", counting)
    generated, floor = at_real_count(ref, gen, gen_labels, real, real_labels)
    assert generated["n"] == floor["n"] == 60 and calls == [len(real), len(gen)]


def test_precision_recall_reference_takes_the_class_counts_given_its_labels(
        population, monkeypatch) -> None:
    """With the reference's labels, precision/recall's n reference rows have the compared
    sets' class counts; without them, a random n (the P/R numbers then move with the
    reference subset's class proportions)."""
    rng, centres = population
    ref, ref_labels = clustered(rng, centres, [40] * CLASSES)
    real, real_labels = clustered(rng, centres, [10] * CLASSES)
    real, real_labels = real[real_labels != 3], real_labels[real_labels != 3]  # one class absent
    gen, gen_labels = clustered(rng, centres, [6] * CLASSES)
    picked: list[np.ndarray] = []

    def recording(labels, counts, rng):
        rows = class_matched_rows(labels, counts, rng)
        picked.append(np.bincount(labels[rows], minlength=CLASSES))
        return rows

    monkeypatch.setattr(generator, "class_matched_rows", recording)
    generated, floor = at_real_count(ref, gen, gen_labels, real, real_labels,
                                     ref_labels=ref_labels)
    assert generated["n"] == floor["n"] == 54
    expected = np.array([6] * CLASSES)
    expected[3] = 0
    # real, reference (for P/R), generated: one class composition
    assert len(picked) == 3 and all((p == expected).all() for p in picked)
    assert 0.0 <= generated["precision_at_n"] <= 1.0 and 0.0 <= floor["recall_at_n"] <= 1.0
    with pytest.raises(ValueError, match="reference labels"):
        at_real_count(ref, gen, gen_labels, real, real_labels, ref_labels=ref_labels[:-1])
