"""fer_lightning: experiment-tracked facial expression recognition on PyTorch Lightning, Hydra and MLflow."""

__version__ = "0.1.0"
