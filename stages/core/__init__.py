"""The library every stage shares: the stage contract and the artifact store.

``config`` (typed configs), ``errors`` (the user's errors), ``runner`` (load config, cache check,
work, commit), ``manifest`` (the commit marker and code version), ``store`` (the artifact store),
``checkpoints`` and ``models`` (loading base models and adapters). Nothing here imports a stage
module: the code a stage runs is its own module plus this package.
"""
