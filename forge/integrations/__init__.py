"""Bridges from other systems to Forge's streams. Each module's extra dependencies are
imported by that module alone, and only when used (``pip install 'forge[prefect]'``)."""
