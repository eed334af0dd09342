"""The library every stage shares: the stage contract and the artifact store.

``config`` (typed configs), ``errors`` (what a stage reports in one line), ``runner`` (load config,
cache check, work, commit), ``manifest`` (the commit marker and the code version), ``uris`` (URI
rules and redaction), ``retries`` (what a storage failure means, bounded retries), ``store`` (file
operations on fsspec), ``encodings`` (UTF-8 with or without a byte-order mark, or refused),
``checkpoints`` and ``models`` (loading base models and adapters). Nothing
here imports a stage module: the code a stage runs is its own module plus this package.
"""
