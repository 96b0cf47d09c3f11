"""Distilled routers (paper Table 6): shapes, causality, the word-embedding expert table, errors."""
import pytest
import torch

from stablemoe_megatron.routing import distillation_loss
from stablemoe_megatron.routing.distilled import (
    DISTILLED_ROUTER_KINDS,
    CNNRouter,
    DistilledRouter,
    TransformerRouter,
    WordEmbeddingRouter,
    build_distilled_router,
)

VOCAB, EXPERTS = 97, 6


def make(kind, **options):
    torch.manual_seed(0)
    return build_distilled_router(kind, VOCAB, EXPERTS, **options)


@pytest.mark.parametrize("kind", DISTILLED_ROUTER_KINDS)
def test_shapes_and_defaults(kind):
    router = make(kind)
    assert isinstance(router, DistilledRouter)
    assert router.dim == 50 and router.centroids.shape == (EXPERTS, 50)
    ids = torch.randint(0, VOCAB, (3, 11))
    assert router.features(ids).shape == (3, 11, 50)
    scores = router.scores(ids)
    assert scores.shape == (3, 11, EXPERTS)
    torch.testing.assert_close(router(ids), scores)
    torch.testing.assert_close(scores, router.features(ids) @ router.centroids.t())
    assert router.context_free == (kind == "wordemb")


def test_builder_classes_and_options():
    assert type(make("wordemb")) is WordEmbeddingRouter
    cnn = make("cnn", kernel_size=5, num_layers=2)
    assert type(cnn) is CNNRouter and len(cnn.convolutions) == 2 and cnn.kernel_size == 5
    transformer = make("transformer", num_layers=3, num_heads=5, dim=20)
    assert type(transformer) is TransformerRouter and len(transformer.encoder.layers) == 3
    assert transformer.dim == 20


def test_paper_parameter_count():
    router = WordEmbeddingRouter(50257, 32)  # paper: 2.51M parameters for the distilled router
    assert sum(p.numel() for p in router.embedding.parameters()) == 50257 * 50
    assert round(sum(p.numel() for p in router.parameters()) / 1e6, 2) == 2.51


def test_initialisation_is_small_normal_and_seeded():
    a, b = make("wordemb"), make("wordemb")
    torch.testing.assert_close(a.embedding.weight, b.embedding.weight, rtol=0, atol=0)
    torch.testing.assert_close(a.centroids, b.centroids, rtol=0, atol=0)
    big = WordEmbeddingRouter(5000, 64)
    assert abs(big.embedding.weight.std().item() - 0.02) < 0.001
    assert abs(big.centroids.std().item() - 0.02) < 0.002


@pytest.mark.parametrize(
    "kind,options",
    [("wordemb", {}), ("cnn", {}), ("cnn", {"num_layers": 3, "kernel_size": 4}),
     ("transformer", {"num_layers": 1}), ("transformer", {"num_layers": 3})],
)
@pytest.mark.parametrize("train", [True, False])
def test_routers_are_causal(kind, options, train):
    router = make(kind, **options).train(train)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 16), generator=generator)
    scores = router.scores(ids)
    for cut in (0, 5, 14):
        changed = ids.clone()
        changed[:, cut + 1:] = torch.randint(0, VOCAB, (2, 15 - cut), generator=generator)
        torch.testing.assert_close(router.scores(changed)[:, : cut + 1], scores[:, : cut + 1],
                                   rtol=1e-6, atol=1e-6)
    if kind != "wordemb":  # and they do use context: changing an earlier token changes later scores
        changed = ids.clone()
        changed[:, 3] = (ids[:, 3] + 1) % VOCAB
        assert not torch.allclose(router.scores(changed)[:, 4], scores[:, 4])


def test_word_embedding_expert_table():
    router = make("wordemb")
    table = router.expert_table()
    assert table.dtype == torch.long and table.shape == (VOCAB,)
    ids = torch.randint(0, VOCAB, (4, 9))
    assert torch.equal(table[ids], router.scores(ids).argmax(-1))
    assert torch.equal(router.expert_table(chunk_size=10), table)
    with pytest.raises(NotImplementedError):
        make("cnn").expert_table()
    with pytest.raises(NotImplementedError):
        make("transformer").expert_table()


@pytest.mark.parametrize("kind", DISTILLED_ROUTER_KINDS)
def test_distillation_trains_the_router(kind):
    router = make(kind)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    teacher = torch.randint(0, EXPERTS, (24,), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.Adam(router.parameters(), lr=0.05)
    first = None
    for _ in range(30):
        loss = distillation_loss(router.scores(ids).reshape(-1, EXPERTS), teacher)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert router.centroids.grad is not None and router.embedding.weight.grad is not None
    assert loss.item() < 0.5 * first


def test_errors():
    with pytest.raises(ValueError, match="--moe-distill-router 'lstm'; choices: wordemb, cnn, transformer"):
        build_distilled_router("lstm", VOCAB, EXPERTS)
    for layers in (0, 4):
        with pytest.raises(ValueError, match="num_layers must be 1..3"):
            build_distilled_router("transformer", VOCAB, EXPERTS, num_layers=layers)
    with pytest.raises(ValueError, match="divisible"):
        build_distilled_router("transformer", VOCAB, EXPERTS, dim=50, num_heads=3)
    with pytest.raises(ValueError, match="max_positions"):
        make("transformer", max_positions=8).scores(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError):
        build_distilled_router("cnn", VOCAB, EXPERTS, kernel_size=0)
    with pytest.raises(ValueError):
        WordEmbeddingRouter(0, EXPERTS)
