"""torchcycle: the ML lifecycle as Prefect flows tracked in MLflow."""

__version__ = "0.1.0"
