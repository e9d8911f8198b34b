"""Patch derivation: harmful data, the signed per-example-mean NLL, the training loop."""
