"""Active-learning ML backend for Label Studio: ResNet18 retraining on RQ, uncertainty x coreset queue."""

__version__ = "0.1.0"
