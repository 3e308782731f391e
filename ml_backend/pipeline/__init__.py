"""What a job does with a project, apart from how it is queued (``ml_backend.jobs``): the task
index (``task_index``: changed tasks from Label Studio), the pool (``pool``: tasks, labels and
images from the cache), the training job (``training``: orchestration only), publishing to Label
Studio (``publish``) and the live ``/predict`` model (``serving``)."""
