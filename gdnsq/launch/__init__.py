"""Where a job runs, and the only layer that imports Ray: in-process or on Ray Train (``local``: pre-flight
and dispatch; ``ray_train``), as a Ray Tune sweep (``sweep_plan`` validates without Ray, ``ray_tune`` drives,
``ray_workarounds`` patches Ray internals, ``sweep_report`` tabulates), ``register`` (a finished run's student
to the registry), ``storage`` (where runs live), or submitted to a cluster's job server (``submit``)."""
