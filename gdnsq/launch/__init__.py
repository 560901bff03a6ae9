"""Where a job runs, and the only layer that imports Ray.

The run path: ``run`` (identity -> pre-flight -> executor) over ``identity`` (names, folders, the finished rule),
``preflight`` (checks without Ray or data), ``session`` (what a run records, once for both executors) and the two
executors, ``local`` (in-process) and ``ray_train`` + ``ray_worker`` (Ray Train). Beside it: ``sweep/`` (Ray Tune),
``register`` (a finished run's student to the registry), ``storage`` (where runs live), ``console`` (what the user
sees), ``submit`` (a cluster's job server) and ``faults`` (the recovery tests' fault seam)."""
