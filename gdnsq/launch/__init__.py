"""Where a job runs: in-process (``local``), on Ray Train (``ray_train``), as a Ray Tune sweep, or submitted
to a cluster's job server. The only layer that imports Ray."""
