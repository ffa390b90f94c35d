"""Online predictions: routes (split, shadow), the engine both doors share (HTTP and
the ``predict-requests`` stream), the predictions kept for feedback, and online
comparison of variants."""
