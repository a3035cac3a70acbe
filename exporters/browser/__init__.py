"""The feature browser of `featurestore serve` (see routes.py and queries.py)."""
