"""One function per DVC stage: read inputs, call the library, write artifacts, log to MLflow.

``stages/<stage>.py`` only hands the composed Hydra config to these.
"""
