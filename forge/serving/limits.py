"""What one HTTP API request may ask for (the body size is a setting)."""

from __future__ import annotations

# Inputs of one predict request, as for a ``predict-request`` event.
MAX_INPUTS = 10_000
# Results of one search.
MAX_K = 1000
