"""The workstation side of gitops-airgap: turns one Git commit into one signed bundle.

It renders per-host files from the repo's ``gitops.yaml``, templates and variables,
signs the canonical manifest and writes the tar. The format itself (manifest model,
tar layout, verification) is imported from ``applier`` so there is one definition.
"""
