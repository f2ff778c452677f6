"""auditkit: universal adversarial perturbation audits of medical-imaging classifiers."""
__version__ = "0.1.0"
