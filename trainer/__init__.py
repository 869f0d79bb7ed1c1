"""yugami trainer: the workstation side (TensorFlow/Keras). Imports the agent's preprocessing and
bundle format, never the reverse."""
