"""Finding features and fitting detectors from labelled records."""
