"""The sweep wing of ``launch``: a Ray Tune sweep in which every trial is a full run of the run path.

``plan`` validates a sweep file without Ray; ``tune`` drives the Tuner and registers the best trial(s);
``report`` tabulates the trials and saves the summary; ``pareto`` is the accuracy-vs-size front's maths;
``ray_workarounds`` patches Ray internals (imported only by ``tune``)."""
