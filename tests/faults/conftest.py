from tests.processes import pipeline

__all__ = ["pipeline"]
