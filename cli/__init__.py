"""The ``featurestore`` command: thin click commands over the Python API."""
