"""The model out of the loop: commands that use a trained version outside Label Studio.

- ``predict``: a version on image files or folders -> CSV or JSON (label and confidence).
- ``export``: a version as TorchScript or ONNX, with its label list and preprocessing, checked
  against the stored model.
- ``versions``: which stored version a command uses (the served one by default).

They load models only through ``ModelStore.load`` and predict through
``ml_backend.model.inference.predict`` (or check against it), so a version's own head and image
size are honoured.
"""
