"""Serving: a model folder checked against its manifest, the OpenVINO engine, the predictor, the verdict and the
model described in plain words. numpy, Pillow and OpenVINO only: nothing here imports torch."""
