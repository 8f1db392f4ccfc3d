"""The evaluation system behind ``kvframe eval`` (needs the ``[eval]`` extra: lightning, wandb,
matplotlib, datasets).

- :mod:`kvframe.eval.config`: the config schema, loading and validation, the grid of labelled cells;
- :mod:`kvframe.eval.runner`: :func:`~kvframe.eval.runner.evaluate`, one Lightning ``Trainer.test`` per cell;
- :mod:`kvframe.eval.module`: the Lightning module and data module of one cell;
- :mod:`kvframe.eval.generation`: samples (prefill, compression, decoding, or streaming perplexity), the
  questions of one context from one compressed prefill;
- :mod:`kvframe.eval.results`: fingerprints, resume, aggregation, the ``results.json`` schema;
- :mod:`kvframe.eval.plots`, :mod:`kvframe.eval.metrics`, :mod:`kvframe.eval.models`, :mod:`kvframe.eval.tasks`.

The library (``kvframe.build``/``attach``/``compress``) never imports this package.
"""
