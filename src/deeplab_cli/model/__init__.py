"""The model's assets: the LargeFOV network as an ONNX graph (`network`), the weight files it is built
from (`caffemodel`, `weights`, `download`), the registry and cache of known models (`registry`), the
onnxruntime sessions that run it (`runtime`), and the upsampling of its scores (`upsample`)."""
