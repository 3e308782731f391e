"""Everything that talks to Label Studio or turns its tasks into (image, label) pairs.

- ``labels``: the project's Image + Choices pair (``parse_config``), annotation votes -> one label
  (``task_label``, ``LabelTally`` for a renamed ``<Choices>``), the prediction result
  (``choice_result``), the task's image URL (``image_url``).
- ``client``: ``LabelStudioClient`` over label-studio-sdk 2.x (projects, paged tasks, bulk
  predictions, model versions, the queue view, tokens), with bounded retries and named errors.
- ``images``: decoding (``decode_image``, ``to_array``) and ``ImageCache``, which resolves every
  URL kind Label Studio produces, downloads concurrently and caches resized arrays on disk.
- ``hosts``: where downloads may go (``HostPolicy``: Label Studio, its redirects, IMAGE_HOSTS;
  no private addresses otherwise, checked after DNS and on the connected socket).
- ``webhooks``: ``basic_auth_header`` and the client's ``backend_urls``/``ensure_webhook_auth``,
  which put our basic auth on the project's webhook.

Submodules are imported explicitly (``from ml_backend.labelstudio.client import ...``) so that
importing the package costs nothing.
"""
