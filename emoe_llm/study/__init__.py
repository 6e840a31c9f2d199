"""``emoe-llm study`` / ``emoe-llm report``: dense vs EMoE vs random split over seeds, with confidence intervals.

    spec.py    the study file: base recipe + overrides, seeds, arms, baseline, eval; validated as a whole
    run.py     ``emoe-llm study``: shared conversions, one cell (arm, seed) after another or a Slurm job array
    stats.py   Student t intervals over seeds and paired differences against the baseline arm
    report.py  ``emoe-llm report``: report.json / report.md / report.png from the cells' eval JSONs and metrics.jsonl

A layer on top of the others: cells train through ``emoe-llm train`` (or the Slurm wrapper) and are scored by
``emoe-llm eval`` as subprocesses, exactly as a user would run them by hand.
"""
