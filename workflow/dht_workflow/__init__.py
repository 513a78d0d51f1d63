"""The workflow's tooling: what keeps Snakemake and DVC running the same pipeline over the :mod:`dht` library.

It imports dht; dht never imports it. Stage scripts import :mod:`dht_workflow.dvc_params` (so this file is part of
their code, and stays empty: editing the generator must not rerun them).
"""
