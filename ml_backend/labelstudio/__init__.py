"""Everything that talks to Label Studio or turns its tasks into (image, label) pairs.

- ``labels``: the project's Image + Choices pair (``parse_config``), annotation votes -> one label
  (``task_label``), the prediction result (``choice_result``), the task's image URL (``image_url``).
- ``client``: ``LabelStudioClient`` over label-studio-sdk 2.x (projects, paged tasks, bulk
  predictions, model versions, the queue view, tokens), with bounded retries and named errors.
- ``images``: decoding (``decode_image``, ``to_array``) and ``ImageCache``, which resolves every
  URL kind Label Studio produces, downloads concurrently and caches resized arrays on disk.

Submodules are imported explicitly (``from ml_backend.labelstudio.client import ...``) so that
importing the package costs nothing.
"""
