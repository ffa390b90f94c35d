"""Text to vectors: the sentence-transformers model (``model``), the byte-bounded cache
of loaded models (``model_cache``), the Redis cache of computed vectors (``cache``), the
service that ties them to a vector store (``service``), and ``search``."""
