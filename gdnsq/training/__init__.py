"""Framework-free QAT: the job (data -> teacher -> surgery -> epochs -> summary), the engine's loop, the
objective and schedules, model surgery, the checkpoint schema and bit tables. Imports no Ray or MLflow."""
