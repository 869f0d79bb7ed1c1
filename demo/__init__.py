"""The demo: synthetic parts standing in for a camera, an embedded broker, and ``python -m demo.run``.

Nothing here is used by the agent or the trainer at run time; tests and the demo use it as a
stand-in for a real camera. It is never a substitute for real images in benchmarks.
"""
