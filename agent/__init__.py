"""yugami agent: the camera-box side. Never imports TensorFlow."""

__version__ = "0.1.0"
