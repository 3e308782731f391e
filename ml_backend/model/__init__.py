"""The classifier: ResNet18 construction, device batching, training, pool inference, storage.

Modules (import the one you need; this package imports nothing, so ``storage`` can be used
without loading torch):

- ``network``: ``build_model``, ``resolve_device``, ``embed_and_classify``.
- ``data``: uint8 arrays -> normalised, augmented device batches.
- ``train``: ``fit``, ``train_one_epoch``, ``evaluate``, ``default_epochs``.
- ``inference``: ``predict`` (probabilities and 512-d embeddings for a whole pool).
- ``storage``: ``ModelStore``, atomic versioned model folders.
- ``sizing``: ``choose_image_size`` from the pool's native image sizes.
- ``split``: ``fold_of`` / ``hash_split``, validation folds that follow the task id.
- ``pretrain``: ``pretrain_backbone`` (SimCLR on the pool); ``backbones``: ``BackboneStore``.
- ``features``: ``backbone_model``, ``embed`` (frozen-backbone embeddings).
- ``recipe``: ``train_served_model``, the low-label recipe that picks what is served.
"""
