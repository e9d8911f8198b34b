"""Evaluation: prompt suites, batched generation, refusal judge, metrics, utility, reports.

Python API twin of `safepatch eval`: `safepatch_merge.eval.run.evaluate` (one model) and
`safepatch_merge.eval.report.compare` (several result files side by side).
"""
