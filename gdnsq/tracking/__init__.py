"""The MLflow edge, the only layer that imports MLflow, in import order:

``names`` (keys, string limits, secret scrubbing) → ``store`` (tracking URI, experiments) → ``outbox``
(the on-disk queue of MLflow calls, its delivery thread, ``replay``) → ``plots`` → ``run`` (RunTracker);
``manifest`` (a registered model's size figures, tags and card) → ``registry`` (register, load, list, pull).
"""
