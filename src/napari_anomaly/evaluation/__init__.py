"""Evaluation protocols, part of the product (Qt-free; ``scripts/`` only call these).

* :mod:`.clinical` - simulated clinical brain MRI with realistic lesions (the yardstick's cases);
* :mod:`.triage` - region-table measures: rank of the first region on each lesion, top 5;
* :mod:`.yardstick` - running predictors over cases and scoring post-processing variants;
* :mod:`.synthetic` - the earlier synthetic-family protocol;
* :mod:`.anatomy` - the normal anatomy of the default model: files, split, preparation.
* :mod:`.layouts` - one scan stored as scanners store it (slice order, mirrored axes, tilt, int16).
"""
