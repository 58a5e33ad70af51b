"""ONNX Runtime HTTP service for registered ballot models.

Runs without torch or the ballot library (the Docker image has neither): numpy, onnxruntime,
FastAPI/uvicorn, pydantic, Pillow, and mlflow-skinny only when a ``models:/`` URI is served.
Start it with ``python -m serving`` (configured by environment variables) or ``ballot serve``.
"""
