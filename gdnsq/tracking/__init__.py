"""The MLflow edge: run tracking (buffered through an on-disk outbox), plots and the model registry.
The only layer that imports MLflow."""
