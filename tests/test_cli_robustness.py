"""``lowrank-ext finetune`` on inputs real users give it: no silently wrong
numbers, and every mistake a one-line error with exit status 2 before any work."""

import pytest

from lowrank_ext.finetune import data


def _alternating_file(tmp_path, count=60):
    """Labels alternate in file order; sorted by text, all 'neg' come first."""
    path = tmp_path / "alternating.csv"
    rows = [(f"{'neg' if index % 2 else 'pos'} example {index}", "neg" if index % 2 else "pos")
            for index in range(count)]
    path.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return path


def test_max_train_samples_is_a_stratified_sample(tmp_path):
    train = data.load_file_splits(_alternating_file(tmp_path)).train
    shares = {label: train.labels.count(label) / len(train) for label in set(train.labels)}
    sample = train.sample(10, seed=0)
    assert len(sample) == 10
    # Every label keeps its share (rounded), not the first N texts in sorted order.
    for label, share in shares.items():
        assert abs(sample.labels.count(label) - 10 * share) < 1
    assert set(sample.texts) <= set(train.texts)
    # Reproducible for a seed, and another seed draws other examples.
    assert sample.texts == train.sample(10, seed=0).texts
    assert sample.texts != train.sample(10, seed=1).texts
    assert train.sample(None, seed=0) is train and train.sample(len(train), seed=0) is train
