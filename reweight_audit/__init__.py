"""reweight-audit: how much of a token-reweighting method's attention goes to noise."""

__version__ = "0.1.0"
