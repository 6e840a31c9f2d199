"""``emoe-llm study`` / ``emoe-llm report``: dense vs EMoE vs random split over seeds and documents, with intervals.

    spec.py    the study file: base recipe + overrides, seeds, arms, baseline, primary metric, eval; validated whole
    run.py     ``emoe-llm study``: shared conversions, one cell (arm, seed) after another or a Slurm job array
    stats.py   seed x document intervals of per-document (paired) tables, the MDE, Holm's adjustment
    report.py  ``emoe-llm report``: report.json / report.md / report.png from the cells' eval JSONs, their
               per-document records and metrics.jsonl
    power.py   ``emoe-llm study --dry-run --pilot DIR``: a planned study's MDE from a finished one

A layer on top of the others: cells train through ``emoe-llm train`` (or the Slurm wrapper) and are scored by
``emoe-llm eval`` as subprocesses, exactly as a user would run them by hand.
"""
