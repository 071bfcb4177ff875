"""The operator layer: the ``dicom-ingest`` command line and the commands that span both sides.

The one package allowed to import ``ingest``, ``receiver`` and ``workers`` together; nothing
imports it (the import contracts in pyproject.toml, checked by ``lint-imports``).
"""
