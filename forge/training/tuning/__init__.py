"""Hyperparameter search with Optuna: the search space (``space``), where studies
live (``storage``), a request's study (``study``), one trial (``trial``), the search
from request to version (``search``), what ``forge tune show`` prints (``report``) and
``forge tune stop`` (``stop``).
"""
