"""auditkit: universal adversarial perturbation audits of medical-imaging classifiers."""
import os

# Offline by construction: onnxruntime's telemetry (read at its first import, here or in a Ray worker) and Ray's
# usage stats would reach the network; every entry point, and every Ray task, imports this package first.
os.environ.update(ORT_DISABLE_TELEMETRY="1", RAY_USAGE_STATS_ENABLED="0")

__version__ = "0.1.0"
