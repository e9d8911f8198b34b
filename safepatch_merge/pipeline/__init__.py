"""Pipelines over the toolkit's steps: `run` (derive -> score -> merge -> eval, continual
stages, reruns skip finished steps), `sweep` (a grid of merges from existing patches and scores)
and `demo` (the whole pipeline on SmolLM2-135M-Instruct, offline)."""
