"""Models the toolkit can fetch or build offline (e.g. `smollm2.ensure_smollm2`) and helpers
to load them. Submodules are imported on demand: importing this package loads nothing heavy."""
