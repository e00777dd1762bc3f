"""The shared layer: atomic IO and hashes, weights, registries, config overrides, depth spaces,
figures, the artefact contract and the format table. It imports nothing else of the project, and
every other package may import it (tests/test_layering.py holds both rules)."""
