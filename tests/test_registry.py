"""The extension points (hstu.registry): a name registered becomes a valid gin choice, its
documentation lists it and its implementation runs; unregistered, it is refused again."""

from __future__ import annotations

import pytest
import torch

from hstu import args as A
from hstu.registry import (
    ATTENTION_BACKENDS,
    DATASETS,
    NEGATIVE_SAMPLING,
    RETRIEVAL_METRICS,
    AttentionBackend,
    DatasetReader,
    NegativeSampling,
    Registry,
    RetrievalMetric,
)
from hstu.validation import field_specs


@pytest.fixture
def registered():
    """register(registry, name, entry), undone after the test."""
    added: list[tuple[Registry, str]] = []

    def register(registry: Registry, name: str, entry) -> None:
        registry.register(name, entry)
        added.append((registry, name))

    yield register
    for registry, name in added:
        registry.unregister(name)


def _type_of(cls: type, field: str) -> str:
    return next(t for name, t, _, _ in field_specs(cls) if name == field)


def _network(**kw) -> A.NetworkArgs:
    return A.NetworkArgs(num_layers=1, hidden_size=8, num_attention_heads=1, kv_channels=8, **kw)


def toy_attention(q, k, v, offsets, max_seqlen, **kwargs):
    return torch.zeros_like(v)


def test_a_registered_backend_is_a_choice_and_runs(registered):
    with pytest.raises(A.ConfigError, match="'toy' is not one of 'cutlass' | 'triton' | 'pytorch'"):
        _network(kernel_backend="toy")
    registered(ATTENTION_BACKENDS, "toy", AttentionBackend(f"{__name__}:toy_attention"))
    assert _network(kernel_backend="toy").kernel_backend == "toy"
    assert _type_of(A.NetworkArgs, "kernel_backend").endswith("'pytorch' | 'toy'")
    from hstu.ops import hstu_attention

    q = torch.randn(5, 1, 4)
    out = hstu_attention(q, q, q, torch.tensor([0, 5]), 5, alpha=1.0, scaling_seqlen=5,
                         backend="toy")
    assert out.abs().max() == 0


def test_an_unregistered_backend_is_refused_again(registered):
    registered(ATTENTION_BACKENDS, "toy", AttentionBackend(f"{__name__}:toy_attention"))
    ATTENTION_BACKENDS.unregister("toy")
    with pytest.raises(A.ConfigError, match="'toy' is not one of"):
        _network(kernel_backend="toy")
    ATTENTION_BACKENDS.register("toy", AttentionBackend(f"{__name__}:toy_attention"))


def test_a_registered_dataset_is_a_choice(registered, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no tmp_data/<name> folder makes it valid by accident
    with pytest.raises(A.ConfigError, match="'toyset' is not one of ml-1m, .*, custom, 'stream' .*, nor"):
        A.DatasetArgs(dataset_name="toyset", max_sequence_length=4)
    registered(DATASETS, "toyset", DatasetReader(f"{__name__}:toy_attention"))
    assert A.DatasetArgs(dataset_name="toyset", max_sequence_length=4).dataset_name == "toyset"
    from hstu.data.preprocess import check_known_dataset

    check_known_dataset("toyset")
    with pytest.raises(ValueError, match="unknown dataset 'toyse' .did you mean 'toyset'.?"):
        check_known_dataset("toyse")


def toy_metric(ranks: torch.Tensor, k: int) -> torch.Tensor:
    return (ranks <= k).float() * 2


def test_a_registered_metric_is_a_choice_and_computes(registered):
    with pytest.raises(A.ConfigError, match="'TOY@3' is not HR@K, NDCG@K or MRR"):
        A.RetrievalArgs(eval_metrics=("TOY@3",))
    registered(RETRIEVAL_METRICS, "TOY", RetrievalMetric(f"{__name__}:toy_metric", at_k=True))
    assert A.RetrievalArgs(eval_metrics=("TOY@3",)).eval_metrics == ("TOY@3",)
    with pytest.raises(A.ConfigError, match="'TOY' is not HR@K, NDCG@K, MRR or TOY@K"):
        A.RetrievalArgs(eval_metrics=("TOY",))
    from hstu.model.metrics import retrieval_metrics

    got = retrieval_metrics(torch.tensor([1.0, 5.0]), ["TOY@3", "MRR"])
    assert got["TOY@3"].tolist() == [2.0, 0.0]


def toy_loss(x):
    """The in-batch loss times 2 (a strategy drawing nothing)."""
    from hstu.ops.losses.strategies import in_batch

    loss, logits = in_batch(x)
    return loss * 2, logits


def test_a_registered_negative_sampling_is_a_choice_and_trains(registered):
    with pytest.raises(A.ConfigError, match="'toy' is not one of 'uniform' | 'in_batch'"):
        A.RetrievalArgs(negative_sampling="toy")
    registered(NEGATIVE_SAMPLING, "toy", NegativeSampling(f"{__name__}:toy_loss", None, "-1"))
    assert A.RetrievalArgs(negative_sampling="toy").negative_sampling == "toy"
    assert _type_of(A.RetrievalArgs, "negative_sampling").endswith("'sampled_live' | 'toy' | 'auto'")
    with pytest.raises(A.ConfigError, match="must be -1 with negative_sampling='toy'"):
        A.RetrievalArgs(negative_sampling="toy", num_negatives=4)

    from tests.model.helpers import make_batch
    from tests.model.test_models import _retrieval

    batch = make_batch([[1, 2, 3, 4], [5, 6, 7]])
    losses = []
    for sampling in ("in_batch", "toy"):
        model = _retrieval(-1, sampling=sampling)
        torch.manual_seed(1)  # the same dropout
        losses.append(model(batch)[0])
    assert torch.equal(losses[1], losses[0] * 2)


def test_registry_refuses_a_name_twice_and_an_unknown_one():
    with pytest.raises(ValueError, match="attention backend 'pytorch' is already registered"):
        ATTENTION_BACKENDS.register("pytorch", AttentionBackend("x:y"))
    with pytest.raises(ValueError, match="unknown negative sampling 'unifrm' .did you mean"):
        NEGATIVE_SAMPLING["unifrm"]
