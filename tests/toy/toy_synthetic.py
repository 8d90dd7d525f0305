# The toy detector on the generated shapes (see tests/toy/detector.py).
_base_ = ["../../configs/synthetic/_base_/synthetic_data.py", "mmdet::_base_/default_runtime.py"]
custom_imports = dict(imports=["tests.toy.detector"], allow_failed_imports=False)
model = dict(
    type="ToyDetector",
    data_preprocessor=dict(
        type="DetDataPreprocessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=32,
    ),
)
val_evaluator = dict(metric="bbox")
optim_wrapper = dict(optimizer=dict(lr=0.05), clip_grad=None)
