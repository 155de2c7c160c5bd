from .errors import MeshkitError, StatusCode  # noqa: F401
