"""The bundled MiniLM embedder and the related-prompt index (offline)."""
from __future__ import annotations

import numpy as np
import pytest

from rpo_app.embed import EMBEDDER_NAME, Embedder, PromptIndex, bundled_embedder_path
from rpo_app.io import seed_if_empty
from rpo_app.store import Store


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, embedder):
    """A store with the seed prompts, embedded once for the whole module."""
    store = Store(tmp_path_factory.mktemp("embed") / "data")
    seed_if_empty(store)
    index = PromptIndex(store, embedder)
    embedded = index.refresh()
    yield store, index, embedded
    store.close()


def test_bundled_embedder_loads_offline_and_normalises(embedder):
    assert (bundled_embedder_path() / "config.json").exists()
    assert embedder.name == EMBEDDER_NAME and embedder.dim == 384
    vecs = embedder.encode(["How can I fall asleep faster?", "Tips for better sleep", "SQL joins"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # Similar sentences are closer than unrelated ones.
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    assert embedder.encode([]).shape == (0, 384)


def test_related_prompts_come_from_the_same_family(seeded):
    store, index, embedded = seeded
    assert embedded == store.count_prompts() == len(index) >= 150
    by_text = {p["text"]: p for p in store.prompts()}
    query = by_text["How can I fall asleep faster?"]
    related = index.related(query["id"], k=5)
    assert len(related) == 5 and query["id"] not in [i for i, _ in related]
    scores = [s for _, s in related]
    assert scores == sorted(scores, reverse=True)
    top3_families = [store.prompt(i)["family"] for i, _ in related[:3]]
    assert query["family"] in top3_families, top3_families
    # By text too (not stored): the nearest prompt is the same question.
    assert index.related_to_text("How can I fall asleep faster?", k=1)[0][0] == query["id"]


def test_embeddings_are_cached_and_new_prompts_get_embedded(seeded, embedder):
    store, _, _ = seeded
    fresh = PromptIndex(store, embedder)  # a restart: vectors come from the store
    assert fresh.refresh() == 0
    assert len(fresh) == store.count_prompts()
    new_id, _ = store.add_prompt("What is a good bedtime routine for better sleep?", "test")
    assert fresh.refresh() == 1
    assert fresh.refresh() == 0
    assert fresh.vector(new_id) is not None
    assert fresh.vector(10**9) is None
    assert store.prompt(fresh.related(new_id, k=1)[0][0])["family"] == "advice/sleep-tips"
    # related() on a prompt added after the last refresh embeds it on demand.
    late_id, _ = store.add_prompt("How do I stop snoring at night?", "test")
    assert fresh.related(late_id, k=3)
    assert fresh.vector(late_id) is not None


def test_search_benchmark_smoke(tmp_path):
    from rpo_app.bench.search import bench_related_search

    result = bench_related_search(n_prompts=300, queries=5, data_dir=tmp_path)
    assert result["n_prompts"] == 300 and result["p95_ms"] >= result["p50_ms"] > 0
    assert list(tmp_path.iterdir()) == []  # the temp store is gone


def test_queue_benchmark_runs_at_small_scale(tmp_path):
    from rpo_app.bench.search import bench_label_queue

    result = bench_label_queue(n_prompts=400, n_judgments=600, items=5, data_dir=tmp_path)
    assert result["n_judgments"] == 600  # in the store before the timed annotator starts
    assert result["integrity"] == "ok"
    for mode in ("paired", "cross", "unpaired", "ranking"):
        assert result[f"{mode}_next_item"]["p50_ms"] > 0
        assert result["team"][f"{mode}_next_item"]["p50_ms"] > 0  # overlap 2, gold, rechecks
