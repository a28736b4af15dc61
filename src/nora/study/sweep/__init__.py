"""The sweep (`nora sweep paper-mini`, …): a grid of runs, each in its own folder with its
`result.json` (`nora.study.results.SweepRun`), phases lr → runs → ablations → probe →
efficiency (`run.py`), and its markdown report (`report.py`, `nora report` on a sweep
folder). The rank-scaling study (`nora.study.runner`, `nora.study.report`) supersedes it
for new work; the sweep stays for the committed `results/paper-mini` record.
Both are a `nora.study.context.Runner`."""
