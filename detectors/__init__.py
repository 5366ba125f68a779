"""Detector packs shipped with featurewatch (installed as ``featurewatch.detectors``)."""
