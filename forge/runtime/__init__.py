"""The delivery runtime: from a stream entry to a settled outcome.

``worker`` reads top to bottom: ``sources`` gives it a batch, ``processing`` turns the
batch into records with verdicts, ``settle`` writes their completions, dead letters and
done markers, and ``broker`` sends every Redis command. What happens is reported to an
``observer`` (the metrics, ``forge.observability.runtime_metrics``). It knows nothing of
embedding, vector stores or training: those arrive as handlers (``handlers``) that
consumers register.
"""
