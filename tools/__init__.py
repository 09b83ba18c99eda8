"""Commands beside the library: `python -m tools.bench`, `python -m tools.evidence`, `python -m tools.ablation`."""
