"""Evaluation: prompt suites, batched generation, judging (one outcome per completion), metrics,
utility, reports.

Python API twins: `safepatch eval` -> `safepatch_merge.eval.run.evaluate` (one model) and
`safepatch_merge.eval.report.compare` (several result files side by side); `safepatch judge`
-> `safepatch_merge.eval.judge_file.judge_file`.
"""
